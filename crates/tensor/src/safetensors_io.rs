//! Weight loading from safetensors: one file, several files, or a sharded
//! `*.safetensors.index.json`. Files are memory-mapped; a tensor is decoded only when asked for.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, UncheckedAdvice};
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::{DType, Error, F32Data, HostData, HostTensor, Result, Shape};

struct Entry {
    file: usize,
    st_dtype: StDtype,
    shape: Shape,
    start: usize,
    end: usize,
}

/// A read-only set of named tensors from one or more safetensors files, memory-mapped: an f32
/// tensor is used in place ([`Weights::weight_f32`]), others are converted once per request, and
/// the pages a caller no longer needs are dropped from this process's memory (they stay in the
/// page cache and map again on the next read).
pub struct Weights {
    /// What error messages call this set: the file, or the index / folder it came from.
    origin: PathBuf,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: BTreeMap<String, Entry>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn dtype_of(st: StDtype) -> Option<DType> {
    Some(match st {
        StDtype::F32 => DType::F32,
        StDtype::BF16 => DType::BF16,
        StDtype::F16 => DType::F16,
        StDtype::I64 => DType::I64,
        StDtype::I32 => DType::I32,
        StDtype::U8 | StDtype::BOOL => DType::U8,
        _ => return None,
    })
}

impl Weights {
    /// Opens `path`: a `.safetensors` file, a `.safetensors.index.json`, or a folder holding either
    /// (an index wins over single files; otherwise every `*.safetensors` in the folder is opened).
    pub fn open(path: impl AsRef<Path>) -> Result<Weights> {
        let path = path.as_ref();
        if path.is_dir() {
            let mut indices = vec![];
            let mut singles = vec![];
            for e in std::fs::read_dir(path).map_err(io_err(path))? {
                let p = e.map_err(io_err(path))?.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".safetensors.index.json") {
                    indices.push(p);
                } else if name.ends_with(".safetensors") {
                    singles.push(p);
                }
            }
            indices.sort();
            singles.sort();
            return match (indices.len(), singles.len()) {
                (1, _) => Weights::open_index(&indices[0]),
                (0, 0) => Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: "folder holds no *.safetensors file and no *.safetensors.index.json"
                        .into(),
                }),
                (0, _) => Weights::open_files(path, &singles),
                _ => Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "folder holds {} safetensors index files; pass one of them",
                        indices.len()
                    ),
                }),
            };
        }
        let name = path.to_string_lossy();
        if name.ends_with(".index.json") {
            Weights::open_index(path)
        } else {
            Weights::open_files(path, &[path.to_path_buf()])
        }
    }

    fn open_index(index: &Path) -> Result<Weights> {
        let text = std::fs::read_to_string(index).map_err(io_err(index))?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: index.to_path_buf(),
            msg: format!("index is not JSON: {e}"),
        })?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Format {
                path: index.to_path_buf(),
                msg: "index has no `weight_map` object".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|s| dir.join(s))
            .collect();
        shards.sort();
        shards.dedup();
        let w = Weights::open_files(index, &shards)?;
        // Every key the index promises must be in the shard it names.
        for (key, shard) in map {
            let shard = dir.join(shard.as_str().unwrap_or(""));
            match w.entries.get(key) {
                Some(e) if w.files[e.file].0 == shard => {}
                Some(e) => {
                    return Err(Error::Format {
                        path: index.to_path_buf(),
                        msg: format!(
                            "index puts `{key}` in {}, found in {}",
                            shard.display(),
                            w.files[e.file].0.display()
                        ),
                    })
                }
                None => {
                    return Err(Error::Format {
                        path: index.to_path_buf(),
                        msg: format!(
                            "index names `{key}` in {}, which does not contain it",
                            shard.display()
                        ),
                    })
                }
            }
        }
        Ok(w)
    }

    fn open_files(origin: &Path, paths: &[PathBuf]) -> Result<Weights> {
        let mut files = vec![];
        let mut entries = BTreeMap::new();
        for (fi, p) in paths.iter().enumerate() {
            let f = File::open(p).map_err(io_err(p))?;
            // SAFETY: the file is opened read-only and mapped privately; checkpoints are not
            // modified while the program runs (the same contract as every safetensors loader).
            let mmap = unsafe { Mmap::map(&f) }.map_err(io_err(p))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Format {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > mmap.len() {
                    return Err(Error::Format {
                        path: p.clone(),
                        msg: format!("tensor `{name}` runs past the end of the file"),
                    });
                }
                if entries.contains_key(&name) {
                    return Err(Error::Format {
                        path: p.clone(),
                        msg: format!("tensor `{name}` appears in two files"),
                    });
                }
                entries.insert(
                    name,
                    Entry {
                        file: fi,
                        st_dtype: info.dtype,
                        shape: Shape::new(info.shape.clone()),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            files.push((p.clone(), Arc::new(mmap)));
        }
        Ok(Weights {
            origin: origin.to_path_buf(),
            files,
            entries,
        })
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|k| k.as_str())
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn entry(&self, key: &str) -> Result<&Entry> {
        self.entries.get(key).ok_or_else(|| {
            // Point at the nearest names: a prefix mistake ("model." vs none) is the usual cause.
            let tail = key.rsplit('.').next().unwrap_or(key);
            let similar: Vec<&str> = self.keys().filter(|k| k.ends_with(tail)).take(3).collect();
            Error::MissingKey {
                path: self.origin.clone(),
                key: key.to_string(),
                available: self.entries.len(),
                hint: if similar.is_empty() {
                    String::new()
                } else {
                    format!("; similar: {}", similar.join(", "))
                },
            }
        })
    }

    /// The shape of a tensor, without reading it.
    pub fn shape(&self, key: &str) -> Result<Shape> {
        Ok(self.entry(key)?.shape.clone())
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, key: &str) -> Result<DType> {
        let e = self.entry(key)?;
        dtype_of(e.st_dtype).ok_or_else(|| self.unsupported(key, e, "the engine cannot read"))
    }

    fn unsupported(&self, key: &str, e: &Entry, purpose: &str) -> Error {
        Error::UnsupportedDType {
            path: self.files[e.file].0.clone(),
            key: key.into(),
            found: format!("{:?}", e.st_dtype),
            purpose: purpose.into(),
        }
    }

    /// Refuses to copy a tensor whose host copy (`bytes`) exceeds the memory available now, so that
    /// a file larger than memory is an error naming the tensor rather than an allocation abort.
    fn check_fits(&self, key: &str, e: &Entry, bytes: usize) -> Result<()> {
        match crate::pth::mem_available() {
            Some(avail) if bytes as u64 > avail => Err(Error::Format {
                path: self.files[e.file].0.clone(),
                msg: format!("tensor `{key}` ({}) needs {bytes} bytes in memory, more than the {avail} bytes available (MemAvailable)", e.shape),
            }),
            _ => Ok(()),
        }
    }

    /// Reads a tensor in its stored dtype.
    pub fn get(&self, key: &str) -> Result<HostTensor> {
        let e = self.entry(key)?;
        let dtype = dtype_of(e.st_dtype)
            .ok_or_else(|| self.unsupported(key, e, "the engine cannot read"))?;
        self.check_fits(key, e, e.end - e.start)?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let data = HostData::from_le_bytes(dtype, bytes);
        HostTensor::new(e.shape.clone(), data).map_err(|_| Error::Format {
            path: self.files[e.file].0.clone(),
            msg: format!(
                "tensor `{key}`: {} bytes do not fit shape {} of {}",
                bytes.len(),
                e.shape,
                dtype
            ),
        })
    }

    /// An error unless the stored shape of `key` equals `expected`, ignoring size-1 dims: a 1×1
    /// conv weight [O, I, 1, 1] is the linear weight [O, I].
    fn check_shape(&self, key: &str, e: &Entry, expected: &Shape) -> Result<()> {
        if squeezed(&e.shape) != squeezed(expected) {
            return Err(Error::ShapeMismatch {
                path: self.files[e.file].0.clone(),
                key: key.into(),
                expected: expected.clone(),
                found: e.shape.clone(),
            });
        }
        Ok(())
    }

    /// The stored float dtype of `key`, or an error naming it.
    fn float_dtype(&self, key: &str, e: &Entry) -> Result<DType> {
        match dtype_of(e.st_dtype) {
            Some(d) if d.is_float() => Ok(d),
            _ => Err(self.unsupported(
                key,
                e,
                "is not a floating-point type (expected f32, bf16 or f16)",
            )),
        }
    }

    /// Reads a floating-point tensor as an owned f32 copy, checking its shape when `expected` is
    /// given (and then taking that shape).
    pub fn get_f32(&self, key: &str, expected: Option<&Shape>) -> Result<HostTensor> {
        let e = self.entry(key)?;
        if let Some(exp) = expected {
            self.check_shape(key, e, exp)?;
        }
        let d = self.float_dtype(key, e)?;
        self.check_fits(key, e, (e.end - e.start) / d.size_in_bytes() * 4)?;
        let data = decode_f32(d, &self.files[e.file].1[e.start..e.end]);
        HostTensor::from_f32(expected.unwrap_or(&e.shape).clone(), data)
    }

    /// A floating-point tensor as f32 with shape `expected`, held once: an aligned f32 tensor is
    /// read in place from the mapping (no copy); bf16/f16 (or unaligned f32) are converted into
    /// one owned vector, after which the stored pages are dropped from this process's memory.
    pub fn weight_f32(&self, key: &str, expected: &Shape) -> Result<F32Data> {
        let e = self.entry(key)?;
        self.check_shape(key, e, expected)?;
        let d = self.float_dtype(key, e)?;
        let map = &self.files[e.file].1;
        if d == DType::F32 {
            if let Some(v) = F32Data::mapped(map, e.start, (e.end - e.start) / 4) {
                return Ok(v);
            }
        }
        self.check_fits(key, e, (e.end - e.start) / d.size_in_bytes() * 4)?;
        let v = F32Data::owned(decode_f32(d, &map[e.start..e.end]));
        self.drop_pages(e);
        Ok(v)
    }

    /// The stored bytes of a tensor and their dtype (for an upload in the storage dtype without
    /// an f32 copy), after checking its shape.
    pub fn stored_bytes(&self, key: &str, expected: &Shape) -> Result<(DType, &[u8])> {
        let e = self.entry(key)?;
        self.check_shape(key, e, expected)?;
        let d = self.float_dtype(key, e)?;
        Ok((d, &self.files[e.file].1[e.start..e.end]))
    }

    /// Drops the pages of `e` from this process's resident memory (they stay in the page cache).
    fn drop_pages(&self, e: &Entry) {
        // SAFETY: the mapping is file-backed, read-only and private, and is never written, so no
        // page differs from the file: after MADV_DONTNEED a read maps the same bytes again, and
        // slices borrowed from the mapping (in-place tensors sharing a page) stay valid. Failure
        // only means the pages stay resident.
        let _ = unsafe {
            self.files[e.file].1.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                e.start,
                e.end - e.start,
            )
        };
    }

    /// Tells the set that the caller has its own copy of `key` (converted or uploaded): its pages
    /// leave this process's memory.
    pub fn done_with(&self, key: &str) {
        if let Some(e) = self.entries.get(key) {
            self.drop_pages(e);
        }
    }

    /// Drops every page of every file from this process's resident memory (releasing a model's
    /// in-place weights); a later read maps them again from the page cache or the disk.
    pub fn release_pages(&self) {
        for (_, map) in &self.files {
            // SAFETY: as in `drop_pages`.
            let _ = unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) };
        }
    }

    /// Rows of a 2-D floating-point tensor as f32 [rows.len(), cols]: an embedding lookup that
    /// reads only the rows asked for (the vocabulary table is large).
    pub fn rows_f32(&self, key: &str, rows: &[usize]) -> Result<HostTensor> {
        let e = self.entry(key)?;
        let dtype = match dtype_of(e.st_dtype) {
            Some(d) if d.is_float() && e.shape.rank() == 2 => d,
            _ => return Err(self.unsupported(key, e, "is not a 2-D floating-point table")),
        };
        let (n, cols) = (e.shape.dims()[0], e.shape.dims()[1]);
        let row_bytes = cols * dtype.size_in_bytes();
        let mut out = Vec::with_capacity(rows.len() * cols);
        for &r in rows {
            if r >= n {
                return Err(Error::IndexOutOfRange {
                    path: self.files[e.file].0.clone(),
                    key: key.into(),
                    index: r,
                    len: n,
                });
            }
            let start = e.start + r * row_bytes;
            let t = HostTensor {
                shape: Shape::new([cols]),
                data: HostData::from_le_bytes(
                    dtype,
                    &self.files[e.file].1[start..start + row_bytes],
                ),
            };
            out.extend(t.to_f32_vec());
        }
        HostTensor::from_f32([rows.len(), cols], out)
    }

    /// Reads every tensor as f32 (floats) or i64 (integers), for small reference files.
    pub fn all(&self) -> Result<HashMap<String, HostTensor>> {
        self.keys()
            .map(|k| Ok((k.to_string(), self.get(k)?)))
            .collect()
    }
}

