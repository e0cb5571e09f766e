//! Device weights shared by every executor of a model: each tensor is converted and uploaded
//! once per (device, storage dtype, layout), however many graphs (stages, batch sizes) read it.
//! A weight that a tensor-core conv reads is held only in that kernel's prepared layout
//! (`families::conv::ConvWeightLayout`, permuted once here on the host), not also upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use half::bf16;
use openuni_tensor::{DType, F32Data, Shape, TensorSource};

use crate::device::{CudaDevice, DeviceBuffer};
use crate::error::{CudaError, Result};
use crate::families::conv::{prepare_conv_weight, ConvWeightLayout};

pub struct WeightCache {
    pub(crate) dev: Arc<CudaDevice>,
    pub(crate) dtype: DType,
    tensors: Mutex<HashMap<(String, Shape, Option<ConvWeightLayout>), DeviceBuffer>>,
}

impl WeightCache {
    /// An empty cache for weights stored as `dtype` (F32 or BF16) on `dev`.
    pub fn new(dev: &Arc<CudaDevice>, dtype: DType) -> Arc<WeightCache> {
        Arc::new(WeightCache {
            dev: dev.clone(),
            dtype,
            tensors: Mutex::default(),
        })
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
        self.get_in(source, name, shape, None)
    }

    /// As [`WeightCache::get`], held in `layout` (`None`: upstream) on the device: a conv weight
    /// [cout, cin, 3, 3] is permuted (and for the upsample conv, its phase taps combined) in f32 on
    /// the host, then converted to the storage dtype once.
    pub fn get_in(
        &self,
        source: &dyn TensorSource,
        name: &str,
        shape: &Shape,
        layout: Option<ConvWeightLayout>,
    ) -> Result<u64> {
        let key = (name.to_string(), shape.clone(), layout);
        if let Some(b) = self.tensors.lock().expect("weight cache").get(&key) {
            return Ok(b.ptr());
        }
        // Stored bytes go up as they are only for a stored (not derived) weight in the upstream layout.
        let as_stored = layout.is_none() && !openuni_tensor::derived::is_derived(name);
        let stored = if as_stored {
            source.stored_bytes(name, shape)?
        } else {
            None
        };
        let buf = match (self.dtype, stored) {
            (DType::BF16, Some((DType::BF16, bytes))) => self.dev.upload(bytes)?,
            (DType::F32 | DType::BF16, _) => {
                let mut v = openuni_tensor::derived::weight_f32(source, name, shape)?;
                if let Some(layout) = layout {
                    let d = shape.dims();
                    if d.len() != 4 || d[2] != 3 || d[3] != 3 {
                        return Err(CudaError::Invalid {
                            what: "weight layout".into(),
                            msg: format!("weight `{name}` has shape {shape}, the {layout:?} layout takes [cout, cin, 3, 3]"),
                        });
                    }
                    v = F32Data::owned(prepare_conv_weight(layout, &v, d[0], d[1]));
                }
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
        self.tensors
            .lock()
            .expect("weight cache")
            .values()
            .map(|b| b.bytes())
            .sum()
    }
}
