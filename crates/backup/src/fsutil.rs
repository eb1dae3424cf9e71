//! Small file-system helpers: atomic replacement and directory fsync.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory holding `path` (`.` for a bare file name).
pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Flushes a directory's entries (new names, renames, removals) to disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Prefix of the temporary files written next to `path` (removed at open).
pub(crate) fn temp_prefix(path: &Path) -> OsString {
    let mut s = OsString::from(".");
    s.push(path.file_name().unwrap_or_default());
    s.push(".tmp-");
    s
}

/// A fresh temporary path next to `path`.
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut name = temp_prefix(path);
    name.push(format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    parent_dir(path).join(name)
}

/// Writes a file atomically: `fill` writes the content into a new temporary file in the same
/// directory, which is then fsynced, renamed over `path`, and the directory fsynced. At every
/// instant `path` names either the old or the new complete file.
pub(crate) fn write_atomic<T>(
    path: &Path,
    fill: impl FnOnce(&File) -> io::Result<T>,
) -> io::Result<T> {
    let tmp = temp_path(path);
    let result = (|| {
        let f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let t = fill(&f)?;
        f.sync_data()?;
        drop(f);
        fs::rename(&tmp, path)?;
        Ok(t)
    })();
    match result {
        Ok(t) => {
            sync_dir(&parent_dir(path))?;
            Ok(t)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Removes temporary files left next to `path` by a process that crashed mid-write.
pub(crate) fn remove_stale_temps(path: &Path) -> io::Result<()> {
    let prefix = temp_prefix(path);
    let prefix = prefix.as_encoded_bytes();
    let dir = parent_dir(path);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().as_encoded_bytes().starts_with(prefix) {
            tracing::debug!(file = ?entry.path(), "removing stale temporary backup file");
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Renames a bad file aside to `<path>.bad-<unix seconds>[-n]` and returns the new name.
pub(crate) fn move_aside(path: &Path, tag: &str) -> io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for n in 0u32.. {
        let mut name = path.as_os_str().to_owned();
        name.push(format!(".{tag}-{secs}"));
        if n > 0 {
            name.push(format!("-{n}"));
        }
        let target = PathBuf::from(name);
        if !target.exists() {
            fs::rename(path, &target)?;
            sync_dir(&parent_dir(path))?;
            return Ok(target);
        }
    }
    Err(io::Error::other("no free name to move the file aside"))
}

/// Removes a file; a file that is already gone is fine.
pub(crate) fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The lock file of the backup at `path`: `<path>.lock`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// Takes the exclusive lock of the backup at `path` (an advisory `flock` on
/// `<path>.lock`, held while the returned file is open) and writes this
/// process's id into it. When another holder has it: `Err(Some(pid))` with
/// the pid written by the holder, `Err(None)` if unreadable.
pub(crate) fn lock_backup(path: &Path) -> io::Result<Result<fs::File, Option<u32>>> {
    use std::io::{Read, Seek, Write};
    let lock = lock_path(path);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut s = String::new();
            let _ = f.read_to_string(&mut s);
            return Ok(Err(s.trim().parse().ok()));
        }
        Err(e) => return Err(e.into()),
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(Ok(f))
}
