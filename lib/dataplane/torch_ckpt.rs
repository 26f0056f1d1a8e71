//! A reader for `torch.save` files (zip + pickle protocol 2), without Python and without
//! executing anything.
//!
//! A torch.save archive holds `<prefix>/data.pkl`, one raw little-endian storage per tensor
//! under `<prefix>/data/<key>` (stored, not compressed), and `<prefix>/byteorder`. The pickle is
//! read by a restricted unpickler that knows only the opcodes torch.save emits at protocol 2
//! and only these globals: `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2` and the
//! legacy storage classes `torch.<Type>Storage`; storages come from persistent ids
//! `('storage', torch.<Type>Storage, key, location, numel)`. Anything else is refused with the
//! opcode or global named. Sizes are capped by named constants, arithmetic is checked and
//! untrusted buffers are sliced with `.get(..)`.

use super::store::{Dtype, TensorData};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;

/// Largest `data.pkl` accepted.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Largest decompressed `.ckpt.gz`. The whole stream is held in memory (a plain `.ckpt` is
/// mapped instead) and `feature-ingest` reads up to 16 files at once, so this bounds that
/// worst case to 64 GiB; a per-sample feature file is far smaller, and a bigger checkpoint
/// can be stored uncompressed.
pub const MAX_DECOMPRESSED_BYTES: u64 = 4 << 30;
/// Deepest unpickler stack and largest memo.
pub const MAX_STACK: usize = 1 << 16;
pub const MAX_MEMO: usize = 1 << 20;
/// Deepest nesting of tuples, lists and dicts in one value. torch.save's own values nest three
/// deep (the dict of tensors, `_rebuild_tensor_v2`'s argument tuple, the size tuple); this leaves
/// room for nested dicts of features and keeps every recursive walk of a value (drop, clone,
/// compare) a few dozen frames deep: a pickle of a million TUPLE1s would overflow the stack.
pub const MAX_PICKLE_DEPTH: usize = 64;
/// Most bytes of values one pickle may build, counting every copy a memo PUT or GET makes (the
/// memo holds copies, not shared values). torch.save's pickle builds about 2 KiB per tensor, so
/// this is some 60,000 tensors; it stops a pickle of a few hundred bytes that doubles one value
/// per GET ("billion laughs") from growing into gigabytes.
pub const MAX_PICKLE_VALUE_BYTES: usize = 128 << 20;
/// Most bytes one file's non-contiguous views may gather beyond the file's own (decompressed)
/// size. Gathering a permuted or strided view copies at most its storage, which the file holds;
/// views that repeat elements (stride 0, which torch.save writes for `expand()`ed tensors, or
/// several views of one storage) can exceed that, and this bounds by how much: a 1-element
/// storage viewed with size 2**36 and stride 0 would otherwise be a 256 GiB allocation.
pub const MAX_EXPANDED_BYTES: u64 = 256 << 20;
/// Most dimensions of one tensor.
pub const MAX_DIMS: usize = 32;
/// Most entries in a zip archive.
pub const MAX_ZIP_ENTRIES: usize = 1 << 16;

/// Why a torch file was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CkptError {
    #[error("not a readable zip archive (truncated or corrupt): {0}")]
    Zip(String),
    #[error("gzip stream is truncated or corrupt: {0}")]
    Gzip(String),
    #[error("decompressed size exceeds {MAX_DECOMPRESSED_BYTES} bytes (a .ckpt.gz is read into memory; store a larger checkpoint uncompressed)")]
    TooLarge,
    #[error("archive has no <prefix>/data.pkl")]
    NoPickle,
    #[error("archive entry {0} is compressed; torch.save stores entries uncompressed")]
    Compressed(String),
    #[error("byteorder is {0:?}; only little-endian checkpoints are supported")]
    ByteOrder(String),
    #[error("pickle at byte {at}: {reason}")]
    Pickle { at: usize, reason: String },
    #[error("pickle uses global {0}, which is not allowed (only OrderedDict, _rebuild_tensor_v2, torch.*Storage)")]
    Forbidden(String),
    #[error("top-level object is not a dict of tensors")]
    NotADict,
    #[error("value of key {0:?} is not a tensor")]
    NotATensor(String),
    #[error("tensor {0:?}: storage {1} missing from the archive")]
    MissingStorage(String, String),
    #[error("tensor {0:?}: {1}")]
    BadTensor(String, String),
}

