//! Reader of PyTorch `torch.save` checkpoints (`.pth`/`.pt`) that never executes code.
//!
//! A `torch.save` file (PyTorch >= 1.6) is a zip archive with one top folder (named after the
//! file, so it varies): `<top>/data.pkl` is a pickle of the saved object, `<top>/data/<key>` holds
//! the raw little-endian bytes of each storage, `<top>/byteorder` says `little`. Entries are
//! stored uncompressed, so storages are sliced straight out of a memory map.
//!
//! `data.pkl` is read by a small pickle machine written here. It knows the opcodes `torch.save`
//! emits (protocol 2, plus the protocol 3-5 forms of the same operations) and resolves globals
//! against an allow-list of tensor-rebuild functions and storage types ([`ALLOWED_GLOBALS`]).
//! Nothing is ever imported or called: an allowed global is a tag the machine interprets itself,
//! and any other global (`os.system`, `builtins.eval`, ...) stops the load with
//! [`PthError::ForbiddenGlobal`] before anything else happens. Every container lives in a flat
//! arena, so hostile nesting or cycles can neither recurse nor overflow the stack.

use std::collections::HashMap;
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use memmap2::Mmap;
use zip::{CompressionMethod, ZipArchive};

use crate::{DType, HostData, HostTensor, Shape};

/// The Python globals a checkpoint may name. Everything else is refused.
pub const ALLOWED_GLOBALS: &[&str] = &[
    "collections.OrderedDict",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2",
    "torch.Tensor",
    "torch.nn.parameter.Parameter",
    "torch.FloatStorage",
    "torch.DoubleStorage",
    "torch.HalfStorage",
    "torch.BFloat16Storage",
    "torch.LongStorage",
    "torch.IntStorage",
    "torch.ByteStorage",
    "torch.BoolStorage",
];

/// Tensor views whose strides overlap (stride 0, `expand`) may hold more elements than their
/// storage; beyond this many elements such a view is refused: a state dict practically never holds
/// one, and a crafted file could make a one-element storage materialise as gigabytes.
pub const MAX_OVERLAPPING_VIEW_ELEMENTS: u64 = 1 << 20;

/// What materialising a checkpoint may cost in memory. Tensors are copied out of the archive, so
/// the total is bounded by the archive's own size (twice it, for tied weights that share one
/// storage, plus [`SLACK_BYTES`](MemoryBudget::SLACK_BYTES)) and, when the system says, by the
/// memory available now (`MemAvailable` in /proc/meminfo): a checkpoint that cannot fit is an error
/// naming the tensor, never an allocation abort.
#[derive(Clone, Copy, Debug)]
pub struct MemoryBudget {
    pub bytes: u64,
    /// Where the bound comes from, for the error.
    pub source: &'static str,
}

impl MemoryBudget {
    pub const SLACK_BYTES: u64 = 256 << 20;

    /// The budget for an archive of `archive_bytes`.
    pub fn for_archive(archive_bytes: u64) -> MemoryBudget {
        let own = archive_bytes
            .saturating_mul(2)
            .saturating_add(Self::SLACK_BYTES);
        match mem_available() {
            Some(avail) if avail < own => MemoryBudget {
                bytes: avail,
                source: "MemAvailable in /proc/meminfo",
            },
            _ => MemoryBudget {
                bytes: own,
                source: "twice the file size plus 256 MiB",
            },
        }
    }
}

/// `MemAvailable` from /proc/meminfo, in bytes (None where there is no such file).
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Errors name the file, the archive entry (or tensor) and what was found.
#[derive(Debug, thiserror::Error)]
pub enum PthError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: refusing to load: `{entry}` asks for the Python global `{global}`, which is not on the \
         allow-list of tensor-rebuild functions and storage types; the checkpoint may be malicious (nothing \
         was executed){hint}. Allowed: {}",
        ALLOWED_GLOBALS.join(", ")
    )]
    ForbiddenGlobal {
        path: PathBuf,
        entry: String,
        global: String,
        hint: String,
    },
    #[error("{path}: `{entry}`: {msg}")]
    Format {
        path: PathBuf,
        entry: String,
        msg: String,
    },
}

pub type PthResult<T> = std::result::Result<T, PthError>;

/// How [`read_pth_with`] treats the tensor names.
#[derive(Clone, Debug)]
pub struct PthOptions {
    /// Strip a `module.` prefix (DataParallel / DeepSpeed wrappers) when every tensor name has it.
    pub strip_module_prefix: bool,
}

impl Default for PthOptions {
    fn default() -> Self {
        PthOptions {
            strip_module_prefix: true,
        }
    }
}

