//! docs/FORMATS.md is the specification: every `conformance-*` block in it is checked against
//! the code here, so the text and the implementation cannot drift apart.

use disagg::apply::{Intent, SyncState};
use disagg::checkpoint::Checkpoint;
use disagg::checksum::ChecksumAlg;
use disagg::pointer::Pointer;
use disagg::version::{Encoding, VersionDir, VersionKind};
use std::collections::BTreeMap;

fn blocks() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMATS.md")).expect("docs/FORMATS.md");
    let mut out = BTreeMap::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(tag) = line.strip_prefix("```conformance-") {
            let body: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
            assert!(out.insert(tag.trim().to_string(), body.join("\n")).is_none(), "duplicate block {tag}");
        }
    }
    out
}

fn block(name: &str) -> String {
    blocks().remove(name).unwrap_or_else(|| panic!("docs/FORMATS.md has no ```conformance-{name} block"))
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn exit_code_table_matches_code() {
    let doc: Vec<(i32, String)> = block("exit-codes")
        .lines()
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].parse().unwrap(), cells[2].to_string())
        })
        .collect();
    let code: Vec<(i32, String)> = disagg::error::exit::TABLE.iter().map(|(c, n)| (*c, n.to_string())).collect();
    assert_eq!(doc, code);
}

#[test]
fn pointer_examples() {
    for line in block("pointer-valid").lines() {
        let p = Pointer::parse(line).unwrap_or_else(|| panic!("documented-valid pointer {line:?} rejected"));
        assert_eq!(p.to_string(), line, "round trip");
        assert!(Pointer::parse(&format!("{line}\n")).is_some());
    }
    for line in block("pointer-invalid").lines() {
        assert!(Pointer::parse(line).is_none(), "documented-invalid pointer {line:?} accepted");
    }
}

#[test]
fn overwrite_payload_example() {
    let b = block("overwrite-payload");
    let field = |k: &str| unhex(b.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim());
    let (old, new, payload) = (field("old:"), field("new:"), field("payload:"));
    let mut frame = Vec::new();
    disagg::codec::encode(Encoding::Overwrite, &old, &new, &mut frame).unwrap();
    assert_eq!(zstd::stream::decode_all(&frame[..]).unwrap(), payload, "encoder output differs from the documented payload");
    let mut local = old.clone();
    disagg::codec::apply(Encoding::Overwrite, &zstd::bulk::compress(&payload, 1).unwrap(), &mut local).unwrap();
    assert_eq!(local, new);
}

#[test]
fn checksum_examples() {
    for line in block("checksums").lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let alg: ChecksumAlg = parts[0].parse().unwrap();
        let input: &[u8] = if parts[1] == "(empty)" { b"" } else { parts[1].as_bytes() };
        assert_eq!(alg.hex(input), parts[2], "{line}");
        assert_eq!(parts[2].len(), alg.hex_len());
    }
}

#[test]
fn delta_index_example_is_read_as_documented() {
    let dir = std::env::temp_dir().join(format!("disagg-formats-{}", std::process::id()));
    let vdir = dir.join("weight_v000002");
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::write(vdir.join("model.safetensors.index.json"), block("delta-index")).unwrap();
    let v = VersionDir::open(&dir, 2).unwrap();
    assert_eq!(v.sample(), Some("7d2a91c4e8b05f36a1d9c2e4f6b8a013"));
    match v.kind {
        VersionKind::Delta(d) => {
            assert_eq!(d.base_version, 1);
            assert_eq!(d.encoding, Encoding::Xor);
            assert_eq!(d.checksum, ChecksumAlg::Xxh3_128);
            assert_eq!(d.base_sample.as_deref(), Some("1c0f8e5e3a7d4b29a6c1e0f2d3b4a596"));
        }
        VersionKind::Full => panic!("documented delta index read as a full version"),
    }
    assert_eq!(v.index.unwrap().weight_map.len(), 1);
    // The version key must match the directory.
    std::fs::rename(&vdir, dir.join("weight_v000003")).unwrap();
    assert!(VersionDir::open(&dir, 3).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sync_state_examples() {
    for line in block("state").lines() {
        let s: SyncState = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), line, "we write state.json exactly as documented");
    }
    for line in block("intent").lines() {
        let i: Intent = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&i).unwrap(), line);
    }
    for line in block("unsynced").lines() {
        let u: disagg::apply::Unsynced = serde_json::from_str(line).unwrap();
        assert_eq!(serde_json::to_string(&u).unwrap(), line);
    }
}

