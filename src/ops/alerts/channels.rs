//! What each channel sends. Each is a plain value with one `send`; the dispatcher
//! owns retries, queues and counting.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::json;

use crate::config::alerts::{
    AlertmanagerConfig, AlertsConfig, EmailConfig, TwilioConfig, WebhookConfig, resolved_url,
    secret,
};
use crate::ops::alerts::alert::now_rfc3339;
use crate::ops::alerts::{Alert, AlertState, Severity};

/// Twilio's limit for one message body.
const SMS_MAX_CHARS: usize = 1600;

/// Why one send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Without the URL: a webhook's URL is its secret.
    #[error("request failed: {0}")]
    Http(reqwest::Error),
    /// A channel whose URL (from `url_env`) is unusable.
    #[error("{0}")]
    Config(String),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("Twilio error {code}: {message} (HTTP {status})")]
    Twilio {
        status: u16,
        code: i64,
        message: String,
    },
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("email: {0}")]
    Email(String),
    /// Not sent on purpose (the SMS cap): counted, not retried.
    #[error("suppressed by the hourly SMS cap")]
    Suppressed,
}

impl From<reqwest::Error> for SendError {
    fn from(error: reqwest::Error) -> Self {
        Self::Http(error.without_url())
    }
}

/// One configured channel.
pub enum Channel {
    Twilio(Twilio),
    Email(Email),
    Alertmanager(Alertmanager),
    Webhook(Webhook),
}

impl Channel {
    /// Every channel `[alerts]` configures, in a fixed order.
    pub fn all(config: &AlertsConfig) -> Result<Vec<Self>, SendError> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let mut channels = Vec::new();
        if let Some(c) = &config.email {
            channels.push(Self::Email(Email::new(c, timeout)?));
        }
        let http_channels =
            config.twilio.is_some() || config.alertmanager.is_some() || config.webhook.is_some();
        if !http_channels {
            // No HTTP client (and its root certificates) for a proxy that has none.
            return Ok(channels);
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("canarygate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        if let Some(c) = &config.twilio {
            channels.insert(
                0,
                Self::Twilio(Twilio::new(c, http.clone(), config.sms_max_per_hour)),
            );
        }
        if let Some(c) = &config.alertmanager {
            channels.push(Self::Alertmanager(Alertmanager {
                url: resolved_url(c.url.as_deref(), c.url_env.as_deref())
                    .map_err(|m| SendError::Config(format!("alerts.alertmanager: {m}")))?,
                config: c.clone(),
                http: http.clone(),
                resend_after: Duration::from_millis(config.repeat_ms),
            }));
        }
        if let Some(c) = &config.webhook {
            channels.push(Self::Webhook(Webhook {
                url: resolved_url(c.url.as_deref(), c.url_env.as_deref())
                    .map_err(|m| SendError::Config(format!("alerts.webhook: {m}")))?,
                config: c.clone(),
                http,
            }));
        }
        Ok(channels)
    }

    /// The `channel` label: `twilio`, `email`, `alertmanager`, `webhook`.
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Twilio(_) => "twilio",
            Self::Email(_) => "email",
            Self::Alertmanager(_) => "alertmanager",
            Self::Webhook(_) => "webhook",
        }
    }

    pub fn min_severity(&self) -> Severity {
        match self {
            Self::Twilio(c) => c.config.min_severity,
            Self::Email(c) => c.config.min_severity,
            Self::Alertmanager(c) => c.config.min_severity,
            Self::Webhook(c) => c.config.min_severity,
        }
    }

    pub async fn send(&mut self, alert: &Alert) -> Result<(), SendError> {
        match self {
            Self::Twilio(c) => c.send(alert).await,
            Self::Email(c) => c.send(alert).await,
            Self::Alertmanager(c) => c.send(alert).await,
            Self::Webhook(c) => c.send(alert).await,
        }
    }
}

/// The SMS cost cap: at most `max` alerts per rolling `window`.
#[derive(Debug)]
struct SmsCap {
    max: usize,
    window: Duration,
    /// When each alert of the window went out.
    sent: VecDeque<Instant>,
    /// Alerts held back since the last one sent.
    suppressed: u64,
}

impl SmsCap {
    fn new(max: u32, window: Duration) -> Self {
        Self {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            window,
            sent: VecDeque::new(),
            suppressed: 0,
        }
    }

    /// Whether an alert may go out at `now`: the prefix it starts with (how many
    /// were held back before it), or `None` when the cap holds it back too.
    fn admit(&mut self, now: Instant) -> Option<String> {
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            self.sent.pop_front();
        }
        if self.sent.len() >= self.max {
            self.suppressed += 1;
            return None;
        }
        Some(match self.suppressed {
            0 => String::new(),
            n => format!("({n} suppressed by the SMS cap) "),
        })
    }

    /// The admitted alert went out.
    fn sent(&mut self, now: Instant) {
        self.sent.push_back(now);
        self.suppressed = 0;
    }
}

/// Twilio SMS: one message per recipient, `sms_max_per_hour` over all of them.
pub struct Twilio {
    config: TwilioConfig,
    http: reqwest::Client,
    cap: SmsCap,
}

impl Twilio {
    fn new(config: &TwilioConfig, http: reqwest::Client, max_per_hour: u32) -> Self {
        Self {
            config: config.clone(),
            http,
            cap: SmsCap::new(max_per_hour, Duration::from_secs(3600)),
        }
    }

