//! `delta-apply`: bring a host-local checkpoint to a published weight version — sglang's
//! `/pull_weights` algorithm (BRIEF §1) made crash-safe.
//!
//! Host state lives in `LOCAL/.weight_sync/`:
//! * `state.json` — `{"version": "000007"}` (slime's format; `run_id` added when the source
//!   pointer names a run; `source` and `fingerprint` say which SRC and which publication of the
//!   version, so a LOCAL pointed at another source, or a version republished under the same
//!   number, is reseeded rather than patched). Written only after the bytes it names are durable.
//! * `intent.json` — written (durably) before LOCAL is mutated and removed after `state.json`
//!   is updated: `{"op": "seed"|"apply", "from": "000006"|null, "to": "000007", "run_id": ..}`.
//!   Finding one at start means a run died mid-mutation: LOCAL is dirty (an XOR half-applied
//!   cannot be undone or redone safely), so the next run reseeds and replays the chain. This is
//!   the fix for slime's "every retry re-XORs and fails forever".
//! * `lock` — exclusive flock: co-located ranks collapse to one apply; the others wait, then
//!   find the state at the target and return without work.
//! * `unsynced.json` — `{"boot_id": ".."}`, written (durably) before a `--no-fsync` run first
//!   mutates LOCAL in a boot: LOCAL may hold bytes that are only in the page cache. A process
//!   that dies leaves the page cache whole, so within the boot the state is as good as a
//!   durable one; after a reboot (another boot id) the bytes may be torn, and LOCAL is dirty.
//!   A durable run fsyncs all of LOCAL before it records a version, then removes the mark.
//!
//! Every version on the path is validated (index, headers, checksums present) before LOCAL
//! is touched. A host several versions behind folds the pending deltas: each changed tensor is
//! patched by all of its payloads in one pass and checked against its final checksum. Patched
//! files are fsync'ed before `state.json` names the new version.

use crate::checkpoint::{Checkpoint, SafetensorsFile};
use crate::codec::{self, PayloadError};
use crate::error::{Error, IoContext, Result};
use crate::fsio::{self, HostLock};
use crate::pointer::{read_latest, Pointer};
use crate::version::{parse_version_str, version_str, DeltaMeta, VersionDir};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const SYNC_DIR: &str = ".weight_sync";
pub const STATE_NAME: &str = "state.json";
pub const INTENT_NAME: &str = "intent.json";
pub const LOCK_NAME: &str = "lock";
pub const UNSYNCED_NAME: &str = "unsynced.json";

/// Which version to bring LOCAL to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Latest,
    Version(u64),
}

#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub local: PathBuf,
    pub base: Option<PathBuf>,
    pub source: PathBuf,
    pub target: Target,
    /// Versions live under SOURCE/RUN_ID (a numeric target; `latest` carries its own run id).
    pub run_id: Option<String>,
    pub pre_read_hook: Option<String>,
    /// None: wait for the host lock as long as it takes.
    pub lock_timeout: Option<Duration>,
    /// Leave LOCAL's data in the page cache instead of waiting for the disk (`--no-fsync`):
    /// safe against killed processes, and a reboot is detected (`unsynced.json`) and repaired.
    pub no_fsync: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ApplyReport {
    pub version: u64,
    pub previous: Option<u64>,
    pub run_id: Option<String>,
    /// The version LOCAL was reset to a copy of (0 = the base checkpoint), if any.
    pub seeded_from: Option<u64>,
    /// True when an interrupted or damaged earlier run was detected and repaired.
    pub repaired: bool,
    pub repair_reason: Option<String>,
    /// Why LOCAL was reseeded although it was intact: it held another source's version, or a
    /// publication of its version that has since been replaced (`LocalStatus::Foreign`).
    pub foreign_reason: Option<String>,
    pub applied: Vec<u64>,
    pub tensors_patched: usize,
    /// True when several deltas were folded into one pass over LOCAL.
    pub folded: bool,
    pub noop: bool,
    pub seconds: f64,
    pub seconds_seed: f64,
    pub seconds_apply: f64,
    /// Worker threads the seed copy and the patch ran on (`--threads`).
    pub threads: usize,
    /// Whether LOCAL's bytes were on disk (fsync) when the version was recorded: false under
    /// `--no-fsync` (and for a no-op that found an earlier `--no-fsync` run's bytes unsynced).
    pub durable: bool,
}

/// `LOCAL/.weight_sync/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The source directory the versions were read from, canonical ([`source_id`]). Absent in
    /// states slime or older disagg wrote: then not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// [`VersionDir::fingerprint`] of the version as it was applied (absent for version 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// How `state.json` names a source directory: its canonical path (symlinks resolved), so two
/// spellings of one directory agree.
pub fn source_id(source: &Path) -> String {
    source.canonicalize().unwrap_or_else(|_| std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf())).to_string_lossy().into_owned()
}

