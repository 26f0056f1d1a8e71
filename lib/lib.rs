//! disagg: an RL trainer and an elastic rollout fleet that talk only through files.
//!
//! Every on-disk format lives in this library and is specified byte by byte in
//! `docs/FORMATS.md`; the binaries under `bins/` only parse arguments and call one function here.

pub mod error;
pub mod failpoint;
pub mod fsio;
pub mod dataplane;
