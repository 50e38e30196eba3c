//! SSM Parameter Store, read only: every parameter under a path, recursively and decrypted, page by
//! page (`NextToken`). Throttling and server errors are retried with jittered exponential backoff,
//! on top of the SDK's own standard retries, all within one deadline per read. Values are held in
//! [`SecretString`], which never prints them; errors carry the path and operation, never a value.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ssm::operation::get_parameters_by_path::{GetParametersByPathError, GetParametersByPathOutput};
use aws_sdk_ssm::types::ParameterType;
use tokio::time::Instant;
use tracing::debug;

/// The operation behind [`SsmClient::read_path`], as named in errors and IAM policies.
pub const GET_PARAMETERS_BY_PATH: &str = "GetParametersByPath";
/// `MaxResults` of one page; 10 is the service's maximum.
pub const PAGE_SIZE: i32 = 10;
/// More pages than this means the service keeps handing out tokens: give up rather than loop.
const MAX_PAGES: usize = 1000;
/// Error codes that mean "slow down", not "no".
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "TooManyUpdates",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "RequestThrottledException",
];

/// A secret: `Debug` and `Display` print `<redacted>`; only [`SecretString::expose`] gives the text.
/// There is deliberately no `Serialize`. (Not zeroized on drop: the SDK's buffers held it too; the
/// point is keeping values out of logs, errors and panics.)
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(value.into())
    }

    /// The secret text. Call sites should be few and obvious.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for SecretString {
    fn from(s: String) -> Self {
        SecretString(s)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The type of a parameter as SSM reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParameterKind {
    String,
    StringList,
    SecureString,
    /// A type this SDK version does not know.
    Other(String),
}

impl fmt::Display for ParameterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParameterKind::String => f.write_str("String"),
            ParameterKind::StringList => f.write_str("StringList"),
            ParameterKind::SecureString => f.write_str("SecureString"),
            ParameterKind::Other(s) => f.write_str(s),
        }
    }
}

/// One parameter: its full name (`/zmanim/prod/db-password`), its (decrypted) value, its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    pub name: String,
    pub value: SecretString,
    pub kind: ParameterKind,
}

