//! Data plane: feature-ingest, ref-publish and ref-tail driven as real binaries in temp dirs,
//! plus the store's lease, gc and quota semantics through the library.

use disagg::dataplane::channel::{self, Cursor};
use disagg::dataplane::sample_ref::{Manifest, SampleRef};
use disagg::dataplane::store::{Dtype, FeatureStore, LeaseRecord, StoreOptions, TensorData};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PUBLISH: &str = env!("CARGO_BIN_EXE_ref-publish");
const TAIL: &str = env!("CARGO_BIN_EXE_ref-tail");
const INGEST: &str = env!("CARGO_BIN_EXE_feature-ingest");

fn temp_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!("disagg-dp-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn sample_ref(id: &str, version: Option<u64>) -> Value {
    let mut meta = serde_json::Map::new();
    if let Some(v) = version {
        meta.insert("weight_version".into(), json!(v));
    }
    json!({"sample_id": id, "feature_store_uri": "file:///store", "feature_keys": {"h": format!("objects/00/{id}/g00000001.safetensors#h")},
           "schema_version": 1, "metadata": meta})
}

fn refs_text(prefix: &str, n: usize) -> String {
    (0..n).map(|i| format!("{}\n", sample_ref(&format!("{prefix}-{i}"), Some(i as u64)))).collect()
}

fn run(bin: &str, args: &[&str], stdin: &str) -> Output {
    let mut c = Command::new(bin).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut si = c.stdin.take().unwrap();
    let data = stdin.to_string();
    let t = std::thread::spawn(move || {
        let _ = si.write_all(data.as_bytes());
    });
    let out = c.wait_with_output().unwrap();
    t.join().unwrap();
    out
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "exit {:?}\nstderr: {}", o.status.code(), String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Check every printed line and return (producer, seq, sample_id) for each.
fn parse_out(text: &str) -> Vec<(String, u64, String)> {
    text.lines()
        .map(|l| {
            let st = channel::check_line(l.as_bytes()).unwrap_or_else(|e| panic!("bad line {l}: {e}"));
            (st.producer, st.seq, unstamped(l).sample_id)
        })
        .collect()
}

/// The ref a channel line carries, without its stamp, through every check a published ref
/// passes (the stamp takes a ref at the size cap past it, so the stamped line is not a ref).
fn unstamped(line: &str) -> SampleRef {
    let mut v: Value = serde_json::from_str(line).unwrap();
    v["metadata"].as_object_mut().unwrap().remove("disagg");
    SampleRef::parse(v.to_string().as_bytes()).unwrap_or_else(|e| panic!("bad ref {line}: {e}"))
}

#[test]
fn four_producers_no_loss_no_duplicate() {
    let d = temp_dir("four");
    let ch = d.join("ch");
    let n = 2500;
    // The tail starts before any producer, but after the channel exists (a missing channel is
    // exit 6; creating it after the spawn raced with the tail's start).
    fs::create_dir_all(&ch).unwrap();
    let tail =
        Command::new(TAIL).args([p(&ch), "--cursor", "c", "--follow", "--expect-producers", "4", "--idle-timeout", "30"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let tail = tail.unwrap();
    let producers: Vec<_> = (0..4)
        .map(|k| {
            let ch = ch.clone();
            std::thread::spawn(move || {
                // Two runs per producer: the second resumes the same stream.
                let text = refs_text(&format!("p{k}"), n);
                let (a, b) = text.split_at(text.match_indices('\n').nth(n / 2 - 1).unwrap().0 + 1);
                ok(&run(PUBLISH, &[p(&ch), "--producer", &format!("p{k}")], a));
                ok(&run(PUBLISH, &[p(&ch), "--producer", &format!("p{k}"), "--close", "--no-fsync"], b));
            })
        })
        .collect();
    for t in producers {
        t.join().unwrap();
    }
    let out = tail.wait_with_output().unwrap();
    let lines = parse_out(&ok(&out));
    assert_eq!(lines.len(), 4 * n);
    let mut per: HashMap<String, Vec<u64>> = HashMap::new();
    let mut ids = BTreeSet::new();
    for (prod, seq, id) in &lines {
        per.entry(prod.clone()).or_default().push(*seq);
        assert!(ids.insert(id.clone()), "duplicate {id}");
        assert_eq!(id, &format!("{prod}-{seq}"));
    }
    for seqs in per.values() {
        assert_eq!(seqs, &(0..n as u64).collect::<Vec<_>>(), "in order, no gap");
    }
    // Consumption recorded for backpressure.
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/c.json")).unwrap()).unwrap();
    assert!((0..4).all(|k| c.producers[&format!("p{k}")].consumed == n as u64));
    // A rerun of the tail from the cursor delivers nothing twice.
    let again = ok(&run(TAIL, &[p(&ch), "--cursor", "c", "--follow"], ""));
    assert_eq!(again, "");
}

#[test]
fn torn_and_corrupt_lines_are_skipped_never_printed() {
    let d = temp_dir("torn");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0"], &refs_text("a", 10)));
    let seg_dir = ch.join("producers/p0");
    let seg = fs::read_dir(&seg_dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with(".jsonl")).unwrap();
    // A killed writer's partial line.
    let full = fs::read_to_string(&seg).unwrap();
    let first_line = full.lines().next().unwrap().to_string();
    fs::OpenOptions::new().append(true).open(&seg).unwrap().write_all(&first_line.as_bytes()[..first_line.len() / 2]).unwrap();
    // The partial line is waited for, not printed.
    let out = run(TAIL, &[p(&ch), "--cursor", "c"], "");
    assert_eq!(parse_out(&ok(&out)).len(), 10);
    // A restarted producer resumes at seq 10 in a new segment; the torn line is then skipped.
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0", "--close"], &refs_text("b", 5)));
    let out = run(TAIL, &[p(&ch), "--cursor", "c", "--follow", "--json"], "");
    let lines = parse_out(&ok(&out));
    assert_eq!(lines.iter().map(|l| l.1).collect::<Vec<_>>(), (10..15).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("torn line"), "{stderr}");
    assert!(stderr.contains("\"torn\":1"), "{stderr}");

    // A complete line with one flipped byte: skipped as corrupt, the rest delivered.
    let ch2 = d.join("ch2");
    ok(&run(PUBLISH, &[p(&ch2), "--producer", "q"], &refs_text("c", 3)));
    let seg2 = fs::read_dir(ch2.join("producers/q")).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with(".jsonl")).unwrap();
    let text = fs::read_to_string(&seg2).unwrap().replacen("c-1", "c-X", 1);
    fs::write(&seg2, text).unwrap();
    ok(&run(PUBLISH, &[p(&ch2), "--producer", "q", "--close"], ""));
    let out = run(TAIL, &[p(&ch2), "--follow", "--json"], "");
    let ids: Vec<String> = parse_out(&ok(&out)).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, vec!["c-0", "c-2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum mismatch"));
}

fn kill9(child: &mut std::process::Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

fn pseudo_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn kill9_producer_loop_loses_and_duplicates_nothing() {
    let d = temp_dir("killprod");
    let ch = d.join("ch");
    let n = 20_000;
    let input = d.join("in.jsonl");
    fs::write(&input, refs_text("k", n)).unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..8 {
        let mut c = Command::new(PUBLISH)
            .args([p(&ch), "--producer", "p0", "--resume"])
            .stdin(fs::File::open(&input).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(3 + pseudo_random(&mut seed) % 40));
        kill9(&mut c);
    }
    let out = Command::new(PUBLISH).args([p(&ch), "--producer", "p0", "--resume", "--close", "--json"]).stdin(fs::File::open(&input).unwrap()).output().unwrap();
    ok(&out);
    let lines = parse_out(&ok(&run(TAIL, &[p(&ch), "--follow"], "")));
    assert_eq!(lines.len(), n);
    for (i, (_, seq, id)) in lines.iter().enumerate() {
        assert_eq!((*seq, id.as_str()), (i as u64, format!("k-{i}").as_str()));
    }
}

#[test]
fn kill9_tail_loop_resumes_from_its_cursor() {
    let d = temp_dir("killtail");
    let ch = d.join("ch");
    let n = 30_000;
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0", "--close", "--no-fsync"], &refs_text("t", n)));
    let cursor_path = ch.join("cursors/c.json");
    let mut seen: Vec<u64> = Vec::new();
    let mut seed = 12345u64;
    let mut kills = 0;
    loop {
        let acked = fs::read(&cursor_path).ok().map(|b| serde_json::from_slice::<Cursor>(&b).unwrap().producers["p0"].next_seq).unwrap_or(0);
        let mut c = Command::new(TAIL).args([p(&ch), "--cursor", "c", "--follow"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdout = c.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                got.push(channel::check_line(line.as_bytes()).expect("only complete, valid lines").seq);
            }
            got
        });
        let last = kills >= 6;
        if !last {
            std::thread::sleep(Duration::from_millis(5 + pseudo_random(&mut seed) % 30));
            kill9(&mut c);
            kills += 1;
        } else {
            assert!(c.wait().unwrap().success());
        }
        let got = reader.join().unwrap();
        if let Some(&first) = got.first() {
            assert!(first >= acked, "acknowledged ref {first} delivered again (cursor at {acked})");
            assert_eq!(first, acked, "nothing skipped");
        }
        seen.extend(got);
        if last {
            break;
        }
    }
    let unique: BTreeSet<u64> = seen.iter().copied().collect();
    assert_eq!(unique, (0..n as u64).collect::<BTreeSet<_>>(), "no ref lost");
}

#[test]
fn staleness_against_a_real_pointer() {
    let d = temp_dir("stale");
    let ch = d.join("ch");
    let weights = d.join("weights");
    fs::create_dir_all(&weights).unwrap();
    let mut text = refs_text("v", 13);
    let mut partial = sample_ref("partial", None);
    partial["metadata"]["weight_versions"] = json!([5, 10]);
    let unversioned = sample_ref("unversioned", None);
    text += &format!("{partial}\n{unversioned}\n");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0", "--close"], &text));
    // Missing pointer: exit 6. Malformed: exit 3 naming the file.
    let o = run(TAIL, &[p(&ch), "--cursor", "s", "--max-staleness", "3", "--pointer", p(&weights)], "");
    assert_eq!(o.status.code(), Some(6));
    fs::write(weights.join("latest"), "weight_v12\n").unwrap();
    let o = run(TAIL, &[p(&ch), "--cursor", "s", "--max-staleness", "3", "--pointer", p(&weights)], "");
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("latest"));
    fs::write(weights.join("latest"), "run-1/weight_v000010\n").unwrap();
    let stale = d.join("stale.jsonl");
    let o = run(TAIL, &[p(&ch), "--cursor", "s", "--follow", "--max-staleness", "3", "--pointer", p(&weights), "--stale-out", p(&stale)], "");
    let kept: Vec<String> = parse_out(&ok(&o)).into_iter().map(|l| l.2).collect();
    let want: Vec<String> = (7..13).map(|i| format!("v-{i}")).chain(["unversioned".to_string()]).collect();
    assert_eq!(kept, want);
    let dropped: Vec<String> = parse_out(&fs::read_to_string(&stale).unwrap()).into_iter().map(|l| l.2).collect();
    let want: Vec<String> = (0..7).map(|i| format!("v-{i}")).chain(["partial".to_string()]).collect();
    assert_eq!(dropped, want);
    // Dropped refs are acknowledged: backpressure sees everything consumed.
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/s.json")).unwrap()).unwrap();
    assert_eq!((c.producers["p0"].consumed, c.stale, c.delivered), (15, 8, 7));
    assert_eq!(channel::consumed_by_cursors(&ch, "p0").unwrap(), 15);
}

