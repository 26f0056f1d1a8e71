//! The fleet: `delta-follow` (pull, verify, reload, status file) and `delta-gc` (what it keeps,
//! and that it never removes a version under a concurrent pull), driven as real binaries on
//! hand-written fixtures (tests/common); plus the two-node demo end to end with a kill -9 of
//! the rollout node.
//!
//! Exit codes under test: 0 ok, 3 bad input, 7 checksum, 8 hook (reload), 9 locked.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const GC: &str = env!("CARGO_BIN_EXE_delta-gc");

// ================================================================================================
// helpers
// ================================================================================================

fn advance(src: &Path, v: u64) {
    run(ADVANCE, [src.s(), &v.to_string()]).ok();
}

/// A reload command that appends "VERSION LOCAL RUN_ID" to `log`.
fn logging_reload(log: &Path) -> String {
    format!("echo \"$DISAGG_VERSION $DISAGG_LOCAL $DISAGG_RUN_ID\" >> '{}'", log.display())
}

fn reload_lines(log: &Path) -> Vec<String> {
    fs::read_to_string(log).map(|s| s.lines().map(str::to_string).collect()).unwrap_or_default()
}

fn reloaded_versions(log: &Path) -> Vec<u64> {
    reload_lines(log).iter().map(|l| l.split(' ').next().unwrap().parse().unwrap()).collect()
}

fn follow_args<'a>(t: &'a TestDir, status: &'a Path, extra: &[&'a str]) -> Vec<String> {
    let mut a: Vec<String> =
        ["--local", t.join("local").s(), "--base", t.join("ckpt0").s(), "--source", t.join("src").s(), "--status", status.s()].iter().map(|s| s.to_string()).collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn wait_child(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[track_caller]
fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// Make version `v` look published `secs` ago (its index is its commit marker).
fn age_version(src: &Path, v: u64, secs: u64) {
    let f = fs::File::options().write(true).open(vdir(src, v).join(INDEX)).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(secs)).unwrap();
}

fn versions_on_disk(src: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = file_names(src).iter().filter_map(|n| n.strip_prefix("weight_v").and_then(|d| d.parse().ok())).collect();
    v.sort();
    v
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// Versions 1..=n of a chain, full where `full` says, all aged one hour.
fn published(t: &TestDir, n: usize, full: &[u64]) -> Chain {
    let chain = make_chain(&t.path, n, 2);
    let src = t.join("src");
    for v in 1..=n as u64 {
        let extra: &[&str] = if full.contains(&v) { &["--full"] } else { &[] };
        publish(&chain.ckpts[v as usize - 1], &chain.ckpts[v as usize], &src, v, extra);
        age_version(&src, v, 3600);
    }
    chain
}

fn gc(src: &Path, extra: &[&str]) -> Value {
    let mut a = vec![src.s(), "--json"];
    a.extend_from_slice(extra);
    run(GC, &a).ok().json()
}

/// A status file `age_secs` old by both clocks: the follower's `updated_at` and the mtime.
fn write_status(path: &Path, host: &str, needs: u64, age_secs: f64) {
    write_status_skewed(path, host, needs, age_secs, age_secs);
}

/// A status file whose follower's clock says it is `clock_age` old and whose mtime says `mtime_age`.
fn write_status_skewed(path: &Path, host: &str, needs: u64, clock_age: f64, mtime_age: f64) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let st = serde_json::json!({
        "schema_version": 1, "host": host, "pid": 1, "local": "/l", "source": "/s", "run_id": null,
        "state": "idle", "applied": needs, "reloaded": needs, "target": needs, "needs": needs,
        "updated_at": unix_now() - clock_age, "last_error": null, "errors": 0
    });
    fs::write(path, st.to_string()).unwrap();
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs_f64(mtime_age)).unwrap();
}

// ================================================================================================
// delta-follow
// ================================================================================================

/// `delta-follow --no-fsync` hands the flag to its applies: LOCAL gets the boot mark and the
/// engine is reloaded with the right bytes; the mark goes at the first durable pull.
#[test]
fn follow_without_fsync_applies_marks_and_a_durable_pull_settles() {
    let t = TestDir::new("follow-no-fsync");
    let chain = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 2);
    let (status, log) = (t.join("status.json"), t.join("reloads.txt"));
    let reload = logging_reload(&log);
    let mark = t.join("local/.weight_sync/unsynced.json");
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--json", "--no-fsync", "--reload-cmd", &reload])).ok().json();
    assert_eq!((r["version"].as_u64(), r["reloaded"].as_u64()), (Some(2), Some(2)));
    assert!(mark.exists(), "--no-fsync reached the apply");
    assert_holds(&t.join("local"), &chain.models[2]);
    advance(&src, 3);
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--json", "--reload-cmd", &reload])).ok().json();
    assert_eq!(ids(&r["applied"]), vec![3]);
    assert!(!mark.exists(), "a durable pull settles LOCAL and drops the mark");
    assert_holds(&t.join("local"), &chain.models[3]);
}