#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    Storage(Dtype),
}

#[derive(Debug, Clone, PartialEq)]
struct StorageRef {
    dtype: Dtype,
    key: String,
    numel: u64,
}

#[derive(Debug, Clone, PartialEq)]
struct TensorRef {
    storage: StorageRef,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq)]
enum Val {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Val>),
    List(Vec<Val>),
    Dict(Vec<(Val, Val)>),
    Global(Global),
    // Boxed: every value is as large as the largest variant, and memo copies multiply them.
    Storage(Box<StorageRef>),
    Tensor(Box<TensorRef>),
}

impl Val {
    /// Bytes this value occupies, its contents included (what a copy of it allocates).
    fn footprint(&self) -> usize {
        let own = match self {
            Val::Str(s) => s.len(),
            Val::Tuple(items) | Val::List(items) => items.iter().map(Val::footprint).sum(),
            Val::Dict(pairs) => pairs.iter().map(|(k, v)| k.footprint() + v.footprint()).sum(),
            Val::Storage(s) => std::mem::size_of::<StorageRef>() + s.key.len(),
            Val::Tensor(t) => std::mem::size_of::<TensorRef>() + t.storage.key.len() + 8 * (t.size.len() + t.stride.len()),
            Val::Mark | Val::None | Val::Bool(_) | Val::Int(_) | Val::Float(_) | Val::Global(_) => 0,
        };
        std::mem::size_of::<Val>() + own
    }

    /// A short description for error messages (never the value itself, which may be large).
    fn describe(&self) -> String {
        match self {
            Val::Global(g) => format!("{g:?}"),
            Val::Mark => "MARK".into(),
            Val::None => "None".into(),
            Val::Bool(_) => "a bool".into(),
            Val::Int(_) => "an int".into(),
            Val::Float(_) => "a float".into(),
            Val::Str(_) => "a string".into(),
            Val::Tuple(_) => "a tuple".into(),
            Val::List(_) => "a list".into(),
            Val::Dict(_) => "a dict".into(),
            Val::Storage(_) => "a storage".into(),
            Val::Tensor(_) => "a tensor".into(),
        }
    }
}

/// A value on the stack or in the memo, with how deeply containers nest in it (0 for a scalar,
/// 1 for a container of scalars), so that nesting is bounded without walking the value.
type Slot = (Val, usize);

