//! The file system as maintenance may touch it: candidates found without ever
//! following a symlink or leaving the configured dirs, each file opened, re-checked
//! and removed through the descriptor of the directory it was found in (`openat`
//! with `O_NOFOLLOW`, `unlinkat`), so a name swapped for a symlink between the scan
//! and the action is refused, not followed. Also: who writes a file (`/proc`), where
//! a file's data starts (`SEEK_DATA`), freeing a prefix in place
//! (`FALLOC_FL_PUNCH_HOLE`), and filesystem usage (`statvfs`).
//!
//! Two proofs guard what is destroyed. A file is unlinked only when it is proven
//! closed, right then: a write lease ([`lease`]) is granted only when no other
//! descriptor of it is open anywhere, and holds off new opens while the file is
//! renamed aside and removed; without a lease (not the owner, no `CAP_LEASE`), a
//! `/proc` scan that could read every process's descriptors. A range is punched only
//! when the file still holds, there, the bytes that were archived ([`Fingerprint`]),
//! so a truncation and rewrite in between (copytruncate, `> app.log`) zeroes
//! nothing. A file with more than one name is never a candidate: freeing one name
//! frees nothing, and punching it would zero it under every name.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::os::unix::fs::FileExt as _;

use rustix::fs::{
    AtFlags, Dir, FallocateFlags, FileType, Mode, OFlags, RenameFlags, SeekFrom, Stat, fallocate,
    fstat, openat, renameat_with, seek, statat, unlinkat,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use super::lease;
use crate::glob;

/// A file's identity: device and inode (a name can be reused, these cannot while
/// the file exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

/// What a file looked like when it was scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub id: FileId,
    pub size: u64,
    /// Bytes allocated on disk (holes excluded): what deleting it frees.
    pub allocated: u64,
    pub modified: SystemTime,
    /// The filesystem's preferred I/O size: holes are punched in whole ones.
    pub block: u64,
    /// Its names (hard links): more than one and it is never touched.
    pub links: u64,
}

impl Shape {
    fn of(stat: &Stat) -> Self {
        let secs = u64::try_from(stat.st_mtime).unwrap_or(0);
        let nanos = u32::try_from(stat.st_mtime_nsec).unwrap_or(0);
        Self {
            id: FileId {
                dev: stat.st_dev,
                ino: stat.st_ino,
            },
            size: u64::try_from(stat.st_size).unwrap_or(0),
            allocated: u64::try_from(stat.st_blocks).unwrap_or(0) * 512,
            modified: SystemTime::UNIX_EPOCH + Duration::new(secs, nanos),
            block: u64::try_from(stat.st_blksize).unwrap_or(4096).max(512),
            links: stat.st_nlink,
        }
    }
}

/// A regular file inside a configured dir that matches the patterns.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index of its dir in `maintenance.dirs`.
    pub root: usize,
    /// The path inside that dir (`sub/app.log`).
    pub inside: PathBuf,
    /// The directory it was found in, held open.
    parent: Arc<OwnedFd>,
    name: CString,
    pub shape: Shape,
}

impl Candidate {
    /// The full path, for messages.
    pub fn display_path(&self, dirs: &[PathBuf]) -> PathBuf {
        dirs.get(self.root)
            .map_or_else(|| self.inside.clone(), |d| d.join(&self.inside))
    }

    /// Opens it for reading, through its directory, refusing a symlink, and checks
    /// it is still the file scanned.
    pub fn open_read(&self) -> Result<(File, Shape), FileError> {
        self.open(OFlags::RDONLY)
    }

    fn open(&self, access: OFlags) -> Result<(File, Shape), FileError> {
        let fd = openat(
            &*self.parent,
            self.name.as_c_str(),
            access | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| FileError::io("open", e))?;
        let stat = fstat(&fd).map_err(|e| FileError::io("fstat", e))?;
        let shape = Shape::of(&stat);
        if shape.id != self.shape.id
            || FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile
        {
            return Err(FileError::Replaced);
        }
        Ok((File::from(fd), shape))
    }

