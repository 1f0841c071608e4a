//! Alerts to humans: one [`Alert`] value, one [`Dispatcher`] that fans it out to
//! every configured channel (Twilio SMS, email, Alertmanager, webhook), and the
//! noise control Alertmanager taught operators to expect (a kind that keeps firing
//! is sent once, then at most every `repeat_ms`; one resolved message when it
//! clears; an hourly SMS cap).
//!
//! Every part that needs a human sends through here: the proxy's resource watch
//! today, canary analysis, the doctor and maintenance later (each process runs its
//! own dispatcher from the same `[alerts]` config). Sending never happens on the
//! request path, and a slow or dead channel never holds up the caller or the other
//! channels: each channel has its own bounded queue and task ([`dispatch`]).
//!
//! - [`alert`]: the value (id, severity, kind, summary, details, host, instance,
//!   time, state) and its renderings.
//! - `[alerts]` and its channel tables live in [`crate::config::alerts`]; secrets
//!   are named, never written (an environment variable that is not set is a
//!   config error).
//! - [`dispatch`]: noise control, per-channel queues, retries, metrics, events.
//! - [`channels`]: what each channel sends, over HTTP (reqwest) or SMTP (lettre).

pub mod alert;
pub mod channels;
pub mod dispatch;

pub use crate::config::alerts::AlertsConfig;
pub use alert::{Alert, AlertState, Severity};
pub use dispatch::Dispatcher;
