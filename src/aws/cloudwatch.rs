//! CloudWatch: custom metrics (PutMetricData) and the alarms that watch them (DescribeAlarms).
//!
//! The SDK crate is pinned to a version that speaks CloudWatch's query protocol, which every
//! endpoint (and moto, the tests' emulator) understands; later versions speak only CBOR.

use std::time::SystemTime;

use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit};

/// PutMetricData takes at most this many data in one call.
pub const MAX_DATA_PER_CALL: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum CloudWatchError {
    #[error("CloudWatch {call} failed: {message}")]
    Call { call: &'static str, message: String },
}

/// The unit of a datum, as CloudWatch names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Count,
    Seconds,
    Bytes,
    Percent,
}

impl Unit {
    fn standard(self) -> StandardUnit {
        match self {
            Unit::Count => StandardUnit::Count,
            Unit::Seconds => StandardUnit::Seconds,
            Unit::Bytes => StandardUnit::Bytes,
            Unit::Percent => StandardUnit::Percent,
        }
    }
}

/// One value of one metric at one moment, with its dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub name: &'static str,
    pub dimensions: Vec<(&'static str, String)>,
    pub value: f64,
    pub unit: Unit,
    pub at: SystemTime,
}

/// An alarm and the state CloudWatch has it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmState {
    pub name: String,
    /// `OK`, `ALARM` or `INSUFFICIENT_DATA`.
    pub state: String,
    pub reason: String,
}

#[derive(Clone)]
pub struct CloudWatch {
    client: aws_sdk_cloudwatch::Client,
}

fn message<E, R>(e: &aws_sdk_cloudwatch::error::SdkError<E, R>) -> String
where
    E: aws_sdk_cloudwatch::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match e.as_service_error() {
        Some(se) => format!("{}: {}", se.code().unwrap_or("error"), se.message().unwrap_or("")),
        None => crate::http::error_chain(e),
    }
}

impl CloudWatch {
    pub fn new(client: aws_sdk_cloudwatch::Client) -> Self {
        CloudWatch { client }
    }

    /// Puts `data` (at most [`MAX_DATA_PER_CALL`]) into `namespace` in one call.
    pub async fn put(&self, namespace: &str, data: &[Datum]) -> Result<(), CloudWatchError> {
        let data = data
            .iter()
            .map(|d| {
                let dims = d
                    .dimensions
                    .iter()
                    .map(|(name, value)| Dimension::builder().name(*name).value(value).build())
                    .collect();
                MetricDatum::builder()
                    .metric_name(d.name)
                    .set_dimensions(Some(dims))
                    .value(d.value)
                    .unit(d.unit.standard())
                    .timestamp(DateTime::from(d.at))
                    .build()
            })
            .collect();
        self.client
            .put_metric_data()
            .namespace(namespace)
            .set_metric_data(Some(data))
            .send()
            .await
            .map_err(|e| CloudWatchError::Call { call: "PutMetricData", message: message(&e) })?;
        Ok(())
    }

    /// Every metric alarm whose name starts with `prefix`, and its state.
    pub async fn alarms(&self, prefix: &str) -> Result<Vec<AlarmState>, CloudWatchError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .describe_alarms()
                .alarm_name_prefix(prefix)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| CloudWatchError::Call { call: "DescribeAlarms", message: message(&e) })?;
            for a in page.metric_alarms() {
                out.push(AlarmState {
                    name: a.alarm_name().unwrap_or_default().to_string(),
                    state: a.state_value().map(|s| s.as_str().to_string()).unwrap_or_default(),
                    reason: a.state_reason().unwrap_or_default().to_string(),
                });
            }
            match page.next_token() {
                Some(t) if !t.is_empty() && out.len() < 10_000 => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }
}