/// Whether `recorded` (a [`source_id`] from state.json) and `source` are one directory under
/// two paths, as a bind mount makes them: the same device and inode. A recorded path that no
/// longer exists here, or another file system (an NFS export mounted twice may be), is not.
fn same_directory(recorded: &Path, source: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(recorded), std::fs::metadata(source)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// `LOCAL/.weight_sync/intent.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub op: String,
    pub from: Option<String>,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
}

/// `LOCAL/.weight_sync/unsynced.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsynced {
    pub boot_id: String,
}

/// This boot's id (Linux: /proc/sys/kernel/random/boot_id, new at every boot).
fn boot_id() -> Option<String> {
    // Tests stand in for a reboot by changing it.
    #[cfg(feature = "failpoints")]
    if let Ok(v) = std::env::var("DISAGG_BOOT_ID") {
        return Some(v);
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// The files a seed copies into LOCAL: the plain files of the seed directory.
fn seed_files(seed: &Path) -> Result<Vec<String>> {
    let names = crate::checkpoint::plain_files(seed)?;
    if names.is_empty() {
        return Err(Error::not_found(seed, "seed checkpoint directory holds no files"));
    }
    Ok(names)
}

/// A host-local full checkpoint plus its sync state.
pub struct LocalCheckpoint {
    dir: PathBuf,
    sync: PathBuf,
}

/// What the sync directory and LOCAL's headers say LOCAL holds (§6 step 2), as judged under the
/// host lock by [`LocalCheckpoint::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalStatus {
    /// Holds exactly this version.
    Clean(u64),
    /// Never synced.
    Fresh,
    /// Interrupted or damaged; must be reseeded.
    Dirty(String),
    /// Holds a version of another source, or a publication of the version that has since been
    /// replaced under the same number: not ours to patch, so reseeded (the reason says which).
    Foreign(String),
}

impl LocalCheckpoint {
    pub fn new(dir: &Path) -> Self {
        LocalCheckpoint { dir: dir.to_path_buf(), sync: dir.join(SYNC_DIR) }
    }

    fn state_path(&self) -> PathBuf {
        self.sync.join(STATE_NAME)
    }
    /// The host lock's file (`.weight_sync/lock`).
    pub fn lock_path(&self) -> PathBuf {
        self.sync.join(LOCK_NAME)
    }

    /// Take LOCAL's host lock (creating the sync directory), waiting up to `timeout` (None:
    /// as long as it takes). Whoever holds it is the only process that may mutate LOCAL, and
    /// may trust that LOCAL stays as [`Self::status`] found it.
    pub fn lock(&self, timeout: Option<Duration>) -> Result<HostLock> {
        fsio::create_dir_durable(&self.sync)?;
        HostLock::acquire(self.lock_path(), timeout)
    }

    /// A lock handed in by a caller must be this LOCAL's: a flock on another file protects nothing.
    fn check_lock(&self, lock: &HostLock) -> Result<()> {
        if lock.path() != self.lock_path() {
            return Err(Error::Internal(format!("{} is not the lock of {}", lock.path().display(), self.dir.display())));
        }
        Ok(())
    }

    /// Whether a mutation of LOCAL was started and not finished (or is under way now, when the
    /// caller does not hold the lock). Cheap: for a poll that only wants to know if LOCAL changed.
    pub fn intent_exists(&self) -> bool {
        self.intent_path().exists()
    }
    fn intent_path(&self) -> PathBuf {
        self.sync.join(INTENT_NAME)
    }
    fn unsynced_path(&self) -> PathBuf {
        self.sync.join(UNSYNCED_NAME)
    }

    /// Before a `--no-fsync` run mutates LOCAL, after its intent: record, durably, that LOCAL
    /// may hold unsynced bytes in this boot (once per boot; later runs find the mark). After the
    /// intent, because replacing another boot's mark must not make LOCAL look trusted: a run
    /// killed between the two leaves the intent, so LOCAL stays dirty.
    fn mark_unsynced(&self) -> Result<()> {
        let boot_id =
            boot_id().ok_or_else(|| Error::Usage("--no-fsync needs the kernel's boot id (/proc/sys/kernel/random/boot_id) to tell a reboot from a killed process".into()))?;
        if let Some(Ok(u)) = Self::read_json::<Unsynced>(&self.unsynced_path())? {
            if u.boot_id == boot_id {
                return Ok(());
            }
        }
        fsio::write_atomic(self.unsynced_path(), serde_json::to_string(&Unsynced { boot_id }).expect("plain JSON").as_bytes())?;
        crate::failpoint!("apply.after_mark");
        Ok(())
    }

    /// Whether an earlier `--no-fsync` run of this boot may have left bytes unsynced.
    fn is_marked_unsynced(&self) -> bool {
        self.unsynced_path().exists()
    }

    /// Before a durable run records a version: if earlier `--no-fsync` runs may have left
    /// bytes of LOCAL in the page cache only, fsync every file of LOCAL, then drop the mark.
    fn settle_unsynced(&self) -> Result<()> {
        if !self.is_marked_unsynced() {
            return Ok(());
        }
        let files: Vec<PathBuf> = std::fs::read_dir(&self.dir).at(&self.dir)?.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_file())).map(|e| e.path()).collect();
        files.par_iter().try_for_each(|p| std::fs::File::open(p).and_then(|f| f.sync_all()).at(p))?;
        fsio::fsync_dir(&self.dir)?;
        fsio::remove_durable(&self.unsynced_path())
    }

    fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<std::result::Result<T, String>>> {
        match std::fs::read(path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).map_err(|e| e.to_string()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// The state as recorded, for `status` style callers.
    pub fn read_state(&self) -> Result<Option<SyncState>> {
        match Self::read_json::<SyncState>(&self.state_path())? {
            Some(Ok(s)) => Ok(Some(s)),
            Some(Err(e)) => Err(Error::bad_input(self.state_path(), format!("unparseable state: {e}"))),
            None => Ok(None),
        }
    }

    fn write_state(&self, s: &SyncState) -> Result<()> {
        crate::failpoint!("apply.before_state");
        fsio::write_atomic(self.state_path(), serde_json::to_string(s).expect("plain JSON").as_bytes())
    }

    fn write_intent(&self, op: &str, from: Option<u64>, to: &SyncState) -> Result<()> {
        let i = Intent { op: op.into(), from: from.map(version_str), to: to.version.clone(), run_id: to.run_id.clone() };
        fsio::write_atomic(self.intent_path(), serde_json::to_string(&i).expect("plain JSON").as_bytes())
    }

    /// Bring LOCAL from version `from` to the state `to` by `change` (a seed or a patch, `op`) under the
    /// protocol that makes it crash-safe: the intent first; then, for a `--no-fsync` run
    /// (`durable` false), the boot mark; the change; for a durable run, every earlier unsynced
    /// byte settled; then the state, and the intent cleared.
    fn mutate<T>(&self, op: &str, from: Option<u64>, to: &SyncState, durable: bool, change: impl FnOnce() -> Result<T>) -> Result<T> {
        self.write_intent(op, from, to)?;
        if !durable {
            self.mark_unsynced()?;
        }
        let r = change()?;
        if durable {
            self.settle_unsynced()?;
        }
        self.write_state(to)?;
        self.clear_intent()?;
        Ok(r)
    }

    fn clear_intent(&self) -> Result<()> {
        crate::failpoint!("apply.before_clear_intent");
        fsio::remove_durable(&self.intent_path())
    }

    /// What LOCAL holds for a pull of `run_id`'s versions from `source`: the §6 step 2 checks
    /// (boot mark, state, intent, source and fingerprint, LOCAL's headers). Needs the lock: a
    /// finished apply's leftover intent is cleared here, and without the lock the answer could
    /// be stale before it is returned.
    pub fn status(&self, lock: &HostLock, source: &Path, run_id: &Option<String>) -> Result<LocalStatus> {
        self.check_lock(lock)?;
        match Self::read_json::<Unsynced>(&self.unsynced_path())? {
            None => {}
            Some(Ok(u)) if boot_id().as_ref() == Some(&u.boot_id) => {}
            Some(Ok(_)) => return Ok(LocalStatus::Dirty("LOCAL was written without fsync (--no-fsync) before the host rebooted: its bytes may not be what its state says".into())),
            Some(Err(e)) => return Ok(LocalStatus::Dirty(format!("unsynced.json unparseable ({e})"))),
        }
        let state = match Self::read_json::<SyncState>(&self.state_path())? {
            None => None,
            Some(Err(e)) => return Ok(LocalStatus::Dirty(format!("state.json unparseable ({e})"))),
            Some(Ok(s)) => match parse_version_str(&s.version) {
                Some(v) => Some((v, s)),
                None => return Ok(LocalStatus::Dirty(format!("state.json version {:?} unparseable", s.version))),
            },
        };
        match Self::read_json::<Intent>(&self.intent_path())? {
            None => {}
            Some(Ok(i)) if i.op == "apply" && state.as_ref().is_some_and(|(v, s)| Some(*v) == parse_version_str(&i.to) && s.run_id == i.run_id) => {
                // Died after recording the new state but before clearing the intent: done.
                self.clear_intent()?;
            }
            Some(Ok(i)) => return Ok(LocalStatus::Dirty(format!("an interrupted {} to version {} was found", i.op, i.to))),
            Some(Err(e)) => return Ok(LocalStatus::Dirty(format!("intent.json unparseable ({e})"))),
        }
        let Some((v, recorded)) = state else { return Ok(LocalStatus::Fresh) };
        if recorded.run_id != *run_id {
            return Ok(LocalStatus::Fresh);
        }
        if let Some(reason) = foreign(&recorded, v, source) {
            return Ok(LocalStatus::Foreign(reason));
        }
        // A torn or tampered checkpoint (truncated file, bad header) is caught here.
        if let Err(e) = Checkpoint::open(&self.dir) {
            return Ok(LocalStatus::Dirty(format!("local checkpoint does not validate ({e})")));
        }
        Ok(LocalStatus::Clean(v))
    }

    /// Reset LOCAL to a copy of `seed`, whose files are `names` ([`seed_files`]): copy every
    /// file, delete files the seed lacks, check sizes. `durable`: each copy is fsynced before
    /// it is renamed into place.
    fn seed_from(&self, seed: &Path, names: &[String], durable: bool) -> Result<()> {
        names.par_iter().try_for_each(|n| {
            // Stopping between files leaves the seed intent, so the next run reseeds: what a
            // kill here costs too, but without waiting for the rest of the copy.
            crate::stop::check()?;
            crate::failpoint!("apply.seed_copy");
            fsio::copy_atomic_with(&seed.join(n), &self.dir.join(n), durable).map(|_| ())
        })?;
        for e in std::fs::read_dir(&self.dir).at(&self.dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == SYNC_DIR || e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if !names.contains(&name) {
                fsio::remove_durable(&e.path())?;
            }
        }
        for n in names {
            let (a, b) = (std::fs::metadata(seed.join(n)).at(seed.join(n))?.len(), std::fs::metadata(self.dir.join(n)).at(self.dir.join(n))?.len());
            if a != b {
                return Err(Error::Io { path: self.dir.join(n), source: std::io::Error::other(format!("copied {b} bytes of {a}")) });
            }
        }
        Ok(())
    }

    /// Remove the temp files (`.NAME.tmp-PID-N`, §1) a copy killed part way left in LOCAL: under
    /// the host lock no one else writes them, and left in place they would count against the
    /// room a reseed needs (a killed seed of a large model then refused every retry).
    fn remove_stale_temps(&self) -> Result<()> {
        for e in std::fs::read_dir(&self.dir).at(&self.dir)?.flatten() {
            if fsio::is_temp_name(&e.file_name().to_string_lossy()) && e.file_type().is_ok_and(|t| t.is_file()) {
                fsio::remove_durable(&e.path())?;
            }
        }
        Ok(())
    }

    /// Refuse a seed that cannot fit before LOCAL is touched (no intent written, so a clean
    /// LOCAL stays clean), rather than fill the host's disk under the engine and everything
    /// else on it and fail part way. What the copy adds is the seed's bytes less those of the
    /// LOCAL files it replaces (each is freed as its copy is renamed over it; files the seed
    /// lacks go only after the copy), so a refusal is certain to be right; passing does not
    /// promise the copy fits. Skipped where the file system does not report its size, or where
    /// the copy may clone extents and need no room at all.
    fn check_room_for(&self, seed: &Path, names: &[String]) -> Result<()> {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let (adds, frees) = names.iter().fold((0u64, 0u64), |(a, f), n| (a + size(&seed.join(n)), f + size(&self.dir.join(n))));
        fsio::check_room_for_copy(seed, &self.dir, adds.saturating_sub(frees), &format!("seed from {}", seed.display()))
    }

    /// Apply a chain of validated deltas (oldest first, each based on the one before) in place,
    /// as [`ChainPlan::new`] mapped them, folded: every tensor any of them changes is patched
    /// by all of its payloads in one pass (see [`codec::apply_folded`]) and checked against the
    /// checksum of the newest delta that changed it. With `durable`, the bytes are on disk
    /// (fsync) before this returns.
    fn apply_chain(&self, plan: ChainPlan<'_>, deltas: &[(&VersionDir, &DeltaMeta, &[SafetensorsFile])], durable: bool) -> Result<usize> {
        let ChainPlan { layout, touched, per_local } = plan;
        // Open every LOCAL file that changes, then patch all its tensors in one parallel pass,
        // largest first (one task each) so a late big tensor does not leave a core idle.
        // Patched with pread/pwrite, not a writable mmap (see codec::FileRangeTarget).
        let mut files = Vec::with_capacity(per_local.len());
        for (lf, tensors) in per_local {
            let local_file = &layout.files()[lf];
            let path = local_file.path().to_path_buf();
            let file = OpenOptions::new().read(true).write(true).open(&path).at(&path)?;
            if file.metadata().at(&path)?.len() != local_file.len() as u64 {
                return Err(Error::conflict(&path, "local file changed size while being patched"));
            }
            let entries: Vec<(&str, &crate::checkpoint::TensorEntry)> = tensors.iter().map(|&name| (name, local_file.tensor(name).expect("in layout"))).collect();
            files.push((path, file, entries));
        }
        let mut work: Vec<(&str, &std::path::Path, &std::fs::File, usize, usize)> =
            files.iter().flat_map(|(path, file, entries)| entries.iter().map(move |(name, t)| (*name, path.as_path(), file, t.offset, t.len))).collect();
        let patched = work.len();
        work.sort_by_key(|w| std::cmp::Reverse(w.4));
        work.into_par_iter().with_max_len(1).try_for_each(|(name, path, file, offset, len)| -> Result<()> {
            let sources = &touched[name];
            let payloads: Vec<(crate::version::Encoding, &[u8])> = sources
                .iter()
                .map(|&(di, fi)| {
                    let f = &deltas[di].2[fi];
                    (deltas[di].1.encoding, f.bytes(f.tensor(name).expect("validated")))
                })
                .collect();
            let &(di, fi) = sources.last().expect("at least one payload");
            let (meta, f) = (deltas[di].1, &deltas[di].2[fi]);
            let mut hasher = meta.checksum.hasher();
            let mut target = codec::FileRangeTarget::new(file, offset as u64, len);
            codec::apply_folded_to(&payloads, &mut target, |new| hasher.update(new)).map_err(|(k, e)| {
                let f = deltas[sources[k].0].2[sources[k].1].path();
                match e {
                    PayloadError::Target(io) => Error::io(path, io),
                    PayloadError::Io(io) => Error::bad_input(f, format!("tensor {name:?}: corrupt zstd frame: {io}")),
                    other => Error::bad_input(f, format!("tensor {name:?}: {other}")),
                }
            })?;
            crate::failpoint!("apply.after_tensor");
            let expected = &f.metadata()[name];
            let actual = hasher.finish_hex();
            if &actual != expected {
                // Folded payloads are checked once, against the newest delta's checksum: a bad
                // payload in any of them ends here, so name them all (applying one version at
                // a time, `--target N`, finds the culprit).
                let note = if sources.len() > 1 {
                    let files: Vec<String> = sources.iter().map(|&(di, fi)| deltas[di].2[fi].path().display().to_string()).collect();
                    format!(
                        " (the payloads of {} versions were applied folded; any of these files may hold the bad one: {}; apply one version at a time with --target to find it)",
                        sources.len(),
                        files.join(", ")
                    )
                } else {
                    String::new()
                };
                return Err(Error::Checksum { path: f.path().to_path_buf(), tensor: name.to_string(), expected: expected.clone(), actual, note });
            }
            // Start writeback of this tensor's pages now, so the disk works while the other
            // tensors decode; the fsync below still waits for all of it.
            if durable {
                crate::fsio::start_writeback(file, offset as u64, len as u64);
            }
            Ok(())
        })?;
        // Durable before the caller records the version: fsync every patched file.
        if durable {
            files.par_iter().try_for_each(|(path, file, _)| -> Result<()> { file.sync_all().at(path) })?;
        }
        Ok(patched)
    }
}

/// Why LOCAL's recorded version `v` is not `source`'s version `v` as published now, if it is
/// not: another source directory (the same one under another path, a bind mount, is not
/// another), or a version directory whose fingerprint changed since it
/// was applied (published again under the same number). A version no longer there (collected)
/// or unreadable cannot be compared and passes; so do states without the fields.
fn foreign(recorded: &SyncState, v: u64, source: &Path) -> Option<String> {
    if let Some(src) = &recorded.source {
        let now = source_id(source);
        if *src != now && !same_directory(Path::new(src), source) {
            return Some(format!("LOCAL holds version {v} of another source ({src}), not of {now}"));
        }
    }
    let fp = recorded.fingerprint.as_ref()?;
    let root = match &recorded.run_id {
        Some(r) => source.join(r),
        None => source.to_path_buf(),
    };
    let dir = VersionDir::open(&root, v).ok()?;
    let now = dir.fingerprint(&dir.validate_files().ok()?);
    (now != *fp).then(|| format!("version {v} in {} was published again since LOCAL applied it (fingerprint {now}, LOCAL has {fp})", root.display()))
}

/// Where a chain's patches go: LOCAL's layout, each patched
/// tensor's payloads in chain order (delta, data file), and the patched tensors of each LOCAL file.
struct ChainPlan<'a> {
    layout: Checkpoint,
    touched: BTreeMap<&'a str, Vec<(usize, usize)>>,
    per_local: BTreeMap<usize, Vec<&'a str>>,
}

