//! The one module that owns durable writes, directory fsync and locking. Nobody else opens a
//! file for writing under its final name.
//!
//! * [`AtomicFile`]: write under a temp name in the same directory, fsync, rename, fsync the
//!   directory. Dropped without [`AtomicFile::commit`], the temp file is removed, so a failed
//!   writer never leaves a partial file under a final name (a killed one leaves a `.tmp-` file
//!   that readers ignore and the next writer may sweep).
//! * [`RefLock`]: git's `update-ref` protocol for small sidecars such as `latest`: create
//!   `NAME.lock` with `O_CREAT|O_EXCL`, read and compare the old value, write the new one into
//!   the lock file, fsync, rename over `NAME`, fsync the directory.
//! * [`HostLock`]: an exclusive `flock` (std `File::lock`) for host-local mutual exclusion.
//! * [`scratch_file`]: nameless scratch files, also where the file system lacks `O_TMPFILE`;
//!   [`fsync_dir`] copes with file systems that have no directory fsync (docs/FORMATS.md §1).

use crate::error::{Error, IoContext, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Marker inside every temp name; readers and sweepers recognise temps by it.
pub const TEMP_MARKER: &str = ".tmp-";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// True for names this module uses for in-progress files (`.NAME.tmp-PID-N`).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(TEMP_MARKER)
}

/// An error met while writing `temp` on its way to `target`: named by `target`, the name the
/// user knows (a temp name means nothing to them and is gone once the temp is removed), with
/// the temp's name in the text.
pub fn temp_io_error(target: &Path, temp: &Path, e: io::Error) -> Error {
    let temp_name = temp.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Error::io(target, io::Error::new(e.kind(), format!("{e} (writing its temp file {temp_name})")))
}

fn temp_path_for(target: &Path) -> PathBuf {
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}{TEMP_MARKER}{}-{n}", std::process::id()))
}

/// fsync a directory so that renames and creations inside it survive power loss.
///
/// Some shared file systems have no directory fsync at all (FUSE file systems without
/// `fsyncdir`, some Ceph and SMB mounts answer `EINVAL` or `EOPNOTSUPP`). There is nothing to
/// wait for on those, and refusing would make every publish fail, so the call succeeds, as
/// PostgreSQL's and Cassandra's directory fsyncs do. Only for a descriptor the kernel has
/// checked is a directory (`O_DIRECTORY`), and only for those two codes: Linux reports a
/// failed writeback as `EIO`, `ENOSPC` or `EDQUOT`, which still fail.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let d = OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(dir).at(dir)?;
    // Tests stand in for such a file system with `fsio.dir_fsync:error` (failpoints build).
    let synced = crate::failpoint::hit("fsio.dir_fsync").map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)).and_then(|()| d.sync_all());
    match synced {
        Err(e) if unsupported_here(&e) => Ok(()),
        r => r.at(dir),
    }
}

