//! Integration tests of the weight plane: `delta-diff`, `pointer-advance` and `delta-apply`
//! driven as real binaries on fixture checkpoints written by hand (tests/common).
//!
//! Exit codes under test: 0 ok, 2 usage, 3 bad input, 4 incompatible, 5 conflict, 6 not found,
//! 7 checksum, 8 hook, 9 locked, 10 io.

mod common;

use common::*;
use serde_json::{json, Value};
use std::fs::{self, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

const UP0: &str = "model.layers.0.mlp.up_proj.weight";
const EMBED: &str = "model.embed_tokens.weight";
const NORM0: &str = "model.layers.0.input_layernorm.weight";

// ================================================================================================
// helpers
// ================================================================================================

fn expected_checksum(alg: &str, data: &[u8]) -> String {
    match alg {
        "xxh3-128" => format!("{:032x}", xxhash_rust::xxh3::xxh3_128(data)),
        "blake3" => blake3::hash(data).to_hex().to_string(),
        "adler32" => format!("{:08x}", adler32(data)),
        other => panic!("unknown checksum {other}"),
    }
}

fn changed_positions(old: &[u8], new: &[u8]) -> Vec<usize> {
    old.iter().zip(new).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect()
}

fn total_bytes(m: &Model) -> u64 {
    m.iter().map(|t| t.data.len() as u64).sum()
}

fn dir_size(d: &Path) -> u64 {
    fs::read_dir(d).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// Check a published delta against the spec from first principles (decode every payload,
/// recompute every checksum). Returns (changed bytes, bytes of the version dir).
#[track_caller]
fn check_delta(src: &Path, v: u64, base: u64, old: &Model, new: &Model, enc: &str, ck: &str) -> (u64, u64) {
    let d = vdir(src, v);
    let index = read_json(&d.join(INDEX));
    assert_eq!(
        index["metadata"],
        json!({"version": format!("{v:06}"), "base_version": format!("{base:06}"), "delta_encoding": enc,
               "compression_format": "zstd", "checksum_format": ck,
               "base_sample": content_sample(old), "sample": content_sample(new)}),
        "index metadata of v{v}"
    );
    let wm = index["weight_map"].as_object().expect("weight_map object");
    let mut want: Vec<&str> = new.iter().zip(old).filter(|(n, o)| n.data != o.data).map(|(n, _)| n.name.as_str()).collect();
    want.sort();
    let mut got: Vec<&str> = wm.keys().map(String::as_str).collect();
    got.sort();
    assert_eq!(got, want, "weight_map lists exactly the changed tensors");

    // Data files: model-{i:05}-of-{n:05}.safetensors, i from 0, all named by the index and nothing else.
    let mut files: Vec<String> = wm.values().map(|f| f.as_str().unwrap().to_string()).collect();
    files.sort();
    files.dedup();
    let n = files.len();
    let expect_files: Vec<String> = (0..n).map(|i| format!("model-{i:05}-of-{n:05}.safetensors")).collect();
    assert_eq!(files, expect_files, "data file names");
    let mut on_disk = expect_files.clone();
    on_disk.push(INDEX.to_string());
    on_disk.sort();
    assert_eq!(file_names(&d), on_disk, "files in {}", d.display());

    let mut changed = 0u64;
    for f in &files {
        let st = StFile::read(&d.join(f));
        let mut names = st.names();
        names.sort();
        let mut mine: Vec<String> = wm.iter().filter(|(_, file)| *file == f.as_str()).map(|(n, _)| n.clone()).collect();
        mine.sort();
        assert_eq!(names, mine, "{f} holds the tensors the index puts there");
        let meta = st.metadata();
        assert_eq!(meta.len(), mine.len(), "{f}: one checksum per tensor in __metadata__");
        // §4.2 layout: payloads in order of decreasing tensor size; the header JSON padded with
        // spaces, beyond 8-byte alignment by at most max(4096, payload / 256) bytes.
        let mut by_offset = st.names();
        by_offset.sort_by_key(|n| st.range(n).start);
        let sizes: Vec<usize> = by_offset.iter().map(|n| new.iter().find(|t| &t.name == n).unwrap().data.len()).collect();
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{f}: payloads by decreasing tensor size: {sizes:?}");
        let json_len = st.bytes[8..st.data_start].iter().rposition(|&b| b != b' ').unwrap() + 1;
        let payload = (st.bytes.len() - st.data_start) as u64;
        let slack = (st.data_start - 8 - json_len.next_multiple_of(8)) as u64;
        assert_eq!(st.data_start % 8, 0, "{f}: data 8-byte aligned");
        assert!(slack <= 4096.max(payload / 256), "{f}: {slack} bytes of header padding");
        for name in &mine {
            let o = &old.iter().find(|t| &t.name == name).unwrap().data;
            let w = &new.iter().find(|t| &t.name == name).unwrap().data;
            let frame = st.data(name);
            assert_eq!(st.dtype(name), "U8");
            assert_eq!(st.shape(name), vec![frame.len()], "{name}: 1-D U8 of the payload length");
            let raw = zstd::stream::decode_all(frame).expect("payload is a zstd frame");
            assert_eq!(zstd::zstd_safe::get_frame_content_size(frame).unwrap(), Some(raw.len() as u64), "{name}: content size in frame header");
            let pos = changed_positions(o, w);
            match enc {
                "xor" => {
                    let x: Vec<u8> = o.iter().zip(w).map(|(a, b)| a ^ b).collect();
                    assert!(raw == x, "{name}: xor payload is new ^ old over the whole tensor");
                }
                "overwrite" => {
                    let count = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
                    assert_eq!(count, pos.len(), "{name}: overwrite count");
                    assert_eq!(raw.len(), 4 + 5 * count);
                    let p: Vec<usize> = raw[4..4 + 4 * count].chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize).collect();
                    assert_eq!(p, pos, "{name}: positions are the changed bytes, ascending");
                    let vals: Vec<u8> = pos.iter().map(|&i| w[i]).collect();
                    assert_eq!(&raw[4 + 4 * count..], &vals[..], "{name}: values are new[pos]");
                }
                _ => unreachable!(),
            }
            assert_eq!(meta[name].as_str().unwrap(), expected_checksum(ck, w), "{name}: {ck} checksum of the new bytes");
            changed += pos.len() as u64;
        }
    }
    (changed, dir_size(&d))
}

fn latest(src: &Path) -> Option<String> {
    fs::read_to_string(src.join("latest")).ok()
}

/// `delta-apply --local L [--base B] --source SRC --target T EXTRA..`.
fn apply(local: &Path, base: Option<&Path>, src: &Path, target: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--local", local.s()];
    if let Some(b) = base {
        args.extend(["--base", b.s()]);
    }
    args.extend(["--source", src.s(), "--target", target]);
    args.extend_from_slice(extra);
    run(APPLY, &args)
}

fn applied(r: &Value) -> Vec<u64> {
    r["applied"].as_array().expect("applied array").iter().map(|v| v.as_u64().unwrap()).collect()
}

/// Each model file of LOCAL is byte-identical to the one in `want` (same layout), plus tensors.
#[track_caller]
fn assert_local_is(local: &Path, want_dir: &Path, want: &Model) {
    for n in file_names(want_dir) {
        if n.ends_with(".safetensors") {
            assert!(fs::read(local.join(&n)).unwrap() == fs::read(want_dir.join(&n)).unwrap(), "{n} of {} differs from {}", local.display(), want_dir.display());
        }
    }
    assert_holds(local, want);
}

fn model_without(m: &Model, name: &str) -> Model {
    m.iter().filter(|t| t.name != name).cloned().collect()
}

// ================================================================================================
// delta-diff
// ================================================================================================

#[test]
fn diff_xor_single_file_matches_spec_and_json() {
    let t = TestDir::new("diff_xor");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    let r = publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    let (changed, wire) = check_delta(&src, 1, 0, &c.models[0], &c.models[1], "xor", "xxh3-128");

    let wm = read_json(&vdir(&src, 1).join(INDEX))["weight_map"].clone();
    for tn in &c.models[1] {
        assert_eq!(wm.get(&tn.name).is_some(), changes_in_step(&tn.name), "{} in weight_map", tn.name);
    }
    let total = total_bytes(&c.models[1]);
    assert_eq!(r["version"], 1);
    assert_eq!(r["base_version"], 0, "base defaults to N-1");
    assert_eq!(r["encoding"], "xor");
    assert_eq!(r["checksum"], "xxh3-128");
    assert_eq!(r["tensors_total"], 7);
    assert_eq!(r["tensors_changed"], 4, "embedding, two mlp matrices, counter");
    assert_eq!(r["total_bytes"], total);
    assert_eq!(r["changed_bytes"], changed);
    let density = r["density"].as_f64().unwrap();
    assert!((density - changed as f64 / total as f64).abs() < 1e-12, "density {density} != {changed}/{total}");
    assert!(density > 0.005 && density < 0.05, "fixture changes ~2% of some tensors: {density}");
    assert_eq!(r["wire_bytes"], wire, "wire_bytes = sum of the version dir's file sizes");
    assert!(r["seconds"].as_f64().unwrap() >= 0.0);
    assert_no_temp_files(&src);
}

#[test]
fn diff_overwrite_matches_spec() {
    let t = TestDir::new("diff_overwrite");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    let r = publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--encoding", "overwrite"]);
    let (changed, wire) = check_delta(&src, 1, 0, &c.models[0], &c.models[1], "overwrite", "xxh3-128");
    assert_eq!(r["encoding"], "overwrite");
    assert_eq!(r["changed_bytes"], changed);
    assert_eq!(r["wire_bytes"], wire);
    // The counter tensor changes in its low byte only: exactly one position.
    let counter = StFile::read(&delta_file_of(&src, 1, "model.step_counter"));
    let raw = zstd::stream::decode_all(counter.data("model.step_counter")).unwrap();
    assert_eq!(&raw[..8], &[1, 0, 0, 0, 0, 0, 0, 0][..], "count 1, position 0");
}

#[test]
fn diff_every_checksum_alg() {
    // The hand-written adler32 agrees with zlib's published values.
    assert_eq!(adler32(b"abc"), 0x024d_0127);
    assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    let t = TestDir::new("diff_checksums");
    let c = make_chain(&t.path, 1, 1);
    for (ck, enc) in [("xxh3-128", "overwrite"), ("blake3", "xor"), ("adler32", "xor"), ("adler32", "overwrite")] {
        let src = t.join(format!("src-{ck}-{enc}"));
        let r = publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--checksum", ck, "--encoding", enc]);
        assert_eq!(r["checksum"], ck);
        check_delta(&src, 1, 0, &c.models[0], &c.models[1], enc, ck);
    }
    // One value spelled out: the adler32 text of the embedding's new bytes.
    let src = t.join("src-adler32-xor");
    let st = StFile::read(&delta_file_of(&src, 1, EMBED));
    let want = format!("{:08x}", adler32(&c.models[1][0].data));
    assert_eq!(st.metadata()[EMBED], json!(want));
}

#[test]
fn diff_base_version_option() {
    let t = TestDir::new("diff_base_version");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    let r = publish(&c.ckpts[0], &c.ckpts[2], &src, 5, &["--base-version", "2"]);
    assert_eq!(r["version"], 5);
    assert_eq!(r["base_version"], 2);
    check_delta(&src, 5, 2, &c.models[0], &c.models[2], "xor", "xxh3-128");
    assert_eq!(file_names(&src), vec!["weight_v000005"]);
}

#[test]
fn diff_full_version_is_a_loadable_checkpoint() {
    let t = TestDir::new("diff_full");
    let c = make_chain(&t.path, 1, 3);
    let src = t.join("src");
    let r = publish(&c.ckpts[0], &c.ckpts[1], &src, 3, &["--full"]);
    let d = vdir(&src, 3);
    let new = &c.ckpts[1];
    assert_eq!(file_names(&d), file_names(new), "shards, index and config files");
    for n in file_names(new) {
        if n != INDEX {
            assert!(fs::read(d.join(&n)).unwrap() == fs::read(new.join(&n)).unwrap(), "{n} copied byte for byte");
        }
    }
    let index = read_json(&d.join(INDEX));
    assert_eq!(index["metadata"]["version"], "000003");
    assert_eq!(index["metadata"]["total_size"], total_bytes(&c.models[1]));
    assert!(index["metadata"].get("delta_encoding").is_none(), "a full version has no delta_encoding");
    assert_eq!(index["weight_map"], read_json(&new.join(INDEX))["weight_map"]);
    assert_holds(&d, &c.models[1]);
    assert_eq!(r["kind"], "full");
    assert_eq!(r["tensors_total"], 7);
    assert_eq!(r["wire_bytes"], dir_size(&d));

    // NEW given as a lone .safetensors file becomes model.safetensors; OLD is not read.
    let single = t.join("single");
    write_checkpoint(&single, &c.models[1], 1);
    publish(&t.join("no-such-old"), &single.join(SINGLE), &src, 4, &["--full"]);
    let d4 = vdir(&src, 4);
    assert_eq!(file_names(&d4), vec![SINGLE.to_string(), INDEX.to_string()]);
    let idx = read_json(&d4.join(INDEX));
    assert_eq!(idx["metadata"]["version"], "000004");
    assert!(idx["weight_map"].as_object().unwrap().values().all(|f| f == SINGLE));
    assert_eq!(idx["weight_map"].as_object().unwrap().len(), 7);
    assert_holds(&d4, &c.models[1]);
}

#[test]
fn diff_post_write_hook() {
    let t = TestDir::new("diff_hook");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    let marker = t.join("marker");
    let hook = format!("echo \"$DISAGG_VERSION\" > {m} && test -f \"$DISAGG_VERSION_DIR/{INDEX}\" && echo indexed >> {m}", m = marker.s());
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--post-write-hook", &hook]);
    assert_eq!(fs::read_to_string(&marker).unwrap(), "1\nindexed\n", "hook ran after the index was written, with DISAGG_VERSION");

    let marker2 = t.join("marker2");
    let failing = format!("touch {} && exit 3", marker2.s());
    run(DIFF, [c.ckpts[1].s(), c.ckpts[2].s(), "--publish", src.s(), "--version", "2", "--post-write-hook", &failing]).code(8).stderr_contains("hook").stderr_contains(&failing);
    assert!(marker2.exists(), "the failing hook did run");
}

#[test]
fn diff_replace_incomplete() {
    let t = TestDir::new("diff_replace_incomplete");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    let d = vdir(&src, 1);
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("model-00000-of-00001.safetensors"), b"partial").unwrap();
    let args = [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "1"];
    run(DIFF, args).code(5).stderr_contains("incomplete").stderr_contains("--replace-incomplete").stderr_contains(d.s());
    assert_eq!(fs::read(d.join("model-00000-of-00001.safetensors")).unwrap(), b"partial", "refusal leaves the dir alone");
    assert!(!d.join(INDEX).exists());

    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--replace-incomplete"]);
    check_delta(&src, 1, 0, &c.models[0], &c.models[1], "xor", "xxh3-128");

    // A complete version is never replaced, flag or not.
    let before = snapshot(&src);
    run(DIFF, [c.ckpts[0].s(), c.ckpts[0].s(), "--publish", src.s(), "--version", "1", "--replace-incomplete"]).code(5).stderr_contains("already published");
    assert!(snapshot(&src) == before);
}

