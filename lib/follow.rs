//! `delta-follow`: keep a rollout host's local checkpoint at `SRC/latest` and hot-reload the
//! engine after every verified apply (BRIEF §1: every rollout host pulls on its own).
//!
//! One cycle of the loop:
//!
//! 1. Read `SRC/latest` (the weight plane's own parser; an unparseable pointer is an error,
//!    never a fallback to base).
//! 2. Nothing to do when a pull in this process verified that version, the engine reloaded it,
//!    and LOCAL's `state.json` still names it with no `intent.json` (re-read every cycle: a
//!    `delta-apply` may have moved LOCAL since). Otherwise take LOCAL's host lock and keep it
//!    through step 3, so a `delta-apply` on the same LOCAL waits until the engine has loaded
//!    what was verified.
//! 3. Record `state: "pulling"` in the status file and call [`crate::apply::pull_locked`] with
//!    the pointer's version as an explicit target (a no-op when LOCAL holds it: state, intent
//!    and headers re-checked). Once its walk has found what it will read, and before it reads
//!    any of it, `needs` (the oldest version it reads, or LOCAL's version if older) is written.
//!    The pull validates the chain and verifies every patched tensor against its checksum;
//!    only when it returns `Ok` is the version called applied.
//! 4. If the engine has not reloaded the applied version: run the reload command
//!    (`sh -c CMD` with `DISAGG_VERSION`, `DISAGG_LOCAL`, `DISAGG_RUN_ID`, `DISAGG_SOURCE`), and
//!    record the reloaded version. A restarted follower trusts the `reloaded` of its previous
//!    status file (same LOCAL), unless `--reload-on-start` says the engine restarted too.
//! 5. Sleep the poll interval ±20 % (so a fleet started together does not poll the shared
//!    filesystem in lockstep). A failure (missing or incomplete version, checksum mismatch,
//!    failed reload, bad pointer) is recorded in the status file (`last_error`) and retried
//!    after an exponential backoff (0.5 s doubling to `--max-backoff`, jittered).
//!
//! The status file (`FollowerStatus`, docs/FORMATS.md §11) is what `delta-gc` reads to know
//! which versions a live follower may still read. It is rewritten atomically (fsio) on every
//! change and at least every [`HEARTBEAT`] while idle. Its `applied` is what LOCAL holds by the
//! pull's own checks ([`LocalCheckpoint::status`]), never `state.json` alone: a torn or
//! half-applied LOCAL holds nothing.

use crate::apply::{self, ApplyOptions, ApplyReport, LocalCheckpoint, LocalStatus, Target};
use crate::error::{Error, Result};
use crate::fsio::{self, HostLock};
use crate::pointer::{read_latest, Pointer};
use crate::version::parse_version_str;
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// Status files live here by default: `SRC/.followers/NAME.json` (what `delta-gc` globs).
pub const FOLLOWERS_DIR: &str = ".followers";
/// The status file's schema version.
pub const STATUS_SCHEMA: u64 = 1;
/// An idle follower rewrites its status at least this often, so `delta-gc` can tell it alive.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// First retry delay after a failure; doubles up to `max_backoff`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// `SRC/.followers/NAME.json`, or wherever `--status` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowerStatus {
    pub schema_version: u64,
    /// Host name (or `--name`).
    pub host: String,
    pub pid: u32,
    /// The host-local checkpoint this follower maintains.
    pub local: String,
    pub source: String,
    /// Run id of the versions (the pointer's `RUN_ID/`), null for versions directly under SRC.
    pub run_id: Option<String>,
    /// `idle` | `pulling` | `reloading` | `error` | `stopped` (exited cleanly: needs nothing).
    pub state: String,
    /// Version LOCAL holds, verified (null: nothing yet, or LOCAL is torn or half-applied).
    pub applied: Option<u64>,
    /// Version the engine last reloaded successfully (null: unknown or never).
    pub reloaded: Option<u64>,
    /// Version being pulled toward, or the last one seen in `latest`.
    pub target: Option<u64>,
    /// The oldest version this follower may still read: nothing at or above it may be collected.
    pub needs: Option<u64>,
    /// Unix seconds of this write.
    pub updated_at: f64,
    pub last_error: Option<String>,
    /// Failures since the last success.
    pub errors: u64,
}

