//! The data plane: a shared-dir feature store, offline ingest of SpecForge feature files, and a
//! ref channel with backpressure and staleness. Formats: `docs/FORMATS.md` (data plane sections).

pub mod channel;
pub mod ingest;
pub mod sample_ref;
pub mod staleness;
pub mod store;
pub mod torch_ckpt;

pub use channel::{Layout, PublishOptions, RefProducer, TailOptions};
pub use sample_ref::{FeatureSpec, Manifest, SampleRef};
pub use store::{FeatureStore, Lease};
