//! Named failpoints for crash tests, compiled in only with the `failpoints` feature.
//!
//! `DISAGG_FAILPOINT=NAME[:ACTION][,NAME[:ACTION]...]` arms them in a spawned CLI. Actions:
//! `abort` (default; the process dies at once, like `kill -9`, without unwinding or flushing),
//! `sleep-MS` (pause, to widen the window for an external kill), `error` (return an I/O error).
//! One stands in for a condition instead of a failure: `NAME:ahead-SECS` makes
//! [`clock_ahead_secs`] say this host's clock runs SECS ahead (a test cannot set the clock).

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> std::io::Result<()> {
    let Ok(spec) = std::env::var("DISAGG_FAILPOINT") else { return Ok(()) };
    for item in spec.split(',') {
        let (n, action) = item.split_once(':').unwrap_or((item, "abort"));
        if n != name && n != "*" {
            continue;
        }
        if action.starts_with("ahead-") {
            continue;
        } else if let Some(ms) = action.strip_prefix("sleep-") {
            std::thread::sleep(std::time::Duration::from_millis(ms.parse().unwrap_or(1)));
        } else if action == "error" {
            return Err(std::io::Error::other(format!("failpoint {name}")));
        } else {
            std::process::abort();
        }
    }
    Ok(())
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) -> std::io::Result<()> {
    Ok(())
}

/// Seconds `DISAGG_FAILPOINT=NAME:ahead-SECS` moves this host's clock ahead (negative: behind).
#[cfg(feature = "failpoints")]
pub fn clock_ahead_secs(name: &str) -> f64 {
    let Ok(spec) = std::env::var("DISAGG_FAILPOINT") else { return 0.0 };
    spec.split(',').filter_map(|item| item.split_once(':')).find_map(|(n, action)| if n == name { action.strip_prefix("ahead-")?.parse().ok() } else { None }).unwrap_or(0.0)
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn clock_ahead_secs(_name: &str) -> f64 {
    0.0
}

/// `failpoint!("name")` inside a function returning `crate::error::Result`.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        $crate::failpoint::hit($name).map_err(|e| $crate::error::Error::Internal(format!("{}", e)))?
    };
}
