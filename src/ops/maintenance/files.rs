//! The file system as maintenance may touch it: candidates found without ever
//! following a symlink or leaving the configured dirs, each file opened, re-checked
//! and removed through the descriptor of the directory it was found in (`openat`
//! with `O_NOFOLLOW`, `unlinkat`), so a name swapped for a symlink between the scan
//! and the action is refused, not followed. Also: who writes a file (`/proc`), where
//! a file's data starts (`SEEK_DATA`), freeing a prefix in place
//! (`FALLOC_FL_PUNCH_HOLE`), and filesystem usage (`statvfs`).

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustix::fs::{
    AtFlags, Dir, FallocateFlags, FileType, Mode, OFlags, SeekFrom, Stat, fallocate, fstat, openat,
    seek, statat, unlinkat,
};
use rustix::io::Errno;

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

    /// Removes the file if its name still holds the file archived and it has not
    /// changed since (`archived` is its shape when it was read).
    pub fn unlink_if_unchanged(&self, archived: &Shape) -> Result<(), FileError> {
        let stat = statat(
            &*self.parent,
            self.name.as_c_str(),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| FileError::io("stat", e))?;
        let now = Shape::of(&stat);
        if now.id != archived.id {
            return Err(FileError::Replaced);
        }
        if now.size != archived.size || now.modified != archived.modified {
            return Err(FileError::Changed);
        }
        unlinkat(&*self.parent, self.name.as_c_str(), AtFlags::empty())
            .map_err(|e| FileError::io("unlink", e))
    }

    /// Frees `[start, end)` of the file in place (both multiples of its block),
    /// keeping its size: a writer's offsets stay valid and its next line lands
    /// after the hole.
    pub fn punch(&self, start: u64, end: u64) -> Result<(), FileError> {
        if end <= start {
            // Less than a block archived: nothing whole to free.
            return Ok(());
        }
        let (file, _) = self.open(OFlags::WRONLY)?;
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
        })
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

/// The files among `wanted` that some other process has open for writing, read
/// from `/proc/<pid>/fd` and `fdinfo`; and how many processes could not be looked
/// at (another user's, without CAP_SYS_PTRACE: their writers go unseen, which is
/// why a recently written file counts as live anyway).
pub fn open_for_writing(wanted: &HashSet<FileId>) -> (HashSet<FileId>, usize) {
    let mut writing = HashSet::new();
    let mut unreadable = 0;
    let own = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (writing, 0);
    };
    for entry in procs.flatten() {
        let pid = entry.file_name();
        let pid = pid.to_string_lossy();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            unreadable += 1;
            continue;
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
    (writing, unreadable)
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