/// The tensors of a checkpoint and how they were found.
#[derive(Clone, Debug)]
pub struct PthCheckpoint {
    /// Tensors in the order the file lists them, contiguous, in their stored dtype (f64 becomes f32,
    /// bool becomes u8).
    pub tensors: Vec<(String, HostTensor)>,
    /// The key path of the tensor dict inside the saved object, e.g. `["state_dict"]`; empty for a
    /// flat dict.
    pub wrapper: Vec<String>,
    /// The prefix removed from every name (`module.`), if any.
    pub stripped_prefix: Option<String>,
    /// Names of non-tensor entries next to the tensors (ints, strings, nested dicts), skipped.
    pub ignored: Vec<String>,
}

/// Reads the tensors of a `torch.save` file: a flat (Ordered)dict of tensors, or one wrapped as
/// `{'state_dict': ...}` (also `'model'`, `'module'`), with a `module.` prefix stripped when every
/// name has it.
pub fn read_pth(path: &Path) -> PthResult<Vec<(String, HostTensor)>> {
    Ok(read_pth_with(path, &PthOptions::default())?.tensors)
}

/// [`read_pth`] with options and the details of what was found.
pub fn read_pth_with(path: &Path, opts: &PthOptions) -> PthResult<PthCheckpoint> {
    let file = File::open(path).map_err(|source| PthError::Io {
        path: path.into(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| PthError::Io {
            path: path.into(),
            source,
        })?
        .len();
    let fmt = |entry: &str, msg: String| PthError::Format {
        path: path.into(),
        entry: entry.into(),
        msg,
    };
    if len == 0 {
        return Err(fmt("(file)", "the file is empty".into()));
    }
    // SAFETY: mapped read-only; checkpoints are not modified while they are read (the same contract
    // as the safetensors loader).
    let mmap = unsafe { Mmap::map(&file) }.map_err(|source| PthError::Io {
        path: path.into(),
        source,
    })?;
    read_pth_bytes(path, &mmap, opts)
}

/// Reads a `torch.save` archive held in memory; `path` only names it in errors.
pub fn read_pth_bytes(path: &Path, bytes: &[u8], opts: &PthOptions) -> PthResult<PthCheckpoint> {
    let fmt = |entry: &str, msg: String| PthError::Format {
        path: path.into(),
        entry: entry.into(),
        msg,
    };
    let archive = Archive::open(bytes).map_err(|msg| fmt("(zip directory)", msg))?;
    let pkl_name = format!("{}/data.pkl", archive.top);

    if let Some(order) = archive
        .entry(&format!("{}/byteorder", archive.top))
        .map_err(|m| fmt(&pkl_name, m))?
    {
        let order = String::from_utf8_lossy(order);
        if order.trim() != "little" {
            return Err(fmt(
                &format!("{}/byteorder", archive.top),
                format!(
                    "storages are `{}` endian; only little-endian checkpoints are supported",
                    order.trim()
                ),
            ));
        }
    }
    let pkl = archive
        .entry(&pkl_name)
        .map_err(|m| fmt(&pkl_name, m))?
        .unwrap_or(&[]);

    let mut vm = Vm::new(pkl);
    let root = match vm.run() {
        Ok(v) => v,
        Err(VmError::Forbidden(global)) => {
            let hint = if global.starts_with("torch.nn.") || global.starts_with("__main__.") {
                "; it looks like a whole pickled model object: save its `state_dict()` instead"
                    .into()
            } else if global.starts_with("numpy.")
                || global.starts_with("mmengine.")
                || global.starts_with("argparse.")
            {
                "; it looks like a full training checkpoint: save only its state dict".into()
            } else {
                String::new()
            };
            return Err(PthError::ForbiddenGlobal {
                path: path.into(),
                entry: pkl_name,
                global,
                hint,
            });
        }
        Err(VmError::Bad(msg)) => return Err(fmt(&pkl_name, msg)),
    };

    let (dict, wrapper) = select_state_dict(&vm, &root).map_err(|m| fmt(&pkl_name, m))?;
    let mut named = vec![];
    let mut ignored = vec![];
    let mut seen = std::collections::HashSet::new();
    for (k, v) in &dict.items {
        let name = match k {
            Value::Str(s) => s.to_string(),
            other => {
                ignored.push(vm.describe(other));
                continue;
            }
        };
        match vm.tensor(v) {
            Some(t) => {
                if !seen.insert(name.clone()) {
                    return Err(fmt(&pkl_name, format!("tensor `{name}` appears twice")));
                }
                named.push((name, t.clone()));
            }
            None => ignored.push(name),
        }
    }
    if named.is_empty() {
        let keys: Vec<String> = dict
            .items
            .iter()
            .take(8)
            .map(|(k, _)| vm.describe(k))
            .collect();
        return Err(fmt(
            &pkl_name,
            format!(
                "no tensors found in the saved {} (keys: {}); expected a state dict, `{{'state_dict': ...}}`, \
                 `{{'model': ...}}` or `{{'module': ...}}`",
                if wrapper.is_empty() { "object".to_string() } else { format!("`{}` dict", wrapper.join(".")) },
                if keys.is_empty() { "none".into() } else { keys.join(", ") }
            ),
        ));
    }

    let stripped_prefix =
        if opts.strip_module_prefix && named.iter().all(|(n, _)| n.starts_with("module.")) {
            let names: std::collections::HashSet<&str> =
                named.iter().map(|(n, _)| &n["module.".len()..]).collect();
            if names.len() == named.len() && !names.contains("") {
                for (n, _) in named.iter_mut() {
                    n.drain(.."module.".len());
                }
                Some("module.".to_string())
            } else {
                None
            }
        } else {
            None
        };

    if let Some((name, _)) = named.iter().find(|(n, _)| n == "__metadata__") {
        // safetensors reserves the name for its string table: such a file could not be read back.
        return Err(fmt(
            &pkl_name,
            format!(
                "tensor name `{name}` is reserved by safetensors for metadata; rename the tensor"
            ),
        ));
    }

    let budget = MemoryBudget::for_archive(bytes.len() as u64);
    let mut used = 0u64;
    let mut tensors = Vec::with_capacity(named.len());
    for (name, t) in named {
        let entry = format!("{}/data/{}", archive.top, t.storage.key);
        // Checked before the copy is allocated, so the limit is an error, never an abort.
        let need = t
            .output_bytes()
            .map_err(|m| fmt(&entry, format!("tensor `{name}`: {m}")))?;
        used = used.saturating_add(need);
        if used > budget.bytes {
            let dims: Vec<String> = t.size.iter().map(|d| d.to_string()).collect();
            return Err(fmt(
                &entry,
                format!(
                    "tensor `{name}` ([{}] {:?}, {need} bytes) brings the checkpoint to {used} bytes in memory, more than the {} bytes allowed ({})",
                    dims.join(", "),
                    t.storage.kind,
                    budget.bytes,
                    budget.source
                ),
            ));
        }
        let bytes = archive
            .entry(&entry)
            .map_err(|m| fmt(&entry, format!("storage of tensor `{name}`: {m}")))?
            .ok_or_else(|| {
                fmt(
                    &entry,
                    format!("storage of tensor `{name}` is missing from the archive"),
                )
            })?;
        let tensor =
            materialise(&t, bytes).map_err(|m| fmt(&entry, format!("tensor `{name}`: {m}")))?;
        tensors.push((name, tensor));
    }
    Ok(PthCheckpoint {
        tensors,
        wrapper,
        stripped_prefix,
        ignored,
    })
}

// ------------------------------------------------------------------------------------------------
// zip archive
// ------------------------------------------------------------------------------------------------

struct Archive<'a> {
    bytes: &'a [u8],
    top: String,
    /// name -> (data start, size, compression) of every entry.
    entries: HashMap<String, (u64, u64, CompressionMethod)>,
}

impl<'a> Archive<'a> {
    fn open(bytes: &'a [u8]) -> Result<Archive<'a>, String> {
        let mut zip = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
            // The pre-1.6 format is a bare pickle that starts with protocol 2 and the magic number.
            if bytes.starts_with(b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19") {
                "this is the legacy (PyTorch < 1.6 / _use_new_zipfile_serialization=False) format, which is not \
                 supported; re-save it with a current torch.save"
                    .to_string()
            } else if bytes.len() > 9 && bytes[8] == b'{' {
                format!("not a torch.save zip archive ({e}); it looks like a safetensors file")
            } else {
                format!("not a torch.save zip archive ({e})")
            }
        })?;
        let mut entries = HashMap::new();
        for i in 0..zip.len() {
            let f = zip.by_index_raw(i).map_err(|e| format!("entry {i}: {e}"))?;
            let name = f.name().map_err(|e| format!("entry {i}: {e}"))?.to_string();
            if f.encrypted() {
                return Err(format!("entry `{name}` is encrypted"));
            }
            let start = f
                .data_start()
                .ok_or_else(|| format!("entry `{name}`: no data offset"))?;
            let stored = f.compressed_size();
            entries.insert(name, (start, stored.max(f.size()), f.compression()));
            if f.compression() == CompressionMethod::Stored && f.size() != stored {
                return Err(format!(
                    "entry {i} is stored with size {} but compressed size {stored}",
                    f.size()
                ));
            }
        }
        let mut tops: Vec<&String> = entries
            .keys()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        tops.sort();
        let top = match tops.as_slice() {
            [one] => one.trim_end_matches("/data.pkl").to_string(),
            [] => {
                return Err(format!(
                    "a zip archive without a `<folder>/data.pkl` entry, so not a torch.save file ({} entries)",
                    entries.len()
                ))
            }
            many => {
                return Err(format!(
                    "{} `*/data.pkl` entries ({}); a torch.save file has one",
                    many.len(),
                    many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ))
            }
        };
        Ok(Archive {
            bytes,
            top,
            entries,
        })
    }

    /// The bytes of an entry (None when absent).
    fn entry(&self, name: &str) -> Result<Option<&'a [u8]>, String> {
        let Some(&(start, size, method)) = self.entries.get(name) else {
            return Ok(None);
        };
        if method != CompressionMethod::Stored {
            return Err(format!(
                "entry is compressed ({method:?}); torch.save stores entries uncompressed, so this archive was \
                 re-packed: extract and re-zip it with `zip -0`"
            ));
        }
        let end = start.checked_add(size).filter(|&e| e <= self.bytes.len() as u64).ok_or_else(|| {
            format!("entry of {size} bytes at offset {start} runs past the end of the file ({} bytes)", self.bytes.len())
        })?;
        Ok(Some(&self.bytes[start as usize..end as usize]))
    }
}

