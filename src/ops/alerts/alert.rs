//! The one alert value every channel renders.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

pub use crate::config::alerts::Severity;

/// Whether the condition holds (firing) or has ended (resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }
}

/// One alert. `id` is short so an operator can quote it (`ACK k7f3q2`); the same
/// firing episode keeps its id through repeats and its resolved message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Alert {
    pub id: String,
    pub severity: Severity,
    /// A stable key: `cpu_spike`, `memory_spike`, `canary_rollback`, `doctor_kill`...
    pub kind: String,
    /// One line.
    pub summary: String,
    pub details: String,
    pub host: String,
    pub instance: String,
    /// RFC 3339, UTC, when this message was made.
    pub time: String,
    pub state: AlertState,
}

impl Alert {
    /// A firing alert made now on this host, with a new id.
    pub fn firing(
        severity: Severity,
        kind: &str,
        summary: impl Into<String>,
        details: impl Into<String>,
        instance: &str,
    ) -> Self {
        // Whatever error text an alert carries, a URL in it goes out without its
        // userinfo and query values (a storage or Redis error may quote one).
        Self {
            id: new_id(),
            severity,
            kind: kind.to_owned(),
            summary: crate::redact::urls_in(&summary.into()),
            details: crate::redact::urls_in(&details.into()),
            host: hostname(),
            instance: instance.to_owned(),
            time: now_rfc3339(),
            state: AlertState::Firing,
        }
    }

    /// `[canarygate] CRITICAL cpu_spike on host: summary` (resolved: `RESOLVED`).
    pub fn subject(&self) -> String {
        let level = match self.state {
            AlertState::Firing => self.severity.as_str().to_ascii_uppercase(),
            AlertState::Resolved => "RESOLVED".to_owned(),
        };
        format!(
            "[canarygate] {level} {} on {}: {}",
            self.kind, self.host, self.summary
        )
    }

    /// Plain text with every field, for email bodies and webhook `text`.
    pub fn text(&self) -> String {
        let mut text = self.subject();
        let _ = write!(
            text,
            "\n\nid: {}\nstate: {}\nseverity: {}\nkind: {}\nhost: {}\ninstance: {}\ntime: {}\n",
            self.id,
            self.state.as_str(),
            self.severity.as_str(),
            self.kind,
            self.host,
            self.instance,
            self.time
        );
        if !self.details.is_empty() {
            let _ = write!(text, "\n{}\n", self.details);
        }
        text
    }

    /// At most `max` characters of [`Alert::text`]-like content for an SMS: the
    /// subject, the id to quote (with `reply_hint`, on a firing alert: `reply ACK
    /// <id> or ROLLBACK`, for operators who can answer by SMS), then as much of the
    /// details as fits.
    pub fn short_text(&self, prefix: &str, max: usize, reply_hint: bool) -> String {
        let hint = match self.state {
            AlertState::Firing if reply_hint => format!("; reply ACK {} or ROLLBACK", self.id),
            _ => String::new(),
        };
        let mut text = format!("{prefix}{} (id {}{hint})", self.subject(), self.id);
        if !self.details.is_empty() {
            let _ = write!(text, "\n{}", self.details);
        }
        ellipsize(text, max)
    }
}

/// `text` cut to at most `max` characters, ending in `...` when cut (an SMS body).
pub fn ellipsize(text: String, max: usize) -> String {
    if text.chars().count() <= max {
        return text;
    }
    let mut cut: String = text.chars().take(max.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

/// `text` with control characters escaped (`\n`, `\u{1b}`...): someone else's
/// text quoted in an alert cannot forge a line of a log or a message.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Six characters from an alphabet without look-alikes (no 0/o, 1/l/i).
fn new_id() -> String {
    const ALPHABET: &[u8] = b"23456789abcdefghjkmnpqrstuvwxyz";
    (0..6)
        .map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())]))
        .collect()
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// This machine's host name (Linux), or `unknown`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_an_alert_lose_their_secrets() {
        let alert = Alert::firing(
            Severity::Critical,
            "archive_failed",
            "upload to https://u:pw@dav.example/logs/ failed",
            "GET s3://b/k?X-Amz-Signature=abc: 403",
            "",
        );
        assert_eq!(
            alert.summary,
            "upload to https://***@dav.example/logs/ failed"
        );
        assert_eq!(alert.details, "GET s3://b/k?X-Amz-Signature=***: 403");
    }

    #[test]
    fn renderings_carry_every_field_and_sms_fits() {
        let mut alert = Alert::firing(
            Severity::Critical,
            "cpu_spike",
            "host CPU 97% for 30 s",
            "top: 4242 burner 190%",
            "edge-1:8080",
        );
        assert_eq!(alert.id.len(), 6);
        assert_ne!(alert.id, Alert::firing(Severity::Info, "x", "", "", "").id);
        assert!(
            alert
                .subject()
                .starts_with("[canarygate] CRITICAL cpu_spike on ")
        );
        let text = alert.text();
        for field in [&alert.id, "firing", "critical", "edge-1:8080", "top: 4242"] {
            assert!(text.contains(field), "{field} in {text}");
        }
        alert.details = "x".repeat(5000);
        let sms = alert.short_text("(3 suppressed) ", 1600, false);
        assert_eq!(sms.chars().count(), 1600);
        assert!(sms.starts_with("(3 suppressed) [canarygate] CRITICAL"));
        let id = alert.id.clone();
        let hinted = alert.short_text("", 200, true);
        assert!(
            hinted.contains(&format!("(id {id}; reply ACK {id} or ROLLBACK)\nxxx")),
            "{hinted}"
        );
        alert.state = AlertState::Resolved;
        assert!(!alert.short_text("", 200, true).contains("reply ACK"));
        assert!(
            alert
                .subject()
                .starts_with("[canarygate] RESOLVED cpu_spike")
        );
    }
}
