//! The processes the doctor sees, and the rules that keep most of them out of reach.
//!
//! CPU comes from `sysinfo` (percent of one core, measured between two samples);
//! identity comes from `/proc/<pid>/stat` and `/proc/<pid>/status`: the start time in
//! clock ticks since boot (exact, unlike a start time in seconds) and the real and
//! effective uids. A PID with another start time is another process.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System, ThreadKind, UpdateKind, Users};

/// Who a process is: the same PID with another start time is someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    pub pid: u32,
    /// Clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// One process as sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Proc {
    pub identity: Identity,
    pub ppid: u32,
    pub uid: u32,
    pub euid: u32,
    /// The executable's name (`comm`).
    pub name: String,
    pub cmdline: String,
    pub user: String,
    pub cpu_percent: f64,
    pub kernel_thread: bool,
}

impl Proc {
    /// One line for people: `pid 4242 user app (1001) at 190% of one core for 30 s:
    /// <command line>`.
    pub fn summary(&self, held: std::time::Duration) -> String {
        format!(
            "pid {} user {} ({}) at {:.0}% of one core for {} s: {}",
            self.identity.pid,
            self.user,
            self.uid,
            self.cpu_percent,
            held.as_secs(),
            if self.cmdline.is_empty() {
                &self.name
            } else {
                &self.cmdline
            }
        )
    }
}

/// What `/proc/<pid>` says of a process: (ppid, start ticks, kernel thread).
pub fn read_stat(proc_root: &Path, pid: u32) -> Option<(u32, u64, bool)> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 4 is ppid, 9 flags, 22 starttime; `rest` starts at field 3.
    let ppid = fields.get(1)?.parse().ok()?;
    let flags: u64 = fields.get(6)?.parse().ok()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    const PF_KTHREAD: u64 = 0x0020_0000;
    Some((ppid, start_ticks, flags & PF_KTHREAD != 0))
}

/// The real and effective uids of a process (`/proc/<pid>/status`).
pub fn read_uids(proc_root: &Path, pid: u32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    let mut ids = line["Uid:".len()..]
        .split_whitespace()
        .map(str::parse::<u32>);
    Some((ids.next()?.ok()?, ids.next()?.ok()?))
}

/// The identity and uids of `pid` now, to compare with a sample.
pub fn current(pid: u32) -> Option<(Identity, u32)> {
    let root = Path::new("/proc");
    let (_, start_ticks, _) = read_stat(root, pid)?;
    let (uid, _) = read_uids(root, pid)?;
    Some((Identity { pid, start_ticks }, uid))
}

/// Samples every process's CPU between two calls.
pub struct Sampler {
    system: System,
}

impl Sampler {
    pub fn new() -> Option<Self> {
        System::new().ok().map(|system| Self { system })
    }

    /// Every process now (the first call's CPU figures are 0: CPU is measured
    /// between two calls). Also the host's CPU ratio, for when the proxy's metrics
    /// cannot be read.
    pub fn sample(&mut self) -> (Vec<Proc>, f64) {
        self.system.refresh_cpu_usage();
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .with_cpu()
                .with_cmd(UpdateKind::OnlyIfNotSet)
                .with_user(UpdateKind::OnlyIfNotSet),
        );
        let users = Users::new_with_refreshed_list().ok();
        let root = Path::new("/proc");
        let procs = self
            .system
            .processes()
            .values()
            .filter_map(|p| {
                // A process's threads are listed too; the process's own line counts
                // them all, and only a process is ever a target.
                if p.thread_kind() == Some(ThreadKind::Userland) {
                    return None;
                }
                let pid = p.pid().as_u32();
                let (ppid, start_ticks, kthread) = read_stat(root, pid)?;
                let (uid, euid) = read_uids(root, pid)?;
                let user = users
                    .as_ref()
                    .and_then(|u| u.iter().find(|u| **u.id() == uid))
                    .map_or_else(|| uid.to_string(), |u| u.name().to_owned());
                let cmdline: Vec<String> = p
                    .cmd()
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect();
                Some(Proc {
                    identity: Identity { pid, start_ticks },
                    ppid,
                    uid,
                    euid,
                    name: p.name().to_string_lossy().into_owned(),
                    cmdline: cmdline.join(" "),
                    user,
                    cpu_percent: f64::from(p.cpu_usage()),
                    kernel_thread: kthread || p.thread_kind() == Some(ThreadKind::Kernel),
                })
            })
            .collect();
        (procs, f64::from(self.system.global_cpu_usage()) / 100.0)
    }
}

/// Why a process is out of reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protected {
    Root,
    Init,
    TheDoctor,
    KernelThread,
    User(String),
    Name(String),
    Pid,
}

impl std::fmt::Display for Protected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Root => write!(f, "runs as root"),
            Self::Init => write!(f, "is PID 1"),
            Self::TheDoctor => write!(f, "is the doctor or one of its ancestors"),
            Self::KernelThread => write!(f, "is a kernel thread"),
            Self::User(user) => write!(f, "belongs to protected user {user}"),
            Self::Name(name) => write!(f, "is a protected executable ({name})"),
            Self::Pid => write!(f, "is in protected_pids"),
        }
    }
}

/// The doctor's reach, resolved once from the config and the host's users.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// `None`: every user's processes are candidates.
    pub watch_uids: Option<HashSet<u32>>,
    pub protected_uids: HashMap<u32, String>,
    pub protected_names: HashSet<String>,
    pub protected_pids: HashSet<u32>,
    /// The doctor and its ancestors.
    pub own_line: HashSet<u32>,
}