// ------------------------------------------------------------------------------------------------
// the pickle machine
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageKind {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    U8,
    Bool,
}

impl StorageKind {
    fn elem_size(self) -> u64 {
        match self {
            StorageKind::F64 | StorageKind::I64 => 8,
            StorageKind::F32 | StorageKind::I32 => 4,
            StorageKind::F16 | StorageKind::BF16 => 2,
            StorageKind::U8 | StorageKind::Bool => 1,
        }
    }
}

/// An allowed global: a tag, never something that is imported or called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    TensorType,
    ParameterType,
    Storage(StorageKind),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") => Global::TensorType,
        ("torch.nn.parameter", "Parameter") => Global::ParameterType,
        ("torch", "FloatStorage") => Global::Storage(StorageKind::F32),
        ("torch", "DoubleStorage") => Global::Storage(StorageKind::F64),
        ("torch", "HalfStorage") => Global::Storage(StorageKind::F16),
        ("torch", "BFloat16Storage") => Global::Storage(StorageKind::BF16),
        ("torch", "LongStorage") => Global::Storage(StorageKind::I64),
        ("torch", "IntStorage") => Global::Storage(StorageKind::I32),
        ("torch", "ByteStorage") => Global::Storage(StorageKind::U8),
        ("torch", "BoolStorage") => Global::Storage(StorageKind::Bool),
        _ => return None,
    })
}

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Global(Global),
    /// A container, storage or tensor in the arena.
    Obj(usize),
}