/// The file system does not implement the operation (rather than: the operation failed).
fn unsupported_here(e: &io::Error) -> bool {
    // EOPNOTSUPP and ENOTSUP are one value on Linux.
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

/// A nameless scratch file in `dir`, open for reading and writing, gone once it is closed or
/// its process dies: `O_TMPFILE` where the file system has it; elsewhere (NFS, most FUSE file
/// systems: `EOPNOTSUPP`; kernels before 3.11: `EISDIR`) a file created under a temp name and
/// unlinked as soon as it is open. A kill between the two leaves a `.tmp-` name, which readers
/// ignore and sweepers remove. The error does not name `dir`: callers add it.
pub fn scratch_file(dir: &Path) -> io::Result<File> {
    // Tests stand in for a file system without O_TMPFILE with `fsio.o_tmpfile:error`.
    let opened = crate::failpoint::hit("fsio.o_tmpfile")
        .map_err(|_| io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        .and_then(|()| OpenOptions::new().read(true).write(true).custom_flags(libc::O_TMPFILE).mode(0o600).open(dir));
    match opened {
        Err(e) if unsupported_here(&e) || e.raw_os_error() == Some(libc::EISDIR) => named_scratch_file(dir),
        r => r,
    }
}

/// Give the disk space of `len` bytes at `offset` of a scratch file back to the file system
/// (a hole; the file keeps its size). Advisory: where holes cannot be punched (NFS before 4.2,
/// many FUSE file systems) the space comes back when the file is closed.
pub fn release_range(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own; it reads no memory of ours.
        let _ = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Raise this process's soft limit on open files to its hard limit. Every shard of a checkpoint
/// stays open while a tool works on it (mapped and read), so a diff holds one per shard of OLD
/// and of NEW, and a model in a few hundred files passes the usual soft limit of 1024 while
/// the hard limit is far higher (Go's runtime raises it the same way). Where it cannot be
/// raised, opening a file past it fails with "Too many open files" naming the file.
pub fn raise_open_file_limit() {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: plain syscalls on a struct we own.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                let _ = STARTING_OPEN_FILE_LIMIT.set(lim.rlim_cur);
                // An unlimited hard limit is not a value the kernel takes for the soft one.
                let want = if lim.rlim_max == libc::RLIM_INFINITY { 1 << 20 } else { lim.rlim_max };
                if lim.rlim_cur < want {
                    lim.rlim_cur = want;
                    let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
            }
        }
    }
}

/// What a directory entry `path` of type `kind` (as read_dir gives it, links not followed) is
/// for a reader of files: `Some(false)` a regular file, `Some(true)` a symbolic link to one,
/// `None` anything else (a directory, a link to one, a device). A link to nothing is an error
/// naming it (a download or a copy cut short), so callers never leave a file out silently.
pub fn regular_file_through_links(path: &Path, kind: fs::FileType) -> Result<Option<bool>> {
    if !kind.is_symlink() {
        return Ok(kind.is_file().then_some(false));
    }
    match fs::metadata(path) {
        Ok(m) => Ok(m.is_file().then_some(true)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::not_found(path, "a symbolic link to a file that does not exist")),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Bytes an unprivileged writer can still put on the file system holding `dst_dir` for a copy
/// of `src`, or `None` where that count says nothing: statfs failed, or the file system reports
/// no size at all (many FUSE file systems answer zeros), or `src` is on the same file system and
/// it is one whose copy_file_range clones (XFS, btrfs, bcachefs, ZFS, OCFS2), where a copy can
/// take no space. One statfs of `dst_dir`.
// statfs's field types differ across targets (the casts are no-ops on x86-64 Linux only).
#[allow(clippy::unnecessary_cast)]
pub fn room_for_copy(src: &Path, dst_dir: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    const CLONING: [i64; 5] = [0x5846_5342, 0x9123_683e, 0xca45_1a4e, 0x2fc1_2fc1, 0x7461_636f];
    let st = statfs(dst_dir)?;
    if st.f_blocks == 0 {
        return None;
    }
    let same_device = matches!((fs::metadata(src), fs::metadata(dst_dir)), (Ok(a), Ok(b)) if a.dev() == b.dev());
    if same_device && CLONING.contains(&(st.f_type as i64)) {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_bsize as u64))
}

/// Refuse, before anything is written, a copy from `src` that needs `needed` more bytes than the
/// file system of `dst_dir` (or of its nearest existing ancestor) has free for us: exit 10 naming
/// `dst_dir`, what the copy is (`what`) and both sizes. Passes where [`room_for_copy`] can tell
/// nothing. A refusal is certain to be right; passing does not promise the copy fits.
pub fn check_room_for_copy(src: &Path, dst_dir: &Path, needed: u64, what: &str) -> Result<()> {
    let existing = dst_dir.ancestors().find(|d| d.is_dir()).unwrap_or(dst_dir);
    let Some(free) = room_for_copy(src, existing) else { return Ok(()) };
    if needed <= free {
        return Ok(());
    }
    Err(Error::Io {
        path: dst_dir.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::StorageFull,
            format!(
                "not enough free space to {what}: the copy needs {} more ({needed} bytes), the file system has {} free",
                indicatif::HumanBytes(needed),
                indicatif::HumanBytes(free)
            ),
        ),
    })
}

fn statfs(dir: &Path) -> Option<libc::statfs> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: a NUL-terminated path and a struct of the size the call writes.
    (unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } == 0).then(|| unsafe { st.assume_init() })
}

/// The soft open-file limit this process started with, if [`raise_open_file_limit`] ran.
static STARTING_OPEN_FILE_LIMIT: std::sync::OnceLock<libc::rlim_t> = std::sync::OnceLock::new();