impl FollowerStatus {
    pub fn read(path: &Path) -> Result<FollowerStatus> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::bad_input(path, format!("not a follower status: {e}")))
    }

    /// Seconds since `updated_at` (0 if the clock says it is in the future).
    pub fn age_secs(&self) -> f64 {
        (unix_now() - self.updated_at).max(0.0)
    }
}

#[derive(Debug, Clone)]
pub struct FollowOptions {
    pub local: PathBuf,
    pub base: Option<PathBuf>,
    pub source: PathBuf,
    /// One pull + reload, then exit.
    pub once: bool,
    /// Exit 0 once this version (or a newer one) is applied and reloaded.
    pub until: Option<u64>,
    pub poll: Duration,
    pub max_backoff: Duration,
    pub reload_cmd: Option<String>,
    /// Kill the reload command after this long and count it failed.
    pub reload_timeout: Duration,
    /// None: `SRC/.followers/<name>.json`.
    pub status: Option<PathBuf>,
    /// None: host name plus a short hash of LOCAL's absolute path.
    pub name: Option<String>,
    /// Reload once at start even if the previous status file says the engine has LOCAL's version.
    pub reload_on_start: bool,
    pub pre_read_hook: Option<String>,
    pub json: bool,
    /// Apply without waiting for the disk (`--no-fsync`; crate::apply).
    pub no_fsync: bool,
}

/// One cycle that did something (printed as one JSON line with `--json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowEvent {
    /// The version `latest` named.
    pub version: u64,
    pub run_id: Option<String>,
    /// What LOCAL held before this cycle.
    pub previous: Option<u64>,
    /// Versions applied as deltas in this cycle, in order.
    pub applied: Vec<u64>,
    pub seeded_from: Option<u64>,
    /// Several deltas applied in one pass (a catch-up).
    pub folded: bool,
    pub repaired: bool,
    /// As delta-apply's `--json`: what was repaired, or why an intact LOCAL was reseeded.
    pub repair_reason: Option<String>,
    pub foreign_reason: Option<String>,
    pub noop: bool,
    /// The version the engine now runs (after this cycle's reload, if any).
    pub reloaded: Option<u64>,
    pub seconds_apply: f64,
    pub seconds_reload: f64,
    /// Set on a failed cycle (then retried).
    pub error: Option<String>,
    pub exit_code: Option<i32>,
}

static RNG_COUNTER: AtomicU64 = AtomicU64::new(0);
/// Sleep up to `d`, waking early when a stop signal arrived.
fn sleep_unless_stopped(d: Duration) {
    let end = Instant::now() + d;
    while crate::stop::requested().is_none() {
        let now = Instant::now();
        if now >= end {
            break;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// A factor in [1 - frac, 1 + frac], different per process and call.
pub fn jitter_factor(frac: f64) -> f64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let seed = format!("{nanos}:{}:{}", std::process::id(), RNG_COUNTER.fetch_add(1, Ordering::Relaxed));
    let r = twox_hash::XxHash3_64::oneshot(seed.as_bytes()) as f64 / u64::MAX as f64;
    1.0 - frac + 2.0 * frac * r
}

pub fn jittered(d: Duration, frac: f64) -> Duration {
    d.mul_f64(jitter_factor(frac))
}

pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown-host".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let s: String = String::from_utf8_lossy(&buf[..end]).chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with('.') {
        format!("host{s}")
    } else {
        s
    }
}

fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf()))
}

/// Default status name: `HOST-xxxxxxxx` (hash of LOCAL's absolute path, so several followers on
/// one host get different files and a restarted follower finds its own).
pub fn default_name(local: &Path) -> String {
    let h = twox_hash::XxHash3_64::oneshot(absolute(local).to_string_lossy().as_bytes());
    format!("{}-{:08x}", hostname(), h as u32)
}

