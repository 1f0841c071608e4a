//! `[maintenance]`: the co-located process that keeps the disk from filling
//! (`canarygate maintenance`, `ops::maintenance`). Like the doctor it reads its own
//! section, `[alerts]` and `server.admin_listen` of the proxy's config file, and
//! nothing else ([`MaintenanceFile`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::Violation;
use crate::config::alerts::{AlertsConfig, env_set};
use crate::config::sidecar::{ServerAddress, check_metrics_url};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Its own `/metrics` and `/healthz`.
    pub admin_listen: SocketAddr,
    /// The proxy's metrics; absent: `http://<server.admin_listen>/metrics`.
    pub proxy_metrics_url: Option<String>,
    pub interval_ms: u64,
    /// The directories it may archive from (an allow-list, with `patterns`).
    pub dirs: Vec<PathBuf>,
    /// File-name globs (`*`, `?`, `[0-9]`, `[!x]`) a candidate must match.
    pub patterns: Vec<String>,
    /// Globs on the path inside the dir (or the file name) that are never candidates.
    pub exclude: Vec<String>,
    /// A filesystem above this (percent used) is archived from ...
    pub disk_percent: f64,
    /// ... until below this.
    pub target_percent: f64,
    /// Past this, heavy work is never deferred, and a round that ends above it alerts
    /// (critical).
    pub critical_percent: f64,
    /// A candidate larger than this is archived whatever the disk.
    pub max_file_bytes: u64,
    /// Defer compression and upload while the proxy serves more than this (all pools).
    pub defer_above_rps: Option<f64>,
    /// ... or while its production p99 is above this.
    pub defer_above_p99_ms: Option<u64>,
    /// A file written to within this is treated as live (never deleted, only its
    /// archived prefix freed in place), even when no writer can be seen.
    pub settle_ms: u64,
    /// Where archives go: `file:///dir`, `s3://bucket/prefix`, `http(s)://host/path/`.
    pub target_url: Option<String>,
    /// The first path segment of every archive; default: the hostname.
    pub host: Option<String>,
    /// zstd level (1..=19).
    pub compression_level: i32,
    /// After a failed archive, a file waits this long, doubling up to an hour.
    pub retry_backoff_ms: u64,
    pub s3: S3Config,
    pub webdav: WebDavConfig,
}

/// `[maintenance.s3]`: for an `s3://` target. Unset credentials fall back to the
/// standard AWS environment variables (`AWS_ACCESS_KEY_ID`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// S3-compatible endpoint (MinIO, Ceph, ...); absent: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id_env: Option<String>,
    pub secret_access_key_env: Option<String>,
    /// Allow an `http://` endpoint (a storage server on a private network).
    pub allow_http: bool,
}

/// `[maintenance.webdav]`: for an `http(s)://` target (HTTP PUT/GET/DELETE, WebDAV
/// MKCOL for directories).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebDavConfig {
    pub username: Option<String>,
    pub password_env: Option<String>,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            proxy_metrics_url: None,
            interval_ms: 30_000,
            dirs: Vec::new(),
            patterns: ["*.log", "*.log.[0-9]*", "*.gz", "core", "core.*", "*.dump"]
                .map(str::to_owned)
                .to_vec(),
            exclude: Vec::new(),
            disk_percent: 85.0,
            target_percent: 70.0,
            critical_percent: 95.0,
            max_file_bytes: 512 << 20,
            defer_above_rps: None,
            defer_above_p99_ms: None,
            settle_ms: 300_000,
            target_url: None,
            host: None,
            compression_level: 3,
            retry_backoff_ms: 60_000,
            s3: S3Config::default(),
            webdav: WebDavConfig::default(),
        }
    }
}

/// The kinds of secondary storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    File,
    S3,
    Http,
}

