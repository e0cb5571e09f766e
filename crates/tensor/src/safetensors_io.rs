//! Weight loading from safetensors: one file, several files, or a sharded
//! `*.safetensors.index.json`. Files are memory-mapped; a tensor is decoded only when asked for.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::{DType, Error, HostData, HostTensor, Result, Shape};

struct Entry {
    file: usize,
    st_dtype: StDtype,
    shape: Shape,
    start: usize,
    end: usize,
}

/// A read-only set of named tensors from one or more safetensors files.
pub struct Weights {
    /// What error messages call this set: the file, or the index / folder it came from.
    origin: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    entries: BTreeMap<String, Entry>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
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
                    msg: "folder holds no *.safetensors file and no *.safetensors.index.json".into(),
                }),
                (0, _) => Weights::open_files(path, &singles),
                _ => Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!("folder holds {} safetensors index files; pass one of them", indices.len()),
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
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Format { path: index.to_path_buf(), msg: format!("index is not JSON: {e}") })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Format {
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
                        msg: format!("index puts `{key}` in {}, found in {}", shard.display(), w.files[e.file].0.display()),
                    })
                }
                None => {
                    return Err(Error::Format {
                        path: index.to_path_buf(),
                        msg: format!("index names `{key}` in {}, which does not contain it", shard.display()),
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
            let (n, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::Format { path: p.clone(), msg: e.to_string() })?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                if base + e > mmap.len() {
                    return Err(Error::Format { path: p.clone(), msg: format!("tensor `{name}` runs past the end of the file") });
                }
                if entries.contains_key(&name) {
                    return Err(Error::Format { path: p.clone(), msg: format!("tensor `{name}` appears in two files") });
                }
                entries.insert(
                    name,
                    Entry { file: fi, st_dtype: info.dtype, shape: Shape::new(info.shape.clone()), start: base + s, end: base + e },
                );
            }
            files.push((p.clone(), mmap));
        }
        Ok(Weights { origin: origin.to_path_buf(), files, entries })
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
                hint: if similar.is_empty() { String::new() } else { format!("; similar: {}", similar.join(", ")) },
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
        let dtype = dtype_of(e.st_dtype).ok_or_else(|| self.unsupported(key, e, "the engine cannot read"))?;
        self.check_fits(key, e, e.end - e.start)?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let data = HostData::from_le_bytes(dtype, bytes);
        HostTensor::new(e.shape.clone(), data).map_err(|_| Error::Format {
            path: self.files[e.file].0.clone(),
            msg: format!("tensor `{key}`: {} bytes do not fit shape {} of {}", bytes.len(), e.shape, dtype),
        })
    }

    /// Reads a floating-point tensor as f32, checking its shape when `expected` is given.
    pub fn get_f32(&self, key: &str, expected: Option<&Shape>) -> Result<HostTensor> {
        let e = self.entry(key)?;
        if let Some(exp) = expected {
            // Shapes differing only in size-1 dims hold the same data: a 1×1 conv weight
            // [O, I, 1, 1] is the linear weight [O, I].
            if squeezed(&e.shape) != squeezed(exp) {
                return Err(Error::ShapeMismatch {
                    path: self.files[e.file].0.clone(),
                    key: key.into(),
                    expected: exp.clone(),
                    found: e.shape.clone(),
                });
            }
        }
        match dtype_of(e.st_dtype) {
            Some(d) if d.is_float() => {
                // the stored copy and the f32 one are alive together
                self.check_fits(key, e, (e.end - e.start).saturating_mul(1 + 4 / d.size_in_bytes()))?;
                let mut t = self.get(key)?.to_dtype(DType::F32)?;
                if let Some(exp) = expected {
                    t.shape = exp.clone();
                }
                Ok(t)
            }
            _ => Err(self.unsupported(key, e, "is not a floating-point type (expected f32, bf16 or f16)")),
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
                return Err(Error::IndexOutOfRange { path: self.files[e.file].0.clone(), key: key.into(), index: r, len: n });
            }
            let start = e.start + r * row_bytes;
            let t = HostTensor { shape: Shape::new([cols]), data: HostData::from_le_bytes(dtype, &self.files[e.file].1[start..start + row_bytes]) };
            out.extend(t.to_f32_vec());
        }
        HostTensor::from_f32([rows.len(), cols], out)
    }

    /// Reads every tensor as f32 (floats) or i64 (integers), for small reference files.
    pub fn all(&self) -> Result<HashMap<String, HostTensor>> {
        self.keys().map(|k| Ok((k.to_string(), self.get(k)?))).collect()
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
            return Err(Error::Format { path: path.into(), msg: "a tensor cannot be named `__metadata__` (safetensors reserves it for metadata)".into() });
        }
        let dtype = match t.dtype() {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
            DType::I64 => StDtype::I64,
            DType::I32 => StDtype::I32,
            DType::U8 => StDtype::U8,
        };
        let view = TensorView::new(dtype, t.shape.dims().to_vec(), t.data.as_bytes())
            .map_err(|e| Error::Format { path: path.into(), msg: format!("tensor `{name}`: {e}") })?;
        views.push((name.to_string(), view));
    }
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| Error::Format { path: path.into(), msg: e.to_string() })
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

    /// Rows of a 2-D table as f32 (embedding lookups).
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<HostTensor> {
        let shape = self.shape_of(name)?;
        let t = self.tensor_f32(name, &shape)?.to_f32_vec();
        let cols = shape.last();
        let n = shape.rows();
        let mut out = Vec::with_capacity(rows.len() * cols);
        for &r in rows {
            if r >= n {
                return Err(Error::IndexOutOfRange { path: self.origin().into(), key: name.into(), index: r, len: n });
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
        self.tensors.get(name).map(|t| t.shape.clone()).ok_or_else(|| Error::MissingKey {
            path: self.origin.clone().into(),
            key: name.into(),
            available: self.tensors.len(),
            hint: String::new(),
        })
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        let found = self.shape_of(name)?;
        if squeezed(&found) != squeezed(shape) {
            return Err(Error::ShapeMismatch { path: self.origin.clone().into(), key: name.into(), expected: shape.clone(), found });
        }
        let mut t = self.tensors[name].to_dtype(DType::F32).map_err(|_| Error::UnsupportedDType {
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
        self.get(name).map(|t| t.shape.clone()).ok_or_else(|| Error::MissingKey {
            path: self.origin().into(),
            key: name.into(),
            available: self.len(),
            hint: String::new(),
        })
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        let found = self.shape_of(name)?;
        if squeezed(&found) != squeezed(shape) {
            return Err(Error::ShapeMismatch { path: self.origin().into(), key: name.into(), expected: shape.clone(), found });
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
        self.top.shape_of(&format!("{}{name}", self.prefix)).or_else(|_| self.base.shape_of(name))
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> Result<HostTensor> {
        let key = format!("{}{name}", self.prefix);
        if self.top.contains(&key) {
            self.top.tensor_f32(&key, shape)
        } else {
            self.base.tensor_f32(name, shape)
        }
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
        self.routes.iter().find(|(p, _)| name.starts_with(p)).map_or(self.default, |r| r.1)
    }
}

impl TensorSource for Routed<'_> {
    fn origin(&self) -> String {
        let mut parts: Vec<String> = self.routes.iter().map(|(p, s)| format!("{p}* from {}", s.origin())).collect();
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
    fn rows_f32(&self, name: &str, rows: &[usize]) -> Result<HostTensor> {
        (**self).rows_f32(name, rows)
    }
}
