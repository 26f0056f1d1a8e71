use clap::Parser;
use disagg::dataplane::channel::{self, Layout, PublishOptions};
use std::path::PathBuf;

/// Append SampleRefs (JSON lines on stdin) to a ref channel, or end a producer's stream.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:\n  rollout | ref-publish /shared/ch --producer host3 --max-in-flight 256\n  ref-publish /shared/ch --producer host3 --close\n  ref-publish /shared/ch --producer host3 --fail 'sglang crashed'\n  ref-publish /shared/ch --layout single-file < refs.jsonl   # SpecForge refs.jsonl\n\nExit codes: 0 done, 2 usage, 3 a bad ref on stdin, 5 the stream is closed or failed, 10 I/O,\n130/143 stopped by SIGINT/SIGTERM (complete lines read so far are published, the stream stays\nopen)."
)]
struct Args {
    /// Channel directory (created if missing).
    channel: PathBuf,
    /// Producer name: one process per name; [A-Za-z0-9._-]{1,128}.
    #[arg(long, default_value = "default")]
    producer: String,
    /// Block while published - consumed >= N; resume below 3N/4.
    #[arg(long, value_name = "N")]
    max_in_flight: Option<u64>,
    /// After stdin is drained, close the stream (consumers exit 0 once drained).
    #[arg(long, conflicts_with = "fail")]
    close: bool,
    /// Fail the stream with REASON (stdin is not read); consumers exit 5.
    #[arg(long, value_name = "REASON")]
    fail: Option<String>,
    /// Skip as many input lines as this producer already published (restart with the same input).
    #[arg(long)]
    resume: bool,
    /// On-disk layout: per-producer segments, or SpecForge's single refs.jsonl.
    #[arg(long, value_enum, default_value = "segments")]
    layout: LayoutArg,
    /// Do not fdatasync after each batch (faster; a power cut may lose the last batches).
    #[arg(long)]
    no_fsync: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LayoutArg {
    Segments,
    SingleFile,
}

fn main() {
    let a = Args::parse();
    // Without SA_RESTART: a stop ends a read blocked on stdin at once.
    disagg::stop::install_interrupting_reads();
    let opts = PublishOptions {
        channel: a.channel,
        producer: a.producer,
        max_in_flight: a.max_in_flight,
        close: a.close,
        fail: a.fail,
        resume: a.resume,
        layout: match a.layout {
            LayoutArg::Segments => Layout::Segments,
            LayoutArg::SingleFile => Layout::SingleFile,
        },
        fsync: !a.no_fsync,
        json: a.json,
    };
    disagg::error::run_main("ref-publish", || channel::run_publish(&opts));
}
