//! The one place in the crate with `unsafe`: `fcntl(F_SETLEASE / F_GETLEASE)`,
//! which `rustix` does not wrap. A write lease is how maintenance proves a file
//! closed: the kernel grants it only when no other open file description of the
//! file exists (reader or writer, any process, any user), and while it is held an
//! `open` of the file by anyone waits for its release. Taking one needs the file's
//! owner or `CAP_LEASE` (the Ansible unit grants that capability and nothing else).
//!
//! While held, an `open` elsewhere sends this process SIGIO (whose default action
//! ends it): [`super`] installs a handler for it before any lease is taken.

use std::os::fd::{AsFd, AsRawFd as _};

use rustix::io::Errno;

/// What `F_GETLEASE` says of a lease this process holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Still a write lease: nobody has tried to open the file since it was taken.
    Write,
    /// Being broken (someone is opening the file and waits for the release), or none.
    Breaking,
}

fn fcntl(fd: impl AsFd, cmd: libc::c_int, arg: libc::c_int) -> Result<libc::c_int, Errno> {
    // SAFETY: F_SETLEASE and F_GETLEASE take an int argument and read no memory of
    // ours; the descriptor is borrowed, so it stays open for the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), cmd, arg) };
    if r < 0 {
        Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ))
    } else {
        Ok(r)
    }
}

/// Takes a write lease: `Err(EAGAIN)` while another descriptor has the file open;
/// `Err(EACCES)` when this process neither owns the file nor has `CAP_LEASE`;
/// `Err(EINVAL)` on a filesystem without leases (NFS, some FUSE).
pub fn take_write(fd: impl AsFd) -> Result<(), Errno> {
    fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK).map(drop)
}

/// Whether the write lease taken on `fd` is intact.
pub fn held(fd: impl AsFd) -> Result<Held, Errno> {
    let kind = fcntl(fd, libc::F_GETLEASE, 0)?;
    Ok(if kind == libc::F_WRLCK {
        Held::Write
    } else {
        Held::Breaking
    })
}

/// Gives the lease up (an opener waiting on it goes on at once).
pub fn release(fd: impl AsFd) -> Result<(), Errno> {
    fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK).map(drop)
}
