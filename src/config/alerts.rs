//! `[alerts]`: noise control and the channels (used by `ops::alerts`). Secrets are never in the file: a
//! channel names the environment variable that holds its token or password, and a
//! variable that is not set is a config error (`check` and start-up exit 64 naming
//! the key), never a surprise at 3 a.m.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::Violation;

/// How urgent an alert is; channels send those at or above their `min_severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Critical => "critical",
        }
    }
}

/// `[alerts]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// A kind that keeps firing is sent again at most this often.
    pub repeat_ms: u64,
    /// SMS sent per rolling hour, over all recipients; more are suppressed and
    /// counted, and the next one sent says how many.
    pub sms_max_per_hour: u32,
    /// One send attempt's deadline.
    pub timeout_ms: u64,
    /// First retry delay; doubled per retry (3 tries in all).
    pub retry_base_ms: u64,
    pub twilio: Option<TwilioConfig>,
    pub email: Option<EmailConfig>,
    pub alertmanager: Option<AlertmanagerConfig>,
    pub webhook: Option<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            repeat_ms: 30 * 60 * 1000,
            sms_max_per_hour: 10,
            timeout_ms: 10_000,
            retry_base_ms: 1_000,
            twilio: None,
            email: None,
            alertmanager: None,
            webhook: None,
        }
    }
}

/// `[alerts.twilio]`: SMS through Twilio's Messages API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    pub account_sid: String,
    /// The NAME of the environment variable holding the auth token.
    pub auth_token_env: String,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default = "twilio_api_base")]
    pub api_base: String,
    #[serde(default = "critical")]
    pub min_severity: Severity,
    /// Commands by SMS (`POST /twilio/sms`) are on when this is set: the exact URL
    /// set as the number's messaging webhook in Twilio (scheme, host, path and any
    /// query), which Twilio signs; behind TLS or a tunnel it is not the URL this
    /// process sees.
    pub inbound_public_url: Option<String>,
    /// Serve `/twilio/sms` on this address (and nothing else there), so it can be
    /// exposed through an ingress without exposing the admin port; unset: on the
    /// admin listener. Read at start.
    pub inbound_listen: Option<SocketAddr>,
    /// The numbers (E.164, e.g. `+14155550123`) whose commands are obeyed; others
    /// get a refusal, logged and alerted.
    #[serde(default)]
    pub allowed_numbers: Vec<String>,
}

impl TwilioConfig {
    /// Whether SMS commands are served.
    pub const fn inbound(&self) -> bool {
        self.inbound_public_url.is_some()
    }
}

/// `[alerts.email]`: SMTP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `smtp://host:port`, `smtp://host:port?tls=required` (STARTTLS) or
    /// `smtps://host:port`.
    pub smtp_url: String,
    pub user: Option<String>,
    /// The NAME of the environment variable holding the password.
    pub password_env: Option<String>,
    pub from: String,
    pub to: Vec<String>,
    #[serde(default = "warning")]
    pub min_severity: Severity,
}

/// `[alerts.alertmanager]`: an Alertmanager's v2 API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerConfig {
    /// Base URL, e.g. `http://alertmanager:9093`; or `url_env`, the environment
    /// variable holding it (a URL with credentials stays out of the config file).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    #[serde(default = "warning")]
    pub min_severity: Severity,
}

/// `[alerts.webhook]`: JSON to any URL (Slack- and Mattermost-compatible `text`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The URL; or `url_env`, the environment variable holding it. A chat webhook's
    /// URL is its bearer secret: give it through `url_env`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_env: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "warning")]
    pub min_severity: Severity,
}

fn twilio_api_base() -> String {
    "https://api.twilio.com".to_owned()
}

fn critical() -> Severity {
    Severity::Critical
}

fn warning() -> Severity {
    Severity::Warning
}

