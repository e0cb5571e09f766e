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
    /// address stays valid as long as the cache lives.
    pub fn get(&self, source: &dyn TensorSource, name: &str, shape: &Shape) -> Result<u64> {
        let key = (name.to_string(), shape.clone());
        if let Some(b) = self.tensors.lock().expect("weight cache").get(&key) {
            return Ok(b.ptr());
        }
        let v = openuni_tensor::derived::tensor_f32(source, name, shape)?.to_f32_vec();
        let buf = match self.dtype {
            DType::F32 => self.dev.upload(&v)?,
            DType::BF16 => {
                let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
                self.dev.upload(&h)?
            }
            d => return Err(CudaError::DType(d)),
        };
        let ptr = buf.ptr();
        self.tensors.lock().expect("weight cache").insert(key, buf);
        Ok(ptr)
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.tensors.lock().expect("weight cache").values().map(|b| b.bytes()).sum()
    }
}
