//! `feature-ingest`: SpecForge offline feature files into the feature store, plus refs.
//!
//! Inputs are `torch.save` files (`.ckpt`, `.ckpt.gz`) and `.safetensors`, found by walking INPUT
//! once (O(N) in the number of files). Each file is validated (archive structure, pickle,
//! storages, NaN in float tensors); a bad file is reported with its reason and skipped, or is
//! fatal with `--strict`. Files are processed in parallel. The sample id is the path relative
//! to INPUT without its extension, `/` replaced by `__` and any other character outside
//! `[A-Za-z0-9._-]` by `_`. A rerun skips samples whose current object is intact and was made
//! from the same source (size and mtime recorded in the object, or the same inode for links).
//! `--mode move` removes sources only once every ref is committed (manifest and its `.moved`
//! journal, or the closed stream), so a failure or kill before then leaves INPUT whole; a
//! rerun publishing into the same producer appends only refs whose sample id is not there yet
//! with the same feature keys (a sample stored again, as a new generation, is published again).
//! Into a closed stream nothing is stored: a sample that would be stored again is refused first.

use super::channel::{self, Layout, RefProducer};
use super::sample_ref::{FeatureSpec, Manifest, SampleRef, SCHEMA_VERSION};
use super::store::{Dtype, FeatureStore, PlaceMode, StoreOptions, StoredObject, TensorData};
use super::torch_ckpt;
use crate::error::{Error, IoContext, Result};
use crate::fsio;
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Map};
use std::collections::BTreeMap;
use std::fs;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Input file kinds, by name.
const EXTENSIONS: [&str; 3] = [".ckpt.gz", ".ckpt", ".safetensors"];

/// Options of `feature-ingest`.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub input: PathBuf,
    pub store: PathBuf,
    pub store_id: Option<String>,
    pub run_id: Option<String>,
    pub manifest: Option<PathBuf>,
    pub publish: Option<PathBuf>,
    pub producer: String,
    pub mode: PlaceMode,
    pub strategy: String,
    pub strict: bool,
    /// Keep objects on release (offline, multi-epoch); false: consume-once.
    pub retain_on_release: bool,
    pub quota_bytes: Option<u64>,
    pub quota_wait: Duration,
    pub json: bool,
}

/// One file that was skipped as invalid.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InvalidFile {
    pub file: String,
    pub reason: String,
}

/// What `feature-ingest` did.
#[derive(Debug, Clone, Serialize)]
pub struct IngestSummary {
    pub files: usize,
    pub ingested: usize,
    pub skipped_intact: usize,
    pub invalid: usize,
    pub invalid_files: Vec<InvalidFile>,
    pub bytes_in: u64,
    pub seconds: f64,
    pub gb_per_s: f64,
    pub refs: usize,
    pub published: u64,
}

/// The sample id of an input file, from its path relative to INPUT.
pub fn sample_id_for(rel: &str) -> String {
    let stem = EXTENSIONS.iter().find_map(|e| rel.strip_suffix(e)).unwrap_or(rel);
    let mut id: String = stem.replace('/', "__").chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' { c } else { '_' }).collect();
    if id.starts_with('.') {
        id.replace_range(0..1, "_");
    }
    id
}

/// An input file: the path it was found at (what messages name), where its bytes are (a
/// symbolic link's target, so a copy or a hard link takes the file, not the link), its path
/// relative to INPUT (the sample id's source), and whether it was reached through a link.
struct InputFile {
    found: PathBuf,
    path: PathBuf,
    rel: String,
    linked: bool,
    /// Why it cannot be read at all (a link to nothing): reported and skipped like any invalid
    /// file, or fatal with `--strict`, rather than ending the whole ingest.
    broken: Option<String>,
}

/// `path` if it is a regular file, its target if it is a link to one (a link to nothing, or to
/// a directory, is not an input file: directories are walked only where they really are).
fn resolve_input(path: &Path, kind: fs::FileType) -> Result<Option<(PathBuf, bool)>> {
    Ok(match fsio::regular_file_through_links(path, kind)? {
        Some(false) => Some((path.to_path_buf(), false)),
        Some(true) => Some((fs::canonicalize(path).at(path)?, true)),
        None => None,
    })
}

