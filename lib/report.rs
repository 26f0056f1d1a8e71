//! How binaries print results: one JSON object on stdout with `--json`, one human line otherwise.

use crate::error::{Error, Result};
use serde::Serialize;

pub fn print<T: Serialize>(value: &T, json: bool, human: impl FnOnce() -> String) -> Result<()> {
    if json {
        let s = serde_json::to_string(value).map_err(|e| Error::Internal(format!("JSON report: {e}")))?;
        println!("{s}");
    } else {
        println!("{}", human());
    }
    Ok(())
}