/// A follower whose LOCAL is inside SRC is refused before it creates LOCAL there (a directory
/// in SRC that another host's listing or GC would see) or writes a status file.
#[test]
fn follow_refuses_a_local_inside_source_before_creating_it() {
    let t = TestDir::new("follow-local-in-src");
    let chain = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 1);
    let before = snapshot(&src);
    let local = src.join("weight_v000009");
    let (status, base) = (t.join("status.json"), t.join("ckpt0"));
    let args = ["--local", local.s(), "--base", base.s(), "--source", src.s(), "--status", status.s(), "--once"];
    run(FOLLOW, args).code(2).stderr_contains("inside --source");
    assert!(!local.exists() && !status.exists());
    assert!(snapshot(&src) == before, "SRC untouched");
}

#[test]
fn follow_once_pulls_verifies_reloads_and_records_status() {
    let t = TestDir::new("follow-once");
    let chain = make_chain(&t.path, 3, 2);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 3);
    let (status, log) = (t.join("status.json"), t.join("reloads.txt"));
    let reload = logging_reload(&log);
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--json", "--reload-cmd", &reload])).ok().json();
    assert_eq!(r["version"], 3);
    assert_eq!(r["seeded_from"], 0);
    assert_eq!(ids(&r["applied"]), vec![1, 2, 3]);
    assert_eq!(r["reloaded"], 3);
    assert_holds(&t.join("local"), &chain.models[3]);
    let local_abs = t.join("local").canonicalize().unwrap();
    assert_eq!(reload_lines(&log), vec![format!("3 {} ", local_abs.display())]);
    let st = read_json(&status);
    assert_eq!((st["applied"].as_u64(), st["reloaded"].as_u64(), st["needs"].as_u64()), (Some(3), Some(3), Some(3)));
    assert_eq!(st["state"], "idle");
    assert_eq!(st["last_error"], Value::Null);
    assert_eq!(st["local"], local_abs.to_str().unwrap());

    // Nothing new: no pull work, no reload (the status file says the engine runs version 3).
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--json", "--reload-cmd", &reload])).ok().json();
    assert_eq!(r["noop"], true);
    assert_eq!(reload_lines(&log).len(), 1);
    // --reload-on-start: the engine restarted, so reload what LOCAL holds (after a no-op pull).
    run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-on-start", "--reload-cmd", &reload])).ok();
    assert_eq!(reloaded_versions(&log), vec![3, 3]);

    // The default status file lives under SRC/.followers/ for delta-gc.
    run(FOLLOW, ["--local", t.join("local2").s(), "--base", chain.ckpts[0].s(), "--source", src.s(), "--once", "--name", "hostA"]).ok();
    assert_eq!(read_json(&src.join(".followers/hostA.json"))["applied"], 3);
}

#[test]
fn follow_loop_picks_up_new_versions_until() {
    let t = TestDir::new("follow-loop");
    let chain = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish(&chain.ckpts[0], &chain.ckpts[1], &src, 1, &[]);
    advance(&src, 1);
    let (status, log) = (t.join("status.json"), t.join("reloads.txt"));
    let reload = logging_reload(&log);
    let args = follow_args(&t, &status, &["--poll", "0.05", "--until", "3", "--json", "--reload-cmd", &reload]);
    let (mut child, _) = spawn(FOLLOW, &args);
    wait_for("version 1 reloaded", Duration::from_secs(20), || reloaded_versions(&log) == vec![1]);
    // The status file follows the reload (it is written after the command returns).
    wait_for("status reloaded 1", Duration::from_secs(20), || status.exists() && read_json(&status)["reloaded"] == 1);
    publish(&chain.ckpts[1], &chain.ckpts[2], &src, 2, &[]);
    advance(&src, 2);
    wait_for("version 2 reloaded", Duration::from_secs(20), || reloaded_versions(&log).last() == Some(&2));
    publish(&chain.ckpts[2], &chain.ckpts[3], &src, 3, &[]);
    advance(&src, 3);
    let st = wait_child(&mut child, Duration::from_secs(20));
    assert!(st.success(), "delta-follow --until 3 exited {st}");
    assert_holds(&t.join("local"), &chain.models[3]);
    assert_eq!(reloaded_versions(&log), vec![1, 2, 3]);
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    let events: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.iter().map(|e| e["version"].as_u64().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(ids(&events[2]["applied"]), vec![3], "version 3 is applied as one delta on 2");
}

#[test]
fn failed_reload_is_reported_and_retried_with_backoff() {
    let t = TestDir::new("follow-reload-fail");
    let chain = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 1);
    let status = t.join("status.json");
    // --once: the reload fails -> exit 8; applied but not reloaded, error recorded.
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-cmd", "echo engine says no >&2; exit 3"]));
    r.code(8).stderr_contains("reload for version 1");
    let st = read_json(&status);
    assert_eq!((st["applied"].as_u64(), st["reloaded"].as_u64()), (Some(1), None));
    assert_eq!(st["state"], "error");
    assert!(st["last_error"].as_str().unwrap().contains("exited with"), "{st}");

    // The loop: fails twice, then succeeds; each failure is an event with exit code 8.
    let counter = t.join("attempts");
    let cmd = format!("n=$(cat '{c}' 2>/dev/null || echo 0); echo $((n+1)) > '{c}'; [ $n -ge 2 ]", c = counter.display());
    let start = Instant::now();
    let r = run(FOLLOW, follow_args(&t, &status, &["--until", "1", "--poll", "0.05", "--max-backoff", "0.3", "--json", "--reload-cmd", &cmd]));
    r.ok();
    assert!(start.elapsed() > Duration::from_millis(500), "retries back off (0.5 s first)");
    let events: Vec<Value> = r.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let codes: Vec<Option<u64>> = events.iter().map(|e| e["exit_code"].as_u64()).collect();
    assert_eq!(codes, vec![Some(8), Some(8), None], "{events:?}");
    assert_eq!(fs::read_to_string(&counter).unwrap().trim(), "3");
    let st = read_json(&status);
    assert_eq!((st["reloaded"].as_u64(), st["errors"].as_u64(), &st["last_error"]), (Some(1), Some(0), &Value::Null));
}