#[test]
fn sharding_is_disjoint_and_complete() {
    let d = temp_dir("shard");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "a", "--close"], &refs_text("a", 700)));
    ok(&run(PUBLISH, &[p(&ch), "--producer", "b", "--close"], &refs_text("b", 500)));
    let mut all = Vec::new();
    let mut consumed = 0;
    for r in 0..3 {
        let o = run(TAIL, &[p(&ch), "--cursor", "g", "--follow", "--rank", &r.to_string(), "--world", "3"], "");
        let lines = parse_out(&ok(&o));
        assert!(lines.len() > 300, "roughly balanced: {}", lines.len());
        consumed += lines.len();
        all.extend(lines.into_iter().map(|l| l.2));
    }
    let unique: BTreeSet<_> = all.iter().cloned().collect();
    assert_eq!((all.len(), unique.len(), consumed), (1200, 1200, 1200));
    assert_eq!(channel::consumed_by_cursors(&ch, "a").unwrap() + channel::consumed_by_cursors(&ch, "b").unwrap(), 1200);
    let o = run(TAIL, &[p(&ch), "--rank", "3", "--world", "3"], "");
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn backpressure_blocks_until_consumed() {
    let d = temp_dir("bp");
    let ch = d.join("ch");
    let mut prod =
        Command::new(PUBLISH).args([p(&ch), "--producer", "p0", "--max-in-flight", "40", "--close", "--json"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    prod.stdin.take().unwrap().write_all(refs_text("bp", 200).as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(prod.try_wait().unwrap().is_none(), "producer must block at 40 in flight");
    let published: usize = fs::read_dir(ch.join("producers/p0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl"))
        .map(|p| fs::read_to_string(p).unwrap().lines().count())
        .sum();
    assert_eq!(published, 40);
    let o = run(TAIL, &[p(&ch), "--cursor", "c", "--follow", "--idle-timeout", "20"], "");
    assert_eq!(parse_out(&ok(&o)).len(), 200);
    let out = prod.wait_with_output().unwrap();
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["published_total"], 200);
    assert!(s["waited_ms"].as_u64().unwrap() > 300);
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// The child's exit code, waiting at most `limit`.
fn exit_within(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    kill9(child);
    panic!("still running after {limit:?}");
}

fn wait_for_dir(dir: &Path) {
    let start = Instant::now();
    while !dir.is_dir() {
        assert!(start.elapsed() < Duration::from_secs(10), "{} never appeared", dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Refs printed by a plain (non-following, cursorless) tail: what the channel holds now.
fn published_now(ch: &Path) -> usize {
    parse_out(&ok(&run(TAIL, &[p(ch)], ""))).len()
}

/// Wait (at most 10 s) until the channel exists and holds at least `n` refs.
fn wait_published(ch: &Path, n: usize) {
    let start = Instant::now();
    while !ch.is_dir() || published_now(ch) < n {
        assert!(start.elapsed() < Duration::from_secs(10), "{n} refs never published in {}", ch.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `ref-publish CH --producer p0 ARGS...` reading `input` from a pipe that stays open.
fn spawn_publisher(ch: &Path, args: &[&str], input: &str) -> (std::process::Child, std::process::ChildStdin) {
    let mut prod = Command::new(PUBLISH).args([p(ch), "--producer", "p0"]).args(args).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = prod.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    stdin.flush().unwrap();
    (prod, stdin)
}

#[test]
fn stop_signals_end_publish_and_tail_at_clean_points() {
    let d = temp_dir("stop");
    // A publisher blocked on an empty stdin stops at once on SIGINT (its read is interrupted).
    let ch = d.join("idle");
    let (mut prod, _keep_open) = spawn_publisher(&ch, &[], "");
    wait_for_dir(&ch.join("producers/p0"));
    std::thread::sleep(Duration::from_millis(100));
    signal(&prod, libc::SIGINT);
    assert_eq!(exit_within(&mut prod, Duration::from_secs(5)), Some(130));

    // SIGTERM with three complete lines and a partial one read: the three are published, the
    // partial one is not, the stream stays open, and a later run continues it.
    let ch = d.join("pub");
    let text = refs_text("s", 5);
    let lines: Vec<&str> = text.lines().collect();
    let (mut prod, stdin) = spawn_publisher(&ch, &[], &format!("{}\n{}\n{}\n{}", lines[0], lines[1], lines[2], &lines[3][..20]));
    wait_published(&ch, 3);
    signal(&prod, libc::SIGTERM);
    assert_eq!(exit_within(&mut prod, Duration::from_secs(5)), Some(143));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut prod.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("SIGTERM"), "{err}");
    drop(stdin);
    assert_eq!(published_now(&ch), 3, "the partial line is not published");
    assert!(!ch.join("producers/p0").join(channel::CLOSED_FILE).exists(), "a stopped producer does not close its stream");
    // An upstream replaying its whole output with --resume publishes exactly the rest.
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0", "--resume", "--close"], &text));
    let got = parse_out(&ok(&run(TAIL, &[p(&ch), "--follow"], "")));
    assert_eq!(got.iter().map(|g| (g.1, g.2.clone())).collect::<Vec<_>>(), (0..5).map(|i| (i as u64, format!("s-{i}"))).collect::<Vec<_>>());

    // A publisher held back by --max-in-flight stops at once too, with what it had appended.
    let ch = d.join("held");
    let (mut prod, stdin) = spawn_publisher(&ch, &["--max-in-flight", "5"], &refs_text("h", 20));
    wait_published(&ch, 5);
    signal(&prod, libc::SIGTERM);
    assert_eq!(exit_within(&mut prod, Duration::from_secs(5)), Some(143));
    drop(stdin);
    assert_eq!(published_now(&ch), 5);

    // A following tail stopped by SIGTERM has committed all it printed: its restart prints
    // only the refs published after.
    let ch = d.join("tail");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0"], &refs_text("t", 4)));
    let mut tail = Command::new(TAIL).args([p(&ch), "--cursor", "c", "--follow"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(tail.stdout.take().unwrap());
    for i in 0..4 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(parse_out(&line)[0].1, i);
    }
    signal(&tail, libc::SIGTERM);
    assert_eq!(exit_within(&mut tail, Duration::from_secs(5)), Some(143));
    let cursor: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((cursor.producers["p0"].next_seq, cursor.delivered), (4, 4));
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0", "--close"], &refs_text("u", 2)));
    let again = parse_out(&ok(&run(TAIL, &[p(&ch), "--cursor", "c", "--follow"], "")));
    assert_eq!(again.iter().map(|g| (g.1, g.2.clone())).collect::<Vec<_>>(), vec![(4, "u-0".to_string()), (5, "u-1".to_string())]);
}

#[test]
fn failed_stream_idle_timeout_and_bad_input() {
    let d = temp_dir("fail");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0"], &refs_text("f", 3)));
    // Producer p0 is gone without closing and its heartbeat goes stale: idle timeout, exit 9.
    std::thread::sleep(Duration::from_millis(600));
    let o = run(TAIL, &[p(&ch), "--follow", "--idle-timeout", "0.3"], "");
    assert_eq!(o.status.code(), Some(9), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("producer dead?"));
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0", "--fail", "sglang crashed"], ""));
    let o = run(TAIL, &[p(&ch), "--follow"], "");
    assert_eq!(o.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&o.stderr).contains("sglang crashed"));
    // Tensor data in a ref, unknown fields, wrong schema: exit 3 naming the line.
    let mut fat = sample_ref("fat", None);
    fat["metadata"]["hidden"] = json!(vec![0.5; 1000]);
    for bad in [fat.to_string(), "{\"sample_id\":\"x\"}".into(), sample_ref("x", None).to_string().replace("\"schema_version\":1", "\"schema_version\":2")] {
        let o = run(PUBLISH, &[p(&d.join("ch2")), "--producer", "p1"], &format!("{bad}\n"));
        assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stderr).contains("line 1"));
    }
    // Publishing to a closed stream is a conflict.
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p9", "--close"], ""));
    assert_eq!(run(PUBLISH, &[p(&ch), "--producer", "p9"], "").status.code(), Some(5));
}

#[test]
fn specforge_single_file_layout() {
    let d = temp_dir("single");
    let ch = d.join("ch");
    fs::create_dir_all(&ch).unwrap();
    // A plain SpecForge line (no stamp) followed by our stamped lines.
    fs::write(ch.join("refs.jsonl"), format!("{}\n", sample_ref("plain", None))).unwrap();
    ok(&run(PUBLISH, &[p(&ch), "--layout", "single-file", "--producer", "sf", "--close"], &refs_text("s", 4)));
    assert!(ch.join(".closed").exists());
    let o = run(TAIL, &[p(&ch), "--cursor", "c", "--follow"], "");
    let text = ok(&o);
    let ids: Vec<String> = text.lines().map(|l| SampleRef::parse(l.as_bytes()).unwrap().sample_id).collect();
    assert_eq!(ids, vec!["plain", "s-0", "s-1", "s-2", "s-3"]);
    assert_eq!(fs::read_to_string(ch.join(".consumed_count")).unwrap(), "5\n");
    assert!(ch.join(".consumer_done").exists());
}

/// A ref (compact, as `SampleRef::to_json` writes it) of exactly `len` bytes, padded in `metadata.pad`.
fn ref_of_len(id: &str, version: u64, len: usize) -> String {
    let mut r = sample_ref(id, Some(version));
    r["metadata"]["pad"] = json!("");
    let base = serde_json::from_value::<SampleRef>(r.clone()).unwrap().to_json().len();
    r["metadata"]["pad"] = json!("x".repeat(len - base));
    let text = serde_json::from_value::<SampleRef>(r).unwrap().to_json();
    assert_eq!(text.len(), len);
    text
}

/// The staleness check reads a line's version fields, not the whole ref through the ref size cap:
/// a ref at the cap is past it once stamped, and that made every run of a staleness tail fail on
/// it (exit 3), with the refs behind it never delivered.
#[test]
fn staleness_passes_refs_at_the_size_cap() {
    let d = temp_dir("stale-cap");
    let ch = d.join("ch");
    let w = d.join("w");
    fs::create_dir_all(&w).unwrap();
    fs::write(w.join("latest"), "weight_v000005\n").unwrap();
    let text = format!("{}\n{}\n{}\n", ref_of_len("big", 5, 65_526), ref_of_len("big-stale", 1, channel_max_ref()), sample_ref("small", Some(5)));
    ok(&run(PUBLISH, &[p(&ch), "--producer", "p0", "--close"], &text));
    let ids = |o: &Output| parse_out(&ok(o)).into_iter().map(|l| l.2).collect::<Vec<_>>();
    assert_eq!(ids(&run(TAIL, &[p(&ch)], "")), ["big", "big-stale", "small"]);
    let stale = d.join("stale.jsonl");
    let args = [p(&ch), "--cursor", "t2", "--max-staleness", "2", "--pointer", p(&w), "--stale-out", p(&stale)];
    assert_eq!(ids(&run(TAIL, &args, "")), ["big", "small"]);
    let dropped: Vec<String> = parse_out(&fs::read_to_string(&stale).unwrap()).into_iter().map(|l| l.2).collect();
    assert_eq!(dropped, ["big-stale"]);
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/t2.json")).unwrap()).unwrap();
    assert_eq!((c.producers["p0"].consumed, c.delivered, c.stale), (3, 2, 1));
    // Caught up: a rerun delivers nothing and succeeds.
    assert!(ids(&run(TAIL, &args, "")).is_empty());
}

fn channel_max_ref() -> usize {
    disagg::dataplane::sample_ref::MAX_REF_BYTES
}

/// The size cap is on the compact ref (what a channel line holds), not on the input text: a ref
/// whose input leaves out defaults is refused when its compact form is over the cap (before, it
/// was published, rc 0, as a line every reader skipped as too long: lost); a compact ref under
/// the cap padded with whitespace is published. Every ref at the cap fits a line, even stamped
/// with the longest producer name.
#[test]
fn publish_caps_the_compact_ref_and_every_line_fits() {
    let d = temp_dir("cap");
    // 40 feature specs without their optional fields: the compact form adds four per spec.
    let mut r = sample_ref("specs", Some(1));
    let specs: serde_json::Map<String, Value> = (0..40).map(|i| (format!("f{i}"), json!({"name": format!("f{i}"), "shape": [1], "dtype": "int64"}))).collect();
    r["feature_specs"] = Value::Object(specs);
    r["metadata"]["pad"] = json!("");
    let base = r.to_string().len();
    r["metadata"]["pad"] = json!("x".repeat(65_526 - base));
    let raw = r.to_string();
    assert_eq!(raw.len(), 65_526);
    let compact = serde_json::from_str::<SampleRef>(&raw).unwrap().to_json().len();
    assert!(compact > channel_max_ref(), "{compact}");
    let ch = d.join("ch");
    let o = run(PUBLISH, &[p(&ch), "--producer", "p0", "--close"], &format!("{raw}\n"));
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 1") && err.contains(&format!("ref is {compact} bytes")), "{err}");
    // Refused before anything was written, and not closed.
    assert_eq!(published_now(&ch), 0);
    assert!(!ch.join("producers/p0/closed").exists());

    // 40 KB compact, 30 KB of whitespace around it: published, and delivered compact.
    let small = ref_of_len("padded", 1, 40_000);
    let padded = format!("{{{}{}{}", " ".repeat(15_000), &small[1..], " ".repeat(15_000));
    assert!(padded.len() > channel_max_ref());
    // At the cap, stamped with the longest producer name.
    let long_name = "p".repeat(128);
    let at_cap = ref_of_len("at-cap", 1, channel_max_ref());
    let ch2 = d.join("ch2");
    ok(&run(PUBLISH, &[p(&ch2), "--producer", "p0", "--close"], &format!("{padded}\n")));
    ok(&run(PUBLISH, &[p(&ch2), "--producer", &long_name, "--close"], &format!("{at_cap}\n")));
    let o = run(TAIL, &[p(&ch2), "--follow", "--json"], "");
    let out = ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"corrupt\":0"), "{}", String::from_utf8_lossy(&o.stderr));
    // Each line carries the ref as published, compact.
    let mut got: Vec<(String, String)> = out.lines().map(|l| (channel::check_line(l.as_bytes()).unwrap().producer, unstamped(l).to_json())).collect();
    got.sort();
    assert!(got == [("p0".to_string(), small), (long_name, at_cap)], "not the refs as published");
}

/// Single-file layout, several ranks: `.consumed_count` is the group's total, and the producer's
/// backpressure counts every rank. Before, each rank overwrote it with its own count, so a
/// producer with --max-in-flight stalled for good once the ranks had each taken their share.
#[test]
fn single_file_backpressure_counts_every_rank() {
    let d = temp_dir("sf-ranks");
    let ch = d.join("ch5");
    fs::create_dir_all(&ch).unwrap();
    fs::write(ch.join("refs.jsonl"), "").unwrap();
    let mut tails: Vec<std::process::Child> = (0..2)
        .map(|r| {
            Command::new(TAIL)
                .args([p(&ch), "--cursor", "t", "--follow", "--idle-timeout", "15", "--rank", &r.to_string(), "--world", "2"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut prod = Command::new(PUBLISH)
        .args([p(&ch), "--layout", "single-file", "--producer", "sf", "--max-in-flight", "8", "--close"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    prod.stdin.take().unwrap().write_all(refs_text("r", 40).as_bytes()).unwrap();
    let start = Instant::now();
    let code = loop {
        if let Some(st) = prod.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > Duration::from_secs(20) {
            let count = fs::read_to_string(ch.join(".consumed_count")).unwrap_or_default();
            for c in tails.iter_mut().chain([&mut prod]) {
                kill9(c);
            }
            panic!("producer stalled: {} refs published, .consumed_count {count:?}", published_now(&ch));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(code, Some(0));
    let mut ids = Vec::new();
    for t in tails {
        let o = t.wait_with_output().unwrap();
        let got: Vec<String> = ok(&o).lines().map(|l| SampleRef::parse(l.as_bytes()).unwrap().sample_id).collect();
        assert!(!got.is_empty() && got.len() < 40, "both ranks take a share: {}", got.len());
        ids.extend(got);
    }
    ids.sort();
    let mut want: Vec<String> = (0..40).map(|i| format!("r-{i}")).collect();
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(fs::read_to_string(ch.join(".consumed_count")).unwrap(), "40\n");
    assert_eq!(channel::consumed_by_single_file_cursors(&ch).unwrap(), 40);
}

fn expected() -> Value {
    expected_in("testdata/features")
}

fn expected_in(fixtures: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(fixtures).join("expected.json")).unwrap()).unwrap()
}

fn copy_fixtures(d: &Path) -> PathBuf {
    copy_fixtures_from(d, "testdata/features")
}

fn copy_fixtures_from(d: &Path, fixtures: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(fixtures).join("rows_0-2000");
    let dst = d.join("in/rows_0-2000");
    fs::create_dir_all(&dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    d.join("in")
}

/// Every tensor of every ref in `m`, read back from the store with the safetensors crate, equals
/// the expected dtype, shape and bytes. Returns how many were compared.
fn compare_stored_tensors(m: &Manifest, exp: &serde_json::Map<String, Value>) -> usize {
    let mut compared = 0;
    for r in &m.refs {
        let root = r.feature_store_uri.strip_prefix("file://").unwrap();
        let want = &exp[r.source_task_id.as_deref().unwrap()]["tensors"];
        assert_eq!(r.feature_keys.len(), want.as_object().unwrap().len());
        for (name, key) in &r.feature_keys {
            let (path, tensor) = key.rsplit_once('#').unwrap();
            let bytes = fs::read(Path::new(root).join(path)).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let view = st.tensor(tensor).unwrap();
            let w = &want[name];
            assert_eq!(hex(view.data()), w["hex"].as_str().unwrap(), "{} {name}", r.sample_id);
            assert_eq!(view.shape(), w["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect::<Vec<_>>());
            assert_eq!(r.feature_specs[name].dtype, w["dtype"].as_str().unwrap());
            compared += 1;
        }
    }
    compared
}

/// Files written by real `torch.save` (testdata/gen_torch_real.py, torch 2.15), including a
/// gzipped one, a view with a storage offset and a non-contiguous transpose.
#[test]
fn ingest_real_torch_save_files_every_tensor() {
    let d = temp_dir("ingest-real-torch");
    let input = copy_fixtures_from(&d, "testdata/features_torch");
    let manifest = d.join("refs.json");
    let o = run(INGEST, &[p(&input), "--store", p(&d.join("store")), "--manifest", p(&manifest), "--strict", "--json"], "");
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    let exp = expected_in("testdata/features_torch");
    let exp = exp.as_object().unwrap();
    assert_eq!((s["ingested"].as_u64(), s["invalid"].as_u64()), (Some(exp.len() as u64), Some(0)));
    let m: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m.refs.len(), exp.len());
    assert_eq!(compare_stored_tensors(&m, exp), 27);
}

#[test]
fn ingest_committed_torch_fixtures_every_tensor() {
    let d = temp_dir("ingest");
    let input = copy_fixtures(&d);
    let store = d.join("store");
    let manifest = d.join("refs.json");
    let o = run(INGEST, &[p(&input), "--store", p(&store), "--manifest", p(&manifest), "--run-id", "r1", "--json"], "");
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    let exp = expected();
    let exp = exp.as_object().unwrap();
    let valid = exp.values().filter(|v| v["valid"] == true).count();
    assert_eq!((s["ingested"].as_u64(), s["invalid"].as_u64()), (Some(valid as u64), Some((exp.len() - valid) as u64)));
    for f in s["invalid_files"].as_array().unwrap() {
        let rel = f["file"].as_str().unwrap().split("in/").nth(1).unwrap();
        let want = exp[rel]["reason"].as_str().unwrap();
        assert!(f["reason"].as_str().unwrap().contains(want), "{rel}: {} lacks {want}", f["reason"]);
    }
    assert!(d.join("refs.json.done").exists());
    let m: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m.refs.len(), valid);
    assert!(compare_stored_tensors(&m, exp) >= 20);
    // A rerun skips everything intact; a damaged object is redone as a new generation.
    let victim = m.refs.iter().find(|r| r.sample_id.ends_with("data_0")).unwrap();
    let vpath = Path::new(victim.feature_store_uri.strip_prefix("file://").unwrap()).join(victim.metadata["store_key"].as_str().unwrap());
    let len = fs::metadata(&vpath).unwrap().len();
    fs::OpenOptions::new().write(true).open(&vpath).unwrap().set_len(len - 3).unwrap();
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &[p(&input), "--store", p(&store), "--manifest", p(&manifest), "--json"], ""))).unwrap();
    assert_eq!((s["ingested"].as_u64(), s["skipped_intact"].as_u64()), (Some(1), Some(valid as u64 - 1)));
    let m2: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m2.refs.iter().find(|r| r.sample_id == victim.sample_id).unwrap().metadata["generation"], 2);
    // --strict makes a bad file fatal (exit 3, naming it).
    let o = run(INGEST, &[p(&input), "--store", p(&store), "--strict"], "");
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("data_4.ckpt"));
    // Publishing instead of a manifest: one closed stream with every ref.
    let ch = d.join("ch");
    ok(&run(INGEST, &[p(&input), "--store", p(&store), "--publish", p(&ch), "--producer", "ing"], ""));
    assert_eq!(parse_out(&ok(&run(TAIL, &[p(&ch), "--follow"], ""))).len(), valid);
}

/// Files under `dir` whose name ends in `suffix`.
fn count_files(dir: &Path, suffix: &str) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.map(|e| e.unwrap().path()).map(|p| if p.is_dir() { count_files(&p, suffix) } else { usize::from(p.to_string_lossy().ends_with(suffix)) }).sum()
}

// A stop signal that lands after a batch is appended, before the next read of stdin starts,
// still ends the publisher at once (the read waits on the stop as well as on the input);
// before, that read blocked until more input came.
#[cfg(feature = "failpoints")]
#[test]
fn a_stop_between_a_batch_and_the_next_read_is_not_lost() {
    let d = temp_dir("stop-between");
    let ch = d.join("ch");
    let mut prod = Command::new(PUBLISH)
        .args([p(&ch), "--producer", "p0"])
        .env("DISAGG_FAILPOINT", "publish.after_batch:sleep-500")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = prod.stdin.take().unwrap();
    stdin.write_all(refs_text("b", 3).as_bytes()).unwrap();
    stdin.flush().unwrap();
    wait_published(&ch, 3);
    // Inside the failpoint's sleep: the flag is set before the next read begins.
    signal(&prod, libc::SIGTERM);
    assert_eq!(exit_within(&mut prod, Duration::from_secs(5)), Some(143));
    drop(stdin);
    assert_eq!(published_now(&ch), 3);
}

// The failpoint that paces the ingest exists only with `--features failpoints` (make test).
#[cfg(feature = "failpoints")]
#[test]
fn ingest_stopped_by_sigterm_keeps_what_it_stored_and_publishes_nothing() {
    let d = temp_dir("ingest-stop");
    let input = d.join("in");
    let n = 40;
    for k in 0..n {
        let dir = input.join(format!("rows_{k}"));
        fs::create_dir_all(&dir).unwrap();
        fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/features/rows_0-2000/data_0.ckpt"), dir.join("data_0.ckpt")).unwrap();
    }
    let (store, manifest) = (d.join("store"), d.join("refs.json"));
    // Each file waits 100 ms before it starts, so the signal lands mid-ingest.
    let mut c = Command::new(INGEST)
        .args([p(&input), "--store", p(&store), "--manifest", p(&manifest)])
        .env("DISAGG_FAILPOINT", "ingest.file:sleep-100")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while count_files(&store, ".safetensors") == 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "no object stored");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(&c, libc::SIGTERM);
    assert_eq!(exit_within(&mut c, Duration::from_secs(10)), Some(143));
    let stored = count_files(&store, ".safetensors");
    assert!((1..n).contains(&stored), "{stored} of {n} stored when stopped");
    assert!(!manifest.exists() && !d.join("refs.json.done").exists(), "a stopped ingest writes no manifest");
    // The rerun skips what the stopped one stored and completes the rest.
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &[p(&input), "--store", p(&store), "--manifest", p(&manifest), "--json"], ""))).unwrap();
    assert_eq!((s["skipped_intact"].as_u64(), s["ingested"].as_u64()), (Some(stored as u64), Some((n - stored) as u64)));
    let m: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m.refs.len(), n);
}

