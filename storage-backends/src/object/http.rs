//! Signed S3 requests over HTTP: ranged GET into a lent buffer, PUT with checksum
//! metadata, HEAD, DELETE, LIST, and bucket creation; retries with backoff on 5xx
//! and transport failures, never on 4xx.

use std::io::Read;
use std::ops::Range;
use std::time::Duration;

use block_layout::Geometry;
use rusty_s3::actions::{ListObjectsV2, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use super::sys::LentBuffer;
use super::ObjectSettings;
use crate::StoreError;

const META_LAYERS: &str = "x-amz-meta-dp-layers";
const META_LAYER_BYTES: &str = "x-amz-meta-dp-layer-bytes";
const META_CRCS: &str = "x-amz-meta-dp-crcs";
/// How long a signed URL stays valid: just long enough for its request.
const SIGNATURE_LIFETIME: Duration = Duration::from_secs(300);
const BACKOFF_FIRST: Duration = Duration::from_millis(50);

/// What a ranged GET found in the object's metadata.
#[derive(Debug)]
pub struct GetOutcome {
    pub layers: u16,
    pub layer_bytes: u64,
    pub layer_crcs: Vec<u32>,
}

#[derive(Debug)]
pub enum ObjectError {
    NotFound,
    NoSuchBucket,
    AccessDenied(String),
    Status { code: u16, message: String },
    Unavailable(String),
    Truncated { expected: u64, got: u64 },
    BadMetadata(String),
}

impl ObjectError {
    fn is_retryable(&self) -> bool {
        matches!(self, ObjectError::Unavailable(_))
            || matches!(self, ObjectError::Status { code, .. } if *code >= 500)
    }

    pub fn into_store_error(self, object: &str) -> StoreError {
        let object = object.to_owned();
        let (kind, cause) = match self {
            ObjectError::NotFound => ("not_found", "no such object".to_owned()),
            ObjectError::NoSuchBucket => (
                "no_such_bucket",
                "the bucket does not exist; create it or fix storage.object.bucket".to_owned(),
            ),
            ObjectError::AccessDenied(message) => (
                "access_denied",
                format!("access denied ({message}); check the credentials"),
            ),
            ObjectError::Status { code, message } => {
                ("http_status", format!("HTTP {code}: {message}"))
            }
            ObjectError::Unavailable(cause) => (
                "unavailable",
                format!("the object store did not answer: {cause}"),
            ),
            ObjectError::Truncated { expected, got } => (
                "truncated",
                format!("the body ended after {got} of {expected} bytes"),
            ),
            ObjectError::BadMetadata(problem) => {
                ("bad_metadata", format!("not a dualpath block: {problem}"))
            }
        };
        StoreError::Remote {
            object,
            kind,
            cause,
        }
    }
}

/// A signing HTTP client for one bucket. `Send + Sync`: shared by the workers.
#[derive(Debug)]
pub struct ObjectClient {
    bucket: Bucket,
    credentials: Credentials,
    agent: ureq::Agent,
    retries: u32,
    prefix: String,
}

impl ObjectClient {
    pub fn new(settings: &ObjectSettings) -> Result<Self, StoreError> {
        let layout_error = |problem: String| StoreError::Layout {
            path: settings.endpoint.clone().into(),
            problem,
            fix: "fix storage.object.endpoint and bucket".into(),
        };
        let endpoint = settings
            .endpoint
            .parse()
            .map_err(|error| layout_error(format!("bad endpoint URL: {error}")))?;
        let style = if settings.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(
            endpoint,
            style,
            settings.bucket.clone(),
            settings.region.clone(),
        )
        .map_err(|error| layout_error(format!("bad bucket: {error}")))?;
        let agent = ureq::AgentBuilder::new()
            .timeout(settings.timeout)
            .max_idle_connections_per_host(settings.concurrency as usize * 2)
            .build();
        Ok(Self {
            bucket,
            credentials: Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
            ),
            agent,
            retries: settings.retries,
            prefix: settings.prefix.clone(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Runs `attempt` until it succeeds, fails with a client error, or the retries
    /// are spent; backs off exponentially between tries.
    fn with_retries<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, ObjectError>,
    ) -> Result<T, ObjectError> {
        let mut backoff = BACKOFF_FIRST;
        let mut tries = 0;
        loop {
            match attempt() {
                Err(error) if error.is_retryable() && tries < self.retries => {
                    tries += 1;
                    std::thread::sleep(backoff);
                    backoff *= 2;
                }
                other => return other,
            }
        }
    }

    /// GETs bytes `range` of `object` straight into a lent staging buffer.
    pub(crate) fn get_range(
        &self,
        object: &str,
        range: Range<u64>,
        mut target: LentBuffer,
    ) -> Result<GetOutcome, ObjectError> {
        self.get_range_into(object, range, target.as_mut_slice())
    }

    /// GETs bytes `range` of `object` straight into `body` (exactly as long).
    pub fn get_range_into(
        &self,
        object: &str,
        range: Range<u64>,
        body: &mut [u8],
    ) -> Result<GetOutcome, ObjectError> {
        assert_eq!(
            body.len() as u64,
            range.end - range.start,
            "the target is as long as the range"
        );
        self.with_retries(|| {
            let url = self
                .bucket
                .get_object(Some(&self.credentials), object)
                .sign(SIGNATURE_LIFETIME);
            let response = self
                .agent
                .get(url.as_str())
                .set("Range", &format!("bytes={}-{}", range.start, range.end - 1))
                .call()
                .map_err(classify)?;
            let outcome = parse_metadata(&response)?;
            let expected = range.end - range.start;
            let mut reader = response.into_reader();
            let mut received = 0;
            while received < body.len() {
                match reader.read(&mut body[received..]) {
                    Ok(0) => {
                        return Err(ObjectError::Truncated {
                            expected,
                            got: received as u64,
                        })
                    }
                    Ok(count) => received += count,
                    Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(error) => {
                        return Err(ObjectError::Unavailable(format!(
                            "reading the body: {error}"
                        )))
                    }
                }
            }
            Ok(outcome)
        })
    }

    /// PUTs a whole block with its geometry and per-layer checksums as metadata.
    pub fn put_block(
        &self,
        object: &str,
        geometry: &Geometry,
        bytes: &[u8],
    ) -> Result<(), ObjectError> {
        let crcs: Vec<String> = bytes
            .chunks_exact(geometry.layer_bytes() as usize)
            .map(|layer| format!("{:08x}", crc32c::crc32c(layer)))
            .collect();
        let metadata = [
            (META_LAYERS, geometry.layers.to_string()),
            (META_LAYER_BYTES, geometry.layer_bytes().to_string()),
            (META_CRCS, crcs.join("")),
        ];
        self.with_retries(|| {
            let mut action = self.bucket.put_object(Some(&self.credentials), object);
            for (name, value) in &metadata {
                action.headers_mut().insert(*name, value.clone());
            }
            let url = action.sign(SIGNATURE_LIFETIME);
            let mut request = self.agent.put(url.as_str());
            for (name, value) in &metadata {
                request = request.set(name, value);
            }
            request.send_bytes(bytes).map_err(classify)?;
            Ok(())
        })
    }

    /// Whether `object` exists (HEAD).
    pub fn exists(&self, object: &str) -> Result<bool, ObjectError> {
        let result = self.with_retries(|| {
            let url = self
                .bucket
                .head_object(Some(&self.credentials), object)
                .sign(SIGNATURE_LIFETIME);
            self.agent.head(url.as_str()).call().map_err(classify)
        });
        match result {
            Ok(_) => Ok(true),
            Err(ObjectError::NotFound) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Deletes `object`; false if it did not exist.
    pub fn delete(&self, object: &str) -> Result<bool, ObjectError> {
        if !self.exists(object)? {
            return Ok(false);
        }
        self.with_retries(|| {
            let url = self
                .bucket
                .delete_object(Some(&self.credentials), object)
                .sign(SIGNATURE_LIFETIME);
            self.agent.delete(url.as_str()).call().map_err(classify)
        })?;
        Ok(true)
    }

    /// Every object name under `prefix`.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, ObjectError> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self.with_retries(|| {
                let mut action = ListObjectsV2::new(&self.bucket, Some(&self.credentials));
                action.with_prefix(prefix);
                if let Some(token) = &token {
                    action.with_continuation_token(token.clone());
                }
                let url = action.sign(SIGNATURE_LIFETIME);
                let body = self
                    .agent
                    .get(url.as_str())
                    .call()
                    .map_err(classify)?
                    .into_string();
                let body = body.map_err(|error| ObjectError::Unavailable(error.to_string()))?;
                ListObjectsV2::parse_response(&body)
                    .map_err(|error| ObjectError::BadMetadata(format!("LIST response: {error}")))
            })?;
            names.extend(page.contents.into_iter().map(|content| content.key));
            match page.next_continuation_token {
                Some(next) => token = Some(next),
                None => return Ok(names),
            }
        }
    }

    /// Creates the bucket (for set-up and tests); an existing bucket is fine.
    pub fn create_bucket(&self) -> Result<(), ObjectError> {
        let url = self
            .bucket
            .create_bucket(&self.credentials)
            .sign(SIGNATURE_LIFETIME);
        match self.agent.put(url.as_str()).call() {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(409, _)) => Ok(()),
            Err(error) => Err(classify(error)),
        }
    }
}