pub fn default_status_path(source: &Path, name: &str) -> PathBuf {
    source.join(FOLLOWERS_DIR).join(format!("{name}.json"))
}

/// The version LOCAL holds for `run_id`'s versions by the pull's checks; None when it is fresh,
/// dirty (torn, half-applied) or cannot be read.
fn held(local: &LocalCheckpoint, lock: &HostLock, source: &Path, run_id: &Option<String>) -> Option<u64> {
    match local.status(lock, source, run_id) {
        Ok(LocalStatus::Clean(v)) => Some(v),
        _ => None,
    }
}

/// Run the reload command with the version in its environment; Hook error on failure.
pub fn run_reload(cmd: &str, version: u64, local: &Path, source: &Path, run_id: &Option<String>, timeout: Duration) -> Result<()> {
    let hook_err = |reason: String| Error::Hook { command: cmd.to_string(), reason };
    let mut child = crate::hooks::shell(cmd)
        .env("DISAGG_VERSION", version.to_string())
        .env("DISAGG_LOCAL", absolute(local))
        .env("DISAGG_SOURCE", source)
        .env("DISAGG_RUN_ID", run_id.clone().unwrap_or_default())
        // The follower holds LOCAL's lock through the reload (see `Follower::cycle`).
        .env(crate::fsio::HELD_LOCK_ENV, absolute(&LocalCheckpoint::new(local).lock_path()))
        .stdin(std::process::Stdio::null())
        // Its own process group, so a timeout kills the whole command (curl included).
        .process_group(0)
        .spawn()
        .map_err(|e| hook_err(format!("cannot start sh: {e}")))?;
    let start = Instant::now();
    let mut sleep = Duration::from_millis(2);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(hook_err(format!("reload for version {version} exited with {st}"))),
            Ok(None) if start.elapsed() > timeout => {
                // SAFETY: plain syscall on the group we created; the child is not reaped yet,
                // so its pid (= group id) cannot have been reused.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                return Err(hook_err(format!("reload for version {version} still running after {timeout:?}; killed")));
            }
            Ok(None) => {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(hook_err(format!("waiting for reload: {e}"))),
        }
    }
}

/// A follower: the loop state plus its status file.
pub struct Follower {
    opts: FollowOptions,
    status_path: PathBuf,
    status: FollowerStatus,
    last_write: Option<Instant>,
    backoff: Duration,
    /// The version a pull in this process last returned Ok for (the only one it may reload),
    /// with LOCAL's `state.json` as that pull left it. None at start, so the first cycle always
    /// pulls (and so checks LOCAL) before it idles.
    verified: Option<(u64, Option<apply::SyncState>)>,
}