/// Little-endian float bytes of `dtype` as f32 values, in one allocation (byte-wise, so unaligned
/// mapped data is fine).
fn decode_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        d => unreachable!("decode_f32 is called on float dtypes only, not {d}"),
    }
}

/// Writes tensors to a safetensors file (used by `openuni convert` and by tests).
pub fn write_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a HostTensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = vec![];
    for (name, t) in tensors {
        if name == "__metadata__" {
            return Err(Error::Format {
                path: path.into(),
                msg:
                    "a tensor cannot be named `__metadata__` (safetensors reserves it for metadata)"
                        .into(),
            });
        }
        let dtype = match t.dtype() {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
            DType::I64 => StDtype::I64,
            DType::I32 => StDtype::I32,
            DType::U8 => StDtype::U8,
        };
        let view =
            TensorView::new(dtype, t.shape.dims().to_vec(), t.data.as_bytes()).map_err(|e| {
                Error::Format {
                    path: path.into(),
                    msg: format!("tensor `{name}`: {e}"),
                }
            })?;
        views.push((name.to_string(), view));
    }
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| Error::Format {
        path: path.into(),
        msg: e.to_string(),
    })
}

/// Where executors and models take weights from: graph weight names are upstream key names, so a
/// checkpoint file set serves directly, a map serves tests and in-memory checkpoints (`.pth`), and
/// an [`Overlay`] puts a fine-tuned checkpoint's tensors over a base model's.
pub trait TensorSource {
    /// Where the tensors come from, for messages.
    fn origin(&self) -> String;

