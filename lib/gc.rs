//! `delta-gc`: remove old weight versions from a publish root without ever pulling a version
//! out from under a reader (docs/FORMATS.md §11.2; BRIEF §1: "a pruner that removes deltas a
//! replay still needs corrupts the base").
//!
//! Readers take no lock on the shared directory, so GC protects by rule, decided from one
//! snapshot of `latest`, the version directories and the follower status files:
//!
//! * `latest`'s chain (down to the newest full version, or 0) and every version newer than
//!   `latest` (published, not yet announced);
//! * the last `keep` complete versions, with their chains (a kept version stays reachable);
//! * every version published less than `min_age` ago, and every version that may have been
//!   `latest` during that window with its chain (the newest version older than `min_age` and
//!   all newer ones), so a host that read the pointer just before it moved finishes its pull;
//!   ages are measured by the file system's clock ([`file_system_now`]), not this host's;
//! * for every live follower status (updated within `stale_after`, not `stopped`) of the same
//!   run, every version at or above its `needs`;
//! * anything that cannot be parsed is kept (a malformed status file is an error: exit 3).
//!
//! A collected version is first renamed to `.deleting-weight_vNNNNNN-PID` (one atomic rename: a
//! reader sees the whole version or none of it; files it already opened stay readable on
//! POSIX, and NFS silly-renames them), the directory is fsynced, then the tree is removed.
//! Leftover `.deleting-*` trees of a GC killed midway are removed by the next run. Incomplete
//! version directories (no index) below `latest` are removed once nothing in them changed for
//! `min_age`; above `latest` they may be a publish in progress and are never touched.
//! Two GCs on one root serialize on `ROOT/.gc.lock` (flock); the second exits 9.

use crate::error::{Error, IoContext, Result};
use crate::follow::{FollowerStatus, FOLLOWERS_DIR};
use crate::fsio::{self, HostLock};
use crate::pointer::read_latest;
use crate::version::{list_versions, version_dir_name, VersionDir, VersionKind};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// Prefix of a version directory being removed.
pub use crate::fsio::DELETING_PREFIX;
/// The GC's own lock file in the versions root.
pub const GC_LOCK: &str = ".gc.lock";

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub src: PathBuf,
    pub keep: usize,
    /// Globs of follower status files (`*` and `?` in the last component); empty: the default
    /// `SRC/.followers/*.json`.
    pub followers: Vec<String>,
    pub dry_run: bool,
    pub min_age: Duration,
    pub stale_after: Duration,
}

/// One version directory and what GC decided about it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionVerdict {
    pub version: u64,
    /// `full` | `delta` | `incomplete` | `unreadable`.
    pub kind: String,
    pub age_secs: f64,
    pub bytes: u64,
    pub delete: bool,
    /// Why it is kept (empty when deleted).
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub root: String,
    pub latest: Option<String>,
    pub newest_full: Option<u64>,
    pub dry_run: bool,
    pub versions: Vec<VersionVerdict>,
    /// Versions removed (or, with --dry-run, that would be).
    pub deleted: Vec<u64>,
    pub kept: Vec<u64>,
    pub bytes_freed: u64,
    /// Leftover `.deleting-*` trees of an earlier, interrupted GC removed now.
    pub swept: usize,
    pub followers_live: Vec<String>,
    pub followers_ignored: Vec<String>,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

impl GcReport {
    /// A warning worth an operator's eye: on stderr now, and in `warnings`.
    fn warn(&mut self, w: String) {
        eprintln!("delta-gc: warning: {w}");
        self.warnings.push(w);
    }
}

