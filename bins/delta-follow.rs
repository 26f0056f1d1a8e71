use clap::Parser;
use disagg::follow::{follow, FollowOptions};
use std::path::PathBuf;

/// Keep LOCAL at SRC/latest: poll the pointer (with jitter), pull and verify new versions with
/// the delta-apply code, then run the reload command. Failures are retried with backoff and
/// recorded in a status file that delta-gc reads; an unverified checkpoint is never reloaded.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:
  delta-follow --local /local/model --base /models/Qwen3-8B --source /shared/weights \\
    --reload-cmd 'scripts/sglang-reload.sh http://127.0.0.1:30000'
  delta-follow --local /local/model --base /models/Qwen3-8B --source /shared/weights --once --json

The reload command runs under `sh -c` with DISAGG_VERSION (decimal), DISAGG_LOCAL, DISAGG_RUN_ID
and DISAGG_SOURCE set, only after the pull verified every checksum. scripts/sglang-reload.sh
POSTs {\"model_path\": LOCAL, \"weight_version\": N, \"flush_cache\": true} (JSON-escaped) to
sglang's /update_weights_from_disk and fails unless the engine answers success.

The status file (default SRC/.followers/NAME.json) records applied and reloaded versions and
the oldest version this host may still read.

Exit codes (--once, or a status file that cannot be written): 0 ok, 2 usage, 3 malformed
version or pointer, 4 LOCAL lacks a patched tensor, 5 conflict (incomplete version, broken
chain), 6 not found, 7 checksum mismatch (nothing reloaded), 8 reload command failed, 10 I/O.
Without --once, failures are retried with backoff and never end the loop."
)]
struct Args {
    #[command(flatten)]
    host: disagg::cli::HostArgs,
    /// One pull + reload, then exit with its result.
    #[arg(long)]
    once: bool,
    /// Exit 0 once version N (or newer) is applied and reloaded.
    #[arg(long, value_name = "N", conflicts_with = "once")]
    until: Option<u64>,
    /// Seconds between polls of SRC/latest (±20 % jitter).
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    poll: f64,
    /// Longest wait between retries after failures, in seconds.
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    max_backoff: f64,
    /// Shell command that makes the engine load LOCAL (env: DISAGG_VERSION, DISAGG_LOCAL, ...).
    #[arg(long, value_name = "CMD")]
    reload_cmd: Option<String>,
    /// Kill the reload command after S seconds and count it failed.
    #[arg(long, value_name = "S", default_value_t = 600.0)]
    reload_timeout: f64,
    /// Status file (default SRC/.followers/NAME.json).
    #[arg(long, value_name = "FILE")]
    status: Option<PathBuf>,
    /// Name in the status file (default: host name + hash of LOCAL's path).
    #[arg(long)]
    name: Option<String>,
    /// Reload once at start even if the status file says the engine already runs LOCAL's
    /// version (use when the engine was restarted along with the follower).
    #[arg(long)]
    reload_on_start: bool,
    /// Shell command run before each version is read (env DISAGG_VERSION, DISAGG_VERSION_DIR).
    #[arg(long, value_name = "CMD")]
    pre_read_hook: Option<String>,
    /// One JSON object per cycle that did something (or failed) on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    threads: disagg::cli::ThreadArgs,
}

fn main() {
    let a = Args::parse();
    disagg::error::run_main("delta-follow", || {
        a.threads.install()?;
        follow(&FollowOptions {
            local: a.host.local,
            base: a.host.base,
            source: a.host.source,
            once: a.once,
            until: a.until,
            poll: disagg::cli::seconds("poll", a.poll)?,
            max_backoff: disagg::cli::seconds("max-backoff", a.max_backoff)?,
            reload_cmd: a.reload_cmd,
            reload_timeout: disagg::cli::seconds("reload-timeout", a.reload_timeout)?,
            status: a.status,
            name: a.name,
            reload_on_start: a.reload_on_start,
            pre_read_hook: a.pre_read_hook,
            json: a.json,
            no_fsync: a.host.no_fsync,
        })
    })
}