/// Let `command` start with the soft open-file limit this process started with: the raised one
/// is the tool's own, and programs that still use `select()` fail on descriptors past 1024
/// (Go's runtime restores it for children the same way).
pub fn start_with_original_open_file_limit(command: &mut std::process::Command) {
    #[cfg(unix)]
    if let Some(&soft) = STARTING_OPEN_FILE_LIMIT.get() {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec and only makes two system
        // calls (getrlimit, setrlimit), which are async-signal-safe; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur > soft {
                    lim.rlim_cur = soft;
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
                Ok(())
            });
        }
    }
}

/// [`scratch_file`] where `O_TMPFILE` is missing.
fn named_scratch_file(dir: &Path) -> io::Result<File> {
    let path = temp_path_for(&dir.join("scratch"));
    let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
    fs::remove_file(&path)?;
    Ok(file)
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Create a directory (and parents) and fsync each parent whose entry changed.
pub fn create_dir_durable(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir_durable(parent)?;
        }
    }
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(parent_of(dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// A file being written under a temp name beside its final name.
pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    pub fn create(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let temp = temp_path_for(&target);
        let file = OpenOptions::new().write(true).read(true).create_new(true).mode(0o644).open(&temp).map_err(|e| temp_io_error(&target, &temp, e))?;
        Ok(AtomicFile { target, temp, file: Some(file) })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("AtomicFile used after commit")
    }

    /// An error writing this file, named by its final name ([`temp_io_error`]).
    pub fn io_error(&self, e: io::Error) -> Error {
        temp_io_error(&self.target, &self.temp, e)
    }

    /// Name the file will be committed under, for a writer that learns it only at the end
    /// (delta data files are numbered `-of-N` once N is known). Same directory only: the
    /// rename must not cross file systems.
    pub fn set_target(&mut self, target: PathBuf) {
        assert_eq!(parent_of(&target), parent_of(&self.target), "AtomicFile target must stay in its directory");
        self.target = target;
    }

    /// Like [`AtomicFile::create`], opened with `O_DIRECT` where the file system takes it (so a
    /// large sequential write bypasses the page cache); the flag says whether it did.
    pub fn create_direct(target: impl AsRef<Path>) -> Result<(Self, bool)> {
        let target = target.as_ref().to_path_buf();
        let temp = temp_path_for(&target);
        let open = |flags: i32| OpenOptions::new().write(true).read(true).create_new(true).mode(0o644).custom_flags(flags).open(&temp);
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(0).map_err(|e| temp_io_error(&target, &temp, e))?, false),
            Err(e) => return Err(temp_io_error(&target, &temp, e)),
        };
        Ok((AtomicFile { target, temp, file: Some(file) }, direct))
    }

    /// fsync the data and rename over the final name, owing the directory fsync to `dirs`:
    /// for batches, where one fsync per directory (in [`DirSync::sync`], before anything
    /// reports the new names) replaces one per file.
    pub fn commit_deferred(mut self, dirs: &DirSync) -> Result<()> {
        self.sync()?;
        self.rename_into_place()?;
        dirs.add(parent_of(&self.target).to_path_buf());
        Ok(())
    }

    /// fsync the temp's data. On failure (EIO, a full disk on a file system that allocates at
    /// writeback) the file is still ours, so dropping `self` removes the temp.
    fn sync(&self) -> Result<()> {
        self.file.as_ref().expect("AtomicFile committed twice").sync_all().map_err(|e| self.io_error(e))
    }

    /// Close the temp and rename it over the final name; on failure the temp goes.
    fn rename_into_place(&mut self) -> Result<()> {
        // Closed first: on NFS the close is what sends an unsynced file's data to the server.
        drop(self.file.take().expect("AtomicFile committed twice"));
        rename_or_remove(&self.temp, &self.target)
    }

    /// Rename over the final name without any fsync: the new name and bytes are at once what
    /// every process sees, but a crash of the host may lose or tear them.
    pub fn commit_unsynced(mut self) -> Result<()> {
        self.rename_into_place()
    }

    /// fsync the data, rename over the final name, fsync the directory. Any failure before the
    /// rename removes the temp.
    pub fn commit(mut self) -> Result<()> {
        crate::failpoint!("fsio.before_fsync");
        self.sync()?;
        crate::failpoint!("fsio.before_rename");
        self.rename_into_place()?;
        crate::failpoint!("fsio.before_dir_fsync");
        fsync_dir(parent_of(&self.target))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.as_mut().expect("AtomicFile used after commit").write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().expect("AtomicFile used after commit").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Rename `from` (a temp or lock file of ours) over `to`; if that fails, remove `from`, so an
/// error leaves neither a stray temp nor a lock that blocks the next writer.
fn rename_or_remove(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| {
        let _ = fs::remove_file(from);
        Error::io(to, e)
    })
}