impl<'a> ChainPlan<'a> {
    /// Map every tensor `deltas` patch to its file in `layout` (LOCAL, or the seed it is about
    /// to be reset to); a tensor `layout` lacks is refused (exit 4).
    fn new(layout: Checkpoint, deltas: &'a [(&'a VersionDir, &'a DeltaMeta, &'a [SafetensorsFile])]) -> Result<Self> {
        // tensor → its payloads in chain order: (delta, data file).
        let mut touched: BTreeMap<&str, Vec<(usize, usize)>> = BTreeMap::new();
        for (di, (v, _, _)) in deltas.iter().enumerate() {
            let index = v.index.as_ref().expect("a delta always has an index");
            let names = index.files();
            for (tensor, file) in &index.weight_map {
                let fi = names.iter().position(|n| n == file).expect("listed file");
                touched.entry(tensor.as_str()).or_default().push((di, fi));
            }
        }
        let mut per_local: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for (&tensor, payloads) in &touched {
            let Some(loc) = layout.loc(tensor) else {
                let v = deltas[payloads[0].0].0;
                return Err(Error::Incompatible(format!(
                    "{}: delta {} patches tensor {tensor:?}, which the checkpoint {} does not have",
                    v.path.display(),
                    v.number,
                    layout.root().display()
                )));
            };
            per_local.entry(loc.file).or_default().push(tensor);
        }
        Ok(ChainPlan { layout, touched, per_local })
    }
}

