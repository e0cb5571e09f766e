//! Kernel compilation with NVRTC (through cudarc's `nvrtc::sys` layer): CUBIN with the ptxas
//! report (registers, spills, shared memory per kernel) or PTX, with a disk cache keyed by
//! everything that affects the output.
//!
//! NVRTC must be 13.0.x: newer NVRTC emits PTX that the R580 driver (CUDA 13.0) rejects
//! (docs/architecture.md, "Numerics and toolchain"). CUBIN does not have that problem, and is the default on real GPUs.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::sys as nv;
use sha2::{Digest, Sha256};

use crate::error::{CudaError, Result};

/// What NVRTC produces and the driver loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFormat {
    /// Machine code for one architecture (e.g. sm_90a), with the ptxas report. Independent of the
    /// driver's PTX version.
    Cubin,
    /// PTX text, JIT-compiled by the driver. What the emulated GPU reads (it takes the kernel names
    /// from the `.entry` lines).
    Ptx,
}

impl KernelFormat {
    pub fn parse(s: &str) -> Option<KernelFormat> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cubin" => Some(KernelFormat::Cubin),
            "ptx" => Some(KernelFormat::Ptx),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KernelFormat::Cubin => "cubin",
            KernelFormat::Ptx => "ptx",
        }
    }
}

/// Where kernels are compiled for: a real architecture name (`sm_90a`) and a format. PTX is
/// generated for the matching virtual architecture (`compute_90a`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KernelTarget {
    pub arch: String,
    pub format: KernelFormat,
}

impl KernelTarget {
    pub fn new(arch: impl Into<String>, format: KernelFormat) -> KernelTarget {
        KernelTarget {
            arch: arch.into(),
            format,
        }
    }

    /// The architecture for a compute capability: `sm_90a` for 9.0 (the `a` variant enables
    /// Hopper-only instructions: wgmma, setmaxnreg), `sm_{major}{minor}a` from 9.0 on, plain
    /// `sm_{major}{minor}` before.
    pub fn arch_for(cc: (i32, i32)) -> String {
        if cc.0 >= 9 {
            format!("sm_{}{}a", cc.0, cc.1)
        } else {
            format!("sm_{}{}", cc.0, cc.1)
        }
    }

    /// `--gpu-architecture` value: the real architecture for CUBIN, the virtual one for PTX.
    pub fn nvrtc_arch(&self) -> String {
        match self.format {
            KernelFormat::Cubin => self.arch.clone(),
            KernelFormat::Ptx => self.arch.replacen("sm_", "compute_", 1),
        }
    }

    /// The name prebuilt images are filed under: `sm_90a.cubin` or `compute_90a.ptx`.
    pub fn image_name(&self) -> String {
        format!("{}.{}", self.nvrtc_arch(), self.format.name())
    }
}

/// One kernel's resources from the ptxas report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
    /// Static shared memory in bytes.
    pub smem: u32,
    pub barriers: u32,
}

impl std::fmt::Display for KernelResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kernel {}: {} registers, {} bytes spill stores, {} bytes spill loads, {} bytes smem",
            self.name, self.registers, self.spill_stores, self.spill_loads, self.smem
        )
    }
}

/// Parses the `--ptxas-options=-v` report in an NVRTC program log. Only entry functions
/// (`Compiling entry function 'x'`) are reported, in the order ptxas compiled them.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    fn number_before(s: &str, unit: &str) -> Option<u32> {
        let i = s.find(unit)?;
        s[..i]
            .split(|c: char| !c.is_ascii_digit())
            .rfind(|t| !t.is_empty())?
            .parse()
            .ok()
    }
    fn quoted(s: &str) -> Option<&str> {
        let a = s.find('\'')?;
        let b = s[a + 1..].find('\'')?;
        Some(&s[a + 1..a + 1 + b])
    }
    let mut out: Vec<KernelResources> = vec![];
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if line.contains("Compiling entry function") {
            if let Some(name) = quoted(line) {
                out.push(KernelResources {
                    name: name.to_string(),
                    ..Default::default()
                });
                current = Some(out.len() - 1);
            }
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim();
            current = out.iter().position(|k| k.name == name);
        } else if let Some(k) = current.map(|i| &mut out[i]) {
            if line.contains("spill stores") {
                k.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.smem = number_before(line, "bytes smem").unwrap_or(0);
                k.barriers = number_before(line, "barriers").unwrap_or(0);
            }
        }
    }
    out
}