    /// Whether no other process has the file open, proven now: `Ok(how)`, or
    /// `Err(why not)` (then it must be treated as live).
    pub fn closed(&self, writers: &Writers) -> Result<&'static str, String> {
        let (file, shape) = self.open(OFlags::RDONLY).map_err(|e| e.to_string())?;
        match lease::take_write(&file) {
            Ok(()) => {
                let _ = lease::release(&file);
                Ok("proven closed: write lease")
            }
            Err(e) => writers.judge(shape.id, e),
        }
    }

    /// Removes the file if it is still the file archived, unchanged since
    /// (`archived`: its shape when it was read), and proven closed at this moment:
    /// under a write lease it is renamed aside, the lease is checked unbroken (no
    /// one opened it meanwhile, or it goes back), and removed; without a lease
    /// only when `/proc` (`writers()`, read now) shows every process and no writer.
    /// `Err(FileError::Open)`: someone has it open; only its archived prefix may go.
    pub fn unlink_if_closed(
        &self,
        archived: &Shape,
        writers: impl FnOnce() -> Writers,
    ) -> Result<&'static str, FileError> {
        let (file, now) = self.open(OFlags::RDONLY)?;
        if now.links > 1 {
            return Err(FileError::Linked(now.links));
        }
        if now.size != archived.size || now.modified != archived.modified {
            return Err(FileError::Changed);
        }
        match lease::take_write(&file) {
            Ok(()) => {
                let done = self.unlink_leased(&file);
                let _ = lease::release(&file);
                done
            }
            Err(e) => {
                writers().judge(now.id, e).map_err(FileError::Open)?;
                let stat = statat(
                    &*self.parent,
                    self.name.as_c_str(),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| FileError::io("stat", e))?;
                if Shape::of(&stat).id != archived.id {
                    return Err(FileError::Replaced);
                }
                unlinkat(&*self.parent, self.name.as_c_str(), AtFlags::empty())
                    .map_err(|e| FileError::io("unlink", e))?;
                Ok("deleted (proven closed: /proc shows no writer)")
            }
        }
    }

    /// The unlink under a write lease on `file`. An `open` that looked the name up
    /// before the lease waits on it, and would get the inode once it is released:
    /// renamed aside first, a broken lease says so, and the file goes back.
    fn unlink_leased(&self, file: &File) -> Result<&'static str, FileError> {
        let aside = CString::new(format!(".canarygate-deleting-{}", self.shape.id.ino))
            .map_err(|_| FileError::Replaced)?;
        let (dir, name) = (&*self.parent, self.name.as_c_str());
        renameat_with(dir, name, dir, aside.as_c_str(), RenameFlags::NOREPLACE)
            .map_err(|e| FileError::io("rename", e))?;
        let intact = lease::held(file).map_err(|e| FileError::io("fcntl", e))?;
        if intact != lease::Held::Write {
            renameat_with(dir, aside.as_c_str(), dir, name, RenameFlags::NOREPLACE)
                .map_err(|e| FileError::io("rename back", e))?;
            return Err(FileError::Open(
                "opened while it was being deleted (the lease broke): kept".to_owned(),
            ));
        }
        unlinkat(dir, aside.as_c_str(), AtFlags::empty())
            .map_err(|e| FileError::io("unlink", e))?;
        Ok("deleted (proven closed: write lease)")
    }

    /// Frees `[start, end)` of the file in place (both multiples of its block),
    /// keeping its size, when it still holds the bytes archived there: at least
    /// `archived_end` long and matching `fingerprint`. A writer's offsets stay
    /// valid and its next line lands after the hole.
    pub fn punch(
        &self,
        start: u64,
        end: u64,
        archived_end: u64,
        fingerprint: &Fingerprint,
    ) -> Result<u64, FileError> {
        if end <= start {
            // Less than a block archived: nothing whole to free.
            return Ok(0);
        }
        let (file, now) = self.open(OFlags::RDWR)?;
        if now.links > 1 {
            return Err(FileError::Linked(now.links));
        }
        if now.size < archived_end {
            return Err(FileError::Truncated {
                now: now.size,
                archived: archived_end,
            });
        }
        if !fingerprint.matches(&file)? {
            return Err(FileError::Rewritten);
        }
        fallocate(
            &file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            start,
            end.saturating_sub(start),
        )
        .map_err(|e| {
            if e == Errno::OPNOTSUPP || e == Errno::NOSYS {
                FileError::NoPunch
            } else {
                FileError::io("fallocate", e)
            }
        })?;
        Ok(end - start)
    }
}

/// Bytes sampled from the range a file's archive holds, and their hash: enough to
/// tell, before punching, that the range still holds them (a log truncated and
/// written again has other bytes at its first block, at the least). Up to
/// [`SAMPLES`] blocks of 4 KiB spread over the range, first and last included; a
/// range of 64 KiB or less is hashed whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    ranges: Vec<(u64, u64)>,
    hash: Vec<u8>,
}

/// Blocks sampled by a [`Fingerprint`].
pub const SAMPLES: u64 = 16;
const SAMPLE: u64 = 4096;

/// A fingerprint being taken from the bytes as they are read.
pub struct Fingerprinting {
    ranges: Vec<(u64, u64)>,
    hasher: Sha256,
}