/// Ask the kernel to start writing `len` bytes at `offset` of `file` back to disk now, without
/// waiting, so the `fsync` of [`AtomicFile::commit`] finds most of a file written while it was
/// still being produced. Advisory: where the call does not exist or the file system refuses it,
/// nothing happens and the fsync does all the work.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own; it reads no memory of ours.
        // Failure (EINVAL/ESPIPE on odd file systems) only means no early writeback.
        let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Write `bytes` to `path` atomically and durably.
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path.as_ref())?;
    f.write_all(bytes).map_err(|e| f.io_error(e))?;
    f.commit()
}

/// Copy a file to `dst` atomically and durably (reflink or copy_file_range where the kernel can).
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<u64> {
    copy_atomic_with(src, dst, true)
}

/// [`copy_atomic`]; with `durable` false the copy is renamed into place without fsyncs, atomic
/// for other processes (and for this one dying) but not across a crash of the host
/// (`delta-apply --no-fsync`, which detects reboots).
pub fn copy_atomic_with(src: &Path, dst: &Path, durable: bool) -> Result<u64> {
    let f = AtomicFile::create(dst)?;
    let mut input = File::open(src).at(src)?;
    let mut out = f.file();
    let n = io::copy(&mut input, &mut out).map_err(|e| copy_failed(src, &f, e))?;
    if durable {
        f.commit()?;
    } else {
        f.commit_unsynced()?;
    }
    Ok(n)
}

/// The error of a copy from `src` into `dst`, on the side it came from. `io::copy` moves the
/// bytes in the kernel (copy_file_range, sendfile), so one errno stands for both ends; the ones
/// only a destination raises (full disk or quota, file too large, read-only file system) name
/// `dst`, so a full LOCAL disk is not reported as a problem of the shared BASE it was seeded from.
fn copy_failed(src: &Path, dst: &AtomicFile, e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::EROFS) => dst.io_error(e),
        _ => Error::io(src, e),
    }
}

/// Directory fsyncs owed by a batch of [`AtomicFile::commit_deferred`] calls and directory
/// creations: one fsync per directory, however many names changed in it.
#[derive(Debug, Default)]
pub struct DirSync {
    dirs: std::sync::Mutex<std::collections::BTreeSet<PathBuf>>,
}

impl DirSync {
    /// Owe an fsync of `dir`.
    pub fn add(&self, dir: PathBuf) {
        self.dirs.lock().expect("dir set").insert(dir);
    }

    /// fsync every owed directory (in parallel: the fsyncs of one batch overlap).
    pub fn sync(&self) -> Result<()> {
        use rayon::prelude::*;
        let dirs: Vec<PathBuf> = std::mem::take(&mut *self.dirs.lock().expect("dir set")).into_iter().collect();
        dirs.par_iter().try_for_each(|d| fsync_dir(d))
    }
}

