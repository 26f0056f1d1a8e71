use clap::Parser;
use disagg::dataplane::ingest::{self, IngestOptions};
use disagg::dataplane::store::PlaceMode;
use std::path::PathBuf;
use std::time::Duration;

/// Ingest SpecForge offline features (.ckpt, .ckpt.gz, .safetensors) into a shared-dir feature
/// store, and write a tensor-free ref manifest or publish the refs into a channel.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  feature-ingest /data/hidden_states --store /shared/store --manifest /shared/refs.json\n  feature-ingest /data/hs --store /shared/store --publish /shared/ch --producer ingest --mode move\n\nInvalid files (truncated, corrupt, NaN) are reported and skipped (exit 0) unless --strict (exit 3).\n\nExit codes: 0 ok, 2 usage, 3 a bad file with --strict, 6 input not found, 10 I/O (store quota\nincluded), 130/143 stopped by SIGINT/SIGTERM between files or in a quota wait: what is stored\nstays, nothing is published, and a rerun skips the stored files.\n\n--mode move removes the sources only once every ref is in the manifest (and its PATH.moved\njournal, which keeps the refs of moved files on a rerun) or published in the closed stream."
)]
struct Args {
    /// A feature file or a directory walked recursively.
    input: PathBuf,
    /// Feature store directory (created if missing).
    #[arg(long)]
    store: PathBuf,
    /// Store id recorded in each ref's metadata.store_id.
    #[arg(long)]
    store_id: Option<String>,
    /// run_id of the refs.
    #[arg(long)]
    run_id: Option<String>,
    /// Write {"schema_version":1,"refs":[...]} here (atomically) and a PATH.done sentinel.
    #[arg(long, conflicts_with = "publish")]
    manifest: Option<PathBuf>,
    /// Publish the refs into this channel and close the stream.
    #[arg(long, value_name = "CHANNEL")]
    publish: Option<PathBuf>,
    /// Producer name when publishing.
    #[arg(long, default_value = "ingest")]
    producer: String,
    /// copy (default), link (hard link .safetensors, no extra disk) or move (remove the sources
    /// once their refs are written).
    #[arg(long, value_enum, default_value = "copy")]
    mode: ModeArg,
    /// SampleRef strategy.
    #[arg(long, default_value = "eagle3")]
    strategy: String,
    /// Treat any invalid file as fatal.
    #[arg(long)]
    strict: bool,
    /// Delete objects when their last lease is released (default: retain for multi-epoch use).
    #[arg(long)]
    consume_once: bool,
    /// Byte quota of the store: wait (--quota-wait) then fail instead of filling the disk.
    #[arg(long, value_name = "BYTES")]
    quota_bytes: Option<u64>,
    /// Seconds to wait for space under the quota.
    #[arg(long, value_name = "S", default_value_t = 0.0)]
    quota_wait: f64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ModeArg {
    Copy,
    Link,
    Move,
}

fn main() {
    let a = Args::parse();
    disagg::stop::install();
    let opts = IngestOptions {
        input: a.input,
        store: a.store,
        store_id: a.store_id,
        run_id: a.run_id,
        manifest: a.manifest,
        publish: a.publish,
        producer: a.producer,
        mode: match a.mode {
            ModeArg::Copy => PlaceMode::Copy,
            ModeArg::Link => PlaceMode::Link,
            ModeArg::Move => PlaceMode::Move,
        },
        strategy: a.strategy,
        strict: a.strict,
        retain_on_release: !a.consume_once,
        quota_bytes: a.quota_bytes,
        quota_wait: Duration::from_secs_f64(a.quota_wait.max(0.0)),
        json: a.json,
    };
    disagg::error::run_main("feature-ingest", || ingest::run_ingest(&opts));
}