    /// The stored shape of a tensor.
    fn shape_of(&self, name: &str) -> Result<Shape>;

    /// The tensor as f32 with exactly `shape` (shapes that differ only in size-1 dims are the same
    /// data); errors name the source, the key, expected and found.
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor>;

    fn contains(&self, name: &str) -> bool {
        self.shape_of(name).is_ok()
    }

    /// As [`tensor_f32`](Self::tensor_f32), held once: a mapped f32 file's tensor is used in
    /// place, others are converted once (executors keep the result and share it).
    fn weight_f32(&self, name: &str, shape: &Shape) -> Result<F32Data> {
        Ok(F32Data::owned(self.tensor_f32(name, shape)?.into_f32_vec()))
    }

    /// The stored bytes and dtype of a float tensor where the source holds them (a mapped file),
    /// shape checked as in [`tensor_f32`](Self::tensor_f32); `None` where it does not. Lets a
    /// device upload bf16 weights without an f32 copy.
    fn stored_bytes(&self, _name: &str, _shape: &Shape) -> Result<Option<(DType, &[u8])>> {
        Ok(None)
    }

    /// The caller has its own copy of `name` now (converted or uploaded): a mapped source drops
    /// its pages from this process's memory.
    fn done_with(&self, _name: &str) {}

    /// Drops every mapped page from this process's memory (a released model); later reads map
    /// them again.
    fn release_pages(&self) {}