impl MaintenanceConfig {
    /// The rules serde cannot check (environment variables are checked by
    /// [`MaintenanceFile::validate`], in the process that needs them).
    pub fn validate(&self) -> Result<(), Violation> {
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: format!("maintenance.{key}"),
                message,
            })
        };
        for (key, value) in [
            ("interval_ms", self.interval_ms),
            ("retry_backoff_ms", self.retry_backoff_ms),
            ("max_file_bytes", self.max_file_bytes),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0".to_owned());
            }
        }
        for (key, value) in [
            ("disk_percent", self.disk_percent),
            ("target_percent", self.target_percent),
            ("critical_percent", self.critical_percent),
        ] {
            if !(0.0..=100.0).contains(&value) {
                return fail(key, format!("{value} is out of range; it must be 0..=100"));
            }
        }
        if self.target_percent >= self.disk_percent {
            return fail(
                "target_percent",
                format!(
                    "{} must be below disk_percent ({}): archiving runs from disk_percent \
                     down to target_percent",
                    self.target_percent, self.disk_percent
                ),
            );
        }
        if self.critical_percent < self.disk_percent {
            return fail(
                "critical_percent",
                format!(
                    "{} must not be below disk_percent ({})",
                    self.critical_percent, self.disk_percent
                ),
            );
        }
        if !(1..=19).contains(&self.compression_level) {
            return fail(
                "compression_level",
                format!(
                    "{} is out of range; it must be 1..=19",
                    self.compression_level
                ),
            );
        }
        if let Some(rps) = self.defer_above_rps
            && !(rps >= 0.0 && rps.is_finite())
        {
            return fail("defer_above_rps", format!("{rps} must be 0 or more"));
        }
        for (i, dir) in self.dirs.iter().enumerate() {
            if !dir.is_absolute() {
                return fail(
                    &format!("dirs[{i}]"),
                    format!("`{}` must be an absolute path", dir.display()),
                );
            }
        }
        for (key, globs) in [("patterns", &self.patterns), ("exclude", &self.exclude)] {
            for (i, glob) in globs.iter().enumerate() {
                if let Err(message) = crate::glob::check(glob) {
                    return fail(&format!("{key}[{i}]"), format!("`{glob}`: {message}"));
                }
            }
        }
        if let Some(url) = &self.target_url
            && let Err(message) = target_kind(url)
        {
            return fail("target_url", message);
        }
        if let Some(host) = &self.host
            && (host.is_empty() || host.contains('/') || host == "." || host == "..")
        {
            return fail("host", format!("`{host}` must be one path segment"));
        }
        check_metrics_url("maintenance", self.proxy_metrics_url.as_ref())
    }

    /// What `canarygate maintenance` needs beyond [`Self::validate`]: something to
    /// watch, somewhere to put it, and the secrets its target names.
    pub fn validate_to_run(&self) -> Result<(), Violation> {
        self.validate()?;
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: format!("maintenance.{key}"),
                message,
            })
        };
        if self.dirs.is_empty() {
            return fail(
                "dirs",
                "no directory to watch: set maintenance.dirs".to_owned(),
            );
        }
        let Some(url) = &self.target_url else {
            return fail(
                "target_url",
                "no secondary storage: set maintenance.target_url".to_owned(),
            );
        };
        match target_kind(url) {
            Ok(TargetKind::S3) => {
                for (key, env) in [
                    ("s3.access_key_id_env", &self.s3.access_key_id_env),
                    ("s3.secret_access_key_env", &self.s3.secret_access_key_env),
                ] {
                    if let Some(name) = env {
                        env_set(name).or_else(|m| fail(key, m))?;
                    }
                }
            }
            Ok(TargetKind::Http) => {
                if let Some(name) = &self.webdav.password_env {
                    env_set(name).or_else(|m| fail("webdav.password_env", m))?;
                }
            }
            Ok(TargetKind::File) | Err(_) => {}
        }
        Ok(())
    }
}

/// The storage kind a target URL names, or why it names none.
pub fn target_kind(url: &str) -> Result<TargetKind, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL (file://, s3:// or http(s)://)"))?;
    match scheme {
        "file" if rest.starts_with('/') => Ok(TargetKind::File),
        "file" => Err(format!(
            "`{url}`: a file:// target needs an absolute path (file:///mnt/backup)"
        )),
        "s3" if !rest.is_empty() && !rest.starts_with('/') => Ok(TargetKind::S3),
        "s3" => Err(format!(
            "`{url}`: an s3:// target needs a bucket (s3://bucket/prefix)"
        )),
        "http" | "https" if !rest.is_empty() => Ok(TargetKind::Http),
        _ => Err(format!(
            "`{url}`: unknown storage; use file:///dir, s3://bucket/prefix or http(s)://host/path/"
        )),
    }
}