#[test]
fn never_reloads_a_checkpoint_that_fails_verification() {
    let t = TestDir::new("follow-tamper");
    let chain = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&chain, &src);
    tamper_checksum(&delta_file_of(&src, 2, "model.embed_tokens.weight"), "model.embed_tokens.weight");
    advance(&src, 2);
    let (status, log) = (t.join("status.json"), t.join("reloads.txt"));
    let reload = logging_reload(&log);
    run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-cmd", &reload])).code(7).stderr_contains("checksum mismatch");
    assert!(reload_lines(&log).is_empty(), "nothing may be reloaded after a checksum mismatch");
    let st = read_json(&status);
    assert_eq!(st["reloaded"], Value::Null);
    // LOCAL holds what was verified before the bad delta (1, or the seed 0 where the pull folds
    // the chain into one pass); never 2, and the status says exactly what state.json says.
    let held: u64 = state_version(&t.join("local")).parse().unwrap();
    assert!(held < 2, "state.json names version {held}");
    // The mismatch left the apply's intent: LOCAL is torn whatever state.json names, so the
    // status says LOCAL holds nothing verified (delta-gc must not be told it holds `held`).
    assert!(intent_exists(&t.join("local")));
    assert_eq!(st["applied"], Value::Null, "{st}");
    assert!(st["last_error"].as_str().unwrap().contains("checksum mismatch"));
}

#[test]
fn follower_killed_mid_apply_repairs_and_reloads_on_restart() {
    let t = TestDir::new("follow-crash");
    let chain = make_chain(&t.path, 2, 2);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 1);
    let (status, log) = (t.join("status.json"), t.join("reloads.txt"));
    let reload = logging_reload(&log);
    run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-cmd", &reload])).ok();
    advance(&src, 2);
    let out = run_env(FOLLOW, follow_args(&t, &status, &["--once", "--reload-cmd", &reload]), &[("DISAGG_FAILPOINT", "apply.after_tensor")]);
    assert!(out.out.status.code().is_none(), "killed by the failpoint");
    assert_eq!(reloaded_versions(&log), vec![1]);
    assert_eq!(read_json(&status)["state"], "pulling");
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--json", "--reload-cmd", &reload])).ok().json();
    assert_eq!(r["repaired"], true);
    assert_holds(&t.join("local"), &chain.models[2]);
    assert_eq!(reloaded_versions(&log), vec![1, 2]);
}

/// SRC on an object-store mount holds only `latest` until the pre-read hook fetches a version:
/// the follower runs the hook before it reads each version (as delta-apply does), once each.
#[test]
fn follow_runs_the_pre_read_hook_before_reading_any_version() {
    let t = TestDir::new("follow-hydrate");
    let chain = make_chain(&t.path, 4, 1);
    let (src, remote) = (t.join("src"), t.join("remote"));
    publish_chain(&chain, &src);
    advance(&src, 4);
    fs::create_dir_all(&remote).unwrap();
    for v in 1..=4 {
        fs::rename(vdir(&src, v), vdir(&remote, v)).unwrap();
    }
    let hooks = t.join("hooks.txt");
    let hook = format!(
        "echo $DISAGG_VERSION >> '{h}'; [ -d \"$DISAGG_VERSION_DIR\" ] || cp -r '{r}'/$(basename \"$DISAGG_VERSION_DIR\") \"$DISAGG_VERSION_DIR\"",
        h = hooks.display(),
        r = remote.display()
    );
    let status = t.join("status.json");
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--json", "--pre-read-hook", &hook])).ok().json();
    assert_eq!(ids(&r["applied"]), vec![1, 2, 3, 4]);
    assert_holds(&t.join("local"), &chain.models[4]);
    let runs: Vec<String> = reload_lines(&hooks);
    assert_eq!(runs, vec!["4", "3", "2", "1"], "one hook run per version, newest first, before it is read");
}

