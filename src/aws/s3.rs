//! S3: the multipart uploads backups stream into, small objects (manifests), listing and deletion.
//! Every error names the operation, bucket and key.

pub use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

#[derive(Debug, thiserror::Error)]
#[error("S3 {operation} s3://{bucket}/{key}: {message}")]
pub struct S3Error {
    pub operation: &'static str,
    pub bucket: String,
    pub key: String,
    pub message: String,
}

fn describe<E>(e: &aws_sdk_s3::error::SdkError<E>) -> String
where
    E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
{
    match e {
        aws_sdk_s3::error::SdkError::ServiceError(se) => {
            let meta = aws_sdk_s3::error::ProvideErrorMetadata::meta(se.err());
            format!("{}: {}", meta.code().unwrap_or("error"), meta.message().unwrap_or(""))
        }
        other => crate::http::error_chain(other),
    }
}

/// What a conditional put found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    /// An object with that key exists already; nothing was written.
    Exists,
}

#[derive(Clone)]
pub struct S3 {
    client: aws_sdk_s3::Client,
    /// Parts go with `UNSIGNED-PAYLOAD` (see [`S3::with_unsigned_parts`]).
    unsigned_parts: bool,
}

/// Multipart uploads this process created and has neither completed nor aborted: a cleaner of
/// stale uploads (left by a killed daemon) must never abort one of these, whose backup is running.
static IN_FLIGHT: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

