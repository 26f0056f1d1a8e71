//! Named failpoints for crash tests, compiled in only with the `failpoints` feature.
//!
//! `DISAGG_FAILPOINT=NAME[:ACTION][,NAME[:ACTION]...]` arms them in a spawned CLI. Actions:
//! `abort` (default; the process dies at once, like `kill -9`, without unwinding or flushing),
//! `sleep-MS` (pause, to widen the window for an external kill), `error` (return an I/O error).

#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> std::io::Result<()> {
    let Ok(spec) = std::env::var("DISAGG_FAILPOINT") else { return Ok(()) };
    for item in spec.split(',') {
        let (n, action) = item.split_once(':').unwrap_or((item, "abort"));
        if n != name && n != "*" {
            continue;
        }
        if let Some(ms) = action.strip_prefix("sleep-") {
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

/// `failpoint!("name")` inside a function returning `crate::error::Result`.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        $crate::failpoint::hit($name)
            .map_err(|e| $crate::error::Error::Internal(format!("{}", e)))?
    };
}
