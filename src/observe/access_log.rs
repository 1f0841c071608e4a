//! The access log: one line per proxied request (`[server] access_log`: standard
//! output by default, a file, or off), in canarygate's own format, Apache/nginx
//! `combined`, or JSON (`access_log_format`).
//!
//! The request path never waits on the log and shares no lock with other workers:
//! each worker thread formats its lines into a buffer of its own (a mutex per
//! worker, so only that worker and the writer's periodic sweep ever take it), with
//! the timestamp text cached per second. A full buffer (64 KiB, some 400 lines) is
//! handed to the writer thread over a bounded queue (64 buffers, 4 MiB); when the
//! queue is full the buffer's lines are dropped and counted
//! (`canarygate_log_dropped_total`), never waited for. The writer, a thread of its
//! own so a stalled disk or pipe holds neither a runtime thread nor the shutdown,
//! writes each buffer with one `write` and sweeps the partial buffers every 500 ms
//! (as nginx's `buffer=64k flush=1s` does, but twice as often). Shutdown sweeps and
//! writes what is left, waiting for it at most 2 s.
//!
//! Rotation never loses a line: a file is opened with `O_APPEND` (a truncation, by
//! logrotate's copytruncate or by hand, is followed at once: the next line lands at
//! the new end, never after a run of zeros; maintenance's hole punching leaves the
//! end where it is), and before each write, at most every 200 ms, the writer
//! compares the path's inode with its open file's: when the file was moved or
//! removed it opens a new one at the path. Lines written between the move and the
//! reopen are in the moved file.

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{AccessLogFormat, AccessLogTarget};

/// A worker's buffer is handed to the writer when it holds this much.
const BATCH_BYTES: usize = 64 << 10;
/// Full buffers waiting for the writer at most (then new ones are dropped, counted).
const QUEUE_BATCHES: usize = 64;
/// How often the writer takes the workers' partial buffers.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How often the writer looks for a moved file, at most.
const REOPEN_CHECK: Duration = Duration::from_millis(200);
/// How long the shutdown waits for the last lines to be written.
const FINAL_WRITE: Duration = Duration::from_secs(2);

/// What one request's line says.
pub struct Entry<'a> {
    pub peer: std::net::IpAddr,
    pub method: &'a http::Method,
    /// Path and query as the client sent them.
    pub target: &'a str,
    pub version: http::Version,
    pub status: u16,
    /// The response's `Content-Length`, when it has one.
    pub bytes: Option<u64>,
    pub pool: &'a str,
    pub reason: &'a str,
    /// `host:port`, or empty when no backend was reached.
    pub backend: &'a str,
    /// Time to the response headers.
    pub duration_us: u64,
    pub request_id: &'a str,
    pub referer: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
}

/// The request path's end.
pub struct AccessLog {
    shared: Arc<Shared>,
    /// The writer's end, until the server takes it ([`AccessLog::take_writer`]).
    writer: Mutex<Option<Writer>>,
}

/// What the request path and the writer's sweep share.
struct Shared {
    format: AccessLogFormat,
    /// One per worker thread (see [`crate::worker`]).
    shards: Box<[Mutex<Shard>]>,
    batches: SyncSender<Batch>,
    dropped: IntCounter,
}

/// One worker's lines not yet handed over.
#[derive(Default)]
struct Shard {
    buf: Vec<u8>,
    lines: u64,
    clock: Clock,
}

/// Formatted lines and how many.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

/// The writer thread's end: the queue and where the lines go.
pub struct Writer {
    target: Sink,
    batches: Receiver<Batch>,
    shared: Weak<Shared>,
    dropped: IntCounter,
}

enum Sink {
    Stdout,
    File(PathBuf),
}

