//! Shared helpers for the weight-plane integration tests: temp dirs, running the real binaries,
//! small assertions, and hand-written safetensors fixtures (no library code is used to build or
//! check them, so the tests are independent of the implementation they test).

#![allow(dead_code)]

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const DIFF: &str = env!("CARGO_BIN_EXE_delta-diff");
pub const ADVANCE: &str = env!("CARGO_BIN_EXE_pointer-advance");
pub const APPLY: &str = env!("CARGO_BIN_EXE_delta-apply");
pub const FOLLOW: &str = env!("CARGO_BIN_EXE_delta-follow");

pub const INDEX: &str = "model.safetensors.index.json";
pub const SINGLE: &str = "model.safetensors";

// ------------------------------------------------------------------------------------------------
// temp dirs
// ------------------------------------------------------------------------------------------------

/// A fresh directory per test, removed when the test passes (kept for inspection when it fails).
pub struct TestDir {
    pub path: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestDir {
    pub fn new(name: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("disagg-wp-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// `&str` of a UTF-8 path, for argument lists.
pub trait S {
    fn s(&self) -> &str;
}
impl S for Path {
    fn s(&self) -> &str {
        self.to_str().expect("UTF-8 temp path")
    }
}
impl S for PathBuf {
    fn s(&self) -> &str {
        self.to_str().expect("UTF-8 temp path")
    }
}

// ------------------------------------------------------------------------------------------------
// running binaries
// ------------------------------------------------------------------------------------------------

/// A finished command with its command line, for readable failure messages.
pub struct Run {
    pub cmdline: String,
    pub out: Output,
}

fn cmdline<I: IntoIterator<Item = S2>, S2: AsRef<OsStr>>(bin: &str, args: I) -> (Command, String) {
    let mut c = Command::new(bin);
    let mut line = Path::new(bin).file_name().unwrap().to_string_lossy().into_owned();
    for a in args {
        line.push(' ');
        line.push_str(&a.as_ref().to_string_lossy());
        c.arg(a);
    }
    (c, line)
}

pub fn run<I: IntoIterator<Item = S2>, S2: AsRef<OsStr>>(bin: &str, args: I) -> Run {
    run_env(bin, args, &[])
}

pub fn run_env<I: IntoIterator<Item = S2>, S2: AsRef<OsStr>>(bin: &str, args: I, env: &[(&str, &str)]) -> Run {
    let (mut c, cmdline) = cmdline(bin, args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    Run { cmdline, out }
}

/// Start a command without waiting (stdout and stderr captured).
pub fn spawn<I: IntoIterator<Item = S2>, S2: AsRef<OsStr>>(bin: &str, args: I) -> (std::process::Child, String) {
    let (mut c, line) = cmdline(bin, args);
    let child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    (child, line)
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    fn describe(&self) -> String {
        format!("`{}` exited {:?}\n--- stdout\n{}--- stderr\n{}", self.cmdline, self.out.status.code(), self.stdout(), self.stderr())
    }
    #[track_caller]
    pub fn code(&self, code: i32) -> &Self {
        if self.out.status.code() != Some(code) {
            panic!("expected exit {code}; {}", self.describe());
        }
        self
    }
    #[track_caller]
    pub fn ok(&self) -> &Self {
        self.code(0)
    }
    #[track_caller]
    pub fn stderr_contains(&self, needle: &str) -> &Self {
        if !self.stderr().contains(needle) {
            panic!("stderr should contain {needle:?}; {}", self.describe());
        }
        self
    }
    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.out.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}); {}", self.describe()))
    }
}

// ------------------------------------------------------------------------------------------------
// deterministic data
// ------------------------------------------------------------------------------------------------

/// xorshift64*: tiny, deterministic, good enough for fixture bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = (self.next_u64() >> 56) as u8;
        }
    }
}

// ------------------------------------------------------------------------------------------------
// models and safetensors files
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub type Model = Vec<Tensor>;

fn dtype_size(dtype: &str) -> usize {
    match dtype {
        "BF16" | "F16" => 2,
        "F32" | "I32" => 4,
        "I64" | "F64" => 8,
        "U8" | "I8" => 1,
        other => panic!("dtype {other} not used by these tests"),
    }
}

pub fn tensor(name: &str, dtype: &str, shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product::<usize>() * dtype_size(dtype);
    let mut data = vec![0u8; n];
    rng.fill(&mut data);
    Tensor { name: name.into(), dtype: dtype.into(), shape: shape.to_vec(), data }
}

