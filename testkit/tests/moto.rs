//! moto's server from the project venv: starts, records SES mail, resets, dies with its handle.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use caretaker_testkit::moto::Moto;
use caretaker_testkit::ports::HttpResponse;

/// moto accepts any signature, but routes by the service in the credential scope.
const SES_AUTH: &str =
    "AWS4-HMAC-SHA256 Credential=testing/20240101/eu-west-1/ses/aws4_request, SignedHeaders=host, Signature=00";

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ses(moto: &Moto, params: &[(&str, &str)]) -> HttpResponse {
    let mut form = String::from("Version=2010-12-01");
    for (k, v) in params {
        form.push_str(&format!("&{k}={}", urlencode(v)));
    }
    moto.request(
        "POST",
        "/",
        &[("Authorization", SES_AUTH), ("Content-Type", "application/x-www-form-urlencoded")],
        form.as_bytes(),
    )
    .unwrap()
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
        }
    }
    out
}

fn pid_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn send_and_read_back(moto: &Moto) {
    let r = ses(
        moto,
        &[
            ("Action", "SendEmail"),
            ("Source", "alerts@example.com"),
            ("Destination.ToAddresses.member.1", "ops@example.com"),
            ("Message.Subject.Data", "x"),
            ("Message.Body.Text.Data", "x"),
        ],
    );
    assert_eq!(r.status, 400, "unverified sender is refused: {}", r.text());
    assert!(r.text().contains("MessageRejected"), "{}", r.text());

    let r = ses(moto, &[("Action", "VerifyEmailIdentity"), ("EmailAddress", "alerts@example.com")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = ses(
        moto,
        &[
            ("Action", "SendEmail"),
            ("Source", "alerts@example.com"),
            ("Destination.ToAddresses.member.1", "ops@example.com"),
            ("Destination.CcAddresses.member.1", "boss@example.com"),
            ("Message.Subject.Data", "Backup failed on i-0123"),
            ("Message.Body.Text.Data", "pg_dump exited 1\nsee the journal"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let raw = "From: alerts@example.com\r\nTo: ops@example.com\r\nSubject: Raw\r\n report\r\n\r\nraw body\r\n";
    let r = ses(
        moto,
        &[("Action", "SendRawEmail"), ("Source", "alerts@example.com"), ("RawMessage.Data", &base64(raw.as_bytes()))],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let sent = moto.sent_emails().unwrap();
    assert_eq!(sent.len(), 2, "{sent:#?}");
    assert_eq!(sent[0].source, "alerts@example.com");
    assert_eq!(sent[0].destinations, ["ops@example.com", "boss@example.com"]);
    assert_eq!(sent[0].subject, "Backup failed on i-0123");
    assert_eq!(sent[0].body, "pg_dump exited 1\nsee the journal");
    assert_eq!(sent[0].raw, None);
    assert_eq!(sent[1].destinations, ["ops@example.com"]);
    assert_eq!((sent[1].subject.as_str(), sent[1].body.as_str()), ("Raw report", "raw body\r\n"));
    assert_eq!(sent[1].raw.as_deref(), Some(raw));

    moto.reset().unwrap();
    assert!(moto.sent_emails().unwrap().is_empty());
}

#[test]
fn ses_mail_is_recorded_and_process_dies_with_handle() {
    let moto = Moto::start().unwrap();
    let pid = moto.pid();
    assert!(pid_exists(pid));
    assert_eq!(moto.endpoint(), format!("http://127.0.0.1:{}", moto.port()));
    let env = moto.aws_env();
    for (k, v) in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "eu-west-1")]
    {
        assert!(env.contains(&(k.to_string(), v.to_string())), "{k} in {env:?}");
    }
    assert!(env.contains(&("AWS_ENDPOINT_URL".to_string(), moto.endpoint())));

    send_and_read_back(&moto);

    let log = moto.log_path().to_path_buf();
    drop(moto);
    assert!(!pid_exists(pid), "moto_server (PID {pid}) outlived its handle");
    assert!(!log.exists());
}

#[test]
fn two_motos_side_by_side() {
    let a = Moto::start().unwrap();
    let b = Moto::start().unwrap();
    assert_ne!(a.port(), b.port());
    let r = ses(&a, &[("Action", "VerifyEmailIdentity"), ("EmailAddress", "a@example.com")]);
    assert_eq!(r.status, 200);
    let r = ses(
        &a,
        &[
            ("Action", "SendEmail"),
            ("Source", "a@example.com"),
            ("Destination.ToAddresses.member.1", "x@example.com"),
            ("Message.Subject.Data", "s"),
            ("Message.Body.Text.Data", "b"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(a.sent_emails().unwrap().len(), 1);
    assert!(b.sent_emails().unwrap().is_empty(), "state is per process");
}

/// Kills and reaps the child on drop, by PID.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn runs_inside_another_network_namespace() {
    // A stand-in for a container: a process in a fresh network namespace with lo up.
    let holder = Reaped(
        Command::new("unshare")
            .args(["--net", "sh", "-c", "ip link set lo up && exec sleep 300"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) is needed"),
    );
    let pid = holder.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() != "sleep" {
        assert!(Instant::now() < deadline, "the namespace holder never got to sleep");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "unshare did not make a new network namespace"
    );

    let moto = Moto::start_in_netns(pid).unwrap();
    let moto_pid = moto.pid();
    assert_eq!(
        std::fs::read_link(format!("/proc/{moto_pid}/ns/net")).unwrap(),
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        "moto listens in the holder's namespace"
    );
    send_and_read_back(&moto);
    drop(moto);
    assert!(!pid_exists(moto_pid));
}