/// An input file truncated while it is being read (a producer still writing it, or rewriting
/// it in place) ends the ingest with an I/O error naming the file (exit 10), not a "Bus error".
#[cfg(feature = "failpoints")]
#[test]
fn ingest_of_a_file_truncated_while_it_is_read_is_an_io_error_naming_it() {
    let d = temp_dir("ingest-truncated");
    let input = d.join("in");
    fs::create_dir_all(&input).unwrap();
    let f = input.join("data_0.ckpt");
    fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/features/rows_0-2000/data_0.ckpt"), &f).unwrap();
    let c = Command::new(INGEST)
        .args([p(&input), "--store", p(&d.join("store")), "--manifest", p(&d.join("refs.json"))])
        .env("DISAGG_FAILPOINT", "ingest.after_map:sleep-1500")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(0).unwrap();
    let out = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{err}");
    assert!(err.starts_with("feature-ingest: error: ") && err.contains(p(&f)) && err.contains("shrank"), "{err}");
    assert!(!d.join("refs.json").exists(), "no manifest");
}

#[test]
fn ingest_link_and_move_cost_no_extra_disk() {
    use std::os::unix::fs::MetadataExt;
    let d = temp_dir("link");
    let input = copy_fixtures(&d);
    let store = d.join("store");
    let st_in = input.join("rows_0-2000/data_3.safetensors");
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &[p(&st_in), "--store", p(&store), "--mode", "link", "--json"], ""))).unwrap();
    assert_eq!(s["ingested"], 1);
    assert_eq!(fs::metadata(&st_in).unwrap().nlink(), 2, "hard link, not a copy");
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &[p(&st_in), "--store", p(&store), "--mode", "link", "--json"], ""))).unwrap();
    assert_eq!(s["skipped_intact"], 1);
    let ckpt = input.join("rows_0-2000/data_0.ckpt");
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &[p(&ckpt), "--store", p(&store), "--mode", "move", "--json"], ""))).unwrap();
    assert_eq!(s["ingested"], 1);
    assert!(!ckpt.exists(), "moved");
}