/// A ~60 KB model: BF16 matrices, F32 norms, an I64 counter.
pub fn base_model(seed: u64) -> Model {
    let mut r = Rng::new(seed);
    vec![
        tensor("model.embed_tokens.weight", "BF16", &[64, 64], &mut r),
        tensor("model.layers.0.mlp.up_proj.weight", "BF16", &[128, 64], &mut r),
        tensor("model.layers.0.input_layernorm.weight", "F32", &[64], &mut r),
        tensor("model.layers.1.mlp.up_proj.weight", "BF16", &[128, 64], &mut r),
        tensor("model.layers.1.input_layernorm.weight", "F32", &[64], &mut r),
        tensor("lm_head.weight", "BF16", &[64, 64], &mut r),
        tensor("model.step_counter", "I64", &[4], &mut r),
    ]
}

/// Names `step` changes; the others stay byte-identical.
pub fn changes_in_step(name: &str) -> bool {
    name.contains("mlp") || name.contains("embed") || name.contains("step_counter")
}

/// One "training step": ~2 % of the bytes of the mlp/embedding tensors change, the counter
/// increments, norms and lm_head are untouched.
pub fn step(model: &Model, seed: u64) -> Model {
    let mut r = Rng::new(seed);
    model
        .iter()
        .map(|t| {
            let mut t = t.clone();
            if t.name.contains("step_counter") {
                let v = i64::from_le_bytes(t.data[..8].try_into().unwrap()).wrapping_add(1);
                t.data[..8].copy_from_slice(&v.to_le_bytes());
            } else if changes_in_step(&t.name) {
                for b in t.data.iter_mut() {
                    if r.below(50) == 0 {
                        *b ^= 1 + r.below(255) as u8;
                    }
                }
            }
            t
        })
        .collect()
}

/// Bytes of a safetensors file: 8-byte LE header length, JSON header padded with spaces to
/// 8-byte alignment, data in the given order.
pub fn safetensors_bytes(tensors: &[&Tensor], metadata: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let mut header = Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), json!(m));
    }
    let mut off = 0usize;
    for t in tensors {
        header.insert(t.name.clone(), json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [off, off + t.data.len()]}));
        off += t.data.len();
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).unwrap();
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

const CONFIG: &str = "{\"model_type\": \"tiny\", \"hidden_size\": 64}\n";
const TOKENIZER: &str = "{\"version\": \"1.0\"}\n";

/// Write an HF checkpoint: `model.safetensors` (shards == 1) or HF-named shards plus an index,
/// and config/tokenizer files.
pub fn write_checkpoint(dir: &Path, model: &Model, shards: usize) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("config.json"), CONFIG).unwrap();
    fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
    if shards == 1 {
        let all: Vec<&Tensor> = model.iter().collect();
        fs::write(dir.join(SINGLE), safetensors_bytes(&all, None)).unwrap();
        return;
    }
    let mut weight_map = Map::new();
    for s in 0..shards {
        let name = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let mine: Vec<&Tensor> = model.iter().enumerate().filter(|(i, _)| i % shards == s).map(|(_, t)| t).collect();
        for t in &mine {
            weight_map.insert(t.name.clone(), json!(name));
        }
        fs::write(dir.join(&name), safetensors_bytes(&mine, None)).unwrap();
    }
    let total: usize = model.iter().map(|t| t.data.len()).sum();
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    fs::write(dir.join(INDEX), serde_json::to_vec_pretty(&index).unwrap()).unwrap();
}

/// A parsed safetensors file (parsed here, not by the library under test).
pub struct StFile {
    pub header: Map<String, Value>,
    pub data_start: usize,
    pub bytes: Vec<u8>,
}

impl StFile {
    #[track_caller]
    pub fn read(path: &Path) -> StFile {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap_or_else(|e| panic!("{}: header: {e}", path.display()));
        StFile { header, data_start: 8 + n, bytes }
    }
    pub fn names(&self) -> Vec<String> {
        self.header.keys().filter(|k| *k != "__metadata__").cloned().collect()
    }
    pub fn metadata(&self) -> Map<String, Value> {
        self.header.get("__metadata__").and_then(Value::as_object).cloned().unwrap_or_default()
    }
    pub fn range(&self, name: &str) -> std::ops::Range<usize> {
        let o = &self.header[name]["data_offsets"];
        self.data_start + o[0].as_u64().unwrap() as usize..self.data_start + o[1].as_u64().unwrap() as usize
    }
    pub fn data(&self, name: &str) -> &[u8] {
        &self.bytes[self.range(name)]
    }
    pub fn dtype(&self, name: &str) -> String {
        self.header[name]["dtype"].as_str().unwrap().to_string()
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.header[name]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }
}

