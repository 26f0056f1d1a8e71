//! disagg: an RL trainer and an elastic rollout fleet that talk only through files.
//!
//! Every on-disk format lives in this library and is specified byte by byte in
//! `docs/FORMATS.md`; the binaries under `bins/` only parse arguments and call one function here.

pub mod cli;
pub mod error;
pub mod failpoint;
pub mod fsio;
pub mod inputmap;
pub mod pool;
pub mod progress;
pub mod report;
pub mod stop;

// Weight plane.
pub mod apply;
pub mod checkpoint;
pub mod checksum;
pub mod codec;
pub mod diff;
pub mod gpu;
pub mod hooks;
pub mod pointer;
pub mod sparse_frame;
pub mod version;
pub mod zstd_block;
pub mod zstd_decode;

// The fleet: following `latest` on every rollout host, pruning old versions.
pub mod follow;
pub mod gc;

// Data plane.
pub mod dataplane;
