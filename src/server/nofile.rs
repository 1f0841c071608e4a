//! The descriptor limit the proxy needs, raised at start. systemd's default soft
//! `RLIMIT_NOFILE` is 1024 while the default `max_connections` is 10,000: under it
//! the proxy answered 1,006 of 3,000 held keep-alive clients and then timed every
//! new one out (issue 29). The hard limit is the operator's ceiling and the soft one
//! only a default, so, as Go's runtime does at start, the soft limit is raised
//! (here to what `max_connections` needs, at most the hard limit). A hard limit
//! below the need cannot be raised without privilege: `run` logs it at warn and
//! `check` prints it.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept beside the connections: listeners (one per worker), Redis,
/// the access log, health checks, pooled upstream connections beyond one per client.
pub const SPARE: u64 = 1024;

/// What one start did to the soft limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nofile {
    /// Descriptors `max_connections` needs: a client and an upstream connection
    /// each, and [`SPARE`].
    pub needed: u64,
    /// The soft limit before and after (`None`: unlimited).
    pub before: Option<u64>,
    pub after: Option<u64>,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

impl Nofile {
    /// Whether the hard limit is below what is needed (only root can raise it:
    /// `LimitNOFILE=` in the unit, or `ulimit -Hn` before start).
    pub fn hard_too_low(&self) -> bool {
        self.hard.is_some_and(|hard| hard < self.needed)
    }

    /// The connections the limit in force can hold, roughly.
    pub fn connections_held(&self) -> Option<u64> {
        self.after.map(|soft| soft.saturating_sub(SPARE) / 2)
    }
}

/// Descriptors for `max_connections` client connections.
pub fn needed(max_connections: u32) -> u64 {
    u64::from(max_connections) * 2 + SPARE
}

/// The limits as they are, without changing them (`canarygate check`).
pub fn inspect(max_connections: u32) -> Nofile {
    let limit = getrlimit(Resource::Nofile);
    Nofile {
        needed: needed(max_connections),
        before: limit.current,
        after: limit.current,
        hard: limit.maximum,
    }
}

/// Raises the soft limit to what `max_connections` needs, at most the hard limit;
/// never lowers it.
pub fn raise(max_connections: u32) -> std::io::Result<Nofile> {
    let mut nofile = inspect(max_connections);
    let target = nofile
        .hard
        .map_or(nofile.needed, |hard| hard.min(nofile.needed));
    if nofile.before.is_some_and(|soft| soft < target) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: nofile.hard,
            },
        )?;
        nofile.after = getrlimit(Resource::Nofile).current;
    }
    Ok(nofile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_and_what_a_limit_holds() {
        assert_eq!(needed(10_000), 21_024);
        let at = |soft, hard| Nofile {
            needed: needed(10_000),
            before: Some(1024),
            after: Some(soft),
            hard: Some(hard),
        };
        assert!(at(4096, 4096).hard_too_low());
        assert_eq!(at(4096, 4096).connections_held(), Some(1536));
        assert!(!at(21_024, 524_288).hard_too_low());
        let unlimited = Nofile {
            hard: None,
            ..at(21_024, 0)
        };
        assert!(!unlimited.hard_too_low());
    }
}
