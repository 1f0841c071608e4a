//! `[analysis]`: the canary analysis' settings, declared beside the judge and the
//! verdict that read them (validation, with file, line and key, is the config's:
//! `config::analysis`). Off unless `enabled = true`.

use serde::Deserialize;

use super::clients::ClientLimit;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisConfig {
    pub enabled: bool,
    /// A check every `interval_ms`, over the last `window_ms` of requests.
    pub interval_ms: u64,
    pub window_ms: u64,
    /// Fewer requests than this in either pool's window: hold, no verdict.
    pub min_requests: u64,
    /// The error rule: the canary fails when the sequential test finds its error
    /// ratio at least `max_error_ratio_factor` times production's and at least
    /// `min_error_ratio_delta` above it, at `confidence`.
    pub max_error_ratio_factor: f64,
    pub min_error_ratio_delta: f64,
    /// Retired with the absolute rule (issue 31): still read so that a config that
    /// sets it is refused with its line and the keys that replace it, rather than
    /// as an unknown key.
    pub max_error_ratio_delta: Option<f64>,
    pub confidence: f64,
    /// The latency rule: canary p99 above production's p99 times this and plus
    /// `min_latency_delta_ms`.
    pub max_latency_ratio: f64,
    pub min_latency_delta_ms: u64,
    /// Failed checks in a row that roll back.
    pub failure_threshold: u32,
    /// Progressive rollout: canary percents, each held `step_ms` with passing checks.
    pub steps: Vec<u8>,
    pub step_ms: u64,
    /// The Redis hash of the shared verdict (beside `flags.key`, on the same Redis).
    pub redis_key: String,
    /// The most one client counts for, as a share of both pools' judged requests
    /// per slot ([`super::clients`]); 1 turns the cap off.
    pub max_client_share: f64,
    /// What a client is for that cap: its sticky key, its address, or both.
    pub client_keys: Vec<ClientKey>,
}

/// An identity the per-client cap counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientKey {
    /// The sticky key the bucket came from (the signed cookie's id, or the header).
    Sticky,
    /// The client's address (its /64 for IPv6).
    Address,
}

impl AnalysisConfig {
    /// The per-client cap these settings ask for.
    pub fn client_limit(&self) -> ClientLimit {
        ClientLimit {
            share: self.max_client_share,
            sticky: self.client_keys.contains(&ClientKey::Sticky),
            address: self.client_keys.contains(&ClientKey::Address),
        }
    }
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval_ms: 10_000,
            window_ms: 120_000,
            min_requests: 100,
            max_error_ratio_factor: 2.0,
            min_error_ratio_delta: 0.005,
            max_error_ratio_delta: None,
            confidence: 0.99,
            max_latency_ratio: 1.5,
            min_latency_delta_ms: 50,
            failure_threshold: 2,
            steps: Vec::new(),
            step_ms: 60_000,
            redis_key: "canarygate:analysis".to_owned(),
            max_client_share: 0.01,
            client_keys: vec![ClientKey::Sticky, ClientKey::Address],
        }
    }
}
