//! What "disk used" means, once for every process: `df`'s figure, used over used
//! plus available (`f_blocks - f_bfree` over that plus `f_bavail`), i.e. the share
//! of what an unprivileged writer can have that is taken. The blocks reserved for
//! root count neither way. The proxy's resource watch
//! (`canarygate_host_disk_used_ratio`, the `disk_full` alert), maintenance's own
//! reading (`canarygate_maintenance_disk_used_ratio`, `disk_percent`,
//! `target_percent`, `critical_percent`) and every threshold compare this one
//! figure. It used to be two: the proxy said total minus available over total, 76%
//! on a filesystem with a large reserve where `df` and maintenance said 34%, so a
//! threshold meant different things in the two processes.

use std::path::Path;

use rustix::fs::{stat, statvfs};
use rustix::io::Errno;

/// A filesystem's usage as `df` counts it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// The device of the filesystem (`st_dev` of the path; its files share it).
    pub dev: u64,
    /// Bytes in use (`f_blocks - f_bfree`, reserved blocks not counted as free).
    pub used: u64,
    /// `used` plus the bytes an unprivileged writer may still take (`f_bavail`).
    pub total_for_users: u64,
}

impl Usage {
    /// The filesystem holding `path` (which must exist), by `statvfs`.
    pub fn read(path: &Path) -> Result<Self, Errno> {
        let dev = stat(path)?.st_dev;
        let v = statvfs(path)?;
        let unit = if v.f_frsize > 0 {
            v.f_frsize
        } else {
            v.f_bsize
        };
        let used = v.f_blocks.saturating_sub(v.f_bfree).saturating_mul(unit);
        let total_for_users = used.saturating_add(v.f_bavail.saturating_mul(unit));
        Ok(Self {
            dev,
            used,
            total_for_users,
        })
    }

    pub fn new(dev: u64, used: u64, total_for_users: u64) -> Self {
        Self {
            dev,
            used,
            total_for_users,
        }
    }

    /// Used share, 0..=1 (0 for a filesystem with nothing to give, like /proc).
    pub fn ratio(&self) -> f64 {
        used_ratio(self.used, self.total_for_users)
    }

    /// Used share in percent, as `df` shows it (before its rounding up).
    pub fn percent(&self) -> f64 {
        self.ratio() * 100.0
    }

    /// Bytes to free to be at or below `percent`.
    pub fn to_free(&self, percent: f64) -> u64 {
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let allowed = (self.total_for_users as f64 * percent / 100.0).floor() as u64;
        self.used.saturating_sub(allowed)
    }
}

/// `used / (used + available)`, clamped to 0..=1: the one definition.
pub fn used_ratio(used: u64, total_for_users: u64) -> f64 {
    if total_for_users == 0 {
        return 0.0;
    }
    // Byte counts below 2^53 (8 PiB) convert exactly.
    #[allow(clippy::cast_precision_loss)]
    let r = used as f64 / total_for_users as f64;
    r.clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_as_df_does() {
        // 100 units for users, 90 used: 90%; down to 70% frees 20.
        let u = Usage {
            dev: 1,
            used: 90,
            total_for_users: 100,
        };
        assert!((u.percent() - 90.0).abs() < 1e-9);
        assert_eq!(u.to_free(70.0), 20);
        assert_eq!(u.to_free(95.0), 0);
        assert!(used_ratio(0, 0).abs() < f64::EPSILON);
        assert!((used_ratio(5, 4) - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn this_hosts_root_reads_between_zero_and_one() {
        let u = Usage::read(Path::new("/")).unwrap();
        assert!(u.ratio() > 0.0 && u.ratio() <= 1.0, "{u:?}");
    }
}