fn in_flight() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<String>> {
    IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether upload `upload_id` is one of this process's, still running.
pub fn ours_in_flight(upload_id: &str) -> bool {
    in_flight().contains(upload_id)
}

/// Whether the S3 endpoint is reached over TLS: AWS's own (no override) or an `https://` one.
pub fn tls_endpoint(endpoint: Option<&str>) -> bool {
    endpoint.is_none_or(|e| e.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://")))
}

impl S3 {
    pub fn new(client: aws_sdk_s3::Client) -> Self {
        S3 { client, unsigned_parts: false }
    }

    /// With `on`, a part's bytes are not hashed a second time for SigV4: the SDK otherwise signs
    /// every part's SHA-256 (`x-amz-content-sha256`) on top of the CRC32 it sends and S3 checks
    /// (`x-amz-checksum-crc32`, which Object Lock buckets require). Over TLS the payload hash
    /// checks nothing the TLS records and the CRC32 do not, and it is the costliest pass over the
    /// stored bytes after caretaker's own; AWS's Java and Go SDKs make the same choice for S3 over
    /// HTTPS. Only over TLS ([`tls_endpoint`]): over plain HTTP the signature is what keeps a
    /// part from being altered on its way.
    pub fn with_unsigned_parts(mut self, on: bool) -> Self {
        self.unsigned_parts = on;
        self
    }

    fn err<E>(
        operation: &'static str,
        bucket: &str,
        key: &str,
    ) -> impl FnOnce(aws_sdk_s3::error::SdkError<E>) -> S3Error
    where
        E: std::error::Error + aws_sdk_s3::error::ProvideErrorMetadata + 'static,
    {
        let (bucket, key) = (bucket.to_string(), key.to_string());
        move |e| S3Error { operation, message: describe(&e), bucket, key }
    }

    pub async fn create_multipart(&self, bucket: &str, key: &str) -> Result<String, S3Error> {
        let out = self.client.create_multipart_upload().bucket(bucket).key(key).send().await.map_err(Self::err(
            "CreateMultipartUpload",
            bucket,
            key,
        ))?;
        if let Some(id) = out.upload_id() {
            in_flight().insert(id.to_string());
        }
        out.upload_id().map(str::to_string).ok_or_else(|| S3Error {
            operation: "CreateMultipartUpload",
            bucket: bucket.into(),
            key: key.into(),
            message: "no upload id in the answer".into(),
        })
    }

    /// Uploads part `number` (1-based); returns its ETag.
    pub async fn upload_part(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<String, S3Error> {
        let request = self
            .client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(data));
        let sent = if self.unsigned_parts {
            request.customize().disable_payload_signing().send().await
        } else {
            request.send().await
        };
        let out = sent.map_err(Self::err("UploadPart", bucket, key))?;
        Ok(out.e_tag().unwrap_or_default().to_string())
    }

    pub async fn complete_multipart(
        &self,
        bucket: &str,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), S3Error> {
        let parts = etags
            .iter()
            .enumerate()
            .map(|(i, e)| CompletedPart::builder().part_number(i as i32 + 1).e_tag(e).build())
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .send()
            .await
            .map_err(Self::err("CompleteMultipartUpload", bucket, key))?;
        in_flight().remove(upload_id);
        Ok(())
    }

    pub async fn abort_multipart(&self, bucket: &str, key: &str, upload_id: &str) -> Result<(), S3Error> {
        in_flight().remove(upload_id);
        self.client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(Self::err("AbortMultipartUpload", bucket, key))?;
        Ok(())
    }

    /// Multipart uploads in progress under `prefix`: (key, upload id).
    pub async fn list_multipart_uploads(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, String)>, S3Error> {
        let out =
            self.client.list_multipart_uploads().bucket(bucket).prefix(prefix).send().await.map_err(Self::err(
                "ListMultipartUploads",
                bucket,
                prefix,
            ))?;
        Ok(out.uploads().iter().filter_map(|u| Some((u.key()?.to_string(), u.upload_id()?.to_string()))).collect())
    }

    pub async fn put_object(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(Self::err("PutObject", bucket, key))?;
        Ok(())
    }

    /// Creates `key` with `body` and user `metadata` only if no object has that key
    /// (`If-None-Match: *`): an archived object is never overwritten. [`Put::Exists`] when one does.
    pub async fn put_new(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        metadata: &[(&str, String)],
    ) -> Result<Put, S3Error> {
        let mut req = self.client.put_object().bucket(bucket).key(key).if_none_match("*").body(ByteStream::from(body));
        for (k, v) in metadata {
            req = req.metadata(*k, v);
        }
        match req.send().await {
            Ok(_) => Ok(Put::Created),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => Ok(Put::Exists),
            Err(e) => Err(Self::err("PutObject", bucket, key)(e)),
        }
    }

    /// Replaces `key` with `body` only if it is still the version `etag` (`If-Match`): two
    /// writers racing for one object, exactly one wins. [`Put::Exists`] when it changed meanwhile
    /// (or is gone).
    pub async fn put_if_match(&self, bucket: &str, key: &str, body: Vec<u8>, etag: &str) -> Result<Put, S3Error> {
        let req = self.client.put_object().bucket(bucket).key(key).if_match(etag).body(ByteStream::from(body));
        match req.send().await {
            Ok(_) => Ok(Put::Created),
            Err(e) if e.raw_response().is_some_and(|r| matches!(r.status().as_u16(), 404 | 409 | 412)) => {
                Ok(Put::Exists)
            }
            Err(e) => Err(Self::err("PutObject", bucket, key)(e)),
        }
    }

    /// A bounded object and its ETag (None when there is no such object).
    pub async fn get_small_with_etag(
        &self,
        bucket: &str,
        key: &str,
        max: usize,
    ) -> Result<Option<(Vec<u8>, String)>, S3Error> {
        Ok(self.get_bounded(bucket, key, max).await?.map(|(data, _, etag)| (data, etag)))
    }

    /// At most `max` bytes of `key` (refused up front when S3 says it is larger, and as soon as
    /// the body passes it), with its user metadata and ETag.
    async fn get_bounded(
        &self,
        bucket: &str,
        key: &str,
        max: usize,
    ) -> Result<Option<(Vec<u8>, std::collections::HashMap<String, String>, String)>, S3Error> {
        let out = match self.client.get_object().bucket(bucket).key(key).send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(Self::err("GetObject", bucket, key)(e)),
        };
        let fail =
            |message: String| S3Error { operation: "GetObject", bucket: bucket.into(), key: key.into(), message };
        if out.content_length().is_some_and(|n| n < 0 || n as u64 > max as u64) {
            return Err(fail(format!("larger than {max} bytes: not read")));
        }
        let etag = out.e_tag().unwrap_or_default().to_string();
        let metadata = out.metadata.unwrap_or_default();
        let mut body = out.body;
        let mut data = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| fail(e.to_string()))?;
            if data.len() + chunk.len() > max {
                return Err(fail(format!("larger than {max} bytes: not read")));
            }
            data.extend_from_slice(&chunk);
        }
        Ok(Some((data, metadata, etag)))
    }

    /// The user metadata of `key` (None when there is no such object).
    pub async fn head_metadata(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<std::collections::HashMap<String, String>>, S3Error> {
        match self.client.head_object().bucket(bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.metadata.unwrap_or_default())),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(Self::err("HeadObject", bucket, key)(e)),
        }
    }

    /// A bounded object with its user metadata (see [`S3::get_small`]).
    pub async fn get_small_with_metadata(
        &self,
        bucket: &str,
        key: &str,
        max: usize,
    ) -> Result<Option<(Vec<u8>, std::collections::HashMap<String, String>)>, S3Error> {
        Ok(self.get_bounded(bucket, key, max).await?.map(|(data, metadata, _)| (data, metadata)))
    }

    /// The whole object in memory (manifests, tests); large objects are streamed with [`S3::get_stream`].
    pub async fn get_object(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, S3Error> {
        match self.get_stream(bucket, key).await? {
            None => Ok(None),
            Some(body) => {
                let data = body.collect().await.map_err(|e| S3Error {
                    operation: "GetObject",
                    bucket: bucket.into(),
                    key: key.into(),
                    message: e.to_string(),
                })?;
                Ok(Some(data.into_bytes().to_vec()))
            }
        }
    }

    /// A small object (a manifest, a report), refused when it is larger than `max` bytes: an object
    /// someone else put in the bucket cannot make caretaker hold an arbitrary amount of memory.
    pub async fn get_small(&self, bucket: &str, key: &str, max: usize) -> Result<Option<Vec<u8>>, S3Error> {
        Ok(self.get_small_with_metadata(bucket, key, max).await?.map(|(data, _)| data))
    }

    /// The object's body as a stream; `None` when there is no such key.
    pub async fn get_stream(&self, bucket: &str, key: &str) -> Result<Option<ByteStream>, S3Error> {
        match self.client.get_object().bucket(bucket).key(key).send().await {
            Ok(out) => Ok(Some(out.body)),
            Err(e) if e.as_service_error().is_some_and(|se| se.is_no_such_key()) => Ok(None),
            Err(e) => Err(Self::err("GetObject", bucket, key)(e)),
        }
    }

    /// Every key under `prefix` (all pages).
    pub async fn list_keys(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, S3Error> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(Self::err("ListObjectsV2", bucket, prefix))?;
            keys.extend(out.contents().iter().filter_map(|o| o.key().map(str::to_string)));
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(keys),
            }
        }
    }

    /// How the bucket keeps its history: versioning, and Object Lock's default retention.
    pub async fn history_protection(&self, bucket: &str) -> Result<HistoryProtection, S3Error> {
        let versioning = match self.client.get_bucket_versioning().bucket(bucket).send().await {
            Ok(v) => v.status().map(|s| s.as_str().to_string()).unwrap_or_else(|| "never enabled".into()),
            // A 200 the SDK's parser refused for its root element's name (moto answers
            // `GetBucketVersioningResponse`, S3 `VersioningConfiguration`): read the status itself.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 200) => {
                let body = e.raw_response().and_then(|r| r.body().bytes()).unwrap_or_default();
                let text = String::from_utf8_lossy(body);
                ["Enabled", "Suspended"]
                    .into_iter()
                    .find(|s| text.contains(&format!("<Status>{s}</Status>")))
                    .unwrap_or("never enabled")
                    .to_string()
            }
            Err(e) => return Err(Self::err("GetBucketVersioning", bucket, "")(e)),
        };
        let lock = match self.client.get_object_lock_configuration().bucket(bucket).send().await {
            Ok(out) => out.object_lock_configuration,
            // No configuration at all is an answer, not a failure.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => None,
            Err(e) => return Err(Self::err("GetObjectLockConfiguration", bucket, "")(e)),
        };
        let enabled = lock.as_ref().and_then(|l| l.object_lock_enabled()).is_some_and(|e| e.as_str() == "Enabled");
        let retention = lock.as_ref().and_then(|l| l.rule()).and_then(|r| r.default_retention());
        let days = retention.and_then(|r| r.days().map(|d| d as u32).or_else(|| r.years().map(|y| y as u32 * 365)));
        let mode = retention.and_then(|r| r.mode()).map(|m| m.as_str().to_string());
        Ok(HistoryProtection { versioning, lock_enabled: enabled, mode, days })
    }

    pub async fn delete_object(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        self.client.delete_object().bucket(bucket).key(key).send().await.map_err(Self::err(
            "DeleteObject",
            bucket,
            key,
        ))?;
        Ok(())
    }

    /// Lists at most one key under `prefix`: can we list there? Notes S3's `Date` in `date`.
    pub async fn probe_list(&self, bucket: &str, prefix: &str, date: &ServerDate) -> Result<(), S3Error> {
        self.client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .max_keys(1)
            .customize()
            .interceptor(date.clone())
            .send()
            .await
            .map(drop)
            .map_err(Self::err("ListObjectsV2", bucket, prefix))
    }

    /// ListBuckets, only for S3's `Date` (noted in `date`); its outcome does not matter.
    pub async fn probe_date(&self, date: &ServerDate) {
        let _ = self.client.list_buckets().customize().interceptor(date.clone()).send().await;
    }
}

