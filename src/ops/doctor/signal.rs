//! Signalling one process, and never another that took its PID.
//!
//! A pidfd (`pidfd_open`) refers to one process for as long as the descriptor
//! lives, whatever happens to its PID. The doctor opens it, THEN confirms through
//! `/proc` that the process behind that PID still has the start time and uid it
//! sampled: if it does, the descriptor is that process, and every signal sent
//! through it (`pidfd_send_signal`) reaches that process or, once it has exited,
//! nobody. Its exit is awaited on the same descriptor (it turns readable).
//!
//! Kernels before 5.3 have no pidfd: then the identity is checked again right before
//! each `kill(2)`, which leaves the microseconds between that check and the signal
//! (a PID reused in that window would be hit: the kernel would have to go round the
//! whole PID space in between).
//!
//! Syscalls go through `rustix`'s safe wrappers: no `unsafe` here either.

use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use super::procs::{Identity, current};

/// What one signal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Delivered to the process sampled.
    Delivered,
    /// That process is gone (exited, or its PID now belongs to another): nothing sent.
    Gone,
    /// Not allowed (EPERM: the doctor lacks CAP_KILL for this user's processes).
    Denied,
}

impl Sent {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "ok",
            Self::Gone => "gone",
            Self::Denied => "denied",
        }
    }
}

fn pid_of(identity: Identity) -> Option<Pid> {
    i32::try_from(identity.pid).ok().and_then(Pid::from_raw)
}

/// One process, held so that signals reach it or nobody.
pub enum Handle {
    Pidfd(OwnedFd),
    /// No pidfd on this kernel: the identity is re-checked before each signal.
    Pid(Identity, u32),
}

/// Takes hold of the process `identity` with `uid`, if it is still the one sampled.
pub fn hold(identity: Identity, uid: u32) -> std::io::Result<Option<Handle>> {
    let still_it = || current(identity.pid).is_some_and(|now| now == (identity, uid));
    let Some(pid) = pid_of(identity) else {
        return Ok(None);
    };
    match pidfd_open(pid, PidfdFlags::empty()) {
        // Confirmed after opening: the descriptor is the process we sampled.
        Ok(fd) => Ok(still_it().then_some(Handle::Pidfd(fd))),
        Err(rustix::io::Errno::SRCH) => Ok(None),
        Err(rustix::io::Errno::NOSYS) => Ok(still_it().then_some(Handle::Pid(identity, uid))),
        Err(errno) => Err(errno.into()),
    }
}

impl Handle {
    /// Sends `signal` (SIGTERM or SIGKILL) to this one process (never its group).
    pub fn send(&self, signal: Signal) -> std::io::Result<Sent> {
        let result = match self {
            Self::Pidfd(fd) => pidfd_send_signal(fd, signal),
            Self::Pid(identity, uid) => {
                if current(identity.pid) != Some((*identity, *uid)) {
                    return Ok(Sent::Gone);
                }
                match pid_of(*identity) {
                    Some(pid) => rustix::process::kill_process(pid, signal),
                    None => return Ok(Sent::Gone),
                }
            }
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
        match self {
            Self::Pidfd(fd) => {
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
            Self::Pid(identity, uid) => {
                let deadline = tokio::time::Instant::now() + limit;
                while tokio::time::Instant::now() < deadline {
                    if current(identity.pid) != Some((*identity, *uid)) {
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
    fn child() -> (std::process::Child, Identity, u32) {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (identity, uid) = current(child.id()).unwrap();
        (child, identity, uid)
    }

    #[tokio::test]
    async fn a_held_process_gets_the_signal_and_its_exit_is_seen() {
        let (mut child, identity, uid) = child();
        let handle = hold(identity, uid)
            .unwrap()
            .expect("still the sampled process");
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
        let (mut child, identity, uid) = child();
        let other = Identity {
            start_ticks: identity.start_ticks + 1,
            ..identity
        };
        assert!(hold(other, uid).unwrap().is_none());
        assert!(hold(identity, uid + 1).unwrap().is_none(), "another uid");
        // Untouched.
        assert!(child.try_wait().unwrap().is_none());
        let _ = child.kill();
        let _ = child.wait();
        assert!(hold(identity, uid).unwrap().is_none(), "exited");
    }
}
