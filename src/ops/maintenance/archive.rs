//! Secondary storage (through `object_store`: a directory, S3-compatible storage or
//! HTTP/WebDAV) and the archive of one file: streamed through zstd to the store,
//! then read back and checked (the decompressed bytes' SHA-256 and length against
//! what was read from the file) before anything on the host is removed.
//!
//! One archive runs on a blocking thread (file reads, compression and hashing are
//! CPU and disk work); it drives the store's async calls with the runtime's handle.
//!
//! Memory is bounded whatever the file: the file is read 256 KiB at a time and
//! compressed output leaves in chunks of about 1 MiB. A directory or S3 takes them
//! through `object_store`'s buffered writer, in parts of 8 MiB, at most two in
//! flight; HTTP/WebDAV has no multipart, so the chunks stream as one chunked PUT
//! body through a queue of [`HTTP_QUEUE`] chunks. Before the source is touched, a
//! `file://` archive and every directory entry leading to it are fsynced: a crash
//! after the punch or unlink cannot lose the only copy to the page cache.

use std::io::{Read as _, Seek as _, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt as _, RetryConfig};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::runtime::Handle;

use crate::config::maintenance::{MaintenanceConfig, TargetKind, target_kind};

use super::files::{Candidate, FileError, Fingerprint, Fingerprinting, Shape, data_start};

/// Compressed chunks (about 1 MiB each) queued for an HTTP PUT body at most: with
/// the one being compressed, an HTTP archive holds about 5 MiB however big the file.
pub const HTTP_QUEUE: usize = 4;

/// Where archives go, and how they are written there.
#[derive(Clone)]
pub struct Target {
    pub store: Arc<dyn ObjectStore>,
    /// How an archive is written: through the store, or streamed (HTTP).
    write: Write_,
    pub url: String,
}

/// The write side of a target.
#[derive(Clone)]
enum Write_ {
    /// `object_store`'s `BufWriter`, with parts of this size (a multipart upload
    /// past the first); `root`: the directory of a `file://` target, fsynced.
    Store {
        part_bytes: usize,
        root: Option<PathBuf>,
    },
    /// One streamed PUT (after MKCOL of the parent collections).
    Http(HttpPut),
}

#[derive(Clone)]
struct HttpPut {
    client: reqwest::Client,
    base: reqwest::Url,
    authorization: Option<http::HeaderValue>,
}

/// Parts of a multipart upload (S3's must be 5 MiB or more, but the last).
const PART: usize = 8 << 20;

/// Why a target could not be built (a bad URL, a missing directory).
#[derive(Debug, thiserror::Error)]
#[error("maintenance.target_url `{url}`: {message}")]
pub struct TargetError {
    url: String,
    message: String,
}

impl Target {
    pub fn new(config: &MaintenanceConfig) -> Result<Self, TargetError> {
        let url = config.target_url.clone().unwrap_or_default();
        let fail = |message: String| TargetError {
            url: url.clone(),
            message,
        };
        // A failing target fails a round soon, not after the library's three minutes:
        // the next round retries (with the file's own backoff).
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: Duration::from_secs(30),
        };
        let options = || {
            ClientOptions::new()
                .with_timeout(Duration::from_secs(60))
                .with_connect_timeout(Duration::from_secs(5))
        };
        let kind = target_kind(&url).map_err(&fail)?;
        let (store, write): (Arc<dyn ObjectStore>, Write_) = match kind {
            TargetKind::File => {
                let dir = url.trim_start_matches("file://");
                let local =
                    LocalFileSystem::new_with_prefix(dir).map_err(|e| fail(e.to_string()))?;
                let root = Some(PathBuf::from(dir));
                (
                    Arc::new(local),
                    Write_::Store {
                        part_bytes: PART,
                        root,
                    },
                )
            }
            TargetKind::S3 => {
                let rest = url.trim_start_matches("s3://");
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let s3 = &config.s3;
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_client_options(options().with_allow_http(s3.allow_http))
                    .with_allow_http(s3.allow_http);
                if let Some(endpoint) = &s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &s3.region {
                    builder = builder.with_region(region);
                }
                if let Some(name) = &s3.access_key_id_env {
                    builder = builder.with_access_key_id(std::env::var(name).unwrap_or_default());
                }
                if let Some(name) = &s3.secret_access_key_env {
                    builder =
                        builder.with_secret_access_key(std::env::var(name).unwrap_or_default());
                }
                let store = builder.build().map_err(|e| fail(e.to_string()))?;
                let prefix = prefix.trim_matches('/');
                let write = Write_::Store {
                    part_bytes: PART,
                    root: None,
                };
                if prefix.is_empty() {
                    (Arc::new(store), write)
                } else {
                    (Arc::new(PrefixStore::new(store, prefix)), write)
                }
            }
            TargetKind::Http => {
                let mut options = options().with_allow_http(true);
                let mut authorization = None;
                if let Some(user) = &config.webdav.username {
                    let password = config
                        .webdav
                        .password_env
                        .as_ref()
                        .and_then(|name| std::env::var(name).ok())
                        .unwrap_or_default();
                    let token = base64::engine::general_purpose::STANDARD
                        .encode(format!("{user}:{password}"));
                    let mut headers = http::HeaderMap::new();
                    let mut value = http::HeaderValue::try_from(format!("Basic {token}"))
                        .map_err(|e| fail(e.to_string()))?;
                    value.set_sensitive(true);
                    authorization = Some(value.clone());
                    headers.insert(http::header::AUTHORIZATION, value);
                    options = options.with_default_headers(headers);
                }
                let store = HttpBuilder::new()
                    .with_url(url.clone())
                    .with_retry(retry)
                    .with_client_options(options)
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
                let put = HttpPut {
                    client: reqwest::Client::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .read_timeout(Duration::from_secs(60))
                        .build()
                        .map_err(|e| fail(e.to_string()))?,
                    base: reqwest::Url::parse(&url).map_err(|e| fail(e.to_string()))?,
                    authorization,
                };
                (Arc::new(store), Write_::Http(put))
            }
        };
        Ok(Self { store, write, url })
    }
}

