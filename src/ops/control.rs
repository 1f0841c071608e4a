//! Canary controls: the one code path by which an operator moves the rollout, by
//! SMS (`ROLLBACK`, `CANARY n`, `CANARY ON|OFF`, in the proxy) or from a shell
//! (`canarygate canary set|pause|resume|rollback|promote`, a process of its own).
//!
//! A change is one Redis transaction (`MULTI`): the reserved flags, the analysis
//! record (`state`, `reason`, `at`, `instance`) and a count in the hash
//! `<analysis.redis_key>:commands` (field `<command>:<source>`). The flags and the
//! record together, so the analysis, whose writes compare the record first, cannot
//! undo an operator with a write it prepared before; the count with them, because
//! the CLI lives for a tenth of a second and nobody scrapes it: every proxy reads
//! the count back on its fleet round and exports the fleet's total as
//! `canarygate_canary_commands_total{command,source}` (the same figure on every
//! proxy: `max`, not `sum`, across instances), and logs each new one as an event.
//! The count's key shares the record key's hash tag, so a Redis Cluster keeps the
//! transaction on one slot as it does the flags and the record.
//!
//! Every change but `resume` takes the levers from the analysis (`canary_auto off`,
//! as after its own rollback); `resume` (`canary_auto on`) hands them back, and the
//! analysis starts again at its next round. `pause` moves nothing: the analysis
//! keeps judging and alerts if the canary fails while paused, but no longer steps
//! or rolls back.

use std::collections::HashMap;
use std::fmt;

use crate::config::Config;
use crate::config::alerts::Severity;
use crate::flags::model::{CANARY, CANARY_AUTO, CANARY_PERCENT};
use crate::flags::store::{Conn, Store};
use crate::ops::alerts::Alert;
use crate::ops::alerts::alert::{hostname, now_rfc3339};

/// The alert kind of an operator's change (the audit, to every channel).
pub const AUDIT_ALERT: &str = "canary_command";

/// Why a change was not made.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A bad argument (exit 64).
    #[error("{0}")]
    Usage(String),
    /// No Redis, or a `flags.redis_url` that cannot be used (exit 64).
    #[error("flags.redis_url: {0}")]
    Settings(String),
    /// Redis did not answer or refused the transaction (exit 69): nothing changed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// `canary_percent` to this share (0..=100).
    Set(u8),
    /// The kill switch, `canary on|off`.
    Switch(bool),
    /// `canary_auto off`: nothing moves; the analysis judges on.
    Pause,
    /// `canary_auto on`: the analysis takes the levers back.
    Resume,
    /// `canary_percent 0`.
    Rollback,
    /// `canary_percent 100`.
    Promote,
}

/// Who asked (the `source` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    Sms,
    Cli,
}

impl Via {
    pub const ALL: [Self; 2] = [Self::Sms, Self::Cli];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Sms => "sms",
            Self::Cli => "cli",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sms => "SMS",
            Self::Cli => "the CLI",
        })
    }
}

impl Change {
    /// Every change, for the metric's labels.
    pub const ALL: [Self; 7] = [
        Self::Set(0),
        Self::Switch(true),
        Self::Switch(false),
        Self::Pause,
        Self::Resume,
        Self::Rollback,
        Self::Promote,
    ];

    /// A share as an operator writes it: a whole number from 0 to 100.
    pub fn percent(text: &str) -> Result<u8, ControlError> {
        match text.trim().parse::<u8>() {
            Ok(p) if p <= 100 => Ok(p),
            _ => Err(ControlError::Usage(format!(
                "the canary percent is a whole number from 0 to 100, not {text:?}"
            ))),
        }
    }