/// The `Date` header of the last S3 answer seen through it, whatever its status (an AccessDenied
/// carries one too), and the local time it arrived at: S3's clock, to compare ours with.
#[derive(Debug, Clone, Default)]
pub struct ServerDate(std::sync::Arc<std::sync::Mutex<Option<(String, std::time::SystemTime)>>>);

impl ServerDate {
    pub fn get(&self) -> Option<(String, std::time::SystemTime)> {
        self.0.lock().ok().and_then(|d| d.clone())
    }
}

impl aws_sdk_s3::config::Intercept for ServerDate {
    fn name(&self) -> &'static str {
        "caretaker-server-date"
    }

    fn read_before_deserialization(
        &self,
        context: &aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_s3::config::RuntimeComponents,
        _cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        if let Some(date) = context.response().headers().get("date")
            && let Ok(mut cell) = self.0.lock()
        {
            *cell = Some((date.to_string(), std::time::SystemTime::now()));
        }
        Ok(())
    }
}

/// An HTTP date (`Date: Sun, 22 Nov 2026 03:00:00 GMT`) as seconds since the epoch.
pub fn http_date_secs(header: &str) -> Result<i64, String> {
    aws_sdk_s3::primitives::DateTime::from_str(header, aws_sdk_s3::primitives::DateTimeFormat::HttpDate)
        .map(|t| t.secs())
        .map_err(|e| e.to_string())
}

/// What [`S3::history_protection`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryProtection {
    /// `Enabled`, `Suspended` or `never enabled`.
    pub versioning: String,
    pub lock_enabled: bool,
    /// The default retention: `GOVERNANCE` or `COMPLIANCE`, and for how many days.
    pub mode: Option<String>,
    pub days: Option<u32>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_aws_itself_and_https_endpoints_count_as_tls() {
        use super::tls_endpoint;
        assert!(tls_endpoint(None));
        assert!(tls_endpoint(Some("https://s3.eu-west-1.amazonaws.com")));
        assert!(tls_endpoint(Some("HTTPS://vpce-1.s3.eu-west-1.vpce.amazonaws.com")));
        assert!(!tls_endpoint(Some("http://127.0.0.1:5000")));
        assert!(!tls_endpoint(Some("https")));
        assert!(!tls_endpoint(Some("")));
    }
}