/// The stage an archive failed at (the `stage` label of
/// `canarygate_maintenance_failures_total`), and why.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("reading the file: {0}")]
    Read(String),
    #[error("uploading: {0}")]
    Upload(String),
    #[error("verifying the stored copy: {0}")]
    Verify(String),
}

impl ArchiveError {
    pub fn stage(&self) -> &'static str {
        match self {
            Self::Read(_) => "read",
            Self::Upload(_) => "upload",
            Self::Verify(_) => "verify",
        }
    }
}

impl From<FileError> for ArchiveError {
    fn from(e: FileError) -> Self {
        Self::Read(e.to_string())
    }
}

/// A verified archive: which bytes of the file it holds, and where.
#[derive(Debug, Clone)]
pub struct Archived {
    pub object: String,
    /// The file's bytes `[start, end)` are in the archive.
    pub start: u64,
    pub end: u64,
    pub stored_bytes: u64,
    pub sha256: String,
    /// Samples of `[start, end)` as read: checked again before punching.
    pub fingerprint: Fingerprint,
    /// The file as it was when read.
    pub shape: Shape,
}

/// The object name: `<host>/<path inside the dir>.<UTC timestamp>.zst`.
pub fn object_name(host: &str, inside: &std::path::Path, at: SystemTime) -> ObjectPath {
    let stamp: String = humantime::format_rfc3339_millis(at)
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    let mut parts: Vec<String> = vec![host.to_owned()];
    parts.extend(inside.iter().map(|p| p.to_string_lossy().into_owned()));
    if let Some(last) = parts.last_mut() {
        *last = format!("{last}.{stamp}.zst");
    }
    ObjectPath::from_iter(parts)
}

/// Archives `file`, from where its data starts up to `end_of(size, block)`:
/// the whole file when it is closed, whole blocks only when it is live (so the
/// prefix can then be freed in place). `Ok(None)`: nothing new to archive.
pub fn archive(
    handle: &Handle,
    target: &Target,
    candidate: &Candidate,
    live: bool,
    object: &ObjectPath,
    level: i32,
) -> Result<Option<Archived>, ArchiveError> {
    let (mut file, shape) = candidate.open_read()?;
    let start = data_start(&file, shape.size)?;
    let end = if live {
        shape.size / shape.block * shape.block
    } else {
        shape.size
    };
    if end <= start {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(start))
        .map_err(|e| ArchiveError::Read(e.to_string()))?;
    let mut sink = Sink::open(handle, target, object);
    let mut encoder = zstd::stream::write::Encoder::new(Vec::with_capacity(1 << 20), level)
        .map_err(|e| ArchiveError::Read(e.to_string()))?;
    let mut hasher = Sha256::new();
    let mut fingerprint = Fingerprinting::new(start, end);
    let mut remaining = end - start;
    let mut offset = start;
    let mut buf = vec![0u8; 256 << 10];
    let mut stored = 0u64;
    let streamed = (|| {
        while remaining > 0 {
            let want = usize::try_from(remaining.min(buf.len() as u64)).unwrap_or(buf.len());
            let n = file
                .read(&mut buf[..want])
                .map_err(|e| ArchiveError::Read(e.to_string()))?;
            if n == 0 {
                return Err(ArchiveError::Read(format!(
                    "the file ended {remaining} bytes early (truncated while read)"
                )));
            }
            hasher.update(&buf[..n]);
            fingerprint.feed(offset, &buf[..n]);
            encoder
                .write_all(&buf[..n])
                .map_err(|e| ArchiveError::Read(e.to_string()))?;
            remaining -= n as u64;
            offset += n as u64;
            if encoder.get_ref().len() >= 1 << 20 {
                let out = std::mem::take(encoder.get_mut());
                stored += out.len() as u64;
                sink.send(handle, out)?;
            }
        }
        let out = encoder
            .finish()
            .map_err(|e| ArchiveError::Read(e.to_string()))?;
        stored += out.len() as u64;
        sink.send(handle, out)
    })();
    if let Err(e) = streamed {
        // Parts already sent are discarded (a multipart upload is aborted, a PUT
        // body cut short).
        sink.abort(handle);
        let _ = handle.block_on(target.store.delete(object));
        return Err(e);
    }
    // The upload completes (or fails) here; a failed one leaves nothing to abort.
    sink.finish(handle)?;
    let sha256 = hex(&hasher.finalize());
    let length = end - start;
    if let Err(e) = verify(handle, target, object, &sha256, length) {
        // A copy that does not verify is no copy: remove it (best effort).
        let _ = handle.block_on(target.store.delete(object));
        return Err(e);
    }
    if let Write_::Store {
        root: Some(root), ..
    } = &target.write
    {
        sync_local(root, object).map_err(|e| ArchiveError::Upload(format!("fsync: {e}")))?;
    }
    Ok(Some(Archived {
        object: object.to_string(),
        start,
        end,
        stored_bytes: stored,
        sha256,
        fingerprint: fingerprint.finish(),
        shape,
    }))
}