/// `p` made absolute with every symlink of the part that exists resolved, and the part that does
/// not (a LOCAL not yet created) appended as written, `.` and `..` folded: where `p` would be.
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut missing = Vec::new();
    let mut existing = abs.as_path();
    let mut base = loop {
        if let Ok(c) = existing.canonicalize() {
            break c;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                existing = parent;
            }
            // A path whose existing part is only `..` components past the root, or unreadable.
            _ => break existing.to_path_buf(),
        }
    };
    for name in missing.into_iter().rev() {
        match name.to_str() {
            Some("..") => {
                base.pop();
            }
            Some(".") => {}
            _ => base.push(name),
        }
    }
    base
}

/// LOCAL is patched in place and seeded by deleting the plain files the seed lacks, so it must
/// lie apart from what it reads: not BASE or a directory inside it (its sync directory would be
/// a write into BASE), and not SRC or a directory inside it (a seed would delete SRC's `latest`,
/// a patch rewrite a published version for every other host). Refused (usage, exit 2) however
/// spelled, before LOCAL's lock is taken or LOCAL created.
pub fn check_local_apart(local: &Path, base: Option<&Path>, source: &Path) -> Result<()> {
    let l = resolved(local);
    for (flag, dir) in [("--base", base), ("--source", Some(source))] {
        let Some(dir) = dir else { continue };
        let d = resolved(dir);
        if l.starts_with(&d) {
            let how = if l == d { "the same directory as" } else { "inside" };
            return Err(Error::Usage(format!(
                "--local {} is {how} {flag} {}; LOCAL is patched and seeded in place, so it must lie apart from what it reads",
                l.display(),
                d.display()
            )));
        }
    }
    Ok(())
}