#[derive(Clone, Debug)]
struct StorageRef {
    kind: StorageKind,
    key: Rc<str>,
    numel: u64,
}

#[derive(Clone, Debug)]
struct TensorRef {
    storage: StorageRef,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

impl TensorRef {
    /// Bytes of the contiguous tensor this view materialises as (f64 becomes f32).
    fn output_bytes(&self) -> Result<u64, String> {
        let numel = self
            .size
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or("element count overflows")?;
        let es = match self.storage.kind {
            StorageKind::F64 => 4,
            k => k.elem_size(),
        };
        numel
            .checked_mul(es)
            .ok_or_else(|| "byte size overflows".to_string())
    }
}

#[derive(Default, Debug)]
struct Dict {
    items: Vec<(Value, Value)>,
    /// Position of each string key in `items` (a later SETITEM of the same key replaces, as in Python).
    index: HashMap<Rc<str>, usize>,
}

impl Dict {
    fn set(&mut self, k: Value, v: Value) {
        if let Value::Str(s) = &k {
            if let Some(&i) = self.index.get(s) {
                self.items[i].1 = v;
                return;
            }
            self.index.insert(s.clone(), self.items.len());
        }
        self.items.push((k, v));
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.items[i].1)
    }
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<Value>),
    /// Lists and sets.
    List(Vec<Value>),
    Dict(Dict),
    Storage(StorageRef),
    Tensor(TensorRef),
}

enum VmError {
    /// A global that is not on the allow-list, as `module.name`.
    Forbidden(String),
    Bad(String),
}

type VmResult<T> = Result<T, VmError>;