/// [`create_dir_durable`], with the parent fsyncs owed to `dirs` instead of done now.
pub fn create_dir_deferred(dir: &Path, dirs: &DirSync) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = parent_of(dir);
    create_dir_deferred(parent, dirs)?;
    match fs::create_dir(dir) {
        Ok(()) => {
            dirs.add(parent.to_path_buf());
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Remove a file and fsync its directory; a missing file is not an error.
pub fn remove_durable(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => fsync_dir(parent_of(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Hidden name prefix of a directory tree being removed ([`remove_tree_durable`]): no reader
/// resolves it, and `delta-gc` sweeps what a killed remover left.
pub const DELETING_PREFIX: &str = ".deleting-";

/// Remove the directory tree `dir` so that it disappears at once: rename it to a hidden
/// `.deleting-` name in the same parent, fsync the parent, then remove the tree and fsync the
/// parent again. Killed in between, only a hidden tree is left.
pub fn remove_tree_durable(dir: &Path) -> Result<()> {
    let parent = parent_of(dir);
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let hidden = parent.join(format!("{DELETING_PREFIX}{name}-{}", std::process::id()));
    fs::rename(dir, &hidden).at(dir)?;
    fsync_dir(parent)?;
    fs::remove_dir_all(&hidden).at(&hidden)?;
    fsync_dir(parent)
}

/// git's lockfile protocol for one small sidecar file (`latest`, cursors, counters).
pub struct RefLock {
    target: PathBuf,
    lock: PathBuf,
    file: Option<File>,
}

/// How long [`RefLock::acquire`] retries before reporting the lock busy.
pub const REF_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

impl RefLock {
    pub fn lock_path(target: &Path) -> PathBuf {
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        target.with_file_name(format!("{name}.lock"))
    }

    /// Create `TARGET.lock` exclusively, retrying with jitter until `timeout`.
    pub fn acquire(target: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let lock = Self::lock_path(&target);
        let start = Instant::now();
        let mut backoff_ms = 1u64;
        loop {
            match OpenOptions::new().write(true).create_new(true).mode(0o644).open(&lock) {
                Ok(file) => return Ok(RefLock { target, lock, file: Some(file) }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if start.elapsed() >= timeout {
                        let age = fs::metadata(&lock)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| SystemTime::now().duration_since(t).ok())
                            .map(|d| format!("{}s old", d.as_secs()))
                            .unwrap_or_else(|| "age unknown".into());
                        return Err(Error::Locked {
                            path: lock,
                            reason: format!("held by another writer for more than {:?} ({age}); if no writer is running, a crashed one left it: remove it by hand", timeout),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(backoff_ms + jitter_ms(backoff_ms)));
                    backoff_ms = (backoff_ms * 2).min(100);
                }
                Err(e) => return Err(Error::io(&lock, e)),
            }
        }
    }

    /// Current contents of the target (None if it does not exist).
    pub fn read_current(&self) -> Result<Option<String>> {
        match fs::read_to_string(&self.target) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&self.target, e)),
        }
    }

    /// Write the new value into the lock, fsync, rename over the target, fsync the directory.
    /// Any failure before the rename (a full disk, EIO) removes the lock, as git's does: a lock
    /// left by an error would block every later writer until someone removed it by hand.
    pub fn commit(mut self, contents: &[u8]) -> Result<()> {
        let file = self.file.as_mut().expect("RefLock committed twice");
        file.write_all(contents).at(&self.lock)?;
        file.sync_all().at(&self.lock)?;
        crate::failpoint!("reflock.before_rename");
        // Closed before the rename (until here, dropping `self` removes the lock).
        drop(self.file.take());
        rename_or_remove(&self.lock, &self.target)?;
        fsync_dir(parent_of(&self.target))
    }
}

impl Drop for RefLock {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.lock);
        }
    }
}

/// Whether [`HELD_LOCK_ENV`] names `path` (as the same file): an ancestor holds it.
fn held_by_ancestor(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(held) = std::env::var_os(HELD_LOCK_ENV) else { return false };
    match (fs::metadata(&held), fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn jitter_ms(scale: u64) -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    (nanos as u64 ^ std::process::id() as u64) % (scale + 1)
}

/// Wait for an exclusive flock of the open file `f` (`path` names it in errors). False, without
/// a lock, where the file system has none (some FUSE mounts answer ENOSYS, EOPNOTSUPP or
/// ENOLCK): for a caller whose lock only guards against a second instance of itself, which
/// then rests on the operator. Released by `f.unlock()` or when `f` is closed.
pub fn lock_where_supported(f: &File, path: &Path) -> Result<bool> {
    match f.lock() {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::Unsupported || matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::ENOLCK)) => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Set by a process that runs a command while it holds a [`HostLock`] (delta-follow's reload):
/// the lock file's absolute path. A descendant that asks for that lock would wait for its own
/// ancestor, which waits for it: it is refused at once instead.
pub const HELD_LOCK_ENV: &str = "DISAGG_HELD_LOCK";

/// An exclusive advisory lock (flock) on a host-local lock file; released on drop or process death.
pub struct HostLock {
    file: File,
    path: PathBuf,
}

impl HostLock {
    /// Wait until the lock is ours, or fail after `timeout` (None: wait forever). Polled, not a
    /// blocking flock, so that a stop signal ([`crate::stop`]) ends the wait: a restarted
    /// flock would keep a SIGTERM'd waiter alive until the holder finished.
    pub fn acquire(path: impl AsRef<Path>, timeout: Option<Duration>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).open(&path).at(&path)?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if held_by_ancestor(&path) => {
                    return Err(Error::Locked {
                        path,
                        reason: format!("held by the process that runs this command ({HELD_LOCK_ENV} names it), which waits for the command to finish: run this outside it (delta-follow's reload must not pull the LOCAL the follower has just pulled)"),
                    })
                }
                Err(fs::TryLockError::WouldBlock) if timeout.is_none_or(|t| start.elapsed() < t) => {
                    crate::stop::check()?;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::Locked { path, reason: format!("still held after {:?}", timeout.unwrap_or_default()) })
                }
                Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
        }
        Ok(HostLock { file, path })
    }

    /// Take the lock if it is free right now.
    pub fn try_acquire(path: impl AsRef<Path>) -> Result<Option<Self>> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).open(&path).at(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(HostLock { file, path })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file system's clock, read by stamping the lock file ([`file_system_now`]).
    pub fn file_system_now(&self) -> Result<SystemTime> {
        file_system_now(&self.file).at(&self.path)
    }
}