#[test]
fn xor_frame_header_and_window() {
    let b = block("xor-frame-header");
    let field = |k: &str| b.lines().find_map(|l| l.strip_prefix(k)).unwrap().trim().to_string();
    let size = u64::from_str_radix(field("content_size:").trim_start_matches("0x"), 16).unwrap();
    assert_eq!(disagg::sparse_frame::frame_header(size).to_vec(), unhex(&field("header:")));
    // A real frame: 3 blocks and a bit of RL-like sparse change; the header is the documented
    // one, and a decoder limited to a 128 KiB window (the documented one) reads it.
    let len = 3 * (128 << 10) + 1000;
    let old: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
    let mut new = old.clone();
    for i in (0..len).step_by(37) {
        new[i] ^= 1 + (i % 5) as u8;
    }
    let decode_in_window = |frame: &[u8]| {
        let mut d = zstd::stream::read::Decoder::with_buffer(frame).unwrap().single_frame();
        d.window_log_max(17).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut got).unwrap();
        got
    };
    let mut frame = Vec::new();
    disagg::codec::encode(Encoding::Xor, &old, &new, &mut frame).unwrap();
    assert_eq!(frame[..14], disagg::sparse_frame::frame_header(len as u64));
    let want: Vec<u8> = old.iter().zip(&new).map(|(a, b)| a ^ b).collect();
    assert!(decode_in_window(&frame) == want, "xor frame does not decode to old ^ new");
    // overwrite: the same header over 4 + 5·count bytes, the payload of §4.3.
    let mut frame = Vec::new();
    let count = disagg::codec::encode(Encoding::Overwrite, &old, &new, &mut frame).unwrap();
    assert_eq!(frame[..14], disagg::sparse_frame::frame_header(4 + 5 * count));
    let mut payload = (count as u32).to_le_bytes().to_vec();
    let changed: Vec<usize> = (0..len).filter(|&i| old[i] != new[i]).collect();
    payload.extend(changed.iter().flat_map(|&i| (i as u32).to_le_bytes()));
    payload.extend(changed.iter().map(|&i| new[i]));
    assert!(decode_in_window(&frame) == payload, "overwrite frame does not decode to the §4.3 payload");
    // An empty tensor: the header and one empty raw last block.
    let mut empty = Vec::new();
    disagg::codec::encode(Encoding::Xor, &[], &[], &mut empty).unwrap();
    let mut want = disagg::sparse_frame::frame_header(0).to_vec();
    want.extend([1, 0, 0]);
    assert_eq!(empty, want);
    assert!(zstd::stream::decode_all(&empty[..]).unwrap().is_empty());
}

#[test]
fn scratch_spill_budget_is_the_documented_one() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/FORMATS.md")).expect("docs/FORMATS.md");
    let said = format!("its {} MiB in-memory budget", disagg::diff::IN_MEMORY_BUDGET >> 20);
    assert!(text.contains(&said), "docs/FORMATS.md §1 should say {said:?}");
    assert_eq!(disagg::diff::IN_MEMORY_BUDGET % (1 << 20), 0);
}