    async fn send(&mut self, alert: &Alert) -> Result<(), SendError> {
        let Some(prefix) = self.cap.admit(Instant::now()) else {
            return Err(SendError::Suppressed);
        };
        let body = alert.short_text(&prefix, SMS_MAX_CHARS, self.config.inbound());
        let url = format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.config.api_base.trim_end_matches('/'),
            self.config.account_sid
        );
        let token = secret(&self.config.auth_token_env);
        for to in &self.config.to {
            let response = self
                .http
                .post(&url)
                .basic_auth(&self.config.account_sid, Some(&token))
                .form(&[
                    ("To", to.as_str()),
                    ("From", &self.config.from),
                    ("Body", &body),
                ])
                .send()
                .await?;
            let status = response.status();
            if !status.is_success() {
                // Twilio's error JSON: {"code": 21211, "message": "...", ...}.
                let error: serde_json::Value = response.json().await.unwrap_or_default();
                return Err(SendError::Twilio {
                    status: status.as_u16(),
                    code: error["code"].as_i64().unwrap_or(0),
                    message: error["message"].as_str().unwrap_or("").to_owned(),
                });
            }
        }
        self.cap.sent(Instant::now());
        Ok(())
    }
}

/// Email over SMTP.
pub struct Email {
    config: EmailConfig,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl Email {
    fn new(config: &EmailConfig, timeout: Duration) -> Result<Self, SendError> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&config.smtp_url)?
            .timeout(Some(timeout));
        if let Some(user) = &config.user {
            let password = config
                .password_env
                .as_deref()
                .map(secret)
                .unwrap_or_default();
            builder = builder.credentials(Credentials::new(user.clone(), password));
        }
        Ok(Self {
            config: config.clone(),
            transport: builder.build(),
        })
    }

    async fn send(&mut self, alert: &Alert) -> Result<(), SendError> {
        let mailbox = |a: &str| {
            a.parse::<Mailbox>()
                .map_err(|e| SendError::Email(format!("{a:?}: {e}")))
        };
        let mut message = Message::builder()
            .from(mailbox(&self.config.from)?)
            .subject(alert.subject())
            .header(ContentType::TEXT_PLAIN);
        for to in &self.config.to {
            message = message.to(mailbox(to)?);
        }
        let message = message
            .body(alert.text())
            .map_err(|e| SendError::Email(e.to_string()))?;
        self.transport.send(message).await?;
        Ok(())
    }
}

/// Alertmanager's v2 API: teams that route, group and silence there get these too.
pub struct Alertmanager {
    config: AlertmanagerConfig,
    /// From `url` or `url_env`.
    url: String,
    http: reqwest::Client,
    /// A firing alert is re-sent this often (the repeat interval), so it is told to
    /// end only after twice that: Alertmanager would resolve a silent one itself.
    resend_after: Duration,
}

impl Alertmanager {
    async fn send(&mut self, alert: &Alert) -> Result<(), SendError> {
        let ends_at = match alert.state {
            AlertState::Resolved => now_rfc3339(),
            AlertState::Firing => humantime::format_rfc3339_seconds(
                std::time::SystemTime::now() + self.resend_after * 2,
            )
            .to_string(),
        };
        let body = json!([{
            "labels": {
                "alertname": alert.kind,
                "severity": alert.severity.as_str(),
                "instance": alert.instance,
                "host": alert.host,
                "source": "canarygate",
            },
            "annotations": {
                "summary": alert.summary,
                "details": alert.details,
                "id": alert.id,
            },
            "endsAt": ends_at,
        }]);
        let url = format!("{}/api/v2/alerts", self.url.trim_end_matches('/'));
        check(self.http.post(url).json(&body).send().await?).await
    }
}

/// A JSON POST of the structured alert plus `text`.
pub struct Webhook {
    config: WebhookConfig,
    /// From `url` or `url_env`: never logged.
    url: String,
    http: reqwest::Client,
}

impl Webhook {
    async fn send(&mut self, alert: &Alert) -> Result<(), SendError> {
        let mut body = serde_json::to_value(alert).unwrap_or_default();
        body["text"] = json!(alert.text());
        let mut request = self.http.post(&self.url).json(&body);
        for (name, value) in &self.config.headers {
            request = request.header(name, value);
        }
        check(request.send().await?).await
    }
}

/// A 2xx, or the status and the start of the body as the error.
async fn check(response: reqwest::Response) -> Result<(), SendError> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let mut body = response.text().await.unwrap_or_default();
    body.truncate(body.floor_char_boundary(300));
    Err(SendError::Status {
        status: status.as_u16(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sms_cap_holds_back_then_says_how_many_it_held() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut cap = SmsCap::new(2, Duration::from_secs(3600));
        for s in [0, 10] {
            assert_eq!(cap.admit(at(s)).as_deref(), Some(""));
            cap.sent(at(s));
        }
        assert_eq!(cap.admit(at(20)), None);
        assert_eq!(cap.admit(at(3599)), None);
        // The first send left the window: one more may go, and says so.
        assert_eq!(
            cap.admit(at(3600)).as_deref(),
            Some("(2 suppressed by the SMS cap) ")
        );
        cap.sent(at(3600));
        assert_eq!(cap.admit(at(3610)).as_deref(), Some(""));
    }
}