/// Feature files reached through symbolic links (a staging dir linking into where the producer
/// wrote them) were skipped without a word: the walk only took regular files. Copy and link
/// take the files the links name (a hard link of the file, not of the link); move refuses
/// them, per file, and leaves them where they are; a dangling link is one invalid file.
#[test]
fn ingest_takes_feature_files_through_symbolic_links() {
    use std::os::unix::fs::MetadataExt;
    let d = temp_dir("ingest-links");
    let real = copy_fixtures_from(&d, "testdata/features_torch");
    let linked = d.join("linked/rows_0-2000");
    fs::create_dir_all(&linked).unwrap();
    let mut targets = Vec::new();
    for e in fs::read_dir(real.join("rows_0-2000")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), linked.join(e.file_name())).unwrap();
        targets.push(e.path());
    }
    let n = expected_in("testdata/features_torch").as_object().unwrap().len() as u64;
    let manifest = d.join("refs.json");
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &[p(&d.join("linked")), "--store", p(&d.join("store")), "--manifest", p(&manifest), "--strict", "--json"], ""))).unwrap();
    assert_eq!(s["ingested"].as_u64(), Some(n), "{s}");
    let m: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(compare_stored_tensors(&m, expected_in("testdata/features_torch").as_object().unwrap()), 27);
    // Link mode on a linked .safetensors file: the store holds a hard link of the file itself.
    let st = d.join("data_9.safetensors");
    let st_real = copy_fixtures(&d.join("plain")).join("rows_0-2000/data_3.safetensors");
    std::os::unix::fs::symlink(&st_real, &st).unwrap();
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &[p(&st), "--store", p(&d.join("store2")), "--mode", "link", "--json"], ""))).unwrap();
    assert_eq!(s["ingested"], 1, "{s}");
    assert_eq!(fs::metadata(&st_real).unwrap().nlink(), 2, "the file is linked into the store, not the symlink");
    // Move mode: refused per file, nothing moved.
    let o = run(INGEST, &[p(&d.join("linked")), "--store", p(&d.join("store3")), "--mode", "move", "--json"], "");
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!((s["ingested"].as_u64(), s["invalid"].as_u64()), (Some(0), Some(n)), "{s}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--mode move takes files, not links"));
    assert!(targets.iter().all(|t| t.exists()), "a linked file was moved");
    // A link to nothing is one invalid file, reported and skipped (fatal with --strict), not
    // the end of the whole ingest.
    std::os::unix::fs::symlink(d.join("gone.ckpt"), linked.join("data_9.ckpt")).unwrap();
    let o = run(INGEST, &[p(&d.join("linked")), "--store", p(&d.join("store4")), "--json"], "");
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!((s["ingested"].as_u64(), s["invalid"].as_u64()), (Some(n), Some(1)), "{s}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("data_9.ckpt") && err.contains("symbolic link"), "{err}");
    let o = run(INGEST, &[p(&d.join("linked")), "--store", p(&d.join("store5")), "--strict"], "");
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A feature file whose tensor names cannot be stored (here one holding `#`, which ends a
/// feature key's path) is one invalid file, reported by name and skipped, not the end of the
/// ingest (before: exit 3 naming the store, and no manifest).
#[test]
fn ingest_skips_a_file_whose_tensor_names_cannot_be_stored() {
    let d = temp_dir("ingest-names");
    let input = d.join("in");
    fs::create_dir_all(&input).unwrap();
    let write = |name: &str, tensor: &str| {
        let t = vec![TensorData { name: tensor.into(), dtype: Dtype::F32, shape: vec![2], data: vec![1u8; 8].into() }];
        let mut bytes = disagg::dataplane::store::safetensors_header(&t, &BTreeMap::new()).unwrap();
        bytes.extend_from_slice(&t[0].data);
        fs::write(input.join(name), bytes).unwrap();
    };
    write("good.safetensors", "h");
    write("hash.safetensors", "a#b");
    let manifest = d.join("refs.json");
    let o = run(INGEST, &[p(&input), "--store", p(&d.join("store")), "--manifest", p(&manifest), "--json"], "");
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!((s["ingested"].as_u64(), s["invalid"].as_u64()), (Some(1), Some(1)), "{s}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("hash.safetensors") && err.contains("\"a#b\""), "{err}");
    let m: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m.refs.len(), 1, "the good file's ref is in the manifest");
    let o = run(INGEST, &[p(&input), "--store", p(&d.join("store2")), "--strict"], "");
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
}

const GOOD_CKPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/features/rows_0-2000/data_0.ckpt");
const GOOD_SAFETENSORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/features/rows_0-2000/data_3.safetensors");

/// `INPUT/s0.ckpt` .. `s{n-1}.ckpt`, each a copy of one valid feature file.
fn move_input(d: &Path, n: usize) -> PathBuf {
    let input = d.join("in");
    fs::create_dir_all(&input).unwrap();
    for i in 0..n {
        fs::copy(GOOD_CKPT, input.join(format!("s{i}.ckpt"))).unwrap();
    }
    input
}

/// Sample ids of the refs that the manifest, or the channel read from its start, holds.
fn ref_ids(manifest: Option<&Path>, ch: &Path) -> Vec<String> {
    let mut ids: Vec<String> = match manifest {
        Some(m) => serde_json::from_slice::<Manifest>(&fs::read(m).unwrap()).unwrap().refs.into_iter().map(|r| r.sample_id).collect(),
        None => parse_out(&ok(&run(TAIL, &[p(ch), "--follow"], ""))).into_iter().map(|x| x.2).collect(),
    };
    ids.sort();
    ids
}