#[test]
fn ckpt_limits_are_the_documented_ones() {
    use disagg::dataplane::torch_ckpt as c;
    let doc: Vec<(String, u64)> = block("ckpt-limits")
        .lines()
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].to_string(), cells[2].parse().unwrap())
        })
        .collect();
    let code: Vec<(String, u64)> = [
        ("MAX_DECOMPRESSED_BYTES", c::MAX_DECOMPRESSED_BYTES),
        ("MAX_PICKLE_BYTES", c::MAX_PICKLE_BYTES),
        ("MAX_PICKLE_VALUE_BYTES", c::MAX_PICKLE_VALUE_BYTES as u64),
        ("MAX_PICKLE_DEPTH", c::MAX_PICKLE_DEPTH as u64),
        ("MAX_STACK", c::MAX_STACK as u64),
        ("MAX_MEMO", c::MAX_MEMO as u64),
        ("MAX_DIMS", c::MAX_DIMS as u64),
        ("MAX_ZIP_ENTRIES", c::MAX_ZIP_ENTRIES as u64),
        ("MAX_EXPANDED_BYTES", c::MAX_EXPANDED_BYTES),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v))
    .collect();
    assert_eq!(doc, code);
}

/// Every tool's `--help` ends with examples that run it and its exit codes (the project's CLI
/// convention; the codes themselves are in the exit-code table above).
#[test]
fn every_help_shows_examples_and_exit_codes() {
    let tools = [
        ("delta-diff", env!("CARGO_BIN_EXE_delta-diff")),
        ("delta-apply", env!("CARGO_BIN_EXE_delta-apply")),
        ("pointer-advance", env!("CARGO_BIN_EXE_pointer-advance")),
        ("delta-follow", env!("CARGO_BIN_EXE_delta-follow")),
        ("delta-gc", env!("CARGO_BIN_EXE_delta-gc")),
        ("feature-ingest", env!("CARGO_BIN_EXE_feature-ingest")),
        ("ref-publish", env!("CARGO_BIN_EXE_ref-publish")),
        ("ref-tail", env!("CARGO_BIN_EXE_ref-tail")),
    ];
    for (name, bin) in tools {
        let out = std::process::Command::new(bin).arg("--help").output().unwrap();
        assert!(out.status.success(), "{name} --help exits 0");
        let help = String::from_utf8(out.stdout).unwrap();
        let examples: Vec<&str> = help.lines().skip_while(|l| *l != "Examples:").skip(1).take_while(|l| !l.is_empty()).collect();
        assert!(!examples.is_empty() && examples.iter().any(|l| l.contains(name)), "{name} --help has no examples running it:\n{help}");
        let codes = help.split("\nExit codes").nth(1).unwrap_or_default();
        assert!(codes.contains(" 0 ") && codes.contains("2 usage"), "{name} --help lists no exit codes:\n{help}");
    }
}

/// §6 "Fingerprint": the documented example directory, rebuilt from the block, fingerprints to
/// the documented value, both by the code and by the text's recipe computed here.
#[test]
fn version_fingerprint_example() {
    let b = block("fingerprint");
    let field = |k: &str| b.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_else(|| panic!("no {k}")).trim().to_string();
    let (index, name, header, data, want) = (field("index:"), field("file:"), field("header:"), unhex(&field("data:")), field("fingerprint:"));
    let root = std::env::temp_dir().join(format!("disagg-fingerprint-{}", std::process::id()));
    let vdir = root.join("weight_v000005");
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::write(vdir.join("model.safetensors.index.json"), &index).unwrap();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&data);
    std::fs::write(vdir.join(&name), &file).unwrap();

    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for part in [b"index".as_slice(), index.as_bytes(), name.as_bytes(), &(file.len() as u64).to_le_bytes(), header.as_bytes()] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    assert_eq!(format!("{:032x}", h.digest128()), want, "the recipe in the text");
    let fingerprint = || {
        let v = VersionDir::open(&root, 5).unwrap();
        v.fingerprint(&v.validate_files().unwrap())
    };
    assert_eq!(fingerprint(), want, "VersionDir::fingerprint");
    // Content only: the same bytes written again (new inode, new mtime) fingerprint alike;
    // one header byte more does not.
    std::fs::remove_file(vdir.join(&name)).unwrap();
    std::fs::write(vdir.join(&name), &file).unwrap();
    assert_eq!(fingerprint(), want);
    let mut other = ((header.len() + 1) as u64).to_le_bytes().to_vec();
    other.extend_from_slice(header.as_bytes());
    other.push(b' ');
    other.extend_from_slice(&data);
    std::fs::write(vdir.join(&name), &other).unwrap();
    assert_ne!(fingerprint(), want);
    std::fs::remove_dir_all(&root).unwrap();
}