/// Everything under a path, and how it came.
#[derive(Debug, Clone)]
pub struct PathListing {
    /// Sorted by name, each name once.
    pub parameters: Vec<Parameter>,
    /// How many parameters each page held, in the order read.
    pub pages: Vec<usize>,
    /// Calls that were retried (throttling, 5xx, transport trouble).
    pub retries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SsmError {
    #[error(
        "SSM {operation} {path}: access denied: the instance role may not read {path}: add ssm:{operation} on {resource} to its policy (AWS said: {message})"
    )]
    AccessDenied { operation: &'static str, path: String, resource: String, message: String },
    #[error(
        "SSM {operation} {path}: a SecureString under {path} could not be decrypted ({code}): the instance role needs kms:Decrypt on the parameter's KMS key (AWS said: {message})"
    )]
    Decrypt { operation: &'static str, path: String, code: String, message: String },
    #[error("SSM {operation} {path}: no answer within {deadline:?} after {calls} calls (last problem: {last})")]
    Deadline { operation: &'static str, path: String, deadline: Duration, calls: u32, last: String },
    #[error("SSM {operation} {path}: {code}{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Service { operation: &'static str, path: String, code: String, status: Option<u16>, message: String },
    #[error("SSM {operation} {path}: {reason}")]
    Request { operation: &'static str, path: String, reason: String },
    #[error("SSM {operation} {path}: unexpected answer: {reason}")]
    BadAnswer { operation: &'static str, path: String, reason: String },
}

/// What one failed call comes to.
enum Verdict {
    Retry(String),
    Fatal(SsmError),
}

/// Reads parameters. Cheap to clone (the SDK client is shared).
#[derive(Debug, Clone)]
pub struct SsmClient {
    client: aws_sdk_ssm::Client,
    deadline: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl SsmClient {
    /// Wraps a client from [`crate::aws::sdk::ssm_client`]. Each read must finish within 90 s.
    pub fn new(client: aws_sdk_ssm::Client) -> Self {
        SsmClient {
            client,
            deadline: Duration::from_secs(90),
            initial_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(5),
        }
    }

    /// Upper bound for one read, all pages and retries included.
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// First pause after a throttled call, and the cap the doubling stops at.
    pub fn with_backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial.max(Duration::from_millis(1));
        self.max_backoff = max.max(self.initial_backoff);
        self
    }

    /// Every parameter under `path` (recursive, decrypted), sorted by name.
    pub async fn get_parameters_by_path(&self, path: &str) -> Result<Vec<Parameter>, SsmError> {
        Ok(self.read_path(path).await?.parameters)
    }

    /// [`Self::get_parameters_by_path`] with paging and retry counts, for reports.
    pub async fn read_path(&self, path: &str) -> Result<PathListing, SsmError> {
        let deadline = Instant::now() + self.deadline;
        let mut jitter = Jitter::new();
        let mut calls = 0u32;
        let mut found = BTreeMap::new();
        let mut pages = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.page(path, token.as_deref(), deadline, &mut jitter, &mut calls).await?;
            let params = page.parameters.unwrap_or_default();
            pages.push(params.len());
            for p in params {
                let p = convert(path, p)?;
                found.insert(p.name.clone(), p);
            }
            match page.next_token.filter(|t| !t.is_empty()) {
                None => break,
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(bad_answer(path, "the same NextToken came back twice".into()));
                }
                Some(next) => token = Some(next),
            }
            if pages.len() >= MAX_PAGES {
                return Err(bad_answer(path, format!("more than {MAX_PAGES} pages")));
            }
        }
        let retries = calls - pages.len() as u32;
        debug!(path, parameters = found.len(), pages = pages.len(), retries, "read SSM parameters");
        Ok(PathListing { parameters: found.into_values().collect(), pages, retries })
    }

    /// One page, retried until it comes or the deadline passes.
    async fn page(
        &self,
        path: &str,
        token: Option<&str>,
        deadline: Instant,
        jitter: &mut Jitter,
        calls: &mut u32,
    ) -> Result<GetParametersByPathOutput, SsmError> {
        let mut backoff = self.initial_backoff;
        // What the last answered call said: a call cut off by the deadline says nothing new.
        let mut answered: Option<String> = None;
        loop {
            *calls += 1;
            let request = self
                .client
                .get_parameters_by_path()
                .path(path)
                .recursive(true)
                .with_decryption(true)
                .max_results(PAGE_SIZE)
                .set_next_token(token.map(str::to_string));
            let remaining = deadline.saturating_duration_since(Instant::now());
            let last = match tokio::time::timeout(remaining, request.send()).await {
                Ok(Ok(page)) => return Ok(page),
                Ok(Err(e)) => match classify(path, &self.region(), e) {
                    Verdict::Retry(reason) => reason,
                    Verdict::Fatal(e) => return Err(e),
                },
                Err(_) => match &answered {
                    Some(a) => format!("{a}; a call was still running at the deadline"),
                    None => "a call was still running at the deadline".to_string(),
                },
            };
            answered = Some(last.clone());
            // Full jitter on the upper half: many boxes booting at once spread out.
            let pause = backoff / 2 + Duration::from_nanos(jitter.next() % (backoff.as_nanos() as u64 / 2 + 1));
            if Instant::now() + pause >= deadline {
                return Err(SsmError::Deadline {
                    operation: GET_PARAMETERS_BY_PATH,
                    path: path.to_string(),
                    deadline: self.deadline,
                    calls: *calls,
                    last,
                });
            }
            debug!(path, pause_ms = pause.as_millis() as u64, "SSM: {last}; retrying");
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }

    fn region(&self) -> String {
        self.client.config().region().map(|r| r.as_ref().to_string()).unwrap_or_default()
    }
}

fn bad_answer(path: &str, reason: String) -> SsmError {
    SsmError::BadAnswer { operation: GET_PARAMETERS_BY_PATH, path: path.to_string(), reason }
}

fn convert(path: &str, p: aws_sdk_ssm::types::Parameter) -> Result<Parameter, SsmError> {
    let Some(name) = p.name else {
        return Err(bad_answer(path, "a parameter without a name".into()));
    };
    let kind = match p.r#type {
        Some(ParameterType::String) => ParameterKind::String,
        Some(ParameterType::StringList) => ParameterKind::StringList,
        Some(ParameterType::SecureString) => ParameterKind::SecureString,
        Some(other) => ParameterKind::Other(other.as_str().to_string()),
        None => ParameterKind::Other(String::new()),
    };
    let Some(value) = p.value else {
        return Err(bad_answer(path, format!("parameter {name} has no value")));
    };
    Ok(Parameter { name, value: SecretString(value), kind })
}

/// The IAM resources a read of `path` needs: the path itself (what `GetParametersByPath` is
/// authorized against) and everything below it (`arn:aws:ssm:REGION:ACCOUNT:parameter/a/b/*`).
pub fn path_resource_arns(region: &str, account: Option<&str>, path: &str) -> [String; 2] {
    let partition = if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    };
    let region = if region.is_empty() { "REGION" } else { region };
    let account = account.unwrap_or("ACCOUNT");
    let base = format!("arn:{partition}:ssm:{region}:{account}:parameter");
    match path.trim_matches('/') {
        "" => [format!("{base}/"), format!("{base}/*")],
        p => [format!("{base}/{p}"), format!("{base}/{p}/*")],
    }
}