/// What a pull is about to read, handed to [`pull_locked`]'s `before_read` once the walk has
/// found its chain and before any version's data is read or LOCAL is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullPlan {
    /// The version LOCAL holds, clean, that the pull starts from (None: fresh or dirty).
    pub previous: Option<u64>,
    /// The oldest version the pull reads: the seed (0 = the base checkpoint) or the oldest delta.
    pub oldest_read: u64,
}

/// Bring LOCAL to the target version; see the module docs.
pub fn pull(opts: &ApplyOptions) -> Result<ApplyReport> {
    check_pull_options(opts)?;
    let lock = LocalCheckpoint::new(&opts.local).lock(opts.lock_timeout)?;
    pull_checked(opts, &lock, &mut |_| Ok(()))
}

/// [`pull`] for a caller that already holds LOCAL's lock ([`LocalCheckpoint::lock`]; a second
/// flock of the same file from this process would wait for itself) and keeps it afterwards, as
/// `delta-follow` does across the reload. `opts.lock_timeout` is not used.
pub fn pull_locked(opts: &ApplyOptions, lock: &HostLock, before_read: &mut dyn FnMut(PullPlan) -> Result<()>) -> Result<ApplyReport> {
    check_pull_options(opts)?;
    pull_checked(opts, lock, before_read)
}