/// §4.6: the documented checkpoint has the documented content sample, by the text's recipe
/// computed here and by `Checkpoint::content_sample`; resharding does not change it, a byte in
/// a window does.
#[test]
fn content_sample_example() {
    let b = block("content-sample");
    let tensors: Vec<(String, String, usize)> = b
        .lines()
        .filter_map(|l| l.strip_prefix("tensor:"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n: usize = f[2].trim_matches(['[', ']']).parse().unwrap();
            let size = match f[1] {
                "F32" => 4,
                "BF16" => 2,
                other => panic!("{other}"),
            };
            (f[0].to_string(), f[1].to_string(), n * size)
        })
        .collect();
    assert!(b.contains("byte i of every tensor is i mod 251"));
    let want = b.lines().find_map(|l| l.strip_prefix("sample:")).unwrap().trim().to_string();
    let data = |len: usize| (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>();

    let mut sorted = tensors.clone();
    sorted.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut part = |p: &[u8]| {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    };
    for (name, dtype, len) in &sorted {
        let d = data(*len);
        part(name.as_bytes());
        part(dtype.as_bytes());
        part(&(*len as u64).to_le_bytes());
        if *len <= 4096 {
            part(&d);
        } else {
            let w: Vec<u8> = (0..4).flat_map(|i| d[i * (len - 1024) / 3..][..1024].to_vec()).collect();
            part(&w);
        }
    }
    assert_eq!(format!("{:032x}", h.digest128()), want, "the recipe in the text");

    // The same tensors as one file and as two shards.
    let root = std::env::temp_dir().join(format!("disagg-content-sample-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let file = |names: &[&(String, String, usize)], flip: Option<usize>| {
        let mut header = serde_json::Map::new();
        let mut body = Vec::new();
        for (name, dtype, len) in names {
            let n = len / if dtype == "F32" { 4 } else { 2 };
            header.insert(name.clone(), serde_json::json!({"dtype": dtype, "shape": [n], "data_offsets": [body.len(), body.len() + len]}));
            body.extend(data(*len));
        }
        if let Some(at) = flip {
            body[at] ^= 1;
        }
        let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(body);
        out
    };
    let all: Vec<&(String, String, usize)> = tensors.iter().collect();
    std::fs::create_dir_all(root.join("one")).unwrap();
    std::fs::write(root.join("one/model.safetensors"), file(&all, None)).unwrap();
    assert_eq!(Checkpoint::open(root.join("one")).unwrap().content_sample(), want, "Checkpoint::content_sample");
    std::fs::create_dir_all(root.join("two")).unwrap();
    std::fs::write(root.join("two/a.safetensors"), file(&all[..1], None)).unwrap();
    std::fs::write(root.join("two/b.safetensors"), file(&all[1..], None)).unwrap();
    assert_eq!(Checkpoint::open(root.join("two")).unwrap().content_sample(), want, "sharding does not enter it");
    std::fs::write(root.join("one/model.safetensors"), file(&all, Some(8 + 5))).unwrap();
    assert_ne!(Checkpoint::open(root.join("one")).unwrap().content_sample(), want, "a byte in a window does");
    std::fs::remove_dir_all(&root).unwrap();
}