/// The account id in an AWS message that quotes an ARN (`…:assumed-role/…` or `arn:aws:ssm:…`).
fn account_in(message: &str) -> Option<&str> {
    message.split("arn:").skip(1).find_map(|rest| {
        let account = rest.split(':').nth(3)?;
        (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())).then_some(account)
    })
}

/// At most `max` characters of an AWS message (they never hold parameter values, but can be long).
fn excerpt(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_string() } else { format!("{}…", s.chars().take(max).collect::<String>()) }
}

fn classify(path: &str, region: &str, e: SdkError<GetParametersByPathError>) -> Verdict {
    let op = GET_PARAMETERS_BY_PATH;
    let request = |reason: String| Verdict::Fatal(SsmError::Request { operation: op, path: path.into(), reason });
    match &e {
        SdkError::TimeoutError(_) => Verdict::Retry("the call timed out".into()),
        SdkError::DispatchFailure(d) if d.is_user() => {
            request(format!("the request could not be sent: {}", DisplayErrorContext(&e)))
        }
        // Connection trouble, or no credentials yet (the instance role can lag early in boot).
        SdkError::DispatchFailure(_) => Verdict::Retry(format!("{}", DisplayErrorContext(&e))),
        SdkError::ResponseError(r) => {
            // Not the body: only the status (an unreadable answer could echo anything).
            let status = r.raw().status().as_u16();
            if status >= 500 {
                Verdict::Retry(format!("unreadable answer with HTTP {status}"))
            } else {
                request(format!("unreadable answer with HTTP {status}"))
            }
        }
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let code = e.code().unwrap_or("UnknownError").to_string();
            let message = excerpt(e.message().unwrap_or(""), 400);
            if THROTTLING_CODES.contains(&code.as_str()) || status == 429 {
                return Verdict::Retry(format!("throttled ({code})"));
            }
            if status >= 500 || code == "InternalServerError" {
                return Verdict::Retry(format!("{code} (HTTP {status})"));
            }
            let kms = code == "InvalidKeyId" || code.starts_with("KMS") || message.contains("kms:");
            if kms {
                return Verdict::Fatal(SsmError::Decrypt { operation: op, path: path.into(), code, message });
            }
            if code == "AccessDeniedException" || code == "AccessDenied" || status == 403 {
                let [own, below] = path_resource_arns(region, account_in(&message), path);
                let resource = format!("{own} and {below}");
                return Verdict::Fatal(SsmError::AccessDenied { operation: op, path: path.into(), resource, message });
            }
            Verdict::Fatal(SsmError::Service { operation: op, path: path.into(), code, status: Some(status), message })
        }
        _ => request(format!("{}", DisplayErrorContext(&e))),
    }
}

/// Pseudo-random numbers for backoff jitter, seeded from the clock and the PID (xorshift64*): not
/// for anything secret, only so boxes booting together do not retry in step.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        Jitter(if seed == 0 { 1 } else { seed })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = SecretString::new("hunter2");
        assert_eq!(format!("{s} {s:?} {s:#?}"), "<redacted> <redacted> <redacted>");
        let p = Parameter { name: "/a/b".into(), value: s.clone(), kind: ParameterKind::SecureString };
        let shown = format!("{p:?} {p:#?}");
        assert!(!shown.contains("hunter2") && shown.contains("/a/b"), "{shown}");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn resource_arns() {
        assert_eq!(
            path_resource_arns("eu-west-1", None, "/zmanim/prod/"),
            [
                "arn:aws:ssm:eu-west-1:ACCOUNT:parameter/zmanim/prod",
                "arn:aws:ssm:eu-west-1:ACCOUNT:parameter/zmanim/prod/*"
            ]
        );
        assert_eq!(
            path_resource_arns("cn-north-1", Some("123456789012"), "/a")[1],
            "arn:aws-cn:ssm:cn-north-1:123456789012:parameter/a/*"
        );
        assert_eq!(path_resource_arns("", None, "/")[1], "arn:aws:ssm:REGION:ACCOUNT:parameter/*");
    }

    #[test]
    fn account_from_an_access_denied_message() {
        let m = "User: arn:aws:sts::123456789012:assumed-role/box/i-0abc is not authorized to perform: \
                 ssm:GetParametersByPath on resource: arn:aws:ssm:eu-west-1:123456789012:parameter/zmanim/prod";
        assert_eq!(account_in(m), Some("123456789012"));
        assert_eq!(account_in("no arns here"), None);
    }

    #[test]
    fn jitter_moves() {
        let mut j = Jitter::new();
        let a = j.next();
        let b = j.next();
        assert_ne!(a, b);
    }
}