    /// The `command` label of `canarygate_canary_commands_total`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Set(_) => "set",
            Self::Switch(true) => "switch_on",
            Self::Switch(false) => "switch_off",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Rollback => "rollback",
            Self::Promote => "promote",
        }
    }

    fn parse_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.label() == label)
    }

    /// The reserved flags it writes.
    pub fn levers(self) -> Vec<(&'static str, String)> {
        let auto_off = (CANARY_AUTO, "off".to_owned());
        match self {
            Self::Set(p) => vec![(CANARY_PERCENT, p.to_string()), auto_off],
            Self::Switch(on) => vec![(CANARY, if on { "on" } else { "off" }.to_owned()), auto_off],
            Self::Pause => vec![auto_off],
            Self::Resume => vec![(CANARY_AUTO, "on".to_owned())],
            Self::Rollback => vec![(CANARY_PERCENT, "0".to_owned()), auto_off],
            Self::Promote => vec![(CANARY_PERCENT, "100".to_owned()), auto_off],
        }
    }

    /// The record's new `state`; `None` leaves the record alone (`resume`: the
    /// analysis writes its own at its next round, and a record it is in charge of
    /// must not look manual, or it would start over at the first step).
    const fn record_state(self) -> Option<&'static str> {
        match self {
            Self::Rollback => Some("rolled_back"),
            Self::Resume => None,
            Self::Set(_) | Self::Switch(_) | Self::Pause | Self::Promote => Some("manual"),
        }
    }

    /// The audit's summary and the record's reason.
    pub fn summary(self, via: Via, who: &str) -> String {
        match self {
            Self::Set(p) => format!("canary_percent {p} set by {via} from {who}"),
            Self::Switch(on) => format!(
                "canary switched {} by {via} from {who}",
                if on { "on" } else { "off" }
            ),
            Self::Pause => format!("canary analysis paused by {via} from {who}"),
            Self::Resume => format!("canary analysis resumed by {via} from {who}"),
            Self::Rollback => format!("canary rolled back by {via} from {who}"),
            Self::Promote => format!("canary promoted to 100% by {via} from {who}"),
        }
    }
}

/// The hash counting operators' changes, next to the record (same hash tag).
pub fn counts_key(record_key: &str) -> String {
    format!("{record_key}:commands")
}

/// What the transaction found beside what it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The kill switch as it is after the change (`canary` absent: on).
    pub switch_on: bool,
}

/// Writes `change` in one transaction: the levers in `flags_key`, the record in
/// `record_key` (`reason`, `at`, `instance`), the count; reads the kill switch.
pub async fn write(
    conn: &mut Conn,
    flags_key: &str,
    record_key: &str,
    change: Change,
    via: Via,
    reason: &str,
    instance: &str,
) -> Result<Written, ControlError> {
    let mut pipe = redis::pipe();
    pipe.atomic()
        .hset_multiple(flags_key, &change.levers())
        .ignore();
    if let Some(state) = change.record_state() {
        let record = [
            ("state", state.to_owned()),
            ("reason", reason.to_owned()),
            ("at", now_rfc3339()),
            ("instance", instance.to_owned()),
        ];
        pipe.hset_multiple(record_key, &record).ignore();
    }
    pipe.cmd("HINCRBY")
        .arg(counts_key(record_key))
        .arg(format!("{}:{}", change.label(), via.as_str()))
        .arg(1)
        .ignore()
        .cmd("HGET")
        .arg(flags_key)
        .arg(CANARY);
    let (switch,): (Option<String>,) = pipe.query_async(conn).await?;
    Ok(Written {
        switch_on: switch.is_none_or(|s| !s.trim().eq_ignore_ascii_case("off")),
    })
}

/// The fleet's counts of operators' changes, as [`write()`] keeps them: (command,
/// source, count); fields this version does not know are left out.
pub async fn read_counts(
    conn: &mut Conn,
    record_key: &str,
) -> Result<Vec<(Change, Via, u64)>, redis::RedisError> {
    let raw: HashMap<String, u64> = redis::cmd("HGETALL")
        .arg(counts_key(record_key))
        .query_async(conn)
        .await?;
    Ok(raw
        .into_iter()
        .filter_map(|(field, n)| {
            let (command, source) = field.split_once(':')?;
            Some((Change::parse_label(command)?, Via::parse(source)?, n))
        })
        .collect())
}

/// What `canarygate canary <change>` did, for its output.
#[derive(Debug)]
pub struct Done {
    /// For the operator (stdout).
    pub message: String,
    /// Channels the audit alert did not reach, with why (stderr; the change stands).
    pub alert_failures: Vec<String>,
}

