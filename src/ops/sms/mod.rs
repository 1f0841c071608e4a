//! Commands by SMS: the on-call operator who gets "canary error ratio 7% vs 0.4%"
//! at 3 a.m. answers `ROLLBACK` and the canary is out, with no laptop.
//!
//! Twilio posts each message the number receives to `POST /twilio/sms` (on the
//! admin listener, or on `[alerts.twilio] inbound_listen` alone). Every request is
//! checked before anything is read from it: size, form, then Twilio's signature
//! over `inbound_public_url` ([`signature`]); a missing or wrong one is 403 and
//! changes nothing. Only `allowed_numbers` may command. A command that changes the
//! canary writes the reserved flags and the analysis record in Redis in one
//! transaction, so every proxy follows and the analysis, whose writes compare the
//! record first, cannot undo it with a write it prepared before. The reply goes
//! back in the response as TwiML, so no second API call is needed. Each
//! `MessageSid` acts once (remembered here for a day, and in Redis as
//! `canarygate:sms:<MessageSid>` so a retry landing on another proxy does not act
//! again).
//!
//! Strangers cannot make it noisy: a number not allowed gets one notice to the team
//! per `[alerts] repeat_ms` (the rest are counted, and the next notice says how
//! many), and one reply per `repeat_ms`, at most [`REFUSED_REPLIES_PER_HOUR`] an hour
//! over all such numbers (each reply is an SMS the account pays for); past that the
//! answer is an empty TwiML `<Response/>`, which sends nothing. Their text is quoted
//! in the notice cut to [`QUOTE_MAX_CHARS`], its control characters escaped.
//!
//! - [`command`], the pure half: form, command, TwiML, masked numbers.
//! - [`signature`], the `X-Twilio-Signature` check.

pub mod command;
pub mod signature;

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use tracing::{info, warn};

use crate::config::alerts::{TwilioConfig, secret};
use crate::config::{Config, FlagsConfig};
use crate::flags::store::{Conn, Store};
use crate::observe::admin::{last_minute, respond_with};
use crate::observe::events::{Level, Source};
use crate::ops::alerts::alert::{ellipsize, escape_controls};
use crate::ops::alerts::{Dispatcher, Severity};
use crate::ops::analysis::apply_locally;
use crate::ops::control::{self, Change, ControlError, Via};
use crate::state::AppState;
use command::{COMMAND_LABELS, Command, HELP, masked, parse_form, twiml};

/// Where Twilio posts.
pub const PATH: &str = "/twilio/sms";
/// The largest form body read. Twilio's parameters and a command fit in a few
/// hundred bytes; a 1,600-character message of emoji, percent-encoded, in 19 KB.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a `MessageSid` is remembered.
const REMEMBER: Duration = Duration::from_secs(24 * 3600);
/// `MessageSid`s remembered here at most (the oldest go first).
const REMEMBER_MAX: usize = 4096;
/// The longest reply (Twilio's limit for one message body).
const REPLY_MAX_CHARS: usize = 1600;
/// The Redis key prefix of remembered `MessageSid`s.
const SEEN_KEY_PREFIX: &str = "canarygate:sms:";
/// Replies to numbers not allowed to command, per rolling hour over all of them.
pub const REFUSED_REPLIES_PER_HOUR: usize = 10;
/// Numbers not allowed that are remembered for throttling (the longest quiet go
/// first: a flood from more numbers than this is still throttled per hour).
const REFUSED_SENDERS_MAX: usize = 1024;
/// The longest part of a refused message quoted in the team's notice.
pub const QUOTE_MAX_CHARS: usize = 160;
/// The answer that sends nothing back.
const NO_REPLY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";
/// The reply a number not allowed gets (at most once per `repeat_ms`).
const REFUSAL: &str = "Sorry: this number may not command canarygate. Ask the on-call team to \
                       add it to allowed_numbers.";

/// Why a request was refused before any command was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("SMS commands are not configured here")]
    NotConfigured,
    #[error("only POST")]
    Method,
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("malformed form body: {0}")]
    Malformed(String),
    #[error("missing or wrong X-Twilio-Signature")]
    BadSignature,
    #[error("AccountSid is not this account's")]
    WrongAccount,
}