/// A link below the applied version is gone (collected): the pull reads only down to the
/// applied version, so the follower succeeds where delta-apply does, and the `needs` it
/// writes before reading is the applied version, not the (missing) bottom of the chain.
#[test]
fn follow_reads_no_link_below_the_applied_version() {
    let t = TestDir::new("follow-floor");
    let chain = make_chain(&t.path, 4, 1);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 2);
    let status = t.join("status.json");
    run(FOLLOW, follow_args(&t, &status, &["--once"])).ok();
    advance(&src, 4);
    fs::remove_dir_all(vdir(&src, 1)).unwrap();
    // Slowed down so the status written for the pull can be read while it runs.
    let mut child = Command::new(FOLLOW)
        .args(follow_args(&t, &status, &["--once", "--json"]))
        .env("DISAGG_FAILPOINT", "apply.after_tensor:sleep-300")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut needs_while_pulling = None;
    wait_for("the pull to start or the follower to exit", Duration::from_secs(20), || {
        if let Ok(st) = fs::read(&status).map(|b| serde_json::from_slice::<Value>(&b).unwrap()) {
            if st["state"] == "pulling" {
                needs_while_pulling = Some(st["needs"].clone());
            }
        }
        needs_while_pulling.is_some() || child.try_wait().unwrap().is_some()
    });
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "delta-follow exited {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids(&ev["applied"]), vec![3, 4]);
    assert_holds(&t.join("local"), &chain.models[4]);
    assert_eq!(needs_while_pulling, Some(Value::from(2)));
    assert_eq!(read_json(&status)["needs"], 4);
}

