//! `--context s3://bucket/key`: one GetObject through the same AWS configuration as ECR
//! (`registry::ecr::sdk_config`: default credential chain, bounded IMDS,
//! `AWS_ENDPOINT_URL`, `--aws-role-arn`), its body streamed into the unpacker through a small
//! bounded channel: the object is never held in memory or written to disk as a whole.
//!
//! The region is `AWS_REGION` / `AWS_DEFAULT_REGION`, else the profile's, else us-east-1;
//! when S3 answers that the bucket lives elsewhere (`x-amz-bucket-region`), the request is
//! made once more in that region. With a custom endpoint (`AWS_ENDPOINT_URL[_S3]`: MinIO,
//! moto, LocalStack) requests use path-style addressing, which those servers expect.

use super::ContextError;
use crate::exit::ExitCode;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectError;
use bytes::{Buf, Bytes};
use std::io::{self, Read};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Chunks in flight between the download and the unpacker (each up to a few hundred KiB).
const CHANNEL_CHUNKS: usize = 16;
/// A body that sends nothing for this long has stalled.
const STALL: Duration = Duration::from_secs(60);

/// Fetch `s3://bucket/key` and hand its body to `read` as it arrives. `role_arn` is
/// `--aws-role-arn`. A network failure while `read` consumes the body is reported as an S3
/// error (exit 5), not as a broken archive.
pub fn with_object<T>(
    bucket: &str,
    key: &str,
    role_arn: Option<&str>,
    read: impl FnOnce(Box<dyn Read + Send>) -> Result<T, ContextError>,
) -> Result<T, ContextError> {
    let name = format!("s3://{bucket}/{key}");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| ContextError::Io {
            source_name: name.clone(),
            context: "starting the async runtime".into(),
            error: e,
        })?;
    let body = runtime.block_on(get_object(bucket, key, role_arn, &name))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let failed = Arc::clone(&failure);
    runtime.spawn(async move {
        let mut body = body;
        loop {
            let next: Result<Option<Bytes>, String> =
                match tokio::time::timeout(STALL, body.next()).await {
                    Ok(None) => Ok(None),
                    Ok(Some(Ok(c))) => Ok(Some(c)),
                    Ok(Some(Err(e))) => Err(DisplayErrorContext(e).to_string()),
                    Err(_) => Err(format!("nothing received for {} s", STALL.as_secs())),
                };
            let chunk = match next {
                Ok(None) => return,
                Ok(Some(c)) => Ok(c),
                Err(reason) => {
                    *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason.clone());
                    Err(io::Error::other(reason))
                }
            };
            let stop = chunk.is_err();
            // The unpacker stopped early (a refused entry): nothing more to send.
            if tx.send(chunk).await.is_err() || stop {
                return;
            }
        }
    });
    let result = read(Box::new(ChannelReader {
        rx,
        current: Bytes::new(),
    }));
    // The download task ends with the runtime, whatever the unpacker did.
    drop(runtime);
    let failure = failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    match (result, failure) {
        (Err(_), Some(reason)) => Err(ContextError::S3 {
            source_name: name,
            reason: format!("the download failed: {reason}; try again"),
            exit: ExitCode::Registry,
        }),
        (result, _) => result,
    }
}

/// `std::io::Read` over the chunks the download task sends.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while !self.current.has_remaining() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        self.current.copy_to_slice(&mut buf[..n]);
        Ok(n)
    }
}

/// The region to ask first: the environment, then the shared config profile, else us-east-1.
async fn first_region() -> Region {
    for var in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        if let Ok(r) = std::env::var(var)
            && !r.trim().is_empty()
        {
            return Region::new(r.trim().to_string());
        }
    }
    use aws_config::meta::region::ProvideRegion as _;
    aws_config::profile::ProfileFileRegionProvider::new()
        .region()
        .await
        .unwrap_or_else(|| Region::new("us-east-1"))
}

fn custom_endpoint(sdk: &aws_config::SdkConfig) -> bool {
    sdk.endpoint_url().is_some()
        || std::env::var("AWS_ENDPOINT_URL_S3").is_ok_and(|v| !v.trim().is_empty())
}

async fn get_object(
    bucket: &str,
    key: &str,
    role_arn: Option<&str>,
    name: &str,
) -> Result<aws_sdk_s3::primitives::ByteStream, ContextError> {
    let mut region = first_region().await;
    let mut redirected = false;
    loop {
        let sdk = crate::registry::aws_sdk_config(region.clone(), role_arn).await;
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(custom_endpoint(&sdk))
            .build();
        let client = aws_sdk_s3::Client::from_conf(conf);
        match client.get_object().bucket(bucket).key(key).send().await {
            Ok(out) => return Ok(out.body),
            Err(e) => {
                // S3 names the bucket's region in a header when we asked the wrong one.
                let elsewhere = e
                    .raw_response()
                    .and_then(|r| r.headers().get("x-amz-bucket-region"))
                    .map(str::to_string)
                    .filter(|r| r.as_str() != region.as_ref());
                match elsewhere {
                    Some(r) if !redirected => {
                        region = Region::new(r);
                        redirected = true;
                    }
                    _ => return Err(classify(name, &region, &e)),
                }
            }
        }
    }
}

/// Error codes with which AWS says "not you" rather than "not now".
const AUTH_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
];

fn classify(name: &str, region: &Region, e: &SdkError<GetObjectError>) -> ContextError {
    use aws_credential_types::provider::error::CredentialsError;
    let one_line = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if let Some(c) = err.downcast_ref::<CredentialsError>() {
            return ContextError::S3 {
                source_name: name.into(),
                reason: format!(
                    "no usable AWS credentials ({}); provide them as for ECR (README \"Credentials\": environment, profile, web identity/IRSA, container or instance role)",
                    one_line(DisplayErrorContext(c).to_string())
                ),
                exit: ExitCode::Auth,
            };
        }
        next = err.source();
    }
    let detail = one_line(DisplayErrorContext(e).to_string());
    match e {
        SdkError::ServiceError(s) if s.err().is_no_such_key() => ContextError::S3 {
            source_name: name.into(),
            reason:
                "no such object; upload the context tarball first (aws s3 cp ctx.tar.gz s3://...)"
                    .into(),
            exit: ExitCode::Input,
        },
        SdkError::ServiceError(s) if s.err().code() == Some("NoSuchBucket") => ContextError::S3 {
            source_name: name.into(),
            reason: "no such bucket; check the bucket name".into(),
            exit: ExitCode::Input,
        },
        SdkError::ServiceError(s) if s.err().code().is_some_and(|c| AUTH_CODES.contains(&c)) => {
            ContextError::S3 {
                source_name: name.into(),
                reason: format!(
                    "S3 refused GetObject ({detail}); the AWS identity needs s3:GetObject on this key"
                ),
                exit: ExitCode::Auth,
            }
        }
        _ => ContextError::S3 {
            source_name: name.into(),
            reason: format!("GetObject failed in region {region}: {detail}"),
            exit: ExitCode::Registry,
        },
    }
}