#[test]
fn diff_refuses_existing_version() {
    let t = TestDir::new("diff_existing");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    let before = snapshot(&src);
    run(DIFF, [c.ckpts[1].s(), c.ckpts[2].s(), "--publish", src.s(), "--version", "1"]).code(5).stderr_contains("weight_v000001");
    assert!(snapshot(&src) == before, "existing version untouched");
    assert_no_temp_files(&src);
}

#[test]
fn diff_concurrent_publishers_of_one_version() {
    let t = TestDir::new("diff_race");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    let args = [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "1"];
    let children: Vec<_> = (0..3).map(|_| spawn(DIFF, args)).collect();
    let codes: Vec<i32> = children.into_iter().map(|(ch, _)| ch.wait_with_output().unwrap().status.code().unwrap()).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 0).count(), 1, "exactly one publisher wins: {codes:?}");
    assert!(codes.iter().all(|&c| c == 0 || c == 5), "the others get a conflict: {codes:?}");
    check_delta(&src, 1, 0, &c.models[0], &c.models[1], "xor", "xxh3-128");
    assert_no_temp_files(&src);
}

#[test]
fn diff_identical_checkpoints_give_an_empty_delta() {
    let t = TestDir::new("diff_empty");
    let c = make_chain(&t.path, 0, 1);
    let src = t.join("src");
    let r = publish(&c.ckpts[0], &c.ckpts[0], &src, 1, &[]);
    let d = vdir(&src, 1);
    assert_eq!(file_names(&d), vec![INDEX], "no data files");
    assert_eq!(read_json(&d.join(INDEX))["weight_map"], json!({}));
    assert_eq!(r["tensors_changed"], 0);
    assert_eq!(r["changed_bytes"], 0);
    assert_eq!(r["density"].as_f64(), Some(0.0));
    assert_eq!(r["wire_bytes"], dir_size(&d));
    // Publishable and applicable.
    run(ADVANCE, [src.s(), "1"]).ok();
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "latest", &[]).ok();
    assert_local_is(&local, &c.ckpts[0], &c.models[0]);
    assert_eq!(state_version(&local), "000001");
}

/// A delta carries tensors only: a config or tokenizer that changed between OLD and NEW never
/// reaches the hosts that apply it. The delta is still published (trainers' directories hold
/// per-step files), but the tool says which files differ, on stderr and in --json.
#[test]
fn diff_warns_about_ride_along_files_that_a_delta_does_not_carry() {
    let t = TestDir::new("diff_ride_along");
    let c = make_chain(&t.path, 1, 2);
    let src = t.join("src");
    let diff = |v: &str, old: &Path, new: &Path, extra: &[&str]| {
        let mut args = vec![old.s(), new.s(), "--publish", src.s(), "--version", v, "--json"];
        args.extend_from_slice(extra);
        let r = run(DIFF, &args);
        r.ok();
        (r.json(), r.stderr())
    };
    // Same config and tokenizer on both sides: nothing to say.
    let (r, err) = diff("1", &c.ckpts[0], &c.ckpts[1], &[]);
    assert_eq!(r["ride_along_changed"], json!([]));
    assert_eq!(r["warnings"], json!([]));
    assert!(!err.contains("warning"), "{err}");

    // NEW's config changed (same length, one byte), a chat template appeared, and the
    // tokenizer is gone.
    let new = t.join("new");
    write_checkpoint(&new, &c.models[1], 2);
    let config = fs::read(new.join("config.json")).unwrap();
    let mut changed = config.clone();
    let at = changed.iter().rposition(|b| b.is_ascii_digit() || b.is_ascii_lowercase()).unwrap();
    changed[at] = if changed[at] == b'x' { b'y' } else { b'x' };
    fs::write(new.join("config.json"), &changed).unwrap();
    fs::write(new.join("chat_template.jinja"), "{{ messages }}").unwrap();
    fs::remove_file(new.join("tokenizer.json")).unwrap();
    // (Base 0: version 1 holds other weights than OLD, and a delta against OLD as version 1 is refused.)
    let (r, err) = diff("2", &c.ckpts[0], &new, &["--base-version", "0"]);
    assert_eq!(r["kind"], "delta", "the delta is still published");
    assert_eq!(r["ride_along_changed"], json!(["chat_template.jinja", "config.json", "tokenizer.json"]));
    let w = r["warnings"].as_array().unwrap();
    assert_eq!(w.len(), 1, "{w:?}");
    let w = w[0].as_str().unwrap();
    for needle in ["chat_template.jinja (only in NEW)", "config.json", "tokenizer.json (only in OLD)", "--full"] {
        assert!(w.contains(needle), "{needle:?} in {w:?}");
    }
    assert!(err.contains(&format!("delta-diff: warning: {w}")), "{err}");
    assert_eq!(file_names(&vdir(&src, 2)).iter().filter(|n| !n.ends_with(".safetensors") && *n != INDEX).count(), 0, "a delta holds no config");

    // A lone file on either side has no ride-along files to compare; a full version carries them.
    let (r, _) = diff("3", &c.ckpts[0].join("model-00001-of-00002.safetensors"), &new.join("model-00001-of-00002.safetensors"), &["--base-version", "0"]);
    assert_eq!(r["ride_along_changed"], json!([]));
    let (r, err) = diff("4", &c.ckpts[0], &new, &["--full"]);
    assert_eq!((r["ride_along_changed"].clone(), r["warnings"].clone()), (json!([]), json!([])));
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(fs::read(vdir(&src, 4).join("config.json")).unwrap(), changed);
}

#[test]
fn diff_refuses_incompatible_checkpoints() {
    let t = TestDir::new("diff_incompatible");
    let c = make_chain(&t.path, 0, 1);
    let m = &c.models[0];
    let mut extra = m.clone();
    extra.push(tensor("extra.bias", "F32", &[8], &mut Rng::new(1)));
    let mut shape = m.clone();
    shape[1].shape = vec![64, 128]; // same bytes, transposed shape
    let mut dtype = m.clone();
    dtype[2].dtype = "I32".into(); // same bytes, other dtype
    let cases: [(&str, Model, &str); 4] =
        [("missing", model_without(m, "lm_head.weight"), "lm_head.weight"), ("extra", extra, "extra.bias"), ("shape", shape, UP0), ("dtype", dtype, NORM0)];
    for (what, model, name) in cases {
        let new = t.join(what);
        write_checkpoint(&new, &model, 1);
        let src = t.join(format!("src-{what}"));
        let r = run(DIFF, [c.ckpts[0].s(), new.s(), "--publish", src.s(), "--version", "1"]);
        r.code(4).stderr_contains(name);
        assert!(!vdir(&src, 1).exists(), "{what}: no version dir after the refusal");
    }
}

#[test]
fn diff_refuses_malformed_inputs() {
    let t = TestDir::new("diff_malformed");
    let c = make_chain(&t.path, 1, 3);
    let good = fs::read(c.ckpts[1].join("model-00001-of-00003.safetensors")).unwrap();
    let mut huge_header = good.clone();
    huge_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("text", b"this is not a safetensors file at all\n".to_vec()),
        ("tiny", b"abc".to_vec()),
        ("truncated", good[..good.len() - 100].to_vec()),
        ("huge-header", huge_header),
    ];
    for (what, bytes) in cases {
        let new = t.join(what);
        write_checkpoint(&new, &c.models[1], 3);
        let bad = new.join("model-00001-of-00003.safetensors");
        fs::write(&bad, bytes).unwrap();
        let src = t.join(format!("src-{what}"));
        // As NEW, and as OLD.
        run(DIFF, [c.ckpts[0].s(), new.s(), "--publish", src.s(), "--version", "1"]).code(3).stderr_contains(bad.s());
        run(DIFF, [new.s(), c.ckpts[0].s(), "--publish", src.s(), "--version", "1"]).code(3).stderr_contains(bad.s());
        assert!(!vdir(&src, 1).exists(), "{what}: nothing published");
    }
    // An index naming a file outside the checkpoint.
    let new = t.join("escape");
    write_checkpoint(&new, &c.models[1], 3);
    let idx_path = new.join(INDEX);
    let mut idx = read_json(&idx_path);
    idx["weight_map"][EMBED] = json!("../x.safetensors");
    fs::write(&idx_path, serde_json::to_vec(&idx).unwrap()).unwrap();
    let src = t.join("src-escape");
    run(DIFF, [c.ckpts[0].s(), new.s(), "--publish", src.s(), "--version", "1"]).code(3).stderr_contains(idx_path.s()).stderr_contains("../x");
    assert!(!vdir(&src, 1).exists());
}

#[test]
fn diff_usage_and_not_found() {
    let t = TestDir::new("diff_usage");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    let (o, n) = (c.ckpts[0].s(), c.ckpts[1].s());
    let missing = t.join("missing");
    run(DIFF, [missing.s(), n, "--publish", src.s(), "--version", "1"]).code(6).stderr_contains(missing.s());
    run(DIFF, [o, missing.s(), "--publish", src.s(), "--version", "1"]).code(6).stderr_contains(missing.s());
    run(DIFF, [o, n, "--publish", src.s(), "--version", "0"]).code(2).stderr_contains("version 0");
    run(DIFF, [o, n, "--publish", src.s(), "--version", "3", "--base-version", "3"]).code(2).stderr_contains("--base-version");
    run(DIFF, [o, n, "--publish", src.s(), "--version", "3", "--base-version", "4"]).code(2);
    run(DIFF, [o, n, "--publish", src.s(), "--version", "1", "--encoding", "gzip"]).code(2);
    run(DIFF, [o, n, "--publish", src.s(), "--version", "1", "--checksum", "md5"]).code(2);
    run(DIFF, [o, n, "--publish", src.s()]).code(2);
    assert!(!src.exists() || list_versions(&src).is_empty(), "no version dir after any refusal");
}

fn list_versions(src: &Path) -> Vec<String> {
    file_names(src).into_iter().filter(|n| n.starts_with("weight_v")).collect()
}

#[test]
fn diff_splits_data_files_and_allows_different_sharding() {
    let t = TestDir::new("diff_split");
    let single = make_chain(&t.join("single"), 1, 1);
    let sharded = make_chain(&t.join("sharded"), 1, 3);
    let src = t.join("src");
    // OLD single-file, NEW sharded: sharding may differ. One tensor per data file.
    let r = publish(&single.ckpts[0], &sharded.ckpts[1], &src, 1, &["--max-file-bytes", "1"]);
    assert_eq!(r["files"], 4);
    check_delta(&src, 1, 0, &single.models[0], &sharded.models[1], "xor", "xxh3-128");
    assert_eq!(data_files(&src, 1).len(), 4, "one changed tensor per data file");
}