/// Match `*` (any run, including empty) and `?` (one character) against `name`.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0usize, 0usize, None::<usize>, 0usize);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Files matching a glob whose wildcards are in the last path component only.
pub fn glob_files(pattern: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(pattern);
    let (dir, file) = match (path.parent(), path.file_name()) {
        (Some(d), Some(f)) => (if d.as_os_str().is_empty() { Path::new(".") } else { d }, f.to_string_lossy().into_owned()),
        _ => return Err(Error::Usage(format!("--followers {pattern:?}: expected DIR/PATTERN"))),
    };
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err(Error::Usage(format!("--followers {pattern:?}: wildcards are allowed in the file name only")));
    }
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.at(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        // Temp files of an atomic write in progress are not status files.
        if fsio::is_temp_name(&name) || (name.starts_with('.') && !file.starts_with('.')) {
            continue;
        }
        if wildcard_match(&file, &name) && e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// How far a follower's own clock may disagree with its status file's mtime, or this host's
/// with the file system's, before GC warns.
const CLOCK_SKEW_WARNING_SECS: f64 = 60.0;

/// "Now" for the ages of the root's files: the file system's clock, which stamped their mtimes
/// (the NFS server's, or the publisher's kernel), read by stamping the GC lock. Measured by
/// this host's clock instead, a GC host running ten minutes ahead would see a version published
/// a moment ago as past `--min-age`, and collect what a reader that resolved `latest` just
/// before may still need. A disagreement over a minute is reported; a file system that will not
/// be stamped leaves this host's clock, with a warning.
fn file_system_now(lock: &HostLock, report: &mut GcReport) -> SystemTime {
    let ahead = crate::failpoint::clock_ahead_secs("gc.host_clock");
    let host_now = if ahead >= 0.0 { SystemTime::now() + Duration::from_secs_f64(ahead) } else { SystemTime::now() - Duration::from_secs_f64(-ahead) };
    match lock.file_system_now() {
        Ok(fs_now) => {
            let skew = match host_now.duration_since(fs_now) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            if skew.abs() > CLOCK_SKEW_WARNING_SECS {
                report.warn(format!(
                    "this host's clock runs {:.0}s {} the file system's (stamped on {}); version ages are measured by the file system's clock",
                    skew.abs(),
                    if skew > 0.0 { "ahead of" } else { "behind" },
                    lock.path().display()
                ));
            }
            fs_now
        }
        Err(e) => {
            report.warn(format!("cannot read the file system's clock ({e}); version ages are measured by this host's clock"));
            host_now
        }
    }
}

fn mtime_age(meta: &std::fs::Metadata, now: SystemTime) -> f64 {
    meta.modified().ok().and_then(|t| now.duration_since(t).ok()).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Seconds since anything in `dir` (or the directory itself) last changed.
fn tree_age(dir: &Path, now: SystemTime) -> f64 {
    let mut age = std::fs::metadata(dir).map(|m| mtime_age(&m, now)).unwrap_or(0.0);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.metadata() {
                age = age.min(mtime_age(&m, now));
            }
        }
    }
    age
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => n += tree_bytes(&e.path()),
                Ok(_) => n += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    n
}

struct Entry {
    kind: String,
    /// Base version of a delta.
    base: Option<u64>,
    age: f64,
}

/// The versions `v`'s chain reads: v, its base, ... down to a full version (0 excluded).
/// Err with the first missing link.
fn chain_of(entries: &BTreeMap<u64, Entry>, v: u64) -> std::result::Result<Vec<u64>, u64> {
    let mut out = Vec::new();
    let mut cur = v;
    while cur != 0 {
        let Some(e) = entries.get(&cur) else { return Err(cur) };
        if e.kind != "full" && e.kind != "delta" {
            return Err(cur);
        }
        out.push(cur);
        match e.base {
            Some(b) => cur = b,
            None => break,
        }
    }
    Ok(out)
}

/// Remove one version directory (hidden first, see [`fsio::remove_tree_durable`]).
fn remove_version(root: &Path, v: u64) -> Result<()> {
    fsio::remove_tree_durable(&root.join(version_dir_name(v)))
}