impl Follower {
    pub fn new(opts: FollowOptions) -> Result<Self> {
        if opts.poll.is_zero() && !opts.once {
            return Err(Error::Usage("--poll must be > 0".into()));
        }
        // Before anything is created: a LOCAL inside SRC would otherwise be made there.
        apply::check_local_apart(&opts.local, opts.base.as_deref(), &opts.source)?;
        let name = opts.name.clone().unwrap_or_else(|| default_name(&opts.local));
        if !crate::version::is_valid_run_id(&name) {
            return Err(Error::Usage(format!("--name {name:?}: use letters, digits, '.', '_' or '-'")));
        }
        let status_path = opts.status.clone().unwrap_or_else(|| default_status_path(&opts.source, &name));
        if let Some(parent) = status_path.parent() {
            if !parent.as_os_str().is_empty() {
                fsio::create_dir_durable(parent)?;
            }
        }
        std::fs::create_dir_all(&opts.local).map_err(|e| Error::io(&opts.local, e))?;
        let local = LocalCheckpoint::new(&opts.local);
        // What LOCAL holds now, judged as the pull judges it, so the first status does not name
        // a version whose bytes are torn. Under the lock: it waits out a delta-apply in progress.
        let (applied, run_id) = {
            let lock = local.lock(None)?;
            let run_id = local.read_state().ok().flatten().and_then(|s| s.run_id);
            (held(&local, &lock, &opts.source, &run_id), run_id)
        };
        let local_abs = absolute(&opts.local).to_string_lossy().into_owned();
        // What the engine holds, as far as the previous follower of this LOCAL knew.
        let reloaded = match FollowerStatus::read(&status_path) {
            Ok(prev) if !opts.reload_on_start && prev.local == local_abs && prev.run_id == run_id => prev.reloaded,
            _ => None,
        };
        let status = FollowerStatus {
            schema_version: STATUS_SCHEMA,
            host: name,
            pid: std::process::id(),
            local: local_abs,
            source: absolute(&opts.source).to_string_lossy().into_owned(),
            run_id,
            state: "idle".into(),
            applied,
            reloaded,
            target: None,
            needs: applied,
            updated_at: 0.0,
            last_error: None,
            errors: 0,
        };
        Ok(Follower { opts, status_path, status, last_write: None, backoff: FIRST_BACKOFF, verified: None })
    }

    pub fn status_path(&self) -> &Path {
        &self.status_path
    }
    pub fn status(&self) -> &FollowerStatus {
        &self.status
    }

    fn write_status(&mut self) -> Result<()> {
        self.status.updated_at = unix_now();
        let text = serde_json::to_string(&self.status).map_err(|e| Error::Internal(format!("status JSON: {e}")))?;
        fsio::write_atomic(&self.status_path, format!("{text}\n").as_bytes())?;
        self.last_write = Some(Instant::now());
        Ok(())
    }

    fn set_state(&mut self, state: &str) -> Result<()> {
        self.status.state = state.into();
        self.write_status()
    }

    /// One cycle: bring LOCAL to `latest` and the engine to LOCAL. `Ok(None)`: nothing to do.
    pub fn cycle(&mut self) -> Result<Option<FollowEvent>> {
        let ptr = match read_latest(&self.opts.source)? {
            Some(p) => p,
            None => {
                if self.opts.once {
                    return Err(Error::not_found(self.opts.source.join(crate::pointer::POINTER_NAME), "no `latest` pointer has been published yet"));
                }
                return Ok(None);
            }
        };
        if ptr.run_id != self.status.run_id {
            // Another run: LOCAL's state is foreign to it (pull treats it as fresh).
            self.status.run_id = ptr.run_id.clone();
            self.status.applied = None;
            self.status.reloaded = None;
        }
        if self.up_to_date(&ptr) {
            self.status.target = Some(ptr.version);
            return Ok(None);
        }
        // LOCAL's lock from the pull through the reload: a delta-apply on this LOCAL waits until
        // the engine has loaded what the pull verified, so the engine is never told a version
        // while LOCAL is being changed to another.
        let local = LocalCheckpoint::new(&self.opts.local);
        let lock = local.lock(None)?;
        let r = self.pull_and_reload(&lock, &ptr);
        if r.is_err() {
            // The pull may have died anywhere: what LOCAL holds now, by the pull's own checks
            // (state.json alone still names the old version under a torn apply).
            self.status.applied = held(&local, &lock, &self.opts.source, &self.status.run_id);
            self.verified = None;
        }
        r.map(Some)
    }

    /// Nothing to do: a pull in this process verified `ptr`'s version, the engine reloaded it,
    /// and LOCAL still says it holds it (state.json re-read, no intent: someone may have run
    /// delta-apply on LOCAL since). Cheap, without the lock; a change seen here is judged by
    /// the pull, under the lock. (A file torn in place while the follower runs is not seen
    /// until a restart or the next version.)
    fn up_to_date(&self, ptr: &Pointer) -> bool {
        let Some((version, left)) = &self.verified else { return false };
        if *version != ptr.version || self.status.applied != Some(ptr.version) || self.status.reloaded != Some(ptr.version) {
            return false;
        }
        let local = LocalCheckpoint::new(&self.opts.local);
        let recorded = local.read_state().ok().flatten();
        // The whole state as the pull left it: a delta-apply from another source (or of a
        // version published again) that landed on the same number changes source/fingerprint.
        !local.intent_exists() && recorded.is_some_and(|s| parse_version_str(&s.version) == Some(ptr.version) && s.run_id == ptr.run_id && Some(&s) == left.as_ref())
    }

