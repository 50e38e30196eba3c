//! One module per AWS service, each with its own client and error type.

/// The instance metadata service, IMDSv2 only.
pub mod imds;
