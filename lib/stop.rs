//! SIGTERM and SIGINT as a request to stop at the next safe point.
//!
//! The default action of both kills a process wherever it is. Our writers survive that, but at
//! a price: a `delta-diff` killed mid-publish leaves an incomplete version that blocks a plain
//! rerun, and a `delta-apply` killed mid-patch forces the next run to reseed the whole
//! checkpoint. Orchestrators (Kubernetes, Slurm, rcli wrappers, `timeout`) stop with SIGTERM
//! and a grace period, so the tools that write install [`install`]'s handler: the signal only
//! sets a flag, which each tool checks where stopping leaves nothing to repair
//! ([`check`]): `delta-diff` between tensors and before its index (it then removes its
//! unpublished version), `delta-apply` before it mutates LOCAL and between seed and patch (a
//! patch pass in progress is finished: it is short, and a stop inside it would cost a reseed),
//! `delta-follow` between cycles, `ref-tail` between batches (its cursor then covers exactly
//! what it printed), `ref-publish` after appending the complete lines it has read,
//! `feature-ingest` between files.
//!
//! A second signal kills at once (the handler restores the default action and re-raises), so
//! a user pressing Ctrl-C twice is never kept waiting; that is the crash case, which every
//! writer already survives.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicI32, Ordering};

/// The first stop signal received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The two ends of the wake pipe [`install_interrupting_reads`] makes (-1: none): the handler
/// writes a byte to the second, and [`wait_readable`] polls the first.
static WAKE: [AtomicI32; 2] = [AtomicI32::new(-1), AtomicI32::new(-1)];

extern "C" fn on_signal(sig: libc::c_int) {
    let wake = WAKE[1].load(Ordering::SeqCst);
    if wake >= 0 {
        // SAFETY: write is async-signal-safe; the pipe is non-blocking, so a full pipe (it
        // only ever needs one byte) just drops this one.
        unsafe { libc::write(wake, [1u8].as_ptr().cast(), 1) };
    }
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: signal and raise are async-signal-safe.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// Route SIGTERM and SIGINT to the stop flag (binaries call this first thing). `SA_RESTART`
/// keeps interrupted system calls going, so only the flag changes what the tool does.
pub fn install() {
    install_with(libc::SA_RESTART);
}

/// [`install`] without `SA_RESTART`, for a tool that waits on its stdin: a blocking read of a
/// pipe or terminal then ends with `EINTR` when the signal arrives, so the stop is seen at
/// once instead of at the next input. (std's `write_all` and sleeps retry on `EINTR`, and
/// regular-file I/O is not interrupted, so nothing else changes.) A signal that arrives just
/// before such a read starts would not interrupt it; reads that go through [`wait_readable`]
/// first see it anyway.
pub fn install_interrupting_reads() {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == 0 {
        WAKE[0].store(fds[0], Ordering::SeqCst);
        WAKE[1].store(fds[1], Ordering::SeqCst);
    }
    install_with(0);
}

/// Block until `fd` is readable (or at its end) or a stop signal has arrived; `false` means
/// stopped. With the wake pipe of [`install_interrupting_reads`] there is no window: a signal
/// that lands before the poll has already made the pipe readable. Without it (not installed,
/// or the pipe could not be made) this only returns on input, as a plain read would.
pub fn wait_readable(fd: libc::c_int) -> bool {
    loop {
        if requested().is_some() {
            return false;
        }
        let mut fds = [libc::pollfd { fd, events: libc::POLLIN, revents: 0 }, libc::pollfd { fd: WAKE[0].load(Ordering::SeqCst), events: libc::POLLIN, revents: 0 }];
        // SAFETY: two valid pollfds (a negative fd is ignored by poll); no timeout.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n > 0 && fds[0].revents != 0 {
            return requested().is_none();
        }
        // EINTR or the wake pipe: the loop's check decides.
    }
}

/// Spawn a helper thread that never takes SIGTERM or SIGINT, so that they always reach the
/// threads that act on them: a signal taken by a helper would not interrupt the main thread's
/// blocking read. The mask is inherited at spawn (no window where the helper could take one);
/// a signal arriving meanwhile stays pending and is delivered when the caller's mask returns.
pub fn spawn_unsignalled<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    // SAFETY: the sets are initialised by sigemptyset/sigaddset before use; pthread_sigmask
    // changes only the calling thread's mask, and the old one is restored.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGTERM);
        libc::sigaddset(&mut block, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &block, &mut old);
        let handle = std::thread::spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        handle
    }
}

fn install_with(flags: libc::c_int) {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only touches an
        // atomic and calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = flags;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The stop signal received so far, if any.
pub fn requested() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// `Err(Error::Interrupted)` once a stop signal has arrived: call where stopping is clean.
pub fn check() -> Result<()> {
    match requested() {
        None => Ok(()),
        Some(signal) => Err(Error::Interrupted { signal }),
    }
}

/// The signal's name for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}