/// Makes a `file://` archive durable before the source is touched: the file, then
/// each directory from its own up to the target's root (their entries: a new
/// subdirectory is itself an entry of its parent).
fn sync_local(root: &std::path::Path, object: &ObjectPath) -> std::io::Result<()> {
    let mut path = root.to_path_buf();
    let parts: Vec<String> = object.parts().map(|p| p.as_ref().to_owned()).collect();
    for part in &parts {
        path.push(part);
    }
    std::fs::File::open(&path)?.sync_all()?;
    while path.pop() && path.starts_with(root) {
        std::fs::File::open(&path)?.sync_all()?;
        if path == root {
            break;
        }
    }
    Ok(())
}

/// Where an archive's compressed chunks go as they are made.
enum Sink {
    Store(Box<BufWriter>),
    Http {
        chunks: Option<tokio::sync::mpsc::Sender<std::io::Result<Bytes>>>,
        /// The PUT; taken once awaited.
        put: Option<tokio::task::JoinHandle<Result<(), String>>>,
    },
}

impl Sink {
    fn open(handle: &Handle, target: &Target, object: &ObjectPath) -> Self {
        match &target.write {
            Write_::Store { part_bytes, .. } => Self::Store(Box::new(
                BufWriter::with_capacity(Arc::clone(&target.store), object.clone(), *part_bytes)
                    .with_max_concurrency(2),
            )),
            Write_::Http(put) => {
                let (tx, rx) = tokio::sync::mpsc::channel(HTTP_QUEUE);
                let put = handle.spawn(put.clone().put(object.clone(), rx));
                Self::Http {
                    chunks: Some(tx),
                    put: Some(put),
                }
            }
        }
    }

    fn send(&mut self, handle: &Handle, bytes: Vec<u8>) -> Result<(), ArchiveError> {
        match self {
            Self::Store(writer) => handle
                .block_on(writer.write_all(&bytes))
                .map_err(|e| ArchiveError::Upload(e.to_string())),
            Self::Http { chunks, put } => {
                let sent = chunks
                    .as_ref()
                    .is_some_and(|tx| tx.blocking_send(Ok(Bytes::from(bytes))).is_ok());
                if sent {
                    return Ok(());
                }
                // The request ended early: its own error says why.
                chunks.take();
                Err(ArchiveError::Upload(
                    ended(handle, put.take())
                        .err()
                        .unwrap_or_else(|| "the PUT ended before its body".to_owned()),
                ))
            }
        }
    }

    fn abort(self, handle: &Handle) {
        match self {
            Self::Store(mut writer) => {
                let _ = handle.block_on(writer.abort());
            }
            Self::Http { chunks, put } => {
                if let Some(tx) = chunks {
                    let _ = tx.blocking_send(Err(std::io::Error::other("archive aborted")));
                }
                let _ = ended(handle, put);
            }
        }
    }

    fn finish(self, handle: &Handle) -> Result<(), ArchiveError> {
        match self {
            Self::Store(mut writer) => handle
                .block_on(writer.shutdown())
                .map_err(|e| ArchiveError::Upload(e.to_string())),
            Self::Http { chunks, put } => {
                drop(chunks);
                ended(handle, put).map_err(ArchiveError::Upload)
            }
        }
    }
}

