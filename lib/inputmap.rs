//! Read-only maps of the files the tools read but did not write (checkpoints, delta files), and
//! the choice of how `delta-diff` reads tensors: through these maps, or with `pread`.
//!
//! Which is cheaper depends on the kernel, not on us. Reading through a map costs one page fault
//! per mapped range plus the unmap; `pread` costs a copy of every byte. Where the page cache
//! holds small (4 KiB) folios, a fault maps at most 64 KiB (fault-around) and `pread` won by
//! almost 2× on an earlier host of this project (its kernel not recorded); where it holds large folios (ext4 since Linux
//! 6.16, XFS since 5.18), a fault maps a whole folio, and the map is almost 2× faster
//! (0.035 s vs 0.066 s to scan a 1.1 GB pair on 2 cores, Linux 6.18, ext4). [`InputRead::Auto`]
//! measures it on the inputs themselves: [`probe_reads`] times faulting the first MiBs of a map
//! against reading the same bytes with `pread`.
//!
//! A map of a file that shrinks while it is read raises SIGBUS on the next access past the new
//! end. [`guard_sigbus`] turns that into the toolkit's usual error (the path, the reason, exit
//! code `io`) instead of "Bus error": every [`InputMap`] is registered with the range it
//! covers, and the handler looks the faulting address up. The process then ends at once, as if
//! killed: every writer here is crash-safe, so the next run repairs or refuses as after a kill.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::ops::{Deref, Range};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How `delta-diff` reads OLD's and NEW's tensors on the CPU (`--input-read`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputRead {
    /// Measure the inputs' page faults and take the cheaper of the two.
    #[default]
    Auto,
    /// Through the files' maps ([`crate::codec::MappedPair`]).
    Mmap,
    /// With `pread` into per-thread buffers ([`crate::codec::PreadPair`]).
    Pread,
}

impl InputRead {
    pub fn as_str(self) -> &'static str {
        match self {
            InputRead::Auto => "auto",
            InputRead::Mmap => "mmap",
            InputRead::Pread => "pread",
        }
    }
}

impl std::str::FromStr for InputRead {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(InputRead::Auto),
            "mmap" => Ok(InputRead::Mmap),
            "pread" => Ok(InputRead::Pread),
            other => Err(format!("unknown input read mode {other:?} (auto, mmap, pread)")),
        }
    }
}

impl std::fmt::Display for InputRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Read through the maps if faulting a MiB into a map takes at most this fraction of the time
/// `pread` takes to copy it. The probe times the fault alone; the map costs more later (the
/// unmap of scanned pieces, [`InputMap::done_with`], TLB misses on 4 KiB pages), so the cut is
/// below 1: on Linux 6.18 (ext4, 2 vCPUs) the probe read 0.51–0.80 (median of 8 steps; one
/// run 1.06) and the maps still saved 7 % of the diff's CPU time (bench pair, 15 interleaved
/// runs each, files in the page cache with 4 KiB folios: 16 faults per MiB).
///
/// The probe used to count faults instead, and map below 12 per MiB, which took `pread` on that
/// host: the count cannot tell it from an earlier host with 4 KiB folios (so, presumably, the
/// same count) where `pread` was 1.8× faster. What differs between them is what a fault costs.
pub const MAX_MAP_OVER_PREAD: f64 = 0.75;
/// How much of a map [`probe_reads`] touches, in [`PROBE_STEP`]s.
pub const PROBE_BYTES: usize = 8 << 20;
/// The probe alternates a fault pass and a `pread` pass over each step of this size, so that a
/// stall (the VM preempted, an interrupt) hits one step of one side and the median drops it.
pub const PROBE_STEP: usize = 1 << 20;
/// Below this much to touch, the probe says nothing (and small inputs cost little either way).
const MIN_PROBE_BYTES: usize = 2 * PROBE_STEP;
const PAGE: usize = 4096;

/// What reading the start of a file costs through its map and with `pread`, measured on the
/// file itself by [`probe_reads`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadProbe {
    /// Page faults per MiB touched (minor and major): 1–2 with large folios, 16 with 4 KiB
    /// folios and fault-around.
    pub faults_per_mib: f64,
    /// Median over the probed steps of (time to touch a step through the map, one byte per
    /// page) / (time to `pread` the same step in [`crate::codec::CHUNK`] reads).
    pub map_over_pread: f64,
}