fn bad<T>(msg: impl Into<String>) -> VmResult<T> {
    Err(VmError::Bad(msg.into()))
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being run (for error messages).
    at: usize,
    stack: Vec<Value>,
    metastack: Vec<Vec<Value>>,
    memo: HashMap<u32, Value>,
    arena: Vec<Obj>,
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'P' => "PERSID",
        b'p' => "PUT",
        b'g' => "GET",
        b'i' => "INST",
        b'o' => "OBJ",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x92 => "NEWOBJ_EX",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "not a pickle opcode",
    }
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Vm<'a> {
        Vm {
            data,
            pos: 0,
            at: 0,
            stack: vec![],
            metastack: vec![],
            memo: HashMap::new(),
            arena: vec![],
        }
    }

    fn err<T>(&self, msg: impl std::fmt::Display) -> VmResult<T> {
        bad(format!("at byte {} of {}: {msg}", self.at, self.data.len()))
    }

    fn take(&mut self, n: u64) -> VmResult<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return self.err(format!("the pickle ends early ({n} bytes needed, {left} left); the file is truncated or corrupt"));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn u8(&mut self) -> VmResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> VmResult<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> VmResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> VmResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> VmResult<&'a str> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return self.err("GLOBAL argument has no end of line");
        };
        let s = std::str::from_utf8(&rest[..n])
            .map_err(|_| VmError::Bad(format!("at byte {}: GLOBAL name is not UTF-8", self.at)))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: u64) -> VmResult<Value> {
        let b = self.take(n)?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(s.into())),
            Err(_) => self.err("a unicode string is not valid UTF-8"),
        }
    }

    fn push_obj(&mut self, o: Obj) {
        self.arena.push(o);
        self.stack.push(Value::Obj(self.arena.len() - 1));
    }

    fn pop(&mut self) -> VmResult<Value> {
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.err("stack underflow (an opcode needs a value, or a MARK is in the way)"),
        }
    }

    fn top(&self) -> VmResult<&Value> {
        match self.stack.last() {
            Some(v) => Ok(v),
            None => self.err("stack underflow (an opcode needs a value, or a MARK is in the way)"),
        }
    }

    fn pop_mark(&mut self) -> VmResult<Vec<Value>> {
        match self.metastack.pop() {
            Some(prev) => Ok(std::mem::replace(&mut self.stack, prev)),
            None => self.err("no MARK on the stack"),
        }
    }

    fn obj_mut(&mut self, v: &Value) -> Option<&mut Obj> {
        match v {
            Value::Obj(i) => self.arena.get_mut(*i),
            _ => None,
        }
    }

    fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.arena.get(*i),
            _ => None,
        }
    }

    fn tensor(&self, v: &Value) -> Option<&TensorRef> {
        match self.obj(v) {
            Some(Obj::Tensor(t)) => Some(t),
            _ => None,
        }
    }

    fn dict(&self, v: &Value) -> Option<&Dict> {
        match self.obj(v) {
            Some(Obj::Dict(d)) => Some(d),
            _ => None,
        }
    }

    fn tuple(&self, v: &Value) -> Option<&[Value]> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) => Some(t),
            _ => None,
        }
    }

    /// A short description of a value, for error messages (never recursive).
    fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => if *b { "True" } else { "False" }.into(),
            Value::Int(i) => format!("int {i}"),
            Value::Float(f) => format!("float {f}"),
            Value::Str(s) => {
                let mut t: String = s.chars().take(60).collect();
                if t.len() < s.len() {
                    t.push('…');
                }
                format!("{t:?}")
            }
            Value::Bytes(b) => format!("bytes of length {}", b.len()),
            Value::Global(g) => format!("global {g:?}"),
            Value::Obj(_) => match self.obj(v) {
                Some(Obj::Tuple(t)) => format!("tuple of {}", t.len()),
                Some(Obj::List(l)) => format!("list of {}", l.len()),
                Some(Obj::Dict(d)) => format!("dict of {}", d.items.len()),
                Some(Obj::Storage(s)) => format!("{:?} storage `{}`", s.kind, s.key),
                Some(Obj::Tensor(t)) => format!("tensor {:?}", t.size),
                None => "dangling object".into(),
            },
        }
    }

    fn int(&self, v: &Value, what: &str) -> VmResult<u64> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(*i as u64),
            Value::Bool(b) => Ok(*b as u64),
            other => self.err(format!(
                "{what}: expected a non-negative int, found {}",
                self.describe(other)
            )),
        }
    }

    fn int_tuple(&self, v: &Value, what: &str) -> VmResult<Vec<u64>> {
        let Some(items) = self.tuple(v) else {
            return self.err(format!(
                "{what}: expected a tuple of ints, found {}",
                self.describe(v)
            ));
        };
        items.iter().map(|x| self.int(x, what)).collect()
    }

    fn run(&mut self) -> VmResult<Value> {
        loop {
            self.at = self.pos;
            let op = match self.take(1) {
                Ok(b) => b[0],
                Err(_) => {
                    return self
                        .err("the pickle ends without STOP; the file is truncated or corrupt")
                }
            };
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return self
                            .err(format!("pickle protocol {p} is not supported (at most 5)"));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.u64()?;
                }
                b'.' => {
                    // STOP
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => {
                    let s = std::mem::take(&mut self.stack);
                    self.metastack.push(s);
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'}' => self.push_obj(Obj::Dict(Dict::default())),
                b']' | 0x8f => self.push_obj(Obj::List(vec![])),
                b')' => self.push_obj(Obj::Tuple(vec![])),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return self.err(format!(
                            "TUPLE{n} needs {n} values, the stack holds {}",
                            self.stack.len()
                        ));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_obj(Obj::Tuple(items));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::Tuple(items));
                }
                b'l' | 0x91 => {
                    // LIST, FROZENSET
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("DICT with an odd number of values");
                    }
                    let mut d = Dict::default();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.set(k, v);
                    }
                    self.push_obj(Obj::Dict(d));
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?;
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'B' | b'T' => {
                    let n = self.u32()? as u64;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(b.into()));
                }
                b'C' | b'U' => {
                    let n = self.u8()? as u64;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(b.into()));
                }
                0x8e => {
                    let n = self.u64()?;
                    let b = self.take(n)?;
                    self.stack.push(Value::Bytes(b.into()));
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let b = self.take(n)?;
                    let v = self.long(b)?;
                    self.stack.push(Value::Int(v));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return self.err("SETITEMS with an odd number of values");
                    }
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' | 0x90 => {
                    // APPENDS, ADDITEMS
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent_load(&pid)?;
                    self.push_obj(Obj::Storage(s));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.stack.push(Value::Global(g));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return self.err(format!(
                            "STACK_GLOBAL needs two strings, found {} and {}",
                            self.describe(&module),
                            self.describe(&name)
                        ));
                    };
                    let g = self.global(module, name)?;
                    self.stack.push(Value::Global(g));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = self.call(&func, &args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: the state of an OrderedDict (`_metadata`) or of a tensor is not needed.
                    let state = self.pop()?;
                    let target = self.top()?;
                    match self.obj(target) {
                        Some(Obj::Dict(_)) | Some(Obj::Tensor(_)) => {}
                        _ => {
                            return self.err(format!(
                                "BUILD on {} (state {}); only dicts and tensors are built",
                                self.describe(target),
                                self.describe(&state)
                            ))
                        }
                    }
                }
                other => {
                    return self.err(format!(
                    "unsupported pickle opcode 0x{other:02x} ({}); torch.save does not write it",
                    opcode_name(other)
                ))
                }
            }
        }
    }

    fn memo_put(&mut self, i: u32) -> VmResult<()> {
        let v = self.top()?.clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn memo_get(&mut self, i: u32) -> VmResult<()> {
        match self.memo.get(&i) {
            Some(v) => {
                let v = v.clone();
                self.stack.push(v);
                Ok(())
            }
            None => self.err(format!("memo entry {i} is read before it is written")),
        }
    }

    /// Two's-complement little-endian integer of LONG1/LONG4.
    fn long(&self, b: &[u8]) -> VmResult<i64> {
        if b.is_empty() {
            return Ok(0);
        }
        let neg = b[b.len() - 1] & 0x80 != 0;
        let fill = if neg { 0xff } else { 0 };
        if b.len() > 8 && b[8..].iter().any(|&x| x != fill) {
            return self.err(format!(
                "an integer of {} bytes does not fit 64 bits",
                b.len()
            ));
        }
        let mut buf = [fill; 8];
        let n = b.len().min(8);
        buf[..n].copy_from_slice(&b[..n]);
        let v = i64::from_le_bytes(buf);
        if (v < 0) != neg {
            return self.err(format!(
                "an integer of {} bytes does not fit 64 bits",
                b.len()
            ));
        }
        Ok(v)
    }

    fn set_items(&mut self, items: Vec<Value>) -> VmResult<()> {
        let target = self.top()?.clone();
        let desc = self.describe(&target);
        match self.obj_mut(&target) {
            Some(Obj::Dict(d)) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.set(k, v);
                }
                Ok(())
            }
            _ => self.err(format!("SETITEM(S) on {desc}, expected a dict")),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> VmResult<()> {
        let target = self.top()?.clone();
        let desc = self.describe(&target);
        match self.obj_mut(&target) {
            Some(Obj::List(l)) => {
                l.extend(items);
                Ok(())
            }
            _ => self.err(format!("APPEND(S) on {desc}, expected a list")),
        }
    }

    fn global(&self, module: &str, name: &str) -> VmResult<Global> {
        resolve_global(module, name).ok_or_else(|| VmError::Forbidden(format!("{module}.{name}")))
    }

    /// `('storage', storage_type, key, location, numel)`, as torch.save writes for every storage.
    fn persistent_load(&self, pid: &Value) -> VmResult<StorageRef> {
        let Some(t) = self.tuple(pid) else {
            return self.err(format!(
                "persistent id is {}, expected a tuple ('storage', type, key, location, numel)",
                self.describe(pid)
            ));
        };
        match t {
            [Value::Str(tag), Value::Global(Global::Storage(kind)), key, _location, numel]
                if &**tag == "storage" =>
            {
                let key: Rc<str> = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string().into(),
                    other => {
                        return self.err(format!(
                            "storage key is {}, expected a string",
                            self.describe(other)
                        ))
                    }
                };
                if key.is_empty() || key.contains('/') || key.contains("..") {
                    return self.err(format!("storage key {key:?} is not a plain name"));
                }
                let numel = self.int(numel, "storage size")?;
                Ok(StorageRef {
                    kind: *kind,
                    key,
                    numel,
                })
            }
            _ => {
                let parts: Vec<String> = t.iter().map(|v| self.describe(v)).collect();
                self.err(format!(
                    "persistent id ({}) is not ('storage', <allowed storage type>, key, location, numel)",
                    parts.join(", ")
                ))
            }
        }
    }

    fn call(&mut self, func: &Value, args: &Value) -> VmResult<Value> {
        let Value::Global(g) = func else {
            return self.err(format!(
                "REDUCE calls {}, which is not an allowed function",
                self.describe(func)
            ));
        };
        let Some(a) = self.tuple(args) else {
            return self.err(format!(
                "REDUCE arguments are {}, expected a tuple",
                self.describe(args)
            ));
        };
        let a = a.to_vec();
        match g {
            Global::OrderedDict => {
                if !a.is_empty() {
                    return self.err(format!(
                        "OrderedDict called with {} arguments; torch.save passes none",
                        a.len()
                    ));
                }
                self.arena.push(Obj::Dict(Dict::default()));
                Ok(Value::Obj(self.arena.len() - 1))
            }
            Global::RebuildTensorV2 => {
                // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
                if a.len() != 6 && a.len() != 7 {
                    return self.err(format!(
                        "_rebuild_tensor_v2 called with {} arguments, expected 6 or 7",
                        a.len()
                    ));
                }
                let storage = match self.obj(&a[0]) {
                    Some(Obj::Storage(s)) => s.clone(),
                    _ => {
                        return self.err(format!(
                            "_rebuild_tensor_v2: storage is {}",
                            self.describe(&a[0])
                        ))
                    }
                };
                let offset = self.int(&a[1], "_rebuild_tensor_v2 storage_offset")?;
                let size = self.int_tuple(&a[2], "_rebuild_tensor_v2 size")?;
                let stride = self.int_tuple(&a[3], "_rebuild_tensor_v2 stride")?;
                if size.len() != stride.len() {
                    return self.err(format!(
                        "_rebuild_tensor_v2: size {size:?} and stride {stride:?} differ in rank"
                    ));
                }
                self.arena.push(Obj::Tensor(TensorRef {
                    storage,
                    offset,
                    size,
                    stride,
                }));
                Ok(Value::Obj(self.arena.len() - 1))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                // (data, requires_grad, backward_hooks[, state]): the parameter is its data.
                let n = if *g == Global::RebuildParameter { 3 } else { 4 };
                if a.len() != n {
                    return self.err(format!(
                        "{g:?} called with {} arguments, expected {n}",
                        a.len()
                    ));
                }
                if self.tensor(&a[0]).is_none() {
                    return self.err(format!(
                        "{g:?}: data is {}, expected a tensor",
                        self.describe(&a[0])
                    ));
                }
                Ok(a[0].clone())
            }
            Global::RebuildFromTypeV2 => {
                // (func, new_type, args, state): a tensor with Python attributes; rebuilt by func.
                if a.len() != 4 {
                    return self.err(format!(
                        "_rebuild_from_type_v2 called with {} arguments, expected 4",
                        a.len()
                    ));
                }
                if !matches!(
                    a[1],
                    Value::Global(Global::TensorType | Global::ParameterType)
                ) {
                    return self.err(format!(
                        "_rebuild_from_type_v2: type is {}",
                        self.describe(&a[1])
                    ));
                }
                if !matches!(
                    a[0],
                    Value::Global(
                        Global::RebuildTensorV2
                            | Global::RebuildParameter
                            | Global::RebuildParameterWithState
                    )
                ) {
                    return self.err(format!(
                        "_rebuild_from_type_v2: function is {}",
                        self.describe(&a[0])
                    ));
                }
                let v = self.call(&a[0], &a[2])?;
                Ok(v)
            }
            Global::TensorType | Global::ParameterType | Global::Storage(_) => self.err(format!(
                "REDUCE calls {g:?}, which is only allowed as a type tag"
            )),
        }
    }
}