/// `canarygate canary set|pause|resume|rollback|promote`: the change in Redis,
/// then the audit alert to every configured channel (as SMS commands send it).
pub async fn from_cli(config: &Config, change: Change) -> Result<Done, ControlError> {
    let url = config.flags.redis_url.as_deref().ok_or_else(|| {
        ControlError::Settings(
            "not set: without Redis each proxy keeps its own levers (SMS or its config)".to_owned(),
        )
    })?;
    let store = Store::open(url, &config.flags).map_err(ControlError::Settings)?;
    let mut conn = store.connect().await?;
    let who = operator();
    let instance = format!("cli@{}", hostname());
    let summary = change.summary(Via::Cli, &who);
    let written = write(
        &mut conn,
        &config.flags.key,
        &config.analysis.redis_key,
        change,
        Via::Cli,
        &summary,
        &instance,
    )
    .await?;
    let message = message(change, written);
    tracing::info!(
        command = change.label(),
        source = Via::Cli.as_str(),
        who = %who,
        "canary command applied"
    );
    let alert = Alert::firing(
        Severity::Warning,
        AUDIT_ALERT,
        &summary,
        &message,
        &instance,
    );
    let alert_failures = crate::ops::alerts::dispatch::send_now(&config.alerts, &alert)
        .await
        .into_iter()
        .map(|(channel, error)| format!("{channel}: {error}"))
        .collect();
    Ok(Done {
        message,
        alert_failures,
    })
}

/// Who runs the CLI, as the audit names them: the login behind `sudo`, or the user.
fn operator() -> String {
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{user}@{}", hostname())
}

/// What a change means for the operator, and what comes next.
pub fn message(change: Change, written: Written) -> String {
    let everywhere = "on every proxy (Redis)";
    let switch_off = if written.switch_on {
        ""
    } else {
        " The kill switch is off (canary off): no canary traffic until it is on."
    };
    match change {
        Change::Set(p) => format!("canary_percent {p} {everywhere} (canary_auto off).{switch_off}"),
        Change::Switch(on) => format!(
            "Canary {} {everywhere} (canary_auto off).",
            if on { "on" } else { "off" }
        ),
        Change::Pause => format!(
            "Paused {everywhere}: canary_auto off. The analysis judges on and alerts, but moves \
             nothing; `canarygate canary resume` hands it back."
        ),
        Change::Resume => format!(
            "Resumed {everywhere}: canary_auto on. The analysis takes the levers at its next \
             round (from its first step, if it has steps).{switch_off}"
        ),
        Change::Rollback => format!(
            "Rolled back: canary_percent 0 {everywhere}. The analysis will not undo it \
             (canary_auto off); `canarygate canary resume` or `set <n>` to go on."
        ),
        Change::Promote => format!(
            "Promoted: canary_percent 100 {everywhere} (canary_auto off): every user on the \
             canary pool.{switch_off} Next: deploy the canary's release to the production pool, \
             then `canarygate canary set 0`."
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percents_are_whole_numbers_to_100() {
        assert_eq!(Change::percent("0").unwrap(), 0);
        assert_eq!(Change::percent(" 100 ").unwrap(), 100);
        for bad in ["101", "-1", "5.5", "five", ""] {
            let error = Change::percent(bad).unwrap_err().to_string();
            assert!(error.contains("0 to 100"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn every_change_but_resume_takes_the_levers() {
        for change in Change::ALL {
            let levers = change.levers();
            let auto = levers
                .iter()
                .find(|(k, _)| *k == CANARY_AUTO)
                .map(|(_, v)| v.as_str());
            let expected = if change == Change::Resume {
                "on"
            } else {
                "off"
            };
            assert_eq!(auto, Some(expected), "{change:?}");
            assert_eq!(
                Change::parse_label(change.label()).map(Change::label),
                Some(change.label())
            );
        }
        assert_eq!(Change::Resume.record_state(), None);
        assert_eq!(Change::Rollback.record_state(), Some("rolled_back"));
        assert_eq!(
            Change::Pause.levers(),
            vec![(CANARY_AUTO, "off".to_owned())]
        );
    }
}