/// What is wrong with `opts` whatever is on disk, refused before LOCAL's lock is taken (a LOCAL
/// that is or lies inside BASE or SRC, a run id that is a path).
fn check_pull_options(opts: &ApplyOptions) -> Result<()> {
    crate::version::check_run_id_arg(opts.run_id.as_deref())?;
    check_local_apart(&opts.local, opts.base.as_deref(), &opts.source)
}

/// The pull itself, once [`check_pull_options`] passed, under `lock`. A LOCAL whose state
/// checked out but whose bytes are not the version it records (its content sample is not the
/// one the next delta was made against) is pulled again as foreign: reseeded and replayed.
fn pull_checked(opts: &ApplyOptions, lock: &HostLock, before_read: &mut dyn FnMut(PullPlan) -> Result<()>) -> Result<ApplyReport> {
    let start = Instant::now();
    match pull_once(opts, lock, before_read, start, None)? {
        Pulled::Done(r) => Ok(r),
        Pulled::Diverged(reason) => match pull_once(opts, lock, before_read, start, Some(reason))? {
            Pulled::Done(r) => Ok(r),
            // A pull of a LOCAL taken as foreign seeds it, and a seeded LOCAL is checked before the copy.
            Pulled::Diverged(reason) => Err(Error::Internal(format!("LOCAL diverged again after a reseed: {reason}"))),
        },
    }
}