fn names(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// `--mode move` removed each source as soon as its object was stored, before any ref to it
/// was written: an ingest that then failed (here the quota) left those samples in the store
/// with no ref, and the rerun, which lists refs from INPUT, published or wrote only the rest
/// (and a rerun of one that had finished exited 5: "already closed with 4 refs; this ingest
/// has 0"). Sources now go only once their refs are committed, and a manifest's journal keeps
/// the refs of what a move removed, so every rerun ends with all of them.
#[test]
fn ingest_move_rerun_after_a_failure_loses_no_ref() {
    let d = temp_dir("ingest-move-rerun");
    // The size of one stored object, for a quota that holds exactly two.
    let probe = d.join("probe");
    ok(&run(INGEST, &[GOOD_CKPT, "--store", p(&probe.join("store")), "--manifest", p(&probe.join("refs.json"))], ""));
    let m: Manifest = serde_json::from_slice(&fs::read(probe.join("refs.json")).unwrap()).unwrap();
    let one = fs::metadata(probe.join("store").join(m.refs[0].metadata["store_key"].as_str().unwrap())).unwrap().len();
    let quota = (one * 5 / 2).to_string();
    let all = names(&["s0", "s1", "s2", "s3"]);
    for publish in [true, false] {
        let d = d.join(if publish { "publish" } else { "manifest" });
        let input = move_input(&d, 4);
        let (store, ch, manifest) = (d.join("store"), d.join("ch"), d.join("refs.json"));
        let out = |extra: &[&str]| {
            let mut args = vec![p(&input), "--store", p(&store), "--mode", "move"];
            args.extend(if publish { ["--publish", p(&ch)] } else { ["--manifest", p(&manifest)] });
            args.extend(extra);
            run(INGEST, &args, "")
        };
        let o = out(&["--quota-bytes", &quota]);
        assert_eq!(o.status.code(), Some(10), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(count_files(&store, ".safetensors"), 2);
        assert_eq!(count_files(&input, ".ckpt"), 4, "a source moved before any ref to it was written");
        ok(&out(&[]));
        let m = (!publish).then_some(manifest.as_path());
        assert_eq!(ref_ids(m, &ch), all);
        assert_eq!(count_files(&input, ".ckpt"), 0, "moved");
        // Again, with nothing left in INPUT: the same refs, exit 0.
        ok(&out(&[]));
        assert_eq!(ref_ids(m, &ch), all);
        if !publish {
            // A file added later joins the manifest; the moved ones stay in it. A .safetensors
            // file is hard-linked into the store, its source removed after the manifest.
            fs::copy(GOOD_SAFETENSORS, input.join("t.safetensors")).unwrap();
            ok(&out(&[]));
            assert_eq!(ref_ids(m, &ch), names(&["s0", "s1", "s2", "s3", "t"]));
            assert!(!input.join("t.safetensors").exists(), "moved");
            assert!(d.join("refs.json.moved").exists());
        } else {
            // The channel is closed: a new file is a conflict, and stays where it is.
            fs::copy(GOOD_CKPT, input.join("s9.ckpt")).unwrap();
            let o = out(&[]);
            assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(String::from_utf8_lossy(&o.stderr).contains("s9"), "{}", String::from_utf8_lossy(&o.stderr));
            assert!(input.join("s9.ckpt").exists());
            assert_eq!(ref_ids(None, &ch), all);
        }
    }
}

/// Killed after the refs are committed and while the sources are being removed (some gone,
/// some not), a move ingest leaves a state the rerun completes: every ref once, INPUT empty.
#[cfg(feature = "failpoints")]
#[test]
fn ingest_move_killed_while_removing_sources_is_repaired_by_the_rerun() {
    let d = temp_dir("ingest-move-kill");
    let n = 6;
    let all: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
    for publish in [true, false] {
        let d = d.join(if publish { "publish" } else { "manifest" });
        let input = move_input(&d, n);
        let (store, ch, manifest) = (d.join("store"), d.join("ch"), d.join("refs.json"));
        let mut args = vec![p(&input), "--store", p(&store), "--mode", "move"];
        args.extend(if publish { ["--publish", p(&ch)] } else { ["--manifest", p(&manifest)] });
        let o = Command::new(INGEST).args(&args).env("DISAGG_FAILPOINT", "ingest.after_remove").output().unwrap();
        assert_eq!(o.status.code(), None, "killed: {}", String::from_utf8_lossy(&o.stderr));
        let left = count_files(&input, ".ckpt");
        assert!(left < n, "{left} of {n} sources left");
        let m = (!publish).then_some(manifest.as_path());
        ok(&run(INGEST, &args, ""));
        assert_eq!(ref_ids(m, &ch), all);
        assert_eq!(count_files(&input, ".ckpt"), 0);
    }
}

/// A resumed ingest publish skipped as many refs as the channel held, by position: with a file
/// added to INPUT (or one invalid in the first run and fixed since) ahead of what was
/// published, one ref was lost and another published twice ([b, c] then [a, b, c] gave
/// b, c, c). Refs already published are now matched by sample id.
#[cfg(feature = "failpoints")]
#[test]
fn ingest_publish_resumed_with_changed_inputs_loses_and_repeats_nothing() {
    let d = temp_dir("ingest-resume");
    for fixed in [false, true] {
        let d = d.join(if fixed { "fixed" } else { "added" });
        let input = d.join("in");
        fs::create_dir_all(&input).unwrap();
        for f in ["b", "c"] {
            fs::copy(GOOD_CKPT, input.join(format!("{f}.ckpt"))).unwrap();
        }
        if fixed {
            // Invalid in the first run (truncated), whole in the second.
            let bytes = fs::read(GOOD_CKPT).unwrap();
            fs::write(input.join("a.ckpt"), &bytes[..bytes.len() / 2]).unwrap();
        }
        let (store, ch) = (d.join("store"), d.join("ch"));
        let args = [p(&input), "--store", p(&store), "--publish", p(&ch)];
        // Dies right after the first batch is written (not closed).
        let o = Command::new(INGEST).args(args).env("DISAGG_FAILPOINT", "publish.after_write").output().unwrap();
        assert_eq!(o.status.code(), None, "killed: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(ref_ids_published(&ch), names(&["b", "c"]));
        fs::copy(GOOD_CKPT, input.join("a.ckpt")).unwrap();
        ok(&run(INGEST, &args, ""));
        let got: Vec<(u64, String)> = parse_out(&ok(&run(TAIL, &[p(&ch), "--follow"], ""))).into_iter().map(|x| (x.1, x.2)).collect();
        assert_eq!(got, vec![(0, "b".to_string()), (1, "c".to_string()), (2, "a".to_string())]);
        // Finished: a rerun has nothing to add.
        ok(&run(INGEST, &args, ""));
        assert_eq!(ref_ids(None, &ch), names(&["a", "b", "c"]));
    }
}

/// Sample ids in a producer's segments (also while the stream is open), sorted.
#[cfg(feature = "failpoints")]
fn ref_ids_published(ch: &Path) -> Vec<String> {
    let mut ids = channel::published_sample_ids(ch, "ingest").unwrap();
    ids.sort();
    ids
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn tensors(n: usize) -> Vec<TensorData<'static>> {
    vec![TensorData { name: "h".into(), dtype: Dtype::F32, shape: vec![n], data: vec![7u8; n * 4].into() }]
}

#[test]
fn store_leases_expire_and_gc_frees() {
    let d = temp_dir("store");
    let store = FeatureStore::open(&d, StoreOptions::default()).unwrap();
    let md = BTreeMap::new();
    // Consume-once: the last release deletes.
    let o1 = store.put("s1", &tensors(4), &md, false).unwrap();
    assert_eq!(o1.generation, 1);
    let a = store.get("s1", "a", Duration::from_secs(60)).unwrap();
    let b = store.get("s1", "b", Duration::from_secs(60)).unwrap();
    assert!(!store.release(&a).unwrap());
    assert!(o1.path.exists());
    assert!(store.release(&b).unwrap());
    assert!(!o1.path.exists());
    // Generations are never reused, even after the object is gone.
    assert_eq!(store.put("s1", &tensors(4), &md, false).unwrap().generation, 2);
    store.abort("s1").unwrap();
    assert!(store.current("s1").unwrap().is_none());
    assert_eq!(store.put("s1", &tensors(4), &md, false).unwrap().generation, 3);
    // retain_on_release keeps the object for the next epoch.
    let r = store.put("keep", &tensors(4), &md, true).unwrap();
    let l = store.get("keep", "a", Duration::from_secs(60)).unwrap();
    assert!(!store.release(&l).unwrap());
    assert!(r.path.exists());
    // A crashed holder's lease lives on disk, expires, and gc frees the object.
    let o = store.put("crash", &tensors(4), &md, false).unwrap();
    let lease = store.get("crash", "dead-consumer", Duration::from_millis(50)).unwrap();
    let rec: LeaseRecord = serde_json::from_slice(&fs::read(&lease.lease_path).unwrap()).unwrap();
    assert_eq!((rec.holder.as_str(), rec.generation, rec.pid), ("dead-consumer", o.generation, std::process::id()));
    drop(lease);
    let g = store.gc(None).unwrap();
    assert_eq!(g.leases_expired, 0, "not yet expired");
    std::thread::sleep(Duration::from_millis(80));
    let g = store.gc(None).unwrap();
    assert_eq!((g.leases_expired, g.objects_freed), (1, 1));
    assert!(!o.path.exists());
    assert!(r.path.exists(), "retained and unleased: kept");
    let g = store.gc(Some(Duration::ZERO)).unwrap();
    assert!(g.objects_freed >= 2, "held too long");
    // Superseded generations go when a new one is put and nobody holds them.
    let g1 = store.put("sup", &tensors(4), &md, true).unwrap();
    let held = store.get("sup", "h", Duration::from_secs(60)).unwrap();
    let g2 = store.put("sup", &tensors(4), &md, true).unwrap();
    assert!(g1.path.exists() && g2.path.exists());
    assert!(store.release(&held).unwrap(), "old generation deleted on its last release");
    assert!(!g1.path.exists());
    // Ids with colons or slashes are refused.
    assert_eq!(store.put("a:b", &tensors(1), &md, false).unwrap_err().exit_code(), 3);
}

#[test]
fn store_quota_waits_then_fails_clearly() {
    let d = temp_dir("quota");
    let opts = StoreOptions { quota_bytes: Some(1000), quota_wait: Duration::from_millis(300) };
    let store = FeatureStore::open(&d, opts.clone()).unwrap();
    let md = BTreeMap::new();
    store.put("a", &tensors(100), &md, false).unwrap(); // ~480 bytes
    let t = Instant::now();
    let e = store.put("b", &tensors(200), &md, false).unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(e.exit_code(), 10);
    assert!(e.to_string().contains("quota"), "{e}");
    // A consumer in another process frees space while the producer waits.
    let other = FeatureStore::open(&d, StoreOptions::default()).unwrap();
    let lease = other.get("a", "c", Duration::from_secs(10)).unwrap();
    let waiter = std::thread::spawn(move || {
        let s = FeatureStore::open(&d, StoreOptions { quota_bytes: Some(1000), quota_wait: Duration::from_secs(10) }).unwrap();
        s.put("b", &tensors(200), &BTreeMap::new(), false).map(|o| o.generation)
    });
    std::thread::sleep(Duration::from_millis(200));
    other.release(&lease).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), 1);
    // feature-ingest reports the quota as a fatal I/O error.
    let d2 = temp_dir("quota2");
    let input = copy_fixtures(&d2);
    let o = run(INGEST, &[p(&input), "--store", p(&d2.join("store")), "--quota-bytes", "2000"], "");
    assert_eq!(o.status.code(), Some(10));
    assert!(String::from_utf8_lossy(&o.stderr).contains("quota"));
    // SIGTERM ends a long quota wait at once (exit 143), leaving no temp file in the store.
    let store3 = d2.join("store3");
    let mut c = Command::new(INGEST).args([p(&input), "--store", p(&store3), "--quota-bytes", "2000", "--quota-wait", "60"]).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(c.try_wait().unwrap().is_none(), "waiting for quota");
    signal(&c, libc::SIGTERM);
    assert_eq!(exit_within(&mut c, Duration::from_secs(5)), Some(143));
    assert_no_temp(&store3);
}

/// No in-progress file of the durable-write module anywhere under `dir`.
fn assert_no_temp(dir: &Path) {
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        assert!(!disagg::fsio::is_temp_name(&path.file_name().unwrap().to_string_lossy()), "temp file left: {}", path.display());
        if path.is_dir() {
            assert_no_temp(&path);
        }
    }
}