fn cuda_lib_dirs() -> Vec<PathBuf> {
    let mut v = vec![];
    if let Ok(d) = std::env::var("OPENUNI_CUDA_DIR") {
        v.push(PathBuf::from(d).join("nvidia/cu13/lib"));
    }
    if let Some(h) = home() {
        v.push(h.join(".cache/openuni/cuda-13.0.2/nvidia/cu13/lib"));
    }
    if let Ok(d) = std::env::var("CUDA_HOME") {
        v.push(PathBuf::from(d).join("lib64"));
    }
    v.push("/usr/local/cuda/lib64".into());
    v
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// Makes libnvrtc loadable: found by the dynamic loader (LD_LIBRARY_PATH, ldconfig), or else
/// loaded by absolute path from `$OPENUNI_CUDA_DIR/nvidia/cu13/lib`, the default
/// `tools/setup_cuda.sh` folder, `$CUDA_HOME/lib64` or `/usr/local/cuda/lib64` (with its
/// builtins library first, which NVRTC opens by name). Returns whether NVRTC can be used.
pub fn nvrtc_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        // SAFETY: probing only dlopens the library by name.
        if unsafe { nv::is_culib_present() } {
            return true;
        }
        for dir in cuda_lib_dirs() {
            let lib = dir.join("libnvrtc.so.13");
            if !lib.is_file() {
                continue;
            }
            if let Ok(Some(b)) = std::fs::read_dir(&dir).map(|rd| {
                rd.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libnvrtc-builtins.so."))
                })
            }) {
                // SAFETY: loading NVIDIA's library runs no initialisers that depend on us.
                if let Ok(l) = unsafe { libloading::Library::new(&b) } {
                    std::mem::forget(l);
                }
            }
            // SAFETY: as above; kept loaded for the life of the process so cudarc finds it by soname.
            if let Ok(l) = unsafe { libloading::Library::new(&lib) } {
                std::mem::forget(l);
                if unsafe { nv::is_culib_present() } {
                    return true;
                }
            }
        }
        false
    })
}

/// NVRTC's version, e.g. (13, 0).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: plain out-parameters.
    let r = unsafe { nv::nvrtcVersion(&mut a, &mut b) };
    check(r, "nvrtcVersion", "-")?;
    Ok((a, b))
}

/// CUDA's own headers (cuda_bf16.h, ...): `$CUDA_INCLUDE_DIRS` (colon-separated), else the
/// `tools/setup_cuda.sh` folder when present, else `/usr/local/cuda/include` and its `cccl`.
pub fn cuda_include_dirs() -> Vec<PathBuf> {
    if let Ok(s) = std::env::var("CUDA_INCLUDE_DIRS") {
        let v: Vec<PathBuf> = s
            .split(':')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        if !v.is_empty() {
            return v;
        }
    }
    let mut roots = vec![];
    if let Ok(d) = std::env::var("OPENUNI_CUDA_DIR") {
        roots.push(PathBuf::from(d).join("nvidia/cu13/include"));
    }
    if let Some(h) = home() {
        roots.push(h.join(".cache/openuni/cuda-13.0.2/nvidia/cu13/include"));
    }
    if let Ok(d) = std::env::var("CUDA_HOME") {
        roots.push(PathBuf::from(d).join("include"));
    }
    for r in roots {
        if r.join("cuda_bf16.h").is_file() {
            return vec![r.join("cccl"), r].into_iter().rev().collect();
        }
    }
    vec![
        "/usr/local/cuda/include".into(),
        "/usr/local/cuda/include/cccl".into(),
    ]
}

/// The kernel cache folder: `$OPENUNI_KERNEL_CACHE` (`off` disables the cache), else
/// `$XDG_CACHE_HOME/openuni/kernels`, else `~/.cache/openuni/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var("OPENUNI_KERNEL_CACHE") {
        Ok(s) if s == "off" || s == "0" => return None,
        Ok(s) if !s.is_empty() => return Some(PathBuf::from(s)),
        _ => {}
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("openuni/kernels"));
    }
    home().map(|h| h.join(".cache/openuni/kernels"))
}

/// One compiled `.cu` file.
#[derive(Clone, Debug)]
pub struct CompiledModule {
    pub file: String,
    pub target: KernelTarget,
    /// CUBIN bytes, or PTX text (without a trailing NUL).
    pub image: Vec<u8>,
    /// NVRTC's program log (the ptxas report for CUBIN).
    pub log: String,
    pub resources: Vec<KernelResources>,
    pub from_cache: bool,
}

/// Options beyond the target.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub target: KernelTarget,
    /// Read and write the disk cache.
    pub use_cache: bool,
    /// The cache folder; `None`: [`cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Extra NVRTC options (e.g. `-DFOO=1`).
    pub extra: Vec<String>,
}