#[test]
fn diff_spills_payloads_past_its_memory_budget_and_publishes_the_same_bytes() {
    let t = TestDir::new("diff_spill");
    let c = make_chain(&t.path, 1, 2);
    for enc in ["xor", "overwrite"] {
        let (mem, spill) = (t.join(format!("mem-{enc}")), t.join(format!("spill-{enc}")));
        let r = publish(&c.ckpts[0], &c.ckpts[1], &mem, 1, &["--encoding", enc]);
        assert_eq!(r["payloads_spilled"], 0, "{enc}: the default budget holds a small model");
        // No memory for payloads at all: every changed tensor goes through a scratch file.
        let s = publish(&c.ckpts[0], &c.ckpts[1], &spill, 1, &["--encoding", enc, "--payload-memory", "0"]);
        assert_eq!(s["payloads_spilled"], s["tensors_changed"], "{enc}");
        assert!(s["tensors_changed"].as_u64().unwrap() > 1);
        check_delta(&spill, 1, 0, &c.models[0], &c.models[1], enc, "xxh3-128");
        for f in file_names(&vdir(&mem, 1)) {
            assert!(fs::read(vdir(&mem, 1).join(&f)).unwrap() == fs::read(vdir(&spill, 1).join(&f)).unwrap(), "{enc}: {f} differs when spilled");
        }
        let local = t.join(format!("local-{enc}"));
        apply(&local, Some(&c.ckpts[0]), &spill, "1", &[]).ok();
        assert_local_is(&local, &c.ckpts[1], &c.models[1]);
    }
}