/// Fenced examples in docs/FORMATS.md parse with the code's own types.
#[test]
fn docs_examples_match_the_code() {
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMATS.md")).unwrap();
    let mut seen = BTreeSet::new();
    let mut lines = doc.lines();
    while let Some(l) = lines.next() {
        let Some(tag) = l.strip_prefix("```") else { continue };
        let body: Vec<&str> = lines.by_ref().take_while(|x| !x.starts_with("```")).collect();
        let body = body.join("\n");
        match tag {
            "json sampleref" => {
                let r = SampleRef::parse(body.as_bytes()).unwrap();
                assert_eq!(r.oldest_weight_version(), Some(5));
                assert_eq!(serde_json::to_string(&r).unwrap(), body, "field order as documented");
            }
            "text channel-line" => {
                let st = channel::check_line(body.as_bytes()).unwrap();
                let r = SampleRef::parse(body.as_bytes()).unwrap();
                assert_eq!(channel::encode_line(&r, &st.producer, st.seq), body);
            }
            "json cursor" => {
                let _: Cursor = serde_json::from_str(&body).unwrap();
            }
            "json lease" => {
                let _: LeaseRecord = serde_json::from_str(&body).unwrap();
            }
            "json manifest" => {
                let _: Manifest = serde_json::from_str(&body).unwrap();
            }
            "json heartbeat" => {
                let _: channel::Heartbeat = serde_json::from_str(&body).unwrap();
            }
            "json closed" => {
                let _: channel::Closed = serde_json::from_str(&body).unwrap();
            }
            _ => continue,
        }
        seen.insert(tag.to_string());
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
}

/// Wait for `child` up to `limit`; kill it and panic naming `what` if it is still running.
fn wait_or_kill(child: &mut std::process::Child, limit: Duration, what: &str) -> Option<i32> {
    match exit_within(child, limit) {
        Some(code) => Some(code),
        None => {
            kill9(child);
            panic!("{what}: still running after {limit:?}");
        }
    }
}

/// A corrupt line is counted as published by the producer (single file: it is a line of
/// `refs.jsonl`; segments: its seq is skipped), so the consumer that skips it acknowledges it,
/// once over the ranks of its group: published − consumed drains to 0. Before, the single-file
/// tail never counted it (nor gave it a line index), so `--max-in-flight 1` waited for good.
#[test]
fn corrupt_lines_count_as_consumed_so_backpressure_drains() {
    let d = temp_dir("corrupt-ack");
    let ch = d.join("ch");
    fs::create_dir_all(&ch).unwrap();
    fs::write(ch.join("refs.jsonl"), format!("{}\nnot a ref\n{}\n", sample_ref("x0", None), sample_ref("x1", None))).unwrap();
    let o = run(TAIL, &[p(&ch), "--cursor", "c", "--json"], "");
    let ids: Vec<String> = ok(&o).lines().map(|l| SampleRef::parse(l.as_bytes()).unwrap().sample_id).collect();
    assert_eq!(ids, ["x0", "x1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"corrupt\":1"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(fs::read_to_string(ch.join(".consumed_count")).unwrap(), "3\n");
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join(".cursor-c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["refs.jsonl"].next_seq, c.producers["refs.jsonl"].consumed, c.delivered), (3, 3, 2));
    // The producer's backpressure drains past it: at most one ref in flight, and a tail running.
    let mut tail = Command::new(TAIL).args([p(&ch), "--cursor", "c", "--follow", "--idle-timeout", "20"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut prod = Command::new(PUBLISH).args([p(&ch), "--layout", "single-file", "--max-in-flight", "1", "--close"]).stdin(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    prod.stdin.take().unwrap().write_all(refs_text("bp", 5).as_bytes()).unwrap();
    let code = exit_within(&mut prod, Duration::from_secs(15));
    if code.is_none() {
        kill9(&mut prod);
    }
    assert_eq!(wait_or_kill(&mut tail, Duration::from_secs(15), "single-file tail"), Some(0));
    assert_eq!(code, Some(0), "the producer waited for a corrupt line to be consumed");
    assert_eq!(fs::read_to_string(ch.join(".consumed_count")).unwrap(), "8\n");

    // Two ranks: each line, the corrupt one too, is acknowledged by exactly one of them.
    let ch2 = d.join("ch2");
    fs::create_dir_all(&ch2).unwrap();
    let mut text = String::new();
    for i in 0..20 {
        text.push_str(&if i % 5 == 2 { format!("corrupt {i}\n") } else { format!("{}\n", sample_ref(&format!("y{i}"), None)) });
    }
    fs::write(ch2.join("refs.jsonl"), text).unwrap();
    for r in 0..2 {
        ok(&run(TAIL, &[p(&ch2), "--cursor", "g", "--rank", &r.to_string(), "--world", "2"], ""));
    }
    assert_eq!(channel::consumed_by_single_file_cursors(&ch2).unwrap(), 20);

    // Segments: a corrupt line in the middle of a stream leaves a gap in the seqs; the rank
    // owning each missing seq acknowledges it.
    let ch3 = d.join("ch3");
    ok(&run(PUBLISH, &[p(&ch3), "--producer", "q"], &refs_text("c", 30)));
    let seg = fs::read_dir(ch3.join("producers/q")).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with(".jsonl")).unwrap();
    let text = fs::read_to_string(&seg).unwrap().replacen("c-7\"", "c-X\"", 1).replacen("c-8\"", "c-Y\"", 1);
    fs::write(&seg, text).unwrap();
    ok(&run(PUBLISH, &[p(&ch3), "--producer", "q", "--close"], ""));
    for (cursor, world) in [("one", 1u64), ("two", 2), ("two", 2)] {
        for r in 0..world {
            let args = [p(&ch3), "--cursor", cursor, "--follow", "--rank", &r.to_string(), "--world", &world.to_string()];
            ok(&run(TAIL, &args, ""));
        }
    }
    // Both cursor groups count all 30: 30 for "one", 30 over the ranks of "two" (the rerun adds nothing).
    assert_eq!(channel::consumed_by_cursors(&ch3, "q").unwrap(), 60);
}

/// A single-file producer killed mid-line leaves bytes after the last newline (here a whole
/// line but its `\n`): a line never committed. The next `ref-publish` cuts it off and appends;
/// a tail that was following meanwhile never delivers the fragment, nor glues it to the lines
/// written after the repair. Before, the producer refused to start (exit 3).
#[test]
fn single_file_torn_tail_is_repaired_by_the_next_producer() {
    let d = temp_dir("sf-torn");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--layout", "single-file"], &refs_text("a", 3)));
    let path = ch.join("refs.jsonl");
    let complete = fs::read_to_string(&path).unwrap();
    let torn = complete.lines().next().unwrap().replace("a-0", "torn");
    fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(torn.as_bytes()).unwrap();
    let tail = Command::new(TAIL).args([p(&ch), "--cursor", "c", "--follow", "--idle-timeout", "20", "--json"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The tail has read the three lines and waits on the partial one.
    let start = Instant::now();
    while fs::read_to_string(ch.join(".consumed_count")).unwrap_or_default() != "3\n" {
        assert!(start.elapsed() < Duration::from_secs(10), "the tail did not catch up");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    // Longer than the fragment, so that bytes past it are new ones.
    let o = run(PUBLISH, &[p(&ch), "--layout", "single-file", "--close", "--json"], &refs_text("b", 4));
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("torn"), "{}", String::from_utf8_lossy(&o.stderr));
    let s: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((s["published_before"].as_u64(), s["published_total"].as_u64()), (Some(3), Some(7)));
    let after = fs::read_to_string(&path).unwrap();
    assert!(after.starts_with(&complete) && after.ends_with('\n') && !after.contains("torn"), "{after}");
    let o = tail.wait_with_output().unwrap();
    let ids: Vec<String> = ok(&o).lines().map(|l| SampleRef::parse(l.as_bytes()).unwrap().sample_id).collect();
    assert_eq!(ids, ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2", "b-3"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("\"torn\":0") && stderr.contains("\"corrupt\":0"), "{stderr}");
    assert_eq!(fs::read_to_string(ch.join(".consumed_count")).unwrap(), "7\n");
}

/// A producer killed while it repairs a torn tail (before the cut) leaves the file as it was:
/// the next one cuts it.
#[cfg(feature = "failpoints")]
#[test]
fn single_file_repair_killed_before_the_cut_is_redone() {
    let d = temp_dir("sf-repair-kill");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--layout", "single-file"], &refs_text("a", 2)));
    let path = ch.join("refs.jsonl");
    let complete = fs::read_to_string(&path).unwrap();
    fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"sample_id\":\"half").unwrap();
    let o = Command::new(PUBLISH).args([p(&ch), "--layout", "single-file"]).env("DISAGG_FAILPOINT", "publish.before_repair").stdin(Stdio::null()).output().unwrap();
    assert!(!o.status.success());
    assert_eq!(fs::read_to_string(&path).unwrap(), format!("{complete}{{\"sample_id\":\"half"));
    ok(&run(PUBLISH, &[p(&ch), "--layout", "single-file", "--close"], &refs_text("b", 1)));
    let ids: Vec<String> = ok(&run(TAIL, &[p(&ch), "--follow"], "")).lines().map(|l| SampleRef::parse(l.as_bytes()).unwrap().sample_id).collect();
    assert_eq!(ids, ["a-0", "a-1", "b-0"]);
}

/// A tail that ends in an error after printing refs commits its cursor for what it printed:
/// a rerun does not print them again. Before, a producer's `failed` seen after another
/// producer's refs were printed (exit 5) left them unacknowledged. A ref whose write to stdout
/// failed is not acknowledged.
#[test]
fn a_failing_tail_commits_what_it_printed_and_nothing_unprinted() {
    let d = temp_dir("fail-commit");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "a"], &refs_text("a", 3)));
    ok(&run(PUBLISH, &[p(&ch), "--producer", "b", "--fail", "sglang crashed"], ""));
    // stdout is a full disk: nothing printed, nothing acknowledged.
    let o = Command::new(TAIL).args([p(&ch), "--cursor", "c"]).stdout(fs::File::create("/dev/full").unwrap()).output().unwrap();
    assert_eq!(o.status.code(), Some(10), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !ch.join("cursors/c.json").exists() || {
            let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/c.json")).unwrap()).unwrap();
            c.delivered == 0
        }
    );
    let o = run(TAIL, &[p(&ch), "--cursor", "c"], "");
    assert_eq!(o.status.code(), Some(5), "{}", String::from_utf8_lossy(&o.stderr));
    let ids: Vec<String> = parse_out(&String::from_utf8(o.stdout).unwrap()).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["a-0", "a-1", "a-2"]);
    let o = run(TAIL, &[p(&ch), "--cursor", "c"], "");
    assert_eq!(o.status.code(), Some(5));
    assert_eq!(String::from_utf8(o.stdout).unwrap(), "", "printed again after a failed run");
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["a"].consumed, c.delivered), (3, 3));
}

/// Stale refs land in `--stale-out` once, also when the run that wrote them ends in an error
/// (here bad input: the producer's `closed` says more refs than its segments hold, exit 3) and
/// is run again. Before, the rerun appended them a second time.
#[test]
fn stale_out_gets_each_stale_ref_once_across_a_failed_run() {
    let d = temp_dir("stale-once");
    let ch = d.join("ch");
    let w = d.join("w");
    fs::create_dir_all(&w).unwrap();
    fs::write(w.join("latest"), "weight_v000010\n").unwrap();
    ok(&run(PUBLISH, &[p(&ch), "--producer", "a", "--close"], &refs_text("s", 3)));
    fs::write(ch.join("producers/a/closed"), "{\"published\":5}\n").unwrap();
    let stale = d.join("stale.jsonl");
    let args = [p(&ch), "--cursor", "c", "--follow", "--max-staleness", "2", "--pointer", p(&w), "--stale-out", p(&stale)];
    for _ in 0..2 {
        let o = run(TAIL, &args, "");
        assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let dropped: Vec<String> = parse_out(&fs::read_to_string(&stale).unwrap()).into_iter().map(|l| l.2).collect();
    assert_eq!(dropped, ["s-0", "s-1", "s-2"]);

    // A run whose write to stdout fails acknowledges nothing of its batch (the fresh refs were
    // not printed), but its stale refs are in --stale-out already: the rerun, which delivers the
    // batch again, does not append them again. Before, it did.
    let ch2 = d.join("ch2");
    let text: String = (0..6).map(|i| format!("{}\n", sample_ref(&format!("m-{i}"), Some(if i % 2 == 0 { 1 } else { 10 })))).collect();
    ok(&run(PUBLISH, &[p(&ch2), "--producer", "a", "--close"], &text));
    let stale2 = d.join("stale2.jsonl");
    let args = [p(&ch2), "--cursor", "c", "--follow", "--max-staleness", "2", "--pointer", p(&w), "--stale-out", p(&stale2)];
    let o = Command::new(TAIL).args(args).stdout(fs::File::create("/dev/full").unwrap()).output().unwrap();
    assert_eq!(o.status.code(), Some(10), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(TAIL, &args, "");
    let ids: Vec<String> = parse_out(&ok(&o)).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["m-1", "m-3", "m-5"]);
    let dropped: Vec<String> = parse_out(&fs::read_to_string(&stale2).unwrap()).into_iter().map(|l| l.2).collect();
    assert_eq!(dropped, ["m-0", "m-2", "m-4"]);
    let c: Cursor = serde_json::from_slice(&fs::read(ch2.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["a"].consumed, c.delivered, c.stale), (6, 3, 3));
    // Into another file, the stale refs of a rerun from scratch are all written.
    let stale3 = d.join("stale3.jsonl");
    let args = [p(&ch2), "--cursor", "c2", "--follow", "--max-staleness", "2", "--pointer", p(&w), "--stale-out", p(&stale3)];
    ok(&run(TAIL, &args, ""));
    assert_eq!(parse_out(&fs::read_to_string(&stale3).unwrap()).len(), 3);
}

/// A channel of `n` refs alternating weight version 1 (stale against `weight_v000010` with
/// `--max-staleness 2`: m-0, m-2, …) and 10 (fresh), closed, and the pointer dir.
fn stale_channel(d: &Path, n: usize) -> (PathBuf, PathBuf) {
    let (ch, w) = (d.join("ch"), d.join("w"));
    fs::create_dir_all(&w).unwrap();
    fs::write(w.join("latest"), "weight_v000010\n").unwrap();
    let text: String = (0..n).map(|i| format!("{}\n", sample_ref(&format!("m-{i}"), Some(if i % 2 == 0 { 1 } else { 10 })))).collect();
    ok(&run(PUBLISH, &[p(&ch), "--producer", "a", "--close"], &text));
    (ch, w)
}

/// The sample ids in a `--stale-out` file, which must hold only whole, checked lines.
fn stale_ids(path: &Path) -> Vec<String> {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "{} ends in a partial line", path.display());
    parse_out(&text).into_iter().map(|l| l.2).collect()
}

/// The stale refs appended to `--stale-out` are synced before a cursor that acknowledges them
/// is written (the cursor commit of a batch, and the stale_out mark of a run whose stdout
/// failed): a sync that fails (here the failpoint standing in for EIO) leaves them
/// unacknowledged (exit 10, no cursor), so a crash can never keep the cursor and lose them.
/// Before, the file was never synced, and the cursor acknowledged them regardless. A run that
/// appends nothing has nothing to sync.
#[cfg(feature = "failpoints")]
#[test]
fn stale_out_is_synced_before_the_cursor_acknowledges_it() {
    let d = temp_dir("stale-sync");
    let (ch, w) = stale_channel(&d, 6);
    let stale = d.join("stale.jsonl");
    let cursor = ch.join("cursors/c.json");
    let args = [p(&ch), "--cursor", "c", "--follow", "--max-staleness", "2", "--pointer", p(&w), "--stale-out", p(&stale)];
    let fail_sync = ("DISAGG_FAILPOINT", "tail.stale_out_sync:error");
    let o = Command::new(TAIL).args(args).env(fail_sync.0, fail_sync.1).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(10), "{err}");
    assert!(err.contains(p(&stale)), "{err}");
    assert!(!cursor.exists(), "a cursor acknowledged stale refs that were not synced");
    // Stdout fails: the stale_out mark is a cursor write that acknowledges them too.
    let o = Command::new(TAIL).args(args).env(fail_sync.0, fail_sync.1).stdout(fs::File::create("/dev/full").unwrap()).output().unwrap();
    assert_eq!(o.status.code(), Some(10), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!cursor.exists(), "a stale_out mark covers stale refs that were not synced");
    // With a sync that works, they are acknowledged; none was lost on the way.
    let ids: Vec<String> = parse_out(&ok(&run(TAIL, &args, ""))).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["m-1", "m-3", "m-5"]);
    let got: BTreeSet<String> = stale_ids(&stale).into_iter().collect();
    assert_eq!(got, names(&["m-0", "m-2", "m-4"]).into_iter().collect());
    let c: Cursor = serde_json::from_slice(&fs::read(&cursor).unwrap()).unwrap();
    assert_eq!((c.producers["a"].consumed, c.delivered, c.stale), (6, 3, 3));
    // Caught up: nothing appended, nothing to sync, the failing sync is never reached.
    let o = Command::new(TAIL).args(args).env(fail_sync.0, fail_sync.1).output().unwrap();
    assert_eq!(ok(&o), "");
}