impl Rejection {
    pub const fn status(&self) -> StatusCode {
        match self {
            Self::NotConfigured => StatusCode::NOT_FOUND,
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge | Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::BadSignature | Self::WrongAccount => StatusCode::FORBIDDEN,
        }
    }

    /// The `result` label (the `command` is `none`), or `None` when not counted.
    const fn result(&self) -> Option<&'static str> {
        match self {
            Self::NotConfigured | Self::Method => None,
            Self::TooLarge | Self::Malformed(_) => Some("malformed"),
            Self::BadSignature | Self::WrongAccount => Some("bad_signature"),
        }
    }
}

/// Why a command could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("flags.redis_url: {0}")]
    Settings(String),
}

/// The flags' Redis for one message: connected at its first use and reused for the
/// rest of the message (the replay mark, the change, the reply), closed after it.
/// SMS commands are rare: nothing is kept open between messages.
struct MessageRedis<'a> {
    flags: &'a FlagsConfig,
    conn: Option<Conn>,
}

impl MessageRedis<'_> {
    /// The connection; `None` without a Redis configured.
    async fn conn(&mut self) -> Result<Option<&mut Conn>, CommandError> {
        let Some(url) = &self.flags.redis_url else {
            return Ok(None);
        };
        if self.conn.is_none() {
            let store = Store::open(url, self.flags).map_err(CommandError::Settings)?;
            self.conn = Some(store.connect().await?);
        }
        Ok(self.conn.as_mut())
    }
}

/// Serves `POST /twilio/sms`; shared by the listeners that route to it.
pub struct Sms {
    state: AppState,
    alerts: Dispatcher,
    instance: String,
    /// `MessageSid` -> when it was handled and the reply sent.
    seen: Mutex<HashMap<String, (Instant, String)>>,
    refusals: Mutex<Refusals>,
}

/// What has been said about numbers not allowed to command, to throttle it.
#[derive(Default)]
struct Refusals {
    /// Sender -> when the team was last told of it, and messages withheld since.
    senders: HashMap<String, (Instant, u64)>,
    /// When the replies of the last hour went out.
    replies: VecDeque<Instant>,
}

/// What to do about one refused message.
#[derive(Debug, PartialEq, Eq)]
struct Heard {
    /// Tell the team, with the count of this sender's messages withheld since the
    /// last notice; `None`: withheld.
    notice: Option<u64>,
    reply: bool,
}

impl Refusals {
    fn admit(&mut self, from: &str, repeat: Duration, now: Instant) -> Heard {
        let hour = Duration::from_secs(3600);
        while self
            .replies
            .front()
            .is_some_and(|at| now.duration_since(*at) >= hour)
        {
            self.replies.pop_front();
        }
        if let Some((at, withheld)) = self.senders.get_mut(from)
            && now.duration_since(*at) < repeat
        {
            *withheld += 1;
            return Heard {
                notice: None,
                reply: false,
            };
        }
        if !self.senders.contains_key(from)
            && self.senders.len() >= REFUSED_SENDERS_MAX
            && let Some(quietest) = self
                .senders
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
        {
            self.senders.remove(&quietest);
        }
        let withheld = self
            .senders
            .insert(from.to_owned(), (now, 0))
            .map_or(0, |(_, n)| n);
        let reply = self.replies.len() < REFUSED_REPLIES_PER_HOUR;
        if reply {
            self.replies.push_back(now);
        }
        Heard {
            notice: Some(withheld),
            reply,
        }
    }
}

/// What a command did.
struct Outcome {
    /// The `result` label: ok, invalid, failed.
    result: &'static str,
    reply: String,
    /// For the other channels, when something changed hands.
    audit: Option<String>,
}

impl Outcome {
    const fn new(result: &'static str, reply: String) -> Self {
        Self {
            result,
            reply,
            audit: None,
        }
    }
}