/// How the PUT ended (`Err` also when it was already awaited: it failed then).
fn ended(
    handle: &Handle,
    put: Option<tokio::task::JoinHandle<Result<(), String>>>,
) -> Result<(), String> {
    let put = put.ok_or_else(|| "the PUT failed".to_owned())?;
    handle
        .block_on(put)
        .map_err(|e| e.to_string())
        .and_then(|done| done)
}

impl HttpPut {
    fn url(&self, parts: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.extend(parts);
        }
        url
    }

    fn request(&self, method: reqwest::Method, url: reqwest::Url) -> reqwest::RequestBuilder {
        let request = self.client.request(method, url);
        match &self.authorization {
            Some(value) => request.header(http::header::AUTHORIZATION, value.clone()),
            None => request,
        }
    }

    /// MKCOL of each parent collection (201 made, 405 there already; any other
    /// answer is left to the PUT to report), then the PUT with a streamed body.
    async fn put(
        self,
        object: ObjectPath,
        chunks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    ) -> Result<(), String> {
        let parts: Vec<String> = object.parts().map(|p| p.as_ref().to_owned()).collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let mkcol = reqwest::Method::from_bytes(b"MKCOL").map_err(|e| e.to_string())?;
        for depth in 1..parts.len() {
            let _ = self
                .request(mkcol.clone(), self.url(&parts[..depth]))
                .send()
                .await;
        }
        let body = futures_util::stream::unfold(chunks, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let url = self.url(&parts);
        let response = self
            .request(reqwest::Method::PUT, url.clone())
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| format!("PUT {}: {e}", redact(&url)))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("PUT {}: {}", redact(&url), response.status()))
        }
    }
}

/// A URL without userinfo or query (they may carry a secret).
fn redact(url: &reqwest::Url) -> String {
    let mut url = url.clone();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.to_string()
}

/// Reads `object` back, decompresses it and checks its SHA-256 and length.
pub fn verify(
    handle: &Handle,
    target: &Target,
    object: &ObjectPath,
    sha256: &str,
    length: u64,
) -> Result<(), ArchiveError> {
    let fail = |e: &dyn std::fmt::Display| ArchiveError::Verify(e.to_string());
    let mut decoder =
        zstd::stream::write::Decoder::new(Digesting::default()).map_err(|e| fail(&e))?;
    handle.block_on(async {
        let mut stream = target
            .store
            .get(object)
            .await
            .map_err(|e| fail(&e))?
            .into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk: Bytes = chunk.map_err(|e| fail(&e))?;
            decoder.write_all(&chunk).map_err(|e| fail(&e))?;
        }
        Ok::<_, ArchiveError>(())
    })?;
    decoder.flush().map_err(|e| fail(&e))?;
    let read = decoder.into_inner();
    let got = hex(&read.hasher.finalize());
    if read.length != length || got != sha256 {
        return Err(ArchiveError::Verify(format!(
            "the stored copy decompresses to {} bytes with SHA-256 {got}; the file gave {length} \
             bytes with SHA-256 {sha256}",
            read.length
        )));
    }
    Ok(())
}

/// A sink that hashes and counts what is written to it.
#[derive(Default)]
struct Digesting {
    hasher: Sha256,
    length: u64,
}

impl Write for Digesting {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.length += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_copy_that_differs_fails_verification() {
        let dir = std::env::temp_dir().join(format!("canarygate-verify-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let config = MaintenanceConfig {
            target_url: Some(format!("file://{}", dir.display())),
            ..MaintenanceConfig::default()
        };
        let target = Target::new(&config).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let handle = runtime.handle();
        let object = ObjectPath::from("h/x.log.zst");
        let original = b"line 1\nline 2\n";
        let compressed = zstd::encode_all(&original[..], 3).unwrap();
        handle
            .block_on(target.store.put(&object, compressed.into()))
            .unwrap();
        let sha = hex(&Sha256::digest(original));
        assert!(verify(handle, &target, &object, &sha, original.len() as u64).is_ok());
        let wrong = verify(handle, &target, &object, &sha, 13).unwrap_err();
        assert_eq!(wrong.stage(), "verify");
        assert!(
            wrong.to_string().contains("decompresses to 14 bytes"),
            "{wrong}"
        );
        let other = hex(&Sha256::digest(b"line 1\nline 3\n"));
        assert!(verify(handle, &target, &object, &other, 14).is_err());
        // Not there at all: a verify failure too, never a success.
        let missing = ObjectPath::from("h/none.zst");
        assert_eq!(
            verify(handle, &target, &missing, &sha, 14)
                .unwrap_err()
                .stage(),
            "verify"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn object_names_carry_host_path_and_utc_time() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_901_400_123);
        assert_eq!(
            object_name("web1", std::path::Path::new("app/access.log"), at).as_ref(),
            "web1/app/access.log.20261128T213000.123Z.zst"
        );
    }
}