/// A `--stale-out` file that fills (writes capped with `ulimit -f`, SIGXFSZ ignored: EFBIG in
/// the middle of a line) is cut back to its last whole line (before, the half line stayed, and
/// the rerun's first line was glued to it: two refs lost to every reader of the file); the
/// run fails with exit 10 naming the file and acknowledges the stale refs it wrote whole; a
/// rerun with room appends the rest, each stale ref once. A torn last line that a crash left
/// (no newline) is cut off before a tail appends.
#[test]
fn a_stale_out_file_that_fills_keeps_only_whole_lines() {
    let d = temp_dir("stale-full");
    let (ch, w) = stale_channel(&d, 40);
    let stale = d.join("stale.jsonl");
    let args = [p(&ch), "--cursor", "c", "--follow", "--max-staleness", "2", "--pointer", p(&w), "--stale-out", p(&stale)];
    let cmd = args.iter().fold(TAIL.to_string(), |c, a| format!("{c} '{a}'"));
    let out = Command::new("bash").arg("-c").arg(format!("trap '' XFSZ; ulimit -f 2 && exec {cmd} >/dev/null")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{err}");
    assert!(err.contains(p(&stale)), "{err}");
    let len = fs::metadata(&stale).unwrap().len();
    assert!(len > 0 && len < 2048, "{len}");
    let first = stale_ids(&stale);
    assert!(!first.is_empty() && first.len() < 20, "{first:?}");
    // What the full run wrote whole is acknowledged; the rerun appends the rest once.
    ok(&run(TAIL, &args, ""));
    let want: Vec<String> = (0..40).step_by(2).map(|i| format!("m-{i}")).collect();
    assert_eq!(stale_ids(&stale), want);
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["a"].consumed, c.stale), (40, 20));
    // A torn last line (a crash mid-write) is cut before anything is appended.
    let (ch2, w2) = stale_channel(&d.join("torn"), 2);
    let stale2 = d.join("stale2.jsonl");
    let bytes = fs::read(&stale).unwrap();
    let line = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
    fs::write(&stale2, &bytes[..line + 40]).unwrap();
    let args = [p(&ch2), "--follow", "--max-staleness", "2", "--pointer", p(&w2), "--stale-out", p(&stale2)];
    let o = run(TAIL, &args, "");
    assert!(String::from_utf8_lossy(&o.stderr).contains("torn"), "{}", String::from_utf8_lossy(&o.stderr));
    ok(&o);
    assert_eq!(stale_ids(&stale2), ["m-0", "m-0"]);
}

/// The segment of a producer that wrote a single one.
fn only_segment(ch: &Path, producer: &str) -> PathBuf {
    fs::read_dir(ch.join("producers").join(producer)).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with(".jsonl")).unwrap()
}

/// A corrupt last line of a producer that closed is skipped like any other corrupt line
/// (warned, counted, its seq acknowledged as lost, by the rank whose shard it is), also when a
/// run read it before the producer closed (the cursor keeps `corrupt_after`). Before, its seq
/// had no later line to show the gap, the segments "ended short" of the `closed` count, and
/// every run failed with exit 3, nothing of the stream ever done. A shortfall beyond the corrupt
/// lines is still exit 3.
#[test]
fn a_corrupt_last_line_of_a_closed_producer_is_skipped() {
    let d = temp_dir("corrupt-last");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "q", "--close"], &refs_text("c", 4)));
    let seg = only_segment(&ch, "q");
    let text = fs::read_to_string(&seg).unwrap().replacen("c-2\"", "c-Y\"", 1).replacen("c-3\"", "c-Z\"", 1);
    fs::write(&seg, text).unwrap();
    let o = run(TAIL, &[p(&ch), "--cursor", "one", "--follow", "--json"], "");
    let ids: Vec<String> = parse_out(&ok(&o)).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["c-0", "c-1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("\"corrupt\":2") && err.contains("corrupt lines: acknowledged as lost"), "{err}");
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/one.json")).unwrap()).unwrap();
    assert_eq!((c.producers["q"].next_seq, c.producers["q"].consumed, c.producers["q"].corrupt_after), (4, 4, 0));
    for r in 0..2 {
        ok(&run(TAIL, &[p(&ch), "--cursor", "two", "--follow", "--rank", &r.to_string(), "--world", "2"], ""));
    }
    assert_eq!(channel::consumed_by_cursors(&ch, "q").unwrap(), 8, "each group acknowledges all 4");
    // Done: a rerun delivers nothing and succeeds.
    assert_eq!(ok(&run(TAIL, &[p(&ch), "--cursor", "one", "--follow"], "")), "");

    // Read before the producer closed: the cursor remembers the corrupt line after seq 1.
    let ch2 = d.join("ch2");
    ok(&run(PUBLISH, &[p(&ch2), "--producer", "q"], &refs_text("c", 3)));
    let seg = only_segment(&ch2, "q");
    fs::write(&seg, fs::read_to_string(&seg).unwrap().replacen("c-2\"", "c-Z\"", 1)).unwrap();
    let ids: Vec<String> = parse_out(&ok(&run(TAIL, &[p(&ch2), "--cursor", "c"], ""))).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["c-0", "c-1"]);
    let c: Cursor = serde_json::from_slice(&fs::read(ch2.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["q"].next_seq, c.producers["q"].corrupt_after), (2, 1));
    // What the producer that wrote the three lines records when it closes.
    fs::write(ch2.join("producers/q/closed"), "{\"published\":3}\n").unwrap();
    assert_eq!(ok(&run(TAIL, &[p(&ch2), "--cursor", "c", "--follow"], "")), "");
    let c: Cursor = serde_json::from_slice(&fs::read(ch2.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["q"].next_seq, c.producers["q"].consumed), (3, 3));

    // More missing than corrupt lines: the segments do end short.
    fs::write(ch2.join("producers/q/closed"), "{\"published\":5}\n").unwrap();
    let o = run(TAIL, &[p(&ch2), "--cursor", "fresh", "--follow"], "");
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A jump in the seqs that corrupt lines do not account for is counted as `missing` in
/// `--json` (and said in the warning): refs no line held, told apart from corrupt ones. Before,
/// both were one "sequence jumps" warning and only the corrupt line was counted.
#[test]
fn seqs_no_line_held_are_counted_missing_apart_from_corrupt_lines() {
    let d = temp_dir("tail-missing");
    let ch = d.join("ch");
    ok(&run(PUBLISH, &[p(&ch), "--producer", "q"], &refs_text("c", 6)));
    let seg = only_segment(&ch, "q");
    // Seq 1 corrupt, seqs 3 and 4 gone: a jump 1 → 2 (one corrupt line) and 3 → 5 (in no line).
    let lines: Vec<String> = fs::read_to_string(&seg).unwrap().lines().map(str::to_string).collect();
    let kept = [lines[0].clone(), lines[1].replacen("c-1\"", "c-Z\"", 1), lines[2].clone(), lines[5].clone()];
    fs::write(&seg, format!("{}\n", kept.join("\n"))).unwrap();
    let o = run(TAIL, &[p(&ch), "--cursor", "c", "--json"], "");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(0), "{err}");
    let ids: Vec<String> = parse_out(&String::from_utf8(o.stdout).unwrap()).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["c-0", "c-2", "c-5"]);
    let summary: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!((summary["corrupt"].as_u64(), summary["missing"].as_u64()), (Some(1), Some(2)), "{err}");
    assert!(err.contains("sequence jumps from 1 to 2\n"), "a corrupt line accounts for seq 1: {err}");
    assert!(err.contains("sequence jumps from 3 to 5 (2 of them in no line read)"), "{err}");
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["q"].next_seq, c.producers["q"].consumed), (6, 6));
}