impl ReadProbe {
    /// Whether the maps are the cheaper way to read this file ([`MAX_MAP_OVER_PREAD`]).
    pub fn prefers_map(&self) -> bool {
        self.map_over_pread <= MAX_MAP_OVER_PREAD
    }
}

/// Times touching `map[range]` (at most [`PROBE_BYTES`] of it) against reading the same bytes
/// from `file` with `pread`, step by step; `None` if the range is under 2 MiB or a read fails.
/// The pages stay mapped: the diff reads them next anyway. Touching comes first in each step, so
/// a file not yet in the page cache is read from disk by the faults (a costly map, and `pread`,
/// with its readahead, is then the better choice for such files anyway).
pub fn probe_reads(map: &InputMap, file: &File, range: Range<usize>) -> Option<ReadProbe> {
    use std::os::unix::fs::FileExt;
    use std::time::Instant;
    let end = range.end.min(map.len()).min(range.start.saturating_add(PROBE_BYTES));
    if end.saturating_sub(range.start) < MIN_PROBE_BYTES {
        return None;
    }
    // Touched before timing, so that its own first-use faults are not counted against pread.
    let mut buf = vec![1u8; crate::codec::CHUNK];
    let before = thread_faults()?;
    let mut ratios = Vec::new();
    let mut x = 0u8;
    for step in (range.start..end - PROBE_STEP + 1).step_by(PROBE_STEP) {
        let t0 = Instant::now();
        for at in (step..step + PROBE_STEP).step_by(PAGE) {
            // SAFETY: `at` is inside the map; a volatile read so the touch is not optimised away.
            x ^= unsafe { std::ptr::read_volatile(map.as_ptr().add(at)) };
        }
        let t1 = Instant::now();
        for at in (step..step + PROBE_STEP).step_by(buf.len()) {
            let n = buf.len().min(step + PROBE_STEP - at);
            file.read_exact_at(&mut buf[..n], at as u64).ok()?;
        }
        x ^= buf[0];
        let t2 = Instant::now();
        ratios.push((t1 - t0).as_secs_f64() / (t2 - t1).as_secs_f64().max(1e-9));
    }
    std::hint::black_box(x);
    let touched = ratios.len() * PROBE_STEP;
    let faults = thread_faults()?.saturating_sub(before);
    ratios.sort_by(f64::total_cmp);
    Some(ReadProbe { faults_per_mib: faults as f64 * (1 << 20) as f64 / touched as f64, map_over_pread: ratios[ratios.len() / 2] })
}

/// Minor plus major page faults of the calling thread so far.
fn thread_faults() -> Option<u64> {
    // SAFETY: getrusage fills the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    (unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } == 0).then(|| (u.ru_minflt + u.ru_majflt) as u64)
}

/// A read-only map of a whole file, registered for [`guard_sigbus`] while it lives.
pub struct InputMap {
    mmap: memmap2::Mmap,
    slot: Option<&'static Slot>,
    /// Where the bytes that readers hand back ([`Self::done_with`]) start: before it is the
    /// safetensors header, never handed back.
    data_start: usize,
    /// For each [`PIECE`] of the map, its data bytes not yet handed back; made on first use.
    unread: OnceLock<Box<[AtomicU32]>>,
}

/// The unit in which [`InputMap::done_with`] unmaps: the PMD size (x86-64 and arm64 with 4 KiB
/// pages). The kernel maps a 2 MiB folio of a file with one PMD entry where it can; unmapping
/// part of one splits it, and each split costs an immediate TLB-flush IPI to every other core
/// (measured: 6 % of a diff's CPU time on a 2-vCPU VM, where IPIs are slow). Whole aligned
/// pieces are zapped with one batched flush per call.
pub const PIECE: usize = 2 << 20;

impl InputMap {
    /// Map `file` (opened from `path`) read-only.
    pub fn new(file: &File, path: &Path) -> io::Result<InputMap> {
        Self::map(file, path, false)
    }

