//! Crash tests: `delta-apply` and `delta-diff` killed at every named failpoint and at random
//! moments (SIGKILL), in a loop on the same LOCAL directory. After every kill one invariant
//! must hold — if `state.json` names a version and no intent is pending, LOCAL's bytes are
//! exactly that version — and the next run must converge to its target.
//!
//! Built only with `--features failpoints` (see Cargo.toml); `make test` runs it with a
//! bounded number of trials, `make crash` with many more (DISAGG_CRASH_TRIALS).

use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const DIFF: &str = env!("CARGO_BIN_EXE_delta-diff");
const APPLY: &str = env!("CARGO_BIN_EXE_delta-apply");
const ADVANCE: &str = env!("CARGO_BIN_EXE_pointer-advance");

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("disagg-crash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A single-file checkpoint of `n` BF16 tensors, each `len` bytes.
fn write_checkpoint(dir: &Path, tensors: &[Vec<u8>]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut header = Map::new();
    let mut off = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        header.insert(format!("layers.{i}.weight"), json!({"dtype": "BF16", "shape": [t.len() / 2], "data_offsets": [off, off + t.len()]}));
        off += t.len();
    }
    let mut bytes = disagg::checkpoint::header_bytes(&Value::Object(header));
    for t in tensors {
        bytes.extend_from_slice(t);
    }
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::write(dir.join("config.json"), b"{\"model_type\": \"test\"}\n").unwrap();
}

/// Base checkpoint plus `steps` successors, each changing ~2 % of bytes.
fn make_steps(root: &Path, steps: usize, rng: &mut Rng) -> Vec<PathBuf> {
    let mut tensors: Vec<Vec<u8>> = (0..8).map(|_| (0..(256 << 10)).map(|_| rng.next() as u8).collect()).collect();
    let mut dirs = Vec::new();
    for s in 0..=steps {
        let d = root.join(format!("step_{s}"));
        write_checkpoint(&d, &tensors);
        dirs.push(d);
        for t in tensors.iter_mut() {
            for _ in 0..t.len() / 50 {
                let i = rng.below(t.len() as u64) as usize;
                t[i] ^= 1 + (rng.next() as u8 & 7);
            }
        }
    }
    dirs
}