/// The reload runs under LOCAL's lock: a delta-apply on the same LOCAL waits for it, so the
/// engine is never told a version while LOCAL holds another. And an idle follower notices that
/// LOCAL was moved under it and brings it back to `latest`.
#[test]
fn reload_holds_the_local_lock_and_an_idle_follower_notices_local_moved() {
    let t = TestDir::new("follow-lock");
    let chain = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    let local = t.join("local");
    publish_chain(&chain, &src);
    advance(&src, 2);
    let (status, log, started) = (t.join("status.json"), t.join("reloads.txt"), t.join("reload-started"));
    run(FOLLOW, follow_args(&t, &status, &["--once"])).ok();
    advance(&src, 3);
    let reload = format!("touch '{s}'; sleep 1; echo \"$DISAGG_VERSION $(cat \"$DISAGG_LOCAL/.weight_sync/state.json\")\" >> '{l}'", s = started.display(), l = log.display());
    let (mut follower, _) = spawn(FOLLOW, follow_args(&t, &status, &["--once", "--reload-cmd", &reload]));
    wait_for("the reload to start", Duration::from_secs(20), || started.exists());
    let apply_to = |v: u64| run(APPLY, ["--local", local.s(), "--base", chain.ckpts[0].s(), "--source", src.s(), "--target", &v.to_string(), "--json"]).ok().json();
    assert_eq!(apply_to(1)["version"], 1);
    assert!(wait_child(&mut follower, Duration::from_secs(20)).success());
    let lines = reload_lines(&log);
    assert!(lines.len() == 1 && lines[0].starts_with(r#"3 {"version":"000003","#), "the engine was told 3 while LOCAL held 3: {lines:?}");
    assert_holds(&local, &chain.models[1]);

    let (mut follower, _) = spawn(FOLLOW, follow_args(&t, &status, &["--poll", "0.05"]));
    let at = |v: &str| state_version(&local) == v && read_json(&status)["state"] == "idle" && read_json(&status)["applied"] == 3;
    wait_for("LOCAL back at 3", Duration::from_secs(20), || at("000003"));
    assert_eq!(apply_to(2)["version"], 2);
    wait_for("the idle follower to notice LOCAL moved to 2", Duration::from_secs(20), || at("000003"));
    assert_holds(&local, &chain.models[3]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(follower.id() as libc::pid_t, libc::SIGTERM) };
    assert!(wait_child(&mut follower, Duration::from_secs(10)).success());
}

/// A reload command that itself runs delta-apply on the follower's LOCAL would wait for the
/// lock the follower holds through the reload, until --reload-timeout: it is refused at once
/// (exit 9), the reload fails (exit 8) and says why. Another LOCAL is not affected.
#[test]
fn a_reload_that_pulls_the_followers_own_local_is_refused_at_once() {
    let t = TestDir::new("follow-reload-self");
    let chain = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 1);
    let status = t.join("status.json");
    let pull = |local: &str| format!("'{APPLY}' --local {local} --base '{}' --source '{}' --target \"$DISAGG_VERSION\"", chain.ckpts[0].display(), src.display());
    let own = pull("\"$DISAGG_LOCAL\"");
    let start = Instant::now();
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-timeout", "60", "--reload-cmd", &own]));
    r.code(8).stderr_contains("DISAGG_HELD_LOCK");
    assert!(start.elapsed() < Duration::from_secs(30), "refused at once, not after the reload timeout");
    assert_holds(&t.join("local"), &chain.models[1]);
    // Pulling a second LOCAL from the reload is fine.
    let other = pull(&format!("'{}'", t.join("other").display()));
    run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-on-start", "--reload-cmd", &other])).ok();
    assert_holds(&t.join("other"), &chain.models[1]);
}

/// A restarted follower validates LOCAL (§6) before it calls a version applied: a file torn
/// while it was down is repaired, never reported as the version state.json names.
#[test]
fn restarted_follower_validates_local_before_trusting_it() {
    let t = TestDir::new("follow-torn");
    let chain = make_chain(&t.path, 3, 2);
    let src = t.join("src");
    let local = t.join("local");
    publish_chain(&chain, &src);
    advance(&src, 3);
    let (status, log) = (t.join("status.json"), t.join("reloads.txt"));
    let reload = logging_reload(&log);
    run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-cmd", &reload])).ok();
    fs::File::options().write(true).open(local.join("model-00001-of-00002.safetensors")).unwrap().set_len(100).unwrap();
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--json", "--reload-cmd", &reload])).ok().json();
    assert_eq!((r["repaired"].as_bool(), r["noop"].as_bool()), (Some(true), Some(false)), "{r}");
    assert_holds(&local, &chain.models[3]);
    assert_eq!(read_json(&status)["applied"], 3);
    // Torn again, and the pull cannot repair it (the base is gone): the status says LOCAL holds
    // nothing verified, from the first write on.
    fs::File::options().write(true).open(local.join("model-00001-of-00002.safetensors")).unwrap().set_len(100).unwrap();
    fs::rename(&chain.ckpts[0], t.join("base-moved")).unwrap();
    let r = run(FOLLOW, follow_args(&t, &status, &["--once", "--reload-cmd", &reload]));
    assert!(!r.out.status.success(), "no base to reseed from: {}", r.stderr());
    assert_eq!(read_json(&status)["applied"], Value::Null);
}

// ================================================================================================
// delta-gc
// ================================================================================================

#[test]
fn gc_keeps_the_chain_newer_versions_and_last_n() {
    let t = TestDir::new("gc-chain");
    let _chain = published(&t, 8, &[4, 7]);
    let src = t.join("src");
    advance(&src, 6);
    // latest 6: chain 4,5,6; 7 and 8 are newer than latest.
    let r = gc(&src, &["--keep", "0", "--dry-run"]);
    assert_eq!(ids(&r["deleted"]), vec![1, 2, 3]);
    assert_eq!(versions_on_disk(&src), (1..=8).collect::<Vec<_>>(), "--dry-run removes nothing");
    let why: Vec<(u64, Vec<String>)> =
        r["versions"].as_array().unwrap().iter().map(|v| (v["version"].as_u64().unwrap(), serde_json::from_value(v["reasons"].clone()).unwrap())).collect();
    assert!(why.contains(&(4, vec!["chain-of-latest".to_string()])), "{why:?}");
    assert!(why.iter().any(|(v, r)| *v == 8 && r.contains(&"newer-than-latest".to_string())));

    advance(&src, 8);
    // latest 8: chain 7,8. --keep 3 keeps 6,7,8 and 6's chain 4,5.
    assert_eq!(ids(&gc(&src, &["--keep", "3", "--dry-run"])["deleted"]), vec![1, 2, 3]);
    assert_eq!(ids(&gc(&src, &["--keep", "2", "--dry-run"])["deleted"]), vec![1, 2, 3, 4, 5, 6]);
    let r = gc(&src, &["--keep", "3"]);
    assert_eq!(ids(&r["deleted"]), vec![1, 2, 3]);
    assert_eq!(versions_on_disk(&src), vec![4, 5, 6, 7, 8]);
    assert!(r["bytes_freed"].as_u64().unwrap() > 0);
    assert!(!file_names(&src).iter().any(|n| n.starts_with(".deleting-")));
    // A fresh host still reaches latest, and version 6 (kept) too.
    run(APPLY, ["--local", t.join("l8").s(), "--source", src.s(), "--target", "latest"]).ok();
    run(APPLY, ["--local", t.join("l6").s(), "--source", src.s(), "--target", "6"]).ok();
    // Idempotent.
    assert_eq!(ids(&gc(&src, &["--keep", "3"])["deleted"]), Vec::<u64>::new());
}

#[test]
fn gc_keeps_what_live_followers_need_and_ignores_dead_ones() {
    let t = TestDir::new("gc-followers");
    let _chain = published(&t, 6, &[4]);
    let src = t.join("src");
    advance(&src, 6);
    let fdir = src.join(".followers");
    write_status(&fdir.join("slow.json"), "slow", 2, 5.0);
    let r = gc(&src, &["--keep", "0", "--dry-run"]);
    assert_eq!(ids(&r["deleted"]), vec![1], "a live follower at version 2 still reads 2..");
    assert_eq!(r["followers_live"].as_array().unwrap().len(), 1);
    // Dead (not updated for 2 h): ignored with a warning.
    write_status(&fdir.join("slow.json"), "slow", 2, 7200.0);
    let r = run(GC, [src.s(), "--keep", "0", "--dry-run", "--json"]);
    r.ok().stderr_contains("ignoring follower slow");
    assert_eq!(ids(&r.json()["deleted"]), vec![1, 2, 3]);
    // A live follower whose clock runs 2 h behind GC's (its file was just written): kept, with a
    // warning naming the skew. By its clock alone it looked dead and lost versions 2 and 3.
    write_status_skewed(&fdir.join("slow.json"), "slow", 2, 7200.0, 1.0);
    let r = run(GC, [src.s(), "--keep", "0", "--dry-run", "--json"]);
    r.ok().stderr_contains("clock skew");
    assert_eq!(ids(&r.json()["deleted"]), vec![1], "a live follower with a slow clock still reads 2..");
    write_status(&fdir.join("slow.json"), "slow", 2, 7200.0);
    // Explicit globs; wildcards only in the file name.
    write_status(&t.join("elsewhere/h1.json"), "h1", 3, 1.0);
    let glob = format!("{}/h*.json", t.join("elsewhere").display());
    assert_eq!(ids(&gc(&src, &["--keep", "0", "--dry-run", "--followers", &glob])["deleted"]), vec![1, 2]);
    run(GC, [src.s(), "--followers", "/x/*/y.json"]).code(2);
    // A malformed status file: refuse (exit 3) rather than guess.
    fs::write(fdir.join("bad.json"), "{not json").unwrap();
    run(GC, [src.s(), "--keep", "0"]).code(3).stderr_contains("bad.json");
    assert_eq!(versions_on_disk(&src), (1..=6).collect::<Vec<_>>());
}

#[test]
fn gc_keeps_young_versions_and_incomplete_ones_in_progress() {
    let t = TestDir::new("gc-young");
    let _chain = published(&t, 6, &[]);
    let src = t.join("src");
    advance(&src, 6);
    for v in 4..=6 {
        age_version(&src, v, 10);
    }
    // Versions 4..6 are 10 s old: younger than --min-age 60. Version 3 is the newest one older
    // than the window (it may have been `latest` during it): its chain stays too.
    let r = gc(&src, &["--keep", "0", "--min-age", "60", "--dry-run"]);
    assert_eq!(ids(&r["deleted"]), Vec::<u64>::new(), "delta chain back to 0: everything is on latest's chain");
    let t2 = TestDir::new("gc-young2");
    let _c = published(&t2, 6, &[3, 5]);
    let src2 = t2.join("src");
    advance(&src2, 6);
    age_version(&src2, 6, 10);
    // latest 6 (chain 5,6). 5 is the newest version older than 60 s: chain(5) = {5}.
    assert_eq!(ids(&gc(&src2, &["--keep", "0", "--min-age", "60", "--dry-run"])["deleted"]), vec![1, 2, 3, 4]);
    age_version(&src2, 4, 10);
    age_version(&src2, 5, 10);
    // 4,5,6 young; 3 is the newest old one: chains of 3..6 stay (3 is full).
    assert_eq!(ids(&gc(&src2, &["--keep", "0", "--min-age", "60", "--dry-run"])["deleted"]), vec![1, 2]);
    // Default --min-age (600 s) with everything young: nothing goes.
    for v in 1..=6 {
        age_version(&src2, v, 5);
    }
    assert_eq!(ids(&gc(&src2, &["--keep", "0"])["deleted"]), Vec::<u64>::new());
    // An incomplete version dir above latest (a publish in progress) is never collected; one
    // below latest (a crashed publish, superseded) is, once old.
    let inc = vdir(&src2, 9);
    fs::create_dir_all(&inc).unwrap();
    fs::File::open(&inc).unwrap().set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
    assert!(!ids(&gc(&src2, &["--keep", "0", "--min-age", "0", "--dry-run"])["deleted"]).contains(&9));
    fs::remove_dir_all(&inc).unwrap();
    let inc = vdir(&src2, 2);
    fs::remove_dir_all(&inc).unwrap();
    fs::create_dir_all(&inc).unwrap();
    fs::write(inc.join(".incomplete"), "").unwrap();
    assert!(ids(&gc(&src2, &["--keep", "0", "--min-age", "60"])["deleted"]).is_empty());
    let old = SystemTime::now() - Duration::from_secs(3600);
    fs::File::options().write(true).open(inc.join(".incomplete")).unwrap().set_modified(old).unwrap();
    fs::File::open(&inc).unwrap().set_modified(old).unwrap();
    assert_eq!(ids(&gc(&src2, &["--keep", "0", "--min-age", "60"])["deleted"]), vec![2]);

    // The newest old version is kept itself, not only its chain: `latest` may have named it
    // until a moment ago. Here 3 (full) and 4 are young; 2 may have been latest before 3.
    let t3 = TestDir::new("gc-young3");
    let _c = published(&t3, 4, &[3]);
    let src3 = t3.join("src");
    advance(&src3, 4);
    for v in 3..=4 {
        age_version(&src3, v, 10);
    }
    let r = gc(&src3, &["--keep", "0", "--min-age", "60", "--dry-run"]);
    assert_eq!(ids(&r["deleted"]), Vec::<u64>::new(), "{r}");
    assert_eq!(r["versions"][1]["reasons"], serde_json::json!(["chain-of-recent"]), "{r}");
}

/// Version ages are measured by the clock that stamped the versions' files (the file system's,
/// read by stamping the GC lock), not by the GC host's: a GC host an hour ahead must not see
/// versions published a moment ago as old and collect them.
#[test]
fn gc_measures_ages_by_the_file_systems_clock_not_its_own() {
    let t = TestDir::new("gc-clock");
    let _chain = published(&t, 5, &[3]);
    let src = t.join("src");
    advance(&src, 5);
    for v in 1..=5 {
        age_version(&src, v, 5);
    }
    let gc_ahead = |secs: &str| {
        let fp = format!("gc.host_clock:ahead-{secs}");
        run_env(GC, [src.s(), "--keep", "0", "--min-age", "600", "--dry-run", "--json"], &[("DISAGG_FAILPOINT", fp.as_str())])
    };
    // An hour ahead: 1 and 2 (off latest's chain 3..5) are 5 s old by the file system: kept.
    let r = gc_ahead("3600");
    r.ok().stderr_contains("runs 3600s ahead of the file system's");
    let v = r.json();
    assert_eq!(ids(&v["deleted"]), Vec::<u64>::new(), "{v}");
    assert!(v["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains(".gc.lock")), "{v}");
    // An hour behind: versions half an hour old by the file system are old (by this host's
    // clock they would not exist yet). 3 is the newest old one (full): 1 and 2 go.
    for v in 1..=3 {
        age_version(&src, v, 1800);
    }
    let r = gc_ahead("-3600");
    r.ok().stderr_contains("runs 3600s behind the file system's");
    assert_eq!(ids(&r.json()["deleted"]), vec![1, 2]);
    // In step (this host is the file system's clock): no warning.
    let r = gc_ahead("0");
    assert!(!r.ok().stderr().contains("clock"), "{}", r.stderr());
}

#[test]
fn gc_edge_cases() {
    let t = TestDir::new("gc-edges");
    let _chain = published(&t, 3, &[]);
    let src = t.join("src");
    // No pointer yet: nothing is collected, not an error (cron runs before the first publish).
    let r = run(GC, [src.s(), "--json", "--keep", "0", "--min-age", "0"]);
    r.ok().stderr_contains("delta-gc: warning: no `latest` pointer yet");
    assert_eq!(ids(&r.json()["deleted"]), Vec::<u64>::new());
    advance(&src, 3);
    // A broken chain under latest: refuse everything (exit 5).
    fs::rename(vdir(&src, 1), t.join("moved")).unwrap();
    run(GC, [src.s(), "--keep", "0", "--min-age", "0"]).code(5).stderr_contains("refusing");
    fs::rename(t.join("moved"), vdir(&src, 1)).unwrap();
    // Leftovers of a GC killed between rename and removal are swept.
    fs::create_dir_all(src.join(".deleting-weight_v000009-1/x")).unwrap();
    let r = gc(&src, &["--keep", "0"]);
    assert_eq!(r["swept"], 1);
    assert!(!src.join(".deleting-weight_v000009-1").exists());
    // Another GC holds the lock: exit 9.
    let lock = fs::File::options().create(true).truncate(false).write(true).open(src.join(".gc.lock")).unwrap();
    lock.lock().unwrap();
    run(GC, [src.s()]).code(9).stderr_contains("another delta-gc");
}

/// Hosts pull (fresh and incremental; slowed down by a failpoint so each pull spans several
/// pointer moves and a new full version) while the trainer publishes and GC runs in a tight
/// loop with a 3 s grace period: every pull must succeed and hold the exact bytes of its
/// version. (With `DISAGG_TEST_GC_MIN_AGE=0` the same run loses pulls: the grace rule is what
/// protects readers that resolved `latest` just before it moved.)
#[test]
fn gc_never_deletes_under_concurrent_pulls() {
    let min_age = std::env::var("DISAGG_TEST_GC_MIN_AGE").unwrap_or_else(|_| "3".into());
    let t = TestDir::new("gc-concurrent");
    let steps = 16;
    let chain = Arc::new(make_chain(&t.path, steps, 2));
    let src = t.join("src");
    publish(&chain.ckpts[0], &chain.ckpts[1], &src, 1, &[]);
    advance(&src, 1);
    let done = Arc::new(AtomicBool::new(false));
    let slow = [("DISAGG_FAILPOINT", "apply.after_tensor:sleep-25,apply.seed_copy:sleep-60")];

    let trainer = {
        let (chain, src, done) = (chain.clone(), src.clone(), done.clone());
        std::thread::spawn(move || {
            for v in 2..=steps as u64 {
                let extra: &[&str] = if v % 4 == 0 { &["--full"] } else { &[] };
                publish(&chain.ckpts[v as usize - 1], &chain.ckpts[v as usize], &src, v, extra);
                advance(&src, v);
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(Duration::from_millis(3500));
            done.store(true, Ordering::SeqCst);
        })
    };
    let gcs = {
        let (src, done, min_age) = (src.clone(), done.clone(), min_age.clone());
        std::thread::spawn(move || {
            let mut deleted = 0;
            while !done.load(Ordering::SeqCst) {
                let r = run(GC, [src.s(), "--keep", "0", "--min-age", &min_age, "--json"]);
                r.ok();
                deleted += r.json()["deleted"].as_array().unwrap().len();
                std::thread::sleep(Duration::from_millis(20));
            }
            deleted
        })
    };
    let pullers: Vec<_> = (0..2)
        .map(|i| {
            let (chain, t_path, src, done) = (chain.clone(), t.path.clone(), src.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut n, mut failures) = (0, Vec::new());
                while !done.load(Ordering::SeqCst) {
                    // Puller 0 starts fresh every time; puller 1 keeps its LOCAL (incremental).
                    let local: PathBuf = if i == 0 { t_path.join(format!("fresh{n}")) } else { t_path.join("incremental") };
                    let r = run_env(APPLY, ["--local", local.s(), "--base", chain.ckpts[0].s(), "--source", src.s(), "--target", "latest", "--json"], &slow);
                    if r.out.status.success() {
                        let v = r.json()["version"].as_u64().unwrap();
                        assert_holds(&local, &chain.models[v as usize]);
                    } else {
                        failures.push(r.stderr());
                    }
                    if i == 0 {
                        let _ = fs::remove_dir_all(&local);
                    }
                    n += 1;
                }
                (n, failures)
            })
        })
        .collect();
    // And one follower, whose status file protects what it reads.
    let (mut follower, _) = spawn(FOLLOW, ["--local", t.join("follower").s(), "--base", chain.ckpts[0].s(), "--source", src.s(), "--poll", "0.05", "--until", &steps.to_string()]);
    trainer.join().unwrap();
    let (mut pulls, mut failures) = (0, Vec::new());
    for p in pullers {
        let (n, f) = p.join().unwrap();
        pulls += n;
        failures.extend(f);
    }
    let deleted = gcs.join().unwrap();
    assert!(wait_child(&mut follower, Duration::from_secs(30)).success());
    assert_holds(&t.join("follower"), &chain.models[steps]);
    eprintln!("{pulls} pulls, {} failed, while GC (--min-age {min_age}) removed {deleted} versions", failures.len());
    assert!(failures.is_empty(), "{} of {pulls} pulls failed under GC:\n{}", failures.len(), failures.join("\n"));
    assert!(pulls >= 6, "only {pulls} pulls ran");
    assert!(deleted >= 5, "GC should have collected old versions (deleted {deleted})");
}

// ================================================================================================
// the two-node demo, end to end, with a kill -9 of the rollout node
// ================================================================================================

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python_with_numpy() -> Option<PathBuf> {
    let venv = repo().join(".venv/bin/python");
    let py = if venv.exists() { venv } else { PathBuf::from("python3") };
    let ok = Command::new(&py).args(["-c", "import numpy"]).stdout(Stdio::null()).stderr(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    ok.then_some(py)
}

#[test]
fn demo_pipeline_survives_kill9_of_the_rollout_node() {
    let Some(py) = python_with_numpy() else {
        eprintln!("SKIPPED demo_pipeline_survives_kill9_of_the_rollout_node: no python with numpy (run `make venv`)");
        return;
    };
    if Command::new("curl").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("SKIPPED demo_pipeline_survives_kill9_of_the_rollout_node: no curl");
        return;
    }
    let t = TestDir::new("demo");
    let bin_dir = Path::new(FOLLOW).parent().unwrap();
    let out = Command::new("bash")
        .arg(repo().join("scripts/demo-pipeline.sh"))
        .args(["--size-mb", "4", "--steps", "6", "--full-every", "3", "--kill-rollout-at", "3", "--timeout", "120", "--dir"])
        .arg(t.join("demo"))
        .env("DISAGG_BIN_DIR", bin_dir)
        .env("PYTHON", &py)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert!(stdout.contains("kill -9 of the rollout node"), "{stdout}");
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    for v in 1..=6 {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("{v} "))), "table row for version {v}\n{stdout}");
    }
    eprintln!("{stdout}");
}

