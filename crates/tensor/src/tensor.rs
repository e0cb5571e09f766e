use half::{bf16, f16};

use crate::{DType, Error, Result, Shape};

/// Typed host storage.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
            HostData::I64(_) => DType::I64,
            HostData::I32(_) => DType::I32,
            HostData::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::I64(v) => v.len(),
            HostData::I32(v) => v.len(),
            HostData::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::I64(v) => bytemuck::cast_slice(v),
            HostData::I32(v) => bytemuck::cast_slice(v),
            HostData::U8(v) => v,
        }
    }

    /// Decodes little-endian bytes of `dtype` (byte-wise, so unaligned mmap data is fine).
    pub fn from_le_bytes(dtype: DType, bytes: &[u8]) -> HostData {
        fn chunks<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N)
                .map(|c| f(c.try_into().unwrap()))
                .collect()
        }
        match dtype {
            DType::F32 => HostData::F32(chunks(bytes, f32::from_le_bytes)),
            DType::BF16 => {
                HostData::BF16(chunks(bytes, |c| bf16::from_bits(u16::from_le_bytes(c))))
            }
            DType::F16 => HostData::F16(chunks(bytes, |c| f16::from_bits(u16::from_le_bytes(c)))),
            DType::I64 => HostData::I64(chunks(bytes, i64::from_le_bytes)),
            DType::I32 => HostData::I32(chunks(bytes, i32::from_le_bytes)),
            DType::U8 => HostData::U8(bytes.to_vec()),
        }
    }
}

/// A contiguous row-major tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Shape,
    pub data: HostData,
}

impl HostTensor {
    pub fn new(shape: impl Into<Shape>, data: HostData) -> Result<HostTensor> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::DataLength {
                expected: shape.numel(),
                found: data.len(),
                shape,
            });
        }
        Ok(HostTensor { shape, data })
    }

    pub fn from_f32(shape: impl Into<Shape>, v: Vec<f32>) -> Result<HostTensor> {
        HostTensor::new(shape, HostData::F32(v))
    }

    pub fn zeros_f32(shape: impl Into<Shape>) -> HostTensor {
        let shape = shape.into();
        let n = shape.numel();
        HostTensor {
            shape,
            data: HostData::F32(vec![0.0; n]),
        }
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// The f32 storage, when the tensor is f32.
    pub fn f32s(&self) -> Option<&[f32]> {
        match &self.data {
            HostData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// A converted copy. Floats convert between each other (rounding to nearest even); integers
    /// convert to f32 exactly when they fit 24 bits, which the engine's id and mask tensors do.
    pub fn to_dtype(&self, to: DType) -> Result<HostTensor> {
        let as_f32 = || -> Vec<f32> {
            match &self.data {
                HostData::F32(v) => v.clone(),
                HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
                HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
                HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
                HostData::I32(v) => v.iter().map(|&x| x as f32).collect(),
                HostData::U8(v) => v.iter().map(|&x| x as f32).collect(),
            }
        };
        let data = match (to, &self.data) {
            (t, d) if t == d.dtype() => d.clone(),
            (DType::F32, _) => HostData::F32(as_f32()),
            (DType::BF16, d) if d.dtype().is_float() => {
                HostData::BF16(as_f32().into_iter().map(bf16::from_f32).collect())
            }
            (DType::F16, d) if d.dtype().is_float() => {
                HostData::F16(as_f32().into_iter().map(f16::from_f32).collect())
            }
            (DType::I64, HostData::I32(v)) => HostData::I64(v.iter().map(|&x| x as i64).collect()),
            (DType::I64, HostData::U8(v)) => HostData::I64(v.iter().map(|&x| x as i64).collect()),
            (DType::I32, HostData::I64(v)) if v.iter().all(|&x| i32::try_from(x).is_ok()) => {
                HostData::I32(v.iter().map(|&x| x as i32).collect())
            }
            _ => {
                return Err(Error::Conversion {
                    from: self.dtype(),
                    to,
                })
            }
        };
        Ok(HostTensor {
            shape: self.shape.clone(),
            data,
        })
    }

    /// f32 values of any numeric tensor.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.to_dtype(DType::F32).map(|t| t.data) {
            Ok(HostData::F32(v)) => v,
            _ => unreachable!("every dtype converts to f32"),
        }
    }

    /// f32 values of any numeric tensor, moving the storage when it already is f32.
    pub fn into_f32_vec(self) -> Vec<f32> {
        match self.data {
            HostData::F32(v) => v,
            _ => self.to_f32_vec(),
        }
    }

    /// i64 values of an integer tensor (ids), or of a float tensor holding integers (timesteps).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match &self.data {
            HostData::I64(v) => v.clone(),
            HostData::I32(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::U8(v) => v.iter().map(|&x| x as i64).collect(),
            _ => self.to_f32_vec().into_iter().map(|x| x as i64).collect(),
        }
    }
}