    /// Rows of a 2-D table as f32 (embedding lookups).
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<HostTensor> {
        let shape = self.shape_of(name)?;
        let t = self.tensor_f32(name, &shape)?.to_f32_vec();
        let cols = shape.last();
        let n = shape.rows();
        let mut out = Vec::with_capacity(rows.len() * cols);
        for &r in rows {
            if r >= n {
                return Err(Error::IndexOutOfRange {
                    path: self.origin().into(),
                    key: name.into(),
                    index: r,
                    len: n,
                });
            }
            out.extend_from_slice(&t[r * cols..(r + 1) * cols]);
        }
        HostTensor::from_f32([rows.len(), cols], out)
    }
}

fn squeezed(s: &Shape) -> Vec<usize> {
    s.dims().iter().copied().filter(|&d| d != 1).collect()
}

impl TensorSource for Weights {
    fn origin(&self) -> String {
        self.origin.display().to_string()
    }
    fn shape_of(&self, name: &str) -> Result<Shape> {
        self.shape(name)
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        self.get_f32(name, Some(shape))
    }
    fn weight_f32(&self, name: &str, shape: &Shape) -> Result<F32Data> {
        Weights::weight_f32(self, name, shape)
    }
    fn stored_bytes(&self, name: &str, shape: &Shape) -> Result<Option<(DType, &[u8])>> {
        Weights::stored_bytes(self, name, shape).map(Some)
    }
    fn done_with(&self, name: &str) {
        Weights::done_with(self, name)
    }
    fn release_pages(&self) {
        Weights::release_pages(self)
    }
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<HostTensor> {
        Weights::rows_f32(self, name, rows)
    }
}