/// Both ways of reading the inputs publish the same bytes; `auto` takes one of them and says
/// which; a full version reads nothing through them.
#[test]
fn input_read_modes_publish_the_same_bytes() {
    let t = TestDir::new("diff_input_read");
    let c = make_chain(&t.path, 1, 2);
    for enc in ["xor", "overwrite"] {
        let mut published = Vec::new();
        for mode in ["pread", "mmap", "auto"] {
            let src = t.join(format!("{enc}-{mode}"));
            let r = publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--encoding", enc, "--input-read", mode]);
            match mode {
                "auto" => assert!(r["input_read"] == "mmap" || r["input_read"] == "pread", "{r}"),
                m => assert_eq!(r["input_read"], m),
            }
            check_delta(&src, 1, 0, &c.models[0], &c.models[1], enc, "xxh3-128");
            published.push(snapshot(&vdir(&src, 1)));
        }
        assert!(published.windows(2).all(|w| w[0] == w[1]), "{enc}: the modes publish different bytes");
    }
    let r = publish(&c.ckpts[0], &c.ckpts[1], &t.join("full"), 1, &["--full", "--input-read", "mmap"]);
    assert!(r["input_read"].is_null());
    run(DIFF, [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", t.join("x").s(), "--version", "1", "--input-read", "mapped"]).code(2);
}

/// Start `bin args` with the failpoint spec `fp`, call `meanwhile` once it has had time to open
/// its inputs, and wait for it.
#[cfg(feature = "failpoints")]
fn run_while(bin: &str, args: &[&str], fp: &str, meanwhile: impl FnOnce()) -> std::process::Output {
    let child = std::process::Command::new(bin).args(args).env("DISAGG_FAILPOINT", fp).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    meanwhile();
    child.wait_with_output().unwrap()
}

/// A file that shrinks while a tool reads it (a trainer rewriting a checkpoint in place) is an
/// error naming the file with exit code 10 (io), through a map (SIGBUS, reported by the
/// handler) as through pread, and never a "Bus error" or a published version; for the apply,
/// the next run with the file whole converges.
#[cfg(feature = "failpoints")]
#[test]
fn a_file_truncated_while_it_is_read_is_an_io_error_naming_it() {
    let t = TestDir::new("truncated_input");
    let c = make_chain(&t.path, 2, 1);
    let new_file = c.ckpts[1].join("model.safetensors");
    let whole = fs::read(&new_file).unwrap();
    for mode in ["mmap", "pread"] {
        let src = t.join(format!("src-{mode}"));
        let out = run_while(DIFF, &[c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "1", "--input-read", mode], "diff.before_encode:sleep-1500", || {
            fs::OpenOptions::new().write(true).open(&new_file).unwrap().set_len(whole.len() as u64 / 3).unwrap()
        });
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(10), "{mode}: {err}");
        assert!(err.starts_with("delta-diff: error: ") && err.contains(new_file.s()) && err.contains("shrank while it was being read"), "{mode}: {err}");
        assert!(!vdir(&src, 1).join("model.safetensors.index.json").exists(), "{mode}: nothing published");
        fs::write(&new_file, &whole).unwrap();
    }
    // The apply maps the delta files it reads.
    let src = t.join("src");
    publish_chain(&c, &src);
    let delta = data_files(&src, 2)[0].clone();
    let published = fs::read(&delta).unwrap();
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    let out = run_while(
        APPLY,
        &["--local", local.s(), "--base", c.ckpts[0].s(), "--source", src.s(), "--target", "2", "--threads", "1"],
        "apply.after_tensor:sleep-700",
        // To 0: bytes past the end but inside its last page would read as zeros, not fault.
        || fs::OpenOptions::new().write(true).open(&delta).unwrap().set_len(0).unwrap(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{err}");
    assert!(err.contains(delta.s()) && err.contains("shrank"), "{err}");
    assert_ne!(state_version(&local), "2", "the state did not advance");
    fs::write(&delta, &published).unwrap();
    apply(&local, Some(&c.ckpts[0]), &src, "2", &[]).ok();
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

/// Run the shell command `cmd` after `ulimit LIMIT` (e.g. `-n 64`); it must succeed. Its stdout.
#[track_caller]
fn under_ulimit(limit: &str, cmd: &str) -> Vec<u8> {
    let out = bash_with(&format!("ulimit {limit}"), cmd);
    assert!(out.status.success(), "{cmd} under ulimit {limit}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Run the shell command `cmd` after the shell commands `setup` (limits, traps), in one bash.
fn bash_with(setup: &str, cmd: &str) -> std::process::Output {
    std::process::Command::new("bash").arg("-c").arg(format!("{setup} && exec {cmd}")).output().unwrap()
}

/// `ckpt` laid out as the Hugging Face hub cache does: its files under `blobs/`, and a snapshot
/// directory of symbolic links to them (what `snapshot_download` returns and engines load).
fn hf_cache_snapshot(root: &Path, ckpt: &Path) -> std::path::PathBuf {
    let (blobs, snap) = (root.join("blobs"), root.join("snapshots/0123abcd"));
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snap).unwrap();
    for (i, n) in file_names(ckpt).iter().enumerate() {
        fs::copy(ckpt.join(n), blobs.join(format!("blob{i}"))).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(n)).unwrap();
    }
    snap
}

/// A BASE and a NEW in the Hugging Face cache layout (every file a symlink into `blobs/`): the
/// seed copied none of the links ("seed checkpoint directory holds no files") and `--full` left
/// out config.json and tokenizer.json. Now they are read through the links, LOCAL and the
/// version hold regular files, the cache is never written, and a link to a missing blob is an
/// error naming it.
#[test]
fn checkpoints_in_the_hugging_face_cache_layout_seed_and_publish() {
    let t = TestDir::new("hf_cache");
    let c = make_chain(&t.path, 2, 2);
    let base = hf_cache_snapshot(&t.join("hub/models--base"), &c.ckpts[0]);
    let new = hf_cache_snapshot(&t.join("hub/models--new"), &c.ckpts[2]);
    let hub_before = snapshot(&t.join("hub"));
    let src = t.join("src");
    publish(&base, &c.ckpts[1], &src, 1, &[]);
    publish(&c.ckpts[1], &new, &src, 2, &["--full"]);
    for n in file_names(&c.ckpts[2]) {
        let copy = vdir(&src, 2).join(&n);
        assert!(fs::symlink_metadata(&copy).is_ok_and(|m| m.is_file()), "full version lacks {n} as a regular file");
        if n != INDEX {
            assert_eq!(fs::read(&copy).unwrap(), fs::read(c.ckpts[2].join(&n)).unwrap(), "{n}");
        }
    }
    let local = t.join("local");
    apply(&local, Some(&base), &src, "1", &[]).ok();
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
    for n in file_names(&local) {
        assert!(!fs::symlink_metadata(local.join(&n)).unwrap().is_symlink(), "LOCAL/{n} is a link into the cache");
    }
    apply(&local, Some(&base), &src, "2", &[]).ok();
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
    assert!(snapshot(&t.join("hub")) == hub_before, "the cache was written");
    // A download cut short: config.json links to a blob that is not there.
    let config_blob = fs::canonicalize(base.join("config.json")).unwrap();
    fs::remove_file(&config_blob).unwrap();
    apply(&t.join("local2"), Some(&base), &src, "1", &[]).code(6).stderr_contains("config.json").stderr_contains("symbolic link");
}

/// Run the shell command `cmd` with writes capped at `kib` KiB per file (`ulimit -f`, SIGXFSZ
/// ignored, so a write past the cap fails with EFBIG): a full disk on the writing side only,
/// without mounting one. It must fail with the I/O exit code (10); its stderr.
#[track_caller]
fn with_a_full_disk(kib: u32, cmd: &str) -> String {
    let out = bash_with(&format!("trap '' XFSZ; ulimit -f {kib}"), cmd);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(10), "{cmd} with writes capped at {kib} KiB: {err}");
    err
}

/// A LOCAL disk that fills during the seed: the error names LOCAL's file, not the BASE file the
/// bytes came from (the kernel copy reports one errno for both ends, and it used to be pinned on
/// the source, pointing users at the shared BASE), nothing is recorded, no temp is left, and a
/// run with room seeds and applies.
#[test]
fn a_local_disk_that_fills_during_the_seed_is_named_and_the_next_run_seeds() {
    let t = TestDir::new("local_full");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    let err = with_a_full_disk(32, &format!("{APPLY} --local {} --base {} --source {} --target 1", local.s(), c.ckpts[0].s(), src.s()));
    assert!(err.contains(local.s()) && err.contains("File too large"), "{err}");
    assert!(!err.contains(c.ckpts[0].s()), "the error blames BASE: {err}");
    // Named by the file's final name, the temp's only in the text after it.
    let file = file_names(&c.ckpts[0]).into_iter().find(|n| n.ends_with(".safetensors")).unwrap();
    assert!(err.contains(&format!("{}: ", local.join(&file).display())) && err.contains("writing its temp file ."), "{err}");
    assert!(!local.join(".weight_sync/state.json").exists(), "a version was recorded");
    assert_no_temp_files(&local);
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
}

/// A seed that cannot fit in LOCAL's free space is refused before LOCAL is touched (a sparse
/// file in a new full version, larger than the free space, stands in for a checkpoint larger
/// than the disk): nothing is copied, so the host's disk is not filled under its engine, and no
/// intent is written, so LOCAL stays clean at its version (going back to it is a no-op, not a
/// reseed). Once the seed fits, the next run takes it.
#[test]
fn a_seed_larger_than_the_free_space_is_refused_before_local_is_touched() {
    let t = TestDir::new("seed_room");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    publish(&c.ckpts[1], &c.ckpts[2], &src, 2, &["--full"]);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    let Some(free) = disagg::fsio::room_for_copy(&vdir(&src, 2), &local) else {
        eprintln!("skipped: the test dir's file system reports no free space or clones copies, so the check does not apply");
        return;
    };
    let huge = vdir(&src, 2).join("optimizer.bin");
    fs::File::create(&huge).unwrap().set_len(free + (1 << 30)).unwrap();
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &[]);
    r.code(10).stderr_contains(local.s()).stderr_contains("not enough free space");
    assert!(!local.join("optimizer.bin").exists(), "the seed was copied: {:?}", file_names(&local));
    assert!(!intent_exists(&local), "the refusal left an intent: LOCAL would be reseeded for nothing");
    assert_eq!(state_version(&local), "000001");
    assert_eq!(apply(&local, Some(&c.ckpts[0]), &src, "1", &["--json"]).ok().json()["noop"], true);
    fs::remove_file(&huge).unwrap();
    apply(&local, Some(&c.ckpts[0]), &src, "2", &[]).ok();
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

/// A seed killed part way leaves the temp of the file it was copying (§1). On a LOCAL disk with
/// room for one copy of the model, that temp used to count against the room the next seed
/// needs, so every retry was refused (exit 10) until someone removed it by hand; the seed now
/// removes such temps first. Run on a small tmpfs in a private mount namespace (skipped where
/// it cannot mount).
#[test]
fn a_temp_left_by_a_killed_seed_does_not_block_the_next_seed() {
    let t = TestDir::new("seed_stale_temp");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    let model: u64 = file_names(&c.ckpts[0]).iter().map(|n| fs::metadata(c.ckpts[0].join(n)).unwrap().len()).sum();
    let disk = t.join("disk");
    fs::create_dir(&disk).unwrap();
    // Room for the model and a half; the stale temp takes 80 % of a model.
    let script = r#"mount -t tmpfs -o size="$3" tmpfs "$2" 2>/dev/null || exit 77
mkdir "$2/local" && head -c "$4" /dev/urandom > "$2/local/.model.safetensors.tmp-4242-0" || exit 78
"$5" --local "$2/local" --base "$6" --source "$1" --target 1; echo "rc=$?"
ls -A "$2/local"; cmp "$2/local/model.safetensors" "$7" && echo same"#;
    let (size, temp) = ((model * 3 / 2 + 8192).to_string(), (model * 4 / 5).to_string());
    let want = c.ckpts[1].join(SINGLE);
    let args = ["-m", "--propagation", "private", "sh", "-c", script, "sh", src.s(), disk.s(), &size, &temp, APPLY, c.ckpts[0].s(), want.s()];
    let r = run("unshare", args);
    if r.out.status.code() == Some(77) || r.stderr().starts_with("unshare:") {
        eprintln!("skipped: no tmpfs mount here ({})", r.stderr().trim());
        return;
    }
    let out = r.stdout();
    assert!(out.contains("rc=0"), "the seed was refused: {out}\n{}", r.stderr());
    assert!(!out.contains(".tmp-4242-0"), "the stale temp is still there: {out}");
    assert!(out.lines().any(|l| l == "same"), "LOCAL does not hold version 1: {out}");
}

/// A full version that cannot fit on the publish file system is refused before its directory
/// exists (a sparse ride-along file larger than the free space stands in for a big checkpoint):
/// nothing is copied, no version directory is left, and with room the publish goes through.
#[test]
fn a_full_publish_larger_than_the_free_space_is_refused_before_anything_is_written() {
    let t = TestDir::new("publish_room");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    let Some(free) = disagg::fsio::room_for_copy(&c.ckpts[1], &src) else {
        eprintln!("skipped: the test dir's file system reports no free space or clones copies, so the check does not apply");
        return;
    };
    let huge = c.ckpts[1].join("optimizer.bin");
    fs::File::create(&huge).unwrap().set_len(free + (1 << 30)).unwrap();
    let r = run(DIFF, [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "2", "--full"]);
    r.code(10).stderr_contains(src.s()).stderr_contains("not enough free space to publish version 2 in full");
    assert!(!vdir(&src, 2).exists(), "a version directory was left: {:?}", file_names(&src));
    fs::remove_file(&huge).unwrap();
    publish(&c.ckpts[0], &c.ckpts[1], &src, 2, &["--full"]);
    assert_holds(&vdir(&src, 2), &c.models[1]);
}

/// A copy whose fsync fails (a failpoint standing in for EIO) leaves no temp file in LOCAL: the
/// temp used to be closed before the fsync, so the error path no longer owned it.
#[cfg(feature = "failpoints")]
#[test]
fn a_seed_copy_whose_fsync_fails_leaves_no_temp() {
    let t = TestDir::new("seed_fsync_fails");
    let c = make_chain(&t.path, 1, 2);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    let args = ["--local", local.s(), "--base", c.ckpts[0].s(), "--source", src.s(), "--target", "1"];
    let r = run_env(APPLY, args, &[("DISAGG_FAILPOINT", "fsio.before_fsync:error")]);
    assert!(!r.out.status.success(), "{}", r.stderr());
    assert_no_temp_files(&local);
    run(APPLY, args).ok();
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
}

/// The same for a full version whose publish dir fills: the error names the version dir's file,
/// not NEW's, and the incomplete version is taken back, so a rerun with room publishes.
#[test]
fn a_publish_disk_that_fills_during_a_full_copy_is_named_and_the_version_taken_back() {
    let t = TestDir::new("publish_full");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    let err = with_a_full_disk(32, &format!("{DIFF} {} {} --publish {} --version 1 --full", c.ckpts[0].s(), c.ckpts[1].s(), src.s()));
    assert!(err.contains(vdir(&src, 1).s()) && err.contains("File too large"), "{err}");
    assert!(!err.contains(c.ckpts[1].s()), "the error blames NEW: {err}");
    assert!(!vdir(&src, 1).exists(), "an incomplete version dir is left");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--full"]);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
}

/// A MoE-like model: thousands of small tensors, every payload spilled, under a descriptor limit
/// far below the tensor count. Each spilled payload used to hold a scratch file of its own until
/// its turn to be written (EMFILE on a 60 000-tensor model); they now share one per worker.
#[test]
fn many_small_tensors_diff_and_apply_within_a_small_descriptor_limit() {
    let t = TestDir::new("many_tensors");
    let mut rng = Rng::new(5);
    let old: Model = (0..3000).map(|i| tensor(&format!("model.layers.{}.mlp.experts.{}.w1.weight", i / 64, i % 64), "BF16", &[96], &mut rng)).collect();
    let new = step(&old, 9);
    let (a, b) = (t.join("old"), t.join("new"));
    write_checkpoint(&a, &old, 3);
    write_checkpoint(&b, &new, 3);
    let src = t.join("src");
    let out = under_ulimit("-n 64", &format!("{DIFF} {} {} --publish {} --version 1 --payload-memory 0 --json", a.s(), b.s(), src.s()));
    let r: Value = serde_json::from_slice(&out).unwrap();
    assert!(r["tensors_changed"].as_u64().unwrap() > 2000);
    assert_eq!(r["payloads_spilled"], r["tensors_changed"]);
    check_delta(&src, 1, 0, &old, &new, "xor", "xxh3-128");
    let local = t.join("local");
    under_ulimit("-n 64", &format!("{APPLY} --local {} --base {} --source {} --target 1", local.s(), a.s(), src.s()));
    assert_local_is(&local, &b, &new);
}

/// A model in more shards than the soft open-file limit allows files (one open per shard of OLD
/// and of NEW): the tools raise their soft limit to the hard one. Failed with EMFILE before.
#[test]
fn more_shards_than_the_soft_descriptor_limit() {
    let t = TestDir::new("many_shards");
    let mut rng = Rng::new(6);
    let old: Model = (0..120).map(|i| tensor(&format!("model.layers.{i}.mlp.up_proj.weight"), "BF16", &[64], &mut rng)).collect();
    let new = step(&old, 10);
    let (a, b) = (t.join("old"), t.join("new"));
    write_checkpoint(&a, &old, 120);
    write_checkpoint(&b, &new, 120);
    let (src, local) = (t.join("src"), t.join("local"));
    for cmd in [
        format!("{DIFF} {} {} --publish {} --version 1", a.s(), b.s(), src.s()),
        format!("{ADVANCE} {} 1", src.s()),
        format!("{APPLY} --local {} --base {} --source {} --target latest", local.s(), a.s(), src.s()),
    ] {
        under_ulimit("-S -n 100", &cmd);
    }
    check_delta(&src, 1, 0, &old, &new, "xor", "xxh3-128");
    assert_local_is(&local, &b, &new);
}

/// The raised open-file limit is the tool's own: a hook starts with the limit the tool started
/// with, and the reload command of delta-follow too (it runs through the same `hooks::shell`).
#[test]
fn hooks_start_with_the_open_file_limit_the_tool_started_with() {
    let t = TestDir::new("hook_ulimit");
    let c = make_chain(&t.path, 1, 1);
    let seen = t.join("seen");
    let hook = format!("ulimit -Sn > {}", seen.s());
    under_ulimit("-S -n 100", &format!("{DIFF} {} {} --publish {} --version 1 --post-write-hook '{hook}'", c.ckpts[0].s(), c.ckpts[1].s(), t.join("src").s()));
    assert_eq!(fs::read_to_string(&seen).unwrap().trim(), "100");
}

/// Every tool on a shared file system that has neither `O_TMPFILE` nor directory fsync (NFS,
/// FUSE mounts; FORMATS §1), stood in for by failpoints: the spilled payloads go through named
/// scratch files that leave no name behind, and the publish, the pointer and the apply all work.
#[cfg(feature = "failpoints")]
#[test]
fn tools_work_without_o_tmpfile_or_directory_fsync() {
    let t = TestDir::new("no_tmpfile");
    let c = make_chain(&t.path, 2, 2);
    let lacking = [("DISAGG_FAILPOINT", "fsio.o_tmpfile:error,fsio.dir_fsync:error")];
    let (plain, shared) = (t.join("plain"), t.join("shared"));
    for (v, enc) in [(1u64, "xor"), (2, "overwrite")] {
        let want = publish(&c.ckpts[v as usize - 1], &c.ckpts[v as usize], &plain, v, &["--encoding", enc]);
        let vs = v.to_string();
        let r = run_env(
            DIFF,
            [c.ckpts[v as usize - 1].s(), c.ckpts[v as usize].s(), "--publish", shared.s(), "--version", &vs, "--encoding", enc, "--payload-memory", "0", "--json"],
            &lacking,
        )
        .ok()
        .json();
        assert_eq!(r["payloads_spilled"], want["tensors_changed"], "{enc}: every payload spilled");
        assert_eq!(file_names(&vdir(&shared, v)), file_names(&vdir(&plain, v)), "{enc}: no scratch file left behind");
        for f in file_names(&vdir(&plain, v)) {
            assert!(fs::read(vdir(&plain, v).join(&f)).unwrap() == fs::read(vdir(&shared, v).join(&f)).unwrap(), "{enc}: {f}");
        }
    }
    run_env(ADVANCE, [shared.s(), "2"], &lacking).ok();
    let local = t.join("local");
    let r = run_env(APPLY, ["--local", local.s(), "--base", c.ckpts[0].s(), "--source", shared.s(), "--target", "latest", "--json"], &lacking).ok().json();
    assert_eq!(applied(&r), vec![1, 2]);
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

// ================================================================================================
// pointer-advance
// ================================================================================================

#[test]
fn pointer_first_advance_forward_same_and_backwards() {
    let t = TestDir::new("ptr_basic");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&c, &src);

    let r = run(ADVANCE, [src.s(), "1", "--json"]).ok().json();
    assert_eq!(r, json!({"previous": null, "current": "weight_v000001", "changed": true}));
    assert_eq!(latest(&src).as_deref(), Some("weight_v000001\n"), "one line ending with a newline");

    run(ADVANCE, [src.s(), "weight_v000002"]).ok();
    assert_eq!(latest(&src).as_deref(), Some("weight_v000002\n"));

    let r = run(ADVANCE, [src.s(), "2", "--json"]).ok().json();
    assert_eq!(r["changed"], false, "same version: ok, no change");
    assert_eq!(latest(&src).as_deref(), Some("weight_v000002\n"));

    run(ADVANCE, [src.s(), "1"]).code(5).stderr_contains("backwards");
    assert_eq!(latest(&src).as_deref(), Some("weight_v000002\n"), "backwards move refused");

    run(ADVANCE, [src.s(), "3"]).ok();
    let text = latest(&src).unwrap();
    assert!(text.ends_with('\n') && text.lines().count() == 1);
    assert_eq!(text.trim_end().strip_prefix("weight_v").map(|d| d.parse::<u64>().unwrap()), Some(3));
    assert!(!src.join("latest.lock").exists(), "lock released");
    assert_no_temp_files(&src);
}

#[test]
fn pointer_expect() {
    let t = TestDir::new("ptr_expect");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&c, &src);

    run(ADVANCE, [src.s(), "1", "--expect", "weight_v000001"]).code(5);
    assert_eq!(latest(&src), None, "no pointer written on mismatch");
    run(ADVANCE, [src.s(), "1", "--expect", "none"]).ok();
    assert_eq!(latest(&src).as_deref(), Some("weight_v000001\n"));
    run(ADVANCE, [src.s(), "2", "--expect", "none"]).code(5);
    assert_eq!(latest(&src).as_deref(), Some("weight_v000001\n"));
    run(ADVANCE, [src.s(), "2", "--expect", "weight_v000001"]).ok();
    assert_eq!(latest(&src).as_deref(), Some("weight_v000002\n"));
    run(ADVANCE, [src.s(), "3", "--expect", "1"]).code(5).stderr_contains("weight_v000002");
    assert_eq!(latest(&src).as_deref(), Some("weight_v000002\n"), "pointer unchanged on --expect mismatch");
    run(ADVANCE, [src.s(), "3", "--expect", "2"]).ok();
    assert_eq!(latest(&src).as_deref(), Some("weight_v000003\n"));
    run(ADVANCE, [src.s(), "3", "--expect", "bogus"]).code(2);
}

#[test]
fn pointer_run_id_and_apply_follows_it() {
    let t = TestDir::new("ptr_run_id");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&c, &src.join("run-a"));

    run(ADVANCE, [src.s(), "3", "--run-id", "run-a", "--expect", "none"]).ok();
    assert_eq!(latest(&src).as_deref(), Some("run-a/weight_v000003\n"));
    let r = run(ADVANCE, [src.s(), "run-a/weight_v000003", "--json"]).ok().json();
    assert_eq!(r["changed"], false);
    run(ADVANCE, [src.s(), "3", "--run-id", "run-b"]).code(6);
    run(ADVANCE, [src.s(), "3", "--run-id", "../x"]).code(2);
    run(ADVANCE, [src.s(), "run-b/weight_v000003", "--run-id", "run-a"]).code(2);
    run(ADVANCE, [src.s(), "3"]).code(6).stderr_contains("weight_v000003"); // not under SRC itself
    assert_eq!(latest(&src).as_deref(), Some("run-a/weight_v000003\n"));

    let local = t.join("local");
    let r = apply(&local, Some(&c.ckpts[0]), &src, "latest", &["--json"]).ok().json();
    assert_eq!(r["version"], 3);
    assert_eq!(r["run_id"], "run-a");
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    let st = read_json(&local.join(".weight_sync/state.json"));
    assert_eq!(st["version"], "000003");
    assert_eq!(st["run_id"], "run-a");
    // Numeric target with --run-id.
    let local2 = t.join("local2");
    apply(&local2, Some(&c.ckpts[0]), &src, "2", &["--run-id", "run-a"]).ok();
    assert_local_is(&local2, &c.ckpts[2], &c.models[2]);
    // A run id names a directory under SRC, not a path: `../`, absolute and empty ids are usage
    // errors (one used to read versions from SRC/../other and record that run id).
    fs::create_dir_all(t.join("other")).unwrap();
    for bad in ["../other", "/tmp", ""] {
        let l = t.join("local-bad");
        apply(&l, Some(&c.ckpts[0]), &src, "2", &["--run-id", bad]).code(2).stderr_contains("--run-id");
        assert!(!l.join(".weight_sync/state.json").exists(), "{bad:?}: nothing recorded");
    }
}

#[test]
fn pointer_refusals() {
    let t = TestDir::new("ptr_refusals");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    run(ADVANCE, [src.s(), "1"]).ok();
    let at1 = Some("weight_v000001\n".to_string());

    run(ADVANCE, [src.s(), "7"]).code(6).stderr_contains("weight_v000007");
    run(ADVANCE, [src.s(), "seven"]).code(2);

    // Incomplete: a crashed publisher's dir without the index.
    let d5 = vdir(&src, 5);
    fs::create_dir_all(&d5).unwrap();
    fs::write(d5.join("model-00000-of-00001.safetensors"), b"partial").unwrap();
    run(ADVANCE, [src.s(), "5"]).code(5).stderr_contains("incomplete");

    // Delta whose base is missing, and whose base is incomplete.
    publish(&c.ckpts[1], &c.ckpts[2], &src, 9, &["--base-version", "8"]);
    run(ADVANCE, [src.s(), "9"]).code(5).stderr_contains("base");
    publish(&c.ckpts[1], &c.ckpts[2], &src, 6, &["--base-version", "5"]);
    run(ADVANCE, [src.s(), "6"]).code(5).stderr_contains("base");

    // A malformed data file in the version.
    let f = data_files(&src, 3)[0].clone();
    let bytes = fs::read(&f).unwrap();
    fs::write(&f, &bytes[..bytes.len() - 10]).unwrap();
    run(ADVANCE, [src.s(), "3"]).code(3).stderr_contains(f.s());
    fs::write(&f, &bytes).unwrap();

    assert_eq!(latest(&src), at1, "no refusal moved the pointer");
    assert!(!src.join("latest.lock").exists());

    // An existing pointer that does not parse is an error, never overwritten.
    fs::write(src.join("latest"), "garbage\n").unwrap();
    run(ADVANCE, [src.s(), "2"]).code(3).stderr_contains("latest");
    assert_eq!(latest(&src).as_deref(), Some("garbage\n"));
    assert!(!src.join("latest.lock").exists());
}

#[test]
fn pointer_chain_may_stop_at_a_full_version() {
    let t = TestDir::new("ptr_full");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    publish(&c.ckpts[1], &c.ckpts[2], &src, 2, &["--full"]);
    publish(&c.ckpts[2], &c.ckpts[3], &src, 3, &[]);
    fs::remove_dir_all(vdir(&src, 1)).unwrap(); // below the full version: not needed
    run(ADVANCE, [src.s(), "3"]).ok();
    assert_eq!(latest(&src).as_deref(), Some("weight_v000003\n"));
}

/// The index is a version's commit marker: `delta-diff --full` of a single-file checkpoint writes
/// `.incomplete`, copies `model.safetensors` and config files, then writes the index and removes
/// the marker, so a publisher that dies in between leaves exactly this directory. It must count as incomplete (exit 5), as
/// `delta-diff` itself treats it (it refuses to overwrite it without --replace-incomplete).
#[test]
fn pointer_refuses_full_version_dir_without_index() {
    let t = TestDir::new("ptr_full_no_index");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--full"]);
    // The state a crash before the index leaves: data and config whole, marker present, no index.
    fs::remove_file(vdir(&src, 1).join(INDEX)).unwrap();
    fs::write(vdir(&src, 1).join(".incomplete"), b"").unwrap();
    run(DIFF, [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "1", "--full"]).code(5).stderr_contains("incomplete");
    run(ADVANCE, [src.s(), "1"]).code(5).stderr_contains("incomplete");
    assert_eq!(latest(&src), None);
}

#[test]
fn pointer_stale_lock_times_out() {
    let t = TestDir::new("ptr_stale_lock");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    fs::write(src.join("latest.lock"), b"").unwrap();
    let start = Instant::now();
    run(ADVANCE, [src.s(), "1"]).code(9).stderr_contains("latest.lock");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(9500), "gave up after {took:?}, before the 10 s timeout");
    assert_eq!(latest(&src), None);
    assert!(src.join("latest.lock").exists(), "someone else's lock is not removed");
}

