//! f32 weight data held once: a slice of a memory-mapped f32 file used in place, or an owned
//! vector (converted from bf16/f16, or copied from an f32 file whose data is not 4-byte aligned).
//! Executors keep it behind an `Arc`, so graphs of one model share each tensor.

use std::ops::Deref;
use std::sync::Arc;

use memmap2::Mmap;

pub struct F32Data {
    inner: Inner,
}

enum Inner {
    Owned(Vec<f32>),
    /// `len` f32 values at byte `start` of the mapping (4-byte aligned, little-endian host).
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
}

impl F32Data {
    pub fn owned(v: Vec<f32>) -> F32Data {
        F32Data {
            inner: Inner::Owned(v),
        }
    }

    /// The f32 values at bytes `start..start + 4 * len` of `map`, in place; `None` when they are
    /// not 4-byte aligned, run past the mapping, or the host is not little-endian (the caller
    /// then converts into an owned copy).
    pub(crate) fn mapped(map: &Arc<Mmap>, start: usize, len: usize) -> Option<F32Data> {
        let end = len.checked_mul(4)?.checked_add(start)?;
        let aligned = (map.as_ptr() as usize + start).is_multiple_of(std::mem::align_of::<f32>());
        (cfg!(target_endian = "little") && aligned && end <= map.len()).then(|| F32Data {
            inner: Inner::Mapped {
                map: map.clone(),
                start,
                len,
            },
        })
    }

    /// Whether the values are read in place from a mapped file (no copy on the heap).
    pub fn is_mapped(&self) -> bool {
        matches!(self.inner, Inner::Mapped { .. })
    }

    /// Bytes of the values.
    pub fn bytes(&self) -> usize {
        self.len() * 4
    }

    pub fn into_vec(self) -> Vec<f32> {
        match self.inner {
            Inner::Owned(v) => v,
            Inner::Mapped { .. } => self.to_vec(),
        }
    }
}

impl Deref for F32Data {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &self.inner {
            Inner::Owned(v) => v,
            // `mapped` checked alignment, bounds and endianness; the mapping lives as long as self.
            Inner::Mapped { map, start, len } => {
                bytemuck::cast_slice(&map[*start..*start + 4 * *len])
            }
        }
    }
}

impl std::fmt::Debug for F32Data {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "F32Data({} values, {})",
            self.len(),
            if self.is_mapped() { "mapped" } else { "owned" }
        )
    }
}