#[test]
fn documented_follower_status_parses_and_round_trips() {
    let doc = fs::read_to_string(repo().join("docs/FORMATS.md")).unwrap();
    let body = doc.split("```json follower-status\n").nth(1).expect("a ```json follower-status block").split("\n```").next().unwrap();
    let st: disagg::follow::FollowerStatus = serde_json::from_str(body).unwrap();
    assert_eq!((st.applied, st.needs, st.reloaded), (Some(7), Some(7), Some(7)));
    assert_eq!(serde_json::to_string(&st).unwrap(), body, "field order as documented");
}

#[test]
fn follower_stops_cleanly_on_sigterm_and_gc_then_ignores_it() {
    let t = TestDir::new("follow-sigterm");
    let chain = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&chain, &src);
    advance(&src, 1);
    let status = src.join(".followers/h.json");
    let (mut child, _) = spawn(FOLLOW, follow_args(&t, &status, &["--poll", "0.05"]));
    wait_for("version 1 reloaded", Duration::from_secs(20), || status.exists() && read_json(&status)["reloaded"] == 1);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert!(wait_child(&mut child, Duration::from_secs(10)).success());
    let st = read_json(&status);
    assert_eq!((st["state"].as_str(), &st["needs"]), (Some("stopped"), &Value::Null));
    let r = gc(&src, &["--dry-run"]);
    assert!(r["followers_ignored"][0].as_str().unwrap().ends_with("stopped"), "{r}");
}