/// name -> (dtype, shape, bytes) over every `*.safetensors` file of a checkpoint directory.
pub type TensorMap = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

pub fn read_tensors(dir: &Path) -> TensorMap {
    let mut out = TensorMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && !name.starts_with('.') {
            let f = StFile::read(&p);
            for t in f.names() {
                let prev = out.insert(t.clone(), (f.dtype(&t), f.shape(&t), f.data(&t).to_vec()));
                assert!(prev.is_none(), "tensor {t} twice in {}", dir.display());
            }
        }
    }
    out
}

pub fn model_map(model: &Model) -> TensorMap {
    model.iter().map(|t| (t.name.clone(), (t.dtype.clone(), t.shape.clone(), t.data.clone()))).collect()
}

/// The checkpoint in `dir` holds exactly `model`'s tensors, byte for byte.
#[track_caller]
pub fn assert_holds(dir: &Path, model: &Model) {
    let got = read_tensors(dir);
    let want = model_map(model);
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{}: tensor names", dir.display());
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!((&g.0, &g.1), (&w.0, &w.1), "{}: {name} dtype/shape", dir.display());
        let diff = g.2.iter().zip(&w.2).filter(|(a, b)| a != b).count();
        assert!(diff == 0, "{}: tensor {name} differs in {diff} of {} bytes", dir.display(), w.2.len());
    }
}

/// Every regular file under `dir` (relative path -> bytes), recursively, for before/after checks.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = fs::read_dir(d) else { return };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), fs::read(&p).unwrap());
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// No in-progress temp file (`.NAME.tmp-...`) anywhere under `dir`.
#[track_caller]
pub fn assert_no_temp_files(dir: &Path) {
    for p in snapshot(dir).keys() {
        let n = p.file_name().unwrap().to_string_lossy();
        assert!(!(n.starts_with('.') && n.contains(".tmp-")), "temp file left behind: {}", dir.join(p).display());
    }
}

/// Names of the files directly in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// adler32 exactly as zlib computes it, written out here.
pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

pub fn vdir(src: &Path, v: u64) -> PathBuf {
    src.join(format!("weight_v{v:06}"))
}

// ------------------------------------------------------------------------------------------------
// fixtures built from the pieces above
// ------------------------------------------------------------------------------------------------

/// Checkpoints ckpt0 (the base) .. ckptN, each one training step after the previous.
pub struct Chain {
    pub ckpts: Vec<PathBuf>,
    pub models: Vec<Model>,
}

pub fn make_chain(root: &Path, steps: usize, shards: usize) -> Chain {
    let mut models = vec![base_model(7)];
    for i in 0..steps {
        let next = step(&models[i], 1000 + i as u64);
        models.push(next);
    }
    let ckpts: Vec<PathBuf> = (0..=steps).map(|i| root.join(format!("ckpt{i}"))).collect();
    for (d, m) in ckpts.iter().zip(&models) {
        write_checkpoint(d, m, shards);
    }
    Chain { ckpts, models }
}

/// `delta-diff OLD NEW --publish SRC --version V EXTRA.. --json`, which must succeed.
#[track_caller]
pub fn publish(old: &Path, new: &Path, src: &Path, version: u64, extra: &[&str]) -> Value {
    let v = version.to_string();
    let mut args = vec![old.s(), new.s(), "--publish", src.s(), "--version", &v, "--json"];
    args.extend_from_slice(extra);
    run(DIFF, &args).ok().json()
}

/// Publish ckpt1..ckptN of `chain` as delta versions 1..N under `src`.
pub fn publish_chain(chain: &Chain, src: &Path) {
    for v in 1..chain.ckpts.len() {
        publish(&chain.ckpts[v - 1], &chain.ckpts[v], src, v as u64, &[]);
    }
}

#[track_caller]
pub fn state_version(local: &Path) -> String {
    read_json(&local.join(".weight_sync/state.json"))["version"].as_str().expect("state.json version is a string").to_string()
}

pub fn intent_exists(local: &Path) -> bool {
    local.join(".weight_sync/intent.json").exists()
}