impl Sms {
    pub fn new(state: AppState, alerts: Dispatcher, instance: String) -> Arc<Self> {
        let counter = &state.metrics.sms_commands;
        for command in COMMAND_LABELS {
            counter.with_label_values(&[command, "ok"]);
        }
        for result in ["bad_signature", "malformed"] {
            counter.with_label_values(&["none", result]);
        }
        for what in ["notice", "reply"] {
            state
                .metrics
                .sms_refusals_withheld
                .with_label_values(&[what]);
        }
        Arc::new(Self {
            state,
            alerts,
            instance,
            seen: Mutex::new(HashMap::new()),
            refusals: Mutex::new(Refusals::default()),
        })
    }

    /// Answers a request to the dedicated listener (`inbound_listen`): [`PATH`], and
    /// 404 for anything else there.
    pub async fn respond_inbound<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if req.uri().path() == PATH {
            self.respond(req).await
        } else {
            respond_with(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                Bytes::from_static(b"404 not found\n"),
            )
        }
    }

    /// Answers one request to [`PATH`].
    pub async fn respond<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let config = Arc::clone(&self.state.snapshot().config);
        match self.check(&config, req).await {
            Ok((twilio, params)) => {
                let reply = self.obey(&config, twilio, &params).await;
                let body = if reply.is_empty() {
                    NO_REPLY.to_owned()
                } else {
                    twiml(&reply)
                };
                respond_with(StatusCode::OK, "text/xml; charset=utf-8", Bytes::from(body))
            }
            Err(rejection) => {
                if let Some(result) = rejection.result() {
                    self.count("none", result);
                    warn!(%rejection, "sms request refused");
                }
                let mut response = respond_with(
                    rejection.status(),
                    "text/plain; charset=utf-8",
                    Bytes::from(format!("{} {rejection}\n", rejection.status().as_u16())),
                );
                if rejection == Rejection::Method {
                    response
                        .headers_mut()
                        .insert(header::ALLOW, HeaderValue::from_static("POST"));
                }
                response
            }
        }
    }

    /// The request's parameters, once it is shown to come from Twilio.
    async fn check<'c, B>(
        &self,
        config: &'c Config,
        req: Request<B>,
    ) -> Result<(&'c TwilioConfig, Vec<(String, String)>), Rejection>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let twilio = config
            .alerts
            .twilio
            .as_ref()
            .filter(|t| t.inbound())
            .ok_or(Rejection::NotConfigured)?;
        let url = twilio.inbound_public_url.as_deref().unwrap_or_default();
        if req.method() != Method::POST {
            return Err(Rejection::Method);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return Err(Rejection::TooLarge);
        }
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';').next().is_some_and(|t| {
                    t.trim()
                        .eq_ignore_ascii_case("application/x-www-form-urlencoded")
                })
            });
        if !form {
            return Err(Rejection::Malformed(
                "Content-Type is not application/x-www-form-urlencoded".to_owned(),
            ));
        }
        let signature = req
            .headers()
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = Limited::new(req.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Rejection::TooLarge
                } else {
                    Rejection::Malformed(format!("body unreadable: {e}"))
                }
            })?
            .to_bytes();
        let params = parse_form(&body).map_err(|e| Rejection::Malformed(e.0))?;
        let token = secret(&twilio.auth_token_env);
        let signed = signature
            .is_some_and(|s| !token.is_empty() && signature::verify(&token, url, &params, &s));
        if !signed {
            return Err(Rejection::BadSignature);
        }
        if param(&params, "AccountSid") != twilio.account_sid {
            return Err(Rejection::WrongAccount);
        }
        if param(&params, "MessageSid").is_empty() {
            return Err(Rejection::Malformed("no MessageSid".to_owned()));
        }
        Ok((twilio, params))
    }

    /// Carries out a signed message once; the reply's text.
    async fn obey(
        &self,
        config: &Config,
        twilio: &TwilioConfig,
        params: &[(String, String)],
    ) -> String {
        let sid = param(params, "MessageSid");
        let from = param(params, "From").trim();
        let who = masked(from);
        let command = Command::parse(param(params, "Body"));
        let label = command.label();
        let mut redis = MessageRedis {
            flags: &config.flags,
            conn: None,
        };
        if let Some(earlier) = self.replayed(&mut redis, sid).await {
            info!(sid, command = label, from = %who, "sms replayed; not acted on again");
            self.count(label, "replayed");
            // A number not allowed had its one reply (or none, throttled): a
            // replay sends nothing more to it.
            if !twilio.allowed_numbers.iter().any(|n| n == from) {
                return String::new();
            }
            return earlier;
        }
        if !twilio.allowed_numbers.iter().any(|n| n == from) {
            warn!(sid, from = %who, "sms from a number not allowed to command");
            self.count(label, "refused");
            let reply = self.refused(config, from, &who, param(params, "Body"));
            self.remember(&mut redis, sid, &reply).await;
            return reply;
        }
        let outcome = self.carry_out(config, &mut redis, &command, &who).await;
        info!(sid, command = label, result = outcome.result, from = %who, "sms command");
        self.count(label, outcome.result);
        let level = match outcome.result {
            "ok" => Level::Info,
            _ => Level::Warn,
        };
        self.state.events.report(
            Source::Sms,
            level,
            "sms command",
            format_args!("{label} from {who}: {}", outcome.result),
        );
        if let Some(summary) = &outcome.audit {
            self.alerts.notify_except(
                Some("twilio"),
                Severity::Warning,
                "sms_command",
                summary,
                &format!("reply: {}", outcome.reply),
            );
        }
        let reply = ellipsize(outcome.reply, REPLY_MAX_CHARS);
        if outcome.result == "failed" {
            // Nothing was done: the same message may try again. (On a fresh
            // connection: the one that failed may be broken.)
            redis.conn = None;
            Self::seen_in_redis(&mut redis, sid, None).await;
        } else {
            self.remember(&mut redis, sid, &reply).await;
        }
        reply
    }

    /// A message from `from`, not allowed to command: the team is told (throttled
    /// per sender); the reply, or "" for none.
    fn refused(&self, config: &Config, from: &str, who: &str, body: &str) -> String {
        let repeat = Duration::from_millis(config.alerts.repeat_ms);
        let heard = lock(&self.refusals).admit(from, repeat, Instant::now());
        let withheld = &self.state.metrics.sms_refusals_withheld;
        match heard.notice {
            None => withheld.with_label_values(&["notice"]).inc(),
            Some(earlier) => {
                let mut summary =
                    format!("SMS command refused from {who} (not in allowed_numbers)");
                if earlier > 0 {
                    let _ = write!(summary, "; {earlier} more from it since the last notice");
                }
                self.state
                    .events
                    .report(Source::Sms, Level::Warn, "sms refused", &summary);
                let quoted = escape_controls(&ellipsize(body.to_owned(), QUOTE_MAX_CHARS));
                self.alerts.notify_except(
                    Some("twilio"),
                    Severity::Warning,
                    "sms_refused",
                    &summary,
                    &format!("message: {quoted}"),
                );
            }
        }
        if heard.reply {
            REFUSAL.to_owned()
        } else {
            withheld.with_label_values(&["reply"]).inc();
            String::new()
        }
    }

    async fn carry_out(
        &self,
        config: &Config,
        redis: &mut MessageRedis<'_>,
        command: &Command,
        who: &str,
    ) -> Outcome {
        // The same change as `canarygate canary ...` (`control`): levers, record
        // and count in one transaction.
        let change = match command {
            Command::Ack(id) => return self.ack(id, who),
            Command::Status => return Outcome::new("ok", self.status()),
            Command::Invalid(_, reason) | Command::Help(reason) => {
                return Outcome::new("invalid", format!("{reason}. {HELP}"));
            }
            Command::Rollback => Change::Rollback,
            Command::Percent(percent) => Change::Set(*percent),
            Command::Switch(on) => Change::Switch(*on),
        };
        let why = change.summary(Via::Sms, who);
        let switch_off = !self.state.snapshot().flags.set.canary_enabled;
        match self.change(config, redis, change, &why).await {
            Err(error) => {
                warn!(%error, "sms command failed");
                Outcome::new(
                    "failed",
                    format!("Failed, nothing changed: {error}. Try again, or use redis-cli."),
                )
            }
            Ok(everywhere) => {
                let reply = match command {
                    Command::Rollback => format!(
                        "Rolled back: canary_percent 0 {everywhere}. The analysis will not undo \
                         it (canary_auto off); CANARY <n> or canary_auto on to resume."
                    ),
                    Command::Percent(percent) if switch_off => format!(
                        "canary_percent {percent} {everywhere} (canary_auto off). The kill switch \
                         is off: no canary traffic until CANARY ON."
                    ),
                    Command::Percent(percent) => {
                        format!("canary_percent {percent} {everywhere} (canary_auto off).")
                    }
                    Command::Switch(on) => format!(
                        "Canary {} {everywhere} (canary_auto off).",
                        if *on { "on" } else { "off" }
                    ),
                    Command::Ack(_) | Command::Status | Command::Invalid(..) | Command::Help(_) => {
                        String::new()
                    }
                };
                Outcome {
                    result: "ok",
                    reply,
                    audit: Some(why),
                }
            }
        }
    }

    /// `ACK <id>`: silences the repeats of this process's firing alert `id`.
    fn ack(&self, id: &str, who: &str) -> Outcome {
        match self.alerts.ack(id) {
            Some((kind, summary)) => Outcome {
                result: "ok",
                reply: format!(
                    "Acknowledged {id} ({kind}: {summary}). No repeats until it resolves."
                ),
                audit: Some(format!(
                    "alert {id} ({kind}) acknowledged by SMS from {who}"
                )),
            },
            None => Outcome::new(
                "invalid",
                format!(
                    "No firing alert {id} on {}. (Ids are in the alert messages.)",
                    self.instance
                ),
            ),
        }
    }

    /// Writes the change ([`control::write`]: levers, record, count in one
    /// transaction); without Redis, this instance's flags only, counted here. Where
    /// it took effect.
    async fn change(
        &self,
        config: &Config,
        redis: &mut MessageRedis<'_>,
        change: Change,
        reason: &str,
    ) -> Result<&'static str, CommandError> {
        let Some(conn) = redis.conn().await? else {
            apply_locally(&self.state, &change.levers());
            self.state
                .metrics
                .canary_commands
                .with_label_values(&[change.label(), Via::Sms.as_str()])
                .inc();
            return Ok("on this proxy (no Redis configured)");
        };
        control::write(
            conn,
            &config.flags.key,
            &config.analysis.redis_key,
            change,
            Via::Sms,
            reason,
            &self.instance,
        )
        .await
        .map_err(|e| match e {
            ControlError::Redis(e) => CommandError::Redis(e),
            other => CommandError::Settings(other.to_string()),
        })?;
        Ok("on every proxy (Redis)")
    }

    /// The split, both pools, the analysis and the flags, as this proxy sees them.
    fn status(&self) -> String {
        let snapshot = self.state.snapshot();
        let flags = &snapshot.flags;
        let configured = snapshot.config.routing.canary_percent;
        let (_, secs, windows) = last_minute(&self.state);
        let mut text = format!(
            "canarygate {}\nsplit: canary {}% (config {configured}%, canary {})",
            self.instance,
            flags.effective_percent(configured),
            if flags.set.canary_enabled {
                "on"
            } else {
                "off"
            },
        );
        for (name, w) in ["production", "canary"].iter().zip(&windows) {
            let p99 = w
                .p99_s
                .map_or_else(|| "-".to_owned(), |s| format!("{:.0} ms", s * 1000.0));
            let _ = write!(
                text,
                "\n{name}: {:.1} req/s, 5xx {:.2}%, p99 {p99}",
                w.rate_per_s,
                w.error_ratio * 100.0
            );
        }
        let _ = write!(text, " (last {secs:.0} s)");
        let view = self.state.analysis.view();
        let analysis = match (view.enabled, view.state) {
            (false, _) => "off".to_owned(),
            (true, None) => "starting".to_owned(),
            (true, Some(state)) if view.record.reason.is_empty() => state.as_str().to_owned(),
            (true, Some(state)) => format!("{}: {}", state.as_str(), view.record.reason),
        };
        let _ = write!(text, "\nanalysis: {analysis}\nflags v{}:", flags.version);
        if flags.set.values.is_empty() {
            text.push_str(" none");
        }
        for (name, value) in &flags.set.values {
            let _ = write!(text, " {name}={}", value.as_str());
        }
        text
    }

    /// The reply given to `sid` before, if it was handled (here, or by any proxy on
    /// the same Redis); otherwise claims it.
    async fn replayed(&self, redis: &mut MessageRedis<'_>, sid: &str) -> Option<String> {
        {
            let mut seen = lock(&self.seen);
            seen.retain(|_, (at, _)| at.elapsed() < REMEMBER);
            if let Some((_, reply)) = seen.get(sid) {
                return Some(reply.clone());
            }
        }
        let claimed: Result<Option<String>, CommandError> = async {
            let Some(conn) = redis.conn().await? else {
                return Ok(None);
            };
            let key = format!("{SEEN_KEY_PREFIX}{sid}");
            // SET NX GET: the earlier value if there was one, and claims it if not.
            let (won, earlier): (Option<String>, Option<String>) = redis::pipe()
                .cmd("SET")
                .arg(&key)
                .arg("")
                .arg("NX")
                .arg("EX")
                .arg(REMEMBER.as_secs())
                .cmd("GET")
                .arg(&key)
                .query_async(conn)
                .await?;
            Ok(won.is_none().then(|| {
                earlier
                    .filter(|r| !r.is_empty())
                    .unwrap_or_else(|| "Already being handled.".to_owned())
            }))
        }
        .await;
        claimed.unwrap_or_else(|error| {
            // Remembered here all the same; a state change needs Redis and says so.
            warn!(%error, "sms: cannot check MessageSid in Redis");
            None
        })
    }

    async fn remember(&self, redis: &mut MessageRedis<'_>, sid: &str, reply: &str) {
        {
            let mut seen = lock(&self.seen);
            if seen.len() >= REMEMBER_MAX
                && let Some(oldest) = seen
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone())
            {
                seen.remove(&oldest);
            }
            seen.insert(sid.to_owned(), (Instant::now(), reply.to_owned()));
        }
        Self::seen_in_redis(redis, sid, Some(reply)).await;
    }

    /// Stores the reply for `sid` in Redis, or drops the claim (`None`).
    async fn seen_in_redis(redis: &mut MessageRedis<'_>, sid: &str, reply: Option<&str>) {
        let key = format!("{SEEN_KEY_PREFIX}{sid}");
        let result: Result<(), CommandError> = async {
            let Some(conn) = redis.conn().await? else {
                return Ok(());
            };
            let mut cmd = redis::cmd(if reply.is_some() { "SET" } else { "DEL" });
            cmd.arg(&key);
            if let Some(reply) = reply {
                cmd.arg(reply).arg("EX").arg(REMEMBER.as_secs());
            }
            let _: redis::Value = cmd.query_async(conn).await?;
            Ok(())
        }
        .await;
        if let Err(error) = result {
            warn!(%error, "sms: cannot store MessageSid in Redis");
        }
    }

    fn count(&self, command: &str, result: &str) {
        self.state
            .metrics
            .sms_commands
            .with_label_values(&[command, result])
            .inc();
    }
}

/// The first value of `name`, or "".
fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_once_per_repeat_and_replies_capped_per_hour() {
        let mut refusals = Refusals::default();
        let repeat = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let told = |n| Heard {
            notice: Some(n),
            reply: true,
        };
        let quiet = Heard {
            notice: None,
            reply: false,
        };
        assert_eq!(refusals.admit("+1", repeat, at(0)), told(0));
        assert_eq!(refusals.admit("+1", repeat, at(1)), quiet);
        assert_eq!(refusals.admit("+1", repeat, at(59)), quiet);
        // A new window: told again, with the count of what was withheld.
        assert_eq!(refusals.admit("+1", repeat, at(60)), told(2));
        // Many senders: each is told once, but replies stop at the hourly cap.
        let mut replies = 2;
        for n in 0..30 {
            let heard = refusals.admit(&format!("+2{n}"), repeat, at(61));
            assert_eq!(heard.notice, Some(0));
            replies += usize::from(heard.reply);
        }
        assert_eq!(replies, REFUSED_REPLIES_PER_HOUR);
        // An hour after the first replies, there is room again.
        assert!(refusals.admit("+3", repeat, at(3600)).reply);
    }
}
