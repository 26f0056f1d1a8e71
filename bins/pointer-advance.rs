use clap::Parser;
use disagg::error::Error;
use disagg::pointer::{advance, Expect, Pointer};
use std::path::PathBuf;

/// Move SRC/latest to VERSION atomically (git update-ref style), after checking that the
/// version and the chain of bases below it are completely published.
#[derive(Parser)]
#[command(
    version,
    after_help = "Examples:
  pointer-advance /shared/weights 7
  pointer-advance /shared/weights 8 --expect weight_v000007
  pointer-advance /shared/weights 3 --run-id run-42 --expect none

Exit codes: 0 ok (also when already there), 2 usage, 3 malformed version or pointer,
5 conflict (--expect mismatch, backwards move, incomplete version or chain), 6 not found,
9 latest.lock held, 10 I/O."
)]
struct Args {
    /// Publish root.
    src: PathBuf,
    /// Version to point at: a number, `weight_v000007` or `RUN_ID/weight_v000007`.
    #[arg(value_name = "VERSION")]
    target: String,
    /// Only move if the pointer currently names OLD (`none`: only if there is no pointer yet).
    #[arg(long, value_name = "OLD")]
    expect: Option<String>,
    /// Versions live under SRC/ID; the pointer reads `ID/weight_vNNNNNN`.
    #[arg(long, value_name = "ID")]
    run_id: Option<String>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    let a = Args::parse();
    disagg::error::run_main("pointer-advance", || {
        disagg::version::check_run_id_arg(a.run_id.as_deref())?;
        let target = Pointer::parse_arg(&a.target, a.run_id.as_deref())
            .ok_or_else(|| Error::Usage(format!("VERSION {:?}: expected a number, weight_vNNNNNN or RUN_ID/weight_vNNNNNN (matching --run-id)", a.target)))?;
        if target.version == 0 {
            return Err(Error::Usage("version 0 is the engine's base checkpoint; it is never published or pointed at".into()));
        }
        let expect = match a.expect.as_deref() {
            None => Expect::Any,
            Some("none") => Expect::Absent,
            Some(s) => Expect::Is(Pointer::parse_arg(s, a.run_id.as_deref()).ok_or_else(|| Error::Usage(format!("--expect {s:?} is not a version")))?),
        };
        let r = advance(&a.src, &target, &expect)?;
        disagg::report::print(&r, a.json, || match (&r.previous, r.changed) {
            (_, false) => format!("latest already at {}", r.current),
            (Some(p), true) => format!("latest: {p} -> {}", r.current),
            (None, true) => format!("latest: (none) -> {}", r.current),
        })
    })
}