/// The values of `slots` and the deepest nesting among them.
fn unzip(slots: Vec<Slot>) -> (Vec<Val>, usize) {
    let inner = slots.iter().map(|s| s.1).max().unwrap_or(0);
    (slots.into_iter().map(|s| s.0).collect(), inner)
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    memo: HashMap<u32, Slot>,
    /// Bytes of values built so far, copies included (bounded by MAX_PICKLE_VALUE_BYTES).
    built: usize,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler { data, pos: 0, stack: Vec::new(), memo: HashMap::new(), built: 0 }
    }
    fn err(&self, reason: impl Into<String>) -> CkptError {
        CkptError::Pickle { at: self.pos, reason: reason.into() }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], CkptError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.err("length overflow"))?;
        let s = self.data.get(self.pos..end).ok_or_else(|| self.err("unexpected end of pickle"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, CkptError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, CkptError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn line(&mut self) -> Result<String, CkptError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let nl = rest.iter().take(256).position(|&b| b == b'\n').ok_or_else(|| self.err("unterminated GLOBAL name"))?;
        let s = std::str::from_utf8(&rest[..nl]).map_err(|_| self.err("GLOBAL name is not UTF-8"))?.to_string();
        self.pos += nl + 1;
        Ok(s)
    }
    /// Count `bytes` more of values built.
    fn charge(&mut self, bytes: usize) -> Result<(), CkptError> {
        self.built = self.built.saturating_add(bytes);
        if self.built > MAX_PICKLE_VALUE_BYTES {
            return Err(self.err(format!("values built exceed {MAX_PICKLE_VALUE_BYTES} bytes (memo GETs copy their value)")));
        }
        Ok(())
    }
    /// The depth of a container whose contents nest `inner` deep, if within MAX_PICKLE_DEPTH.
    fn nest(&self, inner: usize) -> Result<usize, CkptError> {
        if inner >= MAX_PICKLE_DEPTH {
            return Err(self.err(format!("containers nested more than {MAX_PICKLE_DEPTH} deep")));
        }
        Ok(inner + 1)
    }
    fn push_slot(&mut self, slot: Slot) -> Result<(), CkptError> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("stack too deep"));
        }
        self.stack.push(slot);
        Ok(())
    }
    /// Push a new scalar.
    fn push(&mut self, v: Val) -> Result<(), CkptError> {
        self.charge(v.footprint())?;
        self.push_slot((v, 0))
    }
    /// Push a new container of values that were already built (and counted), nesting `inner` deep.
    fn push_container(&mut self, v: Val, inner: usize) -> Result<(), CkptError> {
        let depth = self.nest(inner)?;
        self.charge(std::mem::size_of::<Val>())?;
        self.push_slot((v, depth))
    }
    fn pop(&mut self) -> Result<Slot, CkptError> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    /// The values above the topmost MARK (which goes too) and the deepest nesting among them.
    fn pop_mark(&mut self) -> Result<(Vec<Val>, usize), CkptError> {
        let at = self.stack.iter().rposition(|s| matches!(s.0, Val::Mark)).ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(unzip(items))
    }
    fn top(&mut self) -> Result<&mut Slot, CkptError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(CkptError::Pickle { at: pos, reason: "stack underflow".into() })
    }
    /// Add to the container on top of the stack values nesting `inner` deep; `add` says whether
    /// the top is the right kind of container.
    fn add_to_top(&mut self, inner: usize, what: &str, add: impl FnOnce(&mut Val) -> bool) -> Result<(), CkptError> {
        let depth = self.nest(inner)?;
        let top = self.top()?;
        if !add(&mut top.0) {
            return Err(self.err(what));
        }
        top.1 = top.1.max(depth);
        Ok(())
    }
    // The memo holds copies: a value is never shared, so every value is a tree whose size was
    // counted when built or copied.
    fn memo_put(&mut self, idx: u32) -> Result<(), CkptError> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.err("memo too large"));
        }
        let bytes = self.stack.last().map(|s| s.0.footprint()).ok_or_else(|| self.err("PUT on empty stack"))?;
        self.charge(bytes)?;
        let slot = self.stack.last().cloned().expect("checked above");
        self.memo.insert(idx, slot);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> Result<(), CkptError> {
        let bytes = self.memo.get(&idx).map(|s| s.0.footprint()).ok_or_else(|| self.err(format!("GET of unknown memo {idx}")))?;
        self.charge(bytes)?;
        let slot = self.memo[&idx].clone();
        self.push_slot(slot)
    }

    fn run(mut self) -> Result<Val, CkptError> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 2 {
                        return Err(self.err(format!("pickle protocol {p}; torch.save writes protocol 2")));
                    }
                }
                b'.' => return Ok(self.pop()?.0),
                b'}' => self.push_container(Val::Dict(Vec::new()), 0)?,
                b']' => self.push_container(Val::List(Vec::new()), 0)?,
                b')' => self.push_container(Val::Tuple(Vec::new()), 0)?,
                b'(' => self.push(Val::Mark)?,
                b'N' => self.push(Val::None)?,
                0x88 => self.push(Val::Bool(true))?,
                0x89 => self.push(Val::Bool(false))?,
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Val::Int(v))?
                }
                b'M' => {
                    let b = self.take(2)?;
                    let v = u16::from_le_bytes([b[0], b[1]]) as i64;
                    self.push(Val::Int(v))?
                }
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Val::Int(v))?
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(self.err(format!("LONG1 of {n} bytes does not fit 64 bits")));
                    }
                    let b = self.take(n)?;
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) { [0xffu8; 8] } else { [0u8; 8] };
                    buf[..n].copy_from_slice(b);
                    self.push(Val::Int(i64::from_le_bytes(buf)))?
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.push(Val::Float(f64::from_be_bytes(b.try_into().expect("8 bytes"))))?
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b).map_err(|_| self.err("BINUNICODE is not UTF-8"))?.to_string();
                    self.push(Val::Str(s))?
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = match (module.as_str(), name.as_str()) {
                        ("collections", "OrderedDict") => Global::OrderedDict,
                        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
                        ("torch", n) => Global::Storage(Dtype::from_torch_storage(n).ok_or_else(|| CkptError::Forbidden(format!("{module}.{name}")))?),
                        _ => return Err(CkptError::Forbidden(format!("{module}.{name}"))),
                    };
                    self.push(Val::Global(g))?
                }
                b't' => {
                    let (items, inner) = self.pop_mark()?;
                    self.push_container(Val::Tuple(items), inner)?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow in TUPLEn"));
                    }
                    let (items, inner) = unzip(self.stack.split_off(self.stack.len() - n));
                    if items.iter().any(|v| matches!(v, Val::Mark)) {
                        return Err(self.err("MARK inside TUPLEn"));
                    }
                    self.push_container(Val::Tuple(items), inner)?
                }
                b'a' => {
                    let (v, inner) = self.pop()?;
                    self.add_to_top(inner, "APPEND to a non-list", |top| match top {
                        Val::List(l) => {
                            l.push(v);
                            true
                        }
                        _ => false,
                    })?
                }
                b'e' => {
                    let (items, inner) = self.pop_mark()?;
                    self.add_to_top(inner, "APPENDS to a non-list", |top| match top {
                        Val::List(l) => {
                            l.extend(items);
                            true
                        }
                        _ => false,
                    })?
                }
                b's' => {
                    let (v, dv) = self.pop()?;
                    let (k, dk) = self.pop()?;
                    self.add_to_top(dk.max(dv), "SETITEM on a non-dict", |top| match top {
                        Val::Dict(d) => {
                            d.push((k, v));
                            true
                        }
                        _ => false,
                    })?
                }
                b'u' => {
                    let (items, inner) = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    self.add_to_top(inner, "SETITEMS on a non-dict", |top| match top {
                        Val::Dict(d) => {
                            d.extend(pairs);
                            true
                        }
                        _ => false,
                    })?
                }
                b'Q' => {
                    let (pid, _) = self.pop()?;
                    let s = match pid {
                        Val::Tuple(t) => match t.as_slice() {
                            [Val::Str(tag), Val::Global(Global::Storage(dtype)), Val::Str(key), Val::Str(_location), Val::Int(numel)] if tag == "storage" && *numel >= 0 => {
                                StorageRef { dtype: *dtype, key: key.clone(), numel: *numel as u64 }
                            }
                            _ => return Err(self.err("persistent id is not ('storage', torch.<Type>Storage, key, location, numel)")),
                        },
                        _ => return Err(self.err("persistent id is not a tuple")),
                    };
                    self.push(Val::Storage(Box::new(s)))?
                }
                b'R' => {
                    let (args, _) = self.pop()?;
                    let (callable, _) = self.pop()?;
                    let Val::Tuple(args) = args else { return Err(self.err("REDUCE arguments are not a tuple")) };
                    match callable {
                        Val::Global(Global::OrderedDict) if args.is_empty() => self.push_container(Val::Dict(Vec::new()), 0)?,
                        Val::Global(Global::RebuildTensorV2) => {
                            let t = self.rebuild_tensor(args)?;
                            self.push(t)?
                        }
                        other => return Err(self.err(format!("REDUCE of {} is not allowed", other.describe()))),
                    }
                }
                other => return Err(self.err(format!("opcode 0x{other:02x} is not used by torch.save and is refused"))),
            }
        }
    }

    fn rebuild_tensor(&self, args: Vec<Val>) -> Result<Val, CkptError> {
        let ints = |v: &Val| -> Option<Vec<u64>> {
            match v {
                Val::Tuple(t) if t.len() <= MAX_DIMS => t.iter().map(|x| if let Val::Int(i) = x { u64::try_from(*i).ok() } else { None }).collect(),
                _ => None,
            }
        };
        match args.as_slice() {
            [Val::Storage(s), Val::Int(off), size, stride, Val::Bool(_), Val::Dict(_), rest @ ..] if rest.len() <= 1 => {
                let size = ints(size).ok_or_else(|| self.err("tensor size is not a tuple of ints"))?;
                let stride = ints(stride).ok_or_else(|| self.err("tensor stride is not a tuple of ints"))?;
                if size.len() != stride.len() {
                    return Err(self.err("tensor size and stride differ in length"));
                }
                let offset = u64::try_from(*off).map_err(|_| self.err("negative storage offset"))?;
                Ok(Val::Tensor(Box::new(TensorRef { storage: (**s).clone(), offset, size, stride })))
            }
            _ => Err(self.err("_rebuild_tensor_v2 arguments are not (storage, offset, size, stride, requires_grad, hooks[, metadata])")),
        }
    }
}