/// A following tail; waits until its stderr has a line containing `what`, then returns the
/// child with the rest of its stderr collected by a thread (joined for the whole text).
fn tail_until_stderr(args: &[&str], what: &str) -> (std::process::Child, std::thread::JoinHandle<String>) {
    let mut child = Command::new(TAIL).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        if err.read_line(&mut l).unwrap() == 0 {
            panic!("the tail ended before printing {what:?}: {seen}");
        }
        seen.push_str(&l);
        if l.contains(what) {
            break;
        }
    }
    let rest = std::thread::spawn(move || {
        let mut s = seen;
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    (child, rest)
}

/// Bytes of the over-long line the long-line tests write before its newline: past the cap.
const LONG_LINE_PART: usize = disagg::dataplane::channel::MAX_LINE_BYTES + 2000;

/// `d/ch`, a single-file channel: ref `x0`, then the first [`LONG_LINE_PART`] bytes of a line.
fn single_file_ending_in_a_long_line(d: &Path) -> (PathBuf, PathBuf) {
    let ch = d.join("ch");
    fs::create_dir_all(&ch).unwrap();
    let refs = ch.join("refs.jsonl");
    fs::write(&refs, format!("{}\n{}", sample_ref("x0", None), "x".repeat(LONG_LINE_PART))).unwrap();
    (ch, refs)
}

/// `d/ch2`, producer `q`'s segment: ref `c-0`, then the first [`LONG_LINE_PART`] bytes of a line.
fn segment_ending_in_a_long_line(d: &Path) -> (PathBuf, PathBuf) {
    let ch2 = d.join("ch2");
    ok(&run(PUBLISH, &[p(&ch2), "--producer", "q"], &refs_text("c", 1)));
    let seg = only_segment(&ch2, "q");
    fs::OpenOptions::new().append(true).open(&seg).unwrap().write_all("x".repeat(LONG_LINE_PART).as_bytes()).unwrap();
    (ch2, seg)
}

/// A line longer than the line cap whose newline comes in a later read (here: written after
/// the tail skipped the first part) is one corrupt line, counted once; in the single-file
/// layout it also takes one line index (one seq, acknowledged once). Before, the rest of it
/// was read as a line of its own and counted corrupt again (`"corrupt":2`).
#[test]
fn an_over_long_line_split_across_reads_is_counted_once() {
    let d = temp_dir("long-split");
    // Single file.
    let (ch, refs) = single_file_ending_in_a_long_line(&d);
    let (child, err) = tail_until_stderr(&[p(&ch), "--cursor", "c", "--follow", "--json", "--idle-timeout", "60"], "longer than");
    fs::OpenOptions::new().append(true).open(&refs).unwrap().write_all(format!("yyyy\n{}\n", sample_ref("x2", None)).as_bytes()).unwrap();
    fs::write(ch.join(".closed"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = err.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let ids: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(|l| SampleRef::parse(l.as_bytes()).unwrap().sample_id).collect();
    assert_eq!(ids, ["x0", "x2"]);
    assert!(err.contains("\"corrupt\":1,"), "{err}");
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join(".cursor-c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["refs.jsonl"].next_seq, c.producers["refs.jsonl"].consumed), (3, 3));
    assert_eq!(fs::read_to_string(ch.join(".consumed_count")).unwrap(), "3\n");

    // Segments: the seq it took is learnt from the next valid line.
    let (ch2, seg) = segment_ending_in_a_long_line(&d);
    let (child, err) = tail_until_stderr(&[p(&ch2), "--cursor", "c", "--follow", "--json", "--idle-timeout", "60"], "longer than");
    let next = SampleRef::parse(sample_ref("c-2", None).to_string().as_bytes()).unwrap();
    let line = channel::encode_line(&next, "q", 2);
    fs::OpenOptions::new().append(true).open(&seg).unwrap().write_all(format!("yyyy\n{line}\n").as_bytes()).unwrap();
    fs::write(ch2.join("producers/q/closed"), "{\"published\":3}\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let err = err.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{err}");
    let ids: Vec<String> = parse_out(&String::from_utf8(out.stdout).unwrap()).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["c-0", "c-2"]);
    assert!(err.contains("\"corrupt\":1,"), "{err}");
    let c: Cursor = serde_json::from_slice(&fs::read(ch2.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["q"].next_seq, c.producers["q"].consumed), (3, 3));
}

/// Waits until the cursor file at `path` holds `delivered` = `n`.
fn wait_for_cursor_delivered(path: &Path, n: u64) {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(b) = fs::read(path) {
            if serde_json::from_slice::<Cursor>(&b).is_ok_and(|c| c.delivered == n) {
                return;
            }
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "{} never showed {n} delivered", path.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A tail killed while it is skipping an over-long line resumes at the start of that line: the
/// cursor never points inside one. Before, it committed the offset it had skipped to, and the
/// restarted tail read what was appended to the line (here a valid ref, glued to it) as a line
/// of its own and delivered it.
#[test]
fn a_cursor_committed_inside_an_over_long_line_resumes_at_its_start() {
    let d = temp_dir("long-cursor");
    // Single file.
    let (ch, refs) = single_file_ending_in_a_long_line(&d);
    let mut child = Command::new(TAIL).args([p(&ch), "--cursor", "c", "--follow"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_cursor_delivered(&ch.join(".cursor-c.json"), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join(".cursor-c.json")).unwrap()).unwrap();
    assert_eq!(c.producers["refs.jsonl"].offset, sample_ref("x0", None).to_string().len() as u64 + 1, "the cursor is at the start of the long line");
    fs::OpenOptions::new().append(true).open(&refs).unwrap().write_all(format!("{}\n{}\n", sample_ref("x1", None), sample_ref("x2", None)).as_bytes()).unwrap();
    fs::write(ch.join(".closed"), "").unwrap();
    let o = run(TAIL, &[p(&ch), "--cursor", "c", "--follow", "--json"], "");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(0), "{err}");
    let ids: Vec<String> = String::from_utf8(o.stdout).unwrap().lines().map(|l| SampleRef::parse(l.as_bytes()).unwrap().sample_id).collect();
    assert_eq!(ids, ["x2"], "x1 is the end of the over-long line, not a ref");
    assert!(err.contains("\"corrupt\":1,"), "{err}");
    let c: Cursor = serde_json::from_slice(&fs::read(ch.join(".cursor-c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["refs.jsonl"].next_seq, c.producers["refs.jsonl"].consumed), (3, 3));
    assert_eq!(fs::read_to_string(ch.join(".consumed_count")).unwrap(), "3\n");

    // Segments.
    let (ch2, seg) = segment_ending_in_a_long_line(&d);
    let line0_len = fs::metadata(&seg).unwrap().len() - LONG_LINE_PART as u64;
    let mut child = Command::new(TAIL).args([p(&ch2), "--cursor", "c", "--follow"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_cursor_delivered(&ch2.join("cursors/c.json"), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let c: Cursor = serde_json::from_slice(&fs::read(ch2.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!(c.producers["q"].offset, line0_len, "the cursor is at the start of the long line");
    let line = |id: &str, seq: u64| channel::encode_line(&SampleRef::parse(sample_ref(id, None).to_string().as_bytes()).unwrap(), "q", seq);
    fs::OpenOptions::new().append(true).open(&seg).unwrap().write_all(format!("{}\n{}\n", line("c-1", 1), line("c-2", 2)).as_bytes()).unwrap();
    fs::write(ch2.join("producers/q/closed"), "{\"published\":3}\n").unwrap();
    let o = run(TAIL, &[p(&ch2), "--cursor", "c", "--follow", "--json"], "");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(0), "{err}");
    let ids: Vec<String> = parse_out(&String::from_utf8(o.stdout).unwrap()).into_iter().map(|l| l.2).collect();
    assert_eq!(ids, ["c-2"], "c-1 is the end of the over-long line, not a ref");
    assert!(err.contains("\"corrupt\":1,"), "{err}");
    let c: Cursor = serde_json::from_slice(&fs::read(ch2.join("cursors/c.json")).unwrap()).unwrap();
    assert_eq!((c.producers["q"].next_seq, c.producers["q"].consumed), (3, 3));
}

/// Files whose sample ids collide: every one after the first (in sorted order) is skipped
/// with a reason naming it and the first file, which keeps the id. Before, the third named the
/// second (the previous duplicate, itself skipped) as the file the id came from.
#[test]
fn a_duplicate_sample_id_names_the_file_and_the_first_with_it() {
    let d = temp_dir("ingest-dup");
    let input = d.join("in");
    fs::create_dir_all(&input).unwrap();
    fs::copy(GOOD_CKPT, input.join("a.ckpt")).unwrap();
    fs::copy(GOOD_CKPT, input.join("a.ckpt.gz")).unwrap();
    fs::copy(GOOD_SAFETENSORS, input.join("a.safetensors")).unwrap();
    let store = d.join("store");
    let o = run(INGEST, &[p(&input), "--store", p(&store), "--manifest", p(&d.join("refs.json")), "--json"], "");
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!((s["ingested"].as_u64(), s["invalid"].as_u64()), (Some(1), Some(2)));
    let reasons: BTreeMap<String, String> = s["invalid_files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["file"].as_str().unwrap().rsplit('/').next().unwrap().to_string(), f["reason"].as_str().unwrap().to_string()))
        .collect();
    for dup in ["a.ckpt.gz", "a.safetensors"] {
        assert_eq!(reasons[dup], format!("sample id \"a\" of {dup} is also derived from a.ckpt, the first valid file with it, which keeps it"));
    }
    // --strict: fatal (exit 3), naming the file and the first one.
    let o = run(INGEST, &[p(&input), "--store", p(&d.join("store2")), "--strict"], "");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains(p(&input.join("a.ckpt.gz"))) && err.contains("also derived from a.ckpt,"), "{err}");
}

/// An invalid file does not take its sample id from a valid file after it: the first file of
/// the id that ingests keeps it. Before, the first in sorted order kept it whatever became of
/// it, and the id got no sample at all.
#[test]
fn an_invalid_file_does_not_take_the_sample_id_of_a_valid_one() {
    let d = temp_dir("ingest-dup-invalid");
    let input = d.join("in");
    fs::create_dir_all(&input).unwrap();
    fs::write(input.join("a.ckpt"), b"not a torch checkpoint").unwrap();
    fs::write(input.join("a.ckpt.gz"), b"not gzip either").unwrap();
    fs::copy(GOOD_SAFETENSORS, input.join("a.safetensors")).unwrap();
    let store = d.join("store");
    let manifest = d.join("refs.json");
    let o = run(INGEST, &[p(&input), "--store", p(&store), "--manifest", p(&manifest), "--json"], "");
    let s: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(s["ingested"].as_u64(), Some(1), "{s}");
    let reasons: Vec<String> = s["invalid_files"].as_array().unwrap().iter().map(|f| format!("{} {}", f["file"], f["reason"])).collect();
    assert!(reasons.iter().all(|r| !r.contains("a.safetensors")), "a.safetensors keeps the id: {reasons:?}");
    for bad in ["a.ckpt\"", "a.ckpt.gz\""] {
        let r = reasons.iter().find(|r| r.contains(bad)).unwrap_or_else(|| panic!("{bad} reported: {reasons:?}"));
        assert!(!r.contains("also derived"), "{bad} is invalid for its own bytes: {r}");
    }
    let m: Manifest = serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    let ids: Vec<&str> = m.refs.iter().map(|r| r.sample_id.as_str()).collect();
    assert_eq!(ids, ["a"]);
}

/// A resumed ingest publish that stores a sample again (its source changed since the killed
/// run published it: a new generation) publishes its new ref, and not again the refs of the
/// samples it found intact. Before, refs were matched by sample id alone: the new generation
/// was never published, and the channel kept only the ref to the old object, which the new
/// put had deleted.
#[cfg(feature = "failpoints")]
#[test]
fn ingest_publish_resumed_republishes_a_sample_stored_again() {
    let d = temp_dir("ingest-restored");
    let input = d.join("in");
    fs::create_dir_all(&input).unwrap();
    for f in ["a", "b"] {
        fs::copy(GOOD_CKPT, input.join(format!("{f}.ckpt"))).unwrap();
    }
    let (store, ch) = (d.join("store"), d.join("ch"));
    let args = [p(&input), "--store", p(&store), "--publish", p(&ch), "--json"];
    // Dies right after the refs are written (not closed).
    let o = Command::new(INGEST).args(args).env("DISAGG_FAILPOINT", "publish.after_write").output().unwrap();
    assert_eq!(o.status.code(), None, "killed: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(ref_ids_published(&ch), names(&["a", "b"]));
    // a's source changes (a new mtime is enough for the ingest to store it again).
    let a = fs::OpenOptions::new().write(true).open(input.join("a.ckpt")).unwrap();
    a.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000)).unwrap();
    drop(a);
    let s: Value = serde_json::from_str(&ok(&run(INGEST, &args, ""))).unwrap();
    assert_eq!((s["ingested"].as_u64(), s["skipped_intact"].as_u64(), s["published"].as_u64()), (Some(1), Some(1), Some(3)));
    let lines = ok(&run(TAIL, &[p(&ch), "--follow"], ""));
    let got: Vec<(String, u64)> = lines
        .lines()
        .map(|l| {
            let r = unstamped(l);
            (r.sample_id, r.metadata["generation"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(got, [("a".to_string(), 1), ("b".to_string(), 1), ("a".to_string(), 2)]);
    // The last ref of a names the object the store has now.
    let last = unstamped(lines.lines().last().unwrap());
    let key = last.metadata["store_key"].as_str().unwrap();
    assert!(store.join(key).exists(), "{key}");
    // Finished: a rerun has nothing to add.
    ok(&run(INGEST, &args, ""));
    assert_eq!(ref_ids(None, &ch), names(&["a", "a", "b"]));
}

/// An ingest into a closed stream whose source changed since its sample was stored and
/// published is refused (exit 5, naming the stream and the file) before anything in the store
/// changes. Before, the sample was stored again first (a new generation, which deleted the old
/// object) and only then refused: the closed stream's ref named an object that was gone.
#[test]
fn ingest_into_a_closed_stream_refuses_a_changed_file_before_storing_it() {
    let d = temp_dir("ingest-closed-changed");
    for mode in ["copy", "move"] {
        let d = d.join(mode);
        let input = d.join("in");
        fs::create_dir_all(&input).unwrap();
        for f in ["a", "b"] {
            fs::copy(GOOD_CKPT, input.join(format!("{f}.ckpt"))).unwrap();
        }
        fs::copy(GOOD_SAFETENSORS, input.join("c.safetensors")).unwrap();
        let (store, ch) = (d.join("store"), d.join("ch"));
        let args = [p(&input), "--store", p(&store), "--publish", p(&ch), "--mode", "copy"];
        ok(&run(INGEST, &args, ""));
        assert!(ch.join("producers/ingest/closed").exists());
        let keys: Vec<String> = ok(&run(TAIL, &[p(&ch), "--follow"], "")).lines().map(|l| unstamped(l).metadata["store_key"].as_str().unwrap().to_string()).collect();
        assert_eq!(keys.len(), 3);
        let before = count_files(&store, ".safetensors");
        // a's and c's sources change (a new mtime is enough for the ingest to store them again).
        for f in ["a.ckpt", "c.safetensors"] {
            let file = fs::OpenOptions::new().write(true).open(input.join(f)).unwrap();
            file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000)).unwrap();
        }
        let mut args = args.to_vec();
        *args.last_mut().unwrap() = mode;
        let o = run(INGEST, &args, "");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(5), "{err}");
        // Nothing in the store changed: every object the closed stream names is still there,
        // and no new generation was made.
        for key in &keys {
            assert!(store.join(key).exists(), "{key} named by the closed stream is gone: {err}");
        }
        assert_eq!(count_files(&store, ".safetensors"), before);
        // The error names the stream and the file.
        assert!(err.contains("producer ingest") && err.contains("closed"), "{err}");
        assert!(err.contains(p(&input.join("a.ckpt"))), "{err}");
        assert_eq!(fs::read_to_string(store.join("objects").join(&keys[0][8..10]).join("a/generation")).unwrap(), "1\n");
        // Nothing was moved either, and the stream still reads the same.
        assert_eq!(count_files(&input, ".ckpt") + count_files(&input, ".safetensors"), 3);
        assert_eq!(ref_ids(None, &ch), names(&["a", "b", "c"]));
    }
}