impl Fingerprinting {
    /// For the range `[start, end)`.
    pub fn new(start: u64, end: u64) -> Self {
        let len = end.saturating_sub(start);
        let ranges = if len <= SAMPLES * SAMPLE {
            vec![(start, end)]
        } else {
            let step = (len - SAMPLE) / (SAMPLES - 1);
            (0..SAMPLES)
                .map(|k| {
                    let at = start + k * step;
                    (at, at + SAMPLE)
                })
                .collect()
        };
        Self {
            ranges,
            hasher: Sha256::new(),
        }
    }

    /// The bytes `bytes` read at `offset`, in order.
    pub fn feed(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        for &(a, b) in &self.ranges {
            let (from, to) = (a.max(offset), b.min(end));
            if from < to {
                let at = usize::try_from(from - offset).unwrap_or(usize::MAX);
                let until = usize::try_from(to - offset).unwrap_or(usize::MAX);
                self.hasher.update(&bytes[at..until]);
            }
        }
    }

    pub fn finish(self) -> Fingerprint {
        Fingerprint {
            ranges: self.ranges,
            hash: self.hasher.finalize().to_vec(),
        }
    }
}

impl Fingerprint {
    /// Whether `file` holds, now, the bytes it was taken from.
    pub fn matches(&self, file: &File) -> Result<bool, FileError> {
        let mut hasher = Sha256::new();
        let mut buf = Vec::new();
        for &(a, b) in &self.ranges {
            buf.resize(usize::try_from(b - a).unwrap_or(0), 0);
            match file.read_exact_at(&mut buf, a) {
                Ok(()) => hasher.update(&buf),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => {
                    return Err(FileError::io(
                        "read",
                        Errno::from_io_error(&e).unwrap_or(Errno::IO),
                    ));
                }
            }
        }
        Ok(hasher.finalize().as_slice() == self.hash.as_slice())
    }
}

/// Where a file's data starts: after the holes punched by earlier rounds (`size`
/// when it is all hole).
pub fn data_start(file: &File, size: u64) -> Result<u64, FileError> {
    match seek(file, SeekFrom::Data(0)) {
        Ok(offset) => Ok(offset.min(size)),
        Err(Errno::NXIO) => Ok(size),
        Err(e) => Err(FileError::io("seek", e)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{op}: {errno}")]
    Io { op: &'static str, errno: Errno },
    #[error("the name now holds another file (renamed, replaced or a symlink): left alone")]
    Replaced,
    #[error("the file changed while it was archived (written to): not deleted")]
    Changed,
    #[error("this filesystem cannot punch holes (FALLOC_FL_PUNCH_HOLE unsupported)")]
    NoPunch,
    #[error("still open: {0}")]
    Open(String),
    #[error("it has {0} names (hard links): freeing one frees nothing; left whole")]
    Linked(u64),
    #[error(
        "it is now {now} bytes, shorter than the {archived} archived (truncated meanwhile): nothing punched"
    )]
    Truncated { now: u64, archived: u64 },
    #[error(
        "the archived range holds other bytes now (truncated and written again): nothing punched"
    )]
    Rewritten,
}

impl FileError {
    fn io(op: &'static str, errno: Errno) -> Self {
        Self::Io { op, errno }
    }
}

pub use crate::ops::disk::Usage;

/// The usage of the filesystem holding `path` ([`crate::ops::disk`]: `df`'s figure,
/// the one the proxy's gauge shows too).
pub fn usage(path: &Path) -> Result<Usage, FileError> {
    Usage::read(path).map_err(|e| FileError::io("statvfs", e))
}

/// What a scan found, and what it skipped on the way (for the logs).
#[derive(Debug, Default)]
pub struct Scan {
    pub candidates: Vec<Candidate>,
    /// Matching files with more than one name: never archived, punched or deleted.
    pub linked: Vec<(usize, PathBuf, u64)>,
    /// Problems met (an unreadable subdirectory, say), as messages.
    pub problems: Vec<String>,
}

/// Subdirectories deeper than this are not searched (log trees are shallow).
const MAX_DEPTH: usize = 8;