/// Read a gzip stream fully, bounded by [`MAX_DECOMPRESSED_BYTES`].
pub fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, CkptError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).take(MAX_DECOMPRESSED_BYTES + 1).read_to_end(&mut out).map_err(|e| CkptError::Gzip(e.to_string()))?;
    if out.len() as u64 > MAX_DECOMPRESSED_BYTES {
        return Err(CkptError::TooLarge);
    }
    Ok(out)
}

/// Parse a torch.save archive held in `buf`; tensors borrow from `buf` where contiguous.
pub fn read_checkpoint(buf: &[u8]) -> Result<Vec<TensorData<'_>>, CkptError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(buf)).map_err(|e| CkptError::Zip(e.to_string()))?;
    if zip.len() > MAX_ZIP_ENTRIES {
        return Err(CkptError::Zip(format!("{} entries is more than {MAX_ZIP_ENTRIES}", zip.len())));
    }
    // name -> (data start, size)
    let mut entries: HashMap<String, (u64, u64)> = HashMap::new();
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).map_err(|e| CkptError::Zip(e.to_string()))?;
        if f.compression() != zip::CompressionMethod::Stored {
            return Err(CkptError::Compressed(f.name().to_string()));
        }
        let (start, size) = (f.data_start(), f.size());
        let end = start.checked_add(size).ok_or_else(|| CkptError::Zip("entry size overflow".into()))?;
        if end > buf.len() as u64 {
            return Err(CkptError::Zip(format!("entry {} runs past the end of the file", f.name())));
        }
        entries.insert(f.name().to_string(), (start, size));
    }
    let entry = |name: &str| -> Option<&[u8]> {
        let &(s, n) = entries.get(name)?;
        buf.get(s as usize..(s + n) as usize)
    };
    let pkl_name = entries.keys().find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1).cloned().ok_or(CkptError::NoPickle)?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Some(bo) = entry(&format!("{prefix}byteorder")) {
        let bo = String::from_utf8_lossy(bo).trim().to_string();
        if bo != "little" {
            return Err(CkptError::ByteOrder(bo));
        }
    }
    let pkl = entry(&pkl_name).ok_or(CkptError::NoPickle)?;
    if pkl.len() as u64 > MAX_PICKLE_BYTES {
        return Err(CkptError::Pickle { at: 0, reason: format!("data.pkl is over {MAX_PICKLE_BYTES} bytes") });
    }
    let top = Unpickler::new(pkl).run()?;
    let Val::Dict(items) = top else { return Err(CkptError::NotADict) };
    let mut out = Vec::with_capacity(items.len());
    let mut gather_budget = (buf.len() as u64).saturating_add(MAX_EXPANDED_BYTES);
    for (k, v) in items {
        let Val::Str(name) = k else { return Err(CkptError::NotADict) };
        let Val::Tensor(t) = v else { return Err(CkptError::NotATensor(name)) };
        let storage_name = format!("{prefix}data/{}", t.storage.key);
        let bytes = entry(&storage_name).ok_or_else(|| CkptError::MissingStorage(name.clone(), storage_name.clone()))?;
        let data = tensor_bytes(&t, bytes, &mut gather_budget).map_err(|r| CkptError::BadTensor(name.clone(), r))?;
        let shape = t.size.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>().map_err(|_| CkptError::BadTensor(name.clone(), "dimension too large".into()))?;
        out.push(TensorData { name, dtype: t.storage.dtype, shape, data });
    }
    Ok(out)
}

