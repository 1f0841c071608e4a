//! The processes the doctor sees, and the rules that keep most of them out of reach.
//!
//! CPU comes from `sysinfo` (percent of one core, measured between two samples);
//! everything that says who a process is comes from `/proc/<pid>` and is read again
//! at each decision and right before each signal ([`read_live`]): the start time in
//! clock ticks since boot (exact, unlike a start time in seconds), the real and
//! effective uids, `comm`, the executable and the cgroups. A PID with another start
//! time is another process; a process whose `comm`, executable, uids or cgroups
//! changed since it was judged (it exec'd, or changed users) is judged again as what
//! it is now, never signalled on the old judgement.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System, ThreadKind, Users};

use crate::ops::cmdline;

/// Who a process is: the same PID with another start time is someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity {
    pub pid: u32,
    /// Clock ticks after boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
}

/// What a process is now, as `/proc` says: what the doctor judges, and what must
/// still hold, field for field, when it signals.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Live {
    pub identity: Identity,
    pub uid: u32,
    pub euid: u32,
    /// The kernel's name for it (`/proc/<pid>/comm`, at most 15 bytes): set by exec.
    pub comm: String,
    /// The executable (`/proc/<pid>/exe`); `None` when this process may not read it
    /// (another user's, without CAP_SYS_PTRACE) or there is none (a kernel thread).
    pub exe: Option<PathBuf>,
    /// Each line's path in `/proc/<pid>/cgroup` (one on a cgroup v2 host; one per
    /// hierarchy on a hybrid one): where systemd put it, which it cannot leave.
    pub cgroups: Vec<String>,
    pub kernel_thread: bool,
}

impl Live {
    /// The executable's file name, when readable.
    pub fn exe_name(&self) -> Option<&str> {
        self.exe
            .as_deref()?
            .file_name()?
            .to_str()
            .map(|n| n.strip_suffix(" (deleted)").unwrap_or(n))
    }
}

/// One process as sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct Proc {
    pub live: Live,
    /// Sanitised for alerts and logs ([`cmdline::sanitize`]): never the raw argv.
    pub cmdline: String,
    pub user: String,
    pub cpu_percent: f64,
}

impl Proc {
    /// One line for people: `pid 4242 user app (1001) at 190% of one core for 30 s:
    /// <command line>`.
    pub fn summary(&self, held: std::time::Duration) -> String {
        format!(
            "pid {} user {} ({}) at {:.0}% of one core for {} s: {}",
            self.live.identity.pid,
            self.user,
            self.live.uid,
            self.cpu_percent,
            held.as_secs(),
            if self.cmdline.is_empty() {
                cmdline::escape(&self.live.comm)
            } else {
                self.cmdline.clone()
            }
        )
    }

