//! One module per AWS service, each with its own client and error type.

/// CloudWatch: custom metrics and the alarms on them.
pub mod cloudwatch;
/// The instance metadata service, IMDSv2 only.
pub mod imds;
/// The one region resolver.
pub mod region;
/// S3: multipart uploads, manifests, listing.
pub mod s3;
/// SDK configuration (region, credentials, timeouts, retries) and the per-service clients built from it.
pub mod sdk;
/// SES: alert emails.
pub mod ses;
/// SSM Parameter Store: every parameter under a path, decrypted, with secrets kept out of logs.
pub mod ssm;