impl AlertsConfig {
    /// Checks what serde cannot: URLs, non-empty recipient lists, and that every
    /// named environment variable is set (read here, so `check` catches it).
    pub fn validate(&self) -> Result<(), Violation> {
        let fail = |key: &str, message: String| {
            Err(Violation {
                key: format!("alerts.{key}"),
                message,
            })
        };
        for (key, value) in [
            ("repeat_ms", self.repeat_ms),
            ("timeout_ms", self.timeout_ms),
        ] {
            if value == 0 {
                return fail(key, "must be greater than 0".to_owned());
            }
        }
        if let Some(t) = &self.twilio {
            env_set(&t.auth_token_env).or_else(|m| fail("twilio.auth_token_env", m))?;
            http_url(&t.api_base).or_else(|m| fail("twilio.api_base", m))?;
            if t.to.is_empty() {
                return fail("twilio.to", "needs at least one number".to_owned());
            }
            if let Some(url) = &t.inbound_public_url {
                http_url(url).or_else(|m| fail("twilio.inbound_public_url", m))?;
                if t.allowed_numbers.is_empty() {
                    return fail(
                        "twilio.allowed_numbers",
                        "needs at least one number when inbound_public_url is set (nobody \
                         could command)"
                            .to_owned(),
                    );
                }
            } else if t.inbound_listen.is_some() {
                return fail(
                    "twilio.inbound_listen",
                    "needs inbound_public_url (the URL Twilio signs)".to_owned(),
                );
            }
            if let Some(bad) = t.allowed_numbers.iter().find(|n| !e164(n)) {
                return fail(
                    "twilio.allowed_numbers",
                    format!("{bad:?} is not an E.164 number (+ then 8 to 15 digits)"),
                );
            }
        }
        if let Some(e) = &self.email {
            if !(e.smtp_url.starts_with("smtp://") || e.smtp_url.starts_with("smtps://")) {
                return fail(
                    "email.smtp_url",
                    format!("{:?} must start with smtp:// or smtps://", e.smtp_url),
                );
            }
            if let Err(error) =
                lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(&e.smtp_url)
            {
                return fail("email.smtp_url", format!("{:?}: {error}", e.smtp_url));
            }
            if let Some(name) = &e.password_env {
                env_set(name).or_else(|m| fail("email.password_env", m))?;
            }
            if e.to.is_empty() {
                return fail("email.to", "needs at least one address".to_owned());
            }
        }
        if let Some(a) = &self.alertmanager {
            url_or_env(a.url.as_deref(), a.url_env.as_deref())
                .or_else(|(key, m)| fail(&format!("alertmanager.{key}"), m))?;
        }
        if let Some(w) = &self.webhook {
            url_or_env(w.url.as_deref(), w.url_env.as_deref())
                .or_else(|(key, m)| fail(&format!("webhook.{key}"), m))?;
        }
        Ok(())
    }
}

pub(crate) fn env_set(name: &str) -> Result<(), String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => Ok(()),
        Ok(_) => Err(format!("environment variable {name} is empty")),
        Err(_) => Err(format!("environment variable {name} is not set")),
    }
}

/// `+` then 8 to 15 digits, as Twilio writes `From`.
fn e164(number: &str) -> bool {
    number
        .strip_prefix('+')
        .is_some_and(|d| (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

fn http_url(url: &str) -> Result<(), String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "{:?} must start with http:// or https://",
            crate::redact::url(url)
        ))
    }
}

/// Exactly one of `url` (an http(s) URL) and `url_env` (a set variable); the error
/// names the key at fault. The variable's value is checked when the channel is
/// built: `check` runs with placeholder values.
fn url_or_env(url: Option<&str>, url_env: Option<&str>) -> Result<(), (&'static str, String)> {
    match (url, url_env) {
        (Some(url), None) => http_url(url).map_err(|m| ("url", m)),
        (None, Some(name)) => env_set(name).map_err(|m| ("url_env", m)),
        (None, None) => Err(("url", "needs `url` or `url_env`".to_owned())),
        (Some(_), Some(_)) => Err(("url_env", "give `url` or `url_env`, not both".to_owned())),
    }
}

/// The URL `url` or `url_env` gives (validated at load; an env value that is not an
/// http(s) URL is the channel's error when it is built).
pub fn resolved_url(url: Option<&str>, url_env: Option<&str>) -> Result<String, String> {
    let value = match (url, url_env) {
        (Some(url), _) => url.to_owned(),
        (None, Some(name)) => secret(name),
        (None, None) => String::new(),
    };
    // Never the value in the message: it is the secret.
    http_url(&value).map_err(|_| match url_env {
        Some(name) if url.is_none() => {
            format!("environment variable {name} does not hold an http:// or https:// URL")
        }
        _ => format!(
            "{:?} must start with http:// or https://",
            crate::redact::url(&value)
        ),
    })?;
    Ok(value)
}

/// The value of a named environment variable (validated at load).
pub fn secret(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}
