//! Which files a round archives, and why: a pure decision on what the scan saw, so
//! it is tested exactly. Per filesystem above `disk_percent`: the oldest candidates
//! first, until what they hold would bring it under `target_percent`; anywhere: a
//! candidate holding more than `max_file_bytes`. Files waiting out a backoff after
//! a failure are not picked.

use std::collections::HashMap;
use std::fmt;
use std::time::SystemTime;

use super::files::Usage;

/// One candidate as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    /// The filesystem (device) it is on.
    pub dev: u64,
    /// Bytes on disk (what archiving can free, about).
    pub allocated: u64,
    pub modified: SystemTime,
    /// Waiting after a failed attempt.
    pub waiting: bool,
}

/// Why a file is archived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Why {
    /// Its filesystem is at this percent, above `disk_percent`.
    Disk { used_percent: f64 },
    /// It holds more than `max_file_bytes`.
    Big { allocated: u64 },
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Disk { used_percent } => {
                write!(f, "its filesystem is {used_percent:.1}% used")
            }
            Self::Big { allocated } => write!(f, "it holds {allocated} bytes on disk"),
        }
    }
}

/// The thresholds of `[maintenance]` the planner uses.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub disk_percent: f64,
    pub target_percent: f64,
    pub max_file_bytes: u64,
}

/// The picks, in the order to archive them: indexes into `items`, with why.
pub fn plan(items: &[Item], usage: &HashMap<u64, Usage>, limits: Limits) -> Vec<(usize, Why)> {
    let mut order: Vec<usize> = (0..items.len())
        .filter(|&i| !items[i].waiting && items[i].allocated > 0)
        .collect();
    order.sort_by_key(|&i| (items[i].modified, i));
    let mut picks = Vec::new();
    let mut to_free: HashMap<u64, (u64, f64)> = usage
        .values()
        .filter(|u| u.percent() > limits.disk_percent)
        .map(|u| (u.dev, (u.to_free(limits.target_percent), u.percent())))
        .collect();
    for &i in &order {
        let item = items[i];
        match to_free.get_mut(&item.dev) {
            Some((need, used_percent)) if *need > 0 => {
                *need = need.saturating_sub(item.allocated);
                picks.push((
                    i,
                    Why::Disk {
                        used_percent: *used_percent,
                    },
                ));
            }
            _ if item.allocated > limits.max_file_bytes => picks.push((
                i,
                Why::Big {
                    allocated: item.allocated,
                },
            )),
            _ => {}
        }
    }
    picks
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn item(dev: u64, allocated: u64, age_s: u64) -> Item {
        Item {
            dev,
            allocated,
            modified: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
            waiting: false,
        }
    }

    const LIMITS: Limits = Limits {
        disk_percent: 85.0,
        target_percent: 70.0,
        max_file_bytes: 500,
    };

    #[test]
    fn a_full_filesystem_gives_up_its_oldest_files_until_under_target() {
        // Device 1: 90 of 100 used, 20 to free; device 2: 50% used.
        let usage = HashMap::from([(1, Usage::new(1, 90, 100)), (2, Usage::new(2, 50, 100))]);
        let items = [
            item(1, 5, 10),  // newest on 1
            item(1, 15, 30), // oldest on 1
            item(1, 4, 20),
            item(2, 50, 99), // old, but its filesystem is fine
            item(1, 7, 15),
        ];
        let picks = plan(&items, &usage, LIMITS);
        let disk = Why::Disk { used_percent: 90.0 };
        // 15 + 4 = 19 < 20, + 7 = 26: three files, oldest first; the newest stays.
        assert_eq!(picks, [(1, disk), (2, disk), (4, disk)]);
    }

    #[test]
    fn big_files_go_anywhere_and_waiting_or_empty_files_never() {
        let usage = HashMap::from([(1, Usage::new(1, 10, 100))]);
        let mut waiting = item(1, 900, 50);
        waiting.waiting = true;
        let items = [item(1, 501, 5), item(1, 500, 6), waiting, item(1, 0, 70)];
        assert_eq!(
            plan(&items, &usage, LIMITS),
            [(0, Why::Big { allocated: 501 })]
        );
        assert_eq!(
            Why::Big { allocated: 501 }.to_string(),
            "it holds 501 bytes on disk"
        );
        assert_eq!(
            Why::Disk {
                used_percent: 91.25
            }
            .to_string(),
            "its filesystem is 91.2% used"
        );
    }
}