/// Finds the tensor dict: the root, or `root['state_dict']` (then `['model']`, `['module']`) when the
/// root itself holds no tensor.
fn select_state_dict<'v>(vm: &'v Vm, root: &Value) -> Result<(&'v Dict, Vec<String>), String> {
    let Some(mut d) = vm.dict(root) else {
        return Err(format!(
            "the saved object is {}, expected a dict of tensors",
            vm.describe(root)
        ));
    };
    let mut path = vec![];
    for _ in 0..4 {
        let has_tensor = d.items.iter().any(|(_, v)| vm.tensor(v).is_some());
        // xtuner's guess_load_checkpoint takes ['state_dict'] whenever it exists.
        let next = ["state_dict", "model", "module"]
            .into_iter()
            .filter(|k| *k == "state_dict" || !has_tensor)
            .find_map(|k| d.get(k).and_then(|v| vm.dict(v)).map(|inner| (k, inner)));
        match next {
            Some((k, inner)) => {
                path.push(k.to_string());
                d = inner;
            }
            None => break,
        }
    }
    Ok((d, path))
}

/// Copies a (possibly strided, offset) view out of its storage bytes into a contiguous tensor.
fn materialise(t: &TensorRef, bytes: &[u8]) -> Result<HostTensor, String> {
    let s = &t.storage;
    let es = s.kind.elem_size();
    let need = s.numel.checked_mul(es).ok_or("storage size overflows")?;
    if (bytes.len() as u64) < need {
        return Err(format!(
            "storage of {} {:?} elements needs {need} bytes, the entry has {}",
            s.numel,
            s.kind,
            bytes.len()
        ));
    }
    let numel = t
        .size
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or("element count overflows")?;
    let dims: Vec<usize> = t.size.iter().map(|&d| d as usize).collect();
    if numel > 0 {
        // The furthest element the view touches must lie inside the storage.
        let mut last = t.offset;
        for (&d, &st) in t.size.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(st)
                .and_then(|x| x.checked_add(last))
                .ok_or("view extent overflows")?;
        }
        if last >= s.numel {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last}, past the storage's {} elements",
                t.offset, t.size, t.stride, s.numel
            ));
        }
        if numel > s.numel && numel > MAX_OVERLAPPING_VIEW_ELEMENTS {
            return Err(format!(
                "view of {numel} elements over a storage of only {} (overlapping strides {:?}) would amplify the file; \
                 at most {MAX_OVERLAPPING_VIEW_ELEMENTS} elements are accepted for such a view (save `.contiguous()` tensors)",
                s.numel, t.stride
            ));
        }
    }
    let es = es as usize;
    let numel = numel as usize;
    let offset = t.offset as usize;

    // Contiguous strides (dims of size 1 may have any stride).
    let mut contiguous = true;
    let mut expect = 1u64;
    for (&d, &st) in t.size.iter().zip(&t.stride).rev() {
        if d != 1 && st != expect {
            contiguous = false;
            break;
        }
        expect = expect.saturating_mul(d);
    }
    let gathered;
    let raw: &[u8] = if numel == 0 {
        &[]
    } else if contiguous {
        &bytes[offset * es..(offset + numel) * es]
    } else {
        gathered = gather(bytes, es, offset, &t.size, &t.stride, numel);
        &gathered
    };
    let data = match s.kind {
        StorageKind::F32 => HostData::from_le_bytes(DType::F32, raw),
        StorageKind::F64 => HostData::F32(
            raw.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
        ),
        StorageKind::F16 => HostData::from_le_bytes(DType::F16, raw),
        StorageKind::BF16 => HostData::from_le_bytes(DType::BF16, raw),
        StorageKind::I64 => HostData::from_le_bytes(DType::I64, raw),
        StorageKind::I32 => HostData::from_le_bytes(DType::I32, raw),
        StorageKind::U8 | StorageKind::Bool => HostData::U8(raw.to_vec()),
    };
    HostTensor::new(Shape::new(dims), data).map_err(|e| e.to_string())
}

/// Row-major walk over a strided view (bounds already checked), copying runs of the last dimension.
fn gather(
    bytes: &[u8],
    es: usize,
    offset: usize,
    size: &[u64],
    stride: &[u64],
    numel: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(numel * es);
    let rank = size.len();
    let (inner, inner_stride) = (size[rank - 1] as usize, stride[rank - 1] as usize);
    let mut idx = vec![0u64; rank - 1];
    loop {
        let base = offset
            + idx
                .iter()
                .zip(stride)
                .map(|(&i, &s)| (i * s) as usize)
                .sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(&bytes[base * es..(base + inner) * es]);
        } else {
            for j in 0..inner {
                let p = (base + j * inner_stride) * es;
                out.extend_from_slice(&bytes[p..p + es]);
            }
        }
        // odometer over the outer dimensions
        let mut k = rank - 1;
        loop {
            if k == 0 {
                return out;
            }
            k -= 1;
            idx[k] += 1;
            if idx[k] < size[k] {
                break;
            }
            idx[k] = 0;
        }
    }
}