// ------------------------------------------------------------------------------------------------
// delta files: reading and tampering
// ------------------------------------------------------------------------------------------------

/// The data files of a published version (everything but the index), sorted.
pub fn data_files(src: &Path, v: u64) -> Vec<PathBuf> {
    let d = vdir(src, v);
    file_names(&d).into_iter().filter(|n| n != INDEX).map(|n| d.join(n)).collect()
}

/// The data file of version `v` that holds `tensor`, per the index.
pub fn delta_file_of(src: &Path, v: u64, tensor: &str) -> PathBuf {
    let index = read_json(&vdir(src, v).join(INDEX));
    vdir(src, v).join(index["weight_map"][tensor].as_str().unwrap_or_else(|| panic!("{tensor} not in v{v}'s weight_map")))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Change one hex digit of `tensor`'s checksum in the file's `__metadata__` (same length, so
/// the file stays a valid safetensors file).
pub fn tamper_checksum(path: &Path, tensor: &str) {
    let st = StFile::read(path);
    let hex = st.metadata()[tensor].as_str().unwrap().to_string();
    let mut bytes = st.bytes.clone();
    let pos = 8 + find(&bytes[8..st.data_start], hex.as_bytes()).expect("checksum text in header");
    bytes[pos] = if bytes[pos] == b'0' { b'1' } else { b'0' };
    fs::write(path, bytes).unwrap();
}

/// Overwrite the zstd magic number of `tensor`'s payload, leaving everything else valid.
pub fn corrupt_frame(path: &Path, tensor: &str) {
    let st = StFile::read(path);
    let r = st.range(tensor);
    let mut bytes = st.bytes.clone();
    assert_eq!(&bytes[r.start..r.start + 4], &[0x28, 0xb5, 0x2f, 0xfd], "payload starts with the zstd magic");
    bytes[r.start..r.start + 4].copy_from_slice(&[0, 0, 0, 0]);
    fs::write(path, bytes).unwrap();
}

/// One zstd frame (level 1) with the content size in its header, as the spec requires.
pub fn zstd_frame(raw: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    enc.include_contentsize(true).unwrap();
    enc.set_pledged_src_size(Some(raw.len() as u64)).unwrap();
    enc.write_all(raw).unwrap();
    enc.finish().unwrap()
}

/// Decode `tensor`'s payload, let `f` change it, and write the file back with a fresh valid
/// frame (and the original checksums), so only the checksum check can catch it.
pub fn rewrite_payload(path: &Path, tensor: &str, f: impl FnOnce(&mut Vec<u8>)) {
    let st = StFile::read(path);
    let meta: BTreeMap<String, String> = st.metadata().into_iter().map(|(k, v)| (k, v.as_str().unwrap().to_string())).collect();
    let mut f = Some(f);
    let tensors: Vec<Tensor> = st
        .names()
        .into_iter()
        .map(|n| {
            let mut data = st.data(&n).to_vec();
            if n == tensor {
                let mut raw = zstd::stream::decode_all(&data[..]).unwrap();
                (f.take().unwrap())(&mut raw);
                data = zstd_frame(&raw);
            }
            Tensor { name: n, dtype: "U8".into(), shape: vec![data.len()], data }
        })
        .collect();
    assert!(f.is_none(), "{tensor} not in {}", path.display());
    let refs: Vec<&Tensor> = tensors.iter().collect();
    fs::write(path, safetensors_bytes(&refs, Some(&meta))).unwrap();
}

/// The content sample of a model (docs/FORMATS.md §4, "Content sample"), written here from the
/// text: xxh3-128 over parts (u64 LE length, bytes): per tensor in byte order of names, its
/// name, dtype, byte length (8 bytes LE) and its bytes, whole up to 4096, else four 1024-byte
/// windows at ⌊i·(L−1024)/3⌋.
pub fn content_sample(model: &Model) -> String {
    let mut sorted: Vec<&Tensor> = model.iter().collect();
    sorted.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut part = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    for t in sorted {
        part(t.name.as_bytes());
        part(t.dtype.as_bytes());
        part(&(t.data.len() as u64).to_le_bytes());
        let l = t.data.len();
        if l <= 4096 {
            part(&t.data);
        } else {
            let mut w = Vec::with_capacity(4096);
            for i in 0..4 {
                let at = i * (l - 1024) / 3;
                w.extend_from_slice(&t.data[at..at + 1024]);
            }
            part(&w);
        }
    }
    format!("{:032x}", h.digest128())
}