/// A scratch root with a base checkpoint and `steps` successors, and `SRC = root/src`.
fn setup(name: &str, seed: u64, steps: usize) -> (PathBuf, Vec<PathBuf>, PathBuf) {
    let root = scratch(name);
    let steps = make_steps(&root, steps, &mut Rng(seed));
    let src = root.join("src");
    (root, steps, src)
}

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin);
    c.args(args).env_remove("DISAGG_FAILPOINT");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: &Output) {
    assert!(out.status.success(), "failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Publish: v1 delta (xor), v2 delta (overwrite), v3 full, v4 delta (xor).
fn publish(src: &Path, steps: &[PathBuf]) {
    let enc = ["xor", "overwrite", "", "xor"];
    for v in 1..=4usize {
        let mut args = vec![p(&steps[v - 1]), p(&steps[v]), "--publish", p(src)];
        let vs = v.to_string();
        args.extend(["--version", &vs]);
        if v == 3 {
            args.push("--full");
        } else {
            args.extend(["--encoding", enc[v - 1]]);
        }
        ok(&run(DIFF, &args, &[]));
    }
    ok(&run(ADVANCE, &[p(src), "4"], &[]));
}

fn state_version(local: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(local.join(".weight_sync/state.json")).ok()?;
    let v: Value = serde_json::from_str(&text).expect("state.json is always whole JSON");
    Some(v["version"].as_str().unwrap().parse().unwrap())
}

/// The invariant at any crash point: a recorded version with no pending intent is on disk.
fn check_invariant(local: &Path, steps: &[PathBuf], when: &str) {
    if local.join(".weight_sync/intent.json").exists() {
        return;
    }
    if let Some(v) = state_version(local) {
        let have = std::fs::read(local.join("model.safetensors")).unwrap();
        let want = std::fs::read(steps[v].join("model.safetensors")).unwrap();
        assert!(have == want, "{when}: state.json says version {v} but LOCAL's bytes differ and no intent is pending");
    }
}

fn converge(local: &Path, src: &Path, base: &Path, target: usize, steps: &[PathBuf]) {
    let t = target.to_string();
    let out = run(APPLY, &["--local", p(local), "--base", p(base), "--source", p(src), "--target", &t, "--json"], &[]);
    ok(&out);
    assert_eq!(state_version(local), Some(target));
    assert!(!local.join(".weight_sync/intent.json").exists());
    let have = std::fs::read(local.join("model.safetensors")).unwrap();
    assert!(have == std::fs::read(steps[target].join("model.safetensors")).unwrap(), "LOCAL bytes differ from version {target} after a successful run");
}

#[test]
fn apply_killed_at_every_failpoint_converges() {
    let (root, steps, src) = setup("failpoints", 0x5eed, 4);
    publish(&src, &steps);
    let local = root.join("local");
    let names = ["apply.seed_copy", "fsio.before_fsync", "fsio.before_rename", "fsio.before_dir_fsync", "apply.after_tensor", "apply.before_state", "apply.before_clear_intent"];
    for (i, name) in names.iter().enumerate() {
        for target in [2usize, 4, 1] {
            let t = target.to_string();
            let out = run(APPLY, &["--local", p(&local), "--base", p(&steps[0]), "--source", p(&src), "--target", &t], &[("DISAGG_FAILPOINT", name)]);
            check_invariant(&local, &steps, &format!("after abort at {name}"));
            if out.status.success() {
                // The failpoint was not on this run's path (e.g. a no-op); still converged.
                converge(&local, &src, &steps[0], target, &steps);
                continue;
            }
            assert!(out.status.code().is_none(), "{name}: expected an abort, got {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
            converge(&local, &src, &steps[0], target, &steps);
            // Alternate the starting point for the next failpoint.
            converge(&local, &src, &steps[0], [1, 3, 2][i % 3], &steps);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn apply_killed_at_random_moments_converges() {
    let trials: usize = std::env::var("DISAGG_CRASH_TRIALS").ok().and_then(|s| s.parse().ok()).unwrap_or(40);
    let (root, steps, src) = setup("random", 0xc0ffee, 4);
    // The kill schedule's own stream (the checkpoints came from the seed's).
    let mut rng = Rng(0xc0ffee ^ 0x9e37_79b9);
    publish(&src, &steps);
    let local = root.join("local");
    // Sleeps inside the apply widen the windows so kills land mid-mutation.
    let slow = "apply.after_tensor:sleep-2,fsio.before_rename:sleep-1,apply.seed_copy:sleep-3";
    // Runs with --no-fsync mixed in: a killed process leaves the page cache whole, so the
    // invariant holds for them too, and durable runs after them settle their bytes.
    let spawn_apply = |t: &str, no_fsync: bool| {
        let mut args = vec!["--local", p(&local), "--base", p(&steps[0]), "--source", p(&src), "--target", t];
        if no_fsync {
            args.push("--no-fsync");
        }
        spawn(APPLY, &args, &[("DISAGG_FAILPOINT", slow)])
    };
    // Kill times are drawn over half the time a whole run takes here (seed + the chain, from a
    // fresh LOCAL; most trials do less), so the test keeps landing mid-flight however fast the
    // build or the machine.
    let started = std::time::Instant::now();
    assert!(spawn_apply("4", false).wait().unwrap().success());
    let window_us = (started.elapsed().as_micros() as u64 / 2).max(2_000);
    let _ = std::fs::remove_dir_all(&local);
    let mut killed = 0;
    for trial in 0..trials {
        let target = 1 + rng.below(4) as usize;
        let t = target.to_string();
        let mut child = spawn_apply(&t, rng.below(2) == 0);
        std::thread::sleep(Duration::from_micros(rng.below(window_us)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        let status = child.wait().unwrap();
        check_invariant(&local, &steps, &format!("trial {trial} ({status})"));
        if rng.below(3) == 0 {
            converge(&local, &src, &steps[0], target, &steps);
        }
    }
    eprintln!("crash loop: {killed} of {trials} runs killed mid-flight");
    assert!(killed * 2 >= trials, "only {killed} of {trials} runs were killed mid-flight: the test is not exercising crashes");
    converge(&local, &src, &steps[0], 4, &steps);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn publisher_killed_before_index_is_refused_then_replaced() {
    let (root, steps, src) = setup("publisher", 0xfeed, 2);
    ok(&run(DIFF, &[p(&steps[0]), p(&steps[1]), "--publish", p(&src), "--version", "1"], &[]));
    ok(&run(ADVANCE, &[p(&src), "1"], &[]));
    let out = run(DIFF, &[p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2"], &[("DISAGG_FAILPOINT", "diff.before_index")]);
    assert!(out.status.code().is_none(), "expected an abort");
    // The incomplete version cannot be pointed at, nor silently overwritten.
    let adv = run(ADVANCE, &[p(&src), "2"], &[]);
    assert_eq!(adv.status.code(), Some(5), "{}", String::from_utf8_lossy(&adv.stderr));
    assert_eq!(std::fs::read_to_string(src.join("latest")).unwrap(), "weight_v000001\n");
    let again = run(DIFF, &[p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2"], &[]);
    assert_eq!(again.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&again.stderr).contains("incomplete"));
    // A host following `latest` still gets version 1.
    let local = root.join("local");
    ok(&run(APPLY, &["--local", p(&local), "--base", p(&steps[0]), "--source", p(&src)], &[]));
    assert_eq!(state_version(&local), Some(1));
    ok(&run(DIFF, &[p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2", "--replace-incomplete"], &[]));
    ok(&run(ADVANCE, &[p(&src), "2", "--expect", "weight_v000001"], &[]));
    converge(&local, &src, &steps[0], 2, &steps);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn publisher_killed_or_failing_mid_stream_leaves_nothing_under_a_final_name() {
    let (root, steps, src) = setup("publisher_stream", 0xbeef, 2);
    ok(&run(DIFF, &[p(&steps[0]), p(&steps[1]), "--publish", p(&src), "--version", "1"], &[]));
    ok(&run(ADVANCE, &[p(&src), "1"], &[]));
    let v2 = src.join("weight_v000002");
    let final_names =
        |d: &Path| -> Vec<String> { std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect() };
    // Killed after the first payload went into its (temp) data file: no data file or index
    // under a final name, the version is refused, and a rerun must be told to replace it.
    let out = run(DIFF, &[p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2"], &[("DISAGG_FAILPOINT", "diff.after_payload")]);
    assert!(out.status.code().is_none(), "expected an abort");
    assert_eq!(final_names(&v2), Vec::<String>::new(), "only temps and the incomplete marker");
    assert_eq!(run(ADVANCE, &[p(&src), "2"], &[]).status.code(), Some(5));
    // An I/O error at the same point: a clean failure that removes the version directory it
    // created (temp data files and marker with it), so a plain rerun publishes.
    let out = run(DIFF, &[p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2", "--replace-incomplete"], &[("DISAGG_FAILPOINT", "diff.after_payload:error")]);
    assert!(out.status.code().is_some_and(|c| c != 0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!v2.exists(), "a failed publish removes its version directory: {:?}", std::fs::read_dir(&v2).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>()));
    let hidden: Vec<String> =
        std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(".deleting-") || n.starts_with(".tmp-")).collect();
    assert_eq!(hidden, Vec::<String>::new(), "no tree being removed or temp file left in the publish root");
    assert_eq!(run(ADVANCE, &[p(&src), "2"], &[]).status.code(), Some(6), "nothing to point at");
    // The same failure just before the index (every data file already renamed to its final
    // name): still removed, since nothing was published.
    let out = run(DIFF, &[p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2"], &[("DISAGG_FAILPOINT", "diff.before_index:error")]);
    assert!(out.status.code().is_some_and(|c| c != 0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!v2.exists(), "a publish failing before its index removes its version directory");
    ok(&run(DIFF, &[p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2"], &[]));
    ok(&run(ADVANCE, &[p(&src), "2", "--expect", "weight_v000001"], &[]));
    let local = root.join("local");
    ok(&run(APPLY, &["--local", p(&local), "--base", p(&steps[0]), "--source", p(&src)], &[]));
    converge(&local, &src, &steps[0], 2, &steps);
    let _ = std::fs::remove_dir_all(&root);
}

/// Wait up to 20 s for `cond`.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn spawn<S: AsRef<std::ffi::OsStr>>(bin: &str, args: &[S], env: &[(&str, &str)]) -> std::process::Child {
    let mut c = Command::new(bin);
    c.args(args).env_remove("DISAGG_FAILPOINT").stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

#[test]
fn stop_signals_end_writers_at_clean_points() {
    use std::os::unix::process::ExitStatusExt;
    let (root, steps, src) = setup("stop_signals", 0x5109, 4);
    ok(&run(DIFF, &[p(&steps[0]), p(&steps[1]), "--publish", p(&src), "--version", "1"], &[]));

    // delta-diff, SIGTERM while payloads are being written: exit 143, the unpublished version
    // is removed, and the same command then publishes.
    let v2 = src.join("weight_v000002");
    let args = [p(&steps[1]), p(&steps[2]), "--publish", p(&src), "--version", "2"];
    let child = spawn(DIFF, &args, &[("DISAGG_FAILPOINT", "diff.after_payload:sleep-1500")]);
    wait_for("a temp data file", || std::fs::read_dir(&v2).is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains("model-"))));
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGTERM"));
    assert!(!v2.exists(), "a stopped publish removes its version directory");
    ok(&run(DIFF, &args, &[]));
    for v in 3..=4usize {
        let (vs, a, b) = (v.to_string(), p(&steps[v - 1]), p(&steps[v]));
        ok(&run(DIFF, &[a, b, "--publish", p(&src), "--version", &vs], &[]));
    }
    ok(&run(ADVANCE, &[p(&src), "4"], &[]));

    let local = root.join("local");
    let apply_args = |t: &str| -> Vec<String> { ["--local", p(&local), "--base", p(&steps[0]), "--source", p(&src), "--target", t].map(String::from).to_vec() };
    let spawn_apply = |t: &str, env: &[(&str, &str)]| spawn(APPLY, &apply_args(t), env);
    converge(&local, &src, &steps[0], 1, &steps);

    // delta-apply, SIGTERM during the patch pass: the pass is finished and recorded (exit 0),
    // so the next run has nothing to repair.
    let intent = local.join(".weight_sync/intent.json");
    let child = spawn_apply("2", &[("DISAGG_FAILPOINT", "apply.after_tensor:sleep-150")]);
    wait_for("the apply intent", || intent.exists());
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    ok(&out);
    assert_eq!(state_version(&local), Some(2));
    assert!(!intent.exists());
    check_invariant(&local, &steps, "after a SIGTERM during the patch");
    let again = spawn_apply("2", &[]).wait_with_output().unwrap();
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stdout).contains("already"), "the next run has nothing to do: {}", String::from_utf8_lossy(&again.stdout));

    // Waiting for the host lock: SIGTERM ends the wait at once, LOCAL untouched.
    let lock = std::fs::File::options().read(true).write(true).open(local.join(".weight_sync/lock")).unwrap();
    lock.lock().unwrap();
    let child = spawn_apply("3", &[]);
    std::thread::sleep(Duration::from_millis(300));
    let t = std::time::Instant::now();
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(5), "the lock wait ended promptly");
    lock.unlock().unwrap();
    drop(lock);
    assert_eq!(state_version(&local), Some(2));
    assert!(!intent.exists());

    // SIGINT before LOCAL changes (during the pre-read hook): exit 130, nothing changed.
    let mut a = apply_args("3");
    a.extend(["--pre-read-hook".to_string(), "sleep 0.5".to_string()]);
    let child = spawn(APPLY, &a, &[]);
    std::thread::sleep(Duration::from_millis(200));
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(state_version(&local), Some(2));
    assert!(!intent.exists());
    check_invariant(&local, &steps, "after a SIGINT before the apply");

    // A second signal kills where it is (the crash case): the next run repairs.
    let child = spawn_apply("4", &[("DISAGG_FAILPOINT", "apply.after_tensor:sleep-1000")]);
    wait_for("the apply intent", || intent.exists());
    signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGTERM), "killed by the second signal: {:?}", out.status);
    assert!(intent.exists(), "killed mid-patch: the intent is still there");
    converge(&local, &src, &steps[0], 4, &steps);
    let _ = std::fs::remove_dir_all(&root);
}
