//! Built without the `cuda` feature: the same interface as `enabled.rs`, and no GPU.

use super::{GpuError, GpuStatus, Rates};
use crate::version::Encoding;
use std::io::Write;

const NOT_ENABLED: &str = "GPU support not enabled in this build (rebuild with --features cuda)";

/// No CUDA in this build, whatever libraries the machine has.
pub fn driver_present() -> Result<(), String> {
    Err(NOT_ENABLED.into())
}

/// Always unavailable in this build.
pub fn probe() -> GpuStatus {
    GpuStatus::Unavailable(NOT_ENABLED.into())
}

/// A tensor resident in device memory; none can exist in this build.
pub enum DeviceBuffer {}

impl DeviceBuffer {
    pub fn len(&self) -> usize {
        match *self {}
    }
    pub fn is_empty(&self) -> bool {
        match *self {}
    }
}

/// Never constructed in this build: [`GpuDiffer::new`] always fails.
pub struct GpuDiffer {
    never: std::convert::Infallible,
}

impl GpuDiffer {
    pub fn new() -> Result<GpuDiffer, GpuError> {
        Err(GpuError::Unavailable(NOT_ENABLED.into()))
    }
    pub fn info(&self) -> &super::GpuInfo {
        match self.never {}
    }
    pub fn rates(&self) -> Rates {
        match self.never {}
    }
    pub fn encode<W: Write>(&self, _encoding: Encoding, _old: &[u8], _new: &[u8], _out: W) -> Result<u64, GpuError> {
        match self.never {}
    }
    pub fn try_encode<W: Write>(&self, _encoding: Encoding, _old: &[u8], _new: &[u8], _out: W) -> Result<Option<u64>, GpuError> {
        match self.never {}
    }
    pub fn upload(&self, _bytes: &[u8]) -> Result<DeviceBuffer, GpuError> {
        match self.never {}
    }
    pub fn bench_kernels(&self, _encoding: Encoding, _old: &DeviceBuffer, _new: &DeviceBuffer, _reps: usize) -> Result<f64, GpuError> {
        match self.never {}
    }
    pub fn encode_device<W: Write>(&self, _encoding: Encoding, _old: &DeviceBuffer, _new: &DeviceBuffer, _out: W) -> Result<u64, GpuError> {
        match self.never {}
    }
}
