use clap::Parser;
use disagg::checksum::ChecksumAlg;
use disagg::diff::{publish, DiffOptions, DEFAULT_MAX_FILE_BYTES, IN_MEMORY_BUDGET};
use disagg::version::Encoding;
use std::path::PathBuf;

/// Publish NEW as weight version N under SRC: a delta against OLD holding only the changed
/// tensors (slime's format), or with --full a full checkpoint that resets the chain.
#[derive(Parser)]
#[command(after_help = "Examples:
  delta-diff ckpt/step_6 ckpt/step_7 --publish /shared/weights --version 7 --json
  delta-diff ckpt/step_6 ckpt/step_8 --publish /shared/weights --version 8 --encoding overwrite
  delta-diff ckpt/step_0 ckpt/step_9 --publish /shared/weights --version 9 --full
  delta-diff ckpt/step_9 ckpt/step_10 --publish /shared/weights --version 10 --full-every 10
  delta-diff ckpt/step_10 ckpt/step_11 --publish /shared/weights --version 11 --device cuda
  delta-diff ckpt/step_11 ckpt/step_12 --publish /shared/weights --version 12 --threads 4

Exit codes: 0 ok, 2 usage, 3 malformed input, 4 checkpoints differ in tensors/shapes/dtypes,
5 version already exists (or incomplete), 6 not found, 8 post-write hook failed, 10 I/O,
130/143 stopped by SIGINT/SIGTERM (the unpublished version removed; a second signal kills).")]
struct Args {
    /// The checkpoint the base version holds (directory or .safetensors file).
    old: PathBuf,
    /// The checkpoint to publish.
    new: PathBuf,
    /// Publish root SRC; the version goes to SRC/weight_v{N:06}.
    #[arg(long, value_name = "SRC")]
    publish: PathBuf,
    /// Version number N (>= 1).
    #[arg(long, value_name = "N")]
    version: u64,
    /// Version the delta applies to (default N-1).
    #[arg(long, value_name = "M")]
    base_version: Option<u64>,
    #[arg(long, default_value = "xor", value_parser = clap::builder::PossibleValuesParser::new(["xor", "overwrite"]))]
    encoding: String,
    #[arg(long, default_value = "xxh3-128", value_parser = clap::builder::PossibleValuesParser::new(["xxh3-128", "blake3", "adler32"]))]
    checksum: String,
    /// Publish NEW as a full version (OLD is not read).
    #[arg(long)]
    full: bool,
    /// Publish a full version instead of a delta whenever N is a multiple of K.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    full_every: Option<u64>,
    /// Shell command run after the files are written, before returning (env DISAGG_VERSION,
    /// DISAGG_VERSION_DIR, DISAGG_SOURCE).
    #[arg(long, value_name = "CMD")]
    post_write_hook: Option<String>,
    /// Remove an incomplete SRC/weight_v{N} left by a killed publisher and write it again (a
    /// publish that fails with an error removes its own)
    #[arg(long)]
    replace_incomplete: bool,
    /// Cap on payload bytes per delta data file.
    #[arg(long, default_value_t = DEFAULT_MAX_FILE_BYTES, value_name = "BYTES")]
    max_file_bytes: u64,
    /// Payload bytes all threads together hold in memory; past that, payloads spill to
    /// nameless scratch files in the version directory (bounds memory whatever the model size).
    #[arg(long, default_value_t = IN_MEMORY_BUDGET, value_name = "BYTES")]
    payload_memory: usize,
    /// Where to compute the diffs: `cuda` (GPU; exit 2 if none is usable), `cpu`, or `auto`
    /// (the GPU for the tensors where it is faster, if one is found; see docs/GPU.md).
    #[arg(long, default_value = "auto", value_parser = clap::builder::PossibleValuesParser::new(["auto", "cpu", "cuda"]))]
    device: String,
    /// How the CPU reads OLD's and NEW's tensors: through their maps (`mmap`), into buffers
    /// (`pread`), or `auto`: whichever is cheaper on this kernel and file system,
    /// timed on the inputs themselves (`input_read` in --json says which).
    #[arg(long, default_value = "auto", value_name = "MODE", value_parser = clap::builder::PossibleValuesParser::new(["auto", "mmap", "pread"]))]
    input_read: String,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    threads: disagg::cli::ThreadArgs,
}

fn main() {
    let a = Args::parse();
    disagg::stop::install();
    disagg::error::run_main("delta-diff", || {
        a.threads.install()?;
        let opts = DiffOptions {
            old: a.old,
            new: a.new,
            publish: a.publish,
            version: a.version,
            base_version: a.base_version,
            encoding: a.encoding.parse::<Encoding>().map_err(disagg::error::Error::Usage)?,
            checksum: a.checksum.parse::<ChecksumAlg>().map_err(disagg::error::Error::Usage)?,
            full: a.full,
            full_every: a.full_every,
            post_write_hook: a.post_write_hook,
            replace_incomplete: a.replace_incomplete,
            max_file_bytes: a.max_file_bytes.max(1),
            payload_memory: a.payload_memory,
            device: a.device.parse().map_err(disagg::error::Error::Usage)?,
            input_read: a.input_read.parse().map_err(disagg::error::Error::Usage)?,
        };
        let r = publish(&opts)?;
        disagg::report::print(&r, a.json, || {
            format!(
                "published {} version {} at {}: {}/{} tensors changed, density {:.4}, {} wire bytes in {} file(s), {:.3}s ({:.2} GB/s)",
                r.kind,
                r.version,
                r.path.display(),
                r.tensors_changed,
                r.tensors_total,
                r.density,
                r.wire_bytes,
                r.files,
                r.seconds,
                r.throughput_gbps
            )
        })
    })
}