/// A pointer move that cannot write its new value (a full disk: writes capped at 0 bytes)
/// fails with exit 10 and takes its lock back, as git's update-ref does; the lock used to stay,
/// so every later move waited 10 s and failed "lock busy" until someone removed it by hand.
#[test]
fn pointer_advance_that_cannot_write_removes_its_lock() {
    let t = TestDir::new("ptr_full_disk");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let err = with_a_full_disk(0, &format!("{ADVANCE} {} 1", src.s()));
    assert!(err.contains("latest.lock") && err.contains("File too large"), "{err}");
    assert!(!src.join("latest.lock").exists(), "the failed move left its lock");
    assert_eq!(latest(&src), None);
    run(ADVANCE, [src.s(), "1"]).ok();
    assert_eq!(latest(&src).as_deref(), Some("weight_v000001\n"));
}

// ================================================================================================
// delta-apply
// ================================================================================================

/// `--no-fsync` records the version once the bytes are in the page cache and marks LOCAL with
/// the boot id: later runs of the same boot trust it, a run after a reboot reseeds, and a
/// durable run settles the bytes and removes the mark.
#[cfg(feature = "failpoints")]
#[test]
fn apply_without_fsync_is_trusted_within_a_boot_and_reseeded_after_a_reboot() {
    let t = TestDir::new("apply_no_fsync");
    let c = make_chain(&t.path, 4, 2);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    let mark = local.join(".weight_sync/unsynced.json");
    let pull = |target: &str, boot: &str, extra: &[&str]| {
        let mut args = vec!["--local", local.s(), "--base", c.ckpts[0].s(), "--source", src.s(), "--target", target, "--json"];
        args.extend_from_slice(extra);
        run_env(APPLY, &args, &[("DISAGG_BOOT_ID", boot)]).ok().json()
    };
    let r = pull("2", "boot-a", &["--no-fsync"]);
    assert_eq!((r["durable"].clone(), r["seeded_from"].clone(), applied(&r)), (json!(false), json!(0), vec![1, 2]));
    assert_eq!(read_json(&mark), json!({"boot_id": "boot-a"}));
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
    // The same boot: LOCAL is trusted, the next delta applies on top.
    let r = pull("3", "boot-a", &["--no-fsync"]);
    assert_eq!((r["repaired"].clone(), r["seeded_from"].clone(), applied(&r)), (json!(false), Value::Null, vec![3]));
    let r = pull("3", "boot-a", &[]);
    assert_eq!((r["noop"].clone(), r["durable"].clone()), (json!(true), json!(false)), "a no-op settles nothing");
    // Another boot: what the page cache held may be lost or torn; LOCAL is reseeded.
    let r = pull("3", "boot-b", &["--no-fsync"]);
    assert_eq!(r["repaired"], true);
    assert!(r["repair_reason"].as_str().unwrap().contains("rebooted"), "{r}");
    assert_eq!((r["seeded_from"].clone(), applied(&r)), (json!(0), vec![1, 2, 3]));
    assert_eq!(read_json(&mark), json!({"boot_id": "boot-b"}));
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    // Killed right after it replaced another boot's mark, a run must not have made LOCAL look
    // trusted: its intent, written first, keeps LOCAL dirty.
    let killed = run_env(
        APPLY,
        ["--local", local.s(), "--base", c.ckpts[0].s(), "--source", src.s(), "--target", "3", "--no-fsync"],
        &[("DISAGG_BOOT_ID", "boot-c"), ("DISAGG_FAILPOINT", "apply.after_mark")],
    );
    assert_eq!(killed.out.status.code(), None, "aborted at the failpoint");
    assert_eq!(read_json(&mark), json!({"boot_id": "boot-c"}));
    let r = pull("3", "boot-c", &["--no-fsync"]);
    assert_eq!((r["repaired"].clone(), r["seeded_from"].clone()), (json!(true), json!(0)), "{r}");
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    // A durable run makes everything durable and drops the mark; a later reboot is then harmless.
    let r = pull("4", "boot-c", &[]);
    assert_eq!((r["durable"].clone(), applied(&r)), (json!(true), vec![4]));
    assert!(!mark.exists());
    let r = pull("4", "boot-d", &[]);
    assert_eq!((r["noop"].clone(), r["repaired"].clone(), r["durable"].clone()), (json!(true), json!(false), json!(true)));
    assert_local_is(&local, &c.ckpts[4], &c.models[4]);
}

/// Without the test override the mark holds the kernel's boot id.
#[test]
fn apply_without_fsync_records_the_kernels_boot_id() {
    let Ok(boot) = fs::read_to_string("/proc/sys/kernel/random/boot_id") else {
        eprintln!("skipped: no /proc/sys/kernel/random/boot_id");
        return;
    };
    let t = TestDir::new("apply_boot_id");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    let r = apply(&local, Some(&c.ckpts[0]), &src, "1", &["--no-fsync", "--json"]).ok().json();
    assert_eq!(r["durable"], false);
    assert_eq!(read_json(&local.join(".weight_sync/unsynced.json")), json!({"boot_id": boot.trim()}));
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
}

#[test]
fn apply_chain_on_a_fresh_host_then_noop() {
    let t = TestDir::new("apply_chain");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    publish(&c.ckpts[1], &c.ckpts[2], &src, 2, &["--encoding", "overwrite", "--checksum", "blake3"]);
    publish(&c.ckpts[2], &c.ckpts[3], &src, 3, &["--checksum", "adler32"]);
    let local = t.join("local");

    let r = apply(&local, Some(&c.ckpts[0]), &src, "3", &["--json"]).ok().json();
    assert_eq!(r["version"], 3);
    assert_eq!(r["previous"], Value::Null);
    assert_eq!(r["seeded_from"], 0);
    assert_eq!(applied(&r), vec![1, 2, 3]);
    assert_eq!(r["noop"], false);
    assert_eq!(r["repaired"], false);
    assert!(r["seconds"].as_f64().unwrap() >= 0.0);
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    assert_eq!(fs::read(local.join("config.json")).unwrap(), fs::read(c.ckpts[0].join("config.json")).unwrap());
    assert_eq!(state_version(&local), "000003");
    assert!(!intent_exists(&local));
    assert_no_temp_files(&local);
    write_checkpoint(&t.join("pristine0"), &c.models[0], 1);
    assert!(fs::read(c.ckpts[0].join(SINGLE)).unwrap() == fs::read(t.join("pristine0").join(SINGLE)).unwrap(), "BASE untouched");

    let before = snapshot(&local);
    let r = apply(&local, Some(&c.ckpts[0]), &src, "3", &["--json"]).ok().json();
    assert_eq!(r["noop"], true);
    assert_eq!(r["previous"], 3);
    assert_eq!(r["seeded_from"], Value::Null);
    assert!(applied(&r).is_empty());
    assert!(snapshot(&local) == before, "a no-op writes nothing");
    let human = apply(&local, Some(&c.ckpts[0]), &src, "3", &[]).ok().stdout();
    assert!(human.contains("already at version 3"), "{human}");
}

#[test]
fn apply_target_latest_follows_the_pointer() {
    let t = TestDir::new("apply_latest");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");

    apply(&local, Some(&c.ckpts[0]), &src, "latest", &[]).code(6).stderr_contains("latest");
    assert!(!local.join(".weight_sync/state.json").exists());

    run(ADVANCE, [src.s(), "2"]).ok();
    let r = apply(&local, Some(&c.ckpts[0]), &src, "latest", &["--json"]).ok().json();
    assert_eq!((r["version"].clone(), applied(&r)), (json!(2), vec![1, 2]));
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);

    run(ADVANCE, [src.s(), "3"]).ok();
    // --target defaults to latest.
    let r = run(APPLY, ["--local", local.s(), "--base", c.ckpts[0].s(), "--source", src.s(), "--json"]).ok().json();
    assert_eq!(r["previous"], 2);
    assert_eq!(r["seeded_from"], Value::Null, "an up-to-date host applies only the new delta");
    assert_eq!(applied(&r), vec![3]);
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    assert_eq!(state_version(&local), "000003");
}

