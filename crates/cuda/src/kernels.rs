//! The kernel registry: every `kernels/*.cu` embedded in the crate, prebuilt images from the
//! top-level `build.rs` (when nvcc was found), and per-device modules loaded lazily, one per file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::error::{CudaError, Result};
use crate::nvrtc::{self, CompileOptions, KernelFormat, KernelResources, KernelTarget};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_kernels.rs"));
}

/// `(file name, source)` of every `kernels/*.cu`, sorted by name.
pub fn kernel_sources() -> &'static [(&'static str, &'static str)] {
    embedded::SOURCES
}

/// `(include name, source)` of every `kernels/include/*.cuh`.
pub fn kernel_headers() -> &'static [(&'static str, &'static str)] {
    embedded::HEADERS
}

/// The file that defines kernel `name` (e.g. `rmsnorm_bf16` -> `norm.cu`).
pub fn file_of_kernel(name: &str) -> Option<&'static str> {
    static INDEX: OnceLock<HashMap<String, &'static str>> = OnceLock::new();
    INDEX
        .get_or_init(|| {
            let mut m = HashMap::new();
            for (file, src) in kernel_sources() {
                for k in nvrtc::entry_points(src) {
                    m.insert(k, *file);
                }
            }
            m
        })
        .get(name)
        .copied()
}

/// A 64-bit FNV-1a fingerprint of a kernel file's source and of every header, which the top-level
/// `build.rs` computes the same way for its prebuilt images, so that an image built from other
/// sources is never loaded. Inputs, in order: the `.cu` bytes, then for each header sorted by
/// name: its name, a NUL byte, its bytes, a NUL byte.
pub fn source_fingerprint(source: &str, headers: &[(&str, &str)]) -> u64 {
    fn eat(mut h: u64, bytes: &[u8]) -> u64 {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
    let mut h = eat(0xcbf2_9ce4_8422_2325, source.as_bytes());
    let mut hs = headers.to_vec();
    hs.sort();
    for (n, c) in hs {
        h = eat(h, n.as_bytes());
        h = eat(h, &[0]);
        h = eat(h, c.as_bytes());
        h = eat(h, &[0]);
    }
    h
}

/// A kernel image compiled ahead of time by nvcc in the top-level `build.rs`.
#[derive(Clone, Copy, Debug)]
pub struct PrebuiltKernel {
    /// The `.cu` file name, e.g. `norm.cu`.
    pub file: &'static str,
    /// [`KernelTarget::image_name`]: `sm_90a.cubin` or `compute_90a.ptx`.
    pub target: &'static str,
    /// [`source_fingerprint`] of the sources it was built from.
    pub fingerprint: u64,
    pub image: &'static [u8],
}

static PREBUILT: OnceLock<&'static [PrebuiltKernel]> = OnceLock::new();

/// A loaded module and the NVRTC report it came with.
struct LoadedFile {
    module: Arc<CudaModule>,
    origin: &'static str,
}

/// Kernels of one device: modules are compiled (or taken prebuilt, or from the disk cache) and
/// loaded on first use of any kernel of their file.
pub struct KernelSet {
    ctx: Arc<CudaContext>,
    target: KernelTarget,
    files: Mutex<HashMap<&'static str, LoadedFile>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    resources: Mutex<Vec<KernelResources>>,
}

impl KernelSet {
    /// Registers the images the program's `build.rs` compiled with nvcc (call once, before the
    /// first device is opened; later calls are ignored).
    pub fn set_prebuilt(table: &'static [PrebuiltKernel]) {
        let _ = PREBUILT.set(table);
    }

    /// The registered prebuilt images (empty when none were registered).
    pub fn prebuilt() -> &'static [PrebuiltKernel] {
        PREBUILT.get().copied().unwrap_or(&[])
    }

    pub(crate) fn new(ctx: Arc<CudaContext>, target: KernelTarget) -> KernelSet {
        KernelSet {
            ctx,
            target,
            files: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            resources: Mutex::new(vec![]),
        }
    }

    pub fn target(&self) -> &KernelTarget {
        &self.target
    }

    /// The kernel `name`, loading its file's module on first use.
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(name) {
            return Ok(f.clone());
        }
        let file = file_of_kernel(name).ok_or_else(|| CudaError::UnknownKernel(name.into()))?;
        let module = self.module(file)?;
        let f = module
            .load_function(name)
            .map_err(|err| CudaError::Driver {
                what: format!("looking up kernel `{name}` in {file}"),
                err,
            })?;
        self.functions
            .lock()
            .unwrap()
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Where each loaded file came from: `prebuilt`, `nvrtc` or `cache`.
    pub fn origins(&self) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = self
            .files
            .lock()
            .unwrap()
            .iter()
            .map(|(f, l)| (*f, l.origin))
            .collect();
        v.sort();
        v
    }

    /// ptxas reports of the files compiled by NVRTC so far (CUBIN target only).
    pub fn resources(&self) -> Vec<KernelResources> {
        self.resources.lock().unwrap().clone()
    }

    /// Loads every kernel file now (to fail early, or before timing).
    pub fn load_all(&self) -> Result<()> {
        for (file, _) in kernel_sources() {
            self.module(file)?;
        }
        Ok(())
    }

    fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        let mut files = self.files.lock().unwrap();
        if let Some(l) = files.get(file) {
            return Ok(l.module.clone());
        }
        let source = kernel_sources()
            .iter()
            .find(|(f, _)| *f == file)
            .map(|(_, s)| *s)
            .ok_or_else(|| CudaError::UnknownKernel(file.into()))?;
        let fp = source_fingerprint(source, kernel_headers());
        let want = self.target.image_name();
        let fmt = self.target.format;
        let pre = KernelSet::prebuilt()
            .iter()
            .find(|p| p.file == file && p.target == want && p.fingerprint == fp);
        let (image, origin) = match pre {
            Some(p) => (p.image.to_vec(), "prebuilt"),
            None => {
                let m = nvrtc::compile(
                    file,
                    source,
                    kernel_headers(),
                    &CompileOptions::new(self.target.clone()),
                )?;
                self.resources
                    .lock()
                    .unwrap()
                    .extend(m.resources.iter().cloned());
                (m.image, if m.from_cache { "cache" } else { "nvrtc" })
            }
        };
        let ptx = match fmt {
            KernelFormat::Cubin => Ptx::from_binary(image),
            KernelFormat::Ptx => {
                let mut s = String::from_utf8(image).map_err(|_| CudaError::Invalid {
                    what: format!("PTX of {file}"),
                    msg: "not UTF-8 text".into(),
                })?;
                if let Some(i) = s.find('\0') {
                    s.truncate(i);
                }
                Ptx::from_src(s)
            }
        };
        let module = self
            .ctx
            .load_module(ptx)
            .map_err(|err| CudaError::LoadModule {
                file: file.into(),
                format: fmt.name(),
                err,
            })?;
        files.insert(
            file,
            LoadedFile {
                module: module.clone(),
                origin,
            },
        );
        Ok(module)
    }
}