    /// [`Self::new`], with every page mapped at once (for a reader that reads it all).
    pub fn populated(file: &File, path: &Path) -> io::Result<InputMap> {
        Self::map(file, path, true)
    }

    fn map(file: &File, path: &Path, populate: bool) -> io::Result<InputMap> {
        let mut options = memmap2::MmapOptions::new();
        if populate {
            options.populate();
        }
        // SAFETY: the map is read-only. A concurrent truncation raises SIGBUS on access past the
        // new end, which guard_sigbus reports as an error naming `path`; writers in this project
        // never modify published files in place.
        let mmap = unsafe { options.map(file) }?;
        let slot = (!mmap.is_empty()).then(|| Slot::register(mmap.as_ptr() as usize, mmap.len(), path.as_os_str()));
        Ok(InputMap { mmap, slot, data_start: 0, unread: OnceLock::new() })
    }

    /// Bytes before `n` (a header) are never handed back to [`Self::done_with`].
    pub fn set_data_start(&mut self, n: usize) {
        self.data_start = n;
    }

    /// Hand back `range` (at or past `data_start`), read by its one reader, which hands each
    /// byte back once: every 2 MiB piece of the map whose bytes have all been handed back is
    /// unmapped (the file's bytes stay in the page cache, and a later read maps them again;
    /// [`Self::unmap_done`] unmaps such a re-read). A diff hands back what it has scanned, so
    /// its resident set stays the pieces in flight instead of growing to the size of both
    /// checkpoints.
    pub fn done_with(&self, range: Range<usize>) {
        let len = self.mmap.len();
        let (start, end) = (range.start.max(self.data_start), range.end.min(len));
        if start >= end {
            return;
        }
        let unread = self.unread.get_or_init(|| {
            (0..self.pieces_overlapping(0..len).end)
                .map(|i| {
                    let r = self.piece(i);
                    AtomicU32::new(r.end.saturating_sub(r.start.max(self.data_start)) as u32)
                })
                .collect()
        });
        self.unmap_pieces(self.pieces_overlapping(start..end).filter(|&i| {
            let r = self.piece(i);
            let n = (end.min(r.end) - start.max(r.start)) as u32;
            unread[i].fetch_sub(n, Ordering::AcqRel).wrapping_sub(n) == 0
        }));
    }

    /// `range` has been read again after it was handed back ([`Self::done_with`]): unmap again
    /// the pieces it overlaps whose data has all been handed back (the others are still some
    /// reader's, and go when it hands them back).
    pub fn unmap_done(&self, range: Range<usize>) {
        let Some(unread) = self.unread.get() else { return };
        let range = range.start..range.end.min(self.mmap.len());
        if range.is_empty() {
            return;
        }
        self.unmap_pieces(self.pieces_overlapping(range).filter(|&i| unread[i].load(Ordering::Acquire) == 0));
    }

    /// How far the map starts into its first piece: pieces are aligned in the address space,
    /// where the PMDs are (the kernel aligns the maps of large files to 2 MiB, so they are
    /// aligned in the file too).
    fn skew(&self) -> usize {
        self.mmap.as_ptr() as usize % PIECE
    }

    /// Piece `i`'s bytes in the map.
    fn piece(&self, i: usize) -> Range<usize> {
        let skew = self.skew();
        (i * PIECE).saturating_sub(skew)..((i + 1) * PIECE - skew).min(self.mmap.len())
    }

    /// The pieces that hold bytes of the non-empty `r`.
    fn pieces_overlapping(&self, r: Range<usize>) -> Range<usize> {
        let skew = self.skew();
        (r.start + skew) / PIECE..(r.end + skew).div_ceil(PIECE)
    }

    /// Unmap the pieces `ids` yields (ascending), consecutive ones in one madvise: one TLB
    /// flush for all of them.
    fn unmap_pieces(&self, ids: impl Iterator<Item = usize>) {
        let mut run: Option<Range<usize>> = None;
        for i in ids {
            let r = self.piece(i);
            run = match run {
                Some(cur) if cur.end == r.start => Some(cur.start..r.end),
                Some(cur) => {
                    self.unmap(cur);
                    Some(r)
                }
                None => Some(r),
            };
        }
        if let Some(r) = run {
            self.unmap(r);
        }
    }

