//! The optional access log (`[server] access_log = PATH`): one line per proxied
//! request, appended to a file by a task of its own, so the request path never
//! waits on the disk: it hands the line over a bounded queue, and when the queue
//! is full the line is dropped and counted (`canarygate_log_dropped_total`), not
//! waited for.
//!
//! Rotation never loses a line: the file is opened with `O_APPEND` (a truncation,
//! by logrotate's copytruncate or by hand, is followed at once: the next line lands
//! at the new end, never after a run of zeros; maintenance's hole punching leaves
//! the end where it is), and before each batch, at most every 200 ms, the writer
//! compares the path's inode with its open file's: when the file was moved or
//! removed it opens a new one at the path. Lines written between the move and the
//! reopen are in the moved file.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Lines waiting for the writer at most (then new ones are dropped and counted).
const QUEUE_LINES: usize = 65_536;
/// How often the writer looks for a moved file, at most.
const REOPEN_CHECK: Duration = Duration::from_millis(200);

/// The request path's end: formats nothing itself, queues a finished line.
pub struct AccessLog {
    lines: mpsc::Sender<String>,
    dropped: IntCounter,
    /// The writer's end, until the server takes it ([`AccessLog::take_writer`]).
    writer: Mutex<Option<Writer>>,
}

/// The task's end: the queue and the file.
pub struct Writer {
    path: PathBuf,
    lines: mpsc::Receiver<String>,
    dropped: IntCounter,
}

impl AccessLog {
    pub fn new(path: &Path, dropped: IntCounter) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_LINES);
        Self {
            lines: tx,
            writer: Mutex::new(Some(Writer {
                path: path.to_owned(),
                lines: rx,
                dropped: dropped.clone(),
            })),
            dropped,
        }
    }

    /// Queues one line (it must end with `\n`); drops it if the writer is behind.
    pub fn write(&self, line: String) {
        if self.lines.try_send(line).is_err() {
            self.dropped.inc();
        }
    }

    /// The writer, once (the server spawns [`run`] with it).
    pub fn take_writer(&self) -> Option<Writer> {
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }
}

/// One access log line: time, client, request line, status, pool, routing reason,
/// backend, duration, request id; space-separated, the request line quoted.
#[allow(clippy::too_many_arguments)]
pub fn line(
    peer: std::net::SocketAddr,
    method: &http::Method,
    target: &str,
    version: http::Version,
    status: u16,
    pool: &str,
    reason: &str,
    backend: &str,
    duration_us: u64,
    request_id: &str,
) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(160 + target.len());
    let _ = writeln!(
        out,
        "{} {} \"{method} {} {version:?}\" {status} {pool} {reason} {} {duration_us} {}",
        humantime::format_rfc3339_millis(SystemTime::now()),
        peer.ip(),
        escape(target),
        if backend.is_empty() { "-" } else { backend },
        if request_id.is_empty() {
            "-"
        } else {
            request_id
        },
    );
    out
}

/// A target as it may appear in a line: no spaces, quotes or control characters
/// (hyper refuses most of them already; this keeps one request on one line).
fn escape(target: &str) -> std::borrow::Cow<'_, str> {
    if target
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return std::borrow::Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(target.len() + 8);
    for b in target.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            out.push(char::from(b));
        } else {
            use std::fmt::Write as _;
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The open file and the identity of what it was opened as.
struct Open {
    file: std::io::BufWriter<std::fs::File>,
    id: (u64, u64),
}

fn open(path: &Path) -> std::io::Result<Open> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    let meta = file.metadata()?;
    Ok(Open {
        file: std::io::BufWriter::with_capacity(64 << 10, file),
        id: (meta.dev(), meta.ino()),
    })
}

/// Writes queued lines until `cancel`, then what is still queued, then stops.
pub async fn run(mut writer: Writer, cancel: CancellationToken) {
    let mut file = match open(&writer.path) {
        Ok(file) => Some(file),
        Err(error) => {
            warn!(path = %writer.path.display(), %error, "cannot open the access log; retrying");
            None
        }
    };
    let mut checked = Instant::now();
    let mut batch = Vec::with_capacity(256);
    loop {
        let n = tokio::select! {
            () = cancel.cancelled() => {
                writer.lines.close();
                writer.lines.recv_many(&mut batch, usize::MAX).await
            }
            n = writer.lines.recv_many(&mut batch, 1024) => n,
        };
        if n == 0 {
            break;
        }
        if file.is_none() || checked.elapsed() >= REOPEN_CHECK {
            checked = Instant::now();
            file = reopen_if_moved(&writer.path, file);
        }
        // A batch is written and flushed at once on a blocking thread: the runtime's
        // threads serve requests and must not wait on the disk.
        if let Some(mut open) = file.take() {
            let lines = std::mem::take(&mut batch);
            let result = tokio::task::spawn_blocking(move || {
                for line in &lines {
                    open.file.write_all(line.as_bytes())?;
                }
                open.file.flush().map(|()| (open, lines))
            })
            .await;
            match result {
                Ok(Ok((open, mut lines))) => {
                    lines.clear();
                    batch = lines;
                    file = Some(open);
                }
                Ok(Err(error)) => {
                    warn!(path = %writer.path.display(), %error, "access log write failed; reopening");
                }
                Err(error) => warn!(%error, "access log writer task failed"),
            }
        } else {
            // No file (it cannot be opened): these lines are lost, and counted.
            writer.dropped.inc_by(batch.len() as u64);
            batch.clear();
        }
    }
}

/// The open file, or a new one when the path now names another file (moved,
/// removed) or none could be opened before.
fn reopen_if_moved(path: &Path, file: Option<Open>) -> Option<Open> {
    let current = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    match file {
        Some(open) if current == Some(open.id) => Some(open),
        Some(mut old) => {
            let _ = old.file.flush();
            open(path).ok()
        }
        None => open(path).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_keeps_one_request_on_one_line() {
        let l = line(
            "10.0.0.1:5000".parse().unwrap(),
            &http::Method::GET,
            "/a b\"c",
            http::Version::HTTP_11,
            200,
            "canary",
            "percent",
            "127.0.0.1:9001",
            1234,
            "id-1",
        );
        assert!(l.ends_with(
            " 10.0.0.1 \"GET /a\\x20b\\x22c HTTP/1.1\" 200 canary percent 127.0.0.1:9001 1234 id-1\n"
        ), "{l}");
        assert_eq!(l.matches('\n').count(), 1);
    }
}
