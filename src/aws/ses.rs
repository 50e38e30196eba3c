//! SES: plain-text alert emails.

use aws_sdk_ses::types::{Body, Content, Destination, Message};

#[derive(Debug, thiserror::Error)]
pub enum SesError {
    #[error("SES SendEmail from {from} failed: {message}")]
    Send { from: String, message: String },
    #[error("SES: invalid email: {0}")]
    Build(String),
}

#[derive(Clone)]
pub struct SesClient {
    client: aws_sdk_ses::Client,
}

impl SesClient {
    pub fn new(client: aws_sdk_ses::Client) -> Self {
        SesClient { client }
    }

    /// Sends one UTF-8 plain-text email; returns SES's message id.
    pub async fn send(&self, from: &str, to: &[String], subject: &str, body: &str) -> Result<String, SesError> {
        let content =
            |s: &str| Content::builder().data(s).charset("UTF-8").build().map_err(|e| SesError::Build(e.to_string()));
        let message =
            Message::builder().subject(content(subject)?).body(Body::builder().text(content(body)?).build()).build();
        let out = self
            .client
            .send_email()
            .source(from)
            .destination(Destination::builder().set_to_addresses(Some(to.to_vec())).build())
            .message(message)
            .send()
            .await
            .map_err(|e| {
                let message = match e.as_service_error() {
                    Some(se) => {
                        format!("{}: {}", se.meta().code().unwrap_or("error"), se.meta().message().unwrap_or(""))
                    }
                    None => crate::http::error_chain(&e),
                };
                SesError::Send { from: from.to_string(), message }
            })?;
        Ok(out.message_id().to_string())
    }

    /// The verification status SES has for each of `identities` (`Success`, `Pending`, …); an
    /// identity SES does not know is absent. The error is SES's code and message.
    pub async fn verification_statuses(
        &self,
        identities: &[&str],
    ) -> Result<std::collections::BTreeMap<String, String>, String> {
        let mut call = self.client.get_identity_verification_attributes();
        for i in identities {
            call = call.identities(*i);
        }
        let out = call.send().await.map_err(|e| match e.as_service_error() {
            Some(se) => format!("{}: {}", se.meta().code().unwrap_or("error"), se.meta().message().unwrap_or("")),
            None => crate::http::error_chain(&e),
        })?;
        Ok(out
            .verification_attributes()
            .iter()
            .map(|(k, a)| (k.clone(), a.verification_status().as_str().to_string()))
            .collect())
    }
}
