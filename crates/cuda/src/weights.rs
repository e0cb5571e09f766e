//! Device weights shared by every executor of a model: each tensor is converted and uploaded
//! once per (device, storage dtype), however many graphs (stages, batch sizes) read it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use half::bf16;
use openuni_tensor::{DType, Shape, TensorSource};

use crate::device::{CudaDevice, DeviceBuffer};
use crate::error::{CudaError, Result};

pub struct WeightCache {
    pub(crate) dev: Arc<CudaDevice>,
    pub(crate) dtype: DType,
    tensors: Mutex<HashMap<(String, Shape), DeviceBuffer>>,
}

impl WeightCache {
    /// An empty cache for weights stored as `dtype` (F32 or BF16) on `dev`.
    pub fn new(dev: &Arc<CudaDevice>, dtype: DType) -> Arc<WeightCache> {
        Arc::new(WeightCache { dev: dev.clone(), dtype, tensors: Mutex::default() })
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device address of weight `name` with `shape`, uploaded from `source` on first use
    /// (converted on the host to the storage dtype). Each tensor is its own allocation, so its
    /// address stays valid as long as the cache lives. From a mapped file the upload reads the
    /// mapping: stored bytes of the storage dtype go up as they are, f32 goes up in place or is
    /// rounded to bf16 straight from it; no f32 copy is made unless the file holds another
    /// float type. The file's pages then leave host memory.
    pub fn get(&self, source: &dyn TensorSource, name: &str, shape: &Shape) -> Result<u64> {
        let key = (name.to_string(), shape.clone());
        if let Some(b) = self.tensors.lock().expect("weight cache").get(&key) {
            return Ok(b.ptr());
        }
        let buf = match (self.dtype, source.stored_bytes(name, shape)?) {
            (DType::BF16, Some((DType::BF16, bytes))) => self.dev.upload(bytes)?,
            (DType::F32 | DType::BF16, _) => {
                let v = source.weight_f32(name, shape)?;
                if self.dtype == DType::F32 {
                    self.dev.upload(&v[..])?
                } else {
                    let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                    self.dev.upload(&h)?
                }
            }
            (d, _) => return Err(CudaError::DType(d)),
        };
        source.done_with(name);
        let ptr = buf.ptr();
        self.tensors.lock().expect("weight cache").insert(key, buf);
        Ok(ptr)
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.tensors.lock().expect("weight cache").values().map(|b| b.bytes()).sum()
    }
}