    /// `comm`, escaped: a name a process chose may hold a newline.
    pub fn name(&self) -> String {
        cmdline::escape(&self.live.comm)
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

/// Everything [`Live`] holds of `pid` now; `None` once it is gone. The start time is
/// read first and again last: a process that exited and whose PID was handed out
/// while the files were read gives `None`, never a mix of two processes.
pub fn read_live(proc_root: &Path, pid: u32) -> Option<Live> {
    let dir = proc_root.join(pid.to_string());
    let (_, start_ticks, kernel_thread) = read_stat(proc_root, pid)?;
    let (uid, euid) = read_uids(proc_root, pid)?;
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    let comm = comm.strip_suffix('\n').unwrap_or(&comm).to_owned();
    let exe = std::fs::read_link(dir.join("exe")).ok();
    let cgroups = std::fs::read_to_string(dir.join("cgroup"))
        .ok()?
        .lines()
        // `hierarchy-ID:controllers:path`: the path may hold colons.
        .filter_map(|l| Some(l.splitn(3, ':').nth(2)?.to_owned()))
        .collect();
    let (_, again, _) = read_stat(proc_root, pid)?;
    (again == start_ticks).then_some(Live {
        identity: Identity { pid, start_ticks },
        uid,
        euid,
        comm,
        exe,
        cgroups,
        kernel_thread,
    })
}

/// `pid` now, from the host's `/proc`.
pub fn current(pid: u32) -> Option<Live> {
    read_live(Path::new("/proc"), pid)
}

/// The argv of `pid` (`/proc/<pid>/cmdline`), sanitised for people.
fn read_cmdline(proc_root: &Path, pid: u32) -> String {
    let raw = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")).unwrap_or_default();
    let argv: Vec<String> = raw
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // A trailing NUL ends the last argument; it does not start an empty one.
    let argv = match argv.split_last() {
        Some((last, rest)) if last.is_empty() => rest,
        _ => &argv[..],
    };
    cmdline::sanitize(argv)
}

/// Samples every process's CPU between two calls.
pub struct Sampler {
    system: System,
}

impl Sampler {
    pub fn new() -> Option<Self> {
        System::new().ok().map(|system| Self { system })
    }

    /// The processes at or above `min_cpu_percent` now, read fresh from `/proc`
    /// (the first call's CPU figures are 0: CPU is measured between two calls). Also
    /// the host's CPU ratio, for when the proxy's metrics cannot be read.
    pub fn sample(&mut self, min_cpu_percent: f64) -> (Vec<Proc>, f64) {
        self.system.refresh_cpu_usage();
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing().with_cpu(),
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
                let cpu_percent = f64::from(p.cpu_usage());
                if cpu_percent < min_cpu_percent {
                    return None;
                }
                let pid = p.pid().as_u32();
                let mut live = read_live(root, pid)?;
                live.kernel_thread |= p.thread_kind() == Some(ThreadKind::Kernel);
                let user = users
                    .as_ref()
                    .and_then(|u| u.iter().find(|u| **u.id() == live.uid))
                    .map_or_else(|| live.uid.to_string(), |u| u.name().to_owned());
                Some(Proc {
                    cmdline: read_cmdline(root, pid),
                    live,
                    user,
                    cpu_percent,
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
    Unit(String),
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
            Self::Unit(unit) => write!(f, "runs in protected unit {unit}"),
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
    /// Unit names (`redis-server.service`) or cgroup paths (`/system.slice/x`).
    pub protected_units: Vec<String>,
    pub protected_pids: HashSet<u32>,
    /// The doctor and its ancestors.
    pub own_line: HashSet<u32>,
}

impl Reach {
    /// Names resolve through the host's users (NSS); numbers are uids. The doctor's
    /// config check ([`DoctorFile::validate`]) has already refused a protected user
    /// that does not resolve; a watched one that does not matches nobody.
    ///
    /// [`DoctorFile::validate`]: crate::config::doctor::DoctorFile::validate
    pub fn new(config: &crate::config::doctor::DoctorConfig) -> Self {
        use crate::config::doctor::{ALWAYS_PROTECTED_NAMES, ALWAYS_PROTECTED_UNITS, uid_of};
        Self {
            watch_uids: (!config.watch_users.is_empty()).then(|| {
                config
                    .watch_users
                    .iter()
                    .filter_map(|u| uid_of(u))
                    .collect()
            }),
            protected_uids: config
                .protected_users
                .iter()
                .filter_map(|u| Some((uid_of(u)?, u.clone())))
                .collect(),
            protected_names: config
                .protected_names
                .iter()
                .map(String::as_str)
                .chain(ALWAYS_PROTECTED_NAMES)
                .map(str::to_owned)
                .collect(),
            protected_units: config
                .protected_units
                .iter()
                .map(String::as_str)
                .chain(ALWAYS_PROTECTED_UNITS)
                .map(str::to_owned)
                .collect(),
            protected_pids: config.protected_pids.iter().copied().collect(),
            own_line: own_line(Path::new("/proc"), std::process::id()),
        }
    }

    /// Whether `p` is a candidate at all (`watch_users`).
    pub fn watches(&self, p: &Live) -> bool {
        self.watch_uids
            .as_ref()
            .is_none_or(|uids| uids.contains(&p.uid) || uids.contains(&p.euid))
    }

    /// Why `p` must never be signalled, if it must not. Root, PID 1, the doctor's
    /// own line and kernel threads come first and no setting removes them. Users
    /// match the real or the effective uid; names the `comm` or the executable's
    /// file name; units any cgroup the process is in.
    pub fn protection(&self, p: &Live) -> Option<Protected> {
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
        if let Some(user) = self
            .protected_uids
            .get(&p.uid)
            .or_else(|| self.protected_uids.get(&p.euid))
        {
            return Some(Protected::User(user.clone()));
        }
        for name in std::iter::once(p.comm.as_str()).chain(p.exe_name()) {
            if self.protected_names.contains(name) {
                return Some(Protected::Name(name.to_owned()));
            }
        }
        if let Some(unit) = self
            .protected_units
            .iter()
            .find(|unit| p.cgroups.iter().any(|path| in_unit(path, unit)))
        {
            return Some(Protected::Unit(unit.clone()));
        }
        if self.protected_pids.contains(&pid) {
            return Some(Protected::Pid);
        }
        None
    }
}

/// Whether the cgroup `path` is in `unit`: a unit name (`redis-server.service`,
/// `app.slice`) is one of the path's components; a path (`/system.slice/x`) is the
/// path itself or one of its ancestors.
pub fn in_unit(path: &str, unit: &str) -> bool {
    if unit.starts_with('/') {
        let unit = unit.trim_end_matches('/');
        return path == unit
            || unit.is_empty()
            || path
                .strip_prefix(unit)
                .is_some_and(|rest| rest.starts_with('/'));
    }
    path.split('/').any(|component| component == unit)
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

    fn live(pid: u32, uid: u32, name: &str) -> Live {
        Live {
            identity: Identity {
                pid,
                start_ticks: 100,
            },
            uid,
            euid: uid,
            comm: name.to_owned(),
            exe: Some(PathBuf::from(format!("/usr/bin/{name}"))),
            cgroups: vec!["/user.slice/user-1000.slice/session-1.scope".to_owned()],
            kernel_thread: false,
        }
    }

    fn reach() -> Reach {
        Reach {
            watch_uids: Some([45_123, 0].into_iter().collect()),
            protected_uids: [(45_200, "postgres".to_owned())].into_iter().collect(),
            protected_names: ["redis-server".to_owned()].into_iter().collect(),
            protected_units: vec![
                "canarygate.service".to_owned(),
                "/system.slice/app".to_owned(),
            ],
            protected_pids: [777].into_iter().collect(),
            own_line: [4_000, 3_000].into_iter().collect(),
        }
    }

    #[test]
    fn root_init_kernel_threads_and_the_doctor_are_never_in_reach() {
        // Root watched and no protected users: still protected.
        let r = reach();
        assert_eq!(r.protection(&live(900, 0, "yes")), Some(Protected::Root));
        let mut setuid = live(900, 45_123, "yes");
        setuid.euid = 0;
        assert_eq!(r.protection(&setuid), Some(Protected::Root));
        assert_eq!(r.protection(&live(1, 45_123, "yes")), Some(Protected::Init));
        assert_eq!(
            r.protection(&live(3_000, 45_123, "yes")),
            Some(Protected::TheDoctor)
        );
        let mut kthread = live(900, 45_123, "kworker");
        kthread.kernel_thread = true;
        assert_eq!(r.protection(&kthread), Some(Protected::KernelThread));
        assert_eq!(
            r.protection(&live(900, 45_123, "redis-server")),
            Some(Protected::Name("redis-server".to_owned()))
        );
        assert_eq!(
            r.protection(&live(777, 45_123, "yes")),
            Some(Protected::Pid)
        );
        assert_eq!(r.protection(&live(900, 45_123, "yes")), None);
        assert!(r.watches(&live(900, 45_123, "yes")));
        assert!(!r.watches(&live(900, 1_000, "yes")));
        assert!(Reach::default().watches(&live(900, 1_000, "yes")));
    }

    #[test]
    fn protection_follows_the_effective_uid_the_executable_and_the_cgroup() {
        let r = reach();
        // Setuid to a protected user: protected by its effective uid.
        let mut setuid = live(900, 45_123, "yes");
        setuid.euid = 45_200;
        assert_eq!(
            r.protection(&setuid),
            Some(Protected::User("postgres".to_owned()))
        );
        // Renamed (prctl PR_SET_NAME) but the executable is still redis-server.
        let mut renamed = live(900, 45_123, "innocent");
        renamed.exe = Some(PathBuf::from("/usr/bin/redis-server (deleted)"));
        assert_eq!(
            r.protection(&renamed),
            Some(Protected::Name("redis-server".to_owned()))
        );
        // Whatever its names, the proxy's unit keeps it out of reach.
        for path in [
            "/system.slice/canarygate.service",
            "/system.slice/canarygate.service/worker",
        ] {
            let mut proxy = live(900, 45_123, "innocent");
            proxy.cgroups = vec!["/".to_owned(), path.to_owned()];
            assert_eq!(
                r.protection(&proxy),
                Some(Protected::Unit("canarygate.service".to_owned())),
                "{path}"
            );
        }
        let mut app = live(900, 45_123, "yes");
        app.cgroups = vec!["/system.slice/app/x".to_owned()];
        assert_eq!(
            r.protection(&app),
            Some(Protected::Unit("/system.slice/app".to_owned()))
        );
        // A similar name is another unit.
        app.cgroups = vec![
            "/system.slice/application/x".to_owned(),
            "/system.slice/canarygate.service2".to_owned(),
        ];
        assert_eq!(r.protection(&app), None);
    }

    #[test]
    fn cgroup_paths_match_units_by_component_or_prefix() {
        let table = [
            (
                "/system.slice/redis-server.service",
                "redis-server.service",
                true,
            ),
            (
                "/system.slice/redis-server.service/sub",
                "redis-server.service",
                true,
            ),
            (
                "/system.slice/redis-server.servicex",
                "redis-server.service",
                false,
            ),
            ("/system.slice", "system.slice", true),
            ("/a/b", "/a", true),
            ("/ab", "/a", false),
            ("/a", "/a/", true),
            ("/", "/nope", false),
        ];
        for (path, unit, want) in table {
            assert_eq!(in_unit(path, unit), want, "{path} in {unit}");
        }
    }

    #[test]
    fn live_of_this_process() {
        let me = std::process::id();
        let (ppid, start, kthread) = read_stat(Path::new("/proc"), me).unwrap();
        assert!(ppid > 0 && start > 0 && !kthread);
        let live = current(me).unwrap();
        assert_eq!(live.identity.start_ticks, start);
        assert_eq!(live.uid, read_uids(Path::new("/proc"), me).unwrap().0);
        assert!(!live.comm.is_empty() && !live.comm.ends_with('\n'));
        assert!(!live.cgroups.is_empty());
        assert_eq!(
            live.exe,
            std::env::current_exe().ok(),
            "its own executable is readable"
        );
        assert!(own_line(Path::new("/proc"), me).contains(&ppid));
        let cmd = read_cmdline(Path::new("/proc"), me);
        let exe: String = std::env::args().next().unwrap().chars().take(20).collect();
        assert!(cmd.starts_with(&exe), "{cmd}");
    }
}