/// Decide and (unless `dry_run`) remove; see the module docs for the rules.
pub fn collect(opts: &GcOptions) -> Result<GcReport> {
    let start = Instant::now();
    let mut report = GcReport { root: opts.src.display().to_string(), dry_run: opts.dry_run, ..Default::default() };
    if !opts.src.is_dir() {
        return Err(Error::not_found(&opts.src, "no such publish root"));
    }
    let Some(ptr) = read_latest(&opts.src)? else {
        report.warn("no `latest` pointer yet: nothing is collected".into());
        report.seconds = start.elapsed().as_secs_f64();
        return Ok(report);
    };
    let root = ptr.root(&opts.src);
    report.root = root.display().to_string();
    report.latest = Some(ptr.to_string());
    let lock_path = root.join(GC_LOCK);
    let lock = match HostLock::try_acquire(&lock_path)? {
        Some(l) => l,
        None => return Err(Error::Locked { path: lock_path, reason: "another delta-gc is running on this root".into() }),
    };
    let now = file_system_now(&lock, &mut report);

    // Sweep trees a killed GC left behind (hidden names: no reader resolves them).
    for e in std::fs::read_dir(&root).at(&root)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(DELETING_PREFIX) && e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if !opts.dry_run {
                std::fs::remove_dir_all(e.path()).at(e.path())?;
            }
            report.swept += 1;
        }
    }

    // One snapshot of every version directory.
    let mut entries: BTreeMap<u64, Entry> = BTreeMap::new();
    for v in list_versions(&root)? {
        let dir = root.join(version_dir_name(v));
        let e = match VersionDir::open(&root, v) {
            Ok(vd) => {
                let marker = match &vd.index {
                    Some(_) => dir.join(crate::checkpoint::INDEX_NAME),
                    None => dir.join(crate::checkpoint::SINGLE_NAME),
                };
                let age = std::fs::metadata(&marker).map(|m| mtime_age(&m, now)).unwrap_or(0.0);
                match &vd.kind {
                    VersionKind::Full => Entry { kind: "full".into(), base: None, age },
                    VersionKind::Delta(d) => Entry { kind: "delta".into(), base: Some(d.base_version), age },
                }
            }
            Err(Error::Conflict { .. }) => Entry { kind: "incomplete".into(), base: None, age: tree_age(&dir, now) },
            Err(Error::NotFound { .. }) => continue, // removed since the listing
            Err(e) => {
                report.warn(format!("version {v} is unreadable and kept: {e}"));
                Entry { kind: "unreadable".into(), base: None, age: tree_age(&dir, now) }
            }
        };
        entries.insert(v, e);
    }

    let mut reasons: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    let mut protect = |v: u64, why: &str| {
        let r = reasons.entry(v).or_default();
        if !r.iter().any(|x| x == why) {
            r.push(why.to_string());
        }
    };
    // 1. latest and its chain: a broken chain means something is wrong; touch nothing.
    let latest = ptr.version;
    let chain = chain_of(&entries, latest).map_err(|missing| {
        Error::conflict(root.join(version_dir_name(missing)), format!("version {missing} on the chain of `latest` ({ptr}) is missing or unreadable; refusing to collect anything"))
    })?;
    report.newest_full = chain.last().copied().filter(|v| entries.get(v).is_some_and(|e| e.kind == "full"));
    for v in &chain {
        protect(*v, if *v == latest { "latest" } else { "chain-of-latest" });
    }
    let complete: Vec<u64> = entries.iter().filter(|(_, e)| e.kind == "full" || e.kind == "delta").map(|(v, _)| *v).collect();
    let mut roots: Vec<(u64, &str)> = Vec::new();
    for (&v, e) in &entries {
        // 2. newer than latest: published, not yet announced, or being written (a crashed
        // publish is redone with `delta-diff --replace-incomplete`, not collected).
        if v > latest {
            protect(v, "newer-than-latest");
            if e.kind == "full" || e.kind == "delta" {
                roots.push((v, "chain-of-newer"));
            }
        }
        // 3. young.
        if e.age < opts.min_age.as_secs_f64() {
            protect(v, "young");
        }
        if e.kind == "unreadable" {
            protect(v, "unreadable");
        }
    }
    // 3b. every version that may have been `latest` within the grace window, with its chain.
    // The newer ones are young (3); the oldest, `g`, is not, and needs keeping itself: a host
    // that read `latest` = g just before it moved is still pulling it.
    if let Some(&g) = complete.iter().rev().find(|v| entries[v].age >= opts.min_age.as_secs_f64()) {
        if g <= latest {
            protect(g, "chain-of-recent");
        }
        for &v in complete.iter().filter(|&&v| v >= g && v <= latest) {
            roots.push((v, "chain-of-recent"));
        }
    }
    // 4. the last N complete versions.
    for &v in complete.iter().rev().take(opts.keep) {
        protect(v, "keep-last");
        roots.push((v, "chain-of-kept"));
    }
    for (v, why) in roots {
        match chain_of(&entries, v) {
            Ok(c) => c.iter().filter(|&&x| x != v).for_each(|&x| protect(x, why)),
            Err(missing) => report.warn(format!("version {v}: its chain is broken at {missing}")),
        }
    }
    // 5. live followers of this run.
    let globs = if opts.followers.is_empty() { vec![opts.src.join(FOLLOWERS_DIR).join("*.json").to_string_lossy().into_owned()] } else { opts.followers.clone() };
    let mut seen = std::collections::BTreeSet::new();
    for g in &globs {
        for path in glob_files(g)? {
            if !seen.insert(path.clone()) {
                continue;
            }
            let st = FollowerStatus::read(&path)?;
            let who = format!("{} ({})", st.host, path.display());
            // Two clocks date the status: the follower's (`updated_at`) and the file's mtime,
            // stamped by the file system (the NFS server, or this host). A follower whose clock
            // runs behind this host's would look dead by the first and lose the versions it is
            // reading; the younger age keeps it, and a real death ages both.
            let by_clock = st.age_secs();
            let by_mtime = std::fs::metadata(&path).map(|m| mtime_age(&m, now)).unwrap_or(by_clock);
            if (by_clock - by_mtime).abs() > CLOCK_SKEW_WARNING_SECS {
                let w = format!("follower {who}: its clock and the status file's mtime disagree by {:.0}s (clock skew between hosts?); using the younger age", by_clock - by_mtime);
                report.warn(w);
            }
            let age = by_clock.min(by_mtime);
            if age > opts.stale_after.as_secs_f64() {
                report.warn(format!("ignoring follower {who}: status not updated for {age:.0}s (dead?)"));
                report.followers_ignored.push(who);
                continue;
            }
            if st.state == "stopped" {
                report.followers_ignored.push(format!("{who}: stopped"));
                continue;
            }
            if st.run_id != ptr.run_id {
                report.followers_ignored.push(format!("{who}: another run"));
                continue;
            }
            if let Some(n) = st.needs.or(st.applied) {
                for (&v, _) in entries.range(n..) {
                    protect(v, &format!("follower {}", st.host));
                }
            }
            report.followers_live.push(who);
        }
    }

    // Decide, then delete oldest first.
    for (&v, e) in &entries {
        let r = reasons.remove(&v).unwrap_or_default();
        let dir = root.join(version_dir_name(v));
        let delete = r.is_empty();
        report.versions.push(VersionVerdict { version: v, kind: e.kind.clone(), age_secs: (e.age * 10.0).round() / 10.0, bytes: tree_bytes(&dir), delete, reasons: r });
    }
    for vv in &report.versions {
        if vv.delete {
            if !opts.dry_run {
                crate::failpoint!("gc.before_remove");
                remove_version(&root, vv.version)?;
            }
            report.deleted.push(vv.version);
            report.bytes_freed += vv.bytes;
        } else {
            report.kept.push(vv.version);
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*.json", "host-1.json"));
        assert!(wildcard_match("h?st*", "host-1.json"));
        assert!(!wildcard_match("*.json", "host-1.json.tmp"));
        assert!(wildcard_match("*", ""));
        assert!(!wildcard_match("a*b", "acbx"));
        assert!(wildcard_match("a*b*c", "axxbyyc"));
    }
}
