//! Progress bars that appear only when stderr is a terminal, so pipelines, cron and CI logs
//! stay clean.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// A byte-count bar on a TTY, a hidden no-op bar elsewhere.
pub fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").expect("static template").progress_chars("=> "));
    bar.set_message(what.to_string());
    bar
}