impl Reach {
    /// Names resolve through the host's users; numbers are uids. A name with no
    /// such user matches nobody.
    pub fn new(
        watch_users: &[String],
        protected_users: &[String],
        protected_names: &[String],
        protected_pids: &[u32],
    ) -> Self {
        let users = Users::new_with_refreshed_list().ok();
        let uid_of = |name: &str| -> Option<u32> {
            name.parse().ok().or_else(|| {
                users
                    .as_ref()?
                    .iter()
                    .find(|u| u.name() == name)
                    .map(|u| **u.id())
            })
        };
        Self {
            watch_uids: (!watch_users.is_empty())
                .then(|| watch_users.iter().filter_map(|u| uid_of(u)).collect()),
            protected_uids: protected_users
                .iter()
                .filter_map(|u| Some((uid_of(u)?, u.clone())))
                .collect(),
            protected_names: protected_names
                .iter()
                .map(String::as_str)
                .chain(crate::config::doctor::ALWAYS_PROTECTED_NAMES)
                .map(str::to_owned)
                .collect(),
            protected_pids: protected_pids.iter().copied().collect(),
            own_line: own_line(Path::new("/proc"), std::process::id()),
        }
    }

    /// Whether `p` is a candidate at all (`watch_users`).
    pub fn watches(&self, p: &Proc) -> bool {
        self.watch_uids
            .as_ref()
            .is_none_or(|uids| uids.contains(&p.uid))
    }

    /// Why `p` must never be signalled, if it must not. Root, PID 1, the doctor's
    /// own line and kernel threads come first and no setting removes them.
    pub fn protection(&self, p: &Proc) -> Option<Protected> {
        let pid = p.identity.pid;
        if p.uid == 0 || p.euid == 0 {
            return Some(Protected::Root);
        }
        if pid == 1 {
            return Some(Protected::Init);
        }
        if self.own_line.contains(&pid) {
            return Some(Protected::TheDoctor);
        }
        // PF_KTHREAD, not "a child of PID 2": in a PID namespace PID 2 is anyone.
        if p.kernel_thread {
            return Some(Protected::KernelThread);
        }
        if let Some(user) = self.protected_uids.get(&p.uid) {
            return Some(Protected::User(user.clone()));
        }
        if self.protected_names.contains(&p.name) {
            return Some(Protected::Name(p.name.clone()));
        }
        if self.protected_pids.contains(&pid) {
            return Some(Protected::Pid);
        }
        None
    }
}

/// `pid` and its ancestors up to PID 1.
fn own_line(proc_root: &Path, pid: u32) -> HashSet<u32> {
    let mut line = HashSet::new();
    let mut pid = pid;
    while pid > 1 && line.insert(pid) {
        match read_stat(proc_root, pid) {
            Some((ppid, _, _)) => pid = ppid,
            None => break,
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, uid: u32, name: &str) -> Proc {
        Proc {
            identity: Identity {
                pid,
                start_ticks: 100,
            },
            ppid: 50,
            uid,
            euid: uid,
            name: name.to_owned(),
            cmdline: name.to_owned(),
            user: uid.to_string(),
            cpu_percent: 100.0,
            kernel_thread: false,
        }
    }

    fn reach() -> Reach {
        Reach {
            watch_uids: Some([45_123, 0].into_iter().collect()),
            protected_uids: HashMap::new(),
            protected_names: ["redis-server".to_owned()].into_iter().collect(),
            protected_pids: [777].into_iter().collect(),
            own_line: [4_000, 3_000].into_iter().collect(),
        }
    }

    #[test]
    fn root_init_kernel_threads_and_the_doctor_are_never_in_reach() {
        // Root watched and no protected users: still protected.
        let r = reach();
        assert_eq!(r.protection(&proc(900, 0, "yes")), Some(Protected::Root));
        let mut setuid = proc(900, 45_123, "yes");
        setuid.euid = 0;
        assert_eq!(r.protection(&setuid), Some(Protected::Root));
        assert_eq!(r.protection(&proc(1, 45_123, "yes")), Some(Protected::Init));
        assert_eq!(
            r.protection(&proc(3_000, 45_123, "yes")),
            Some(Protected::TheDoctor)
        );
        let mut kthread = proc(900, 45_123, "kworker");
        kthread.kernel_thread = true;
        assert_eq!(r.protection(&kthread), Some(Protected::KernelThread));
        assert_eq!(
            r.protection(&proc(900, 45_123, "redis-server")),
            Some(Protected::Name("redis-server".to_owned()))
        );
        assert_eq!(
            r.protection(&proc(777, 45_123, "yes")),
            Some(Protected::Pid)
        );
        assert_eq!(r.protection(&proc(900, 45_123, "yes")), None);
        assert!(r.watches(&proc(900, 45_123, "yes")));
        assert!(!r.watches(&proc(900, 1_000, "yes")));
        assert!(Reach::default().watches(&proc(900, 1_000, "yes")));
    }

    #[test]
    fn stat_and_status_of_this_process() {
        let me = std::process::id();
        let (ppid, start, kthread) = read_stat(Path::new("/proc"), me).unwrap();
        assert!(ppid > 0 && start > 0 && !kthread);
        let (identity, uid) = current(me).unwrap();
        assert_eq!(identity.start_ticks, start);
        assert_eq!(uid, read_uids(Path::new("/proc"), me).unwrap().0);
        assert!(own_line(Path::new("/proc"), me).contains(&ppid));
    }
}