impl AccessLog {
    /// `None` for `access_log = "off"`.
    pub fn new(
        target: &AccessLogTarget,
        format: AccessLogFormat,
        dropped: IntCounter,
    ) -> Option<Self> {
        let sink = match target {
            AccessLogTarget::Off => return None,
            AccessLogTarget::Stdout => Sink::Stdout,
            AccessLogTarget::File(path) => Sink::File(path.clone()),
        };
        let (tx, rx) = sync_channel(QUEUE_BATCHES);
        let shared = Arc::new(Shared {
            format,
            shards: (0..crate::worker::workers())
                .map(|_| Mutex::new(Shard::default()))
                .collect(),
            batches: tx,
            dropped: dropped.clone(),
        });
        let writer = Writer {
            target: sink,
            batches: rx,
            shared: Arc::downgrade(&shared),
            dropped,
        };
        Some(Self {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Whether lines carry the `Referer` and `User-Agent` (so the request path keeps
    /// them only when they are written).
    pub fn wants_agent(&self) -> bool {
        self.shared.format != AccessLogFormat::Canarygate
    }

    /// Formats `entry` into this worker's buffer; hands the buffer over when full.
    pub fn record(&self, entry: &Entry<'_>) {
        let shards = &self.shared.shards;
        let full = {
            let mut shard = shards[crate::worker::index() % shards.len()]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            shard.push(self.shared.format, entry);
            (shard.buf.len() >= BATCH_BYTES).then(|| shard.take())
        };
        if let Some(batch) = full {
            self.shared.send(batch);
        }
    }

    /// The writer, once (the server spawns [`run`] with it).
    pub fn take_writer(&self) -> Option<Writer> {
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl Shared {
    fn send(&self, batch: Batch) {
        match self.batches.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => {
                self.dropped.inc_by(batch.lines);
            }
        }
    }

    /// Every worker's partial buffer.
    fn sweep(&self) -> Vec<Batch> {
        self.shards
            .iter()
            .filter_map(|shard| {
                let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                (shard.lines > 0).then(|| shard.take())
            })
            .collect()
    }
}

impl Shard {
    fn take(&mut self) -> Batch {
        let lines = std::mem::take(&mut self.lines);
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH_BYTES + 1024));
        Batch { bytes, lines }
    }

    /// Formats one line. By hand, not with `write!`: the formatting machinery (and
    /// `Ipv4Addr`'s `Display`, which pads) was 3,260 instructions a line under
    /// callgrind, a tenth of a whole proxied request's.
    fn push(&mut self, format: AccessLogFormat, e: &Entry<'_>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.clock.set(now.as_secs());
        let millis = now.subsec_millis();
        let out = &mut self.buf;
        let version = version_text(e.version);
        match format {
            AccessLogFormat::Canarygate => {
                let backend = if e.backend.is_empty() { "-" } else { e.backend };
                let request_id = if e.request_id.is_empty() {
                    "-"
                } else {
                    e.request_id
                };
                out.extend_from_slice(&self.clock.rfc3339);
                digits3(out, millis);
                out.extend_from_slice(b"Z ");
                ip(out, e.peer);
                out.push(b' ');
                request_line(out, e, version);
                for field in [e.pool, e.reason, backend] {
                    out.push(b' ');
                    out.extend_from_slice(field.as_bytes());
                }
                out.push(b' ');
                number(out, e.duration_us);
                out.push(b' ');
                out.extend_from_slice(request_id.as_bytes());
                out.push(b'\n');
            }
            AccessLogFormat::Combined => {
                ip(out, e.peer);
                out.extend_from_slice(b" - - [");
                out.extend_from_slice(&self.clock.clf);
                out.extend_from_slice(b"] ");
                request_line(out, e, version);
                out.push(b' ');
                match e.bytes {
                    Some(n) => number(out, n),
                    None => out.push(b'-'),
                }
                for field in [e.referer, e.user_agent] {
                    out.extend_from_slice(b" \"");
                    match field {
                        Some(value) => escape(out, value, Style::Log),
                        None => out.push(b'-'),
                    }
                    out.push(b'"');
                }
                out.push(b'\n');
            }
            AccessLogFormat::Json => {
                out.extend_from_slice(b"{\"time\":\"");
                out.extend_from_slice(&self.clock.rfc3339);
                digits3(out, millis);
                out.extend_from_slice(b"Z\",\"client\":\"");
                ip(out, e.peer);
                out.extend_from_slice(b"\",\"method\":\"");
                out.extend_from_slice(e.method.as_str().as_bytes());
                out.extend_from_slice(b"\",\"target\":\"");
                escape(out, e.target.as_bytes(), Style::Json);
                out.extend_from_slice(b"\",\"protocol\":\"");
                out.extend_from_slice(version);
                out.extend_from_slice(b"\",\"status\":");
                number(out, u64::from(e.status));
                out.extend_from_slice(b",\"bytes\":");
                match e.bytes {
                    Some(n) => number(out, n),
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"pool\":\"");
                out.extend_from_slice(e.pool.as_bytes());
                out.extend_from_slice(b"\",\"reason\":\"");
                out.extend_from_slice(e.reason.as_bytes());
                out.extend_from_slice(b"\",\"backend\":");
                json_string(out, (!e.backend.is_empty()).then_some(e.backend.as_bytes()));
                out.extend_from_slice(b",\"duration_us\":");
                number(out, e.duration_us);
                out.extend_from_slice(b",\"request_id\":");
                json_string(
                    out,
                    (!e.request_id.is_empty()).then_some(e.request_id.as_bytes()),
                );
                out.extend_from_slice(b",\"referer\":");
                json_string(out, e.referer);
                out.extend_from_slice(b",\"user_agent\":");
                json_string(out, e.user_agent);
                out.extend_from_slice(b"}\n");
            }
        }
        self.lines += 1;
    }
}

/// `"GET /path?query HTTP/1.1" 200` (the text formats' request and status).
fn request_line(out: &mut Vec<u8>, e: &Entry<'_>, version: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(e.method.as_str().as_bytes());
    out.push(b' ');
    escape(out, e.target.as_bytes(), Style::Log);
    out.push(b' ');
    out.extend_from_slice(version);
    out.extend_from_slice(b"\" ");
    number(out, u64::from(e.status));
}

fn version_text(version: http::Version) -> &'static [u8] {
    match version {
        http::Version::HTTP_09 => b"HTTP/0.9",
        http::Version::HTTP_10 => b"HTTP/1.0",
        http::Version::HTTP_2 => b"HTTP/2.0",
        http::Version::HTTP_3 => b"HTTP/3.0",
        _ => b"HTTP/1.1",
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `n` (below 1000) as three digits.
fn digits3(out: &mut Vec<u8>, n: u32) {
    let n = n.min(999);
    out.extend_from_slice(&[
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]);
}

fn ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                number(out, u64::from(octet));
            }
        }
        // Rarer, and its text has the zero-run rules: the standard library's.
        std::net::IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// The time texts of one second, formatted once per second per worker.
struct Clock {
    second: u64,
    /// `2026-11-29T03:40:12.` (milliseconds and `Z` follow).
    rfc3339: [u8; 20],
    /// `29/Nov/2026:03:40:12 +0000`.
    clf: [u8; 26],
}

impl Default for Clock {
    fn default() -> Self {
        let mut clock = Self {
            second: u64::MAX,
            rfc3339: [0; 20],
            clf: [0; 26],
        };
        clock.set(0);
        clock
    }
}

impl Clock {
    fn set(&mut self, second: u64) {
        if second == self.second {
            return;
        }
        self.second = second;
        let text =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(second)).to_string();
        // `YYYY-MM-DDTHH:MM:SSZ`
        let t = text.as_bytes();
        self.rfc3339[..19].copy_from_slice(&t[..19]);
        self.rfc3339[19] = b'.';
        const MONTHS: [&[u8; 3]; 12] = [
            b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
            b"Dec",
        ];
        let month = usize::from((t[5] - b'0') * 10 + (t[6] - b'0'));
        let clf = &mut self.clf;
        clf[..2].copy_from_slice(&t[8..10]);
        clf[2] = b'/';
        clf[3..6].copy_from_slice(MONTHS[month.clamp(1, 12) - 1]);
        clf[6] = b'/';
        clf[7..11].copy_from_slice(&t[..4]);
        clf[11] = b':';
        clf[12..20].copy_from_slice(&t[11..19]);
        clf[20..].copy_from_slice(b" +0000");
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    /// nginx's escaping: `"`, `\`, spaces, controls and non-ASCII bytes as `\xNN`
    /// (keeps one request on one line, and the fields splittable on spaces).
    Log,
    /// JSON string contents: `\"`, `\\`, and other bytes outside printable ASCII as
    /// `\u00NN` (valid JSON whatever the bytes; a non-UTF-8 byte reads as Latin-1).
    Json,
}

fn escape(out: &mut Vec<u8>, bytes: &[u8], style: Style) {
    let plain = |b: u8| {
        b.is_ascii_graphic() && b != b'"' && b != b'\\' || (style == Style::Json && b == b' ')
    };
    if bytes.iter().all(|&b| plain(b)) {
        out.extend_from_slice(bytes);
        return;
    }
    for &b in bytes {
        if plain(b) {
            out.push(b);
            continue;
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let hex = [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]];
        match (style, b) {
            (Style::Json, b'"' | b'\\') => out.extend_from_slice(&[b'\\', b]),
            (Style::Json, _) => out.extend_from_slice(&[b'\\', b'u', b'0', b'0', hex[0], hex[1]]),
            (Style::Log, _) => out.extend_from_slice(&[b'\\', b'x', hex[0], hex[1]]),
        }
    }
}

fn json_string(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(value) => {
            out.push(b'"');
            escape(out, value, Style::Json);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Runs the writer thread until `cancel`; then it writes what is left (waited for at
/// most 2 s) and stops.
pub async fn run(writer: Writer, cancel: CancellationToken) {
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let stopping = Arc::clone(&stop);
    let spawned = std::thread::Builder::new()
        .name("canarygate-access-log".to_owned())
        .spawn(move || {
            writer.write_until(&stopping);
            let _ = done_tx.send(());
        });
    if let Err(error) = spawned {
        warn!(%error, "cannot start the access log writer; lines will be dropped and counted");
        return;
    }
    cancel.cancelled().await;
    stop.store(true, Ordering::Relaxed);
    if tokio::time::timeout(FINAL_WRITE, done_rx).await.is_err() {
        warn!("access log writer still blocked at shutdown; its last lines may be lost");
    }
}

impl Writer {
    fn write_until(self, stop: &AtomicBool) {
        let mut out = Output::new(self.target);
        let mut swept = Instant::now();
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let mut batches = Vec::new();
            match self.batches.recv_timeout(Duration::from_millis(100)) {
                Ok(batch) => batches.push(batch),
                Err(RecvTimeoutError::Timeout) => {}
                // Every sender is gone: the proxy's state was dropped.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            batches.extend(self.batches.try_iter());
            if stopping || swept.elapsed() >= SWEEP_EVERY {
                swept = Instant::now();
                match self.shared.upgrade() {
                    Some(shared) => batches.extend(shared.sweep()),
                    None => return,
                }
            }
            for batch in batches {
                if !out.write(&batch.bytes) {
                    self.dropped.inc_by(batch.lines);
                }
            }
            if stopping {
                return;
            }
        }
    }
}

/// Where the writer writes, reopened when a file was moved.
struct Output {
    sink: Sink,
    file: Option<Open>,
    checked: Option<Instant>,
    /// The file cannot be opened (said once, not per batch, until it can again).
    unopenable: bool,
}

/// An open file and the identity of what it was opened as.
struct Open {
    file: std::fs::File,
    id: (u64, u64),
}

fn open(path: &Path) -> std::io::Result<Open> {
    let file = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)?;
    let meta = file.metadata()?;
    Ok(Open {
        file,
        id: (meta.dev(), meta.ino()),
    })
}

impl Output {
    fn new(sink: Sink) -> Self {
        Self {
            sink,
            file: None,
            checked: None,
            unopenable: false,
        }
    }

    /// Writes `bytes` whole; `false` when they could not be written (lost).
    fn write(&mut self, bytes: &[u8]) -> bool {
        let path = match &self.sink {
            Sink::Stdout => return std::io::stdout().lock().write_all(bytes).is_ok(),
            Sink::File(path) => path,
        };
        if self.file.is_none() || self.checked.is_none_or(|t| t.elapsed() >= REOPEN_CHECK) {
            self.checked = Some(Instant::now());
            let current = std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
            if self
                .file
                .as_ref()
                .is_none_or(|open| Some(open.id) != current)
            {
                self.file = match open(path) {
                    Ok(file) => {
                        self.unopenable = false;
                        Some(file)
                    }
                    Err(error) => {
                        if !std::mem::replace(&mut self.unopenable, true) {
                            warn!(path = %path.display(), %error, "cannot open the access log; its lines are dropped and counted until it can");
                        }
                        None
                    }
                };
            }
        }
        let Some(open) = &mut self.file else {
            return false;
        };
        match open.file.write_all(bytes) {
            Ok(()) => true,
            Err(error) => {
                warn!(path = %path.display(), %error, "access log write failed; reopening");
                self.file = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(target: &'a str, agent: Option<&'a [u8]>) -> Entry<'a> {
        Entry {
            peer: "10.0.0.1".parse().unwrap(),
            method: &http::Method::GET,
            target,
            version: http::Version::HTTP_11,
            status: 200,
            bytes: Some(100),
            pool: "canary",
            reason: "percent",
            backend: "127.0.0.1:9001",
            duration_us: 1234,
            request_id: "id-1",
            referer: None,
            user_agent: agent,
        }
    }

    fn line(format: AccessLogFormat, e: &Entry<'_>) -> String {
        let mut shard = Shard::default();
        shard.push(format, e);
        assert_eq!(shard.lines, 1);
        String::from_utf8(shard.buf).unwrap()
    }

    #[test]
    fn each_format_keeps_one_request_on_one_line() {
        let e = entry("/a b\"c", Some(b"curl/8 \"x\"\n\xff"));
        let own = line(AccessLogFormat::Canarygate, &e);
        assert!(
            own.ends_with(
                "Z 10.0.0.1 \"GET /a\\x20b\\x22c HTTP/1.1\" 200 canary percent 127.0.0.1:9001 1234 id-1\n"
            ),
            "{own}"
        );
        let combined = line(AccessLogFormat::Combined, &e);
        assert!(
            combined.starts_with("10.0.0.1 - - [")
                && combined.ends_with(
                    " +0000] \"GET /a\\x20b\\x22c HTTP/1.1\" 200 100 \"-\" \"curl/8\\x20\\x22x\\x22\\x0a\\xff\"\n"
                ),
            "{combined}"
        );
        let json = line(AccessLogFormat::Json, &e);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["target"], "/a b\"c");
        assert_eq!(v["user_agent"], "curl/8 \"x\"\n\u{ff}");
        assert_eq!(
            (v["status"].as_u64(), v["bytes"].as_u64()),
            (Some(200), Some(100))
        );
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!(
            (&v["pool"], &v["backend"]),
            (&"canary".into(), &"127.0.0.1:9001".into())
        );
        for text in [own, combined, json] {
            assert_eq!(text.matches('\n').count(), 1, "{text}");
        }
    }

    #[test]
    fn times_are_formatted_once_per_second_and_right() {
        let mut clock = Clock::default();
        // 2026-11-29T03:40:12Z
        clock.set(1_795_923_612);
        assert_eq!(&clock.rfc3339, b"2026-11-29T03:40:12.");
        assert_eq!(&clock.clf, b"29/Nov/2026:03:40:12 +0000");
        clock.set(1_767_225_599); // 2025-12-31T23:59:59Z
        assert_eq!(&clock.clf, b"31/Dec/2025:23:59:59 +0000");
    }
}