    /// Steps 3 and 4 of a cycle, under LOCAL's lock.
    fn pull_and_reload(&mut self, lock: &HostLock, ptr: &Pointer) -> Result<FollowEvent> {
        let mut ev = FollowEvent { version: ptr.version, run_id: ptr.run_id.clone(), previous: self.status.applied, ..Default::default() };
        // Even when an earlier cycle verified this version: the lock was let go since, and a
        // no-op pull re-checks LOCAL cheaply (state, intent, headers) before the engine reads it.
        let r = self.pull(lock, ptr)?;
        ev.applied = r.applied;
        ev.seeded_from = r.seeded_from;
        ev.folded = r.folded;
        ev.repaired = r.repaired;
        ev.repair_reason = r.repair_reason;
        ev.foreign_reason = r.foreign_reason;
        ev.noop = r.noop;
        ev.seconds_apply = r.seconds;
        if self.status.reloaded != Some(ptr.version) {
            let t = Instant::now();
            if let Some(cmd) = self.opts.reload_cmd.clone() {
                self.set_state("reloading")?;
                run_reload(&cmd, ptr.version, &self.opts.local, &self.opts.source, &ptr.run_id, self.opts.reload_timeout)?;
            }
            ev.seconds_reload = t.elapsed().as_secs_f64();
            self.status.reloaded = Some(ptr.version);
        }
        ev.reloaded = self.status.reloaded;
        self.status.last_error = None;
        self.status.errors = 0;
        self.set_state("idle")?;
        Ok(ev)
    }

    fn pull(&mut self, lock: &HostLock, ptr: &Pointer) -> Result<ApplyReport> {
        let opts = ApplyOptions {
            local: self.opts.local.clone(),
            base: self.opts.base.clone(),
            source: self.opts.source.clone(),
            target: Target::Version(ptr.version),
            run_id: ptr.run_id.clone(),
            pre_read_hook: self.opts.pre_read_hook.clone(),
            lock_timeout: None,
            no_fsync: self.opts.no_fsync,
        };
        // `needs` still covers everything at or above the applied version while the walk reads
        // the chain's indexes (and runs the pre-read hook, which may fetch each version).
        self.status.target = Some(ptr.version);
        self.set_state("pulling")?;
        let r = apply::pull_locked(&opts, lock, &mut |plan| {
            // Tell delta-gc what we are about to read before reading it: exactly what this pull
            // reads (down to LOCAL's version when it is clean, to a full version or 0 when not),
            // and LOCAL's version, which a clean pull continues from.
            self.status.applied = plan.previous;
            self.status.needs = Some(plan.previous.map_or(plan.oldest_read, |p| p.min(plan.oldest_read)));
            self.set_state("pulling")
        })?;
        // Verified: every checksum of every applied delta matched.
        self.verified = Some((r.version, LocalCheckpoint::new(&self.opts.local).read_state().ok().flatten()));
        self.status.applied = Some(r.version);
        self.status.needs = Some(r.version);
        Ok(r)
    }

    fn record_error(&mut self, e: &Error) {
        self.status.last_error = Some(e.to_string());
        self.status.errors += 1;
        // `applied` was re-judged by the cycle, under the lock, if the failure came after it.
        self.status.state = "error".into();
        if let Err(w) = self.write_status() {
            eprintln!("delta-follow: warning: cannot write status {}: {w}", self.status_path.display());
        }
    }

