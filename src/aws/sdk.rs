//! The one place AWS SDK clients are built. [`sdk_config`] is made once per command (region,
//! credentials, timeouts, retries); each service then gets its client from it through a small
//! function that applies that service's endpoint override from `[aws]`.
//!
//! Adding a service later follows [`ssm_client`]: `aws_sdk_X::config::Builder::from(sdk)`, then
//! `endpoint_url` when `aws.X-endpoint` is set. For S3 a custom endpoint (moto, MinIO) also needs
//! `.force_path_style(true)`, since such endpoints have no per-bucket DNS names; S3 uploads of large
//! parts may also want a longer operation timeout than [`OPERATION_TIMEOUT`] (`.timeout_config(..)`
//! on that builder overrides it for S3 alone).

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader, Region, SdkConfig};
use aws_sdk_ssm::config::ProvideCredentials;
use tracing::warn;

use crate::config::AwsConfig;

/// Establishing a TCP/TLS connection: endpoints are in-region (or VPC endpoints), so this is short.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// One attempt of one call; a stalled attempt is abandoned and retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// One call, the SDK's own retries included.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Shared SDK configuration: `region` (from `[aws] region` or IMDS), the default credential chain
/// (environment, profile, web identity, ECS, then the instance role through IMDSv2 at
/// `aws.imds-endpoint`), the timeouts above and the SDK's standard retry mode.
pub async fn sdk_config(aws: &AwsConfig, region: &str) -> SdkConfig {
    let mut chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(Region::new(region.to_string()));
    // The instance role's credentials come from the same metadata service the rest of caretaker
    // uses (the lab points it at a fake). The SDK's IMDS client is IMDSv2-only, like ours.
    match aws_config::imds::Client::builder().endpoint(&aws.imds_endpoint) {
        Ok(imds) => chain = chain.imds_client(imds.build()),
        Err(e) => {
            warn!(endpoint = %aws.imds_endpoint, "IMDS endpoint not usable for credentials ({e}); using the SDK's default")
        }
    }
    loader(region).credentials_provider(chain.build().await).load().await
}

/// [`sdk_config`] with fixed credentials instead of the default chain (tests, tools).
pub async fn sdk_config_with_credentials(region: &str, credentials: impl ProvideCredentials + 'static) -> SdkConfig {
    loader(region).credentials_provider(credentials).load().await
}

fn loader(region: &str) -> ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .retry_config(RetryConfig::standard())
}

/// The SSM client, at `aws.ssm-endpoint` when set (moto in tests).
pub fn ssm_client(sdk: &SdkConfig, aws: &AwsConfig) -> aws_sdk_ssm::Client {
    let mut conf = aws_sdk_ssm::config::Builder::from(sdk);
    if let Some(url) = &aws.ssm_endpoint {
        conf = conf.endpoint_url(url);
    }
    aws_sdk_ssm::Client::from_conf(conf.build())
}

/// The S3 client, at `aws.s3-endpoint` when set (path-style then: emulators and VPC endpoints
/// have no per-bucket DNS names). Large part uploads get a longer attempt timeout than other calls.
pub fn s3_client(sdk: &SdkConfig, aws: &AwsConfig) -> aws_sdk_s3::Client {
    let mut conf = aws_sdk_s3::config::Builder::from(sdk).timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(std::time::Duration::from_secs(120))
            .operation_timeout(std::time::Duration::from_secs(600))
            .build(),
    );
    if let Some(url) = &aws.s3_endpoint {
        conf = conf.endpoint_url(url).force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(conf.build())
}

/// The SES client, at `aws.ses-endpoint` when set.
pub fn ses_client(sdk: &SdkConfig, aws: &AwsConfig) -> aws_sdk_ses::Client {
    let mut conf = aws_sdk_ses::config::Builder::from(sdk);
    if let Some(url) = &aws.ses_endpoint {
        conf = conf.endpoint_url(url);
    }
    aws_sdk_ses::Client::from_conf(conf.build())
}

/// The CloudWatch client, at `aws.cloudwatch-endpoint` when set.
pub fn cloudwatch_client(sdk: &SdkConfig, aws: &AwsConfig) -> aws_sdk_cloudwatch::Client {
    let mut conf = aws_sdk_cloudwatch::config::Builder::from(sdk);
    if let Some(url) = &aws.cloudwatch_endpoint {
        conf = conf.endpoint_url(url);
    }
    aws_sdk_cloudwatch::Client::from_conf(conf.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_config::retry::RetryMode;

    #[tokio::test]
    async fn region_timeouts_retries_and_credentials_are_set() {
        let aws = AwsConfig { ssm_endpoint: Some("http://127.0.0.1:9".into()), ..AwsConfig::default() };
        let sdk = sdk_config(&aws, "eu-west-1").await;
        assert_eq!(sdk.region().map(|r| r.as_ref()), Some("eu-west-1"));
        let t = sdk.timeout_config().expect("timeouts");
        assert_eq!(t.connect_timeout(), Some(CONNECT_TIMEOUT));
        assert_eq!(t.operation_attempt_timeout(), Some(ATTEMPT_TIMEOUT));
        assert_eq!(t.operation_timeout(), Some(OPERATION_TIMEOUT));
        assert_eq!(sdk.retry_config().map(|r| r.mode()), Some(RetryMode::Standard));
        assert!(sdk.credentials_provider().is_some());
        let ssm = ssm_client(&sdk, &aws);
        assert_eq!(ssm.config().region().map(|r| r.as_ref()), Some("eu-west-1"));
        assert_eq!(ssm.config().timeout_config().and_then(|t| t.connect_timeout()), Some(CONNECT_TIMEOUT));
    }
}