/// Finds the candidates in `dirs`: regular files whose name matches a pattern and
/// whose path inside the dir (or name) matches no exclude. Symlinks are never
/// followed, to files or to directories; other filesystems mounted inside a dir
/// are not entered.
pub fn scan(dirs: &[PathBuf], patterns: &[String], exclude: &[String]) -> Scan {
    let mut out = Scan::default();
    for (root, dir) in dirs.iter().enumerate() {
        let fd = match rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => {
                out.problems.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        let dev = match fstat(&fd) {
            Ok(stat) => stat.st_dev,
            Err(e) => {
                out.problems.push(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        let mut walk = Walk {
            root,
            root_dev: dev,
            patterns,
            exclude,
            out: &mut out,
            dir,
        };
        walk.dir(&Arc::new(fd), &PathBuf::new(), 0);
    }
    out
}

struct Walk<'a> {
    root: usize,
    root_dev: u64,
    patterns: &'a [String],
    exclude: &'a [String],
    out: &'a mut Scan,
    dir: &'a Path,
}

impl Walk<'_> {
    fn dir(&mut self, fd: &Arc<OwnedFd>, inside: &Path, depth: usize) {
        let entries = match Dir::read_from(&**fd) {
            Ok(entries) => entries,
            Err(e) => {
                self.problem(inside, e);
                return;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.problem(inside, e);
                    break;
                }
            };
            let name = entry.file_name();
            let bytes = name.to_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            let stat = match statat(&**fd, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(e) => {
                    self.problem(&inside.join(OsStr::from_bytes(bytes)), e);
                    continue;
                }
            };
            let path = inside.join(OsStr::from_bytes(bytes));
            match FileType::from_raw_mode(stat.st_mode) {
                FileType::Directory if depth < MAX_DEPTH && stat.st_dev == self.root_dev => {
                    match openat(
                        &**fd,
                        name,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(sub) => self.dir(&Arc::new(sub), &path, depth + 1),
                        Err(e) => self.problem(&path, e),
                    }
                }
                FileType::RegularFile if self.wanted(&path) && stat.st_nlink > 1 => {
                    self.out.linked.push((self.root, path, stat.st_nlink));
                }
                FileType::RegularFile if self.wanted(&path) => {
                    self.out.candidates.push(Candidate {
                        root: self.root,
                        inside: path,
                        parent: Arc::clone(fd),
                        name: name.to_owned(),
                        shape: Shape::of(&stat),
                    });
                }
                // Symlinks, devices, sockets, FIFOs, other filesystems: never.
                _ => {}
            }
        }
    }

    fn wanted(&self, inside: &Path) -> bool {
        let name = inside
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        let inside = inside.to_string_lossy();
        self.patterns.iter().any(|p| glob::matches(p, &name))
            && !self
                .exclude
                .iter()
                .any(|p| glob::matches(p, &name) || glob::matches(p, &inside))
    }

    fn problem(&mut self, inside: &Path, e: Errno) {
        self.out
            .problems
            .push(format!("{}: {e}", self.dir.join(inside).display()));
    }
}

/// Who writes the files of interest, as `/proc` shows it.
#[derive(Debug, Default)]
pub struct Writers {
    /// Files some other process has open for writing.
    pub writing: HashSet<FileId>,
    /// Processes whose descriptors could not be read (another user's, without
    /// `CAP_SYS_PTRACE`): while any, `/proc` proves nothing closed.
    pub unreadable: usize,
}

impl Writers {
    /// The `/proc` verdict on `id` after the lease was refused with `lease`.
    fn judge(&self, id: FileId, lease: Errno) -> Result<&'static str, String> {
        if lease == Errno::AGAIN {
            return Err("another process has it open (the write lease was refused)".to_owned());
        }
        if self.writing.contains(&id) {
            return Err("a process has it open for writing (/proc)".to_owned());
        }
        if self.unreadable > 0 {
            return Err(format!(
                "not provably closed: no write lease ({lease}; needs the owner or CAP_LEASE) and \
                 {} processes' open files unreadable",
                self.unreadable
            ));
        }
        Ok("proven closed: /proc shows no writer")
    }
}

/// The files among `wanted` that some other process has open for writing, read
/// from `/proc/<pid>/fd` and `fdinfo`; and how many processes could not be looked
/// at (another user's, without CAP_SYS_PTRACE).
pub fn open_for_writing(wanted: &HashSet<FileId>) -> Writers {
    let mut writing = HashSet::new();
    let mut unreadable = 0;
    let own = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Writers {
            writing,
            unreadable: 1,
        };
    };
    for entry in procs.flatten() {
        let pid = entry.file_name();
        let pid = pid.to_string_lossy();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == own {
            continue;
        }
        let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
            Ok(fds) => fds,
            // Gone meanwhile: it holds nothing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => {
                unreadable += 1;
                continue;
            }
        };
        for fd in fds.flatten() {
            let Ok(stat) = rustix::fs::stat(fd.path()) else {
                continue;
            };
            let id = FileId {
                dev: stat.st_dev,
                ino: stat.st_ino,
            };
            if !wanted.contains(&id) || writing.contains(&id) {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            if writes(&info) {
                writing.insert(id);
            }
        }
    }
    Writers {
        writing,
        unreadable,
    }
}

/// Whether an fdinfo's `flags:` (octal) say O_WRONLY or O_RDWR.
fn writes(fdinfo: &str) -> bool {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & 0b11 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_flags_tell_writers() {
        assert!(writes("pos:\t0\nflags:\t0102001\nmnt_id:\t30\n"));
        assert!(writes("flags:\t02\n"));
        assert!(!writes("pos:\t0\nflags:\t0100000\n"));
        assert!(!writes("nothing"));
    }
}