fn list_inputs(input: &Path) -> Result<Vec<InputFile>> {
    let meta = fs::metadata(input).at(input)?;
    if meta.is_file() {
        let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let kind = fs::symlink_metadata(input).at(input)?.file_type();
        let (path, linked) = resolve_input(input, kind)?.ok_or_else(|| Error::not_found(input, "no longer a file"))?;
        return Ok(vec![InputFile { found: input.to_path_buf(), path, rel: name, linked, broken: None }]);
    }
    let mut out = Vec::new();
    let mut dirs = vec![input.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for ent in fs::read_dir(&dir).at(&dir)? {
            let ent = ent.at(&dir)?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let ft = ent.file_type().at(ent.path())?;
            if ft.is_dir() {
                dirs.push(ent.path());
            } else if EXTENSIONS.iter().any(|e| name.ends_with(e)) {
                let rel = ent.path().strip_prefix(input).map(|p| p.to_string_lossy().into_owned()).unwrap_or(name);
                match resolve_input(&ent.path(), ft) {
                    Ok(Some((path, linked))) => out.push(InputFile { found: ent.path(), path, rel, linked, broken: None }),
                    Ok(None) => {}
                    Err(Error::NotFound { reason, .. }) => out.push(InputFile { found: ent.path(), path: ent.path(), rel, linked: true, broken: Some(reason) }),
                    Err(e) => return Err(e),
                }
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Describe a stored object as a ref (tensor-free).
pub fn ref_for_object(store: &FeatureStore, obj: &StoredObject, specs: &[(String, Dtype, Vec<usize>)], rel: &str, opts: &IngestOptions) -> SampleRef {
    let mut keys = BTreeMap::new();
    let mut fspecs = BTreeMap::new();
    let mut bytes = 0u64;
    for (name, dtype, shape) in specs {
        keys.insert(name.clone(), format!("{}#{name}", obj.key));
        fspecs.insert(
            name.clone(),
            FeatureSpec {
                name: name.clone(),
                shape: shape.iter().map(|&d| d as i64).collect(),
                dtype: dtype.torch_name().to_string(),
                device_hint: Some("cpu".into()),
                required: true,
                target_repr: None,
                target_meta: None,
            },
        );
        bytes += shape.iter().product::<usize>() as u64 * dtype.size() as u64;
    }
    let num_tokens = specs.iter().find(|s| s.0 == "input_ids").and_then(|s| s.2.last().copied()).map(|n| n as u64);
    let mut metadata = Map::new();
    metadata.insert("generation".into(), json!(obj.generation));
    metadata.insert("store_key".into(), json!(obj.key));
    if let Some(id) = &opts.store_id {
        metadata.insert("store_id".into(), json!(id));
    }
    SampleRef {
        sample_id: obj.sample_id.clone(),
        run_id: opts.run_id.clone(),
        source_task_id: Some(rel.to_string()),
        feature_store_uri: store.uri(),
        feature_keys: keys,
        feature_specs: fspecs,
        strategy: Some(opts.strategy.clone()),
        schema_version: SCHEMA_VERSION,
        target_model_version: None,
        draft_weight_version: None,
        tokenizer_version: None,
        num_tokens,
        estimated_bytes: Some(bytes),
        metadata,
    }
}

fn mtime_ns(m: &fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn mmap(path: &Path) -> Result<crate::inputmap::InputMap> {
    let f = fs::File::open(path).at(path)?;
    // Inputs and store objects are never modified in place by disagg. A concurrent external
    // writer makes us read inconsistent bytes, which validation catches, or, if it truncates
    // the file, raises SIGBUS, which crate::inputmap reports as an error naming the file.
    // Populated: every input byte is read (validation, copy), so map it all at once.
    crate::inputmap::InputMap::populated(&f, path).at(path)
}

/// Name, dtype and shape of each tensor of a sample file.
type TensorSpecs = Vec<(String, Dtype, Vec<usize>)>;

/// Tensor list of a safetensors buffer, validated by the `safetensors` crate.
fn safetensors_specs(buf: &[u8]) -> std::result::Result<(TensorSpecs, safetensors::SafeTensors<'_>), String> {
    let st = safetensors::SafeTensors::deserialize(buf).map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let mut specs = Vec::new();
    let mut tensors = st.tensors();
    tensors.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    for (name, view) in tensors {
        let dtype = Dtype::from_safetensors(view.dtype()).ok_or_else(|| format!("tensor {name}: dtype {:?} not supported", view.dtype()))?;
        specs.push((name, dtype, view.shape().to_vec()));
    }
    Ok((specs, st))
}

/// The existing object, if intact and made from this very source.
fn intact_existing(store: &FeatureStore, id: &str, src: &Path, src_meta: &fs::Metadata) -> Option<(StoredObject, TensorSpecs)> {
    let obj = store.current(id).ok()??;
    let obj_meta = fs::metadata(&obj.path).ok()?;
    let map = mmap(&obj.path).ok()?;
    let (specs, _) = safetensors_specs(&map).ok()?;
    let same_inode = obj_meta.ino() == src_meta.ino() && obj_meta.dev() == src_meta.dev();
    if !same_inode {
        let (_, meta) = safetensors::SafeTensors::read_metadata(&map).ok()?;
        let md = meta.metadata().as_ref()?;
        if md.get("disagg.source_size")? != &src_meta.len().to_string() || md.get("disagg.source_mtime_ns")? != &mtime_ns(src_meta).to_string() {
            return None;
        }
    }
    let _ = src;
    Some((obj, specs))
}

enum Outcome {
    Ingested(SampleRef, u64),
    Skipped(SampleRef),
}

/// Why a file was not ingested: its own fault (skipped, counted) or the store's (fatal).
enum Failure {
    Invalid(String),
    Fatal(Error),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Invalid(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure::Invalid(s.to_string())
    }
}

/// The stream `feature-ingest --publish` appends to, when it is closed already: no ref can join
/// it, so no sample may be stored again either (a new generation supersedes, and deletes, the
/// object that the stream's published ref names).
struct ClosedStream {
    /// `CHANNEL/producers/<producer>/closed`.
    path: PathBuf,
    producer: String,
    published: u64,
}

impl ClosedStream {
    /// `CHANNEL/producers/<producer>/closed`, read, if the stream is closed.
    fn read(channel: &Path, producer: &str) -> Result<Option<ClosedStream>> {
        let dir = channel.join(channel::PRODUCERS_DIR).join(producer);
        Ok(channel::read_closed_marker(&dir)?.map(|published| ClosedStream { path: dir.join(channel::CLOSED_FILE), producer: producer.to_string(), published }))
    }

    /// Refuse to store `id` from `src` into the store (exit 5), before anything is written.
    fn refuse(&self, src: &Path, id: &str) -> Failure {
        Failure::Fatal(Error::conflict(
            &self.path,
            format!(
                "producer {} already closed with {} refs: {} (sample {id}) is new or changed since it was stored, and storing it again would supersede the object its published ref names; nothing was stored",
                self.producer,
                self.published,
                src.display()
            ),
        ))
    }
}

/// Ingest one file. With `closed` (the stream to publish into is closed), a file whose stored
/// object is not intact is refused (after its checks, so a bad file is still reported as
/// invalid) before the store is touched.
fn ingest_one(
    store: &FeatureStore,
    src: &Path,
    rel: &str,
    opts: &IngestOptions,
    dirs: &crate::fsio::DirSync,
    closed: Option<&ClosedStream>,
) -> std::result::Result<Outcome, Failure> {
    let id = sample_id_for(rel);
    if !super::store::valid_id(&id) {
        return Err(format!("sample id {id:?} derived from the path is not usable (too long?)").into());
    }
    let src_meta = fs::metadata(src).map_err(|e| e.to_string())?;
    if let Some((obj, specs)) = intact_existing(store, &id, src, &src_meta) {
        // Reported again: make sure its names are durable (a crashed earlier run may have
        // renamed it without its directory fsyncs; for a durable one these are no-ops).
        let sample_dir = store.sample_dir(&id);
        if let Some(shard) = sample_dir.parent() {
            dirs.add(shard.to_path_buf());
            if let Some(objects) = shard.parent() {
                dirs.add(objects.to_path_buf());
            }
        }
        dirs.add(sample_dir);
        // With --mode move its source goes only once the ref is committed ([`ingest`]).
        return Ok(Outcome::Skipped(ref_for_object(store, &obj, &specs, rel, opts)));
    }
    let mut md = BTreeMap::new();
    md.insert("disagg.sample_id".to_string(), id.clone());
    md.insert("disagg.source".to_string(), rel.to_string());
    md.insert("disagg.source_size".to_string(), src_meta.len().to_string());
    md.insert("disagg.source_mtime_ns".to_string(), mtime_ns(&src_meta).to_string());
    let is_safetensors = rel.ends_with(".safetensors");
    let may_store = || closed.map_or(Ok(()), |c| Err(c.refuse(src, &id)));
    let (obj, specs) = if is_safetensors {
        let map = mmap(src).map_err(|e| e.to_string())?;
        let (specs, st) = safetensors_specs(&map)?;
        check_tensor_names(specs.iter().map(|(n, _, _)| n.as_str()))?;
        let mut tensors = Vec::with_capacity(specs.len());
        for (name, dtype, shape) in &specs {
            let view = st.tensor(name).map_err(|e| e.to_string())?;
            check_nan(name, *dtype, view.data())?;
            tensors.push(TensorData { name: name.clone(), dtype: *dtype, shape: shape.clone(), data: view.data().into() });
        }
        let copy_in = |tensors: &[TensorData<'_>]| -> std::result::Result<StoredObject, Failure> {
            check_header(tensors, &md)?;
            may_store()?;
            store.put_in(&id, tensors, &md, opts.retain_on_release, dirs).map_err(Failure::Fatal)
        };
        let obj = match opts.mode {
            PlaceMode::Copy => copy_in(&tensors)?,
            PlaceMode::Link => {
                drop(tensors);
                drop(map);
                may_store()?;
                store.put_file(&id, src, PlaceMode::Link, opts.retain_on_release).map_err(Failure::Fatal)?
            }
            // Move = hard link now, remove the source once its ref is committed: a rename
            // would take the file out of INPUT before any ref to it is durable, and a rerun
            // after a failure would then find neither the file nor a ref. Where no hard link
            // can be made (another file system) the file is stored as copy would store it,
            // with the source's size and mtime, so that a rerun still finds it intact.
            PlaceMode::Move if !same_file_system(src, store.root()) => copy_in(&tensors)?,
            PlaceMode::Move => match may_store().and_then(|()| store.put_file(&id, src, PlaceMode::Link, opts.retain_on_release).map_err(Failure::Fatal)) {
                Err(Failure::Fatal(Error::Io { source, .. })) if matches!(source.raw_os_error(), Some(libc::EXDEV | libc::EPERM | libc::EOPNOTSUPP)) => copy_in(&tensors)?,
                r => r?,
            },
        };
        (obj, specs)
    } else {
        if opts.mode == PlaceMode::Link {
            return Err(Failure::Invalid("--mode link needs .safetensors input: a torch checkpoint must be converted (use --mode copy or move)".into()));
        }
        let map = mmap(src).map_err(|e| e.to_string())?;
        // Tests change the input here, after it is mapped and before it is read (only a sleep
        // is meaningful at this point).
        let _ = crate::failpoint::hit("ingest.after_map");
        let unzipped;
        let bytes: &[u8] = if rel.ends_with(".gz") {
            unzipped = torch_ckpt::gunzip(&map).map_err(|e| e.to_string())?;
            &unzipped
        } else {
            &map
        };
        let tensors = torch_ckpt::read_checkpoint(bytes).map_err(|e| e.to_string())?;
        check_tensor_names(tensors.iter().map(|t| t.name.as_str()))?;
        for t in &tensors {
            check_nan(&t.name, t.dtype, &t.data)?;
        }
        check_header(&tensors, &md)?;
        may_store()?;
        // With --mode move the source goes only once the ref is committed ([`ingest`]).
        let obj = store.put_in(&id, &tensors, &md, opts.retain_on_release, dirs).map_err(Failure::Fatal)?;
        (obj, tensors.iter().map(|t| (t.name.clone(), t.dtype, t.shape.clone())).collect())
    };
    Ok(Outcome::Ingested(ref_for_object(store, &obj, &specs, rel, opts), src_meta.len()))
}

/// The names a feature file's tensors may have: the store writes them as safetensors header
/// keys and refs address them as `KEY#NAME`, split at the last `#` (FORMATS §10). An empty,
/// `__metadata__`, repeated (a pickle dict with a key twice) or `#`-holding name makes the file
/// invalid, reported and skipped like a truncated one, not the end of the ingest.
fn check_tensor_names<'a>(names: impl Iterator<Item = &'a str>) -> std::result::Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if name.is_empty() || name == "__metadata__" || name.contains('#') {
            return Err(format!("tensor name {name:?} cannot be stored (empty, `__metadata__`, or holding `#`, which ends a feature key's path)"));
        }
        if !seen.insert(name) {
            return Err(format!("tensor name {name:?} appears twice"));
        }
    }
    Ok(())
}

/// The object's header must fit the store's cap ([`super::store::MAX_HEADER_BYTES`]): a file
/// with too many (or too long) tensor names is invalid, not fatal.
fn check_header(tensors: &[TensorData<'_>], md: &BTreeMap<String, String>) -> std::result::Result<(), String> {
    match super::store::safetensors_header(tensors, md) {
        Ok(_) => Ok(()),
        Err(Error::Internal(why)) => Err(why),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether `a` and `b` are on one file system (a hard link between them can work).
fn same_file_system(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

fn check_nan(name: &str, dtype: Dtype, data: &[u8]) -> std::result::Result<(), String> {
    match dtype.first_nan(data) {
        Some(i) => Err(format!("tensor {name:?} has NaN at element {i}")),
        None => Ok(()),
    }
}

/// Run `feature-ingest`.
pub fn ingest(opts: &IngestOptions) -> Result<IngestSummary> {
    if opts.manifest.is_some() && opts.publish.is_some() {
        return Err(Error::Usage("--manifest and --publish are exclusive".into()));
    }
    let start = Instant::now();
    let store = FeatureStore::open(&opts.store, StoreOptions { quota_bytes: opts.quota_bytes, quota_wait: opts.quota_wait })?;
    let inputs = list_inputs(&opts.input)?;
    // A closed stream takes no new ref, and a sample stored again would need one: known before
    // anything is stored, so that a refused ingest leaves the store (and every object the
    // stream's refs name) as it was.
    let closed = match &opts.publish {
        Some(ch) => ClosedStream::read(ch, &opts.producer)?,
        None => None,
    };
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(inputs.len() as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed} ETA {eta}").expect("template"));
        Some(b)
    } else {
        None
    };
    // Duplicate sample ids (data_1.ckpt and data_1.ckpt.gz) cannot both be stored: the files
    // of one id are tried in INPUT's sorted order, one after the other, and the first that
    // ingests keeps the id; every later one is skipped naming it. An invalid file does not take
    // the id from a valid one after it.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_of: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, f) in inputs.iter().enumerate() {
        let g = *group_of.entry(sample_id_for(&f.rel)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    let dirs = crate::fsio::DirSync::default();
    // Ingest is I/O bound (reads, O_DIRECT writes, fsyncs): run more files at once than there
    // are cores so that one file's fsync overlaps other files' work.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).saturating_mul(4).clamp(4, 16);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| Error::Internal(format!("thread pool: {e}")))?;
    let one_file = |InputFile { path: src, rel, linked, broken, .. }: &InputFile| -> std::result::Result<Outcome, Failure> {
        if let Err(e) = crate::failpoint::hit("ingest.file") {
            return Err(Failure::Fatal(Error::Internal(e.to_string())));
        }
        // A stop signal: the files not started yet are left for the rerun.
        if let Some(signal) = crate::stop::requested() {
            return Err(Failure::Fatal(Error::Interrupted { signal }));
        }
        match broken {
            Some(reason) => Err(Failure::Invalid(reason.clone())),
            // Moving the link's target would take a file from wherever it lives, outside
            // INPUT perhaps; moving the link would store a link.
            None if *linked && opts.mode == PlaceMode::Move => Err(Failure::Invalid("a symbolic link: --mode move takes files, not links (use --mode copy or link)".into())),
            None => ingest_one(&store, src, rel, opts, &dirs, closed.as_ref()),
        }
    };
    let per_group: Vec<Vec<(usize, std::result::Result<Outcome, Failure>)>> = pool.install(|| {
        groups
            .par_iter()
            .map(|g| {
                let mut keeper: Option<&str> = None;
                let mut out = Vec::with_capacity(g.len());
                for &i in g {
                    let rel = &inputs[i].rel;
                    let r = match keeper {
                        Some(first) => {
                            Err(Failure::Invalid(format!("sample id {:?} of {rel} is also derived from {first}, the first valid file with it, which keeps it", sample_id_for(rel))))
                        }
                        None => one_file(&inputs[i]),
                    };
                    if let Some(b) = &bar {
                        b.inc(1);
                    }
                    if r.is_ok() {
                        keeper = Some(rel);
                    }
                    let fatal = matches!(r, Err(Failure::Fatal(_)));
                    out.push((i, r));
                    if fatal {
                        break;
                    }
                }
                out
            })
            .collect()
    });
    // Back in INPUT's order. A file its group did not get to (after a fatal error) is left for
    // the rerun, like one a stop signal kept from starting: it comes after that fatal error,
    // where the results end, and the loop below returns at the error.
    let mut slots: Vec<Option<std::result::Result<Outcome, Failure>>> = (0..inputs.len()).map(|_| None).collect();
    for (i, r) in per_group.into_iter().flatten() {
        slots[i] = Some(r);
    }
    let results: Vec<std::result::Result<Outcome, Failure>> = slots.into_iter().map_while(|r| r).collect();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // Stopped between files (crate::stop): what is stored stays, its names made durable, and
    // nothing is written or published; a rerun skips the stored files as intact.
    if let Some(signal) = crate::stop::requested() {
        pool.install(|| dirs.sync())?;
        return Err(Error::Interrupted { signal });
    }
    let mut refs = Vec::new();
    let mut summary = IngestSummary {
        files: inputs.len(),
        ingested: 0,
        skipped_intact: 0,
        invalid: 0,
        invalid_files: Vec::new(),
        bytes_in: 0,
        seconds: 0.0,
        gb_per_s: 0.0,
        refs: 0,
        published: 0,
    };
    // --mode move: the sources of this run's refs, removed only once the refs are committed.
    let mut to_remove = Vec::new();
    for (InputFile { found: src, path, rel, .. }, r) in inputs.iter().zip(results) {
        match r {
            Ok(Outcome::Ingested(r, n)) => {
                summary.ingested += 1;
                summary.bytes_in += n;
                refs.push(r);
                to_remove.push((path, rel));
            }
            Ok(Outcome::Skipped(r)) => {
                summary.skipped_intact += 1;
                refs.push(r);
                to_remove.push((path, rel));
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Invalid(reason)) => {
                if opts.strict {
                    return Err(Error::bad_input(src, reason));
                }
                eprintln!("feature-ingest: warning: {}: skipped: {reason}", src.display());
                summary.invalid += 1;
                summary.invalid_files.push(InvalidFile { file: src.display().to_string(), reason });
            }
        }
    }
    if opts.mode != PlaceMode::Move {
        to_remove.clear();
    }
    // Refs of an earlier --mode move run of this INPUT whose sources it removed (FORMATS §10,
    // `MANIFEST.moved`): only the manifest holds them now, so a rerun that rewrites it keeps them.
    let mut journal = None;
    if let Some(path) = &opts.manifest {
        let input = input_identity(&opts.input)?;
        let (carried, moved) = carried_refs(path, &input, &inputs)?;
        if !carried.is_empty() {
            refs.extend(carried);
            // In the order a fresh ingest of the whole INPUT would list them.
            refs.sort_by(|a, b| a.source_task_id.cmp(&b.source_task_id));
        }
        if moved.is_some() || !to_remove.is_empty() {
            let mut sources = moved.unwrap_or_default();
            sources.extend(to_remove.iter().map(|(_, rel)| rel.to_string()));
            sources.sort();
            sources.dedup();
            journal = Some(MovedJournal { input, sources });
        }
    }
    for r in &refs {
        r.check().map_err(|e| Error::Internal(format!("ref for {}: {e}", r.sample_id)))?;
    }
    // Every object's name durable before any ref to it is written anywhere.
    pool.install(|| dirs.sync())?;
    summary.refs = refs.len();
    if let Some(path) = &opts.manifest {
        let m = Manifest { schema_version: SCHEMA_VERSION, refs };
        let mut text = serde_json::to_vec(&m).expect("serializes");
        text.push(b'\n');
        fsio::write_atomic(path, &text)?;
        fsio::write_atomic(sentinel(path, "done"), b"")?;
        // After the manifest (which holds every ref it lists) and before any source goes.
        if let Some(j) = &journal {
            let mut text = serde_json::to_vec(j).expect("serializes");
            text.push(b'\n');
            fsio::write_atomic(sentinel(path, "moved"), &text)?;
        }
    } else if let Some(ch) = &opts.publish {
        // What an earlier run of this producer published is matched by sample id and feature
        // keys, not by position: this run's list need not line up with that one's (a file
        // added, or one invalid then and fixed now, shifts every ref after it). A sample this
        // run stored again (its source changed: a new generation, new keys) is published again;
        // one published with the object it still has is not.
        let published: std::collections::HashSet<(String, BTreeMap<String, String>)> = channel::published_sample_keys(ch, &opts.producer)?.into_iter().collect();
        let todo: Vec<SampleRef> = refs.into_iter().filter(|r| !published.contains(&(r.sample_id.clone(), r.feature_keys.clone()))).collect();
        if let Some(closed) = &closed {
            // A rerun of an ingest that finished (a --mode move one included, whose INPUT
            // may now be empty) has nothing to add; a new ref cannot join a closed stream (the
            // samples behind these refs were intact: nothing was stored for them).
            if let Some(first) = todo.first() {
                return Err(Error::conflict(
                    &closed.path,
                    format!(
                        "producer {} already closed with {} refs; {} of this ingest's refs are not among them (the first: {})",
                        opts.producer,
                        closed.published,
                        todo.len(),
                        first.sample_id
                    ),
                ));
            }
            summary.published = closed.published;
        } else {
            let mut p = RefProducer::open(ch, &opts.producer, Layout::Segments, true)?;
            for chunk in todo.chunks(4096) {
                p.append(chunk)?;
            }
            summary.published = p.published();
            p.close()?;
        }
    }
    // Every ref of this run is committed (manifest and journal, or published and closed):
    // now a --mode move source may go. Killed in between, the next run finds the rest intact.
    if !to_remove.is_empty() {
        let removed = crate::fsio::DirSync::default();
        pool.install(|| {
            to_remove.par_iter().try_for_each(|(src, _)| -> Result<()> {
                match fs::remove_file(src) {
                    Ok(()) => removed.add(src.parent().unwrap_or(Path::new(".")).to_path_buf()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io(src, e)),
                }
                crate::failpoint!("ingest.after_remove");
                Ok(())
            })?;
            removed.sync()
        })?;
    }
    summary.seconds = start.elapsed().as_secs_f64();
    summary.gb_per_s = summary.bytes_in as f64 / 1e9 / summary.seconds.max(1e-9);
    Ok(summary)
}

/// `MANIFEST.moved`: the sources `--mode move` runs removed from INPUT after writing the
/// manifest, so a rerun of that INPUT keeps their refs (FORMATS §10, "Ref manifest").
#[derive(Debug, Serialize, serde::Deserialize)]
struct MovedJournal {
    /// INPUT as an absolute path (its directory canonical): which INPUT the sources were in.
    input: String,
    /// Paths relative to INPUT, sorted.
    sources: Vec<String>,
}

/// INPUT as the journal names it: canonical, but a file named by its own name (not a link's
/// target), so that every spelling of the same INPUT matches.
fn input_identity(input: &Path) -> Result<String> {
    let path = match (input.parent(), input.file_name()) {
        (Some(parent), Some(name)) if !fs::metadata(input).at(input)?.is_dir() => {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            fs::canonicalize(parent).at(parent)?.join(name)
        }
        _ => fs::canonicalize(input).at(input)?,
    };
    Ok(path.to_string_lossy().into_owned())
}

/// The refs of `manifest` to keep: those whose sources the journal beside it says a move of
/// this INPUT removed, and which no file of this run stands for now (a file put back is
/// ingested again, its ref replacing the old). Also the journal's sources still carried.
fn carried_refs(manifest: &Path, input: &str, inputs: &[InputFile]) -> Result<(Vec<SampleRef>, Option<Vec<String>>)> {
    let jpath = sentinel(manifest, "moved");
    let journal: MovedJournal = match fs::read(&jpath) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::bad_input(&jpath, format!("not a move journal: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), None)),
        Err(e) => return Err(Error::io(&jpath, e)),
    };
    // Another INPUT's moves: this run's manifest replaces that one's.
    if journal.input != input {
        return Ok((Vec::new(), None));
    }
    let moved: std::collections::HashSet<&str> = journal.sources.iter().map(String::as_str).collect();
    let here: std::collections::HashSet<String> = inputs.iter().map(|f| sample_id_for(&f.rel)).collect();
    let old: Manifest = match fs::read(manifest) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::bad_input(manifest, format!("not a manifest: {e}")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::conflict(
                manifest,
                format!(
                    "missing, yet {} lists {} sources moved out of {input} whose refs only it held: restore it, or remove {} to write a manifest of what INPUT holds now",
                    jpath.display(),
                    journal.sources.len(),
                    jpath.display()
                ),
            ))
        }
        Err(e) => return Err(Error::io(manifest, e)),
    };
    let carried: Vec<SampleRef> = old.refs.into_iter().filter(|r| r.source_task_id.as_deref().is_some_and(|s| moved.contains(s)) && !here.contains(&r.sample_id)).collect();
    let still: Vec<String> = carried.iter().filter_map(|r| r.source_task_id.clone()).collect();
    Ok((carried, Some(still)))
}

/// `MANIFEST.done` / `.failed` / `.consumed` / `.moved` beside the manifest.
pub fn sentinel(manifest: &Path, what: &str) -> PathBuf {
    let mut s = manifest.as_os_str().to_owned();
    s.push(format!(".{what}"));
    PathBuf::from(s)
}

/// `feature-ingest` with its summary printed (JSON with `--json`).
pub fn run_ingest(opts: &IngestOptions) -> Result<()> {
    let s = ingest(opts)?;
    if opts.json {
        println!("{}", serde_json::to_string(&s).expect("serializes"));
    } else {
        println!(
            "ingested {} of {} files ({} already intact, {} invalid), {:.1} MB in {:.2}s ({:.2} GB/s), {} refs",
            s.ingested,
            s.files,
            s.skipped_intact,
            s.invalid,
            s.bytes_in as f64 / 1e6,
            s.seconds,
            s.gb_per_s,
            s.refs
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_that_cannot_be_stored_are_refused() {
        assert_eq!(check_tensor_names(["input_ids", "hidden_states", "a.b"].into_iter()), Ok(()));
        for bad in [&["x", "x"][..], &[""], &["__metadata__"], &["a#b"]] {
            let e = check_tensor_names(bad.iter().copied()).unwrap_err();
            assert!(e.contains(&format!("{:?}", bad.last().unwrap())), "{e}");
        }
    }
}