    fn unmap(&self, r: Range<usize>) {
        // SAFETY: MADV_DONTNEED on a shared read-only file map only drops page-table entries;
        // the contents are the file's, read again on the next access. `r` starts on a piece
        // boundary or at the map's (page-aligned) start; the kernel rounds the length up.
        let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, r.start, r.end - r.start) };
    }
}

impl Deref for InputMap {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.mmap
    }
}

impl Drop for InputMap {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            slot.clear();
        }
    }
}

/// The longest path a SIGBUS report names in full (longer ones are cut at the front).
const PATH_CAP: usize = 1024;

/// One registered map: the range it covers and its file's path, readable from a signal handler
/// (atomics only). Slots are never freed, only reused, so the handler can walk them at any
/// time; their number is the most maps ever alive at once.
struct Slot {
    in_use: AtomicBool,
    start: AtomicUsize,
    /// 0 while the slot is not a live map's.
    len: AtomicUsize,
    path: [AtomicU8; PATH_CAP],
    path_len: AtomicUsize,
    next: AtomicPtr<Slot>,
}

static SLOTS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());

impl Slot {
    fn register(start: usize, len: usize, path: &OsStr) -> &'static Slot {
        let slot = Slot::iter().find(|s| s.in_use.compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed).is_ok()).unwrap_or_else(|| {
            let s: &'static Slot = Box::leak(Box::new(Slot {
                in_use: AtomicBool::new(true),
                start: AtomicUsize::new(0),
                len: AtomicUsize::new(0),
                path: std::array::from_fn(|_| AtomicU8::new(0)),
                path_len: AtomicUsize::new(0),
                next: AtomicPtr::new(std::ptr::null_mut()),
            }));
            let mut head = SLOTS.load(Ordering::Acquire);
            loop {
                s.next.store(head, Ordering::Relaxed);
                match SLOTS.compare_exchange_weak(head, s as *const Slot as *mut Slot, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break s,
                    Err(h) => head = h,
                }
            }
        });
        let bytes = path.as_bytes();
        let bytes = &bytes[bytes.len().saturating_sub(PATH_CAP)..];
        for (dst, &b) in slot.path.iter().zip(bytes) {
            dst.store(b, Ordering::Relaxed);
        }
        slot.path_len.store(bytes.len(), Ordering::Relaxed);
        slot.start.store(start, Ordering::Relaxed);
        // Published last: a handler that sees the length sees the path and start too.
        slot.len.store(len, Ordering::Release);
        slot
    }

    fn clear(&self) {
        self.len.store(0, Ordering::Release);
        self.in_use.store(false, Ordering::Release);
    }

    fn iter() -> impl Iterator<Item = &'static Slot> {
        let mut p = SLOTS.load(Ordering::Acquire);
        std::iter::from_fn(move || {
            // SAFETY: slots are leaked, never freed.
            let s: &'static Slot = unsafe { p.as_ref() }?;
            p = s.next.load(Ordering::Acquire);
            Some(s)
        })
    }

    /// The live map holding `addr`, and the offset of `addr` in it.
    fn find(addr: usize) -> Option<(&'static Slot, usize)> {
        Slot::iter().find_map(|s| {
            let len = s.len.load(Ordering::Acquire);
            let start = s.start.load(Ordering::Relaxed);
            (len > 0 && addr >= start && addr - start < len).then(|| (s, addr - start))
        })
    }
}

/// How every reader reports a file that got shorter under it (through a map here, with pread
/// in crate::codec): what happened, then why and what to do instead.
pub const SHRANK: &str = "the file shrank while it was being read";
pub const SHRANK_WHY: &str = "it was truncated or rewritten in place; write a new file and rename it over the old one instead";