#[test]
fn apply_full_version_in_the_chain_reseeds() {
    let t = TestDir::new("apply_full_mid");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    publish(&c.ckpts[1], &c.ckpts[2], &src, 2, &["--full"]);
    publish(&c.ckpts[2], &c.ckpts[3], &src, 3, &["--encoding", "overwrite"]);

    // Fresh host: seeds from the full version, no BASE needed.
    let fresh = t.join("fresh");
    let r = apply(&fresh, None, &src, "3", &["--json"]).ok().json();
    assert_eq!(r["seeded_from"], 2);
    assert_eq!(applied(&r), vec![3]);
    assert_local_is(&fresh, &c.ckpts[3], &c.models[3]);

    // A host at v1: the full v2 resets it.
    let host = t.join("host");
    apply(&host, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    assert_local_is(&host, &c.ckpts[1], &c.models[1]);
    let r = apply(&host, Some(&c.ckpts[0]), &src, "3", &["--json"]).ok().json();
    assert_eq!((r["previous"].clone(), r["seeded_from"].clone(), applied(&r)), (json!(1), json!(2), vec![3]));
    assert_local_is(&host, &c.ckpts[3], &c.models[3]);
    assert_eq!(state_version(&host), "000003");
}

#[test]
fn apply_rollback_reseeds_and_converges() {
    let t = TestDir::new("apply_rollback");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "3", &[]).ok();

    let r = apply(&local, Some(&c.ckpts[0]), &src, "1", &["--json"]).ok().json();
    assert_eq!((r["previous"].clone(), r["seeded_from"].clone(), applied(&r)), (json!(3), json!(0), vec![1]));
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
    assert_eq!(state_version(&local), "000001");

    let r = apply(&local, Some(&c.ckpts[0]), &src, "3", &["--json"]).ok().json();
    assert_eq!((r["seeded_from"].clone(), applied(&r)), (Value::Null, vec![2, 3]));
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);

    // All the way back to the base checkpoint.
    let r = apply(&local, Some(&c.ckpts[0]), &src, "0", &["--json"]).ok().json();
    assert_eq!((r["seeded_from"].clone(), applied(&r)), (json!(0), vec![]));
    assert_local_is(&local, &c.ckpts[0], &c.models[0]);
    assert_eq!(state_version(&local), "000000");
}

fn state(local: &Path) -> Value {
    read_json(&local.join(".weight_sync/state.json"))
}

/// One source under two paths (a bind mount, as a container sees its host's shared directory)
/// is one source: LOCAL's version is patched on, not reseeded. Before, the other canonical path
/// made LOCAL foreign and every pull through the mount reseeded it in full. The mount is made
/// in a private mount namespace; without the privilege for it the test says so and passes.
#[test]
fn a_source_seen_through_a_bind_mount_is_the_same_source() {
    let t = TestDir::new("apply_bind_mount");
    let c = make_chain(&t.path, 2, 1);
    let a = t.join("a");
    publish(&c.ckpts[0], &c.ckpts[1], &a, 1, &[]);
    publish(&c.ckpts[1], &c.ckpts[2], &a, 2, &[]);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &a, "1", &[]).ok();
    let mnt = t.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let script = r#"mount --bind "$1" "$2" 2>/dev/null || exit 77; shift 2; exec "$@""#;
    let args = ["-m", "--propagation", "private", "sh", "-c", script, "sh", a.s(), mnt.s(), APPLY, "--local", local.s(), "--source", mnt.s(), "--target", "2", "--json"];
    let r = run("unshare", args);
    if r.out.status.code() == Some(77) || r.stderr().starts_with("unshare:") {
        eprintln!("skipped: no bind mount here ({})", r.stderr().trim());
        return;
    }
    let r = r.ok().json();
    assert_eq!((r["foreign_reason"].clone(), r["seeded_from"].clone(), applied(&r)), (Value::Null, Value::Null, vec![2]), "{r}");
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
    // A directory that merely has the recorded path's name elsewhere is still another source.
    let b = t.join("b");
    publish(&c.ckpts[0], &c.ckpts[2], &b, 2, &["--base-version", "0"]);
    let r = apply(&local, Some(&c.ckpts[0]), &b, "2", &["--json"]).ok().json();
    assert!(r["foreign_reason"].as_str().is_some_and(|s| s.contains("another source")), "{r}");
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

/// A LOCAL whose state checks out but whose files lack a tensor the next delta patches (a file
/// replaced by another model's) is not the version it records: reseeded and replayed, where it
/// used to be refused as incompatible (exit 4) on every run, which nothing repaired.
#[test]
fn a_local_that_lost_a_patched_tensor_is_reseeded_not_refused_forever() {
    let t = TestDir::new("apply_lost_tensor");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    write_checkpoint(&t.join("other"), &model_without(&c.models[1], EMBED), 1);
    fs::copy(t.join("other").join(SINGLE), local.join(SINGLE)).unwrap();
    // Our deltas record what they were made against, so the content sample tells first; a
    // delta written by another tool (slime) records no base_sample, and the missing tensor tells.
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    assert_eq!((r["seeded_from"].as_u64(), applied(&r)), (Some(0), vec![1, 2]), "{r}");
    assert!(r["foreign_reason"].as_str().is_some_and(|s| s.contains("content sample")), "{r}");
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);

    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    let index = vdir(&src, 2).join(INDEX);
    let mut ix = read_json(&index);
    ix["metadata"].as_object_mut().unwrap().remove("base_sample");
    fs::write(&index, serde_json::to_vec(&ix).unwrap()).unwrap();
    fs::copy(t.join("other").join(SINGLE), local.join(SINGLE)).unwrap();
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    assert_eq!((r["seeded_from"].as_u64(), applied(&r)), (Some(0), vec![1, 2]), "{r}");
    assert!(r["foreign_reason"].as_str().is_some_and(|s| s.contains("is not version 1") && s.contains(EMBED)), "{r}");
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

#[test]
fn a_local_pointed_at_another_source_is_reseeded_not_patched() {
    let t = TestDir::new("apply_other_source");
    let c = make_chain(&t.path, 3, 1);
    // Two sources with the same version numbers and other bytes: A steps 0→1→2, B 0→2→3.
    let (a, b) = (t.join("a"), t.join("b"));
    publish(&c.ckpts[0], &c.ckpts[1], &a, 1, &[]);
    publish(&c.ckpts[1], &c.ckpts[2], &a, 2, &[]);
    publish(&c.ckpts[0], &c.ckpts[2], &b, 1, &[]);
    publish(&c.ckpts[2], &c.ckpts[3], &b, 2, &["--encoding", "overwrite"]);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &a, "1", &[]).ok();
    let st = state(&local);
    assert_eq!(st["source"], json!(a.canonicalize().unwrap().to_str().unwrap()), "state.json names the source");
    assert!(st["fingerprint"].as_str().is_some_and(|f| f.len() == 32), "and the version's fingerprint: {st}");

    // B's delta 2 is against B's version 1, not the A version 1 LOCAL holds: reseed, replay B.
    let r = apply(&local, Some(&c.ckpts[0]), &b, "2", &["--json"]).ok().json();
    assert!(r["foreign_reason"].as_str().is_some_and(|s| s.contains("another source")), "{r}");
    assert_eq!((r["previous"].clone(), r["seeded_from"].clone(), applied(&r), r["repaired"].clone()), (Value::Null, json!(0), vec![1, 2], json!(false)));
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    assert_eq!(state(&local)["source"], json!(b.canonicalize().unwrap().to_str().unwrap()));

    // Another spelling of the same directory is the same source: a no-op.
    let link = t.join("b-link");
    std::os::unix::fs::symlink(&b, &link).unwrap();
    let r = apply(&local, None, &link, "2", &["--json"]).ok().json();
    assert_eq!((r["noop"].clone(), r["foreign_reason"].clone()), (json!(true), Value::Null), "{r}");
}

#[test]
fn a_version_published_again_under_its_number_is_reseeded_not_patched() {
    let t = TestDir::new("apply_republished");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    // The trainer restarts without a run id and publishes its versions again: v1 is now 0→2.
    fs::remove_dir_all(vdir(&src, 1)).unwrap();
    publish(&c.ckpts[0], &c.ckpts[2], &src, 1, &[]);
    publish(&c.ckpts[2], &c.ckpts[3], &src, 2, &["--encoding", "overwrite"]);
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    assert!(r["foreign_reason"].as_str().is_some_and(|s| s.contains("published again")), "{r}");
    assert_eq!((r["seeded_from"].clone(), applied(&r)), (json!(0), vec![1, 2]));
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);

    // A recorded version that was collected cannot be compared and is trusted as before.
    publish(&c.ckpts[3], &c.ckpts[2], &src, 3, &[]);
    fs::remove_dir_all(vdir(&src, 2)).unwrap();
    let r = apply(&local, None, &src, "3", &["--json"]).ok().json();
    assert_eq!((r["previous"].clone(), r["seeded_from"].clone(), applied(&r), r["foreign_reason"].clone()), (json!(2), Value::Null, vec![3], Value::Null));
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);

    // A state as slime writes it (version only) is trusted as before.
    fs::write(local.join(".weight_sync/state.json"), r#"{"version":"000003"}"#).unwrap();
    let r = apply(&local, None, &src, "3", &["--json"]).ok().json();
    assert_eq!(r["noop"], json!(true), "{r}");
}

#[test]
fn apply_sharded_checkpoints() {
    let t = TestDir::new("apply_sharded");
    let c = make_chain(&t.join("sharded"), 2, 3);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--max-file-bytes", "1"]);
    publish(&c.ckpts[1], &c.ckpts[2], &src, 2, &["--encoding", "overwrite"]);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "2", &[]).ok();
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
    assert_eq!(fs::read(local.join(INDEX)).unwrap(), fs::read(c.ckpts[2].join(INDEX)).unwrap());

    // Deltas computed on single-file checkpoints patch a sharded host by tensor name.
    let single = make_chain(&t.join("single"), 2, 1);
    let src2 = t.join("src2");
    publish_chain(&single, &src2);
    let local2 = t.join("local2");
    apply(&local2, Some(&c.ckpts[0]), &src2, "2", &[]).ok();
    assert_local_is(&local2, &c.ckpts[2], &c.models[2]);
}

#[test]
fn apply_checksum_mismatch_then_repair() {
    let t = TestDir::new("apply_checksum");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let f = delta_file_of(&src, 2, UP0);
    let good = fs::read(&f).unwrap();
    tamper_checksum(&f, UP0);
    let local = t.join("local");

    apply(&local, Some(&c.ckpts[0]), &src, "2", &[]).code(7).stderr_contains(UP0).stderr_contains(f.s());
    // Versions 1 and 2 are applied folded, as one step: the state stays at the seed.
    assert_eq!(state_version(&local), "000000", "state not advanced past the bad delta");
    assert!(intent_exists(&local), "intent.json marks LOCAL dirty");

    fs::write(&f, &good).unwrap();
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    assert_eq!(r["repaired"], true);
    assert_eq!(r["seeded_from"], 0);
    assert_eq!(applied(&r), vec![1, 2]);
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
    assert_eq!(state_version(&local), "000002");
    assert!(!intent_exists(&local));

    // A bad payload in the OLDER of two folded deltas fails the newest one's checksum: the
    // error names both files, not only the (good) newest.
    let f1 = delta_file_of(&src, 1, UP0);
    rewrite_payload(&f1, UP0, |raw| raw[0] ^= 0x40);
    let local3 = t.join("local3");
    apply(&local3, Some(&c.ckpts[0]), &src, "2", &[]).code(7).stderr_contains(UP0).stderr_contains(f1.s()).stderr_contains(f.s()).stderr_contains("folded");
}

#[test]
fn apply_tampered_payload_fails_its_checksum() {
    let t = TestDir::new("apply_payload");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    for (i, enc) in ["xor", "overwrite"].into_iter().enumerate() {
        let s = src.join(enc);
        publish(&c.ckpts[0], &c.ckpts[1], &s, 1, &["--encoding", enc, "--checksum", ["blake3", "adler32"][i]]);
        let f = delta_file_of(&s, 1, EMBED);
        let good = fs::read(&f).unwrap();
        rewrite_payload(&f, EMBED, |raw| {
            let last = raw.len() - 1; // xor: last byte of the tensor; overwrite: last new value
            raw[last] ^= 0x40;
        });
        let local = t.join(format!("local-{enc}"));
        apply(&local, Some(&c.ckpts[0]), &s, "1", &[]).code(7).stderr_contains(EMBED);
        assert_ne!(state_version(&local), "000001");
        assert!(intent_exists(&local));

        fs::write(&f, &good).unwrap();
        let r = apply(&local, Some(&c.ckpts[0]), &s, "1", &["--json"]).ok().json();
        assert_eq!(r["repaired"], true);
        assert_local_is(&local, &c.ckpts[1], &c.models[1]);
    }
}