fn parse_metadata(response: &ureq::Response) -> Result<GetOutcome, ObjectError> {
    let field = |name: &str| {
        response
            .header(name)
            .ok_or_else(|| ObjectError::BadMetadata(format!("no {name} metadata")))
    };
    let layers: u16 = field(META_LAYERS)?
        .parse()
        .map_err(|_| ObjectError::BadMetadata("bad layer count".into()))?;
    let layer_bytes: u64 = field(META_LAYER_BYTES)?
        .parse()
        .map_err(|_| ObjectError::BadMetadata("bad layer size".into()))?;
    let text = field(META_CRCS)?;
    if text.len() != usize::from(layers) * 8 || !text.is_ascii() {
        return Err(ObjectError::BadMetadata(
            "checksum list does not match the layer count".into(),
        ));
    }
    let layer_crcs = (0..text.len())
        .step_by(8)
        .map(|at| u32::from_str_radix(&text[at..at + 8], 16))
        .collect::<Result<_, _>>()
        .map_err(|_| ObjectError::BadMetadata("checksums are not hexadecimal".into()))?;
    Ok(GetOutcome {
        layers,
        layer_bytes,
        layer_crcs,
    })
}

fn classify(error: ureq::Error) -> ObjectError {
    match error {
        ureq::Error::Status(code, response) => {
            let body = response.into_string().unwrap_or_default();
            let s3_code = body
                .split("<Code>")
                .nth(1)
                .and_then(|rest| rest.split("</Code>").next())
                .unwrap_or("")
                .to_owned();
            match (code, s3_code.as_str()) {
                (404, "NoSuchBucket") => ObjectError::NoSuchBucket,
                (404, _) => ObjectError::NotFound,
                (403, _) => ObjectError::AccessDenied(if s3_code.is_empty() {
                    "HTTP 403".into()
                } else {
                    s3_code
                }),
                (code, _) => ObjectError::Status {
                    code,
                    message: if s3_code.is_empty() {
                        body.chars().take(200).collect()
                    } else {
                        s3_code
                    },
                },
            }
        }
        ureq::Error::Transport(transport) => ObjectError::Unavailable(describe(&transport)),
    }
}

/// A transport error without its URL's query. ureq's own text leads with the
/// whole URL, and ours are presigned: the query is a credential, valid for
/// `SIGNATURE_LIFETIME`, that must not reach logs and error messages.
fn describe(error: &ureq::Transport) -> String {
    let mut text = match error.url() {
        Some(url) => format!("{}{}: ", url.origin().ascii_serialization(), url.path()),
        None => String::new(),
    };
    text.push_str(&error.kind().to_string());
    if let Some(message) = error.message() {
        text.push_str(": ");
        text.push_str(message);
    }
    if let Some(source) = std::error::Error::source(error) {
        text.push_str(": ");
        text.push_str(&source.to_string());
    }
    text
}
