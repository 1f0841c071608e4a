//! Signalling one process, and never another that took its PID or that became
//! something else.
//!
//! A pidfd (`pidfd_open`) refers to one process for as long as the descriptor
//! lives, whatever happens to its PID. The doctor opens it, THEN confirms through
//! `/proc` that the process behind that PID is still, field for field, what it
//! judged ([`Live`]: start time, real and effective uid, `comm`, executable,
//! cgroups): if it is, the descriptor is that process. Before each signal, SIGKILL
//! after the grace included, `/proc` is read again: a process that exec'd (a
//! wrapper that became `postgres`), changed uid or moved cgroup since it was judged
//! is not signalled ([`Sent::Changed`]) and is judged again as what it is now. What
//! remains is the microseconds between that read and the signal: an exec inside them
//! is not seen (no syscall checks and signals at once). Signals through the pidfd
//! (`pidfd_send_signal`) reach that process or, once it has exited, nobody. Its exit
//! is awaited on the same descriptor (it turns readable).
//!
//! Kernels before 5.3 have no pidfd: then the same check is made right before each
//! `kill(2)`, which leaves the same microseconds, in which a PID reuse would also be
//! hit (the kernel would have to go round the whole PID space in between).
//!
//! Syscalls go through `rustix`'s safe wrappers: no `unsafe` here either.

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use super::procs::{Identity, Live, current};

/// What one signal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// Delivered to the process judged.
    Delivered,
    /// That process is gone (exited, or its PID now belongs to another): nothing sent.
    Gone,
    /// Not allowed (EPERM: the doctor lacks CAP_KILL for this user's processes).
    Denied,
    /// Still that process, but no longer what was judged (it exec'd, changed uid or
    /// cgroup): nothing sent. What it is now.
    Changed(Box<Live>),
}

impl Sent {
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Delivered => "ok",
            Self::Gone => "gone",
            Self::Denied => "denied",
            Self::Changed(_) => "changed",
        }
    }
}

fn pid_of(identity: Identity) -> Option<Pid> {
    i32::try_from(identity.pid).ok().and_then(Pid::from_raw)
}

/// One process, held so that signals reach it, as judged, or nobody.
pub struct Handle {
    judged: Live,
    /// `None`: no pidfd on this kernel, `kill(2)` after the same check.
    fd: Option<OwnedFd>,
}

/// Whether the process behind `judged`'s PID is still what was judged: `Err` with
/// what it is now otherwise (`None`: gone).
fn still(judged: &Live) -> Result<(), Option<Live>> {
    match current(judged.identity.pid) {
        Some(now) if now == *judged => Ok(()),
        Some(now) if now.identity == judged.identity => Err(Some(now)),
        _ => Err(None),
    }
}

/// Takes hold of the process `judged`, if it is still what was judged: `Ok(Err)`
/// says what happened to it otherwise.
pub fn hold(judged: &Live) -> std::io::Result<Result<Handle, Sent>> {
    let Some(pid) = pid_of(judged.identity) else {
        return Ok(Err(Sent::Gone));
    };
    let fd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => Some(fd),
        Err(rustix::io::Errno::SRCH) => return Ok(Err(Sent::Gone)),
        Err(rustix::io::Errno::NOSYS) => None,
        Err(errno) => return Err(errno.into()),
    };
    // Confirmed after opening: the descriptor is the process judged.
    Ok(match still(judged) {
        Ok(()) => Ok(Handle {
            judged: judged.clone(),
            fd,
        }),
        Err(Some(now)) => Err(Sent::Changed(Box::new(now))),
        Err(None) => Err(Sent::Gone),
    })
}

impl Handle {
    /// Sends `signal` (SIGTERM or SIGKILL) to this one process (never its group),
    /// after reading once more that it is still what was judged.
    pub fn send(&self, signal: Signal) -> std::io::Result<Sent> {
        match still(&self.judged) {
            Ok(()) => {}
            Err(Some(now)) => return Ok(Sent::Changed(Box::new(now))),
            Err(None) => return Ok(Sent::Gone),
        }
        let result = match &self.fd {
            Some(fd) => pidfd_send_signal(fd, signal),
            None => match pid_of(self.judged.identity) {
                Some(pid) => rustix::process::kill_process(pid, signal),
                None => return Ok(Sent::Gone),
            },
        };
        match result {
            Ok(()) => Ok(Sent::Delivered),
            Err(rustix::io::Errno::SRCH) => Ok(Sent::Gone),
            Err(rustix::io::Errno::PERM) => Ok(Sent::Denied),
            Err(errno) => Err(errno.into()),
        }
    }

    /// Waits up to `limit` for the process to exit; whether it did.
    pub async fn exited_within(&self, limit: Duration) -> bool {
        match &self.fd {
            Some(fd) => {
                let Ok(fd) = fd.try_clone() else {
                    return false;
                };
                // A pidfd turns readable when its process exits: one blocking poll.
                let wait = move || {
                    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
                    let timeout = Timespec::try_from(limit).ok();
                    matches!(poll(&mut fds, timeout.as_ref()), Ok(n) if n > 0)
                };
                tokio::task::spawn_blocking(wait).await.unwrap_or(false)
            }
            None => {
                let identity = self.judged.identity;
                let deadline = tokio::time::Instant::now() + limit;
                while tokio::time::Instant::now() < deadline {
                    if current(identity.pid).is_none_or(|now| now.identity != identity) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child of this test: the only process these tests signal.
    fn child() -> (std::process::Child, Live) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let live = current(child.id()).unwrap();
        (child, live)
    }

    fn held(judged: &Live) -> Handle {
        match hold(judged).unwrap() {
            Ok(handle) => handle,
            Err(sent) => panic!("not held: {sent:?}"),
        }
    }

    #[tokio::test]
    async fn a_held_process_gets_the_signal_and_its_exit_is_seen() {
        let (mut child, live) = child();
        let handle = held(&live);
        assert!(!handle.exited_within(Duration::from_millis(50)).await);
        assert_eq!(handle.send(Signal::TERM).unwrap(), Sent::Delivered);
        assert!(handle.exited_within(Duration::from_secs(5)).await);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(15));
        // Reaped: nobody left behind the descriptor.
        assert_eq!(handle.send(Signal::KILL).unwrap(), Sent::Gone);
    }

    #[tokio::test]
    async fn another_process_behind_the_same_pid_is_never_held() {
        // The PID is alive, but with another start time it is someone else: as when
        // the sampled process exited and the kernel gave its PID to a new one.
        let (mut child, live) = child();
        let mut other = live.clone();
        other.identity.start_ticks += 1;
        assert_eq!(hold(&other).unwrap().err(), Some(Sent::Gone));
        // Same process, judged as something it is not (another uid, another name):
        // nothing is sent, and what it is now is said.
        for changed in [
            Live {
                uid: live.uid + 1,
                ..live.clone()
            },
            Live {
                comm: "sh".to_owned(),
                ..live.clone()
            },
        ] {
            assert_eq!(
                hold(&changed).unwrap().err(),
                Some(Sent::Changed(Box::new(live.clone())))
            );
        }
        // Untouched.
        assert!(child.try_wait().unwrap().is_none());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(hold(&live).unwrap().err(), Some(Sent::Gone), "exited");
    }
}