#[test]
fn apply_corrupt_zstd_frame() {
    let t = TestDir::new("apply_zstd");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let f = delta_file_of(&src, 1, UP0);
    let good = fs::read(&f).unwrap();
    corrupt_frame(&f, UP0);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).code(3).stderr_contains(f.s()).stderr_contains(UP0);
    assert_ne!(state_version(&local), "000001");

    fs::write(&f, &good).unwrap();
    let r = apply(&local, Some(&c.ckpts[0]), &src, "1", &["--json"]).ok().json();
    assert_eq!(r["repaired"], true);
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
    assert!(!intent_exists(&local));
}

/// LOCAL is seeded by deleting the plain files the seed lacks and patched in place: one that is
/// SRC deleted SRC's `latest`, one inside a published version rewrote it for every host. Both,
/// and a LOCAL inside BASE, are refused before anything is created or read (exit 2).
#[test]
fn apply_refuses_a_local_that_is_or_lies_inside_base_or_source() {
    let t = TestDir::new("apply_local_apart");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    publish(&c.ckpts[1], &c.ckpts[2], &src, 3, &["--full"]);
    run(ADVANCE, [src.s(), "3"]).ok();
    let (src_before, base_before) = (snapshot(&src), snapshot(&c.ckpts[0]));
    std::os::unix::fs::symlink(&src, t.join("src-link")).unwrap();
    let inside_base = c.ckpts[0].join("local");
    let cases = [
        (src.clone(), "the same directory as --source"),
        (vdir(&src, 3), "inside --source"),
        (src.join("hosts").join("..").join("local"), "inside --source"),
        (t.join("src-link"), "the same directory as --source"),
        (inside_base.clone(), "inside --base"),
    ];
    for (local, why) in &cases {
        apply(local, Some(&c.ckpts[0]), &src, "latest", &[]).code(2).stderr_contains(why);
        if why.ends_with("--source") {
            // Also where no BASE is needed (version 3 is full).
            apply(local, None, &src, "3", &[]).code(2);
        }
    }
    assert!(snapshot(&src) == src_before, "SRC untouched");
    assert!(snapshot(&c.ckpts[0]) == base_before && !inside_base.exists(), "BASE untouched");
    // A sibling whose name only starts like SRC's lies apart.
    let sibling = t.join("src-local");
    apply(&sibling, Some(&c.ckpts[0]), &src, "latest", &[]).ok();
    assert_local_is(&sibling, &c.ckpts[2], &c.models[2]);
}

#[test]
fn apply_base_checks() {
    let t = TestDir::new("apply_base");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let base_before = snapshot(&c.ckpts[0]);

    // A fresh host needs BASE.
    let local = t.join("local");
    apply(&local, None, &src, "1", &[]).code(2).stderr_contains("--base");
    assert!(!local.join(SINGLE).exists());
    assert!(!local.join(".weight_sync/state.json").exists());

    // LOCAL must not be BASE, however spelled.
    apply(&c.ckpts[0], Some(&c.ckpts[0]), &src, "1", &[]).code(2);
    let alias = c.ckpts[0].join("..").join("ckpt0");
    apply(&alias, Some(&c.ckpts[0]), &src, "1", &[]).code(2);
    assert!(snapshot(&c.ckpts[0]) == base_before, "BASE untouched");

    // A host past version 0 does not need BASE.
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    apply(&local, None, &src, "2", &[]).ok();
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);

    // A BASE that lacks a tensor the delta patches: incompatible, named.
    let partial = t.join("partial-base");
    write_checkpoint(&partial, &model_without(&c.models[0], EMBED), 1);
    let local2 = t.join("local2");
    apply(&local2, Some(&partial), &src, "1", &[]).code(4).stderr_contains(EMBED).stderr_contains(partial.s());
    // Refused before LOCAL was touched: BASE is not copied (the refusal used to come after the
    // copy, and before that to leave an apply intent, so that the next run reseeded).
    assert!(!local2.join(SINGLE).exists() && !local2.join(".weight_sync/state.json").exists());
    // A clean LOCAL at version 0 that lacks the tensor is refused the same way, untouched.
    apply(&local2, Some(&partial), &src, "0", &[]).ok();
    apply(&local2, Some(&partial), &src, "1", &[]).code(4).stderr_contains(EMBED);
    assert_eq!(state_version(&local2), "000000");
    assert!(!intent_exists(&local2), "no apply intent left");
    let r = apply(&local2, Some(&partial), &src, "0", &["--json"]).ok().json();
    assert_eq!((r["noop"].clone(), r["repaired"].clone()), (json!(true), json!(false)), "{r}");
}

#[test]
fn apply_pre_read_hook() {
    let t = TestDir::new("apply_hook");
    let c = make_chain(&t.path, 4, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let log = t.join("hook.log");
    let hook = format!("echo \"$DISAGG_VERSION $(basename \"$DISAGG_VERSION_DIR\")\" >> {}", log.s());
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "3", &["--pre-read-hook", &hook]).ok();
    let mut lines: Vec<String> = fs::read_to_string(&log).unwrap().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, vec!["1 weight_v000001", "2 weight_v000002", "3 weight_v000003"]);

    let before = snapshot(&local);
    apply(&local, Some(&c.ckpts[0]), &src, "4", &["--pre-read-hook", "exit 1"]).code(8).stderr_contains("exit 1");
    assert_eq!(state_version(&local), "000003");
    assert!(snapshot(&local) == before, "a failed pre-read hook leaves LOCAL as it was");
    assert!(!intent_exists(&local));
}

#[test]
fn apply_concurrent_invocations_collapse_to_one() {
    let t = TestDir::new("apply_concurrent");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    let args = ["--local", local.s(), "--base", c.ckpts[0].s(), "--source", src.s(), "--target", "3", "--json"];
    let children: Vec<_> = (0..4).map(|_| spawn(APPLY, args)).collect();
    let mut workers = 0;
    for (child, cmdline) in children {
        let out = child.wait_with_output().unwrap();
        let r = Run { cmdline, out };
        let j = r.ok().json();
        assert_eq!(j["version"], 3);
        if j["noop"] == false {
            workers += 1;
            assert_eq!(applied(&j), vec![1, 2, 3]);
        }
    }
    assert_eq!(workers, 1, "exactly one invocation does the work, the others find it done");
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    assert!(!intent_exists(&local));
}

#[test]
fn apply_lock_timeout() {
    let t = TestDir::new("apply_lock");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    fs::create_dir_all(local.join(".weight_sync")).unwrap();
    let lock_path = local.join(".weight_sync/lock");
    let held = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&lock_path).unwrap();
    held.lock().unwrap();

    let start = Instant::now();
    apply(&local, Some(&c.ckpts[0]), &src, "1", &["--lock-timeout", "0.3"]).code(9).stderr_contains(lock_path.s());
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "lock wait took {took:?}");
    assert!(!local.join(SINGLE).exists(), "nothing done without the lock");

    drop(held);
    apply(&local, Some(&c.ckpts[0]), &src, "1", &["--lock-timeout", "0.3"]).ok();
    assert_local_is(&local, &c.ckpts[1], &c.models[1]);
}

/// `--lock-timeout` takes seconds; a value that is no duration is a usage error (2), not a crash.
#[test]
fn apply_rejects_a_lock_timeout_that_is_no_duration() {
    let t = TestDir::new("apply_lock_arg");
    let src = t.join("src");
    let local = t.join("local");
    for bad in ["nan", "-1", "inf", "1e30"] {
        let flag = format!("--lock-timeout={bad}");
        run(APPLY, ["--local", local.s(), "--source", src.s(), "--target", "1", flag.as_str()]).code(2);
    }
}

#[test]
fn apply_detects_a_torn_local_checkpoint() {
    let t = TestDir::new("apply_torn");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "2", &[]).ok();

    let f = OpenOptions::new().write(true).open(local.join(SINGLE)).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
    drop(f);
    assert_eq!(state_version(&local), "000002", "state still says clean");
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    assert_eq!(r["repaired"], true);
    assert_eq!(r["noop"], false);
    assert_eq!((r["seeded_from"].clone(), applied(&r)), (json!(0), vec![1, 2]));
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);

    // A deleted model file is repaired the same way.
    fs::remove_file(local.join(SINGLE)).unwrap();
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    assert_eq!(r["repaired"], true);
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

#[test]
fn apply_refusals() {
    let t = TestDir::new("apply_refusals");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    let base = Some(c.ckpts[0].as_path());

    apply(&local, base, &src, "seven", &[]).code(2);
    apply(&local, base, &src, "9", &[]).code(6).stderr_contains("weight_v000009");

    // An unparseable pointer is an error, never a fallback to the base model.
    fs::write(src.join("latest"), "weight_v1\n").unwrap();
    apply(&local, base, &src, "latest", &[]).code(3).stderr_contains(src.join("latest").s());

    // A link below the target missing is a broken chain (5), naming the version that needs it.
    let d1 = vdir(&src, 1);
    let hidden = t.join("v1-away");
    fs::rename(&d1, &hidden).unwrap();
    apply(&local, base, &src, "2", &[]).code(5).stderr_contains("broken chain").stderr_contains(vdir(&src, 2).s());
    fs::rename(&hidden, &d1).unwrap();

    // An incomplete version on the chain.
    let d3 = vdir(&src, 3);
    fs::create_dir_all(&d3).unwrap();
    fs::write(d3.join("model-00000-of-00001.safetensors"), b"partial").unwrap();
    apply(&local, base, &src, "3", &[]).code(5).stderr_contains("incomplete");

    // A malformed delta anywhere on the chain is found before LOCAL is touched.
    let f = data_files(&src, 2)[0].clone();
    let bytes = fs::read(&f).unwrap();
    fs::write(&f, &bytes[..bytes.len() - 7]).unwrap();
    apply(&local, base, &src, "2", &[]).code(3).stderr_contains(f.s());

    assert!(!local.join(SINGLE).exists(), "no refusal touched LOCAL");
    assert!(!local.join(".weight_sync/state.json").exists());
    assert!(!intent_exists(&local));
}

#[test]
fn diff_full_every_publishes_periodic_full_versions() {
    let t = TestDir::new("diff_full_every");
    let c = make_chain(&t.path, 4, 1);
    let src = t.join("src");
    for v in 1..=4usize {
        let vs = v.to_string();
        run(DIFF, [c.ckpts[v - 1].s(), c.ckpts[v].s(), "--publish", src.s(), "--version", vs.as_str(), "--full-every", "2"]).ok();
    }
    for (v, full) in [(1, false), (2, true), (3, false), (4, true)] {
        let index: serde_json::Value = serde_json::from_slice(&fs::read(vdir(&src, v).join(INDEX)).unwrap()).unwrap();
        assert_eq!(index["metadata"].get("delta_encoding").is_none(), full, "version {v}");
    }
    run(DIFF, [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "9", "--full-every", "0"]).code(2);
}

