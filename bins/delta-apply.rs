use clap::Parser;
use disagg::apply::{pull, ApplyOptions, Target};
use disagg::error::Error;

/// Bring the host-local checkpoint LOCAL to a published weight version: seed it from the
/// newest full version (or BASE), apply the chain of deltas in place, verify every checksum.
/// Crash-safe: a run killed at any point is repaired by the next one.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:
  delta-apply --local /local/model --base /models/Qwen3-8B --source /shared/weights --target latest
  delta-apply --local /local/model --base /models/Qwen3-8B --source /shared/weights --target 12 --json
  delta-apply --local /local/model --base /models/Qwen3-8B --source /shared/weights --no-fsync

Exit codes: 0 ok (also when already at the target), 2 usage, 3 malformed version or payload,
4 local checkpoint lacks a patched tensor, 5 conflict (incomplete version, broken chain),
6 not found, 7 checksum mismatch (state not advanced; the next run repairs), 8 pre-read hook
failed, 9 lock wait timed out, 10 I/O, 130/143 stopped by SIGINT/SIGTERM before LOCAL changed
or between seed and patch (a patch in progress is finished first; a second signal kills)."
)]
struct Args {
    #[command(flatten)]
    host: disagg::cli::HostArgs,
    /// A version number, or `latest` to follow SRC/latest.
    #[arg(long, default_value = "latest")]
    target: String,
    /// Versions live under SRC/ID (numeric targets; `latest` names its own run).
    #[arg(long, value_name = "ID")]
    run_id: Option<String>,
    /// Shell command run before each version is read (env DISAGG_VERSION, DISAGG_VERSION_DIR).
    #[arg(long, value_name = "CMD")]
    pre_read_hook: Option<String>,
    /// Give up waiting for another apply on this host after S seconds (default: wait).
    #[arg(long, value_name = "S")]
    lock_timeout: Option<f64>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    threads: disagg::cli::ThreadArgs,
}

fn main() {
    let a = Args::parse();
    disagg::stop::install();
    disagg::error::run_main("delta-apply", || {
        a.threads.install()?;
        let target = match a.target.as_str() {
            "latest" if a.run_id.is_some() => return Err(Error::Usage("--run-id goes with a numeric --target; `latest` names its own run".into())),
            "latest" => Target::Latest,
            s => Target::Version(disagg::version::parse_version_str(s).ok_or_else(|| Error::Usage(format!("--target {s:?}: expected a number or `latest`")))?),
        };
        let opts = ApplyOptions {
            no_fsync: a.host.no_fsync,
            local: a.host.local,
            base: a.host.base,
            source: a.host.source,
            target,
            run_id: a.run_id,
            pre_read_hook: a.pre_read_hook,
            lock_timeout: a.lock_timeout.map(|s| disagg::cli::seconds("lock-timeout", s)).transpose()?,
        };
        let r = pull(&opts)?;
        disagg::report::print(&r, a.json, || {
            let mut s = if r.noop { format!("already at version {}", r.version) } else { format!("at version {}", r.version) };
            if let Some(reason) = &r.repair_reason {
                s.push_str(&format!(" (repaired: {reason})"));
            }
            if let Some(reason) = &r.foreign_reason {
                s.push_str(&format!(" (reseeded: {reason})"));
            }
            if let Some(v) = r.seeded_from {
                s.push_str(&format!(", seeded from version {v}"));
            }
            if !r.applied.is_empty() {
                s.push_str(&format!(", applied {:?} ({} tensors)", r.applied, r.tensors_patched));
            }
            format!("{s} in {:.3}s", r.seconds)
        })
    })
}