/// What time it is by the clock that dates the files of the directory `file` is in: its times
/// are set to "now" by whoever keeps them (this kernel; on NFS the server, as UTIME_NOW goes
/// out as set-to-server-time) and read back. Ages of files that other hosts wrote are measured
/// against it, not against this host's clock, which may be off by minutes.
pub fn file_system_now(file: &File) -> io::Result<SystemTime> {
    use std::os::fd::AsRawFd;
    // SAFETY: a null `times` sets both times of the open file to the current time.
    if unsafe { libc::futimens(file.as_raw_fd(), std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    file.metadata()?.modified()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    fn scratch_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("disagg-fsio-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn names(dir: &Path) -> Vec<String> {
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
    }

    fn round_trip(mut f: File) {
        f.write_all(b"spilled payload").unwrap();
        f.rewind().unwrap();
        let mut back = String::new();
        f.read_to_string(&mut back).unwrap();
        assert_eq!(back, "spilled payload");
    }

    #[test]
    fn the_file_systems_clock_is_read_by_stamping_a_file() {
        let d = scratch_dir("fsnow");
        let lock = HostLock::try_acquire(d.join(".gc.lock")).unwrap().unwrap();
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        lock.file.set_modified(hour_ago).unwrap();
        let before = SystemTime::now();
        let now = lock.file_system_now().unwrap();
        // Local file system: its clock is this kernel's (coarse-grained timestamps may lag a tick).
        let lag = before.duration_since(now).unwrap_or_default();
        assert!(lag < Duration::from_secs(1), "{lag:?}");
        assert!(now.duration_since(hour_ago).unwrap() >= Duration::from_secs(3599));
        assert_eq!(fs::metadata(d.join(".gc.lock")).unwrap().modified().unwrap(), now, "the stamp is the file's mtime");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn scratch_files_have_no_name_with_or_without_o_tmpfile() {
        let dir = scratch_dir("scratch");
        // The O_TMPFILE path (this file system has it) and the fallback for those that do not.
        for f in [scratch_file(&dir).unwrap(), named_scratch_file(&dir).unwrap()] {
            assert!(names(&dir).is_empty(), "a scratch file has a name: {:?}", names(&dir));
            round_trip(f);
        }
        assert!(scratch_file(&dir.join("missing")).is_err());
        // The fallback's name while it has one is a temp name, as docs/FORMATS.md §1 says.
        let name = temp_path_for(&dir.join("scratch")).file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".scratch.tmp-") && is_temp_name(&name), "{name}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_missing_operations_count_as_unsupported() {
        for (code, unsupported) in
            [(libc::EINVAL, true), (libc::EOPNOTSUPP, true), (libc::ENOTSUP, true), (libc::EIO, false), (libc::ENOSPC, false), (libc::EDQUOT, false), (libc::EISDIR, false)]
        {
            assert_eq!(unsupported_here(&io::Error::from_raw_os_error(code)), unsupported, "errno {code}");
        }
    }

    #[test]
    fn fsync_dir_takes_directories_only() {
        let dir = scratch_dir("fsyncdir");
        fsync_dir(&dir).unwrap();
        let file = dir.join("f");
        fs::write(&file, b"x").unwrap();
        let e = fsync_dir(&file).unwrap_err().to_string();
        assert!(e.contains(&*file.to_string_lossy()), "{e}");
        assert!(fsync_dir(&dir.join("missing")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