static PROGRAM: OnceLock<&'static str> = OnceLock::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Report SIGBUS on an [`InputMap`] as `PROGRAM: error: PATH: ...` and exit with the `io` code
/// (docs/FORMATS.md, "Exit codes"). A SIGBUS anywhere else goes to the handler that was there
/// before (Rust's own, or the default: the process dies of the signal).
pub fn guard_sigbus(program: &'static str) {
    if PROGRAM.set(program).is_err() {
        return;
    }
    // SAFETY: installs a handler that only reads atomics and calls write(2) and _exit(2), which
    // are async-signal-safe; the previous action is kept for faults that are not ours.
    unsafe {
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_sigbus as *const () as usize;
        new.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut new.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
            let _ = PREVIOUS.set(old);
        }
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((slot, offset)) = Slot::find(addr) {
        let mut msg = SignalMessage::default();
        msg.push(PROGRAM.get().copied().unwrap_or("disagg").as_bytes());
        msg.push(b": error: ");
        let n = slot.path_len.load(Ordering::Relaxed).min(PATH_CAP);
        for b in &slot.path[..n] {
            msg.push(&[b.load(Ordering::Relaxed)]);
        }
        msg.push(b": ");
        msg.push(SHRANK.as_bytes());
        msg.push(b" (SIGBUS at byte ");
        msg.push_number(offset as u64);
        msg.push(b" of its map): ");
        msg.push(SHRANK_WHY.as_bytes());
        msg.push(b"\n");
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, msg.buf.as_ptr().cast(), msg.len);
            libc::_exit(crate::error::exit::IO);
        }
    }
    // Not one of ours: hand it to whoever had it before, or die of it.
    match PREVIOUS.get() {
        Some(prev) if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN => {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed for these arguments.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: as above, a plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: back to the default action; returning re-runs the faulting access, which
            // then kills the process with SIGBUS as if no handler had been installed.
            unsafe {
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
    }
}

/// A message built without allocating, for the signal handler.
struct SignalMessage {
    buf: [u8; PATH_CAP + 512],
    len: usize,
}

impl Default for SignalMessage {
    fn default() -> Self {
        SignalMessage { buf: [0; PATH_CAP + 512], len: 0 }
    }
}

impl SignalMessage {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }
    fn push_number(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Whether the page holding `addr` is mapped in this process (/proc/self/pagemap bit 63,
    /// readable without privileges); `None` where pagemap cannot be read.
    pub(crate) fn mapped(addr: usize) -> Option<bool> {
        let f = File::open("/proc/self/pagemap").ok()?;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, (addr / PAGE * 8) as u64).ok()?;
        Some(u64::from_le_bytes(e) >> 63 == 1)
    }

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("disagg-inputmap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn live_maps_are_found_by_address_and_forgotten_when_dropped() {
        let dir = temp("slots");
        let path = dir.join("a file.bin");
        std::fs::write(&path, vec![7u8; 3 * PAGE + 5]).unwrap();
        let file = File::open(&path).unwrap();
        let map = InputMap::new(&file, &path).unwrap();
        let base = map.as_ptr() as usize;
        let (slot, off) = Slot::find(base + PAGE + 3).expect("registered");
        assert_eq!(off, PAGE + 3);
        let n = slot.path_len.load(Ordering::Relaxed);
        let named: Vec<u8> = slot.path[..n].iter().map(|b| b.load(Ordering::Relaxed)).collect();
        assert_eq!(named, path.as_os_str().as_bytes());
        assert!(Slot::find(base + 3 * PAGE + 5).is_none(), "one past the end is not the map's");
        drop(map);
        assert!(Slot::find(base + PAGE).is_none_or(|(s, _)| !std::ptr::eq(s, slot)), "a dropped map is not found");
        // Slots are reused: mapping and dropping many files adds no slot after the first few
        // (other tests register maps concurrently, hence the margin).
        let before = Slot::iter().count();
        for _ in 0..100 {
            let again = InputMap::new(&file, &path).unwrap();
            assert!(Slot::find(again.as_ptr() as usize).is_some());
        }
        assert!(Slot::iter().count() <= before + 8, "{} slots after {before}", Slot::iter().count());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pieces_are_unmapped_once_all_their_data_is_handed_back_and_read_the_same_after() {
        let dir = temp("pieces");
        let path = dir.join("f");
        // 3 pieces and a bit; "header" up to 1000, data after.
        let len = 3 * PIECE + 3 * PAGE;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let mut map = InputMap::new(&file, &path).unwrap();
        map.set_data_start(1000);
        let base = map.as_ptr() as usize;
        if !base.is_multiple_of(PIECE) {
            eprintln!("skipped: the kernel did not align this map to 2 MiB");
            return;
        }
        let touch = |m: &InputMap| (0..len).step_by(PAGE).map(|at| m[at] as u64).sum::<u64>();
        std::hint::black_box(touch(&map));
        if mapped(base) != Some(true) {
            eprintln!("skipped: /proc/self/pagemap does not show mapped pages here");
            return;
        }
        let at = |piece: usize, page: usize| mapped(base + piece * PIECE + page * PAGE).unwrap();
        // Piece 1 handed back in two halves, out of order: unmapped only after the second.
        map.done_with(PIECE + PIECE / 2..2 * PIECE);
        assert!(at(1, 0) && at(1, PIECE / PAGE - 1), "half a piece stays mapped");
        map.done_with(PIECE..PIECE + PIECE / 2);
        assert!(!at(1, 0) && !at(1, PIECE / PAGE - 1), "a piece read in full is unmapped");
        assert!(at(0, 0) && at(2, 0), "its neighbours are not");
        // The header is never handed back: piece 0 goes once its data (from 1000) has, and a
        // range reaching into the header counts only its data.
        map.done_with(0..PIECE);
        assert!(!at(0, 0));
        // The last, short piece and piece 2 in one call (one madvise for both).
        map.done_with(2 * PIECE..len);
        assert!(!at(2, 0) && !at(3, 0) && !at(3, 2));
        // Read again after it was handed back: mapped again, and unmap_done unmaps it again,
        // but not a piece some reader still holds.
        std::hint::black_box(touch(&map));
        assert!(at(1, 0), "read again, mapped again");
        let mut other = InputMap::new(&file, &path).unwrap();
        other.set_data_start(1000);
        let ob = other.as_ptr() as usize;
        std::hint::black_box(touch(&other));
        other.done_with(PIECE..PIECE + 10);
        other.unmap_done(0..len);
        assert_eq!(mapped(ob + PIECE), Some(true), "a piece not handed back in full stays");
        map.unmap_done(PIECE..PIECE + 1);
        assert!(!at(1, 0) && !at(1, PIECE / PAGE - 1), "re-read piece unmapped again");
        assert!(at(2, 0), "only the pieces the range overlaps");
        map.unmap_done(0..len);
        assert!(!at(0, 0) && !at(2, 0) && !at(3, 0));
        // The bytes read the same after all of it.
        assert!(map[..] == bytes[..] && other[..] == bytes[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_probe_times_both_reads_and_counts_faults_of_pages_not_yet_mapped() {
        let dir = temp("probe");
        let path = dir.join("f");
        std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        let map = InputMap::new(&file, &path).unwrap();
        assert_eq!(probe_reads(&map, &file, 0..(2 << 20) - 1), None, "under 2 MiB says nothing");
        let first = probe_reads(&map, &file, 0..map.len()).unwrap();
        assert!(first.faults_per_mib > 0.0, "touching a fresh map faults");
        assert!(first.map_over_pread > 0.0 && first.map_over_pread.is_finite(), "{first:?}");
        // Touched once, the pages stay mapped: a second probe faults (almost) never, and
        // touching what is mapped is far cheaper than copying it.
        let second = probe_reads(&map, &file, 0..map.len()).unwrap();
        assert!(second.faults_per_mib < first.faults_per_mib && second.faults_per_mib <= 1.0, "{first:?} then {second:?}");
        assert!(second.prefers_map(), "mapped pages read cheaper than a copy: {second:?}");
        // A range past the end of the file is cut to it.
        assert_eq!(probe_reads(&map, &file, (3 << 20)..(8 << 20)), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signal_messages_hold_numbers_and_stop_at_their_capacity() {
        let mut m = SignalMessage::default();
        m.push(b"at ");
        m.push_number(0);
        m.push(b" ");
        m.push_number(18_446_744_073_709_551_615);
        assert_eq!(&m.buf[..m.len], b"at 0 18446744073709551615");
        m.push(&[b'x'; 4 * PATH_CAP]);
        assert_eq!(m.len, m.buf.len());
    }
}