#[test]
fn apply_folds_a_catch_up_into_one_pass() {
    let t = TestDir::new("apply_fold");
    let c = make_chain(&t.path, 4, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    let r = apply(&local, Some(&c.ckpts[0]), &src, "3", &["--json"]).ok().json();
    assert_eq!(applied(&r), vec![1, 2, 3]);
    assert_eq!(r["folded"], true);
    assert_local_is(&local, &c.ckpts[3], &c.models[3]);
    let r = apply(&local, Some(&c.ckpts[0]), &src, "4", &["--json"]).ok().json();
    assert_eq!(applied(&r), vec![4]);
    assert_eq!(r["folded"], false);
    assert_local_is(&local, &c.ckpts[4], &c.models[4]);
}

#[test]
fn threads_option_sizes_the_worker_pool_and_changes_no_byte() {
    let t = TestDir::new("threads");
    let c = make_chain(&t.path, 2, 2);
    let (src1, src3) = (t.join("src1"), t.join("src3"));
    for (src, n) in [(&src1, 1u64), (&src3, 3)] {
        for v in 1..=2 {
            let r = publish(&c.ckpts[v - 1], &c.ckpts[v], src, v as u64, &["--threads", &n.to_string()]);
            assert_eq!(r["threads"], n, "delta-diff --threads {n}");
        }
    }
    assert!(snapshot(&src1) == snapshot(&src3), "the published bytes do not depend on --threads");
    for n in [1u64, 3] {
        let local = t.join(format!("local{n}"));
        let r = apply(&local, Some(&c.ckpts[0]), &src1, "2", &["--json", "--threads", &n.to_string()]).ok().json();
        assert_eq!(r["threads"], n, "delta-apply --threads {n}");
        assert_eq!(applied(&r), vec![1, 2]);
        assert_local_is(&local, &c.ckpts[2], &c.models[2]);
    }
    // Without the flag, RAYON_NUM_THREADS sizes the pool.
    let src = t.join("src-env");
    let r = run_env(DIFF, [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "1", "--json"], &[("RAYON_NUM_THREADS", "5")]).ok().json();
    assert_eq!(r["threads"], 5);
    // Neither (an empty RAYON_NUM_THREADS is ignored, as rayon ignores it): one per CPU, at most 32.
    let src = t.join("src-default");
    let r = run_env(DIFF, [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "1", "--json"], &[("RAYON_NUM_THREADS", "")]).ok().json();
    assert_eq!(r["threads"], std::thread::available_parallelism().unwrap().get().min(32));
    // No workers, or no number: usage errors, nothing written.
    for bad in ["0", "5000", "many"] {
        run(DIFF, [c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "2", "--threads", bad]).code(2).stderr_contains("--threads");
        run(APPLY, ["--local", t.join("local-bad").s(), "--base", c.ckpts[0].s(), "--source", src1.s(), "--threads", bad]).code(2).stderr_contains("--threads");
        run(FOLLOW, ["--local", t.join("local-bad").s(), "--base", c.ckpts[0].s(), "--source", src1.s(), "--once", "--threads", bad]).code(2).stderr_contains("--threads");
    }
    assert!(!vdir(&src, 2).exists() && !t.join("local-bad").exists());
}

/// The threads a `delta-diff --threads N` process runs, counted in /proc while it is paused
/// just before its index: the main thread and N workers.
#[cfg(all(feature = "failpoints", target_os = "linux"))]
#[test]
fn threads_option_is_the_number_of_worker_threads() {
    let t = TestDir::new("threads_proc");
    let c = make_chain(&t.path, 1, 1);
    let most_threads_seen = |n: usize| -> usize {
        let src = t.join(format!("src{n}"));
        let mut child = std::process::Command::new(DIFF)
            .args([c.ckpts[0].s(), c.ckpts[1].s(), "--publish", src.s(), "--version", "1", "--threads", &n.to_string()])
            .env("DISAGG_FAILPOINT", "diff.before_index:sleep-1500")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let tasks = format!("/proc/{}/task", child.id());
        let mut most = 0;
        while child.try_wait().unwrap().is_none() {
            most = most.max(fs::read_dir(&tasks).map(|d| d.count()).unwrap_or(0));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(child.wait().unwrap().success());
        assert!(vdir(&src, 1).join(INDEX).exists());
        most
    };
    assert_eq!(most_threads_seen(1), 2, "main thread + 1 worker");
    assert_eq!(most_threads_seen(6), 7, "main thread + 6 workers");
}

/// The keys of every `--json` result are the ones docs/FORMATS.md §9 lists (its
/// `conformance-json-keys` block), no more and no fewer.
#[test]
fn json_results_have_the_documented_keys() {
    let doc = fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMATS.md")).unwrap();
    let block: Vec<&str> = doc.lines().skip_while(|l| *l != "```conformance-json-keys").skip(1).take_while(|l| !l.starts_with("```")).collect();
    let documented = |tool: &str| -> std::collections::BTreeSet<String> {
        let line = block.iter().find_map(|l| l.strip_prefix(&format!("{tool}:"))).unwrap_or_else(|| panic!("FORMATS §9 lists no keys for {tool}"));
        line.split_whitespace().map(String::from).collect()
    };
    let keys = |v: &Value| -> std::collections::BTreeSet<String> { v.as_object().expect("a JSON object").keys().cloned().collect() };

    let t = TestDir::new("json_keys");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    let delta = publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    let full = publish(&c.ckpts[1], &c.ckpts[2], &src, 2, &["--full"]);
    for r in [&delta, &full] {
        assert_eq!(keys(r), documented("delta-diff"), "delta-diff --json ({})", r["kind"]);
    }
    let adv = run(ADVANCE, [src.s(), "2", "--json"]).ok().json();
    assert_eq!(keys(&adv), documented("pointer-advance"));
    let local = t.join("local");
    for target in ["1", "latest", "latest"] {
        let r = apply(&local, Some(&c.ckpts[0]), &src, target, &["--json"]).ok().json();
        assert_eq!(keys(&r), documented("delta-apply"), "delta-apply --json --target {target}");
    }
}

// ================================================================================================
// content samples (docs/FORMATS.md §4): which weights a version was made against and holds
// ================================================================================================

const LM_HEAD: &str = "lm_head.weight";

/// Flip one byte of `tensor`'s data in a checkpoint file, in place (same size, headers intact).
fn flip_tensor_byte(file: &Path, tensor: &str, at: usize) {
    let st = StFile::read(file);
    let r = st.range(tensor);
    assert!(at < r.len());
    let mut bytes = fs::read(file).unwrap();
    bytes[r.start + at] ^= 0x5a;
    fs::write(file, bytes).unwrap();
}

#[test]
fn diff_refuses_an_old_that_is_not_the_published_base() {
    let t = TestDir::new("diff_old_not_base");
    let c = make_chain(&t.path, 3, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &[]);
    // Version 2 of a trainer that diffed against its step-0 checkpoint instead of step 1: every
    // host would patch version 1's bytes with a delta made against version 0's.
    run(DIFF, [c.ckpts[0].s(), c.ckpts[2].s(), "--publish", src.s(), "--version", "2"]).code(5).stderr_contains(c.ckpts[0].s()).stderr_contains("other weights than version 1");
    assert!(!vdir(&src, 2).exists(), "nothing written");
    publish(&c.ckpts[1], &c.ckpts[2], &src, 2, &[]);
    // A full version records its sample too.
    publish(&c.ckpts[2], &c.ckpts[2], &src, 3, &["--full"]);
    run(DIFF, [c.ckpts[1].s(), c.ckpts[3].s(), "--publish", src.s(), "--version", "4"]).code(5).stderr_contains("version 3");
    publish(&c.ckpts[2], &c.ckpts[3], &src, 4, &[]);
    // Not checked: base 0 (the engine's own checkpoint), a base not in SRC, one without a sample.
    publish(&c.ckpts[1], &c.ckpts[3], &src, 5, &["--base-version", "0"]);
    publish(&c.ckpts[1], &c.ckpts[3], &src, 7, &["--base-version", "6"]);
    let index = vdir(&src, 4).join(INDEX);
    let mut v = read_json(&index);
    v["metadata"].as_object_mut().unwrap().remove("sample");
    fs::write(&index, serde_json::to_vec(&v).unwrap()).unwrap();
    publish(&c.ckpts[0], &c.ckpts[3], &src, 8, &["--base-version", "4"]);
    // A sample key that is not 32 hex digits is a damaged index.
    v["metadata"]["sample"] = json!("not-a-sample");
    fs::write(&index, serde_json::to_vec(&v).unwrap()).unwrap();
    run(ADVANCE, [src.s(), "4"]).code(3).stderr_contains("metadata.sample");
}

/// A host whose --base holds other weights than the trainer started from (another revision of
/// the same model: same names, shapes and dtypes) is refused before anything is copied. Before,
/// with `overwrite` the apply succeeded and served the wrong BASE's bytes wherever the deltas
/// did not write (here: lm_head and the norms, which training never changes).
#[test]
fn apply_refuses_a_base_that_is_not_the_trainers() {
    let t = TestDir::new("apply_wrong_base");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    for v in 1..=2u64 {
        publish(&c.ckpts[v as usize - 1], &c.ckpts[v as usize], &src, v, &["--encoding", "overwrite"]);
    }
    let other = t.join("other-base");
    write_checkpoint(&other, &base_model(99), 1);
    let local = t.join("local");
    for wrong in [&other, &c.ckpts[1]] {
        apply(&local, Some(wrong), &src, "2", &[]).code(5).stderr_contains(wrong.s()).stderr_contains("--base holds other weights");
        assert!(!local.join(SINGLE).exists() && !local.join(".weight_sync/state.json").exists(), "nothing copied");
    }
    // A LOCAL at version 0 holding the wrong BASE (seeded by an older tool): not patched either.
    fs::create_dir_all(local.join(".weight_sync")).unwrap();
    fs::copy(other.join(SINGLE), local.join(SINGLE)).unwrap();
    fs::write(local.join(".weight_sync/state.json"), r#"{"version":"000000"}"#).unwrap();
    apply(&local, Some(&other), &src, "2", &[]).code(5).stderr_contains("--base holds other weights");
    assert_eq!(state_version(&local), "000000");
    // The right BASE: the LOCAL is taken as foreign, reseeded and patched.
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    assert!(r["foreign_reason"].as_str().unwrap().contains("content sample"), "{r}");
    assert_eq!(r["seeded_from"], 0);
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

/// LOCAL's state and headers check out, but its bytes are not its version's (edited in place,
/// or rotted): the next delta is not patched onto them. LOCAL is reseeded and replayed. Before,
/// a byte of a tensor no delta touches stayed wrong forever.
#[test]
fn apply_reseeds_a_local_whose_bytes_are_not_its_version() {
    let t = TestDir::new("apply_diverged");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish_chain(&c, &src);
    let local = t.join("local");
    apply(&local, Some(&c.ckpts[0]), &src, "1", &[]).ok();
    flip_tensor_byte(&local.join(SINGLE), LM_HEAD, 0);
    let r = apply(&local, Some(&c.ckpts[0]), &src, "2", &["--json"]).ok().json();
    let why = r["foreign_reason"].as_str().unwrap_or_else(|| panic!("{r}"));
    assert!(why.contains("content sample") && why.contains("version 1"), "{why}");
    assert_eq!((r["seeded_from"].clone(), applied(&r)), (json!(0), vec![1, 2]), "{r}");
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

/// A chain whose links do not meet: version 2 claims base 1 but was made against version 0's
/// weights (published where version 1 was not, then moved in). Its checksums hold for what it
/// patches; the tensors it leaves alone are not version 2's. The end-to-end sample refuses to
/// record it (exit 7, state not advanced), folded or one version at a time.
#[test]
fn apply_refuses_a_chain_whose_links_do_not_meet() {
    let t = TestDir::new("apply_links");
    let a = base_model(7);
    let m1 = step(&a, 1);
    // Version 2 = version 1 with lm_head back at its base value... and version 1 changed lm_head.
    let mut m1 = m1;
    m1.iter_mut().find(|x| x.name == LM_HEAD).unwrap().data[0] ^= 1;
    let m2: Model = m1.iter().map(|x| if x.name == LM_HEAD { a.iter().find(|y| y.name == LM_HEAD).unwrap().clone() } else { x.clone() }).collect();
    let (c0, c1, c2) = (t.join("c0"), t.join("c1"), t.join("c2"));
    write_checkpoint(&c0, &a, 1);
    write_checkpoint(&c1, &m1, 1);
    write_checkpoint(&c2, &m2, 1);
    let (src, elsewhere) = (t.join("src"), t.join("elsewhere"));
    publish(&c0, &c1, &src, 1, &["--encoding", "overwrite"]);
    publish(&c0, &c2, &elsewhere, 2, &["--encoding", "overwrite", "--base-version", "1"]);
    fs::rename(vdir(&elsewhere, 2), vdir(&src, 2)).unwrap();
    let local = t.join("local");
    apply(&local, Some(&c0), &src, "2", &[]).code(7).stderr_contains("content sample").stderr_contains("version 2 records");
    assert!(intent_exists(&local), "not recorded: the apply intent stays and the next run reseeds");
    apply(&local, Some(&c0), &src, "1", &[]).ok();
    assert_holds(&local, &m1);
    apply(&local, Some(&c0), &src, "2", &[]).code(7).stderr_contains("content sample");
}

/// A full version published again under the same number with other weights but the same layout
/// (a trainer restarted without a run id) is no longer taken for the one LOCAL holds: its index
/// records its content sample, so its fingerprint changes.
#[test]
fn apply_notices_a_full_version_republished_with_other_weights() {
    let t = TestDir::new("apply_full_again");
    let c = make_chain(&t.path, 2, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--full"]);
    let local = t.join("local");
    apply(&local, None, &src, "1", &[]).ok();
    fs::remove_dir_all(vdir(&src, 1)).unwrap();
    publish(&c.ckpts[0], &c.ckpts[2], &src, 1, &["--full"]);
    let r = apply(&local, None, &src, "1", &["--json"]).ok().json();
    assert_eq!(r["noop"], false, "{r}");
    assert!(r["foreign_reason"].as_str().unwrap().contains("published again"), "{r}");
    assert_local_is(&local, &c.ckpts[2], &c.models[2]);
}

/// A full version whose files no longer hold what its index records (a byte changed in place
/// on the shared directory) is refused before LOCAL is touched.
#[test]
fn apply_refuses_a_full_version_whose_files_are_not_its_sample() {
    let t = TestDir::new("apply_full_rot");
    let c = make_chain(&t.path, 1, 1);
    let src = t.join("src");
    publish(&c.ckpts[0], &c.ckpts[1], &src, 1, &["--full"]);
    flip_tensor_byte(&vdir(&src, 1).join(SINGLE), LM_HEAD, 8191);
    let local = t.join("local");
    apply(&local, None, &src, "1", &[]).code(7).stderr_contains("content sample").stderr_contains(vdir(&src, 1).s());
    assert!(!local.join(SINGLE).exists(), "nothing copied");
}