/// How one pass of [`pull_checked`] ended.
enum Pulled {
    Done(ApplyReport),
    /// LOCAL, not seeded in this pass, does not hold the bytes of the version it records.
    Diverged(String),
}

/// One pass of the pull. `foreign`: take LOCAL as foreign for this reason, whatever its state says.
fn pull_once(opts: &ApplyOptions, lock: &HostLock, before_read: &mut dyn FnMut(PullPlan) -> Result<()>, start: Instant, foreign: Option<String>) -> Result<Pulled> {
    let local = LocalCheckpoint::new(&opts.local);
    local.check_lock(lock)?;

    let target = match &opts.target {
        Target::Version(v) => Pointer { run_id: opts.run_id.clone(), version: *v },
        Target::Latest => {
            read_latest(&opts.source)?.ok_or_else(|| Error::not_found(opts.source.join(crate::pointer::POINTER_NAME), "no `latest` pointer has been published yet"))?
        }
    };
    let root = target.root(&opts.source);
    let run_id = target.run_id.clone();
    let mut report = ApplyReport { version: target.version, run_id: run_id.clone(), threads: crate::cli::worker_threads(), ..Default::default() };
    let durable = !opts.no_fsync;

    let status = match foreign {
        Some(reason) => LocalStatus::Foreign(reason),
        None => local.status(lock, &opts.source, &run_id)?,
    };
    let applied = match status {
        LocalStatus::Clean(v) => Some(v),
        LocalStatus::Fresh => None,
        LocalStatus::Dirty(reason) => {
            report.repaired = true;
            report.repair_reason = Some(reason);
            None
        }
        LocalStatus::Foreign(reason) => {
            report.foreign_reason = Some(reason);
            None
        }
    };
    report.previous = applied;
    if applied == Some(target.version) {
        report.noop = true;
        report.durable = !local.is_marked_unsynced();
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(Pulled::Done(report));
    }

    // Walk down from the target along base links to the applied version, a full version, or 0.
    let mut chain: Vec<VersionDir> = Vec::new();
    let mut seed: Option<u64> = None;
    let mut cur = target.version;
    loop {
        if Some(cur) == applied {
            break;
        }
        if cur == 0 {
            seed = Some(0);
            break;
        }
        if let Some(cmd) = &opts.pre_read_hook {
            crate::hooks::run_hook(cmd, cur, &root.join(crate::version::version_dir_name(cur)), &root)?;
        }
        // The target missing is "not found" (6); a link below it missing is a broken chain
        // (5), as pointer-advance and delta-gc call it: the version that names it is named too.
        let v = VersionDir::open(&root, cur).map_err(|e| match (chain.last(), e) {
            (Some(child), e @ Error::NotFound { .. }) => Error::conflict(&child.path, format!("broken chain: its base version {cur} is missing ({e})")),
            (_, e) => e,
        })?;
        match v.delta() {
            None => {
                seed = Some(cur);
                chain.push(v);
                break;
            }
            Some(d) => {
                cur = d.base_version;
                chain.push(v);
            }
        }
    }
    chain.reverse();
    before_read(PullPlan { previous: applied, oldest_read: seed.unwrap_or_else(|| chain[0].number) })?;
    // Validate everything we will read before touching LOCAL, and fingerprint what we
    // record (the seed, the last delta), as read before any of its data.
    let mut validated = Vec::with_capacity(chain.len());
    for v in &chain {
        validated.push(v.validate_files()?);
    }
    let source = Some(source_id(&opts.source));
    let recorded = |v: &VersionDir, files: &[SafetensorsFile]| SyncState {
        version: version_str(v.number),
        run_id: run_id.clone(),
        source: source.clone(),
        fingerprint: Some(v.fingerprint(files)),
    };
    let seeded_version = usize::from(seed.is_some_and(|s| s > 0));
    let deltas: Vec<(&VersionDir, &DeltaMeta, &[SafetensorsFile])> =
        chain[seeded_version..].iter().zip(&validated[seeded_version..]).map(|(v, files)| (v, v.delta().expect("only deltas after the seed"), files.as_slice())).collect();
    let mut expect_base = seed.or(applied);
    for (v, meta, _) in &deltas {
        if Some(meta.base_version) != expect_base {
            return Err(Error::conflict(&v.path, format!("delta base_version {} is not the applied version {:?}", meta.base_version, expect_base)));
        }
        expect_base = Some(v.number);
    }
    // A stop signal (crate::stop) is honoured where LOCAL is consistent: here, before any
    // mutation; between files of a seed; and between seed and patch. A patch pass in progress
    // is finished and recorded first: it is short, and stopping inside it would force a reseed.
    crate::stop::check()?;
    let mut version_now = applied;
    if let Some(s) = seed {
        let seed_dir = if s == 0 {
            opts.base.clone().ok_or_else(|| Error::Usage(format!("reaching version {} needs the base checkpoint (version 0): pass --base", target.version)))?
        } else {
            chain[0].path.clone()
        };
        let to = match chain.first() {
            Some(v) if s > 0 => recorded(v, &validated[0]),
            _ => SyncState { version: version_str(0), run_id: run_id.clone(), source: source.clone(), fingerprint: None },
        };
        // What the seed holds, before a byte of it is copied: the version's own record of it,
        // and the first delta's record of what it was made against, must agree with it.
        let seed_checkpoint = Checkpoint::open(&seed_dir)?;
        let seed_sample = seed_checkpoint.content_sample();
        // A seed lacking a tensor the deltas patch is refused now, not after it was copied.
        ChainPlan::new(seed_checkpoint, &deltas)?;
        if let Some(recorded) = chain.first().filter(|_| s > 0).and_then(|v| v.sample()) {
            if recorded != seed_sample {
                return Err(Error::Content {
                    path: seed_dir,
                    reason: format!(
                        "full version {s} holds weights with content sample {seed_sample}, but its index records {recorded}: its files are not the ones it was published with"
                    ),
                });
            }
        }
        if let Some(&(first, meta, _)) = deltas.first() {
            if let Some(expected) = meta.base_sample.as_ref().filter(|e| **e != seed_sample) {
                return Err(Error::conflict(
                    &seed_dir,
                    if s == 0 {
                        format!("--base holds other weights (content sample {seed_sample}) than the ones version {} was made against (its base_sample {expected}): it is not the checkpoint the trainer started from", first.number)
                    } else {
                        format!(
                            "version {} was made against other weights (base_sample {expected}) than full version {s} holds ({seed_sample}): the chain in {} is inconsistent",
                            first.number,
                            root.display()
                        )
                    },
                ));
            }
        }
        let t = Instant::now();
        let names = seed_files(&seed_dir)?;
        local.remove_stale_temps()?;
        local.check_room_for(&seed_dir, &names)?;
        local.mutate("seed", version_now, &to, durable, || {
            local.seed_from(&seed_dir, &names, durable)?;
            // The seed must be a loadable checkpoint, holding what was read, before we call it a version.
            let copied = Checkpoint::open(&opts.local)?.content_sample();
            if copied != seed_sample {
                return Err(Error::Content {
                    path: opts.local.clone(),
                    reason: format!(
                        "the copy of {} has content sample {copied}, the seed {seed_sample}: the seed changed while it was copied, or the copy is damaged",
                        seed_dir.display()
                    ),
                });
            }
            Ok(())
        })?;
        report.seeded_from = Some(s);
        report.seconds_seed = t.elapsed().as_secs_f64();
        version_now = Some(s);
    }
    let t = Instant::now();
    if let Some(&(last, _, files)) = deltas.last() {
        crate::stop::check()?;
        let to = recorded(last, files);
        let layout = Checkpoint::open(&opts.local)?;
        let (first, meta, _) = deltas[0];
        if let (None, Some(expected)) = (seed, &meta.base_sample) {
            // LOCAL's state and headers checked out (§6 step 2); its bytes must be the version
            // it records too, or the deltas would patch other weights than they were made against.
            let actual = layout.content_sample();
            if actual != *expected {
                return Ok(Pulled::Diverged(format!(
                    "LOCAL's content sample {actual} is not the base_sample {expected} that version {} was made against: its bytes are not version {}'s",
                    first.number, meta.base_version
                )));
            }
        }
        let plan = match ChainPlan::new(layout, &deltas) {
            Ok(plan) => plan,
            // A seed is checked for every tensor the chain patches before it is copied, so a
            // LOCAL that was not seeded here and lacks one (a file of it lost or replaced) does
            // not hold the version it records: reseeded, not refused on every run.
            Err(Error::Incompatible(why)) if seed.is_none() => return Ok(Pulled::Diverged(format!("LOCAL is not version {}: {why}", meta.base_version))),
            Err(e) => return Err(e),
        };
        report.tensors_patched += local.mutate("apply", version_now, &to, durable, || {
            let patched = local.apply_chain(plan, &deltas, durable)?;
            if let Some(expected) = last.sample() {
                // Checksums cover the patched tensors; this covers the rest too, so a chain whose
                // links do not meet (a delta made against other weights than the one before it)
                // is not recorded as the version it claims to reach.
                let actual = Checkpoint::open(&opts.local)?.content_sample();
                if actual != expected {
                    let from = deltas[0].0.number;
                    return Err(Error::Content {
                        path: opts.local.clone(),
                        reason: format!("after versions {from}..={} were applied, LOCAL's content sample is {actual}, but version {} records {expected}: the deltas do not lead from LOCAL's bytes to the published version (state not advanced)", last.number, last.number),
                    });
                }
            }
            Ok(patched)
        })?;
        report.applied = deltas.iter().map(|(v, _, _)| v.number).collect();
        report.folded = deltas.len() > 1;
    }
    report.seconds_apply = t.elapsed().as_secs_f64();
    report.seconds = start.elapsed().as_secs_f64();
    report.durable = durable;
    Ok(Pulled::Done(report))
}