/// The tensor's bytes in row-major order: a borrowed slice when contiguous, else gathered into
/// a copy, whose size is taken from `gather_budget` (refused when it does not fit).
fn tensor_bytes<'a>(t: &TensorRef, storage: &'a [u8], gather_budget: &mut u64) -> Result<Cow<'a, [u8]>, String> {
    let es = t.storage.dtype.size() as u64;
    let have = t.storage.numel.checked_mul(es).ok_or("storage size overflow")?;
    if (storage.len() as u64) < have {
        return Err(format!("storage holds {} bytes, {have} expected", storage.len()));
    }
    let numel = t.size.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or("numel overflow")?;
    if numel == 0 {
        return Ok(Cow::Borrowed(&[]));
    }
    // Highest element index touched, to bound every access.
    let max_index = t.size.iter().zip(&t.stride).try_fold(t.offset, |a, (&d, &s)| a.checked_add((d - 1).checked_mul(s)?)).ok_or("index overflow")?;
    if max_index >= t.storage.numel {
        return Err(format!("view reaches element {max_index} of a storage of {}", t.storage.numel));
    }
    let mut expect = 1u64;
    let contiguous = t.size.iter().zip(&t.stride).rev().all(|(&d, &s)| {
        let ok = d == 1 || s == expect;
        expect = expect.saturating_mul(d);
        ok
    });
    if contiguous {
        let start = (t.offset * es) as usize;
        let end = start + (numel * es) as usize;
        return storage.get(start..end).map(Cow::Borrowed).ok_or_else(|| "slice out of range".to_string());
    }
    // A stride-0 view passes the index check above with any size, so the copy is bounded here.
    let gathered = numel.checked_mul(es).ok_or("tensor size overflow")?;
    if gathered > *gather_budget {
        return Err(format!(
            "non-contiguous view of {gathered} bytes exceeds what the file may gather ({} bytes more; its views may copy its size + {MAX_EXPANDED_BYTES} bytes in all)",
            *gather_budget
        ));
    }
    *gather_budget -= gathered;
    let mut out = Vec::new();
    let len = usize::try_from(gathered).map_err(|_| "tensor size overflow")?;
    out.try_reserve_exact(len).map_err(|e| format!("cannot allocate {gathered} bytes to gather a non-contiguous view: {e}"))?;
    let es = es as usize;
    let mut idx = vec![0u64; t.size.len()];
    for _ in 0..numel {
        let e = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
        let at = (e as usize) * es;
        out.extend_from_slice(storage.get(at..at + es).ok_or("element out of range")?);
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < t.size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A torch.save-layout archive: `archive/data.pkl`, `archive/byteorder` and the storages
    /// under `archive/data/`, all stored.
    fn archive(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let mut add = |name: &str, data: &[u8]| {
            w.start_file(name, stored).unwrap();
            w.write_all(data).unwrap();
        };
        add("archive/data.pkl", pkl);
        add("archive/byteorder", b"little");
        for (key, data) in storages {
            add(&format!("archive/data/{key}"), data);
        }
        w.finish().unwrap().into_inner()
    }

    fn put_str(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }

    fn put_int(p: &mut Vec<u8>, i: u64) {
        p.extend([0x8a, 8]);
        p.extend(i.to_le_bytes());
    }

    /// The pickle torch.save writes for `{name: t}`, t a view of FloatStorage "0" of `numel`
    /// elements at offset 0 (ints as LONG1, so that any size fits).
    fn one_tensor_pickle(name: &str, numel: u64, size: &[u64], stride: &[u64]) -> Vec<u8> {
        let mut p = b"\x80\x02}(".to_vec();
        put_str(&mut p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        put_str(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        put_str(&mut p, "0");
        put_str(&mut p, "cpu");
        put_int(&mut p, numel);
        p.extend(b"tQ");
        put_int(&mut p, 0);
        for dims in [size, stride] {
            p.push(b'(');
            dims.iter().for_each(|&d| put_int(&mut p, d));
            p.push(b't');
        }
        p.extend(b"\x89ccollections\nOrderedDict\n)RtRu.");
        p
    }

    fn pickle_error(r: Result<impl std::fmt::Debug, CkptError>) -> String {
        match r {
            Err(CkptError::Pickle { reason, .. }) => reason,
            other => panic!("expected a pickle error, got {other:?}"),
        }
    }

    #[test]
    fn reads_a_tensor_and_small_stride0_expansions() {
        let one = 1.5f32.to_le_bytes();
        let buf = archive(&one_tensor_pickle("x", 1, &[1], &[1]), &[("0", &one)]);
        let t = read_checkpoint(&buf).unwrap();
        assert_eq!((t[0].name.as_str(), t[0].dtype, &t[0].shape[..], t[0].data.as_ref()), ("x", Dtype::F32, &[1][..], &one[..]));
        // torch.save of torch.tensor([1.5]).expand(3, 4) keeps stride 0.
        let buf = archive(&one_tensor_pickle("x", 1, &[3, 4], &[0, 0]), &[("0", &one)]);
        let t = read_checkpoint(&buf).unwrap();
        assert_eq!(t[0].shape, [3, 4]);
        assert_eq!(t[0].data.as_ref(), one.repeat(12));
    }

    #[test]
    fn refuses_deep_nesting_without_overflowing_the_stack() {
        // A list in two million TUPLE1s: built iteratively, but dropping or comparing it would
        // recurse once per level.
        let mut p = b"\x80\x02]".to_vec();
        p.extend(std::iter::repeat_n(0x85, 2_000_000));
        p.push(b'.');
        let reason = pickle_error(Unpickler::new(&p).run());
        assert!(reason.contains(&format!("nested more than {MAX_PICKLE_DEPTH} deep")), "{reason}");
        assert!(matches!(read_checkpoint(&archive(&p, &[])), Err(CkptError::Pickle { .. })));
        // Exactly MAX_PICKLE_DEPTH is fine, one more is not, however the nesting is built.
        let tuples = |levels: usize| [&b"\x80\x02]"[..], &vec![0x85; levels - 1], b"."].concat();
        assert!(matches!(Unpickler::new(&tuples(MAX_PICKLE_DEPTH)).run(), Ok(Val::Tuple(_))));
        pickle_error(Unpickler::new(&tuples(MAX_PICKLE_DEPTH + 1)).run());
        let lists = |levels: usize| [&b"\x80\x02"[..], &vec![b']'; levels], &vec![b'a'; levels - 1], b"."].concat();
        assert!(matches!(Unpickler::new(&lists(MAX_PICKLE_DEPTH)).run(), Ok(Val::List(_))));
        pickle_error(Unpickler::new(&lists(MAX_PICKLE_DEPTH + 1)).run());
        let dicts = |levels: usize| [&b"\x80\x02"[..], &b"}K\x00".repeat(levels - 1), b"}", &vec![b's'; levels - 1], b"."].concat();
        assert!(matches!(Unpickler::new(&dicts(MAX_PICKLE_DEPTH)).run(), Ok(Val::Dict(_))));
        pickle_error(Unpickler::new(&dicts(MAX_PICKLE_DEPTH + 1)).run());
        let appends = |levels: usize| [&b"\x80\x02"[..], &b"](".repeat(levels - 1), b"]", &vec![b'e'; levels - 1], b"."].concat();
        assert!(matches!(Unpickler::new(&appends(MAX_PICKLE_DEPTH)).run(), Ok(Val::List(_))));
        pickle_error(Unpickler::new(&appends(MAX_PICKLE_DEPTH + 1)).run());
        let setitems = |levels: usize| [&b"\x80\x02"[..], &b"}(K\x00".repeat(levels - 1), b"}", &vec![b'u'; levels - 1], b"."].concat();
        assert!(matches!(Unpickler::new(&setitems(MAX_PICKLE_DEPTH)).run(), Ok(Val::Dict(_))));
        pickle_error(Unpickler::new(&setitems(MAX_PICKLE_DEPTH + 1)).run());
    }

    #[test]
    fn refuses_a_huge_stride0_view() {
        // One float viewed as 2**36 of them: the index check passes, the copy would be 256 GiB.
        let buf = archive(&one_tensor_pickle("x", 1, &[1 << 36], &[0]), &[("0", &1f32.to_le_bytes())]);
        match read_checkpoint(&buf) {
            Err(CkptError::BadTensor(name, reason)) => {
                assert_eq!(name, "x");
                assert!(reason.contains("exceeds what the file may gather"), "{reason}");
            }
            other => panic!("expected BadTensor, got {other:?}"),
        }
        // Each view fits, together they do not: the budget is the file's, not the tensor's.
        let storage = [0u8; 4];
        let t = TensorRef { storage: StorageRef { dtype: Dtype::F32, key: "0".into(), numel: 1 }, offset: 0, size: vec![1 << 20], stride: vec![0] };
        let mut budget = 3 << 22;
        for _ in 0..3 {
            tensor_bytes(&t, &storage, &mut budget).unwrap();
        }
        assert!(tensor_bytes(&t, &storage, &mut budget).is_err());
        // Sizes whose byte count overflows are refused, not wrapped.
        let t = TensorRef { size: vec![1 << 62], ..t };
        assert!(tensor_bytes(&t, &storage, &mut { u64::MAX }).unwrap_err().contains("overflow"));
    }

    #[test]
    fn memo_copies_are_bounded() {
        // "Billion laughs": a 100-byte string, then 40 times memo[0] = (memo[0], memo[0]). The
        // pickle is 390 bytes; the value it describes, 100 * 2**40 bytes of strings.
        let mut p = b"\x80\x02".to_vec();
        put_str(&mut p, &"a".repeat(100));
        p.extend(b"q\x00");
        p.extend(b"h\x00h\x00\x86q\x00".repeat(40));
        p.push(b'.');
        assert_eq!(p.len(), 390);
        let reason = pickle_error(Unpickler::new(&p).run());
        assert!(reason.contains(&format!("values built exceed {MAX_PICKLE_VALUE_BYTES} bytes")), "{reason}");
        assert!(matches!(read_checkpoint(&archive(&p, &[])), Err(CkptError::Pickle { .. })));
    }

    #[test]
    fn refuses_foreign_globals_and_opcodes() {
        let p = b"\x80\x02cos\nsystem\nq\x00.";
        let err = Unpickler::new(p).run().unwrap_err();
        assert_eq!(err, CkptError::Forbidden("os.system".into()));
        let p = b"\x80\x02\x95\x00.";
        assert!(matches!(Unpickler::new(p).run(), Err(CkptError::Pickle { .. })));
        let p = b"\x80\x02}(X\x01\x00\x00\x00a";
        assert!(matches!(Unpickler::new(p).run(), Err(CkptError::Pickle { .. })));
    }

    #[test]
    fn gathers_non_contiguous_views() {
        // 2x3 storage viewed transposed as 3x2.
        let storage: Vec<u8> = (0u8..6).collect();
        let t = TensorRef { storage: StorageRef { dtype: Dtype::U8, key: "0".into(), numel: 6 }, offset: 0, size: vec![3, 2], stride: vec![1, 3] };
        let mut budget = 6;
        assert_eq!(tensor_bytes(&t, &storage, &mut budget).unwrap().as_ref(), &[0, 3, 1, 4, 2, 5]);
        assert_eq!(budget, 0, "the copy is taken from the budget");
        assert!(tensor_bytes(&t, &storage, &mut budget).unwrap_err().contains("exceeds what the file may gather"));
        let bad = TensorRef { stride: vec![1, 4], ..t };
        assert!(tensor_bytes(&bad, &storage, &mut { u64::MAX }).is_err());
    }
}
