use clap::Parser;
use disagg::dataplane::channel::{self, TailOptions};
use std::path::PathBuf;
use std::time::Duration;

/// Print complete, checked SampleRefs from a ref channel as JSON lines, in order per producer.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  ref-tail /shared/ch --cursor trainer --follow --idle-timeout 600 > refs.jsonl\n  ref-tail /shared/ch --cursor t --follow --rank 3 --world 8\n  ref-tail /shared/ch --cursor t --follow --max-staleness 8 --pointer /shared/weights --stale-out stale.jsonl\n\nExit codes: 0 when every producer closed and all is drained (or, without --follow, when nothing\nmore is there), 2 usage, 3 malformed pointer or segment, 5 a producer failed, 6 channel or\npointer not found, 9 idle timeout, 10 I/O, 130/143 stopped by SIGINT/SIGTERM between batches\n(the cursor covers all it printed)."
)]
struct Args {
    /// Channel directory (per-producer segments, or SpecForge's refs.jsonl).
    channel: PathBuf,
    /// Persist the position under this name and record consumption for backpressure.
    #[arg(long, value_name = "NAME")]
    cursor: Option<String>,
    /// Wait for new refs until every producer closed.
    #[arg(long)]
    follow: bool,
    /// With --follow, fail after S seconds with no new ref and no live producer heartbeat.
    #[arg(long, value_name = "S")]
    idle_timeout: Option<f64>,
    /// This consumer's rank (with --world).
    #[arg(long, default_value_t = 0, requires = "world")]
    rank: u64,
    /// Number of consumers sharing the channel; each gets a disjoint shard.
    #[arg(long, default_value_t = 1)]
    world: u64,
    /// Drop refs older than latest - K weight versions (with --pointer).
    #[arg(long, value_name = "K", requires = "pointer")]
    max_staleness: Option<u64>,
    /// Weight directory whose `latest` names the current weight version.
    #[arg(long, value_name = "SRC", requires = "max_staleness")]
    pointer: Option<PathBuf>,
    /// Append dropped stale refs to FILE.
    #[arg(long, value_name = "FILE", requires = "max_staleness")]
    stale_out: Option<PathBuf>,
    /// With --follow, wait until at least N producers exist before exiting.
    #[arg(long, value_name = "N", default_value_t = 1)]
    expect_producers: usize,
    /// Print a JSON summary on stderr at exit: delivered, stale, other_shards, torn, corrupt,
    /// missing (seqs no line held), duplicates, producers, latest_version.
    #[arg(long)]
    json: bool,
}

fn main() {
    let a = Args::parse();
    disagg::stop::install();
    let opts = TailOptions {
        channel: a.channel,
        cursor: a.cursor,
        follow: a.follow,
        idle_timeout: a.idle_timeout.map(|s| Duration::from_secs_f64(s.max(0.0))),
        rank: a.rank,
        world: a.world,
        max_staleness: a.max_staleness,
        pointer: a.pointer,
        stale_out: a.stale_out,
        expect_producers: a.expect_producers,
        json: a.json,
    };
    disagg::error::run_main("ref-tail", || channel::run_tail(&opts));
}
