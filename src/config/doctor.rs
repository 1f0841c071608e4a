//! `[doctor]`: the co-located process that stops CPU hogs (`canarygate doctor`,
//! `ops::doctor`). It reads `[doctor]`, `[alerts]` and `server.admin_listen` of the
//! proxy's config file, and nothing else: the other sections need not be valid for
//! it ([`DoctorFile`]).

use std::net::SocketAddr;

use serde::Deserialize;

use crate::config::Violation;
use crate::config::alerts::AlertsConfig;
use crate::config::sidecar::{ServerAddress, check_metrics_url};

/// Kill hogs, or only report them (a dry run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Kill,
    Report,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DoctorConfig {
    /// The doctor's own `/metrics` and `/healthz`.
    pub admin_listen: SocketAddr,
    /// The proxy's metrics; absent: `http://<server.admin_listen>/metrics`.
    pub proxy_metrics_url: Option<String>,
    pub interval_ms: u64,
    /// Percent of one core (a process with two busy threads shows 200).
    pub cpu_percent: f64,
    pub sustain_ms: u64,
    /// Only these users' processes are candidates (names or numeric uids); empty: all.
    pub watch_users: Vec<String>,
    pub protected_users: Vec<String>,
    pub protected_names: Vec<String>,
    /// systemd units (or cgroup paths) whose processes are never signalled: matched
    /// against `/proc/<pid>/cgroup`, which a process cannot rename its way out of.
    pub protected_units: Vec<String>,
    pub protected_pids: Vec<u32>,
    pub mode: Mode,
    /// SIGTERM, then SIGKILL after this if the process still runs.
    pub grace_ms: u64,
    /// The circuit breaker: at most `max_kills` within `window_ms`.
    pub max_kills: u32,
    pub window_ms: u64,
    /// Kill only while the proxy's production p99 or the host CPU is above these.
    pub only_when_impacting: bool,
    pub impact_p99_ms: u64,
    pub impact_cpu_ratio: f64,
    /// How long after an action the service is measured again for the alert.
    pub after_ms: u64,
}

/// Executables never signalled, whatever `protected_names` says: the proxy itself.
pub const ALWAYS_PROTECTED_NAMES: [&str; 1] = ["canarygate"];
/// Units never signalled, whatever `protected_units` says: the proxy's.
pub const ALWAYS_PROTECTED_UNITS: [&str; 1] = ["canarygate.service"];

/// The uid of a user name (or a numeric uid), through the host's NSS (`getent
/// passwd`: files, LDAP, sssd, as a login would see it); `/etc/passwd` when
/// `getent` cannot run.
pub fn uid_of(user: &str) -> Option<u32> {
    if let Ok(uid) = user.parse() {
        return Some(uid);
    }
    let field = |entry: &str| -> Option<u32> {
        let mut fields = entry.split(':');
        (fields.next()? == user).then_some(())?;
        fields.nth(1)?.trim().parse().ok()
    };
    match std::process::Command::new("getent")
        .args(["passwd", "--", user])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(out) => field(String::from_utf8_lossy(&out.stdout).lines().next()?),
        Err(_) => std::fs::read_to_string("/etc/passwd")
            .ok()?
            .lines()
            .find_map(field),
    }
}

impl Default for DoctorConfig {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            proxy_metrics_url: None,
            interval_ms: 5_000,
            cpu_percent: 90.0,
            sustain_ms: 30_000,
            watch_users: Vec::new(),
            // Only users every host has: an entry that does not resolve stops the
            // doctor (the Ansible role adds its own users and the admin's).
            protected_users: vec!["root".to_owned()],
            protected_names: [
                "canarygate",
                "redis-server",
                "sshd",
                "systemd",
                "systemd-journald",
                "systemd-logind",
                "init",
                "dbus-daemon",
                "containerd",
                "dockerd",
                "kubelet",
                "postgres",
                "mysqld",
                "prometheus",
            ]
            .map(str::to_owned)
            .to_vec(),
            protected_units: [
                "canarygate.service",
                "canarygate-doctor.service",
                "canarygate-maintenance.service",
                "redis-server.service",
                "redis.service",
            ]
            .map(str::to_owned)
            .to_vec(),
            protected_pids: Vec::new(),
            mode: Mode::Kill,
            grace_ms: 10_000,
            max_kills: 3,
            window_ms: 600_000,
            only_when_impacting: false,
            impact_p99_ms: 500,
            impact_cpu_ratio: 0.9,
            after_ms: 30_000,
        }
    }
}

impl DoctorConfig {
    /// The rules serde cannot check.
    pub fn validate(&self) -> Result<(), Violation> {
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: format!("doctor.{key}"),
                message,
            })
        };
        for (key, value) in [
            ("interval_ms", self.interval_ms),
            ("sustain_ms", self.sustain_ms),
            ("window_ms", self.window_ms),
            ("max_kills", u64::from(self.max_kills)),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0".to_owned());
            }
        }
        if !(self.cpu_percent > 0.0 && self.cpu_percent.is_finite()) {
            return fail(
                "cpu_percent",
                format!(
                    "{} is out of range; it must be above 0 (percent of one core)",
                    self.cpu_percent
                ),
            );
        }
        if let Some((i, unit)) = self
            .protected_units
            .iter()
            .enumerate()
            .find(|(_, u)| u.is_empty() || u.as_str() == "/" || u.contains(char::is_whitespace))
        {
            return fail(
                &format!("protected_units[{i}]"),
                format!(
                    "{unit:?} is not a unit: name one (`app.service`) or a cgroup path \
                     (`/system.slice/app.service`), not the root"
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.impact_cpu_ratio) {
            return fail(
                "impact_cpu_ratio",
                format!(
                    "{} is out of range; it must be 0..=1",
                    self.impact_cpu_ratio
                ),
            );
        }
        check_metrics_url("doctor", self.proxy_metrics_url.as_ref())
    }
}