impl CompileOptions {
    pub fn new(target: KernelTarget) -> CompileOptions {
        CompileOptions {
            target,
            use_cache: true,
            cache_dir: None,
            extra: vec![],
        }
    }

    fn nvrtc_options(&self) -> Vec<String> {
        let mut o = vec![
            format!("--gpu-architecture={}", self.target.nvrtc_arch()),
            "--std=c++17".to_string(),
            "--generate-line-info".to_string(),
        ];
        if self.target.format == KernelFormat::Cubin {
            o.push("--ptxas-options=-v".into());
        }
        for d in cuda_include_dirs() {
            o.push(format!("--include-path={}", d.display()));
        }
        o.extend(self.extra.iter().cloned());
        o
    }
}

fn check(r: nv::nvrtcResult, call: &'static str, file: &str) -> Result<()> {
    if r == nv::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: nvrtcGetErrorString returns a static string.
    let code = unsafe { CStr::from_ptr(nv::nvrtcGetErrorString(r)) }
        .to_string_lossy()
        .into_owned();
    Err(CudaError::Nvrtc {
        file: file.into(),
        call,
        code,
    })
}

struct Program(nv::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed once.
        unsafe { nv::nvrtcDestroyProgram(&mut self.0) };
    }
}

fn cache_key(
    file: &str,
    source: &str,
    headers: &[(&str, &str)],
    options: &[String],
    version: (i32, i32),
) -> String {
    let mut h = Sha256::new();
    h.update(b"openuni-kernel-cache-v1\0");
    h.update(format!("nvrtc {}.{}\0", version.0, version.1));
    h.update(file.as_bytes());
    h.update(b"\0");
    h.update(source.as_bytes());
    h.update(b"\0");
    let mut hs: Vec<_> = headers.to_vec();
    hs.sort();
    for (n, c) in hs {
        h.update(n.as_bytes());
        h.update(b"\0");
        h.update(c.as_bytes());
        h.update(b"\0");
    }
    for o in options {
        h.update(o.as_bytes());
        h.update(b"\0");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Compiles one `.cu` file. `headers` are given to NVRTC as in-memory headers (our
/// `kernels/include/*.cuh`, included as `#include "common.cuh"`); CUDA's own headers come from
/// [`cuda_include_dirs`]. With `use_cache`, a previous result with the same key is reused and a
/// new one is stored (a cache that cannot be written is not an error).
pub fn compile(
    file: &str,
    source: &str,
    headers: &[(&str, &str)],
    opts: &CompileOptions,
) -> Result<CompiledModule> {
    let version = nvrtc_version()?;
    let options = opts.nvrtc_options();
    let ext = opts.target.format.name();
    let stem = file.strip_suffix(".cu").unwrap_or(file);
    let cached = if opts.use_cache {
        opts.cache_dir.clone().or_else(cache_dir).map(|d| {
            let key = cache_key(file, source, headers, &options, version);
            d.join(format!(
                "{stem}-{}-{}.{ext}",
                opts.target.nvrtc_arch(),
                &key[..32]
            ))
        })
    } else {
        None
    };
    if let Some(p) = &cached {
        if let Ok(image) = std::fs::read(p) {
            let log =
                std::fs::read_to_string(p.with_extension(format!("{ext}.log"))).unwrap_or_default();
            let resources = parse_ptxas_log(&log);
            return Ok(CompiledModule {
                file: file.into(),
                target: opts.target.clone(),
                image,
                log,
                resources,
                from_cache: true,
            });
        }
    }

    let c = |s: &str, what: &str| {
        CString::new(s).map_err(|_| CudaError::Invalid {
            what: format!("{file}: {what}"),
            msg: "contains a NUL byte".into(),
        })
    };
    let src = c(source, "source")?;
    let name = c(file, "file name")?;
    let hsrc: Vec<CString> = headers
        .iter()
        .map(|(_, s)| c(s, "header"))
        .collect::<Result<_>>()?;
    let hname: Vec<CString> = headers
        .iter()
        .map(|(n, _)| c(n, "header name"))
        .collect::<Result<_>>()?;
    let hsrc_p: Vec<*const c_char> = hsrc.iter().map(|s| s.as_ptr()).collect();
    let hname_p: Vec<*const c_char> = hname.iter().map(|s| s.as_ptr()).collect();
    let copts: Vec<CString> = options
        .iter()
        .map(|o| c(o, "option"))
        .collect::<Result<_>>()?;
    let opt_p: Vec<*const c_char> = copts.iter().map(|s| s.as_ptr()).collect();

    let mut prog: nv::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live NUL-terminated string; counts match the arrays.
    check(
        unsafe {
            nv::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                headers.len() as i32,
                hsrc_p.as_ptr(),
                hname_p.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
        file,
    )?;
    let prog = Program(prog);
    // SAFETY: a live program and live option strings.
    let r = unsafe { nv::nvrtcCompileProgram(prog.0, opt_p.len() as i32, opt_p.as_ptr()) };
    let log = {
        let mut n = 0usize;
        // SAFETY: size query then a buffer of that size.
        unsafe { nv::nvrtcGetProgramLogSize(prog.0, &mut n) };
        let mut buf = vec![0u8; n.max(1)];
        unsafe { nv::nvrtcGetProgramLog(prog.0, buf.as_mut_ptr() as *mut c_char) };
        String::from_utf8_lossy(buf.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
    };
    if r != nv::nvrtcResult::NVRTC_SUCCESS {
        let mut log = log;
        if log.contains("cuda_bf16.h") || log.contains("cannot open source file") {
            log.push_str(&format!(
                "\n(CUDA headers searched in: {}; set CUDA_INCLUDE_DIRS, e.g. with `eval \"$(bash tools/setup_cuda.sh)\"`)",
                cuda_include_dirs().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":")
            ));
        }
        return Err(CudaError::Compile {
            file: file.into(),
            arch: opts.target.nvrtc_arch(),
            log,
        });
    }
    let image = match opts.target.format {
        KernelFormat::Cubin => {
            let mut n = 0usize;
            // SAFETY: size query then a buffer of that size.
            check(
                unsafe { nv::nvrtcGetCUBINSize(prog.0, &mut n) },
                "nvrtcGetCUBINSize",
                file,
            )?;
            let mut buf = vec![0u8; n];
            check(
                unsafe { nv::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr() as *mut c_char) },
                "nvrtcGetCUBIN",
                file,
            )?;
            buf
        }
        KernelFormat::Ptx => {
            let mut n = 0usize;
            // SAFETY: as above.
            check(
                unsafe { nv::nvrtcGetPTXSize(prog.0, &mut n) },
                "nvrtcGetPTXSize",
                file,
            )?;
            let mut buf = vec![0u8; n];
            check(
                unsafe { nv::nvrtcGetPTX(prog.0, buf.as_mut_ptr() as *mut c_char) },
                "nvrtcGetPTX",
                file,
            )?;
            while buf.last() == Some(&0) {
                buf.pop();
            }
            buf
        }
    };
    if let Some(p) = &cached {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = write_atomic(&p.with_extension(format!("{ext}.log")), log.as_bytes());
        let _ = write_atomic(p, &image);
    }
    let resources = parse_ptxas_log(&log);
    Ok(CompiledModule {
        file: file.into(),
        target: opts.target.clone(),
        image,
        log,
        resources,
        from_cache: false,
    })
}

/// The `extern "C" __global__` entry points defined in a `.cu` source, in order of appearance
/// (a plain text scan: `extern "C" __global__ void NAME(` or `extern "C" __global__ void
/// __launch_bounds__(..) NAME(`, also when written through a macro
/// that the scan cannot see into; such kernels are found from the PTX instead, see
/// [`ptx_entries`]).
pub fn entry_points(source: &str) -> Vec<String> {
    let mut v = vec![];
    let mut rest = source;
    while let Some(i) = rest.find("__global__") {
        let after = &rest[i + "__global__".len()..];
        let before = &rest[..i];
        rest = after;
        // Must follow `extern "C"` on the same line (ignore mentions in comments).
        let line_start = before.rfind('\n').map_or(0, |p| p + 1);
        let prefix = &before[line_start..];
        if !prefix.contains("extern \"C\"") || prefix.contains("//") || prefix.contains('#') {
            continue;
        }
        let t = after.trim_start();
        let Some(t) = t.strip_prefix("void") else {
            continue;
        };
        let mut t = t.trim_start();
        // An occupancy hint between the return type and the name: `__launch_bounds__(256, 2)`.
        if let Some(b) = t.strip_prefix("__launch_bounds__") {
            let Some(close) = b.find(')') else { continue };
            t = b[close + 1..].trim_start();
        }
        let name: String = t
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && t[name.len()..].trim_start().starts_with('(') {
            v.push(name);
        }
    }
    v
}

/// The `.entry` names in PTX text.
pub fn ptx_entries(ptx: &str) -> Vec<String> {
    ptx.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l
                .strip_prefix(".visible .entry ")
                .or_else(|| l.strip_prefix(".entry "))?;
            Some(
                rest.split(|c: char| c == '(' || c.is_whitespace())
                    .next()?
                    .to_string(),
            )
        })
        .collect()
}