/// Tensors held in memory under a name for messages (a `.pth` checkpoint, a test's weights).
pub struct TensorMap {
    pub origin: String,
    pub tensors: HashMap<String, HostTensor>,
}

impl TensorSource for TensorMap {
    fn origin(&self) -> String {
        self.origin.clone()
    }
    fn shape_of(&self, name: &str) -> Result<Shape> {
        self.tensors
            .get(name)
            .map(|t| t.shape.clone())
            .ok_or_else(|| Error::MissingKey {
                path: self.origin.clone().into(),
                key: name.into(),
                available: self.tensors.len(),
                hint: String::new(),
            })
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        let found = self.shape_of(name)?;
        if squeezed(&found) != squeezed(shape) {
            return Err(Error::ShapeMismatch {
                path: self.origin.clone().into(),
                key: name.into(),
                expected: shape.clone(),
                found,
            });
        }
        let mut t =
            self.tensors[name]
                .to_dtype(DType::F32)
                .map_err(|_| Error::UnsupportedDType {
                    path: self.origin.clone().into(),
                    key: name.into(),
                    found: self.tensors[name].dtype().to_string(),
                    purpose: "is not a floating-point type".into(),
                })?;
        t.shape = shape.clone();
        Ok(t)
    }
}

impl TensorSource for HashMap<String, HostTensor> {
    fn origin(&self) -> String {
        "<in-memory weights>".into()
    }
    fn shape_of(&self, name: &str) -> Result<Shape> {
        self.get(name)
            .map(|t| t.shape.clone())
            .ok_or_else(|| Error::MissingKey {
                path: self.origin().into(),
                key: name.into(),
                available: self.len(),
                hint: String::new(),
            })
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        let found = self.shape_of(name)?;
        if squeezed(&found) != squeezed(shape) {
            return Err(Error::ShapeMismatch {
                path: self.origin().into(),
                key: name.into(),
                expected: shape.clone(),
                found,
            });
        }
        let mut t = self[name].to_dtype(DType::F32)?;
        t.shape = shape.clone();
        Ok(t)
    }
}

/// `top` (keys `{prefix}{name}`) over `base` (keys `{name}`): how a fine-tuned OpenUni checkpoint's
/// `transformer.*` tensors replace the diffusers transformer's.
pub struct Overlay<'a> {
    pub top: &'a dyn TensorSource,
    pub prefix: String,
    pub base: &'a dyn TensorSource,
}