impl DoctorConfig {
    /// Every `protected_users` entry resolves through `resolve` (a uid or a user
    /// name). Not part of [`DoctorConfig::validate`]: `canarygate check` may run
    /// where the host's users do not exist (a CI machine); the doctor runs it at
    /// start, on its host.
    pub fn validate_users(&self, resolve: impl Fn(&str) -> Option<u32>) -> Result<(), Violation> {
        match self
            .protected_users
            .iter()
            .enumerate()
            .find(|(_, user)| resolve(user).is_none())
        {
            Some((i, user)) => Err(Violation {
                key: format!("doctor.protected_users[{i}]"),
                message: format!(
                    "no user {user:?} on this host (getent passwd): create it first or \
                     remove it; a protected user that does not resolve would protect nothing"
                ),
            }),
            None => Ok(()),
        }
    }
}

/// What `canarygate doctor` reads of the config file: other sections are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct DoctorFile {
    #[serde(default)]
    pub doctor: DoctorConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub server: ServerAddress,
}

impl DoctorFile {
    /// The sections that differ from `other`'s (a SIGHUP says what it applied).
    pub fn changed_sections(&self, other: &Self) -> Vec<&'static str> {
        [
            ("doctor", self.doctor != other.doctor),
            ("alerts", self.alerts != other.alerts),
            ("server", self.server != other.server),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// What the doctor checks at start: its keys, its alerts, and that every
    /// protected user exists on this host. An entry that does not resolve (an LDAP
    /// user while the directory is down, a user not created yet) is refused: taken
    /// as "nobody", it would leave that user's processes killable.
    pub fn validate(&self) -> Result<(), Violation> {
        self.doctor.validate()?;
        self.alerts.validate()?;
        self.doctor.validate_users(uid_of)
    }

    /// The proxy's `/metrics` ([`ServerAddress::metrics_url`]).
    pub fn proxy_metrics_url(&self) -> String {
        self.server
            .metrics_url(self.doctor.proxy_metrics_url.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn doctor(src: &str) -> Result<DoctorFile, String> {
        parse(src, "d.toml", DoctorFile::validate).map_err(|e| e.to_string())
    }

    #[test]
    fn the_doctor_reads_its_sections_and_ignores_the_rest() {
        // No [pools], an unknown section and a broken [routing]: not the doctor's.
        let file = doctor(
            "[server]\nadmin_listen = \"0.0.0.0:9300\"\nlisten = 5\n[routing]\ncanary_percent = 900\n\
             [whatever]\nx = 1\n[doctor]\nmode = \"report\"\n",
        )
        .unwrap();
        assert_eq!(file.doctor.mode, Mode::Report);
        assert_eq!(file.proxy_metrics_url(), "http://127.0.0.1:9300/metrics");
        assert_eq!(file.doctor.protected_users, ["root"]);
        assert!(
            file.doctor
                .protected_units
                .contains(&"canarygate.service".to_owned())
        );
        assert_eq!(
            doctor("").unwrap().proxy_metrics_url(),
            "http://127.0.0.1:9090/metrics"
        );
    }

    #[test]
    fn bad_doctor_keys_name_file_line_and_key() {
        assert_eq!(
            doctor("[doctor]\ninterval_ms = 0\n").unwrap_err(),
            "d.toml:2: key `doctor.interval_ms`: must be greater than 0"
        );
        assert!(
            doctor("[doctor]\nmode = \"maybe\"\n")
                .unwrap_err()
                .starts_with("d.toml:2: key `doctor.mode`"),
        );
        assert!(
            doctor("[doctor]\ngrace = 5\n")
                .unwrap_err()
                .starts_with("d.toml:2: key `doctor"),
        );
        assert_eq!(
            doctor("[doctor]\nimpact_cpu_ratio = 1.5\n").unwrap_err(),
            "d.toml:2: key `doctor.impact_cpu_ratio`: 1.5 is out of range; it must be 0..=1"
        );
        assert!(
            doctor("[doctor]\nprotected_units = [\"a.service\", \"/\"]\n")
                .unwrap_err()
                .starts_with("d.toml:2: key `doctor.protected_units[1]`"),
        );
    }

    #[test]
    fn protected_users_must_resolve() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(uid_of("45123"), Some(45_123));
        assert_eq!(uid_of("no-such-user-canarygate"), None);
        let e = doctor(
            "[doctor]\nprotected_users = [\n  \"root\",\n  \"no-such-user-canarygate\",\n]\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with(
                "d.toml:2: key `doctor.protected_users[1]`: no user \"no-such-user-canarygate\""
            ),
            "{e}"
        );
    }
}