/// What `canarygate maintenance` reads of the config file: other sections are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct MaintenanceFile {
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub server: ServerAddress,
}

impl MaintenanceFile {
    /// The sections that differ from `other`'s (a SIGHUP says what it applied).
    pub fn changed_sections(&self, other: &Self) -> Vec<&'static str> {
        [
            ("maintenance", self.maintenance != other.maintenance),
            ("alerts", self.alerts != other.alerts),
            ("server", self.server != other.server),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    pub fn validate(&self) -> Result<(), Violation> {
        self.maintenance.validate_to_run()?;
        self.alerts.validate()
    }

    /// The proxy's `/metrics` ([`ServerAddress::metrics_url`]).
    pub fn proxy_metrics_url(&self) -> String {
        self.server
            .metrics_url(self.maintenance.proxy_metrics_url.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn maintenance(src: &str) -> Result<MaintenanceFile, String> {
        parse(src, "m.toml", MaintenanceFile::validate).map_err(|e| e.to_string())
    }

    #[test]
    fn maintenance_reads_its_sections_with_defaults() {
        let file = maintenance(
            "[server]\nadmin_listen = \"0.0.0.0:9300\"\n[pools]\nx = 1\n[maintenance]\n\
             dirs = [\"/var/log/app\"]\ntarget_url = \"file:///mnt/backup\"\n",
        )
        .unwrap();
        let m = &file.maintenance;
        assert_eq!(file.proxy_metrics_url(), "http://127.0.0.1:9300/metrics");
        assert_eq!(m.admin_listen.port(), 9092);
        assert_eq!(
            (m.disk_percent, m.target_percent, m.critical_percent),
            (85.0, 70.0, 95.0)
        );
        assert_eq!(m.max_file_bytes, 536_870_912);
        assert_eq!(
            m.patterns,
            ["*.log", "*.log.[0-9]*", "*.gz", "core", "core.*", "*.dump"]
        );
        assert_eq!(target_kind("s3://b/p"), Ok(TargetKind::S3));
        assert_eq!(target_kind("https://h/dav/"), Ok(TargetKind::Http));
    }

    #[test]
    fn bad_maintenance_keys_name_file_line_and_key() {
        let base = "[maintenance]\ndirs = [\"/l\"]\ntarget_url = \"file:///b\"\n";
        assert_eq!(
            maintenance("[maintenance]\ndirs = [\"/l\"]\n").unwrap_err(),
            "m.toml:1: key `maintenance.target_url`: no secondary storage: set maintenance.target_url"
        );
        assert_eq!(
            maintenance(&format!("{base}target_percent = 90\n")).unwrap_err(),
            "m.toml:4: key `maintenance.target_percent`: 90 must be below disk_percent (85): \
             archiving runs from disk_percent down to target_percent"
        );
        assert_eq!(
            maintenance("[maintenance]\ndirs = [\"/l\"]\ntarget_url = \"ftp://x/\"\n").unwrap_err(),
            "m.toml:3: key `maintenance.target_url`: `ftp://x/`: unknown storage; use \
             file:///dir, s3://bucket/prefix or http(s)://host/path/"
        );
        assert_eq!(
            maintenance("[maintenance]\ndirs = [\"logs\"]\ntarget_url = \"file:///b\"\n")
                .unwrap_err(),
            "m.toml:2: key `maintenance.dirs[0]`: `logs` must be an absolute path"
        );
        assert_eq!(
            maintenance(&format!("{base}patterns = [\"[a-\"]\n")).unwrap_err(),
            "m.toml:4: key `maintenance.patterns[0]`: `[a-`: an unclosed `[`"
        );
        assert_eq!(
            maintenance(&format!(
                "{}[maintenance.s3]\naccess_key_id_env = \"CANARYGATE_TEST_UNSET_VARIABLE\"\n",
                base.replace("file:///b", "s3://bucket/logs")
            ))
            .unwrap_err(),
            "m.toml:5: key `maintenance.s3.access_key_id_env`: environment variable \
             CANARYGATE_TEST_UNSET_VARIABLE is not set"
        );
        assert!(
            maintenance(&format!("{base}dir = 1\n"))
                .unwrap_err()
                .starts_with("m.toml:4: key `maintenance"),
        );
    }
}
