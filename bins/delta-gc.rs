use clap::Parser;
use disagg::gc::{collect, GcOptions};
use std::path::PathBuf;

/// Remove old weight versions from SRC, keeping the chain from the newest full version to
/// `latest`, every version a live follower may still read, the last N versions, and anything
/// younger than --min-age. Safe to run from cron while hosts pull.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:
  delta-gc /shared/weights --keep 3 --dry-run --json
  */10 * * * *  delta-gc /shared/weights --keep 3 >> /var/log/delta-gc.log 2>&1    (crontab)
  delta-gc /shared/weights --followers '/shared/weights/.followers/*.json' --min-age 900

Exit codes: 0 ok (also when nothing was collectable), 2 usage, 3 malformed pointer or follower
status file, 5 the chain of `latest` is broken (nothing collected), 6 SRC not found, 9 another
delta-gc holds the lock, 10 I/O."
)]
struct Args {
    /// Publish root holding weight_vNNNNNN directories and `latest`.
    src: PathBuf,
    /// Always keep the last N complete versions (and their chains).
    #[arg(long, value_name = "N", default_value_t = 3)]
    keep: usize,
    /// Follower status files (wildcards in the file name only); repeatable.
    /// Default: SRC/.followers/*.json.
    #[arg(long, value_name = "GLOB")]
    followers: Vec<String>,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    dry_run: bool,
    /// Never remove a version published less than S seconds ago (nor the chains of versions
    /// that may have been `latest` since), nor an incomplete one touched since.
    #[arg(long, value_name = "S", default_value_t = 600.0)]
    min_age: f64,
    /// Ignore follower status files not updated for S seconds (dead hosts), with a warning.
    #[arg(long, value_name = "S", default_value_t = 1800.0)]
    stale_after: f64,
    /// One JSON object on stdout: every version with its verdict and reasons (FORMATS.md §11.3).
    #[arg(long)]
    json: bool,
}

fn main() {
    let a = Args::parse();
    disagg::error::run_main("delta-gc", || {
        let r = collect(&GcOptions {
            src: a.src,
            keep: a.keep,
            followers: a.followers,
            dry_run: a.dry_run,
            min_age: disagg::cli::seconds("min-age", a.min_age)?,
            stale_after: disagg::cli::seconds("stale-after", a.stale_after)?,
        })?;
        disagg::report::print(&r, a.json, || {
            let verb = if r.dry_run { "would remove" } else { "removed" };
            let mut s = String::new();
            for v in &r.versions {
                if v.delete {
                    s.push_str(&format!("{verb} version {} ({}, {} bytes)\n", v.version, v.kind, v.bytes));
                }
            }
            format!("{s}{verb} {} versions ({} bytes), kept {:?}; latest {}", r.deleted.len(), r.bytes_freed, r.kept, r.latest.as_deref().unwrap_or("(none)"))
        })
    })
}