    fn emit(&self, ev: &FollowEvent) {
        if self.opts.json {
            println!("{}", serde_json::to_string(ev).expect("plain JSON"));
        } else if let Some(err) = &ev.error {
            println!("version {}: failed: {err}", ev.version);
        } else {
            let mut s = format!("version {}", ev.version);
            if let Some(v) = ev.seeded_from {
                s.push_str(&format!(", seeded from {v}"));
            }
            if !ev.applied.is_empty() {
                s.push_str(&format!(", applied {:?}", ev.applied));
            }
            if ev.noop {
                s.push_str(", already applied");
            }
            s.push_str(&format!(" in {:.3}s, reloaded in {:.3}s", ev.seconds_apply, ev.seconds_reload));
            println!("{s}");
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }

    /// `--once`: one cycle; the error (if any) is returned for the exit code.
    pub fn run_once(&mut self) -> Result<FollowEvent> {
        match self.cycle() {
            Ok(Some(ev)) => {
                self.emit(&ev);
                Ok(ev)
            }
            Ok(None) => {
                self.write_status()?;
                let ev = FollowEvent {
                    version: self.status.target.unwrap_or(0),
                    run_id: self.status.run_id.clone(),
                    previous: self.status.applied,
                    noop: true,
                    reloaded: self.status.reloaded,
                    ..Default::default()
                };
                self.emit(&ev);
                Ok(ev)
            }
            Err(e) => {
                self.record_error(&e);
                Err(e)
            }
        }
    }

    /// The loop; returns only with `--until` reached (or if the first status write fails).
    pub fn run(&mut self) -> Result<()> {
        if self.opts.once {
            return self.run_once().map(|_| ());
        }
        self.write_status()?;
        // SIGTERM/SIGINT end the loop between cycles (the status then says `stopped`); a
        // signal that arrives mid-pull lets the pull reach a clean point first (crate::stop).
        crate::stop::install();
        loop {
            if crate::stop::requested().is_some() {
                // A stopped follower reads nothing; when it restarts, its pull walks from
                // `latest` down to its applied version or the full version `latest`'s chain
                // starts from, both of which delta-gc keeps.
                self.status.needs = None;
                self.set_state("stopped")?;
                return Ok(());
            }
            let wait = match self.cycle() {
                Ok(ev) => {
                    self.backoff = FIRST_BACKOFF;
                    if let Some(ev) = ev {
                        self.emit(&ev);
                    } else if self.last_write.is_none_or(|t| t.elapsed() >= HEARTBEAT) {
                        // A missed heartbeat is not worth dying for; the next one retries.
                        if let Err(e) = self.write_status() {
                            eprintln!("delta-follow: warning: cannot write status {}: {e}", self.status_path.display());
                        }
                    }
                    if let (Some(u), Some(r)) = (self.opts.until, self.status.reloaded) {
                        if r >= u && self.status.applied == Some(r) {
                            return Ok(());
                        }
                    }
                    jittered(self.opts.poll, 0.2)
                }
                // A pull stopped at a clean point by the signal: the loop reports `stopped`.
                Err(Error::Interrupted { .. }) => continue,
                Err(e) => {
                    eprintln!("delta-follow: error (retrying in ~{:.1}s): {e}", self.backoff.as_secs_f64());
                    self.record_error(&e);
                    let ev = FollowEvent {
                        version: self.status.target.unwrap_or(0),
                        run_id: self.status.run_id.clone(),
                        previous: self.status.applied,
                        reloaded: self.status.reloaded,
                        error: Some(e.to_string()),
                        exit_code: Some(e.exit_code()),
                        ..Default::default()
                    };
                    self.emit(&ev);
                    let w = jittered(self.backoff, 0.2);
                    self.backoff = (self.backoff * 2).min(self.opts.max_backoff.max(FIRST_BACKOFF));
                    w
                }
            };
            sleep_unless_stopped(wait);
        }
    }
}

/// `delta-follow`'s entry point.
pub fn follow(opts: &FollowOptions) -> Result<()> {
    Follower::new(opts.clone())?.run()
}