impl TensorSource for Overlay<'_> {
    fn origin(&self) -> String {
        format!("{} (over {})", self.top.origin(), self.base.origin())
    }
    fn shape_of(&self, name: &str) -> Result<Shape> {
        self.top
            .shape_of(&format!("{}{name}", self.prefix))
            .or_else(|_| self.base.shape_of(name))
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        let key = format!("{}{name}", self.prefix);
        if self.top.contains(&key) {
            self.top.tensor_f32(&key, shape)
        } else {
            self.base.tensor_f32(name, shape)
        }
    }
    fn weight_f32(&self, name: &str, shape: &Shape) -> Result<F32Data> {
        let key = format!("{}{name}", self.prefix);
        if self.top.contains(&key) {
            self.top.weight_f32(&key, shape)
        } else {
            self.base.weight_f32(name, shape)
        }
    }
    fn stored_bytes(&self, name: &str, shape: &Shape) -> Result<Option<(DType, &[u8])>> {
        let key = format!("{}{name}", self.prefix);
        if self.top.contains(&key) {
            self.top.stored_bytes(&key, shape)
        } else {
            self.base.stored_bytes(name, shape)
        }
    }
    fn done_with(&self, name: &str) {
        self.top.done_with(&format!("{}{name}", self.prefix));
        self.base.done_with(name);
    }
    fn release_pages(&self) {
        self.top.release_pages();
        self.base.release_pages();
    }
}

/// Names starting with one of `routes`' prefixes come from that route's source, all others from
/// `default`: one graph reading two checkpoints (the conditioning graph reads the LLM's
/// `model.*` and the OpenUni checkpoint's `connector.*` / `projector.*`), with a missing key
/// reported against the file that should hold it.
pub struct Routed<'a> {
    pub routes: Vec<(&'static str, &'a dyn TensorSource)>,
    pub default: &'a dyn TensorSource,
}

impl Routed<'_> {
    fn source(&self, name: &str) -> &dyn TensorSource {
        self.routes
            .iter()
            .find(|(p, _)| name.starts_with(p))
            .map_or(self.default, |r| r.1)
    }
}

impl TensorSource for Routed<'_> {
    fn origin(&self) -> String {
        let mut parts: Vec<String> = self
            .routes
            .iter()
            .map(|(p, s)| format!("{p}* from {}", s.origin()))
            .collect();
        parts.push(format!("the rest from {}", self.default.origin()));
        parts.join(", ")
    }
    fn shape_of(&self, name: &str) -> Result<Shape> {
        self.source(name).shape_of(name)
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        self.source(name).tensor_f32(name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        self.source(name).contains(name)
    }
    fn weight_f32(&self, name: &str, shape: &Shape) -> Result<F32Data> {
        self.source(name).weight_f32(name, shape)
    }
    fn stored_bytes(&self, name: &str, shape: &Shape) -> Result<Option<(DType, &[u8])>> {
        self.source(name).stored_bytes(name, shape)
    }
    fn done_with(&self, name: &str) {
        self.source(name).done_with(name)
    }
    fn release_pages(&self) {
        self.default.release_pages();
        self.routes.iter().for_each(|(_, s)| s.release_pages());
    }
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<HostTensor> {
        self.source(name).rows_f32(name, rows)
    }
}

impl<T: TensorSource + ?Sized> TensorSource for &T {
    fn origin(&self) -> String {
        (**self).origin()
    }
    fn shape_of(&self, name: &str) -> Result<Shape> {
        (**self).shape_of(name)
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        (**self).tensor_f32(name, shape)
    }
    fn contains(&self, name: &str) -> bool {
        (**self).contains(name)
    }
    fn weight_f32(&self, name: &str, shape: &Shape) -> Result<F32Data> {
        (**self).weight_f32(name, shape)
    }
    fn stored_bytes(&self, name: &str, shape: &Shape) -> Result<Option<(DType, &[u8])>> {
        (**self).stored_bytes(name, shape)
    }
    fn done_with(&self, name: &str) {
        (**self).done_with(name)
    }
    fn release_pages(&self) {
        (**self).release_pages()
    }
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<HostTensor> {
        (**self).rows_f32(name, rows)
    }
}
