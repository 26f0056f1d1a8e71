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
/// Largest decompressed `.ckpt.gz`.
pub const MAX_DECOMPRESSED_BYTES: u64 = 64 << 30;
/// Deepest unpickler stack and largest memo.
pub const MAX_STACK: usize = 1 << 16;
pub const MAX_MEMO: usize = 1 << 20;
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
    #[error("decompressed size exceeds {MAX_DECOMPRESSED_BYTES} bytes")]
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
    Storage(StorageRef),
    Tensor(TensorRef),
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Val>,
    memo: HashMap<u32, Val>,
}

impl<'a> Unpickler<'a> {
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
    fn push(&mut self, v: Val) -> Result<(), CkptError> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err("stack too deep"));
        }
        self.stack.push(v);
        Ok(())
    }
    fn pop(&mut self) -> Result<Val, CkptError> {
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Val>, CkptError> {
        let at = self.stack.iter().rposition(|v| *v == Val::Mark).ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> Result<&mut Val, CkptError> {
        let pos = self.pos;
        self.stack.last_mut().ok_or(CkptError::Pickle { at: pos, reason: "stack underflow".into() })
    }
    fn memo_put(&mut self, idx: u32) -> Result<(), CkptError> {
        if self.memo.len() >= MAX_MEMO {
            return Err(self.err("memo too large"));
        }
        let v = self.stack.last().cloned().ok_or_else(|| self.err("PUT on empty stack"))?;
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u32) -> Result<(), CkptError> {
        let v = self.memo.get(&idx).cloned().ok_or_else(|| self.err(format!("GET of unknown memo {idx}")))?;
        self.push(v)
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
                b'.' => return self.pop(),
                b'}' => self.push(Val::Dict(Vec::new()))?,
                b']' => self.push(Val::List(Vec::new()))?,
                b')' => self.push(Val::Tuple(Vec::new()))?,
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
                    let items = self.pop_mark()?;
                    self.push(Val::Tuple(items))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(self.err("stack underflow in TUPLEn"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    if items.contains(&Val::Mark) {
                        return Err(self.err("MARK inside TUPLEn"));
                    }
                    self.push(Val::Tuple(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Val::List(l) => l.push(v),
                        _ => return Err(self.err("APPEND to a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Val::List(l) => l.extend(items),
                        _ => return Err(self.err("APPENDS to a non-list")),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Val::Dict(d) => d.push((k, v)),
                        _ => return Err(self.err("SETITEM on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS with an odd number of items"));
                    }
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top()? {
                        Val::Dict(d) => d.extend(pairs),
                        _ => return Err(self.err("SETITEMS on a non-dict")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = match pid {
                        Val::Tuple(t) => match t.as_slice() {
                            [Val::Str(tag), Val::Global(Global::Storage(dtype)), Val::Str(key), Val::Str(_location), Val::Int(numel)]
                                if tag == "storage" && *numel >= 0 =>
                            {
                                StorageRef { dtype: *dtype, key: key.clone(), numel: *numel as u64 }
                            }
                            _ => return Err(self.err("persistent id is not ('storage', torch.<Type>Storage, key, location, numel)")),
                        },
                        _ => return Err(self.err("persistent id is not a tuple")),
                    };
                    self.push(Val::Storage(s))?
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let Val::Tuple(args) = args else { return Err(self.err("REDUCE arguments are not a tuple")) };
                    let v = match callable {
                        Val::Global(Global::OrderedDict) if args.is_empty() => Val::Dict(Vec::new()),
                        Val::Global(Global::RebuildTensorV2) => self.rebuild_tensor(args)?,
                        other => return Err(self.err(format!("REDUCE of {other:?} is not allowed"))),
                    };
                    self.push(v)?
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
                Ok(Val::Tensor(TensorRef { storage: s.clone(), offset, size, stride }))
            }
            _ => Err(self.err("_rebuild_tensor_v2 arguments are not (storage, offset, size, stride, requires_grad, hooks[, metadata])")),
        }
    }
}

/// Read a gzip stream fully, bounded by [`MAX_DECOMPRESSED_BYTES`].
pub fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, CkptError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_DECOMPRESSED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| CkptError::Gzip(e.to_string()))?;
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
    let top = Unpickler { data: pkl, pos: 0, stack: Vec::new(), memo: HashMap::new() }.run()?;
    let Val::Dict(items) = top else { return Err(CkptError::NotADict) };
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Val::Str(name) = k else { return Err(CkptError::NotADict) };
        let Val::Tensor(t) = v else { return Err(CkptError::NotATensor(name)) };
        let storage_name = format!("{prefix}data/{}", t.storage.key);
        let bytes = entry(&storage_name).ok_or_else(|| CkptError::MissingStorage(name.clone(), storage_name.clone()))?;
        let data = tensor_bytes(&t, bytes).map_err(|r| CkptError::BadTensor(name.clone(), r))?;
        let shape = t.size.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<_>, _>>().map_err(|_| CkptError::BadTensor(name.clone(), "dimension too large".into()))?;
        out.push(TensorData { name, dtype: t.storage.dtype, shape, data });
    }
    Ok(out)
}

/// The tensor's bytes in row-major order: a borrowed slice when contiguous, else gathered.
fn tensor_bytes<'a>(t: &TensorRef, storage: &'a [u8]) -> Result<Cow<'a, [u8]>, String> {
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
    let es = es as usize;
    let mut out = Vec::with_capacity((numel as usize) * es);
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

    #[test]
    fn refuses_foreign_globals_and_opcodes() {
        let p = b"\x80\x02cos\nsystem\nq\x00.";
        let err = Unpickler { data: p, pos: 0, stack: vec![], memo: HashMap::new() }.run().unwrap_err();
        assert_eq!(err, CkptError::Forbidden("os.system".into()));
        let p = b"\x80\x02\x95\x00.";
        assert!(matches!(Unpickler { data: p, pos: 0, stack: vec![], memo: HashMap::new() }.run(), Err(CkptError::Pickle { .. })));
        let p = b"\x80\x02}(X\x01\x00\x00\x00a";
        assert!(matches!(Unpickler { data: p, pos: 0, stack: vec![], memo: HashMap::new() }.run(), Err(CkptError::Pickle { .. })));
    }

    #[test]
    fn gathers_non_contiguous_views() {
        // 2x3 storage viewed transposed as 3x2.
        let storage: Vec<u8> = (0u8..6).collect();
        let t = TensorRef { storage: StorageRef { dtype: Dtype::U8, key: "0".into(), numel: 6 }, offset: 0, size: vec![3, 2], stride: vec![1, 3] };
        assert_eq!(tensor_bytes(&t, &storage).unwrap().as_ref(), &[0, 3, 1, 4, 2, 5]);
        let bad = TensorRef { stride: vec![1, 4], ..t };
        assert!(tensor_bytes(&bad, &storage).is_err());
    }
}
