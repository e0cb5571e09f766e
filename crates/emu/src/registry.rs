//! The kernels compiled for the CPU by build.rs: one descriptor per `extern "C" __global__` function.

use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_void, CStr};
use std::sync::OnceLock;

/// What every launch says when the crate was built without the CUDA headers.
pub const NO_KERNELS_MSG: &str =
    "the emulated GPU was built without kernels because the CUDA headers were not \
found at build time; run `eval \"$(bash tools/setup_cuda.sh)\"` and rebuild (tools/build_emu.sh)";

#[repr(C)]
struct RawKernel {
    name: *const c_char,
    nparams: u32,
    sizes: *const u32,
    aligns: *const u32,
    launch: Option<unsafe extern "C" fn(*mut *mut c_void)>,
}

#[repr(C)]
struct RawGlobal {
    name: *const c_char,
    addr: *mut c_void,
    size: usize,
}

#[repr(C)]
struct RawTu {
    path: *const c_char,
    kernels: *const RawKernel,
    nkernels: u32,
    globals: *const RawGlobal,
    nglobals: u32,
}

#[cfg(not(openuni_emu_no_kernels))]
extern "C" {
    static openuni_emu_tus: [*const RawTu; 1];
    static openuni_emu_ntus: c_uint;
}

/// A kernel compiled for the CPU.
pub struct Kernel {
    pub name: &'static str,
    /// The `.cu` file it was compiled from.
    pub file: &'static str,
    pub param_sizes: &'static [u32],
    pub param_aligns: &'static [u32],
    pub(crate) launch: unsafe extern "C" fn(*mut *mut c_void),
    /// Index of its translation unit (globals are looked up in the same one first).
    pub tu: usize,
}

/// A `__constant__` variable at namespace scope.
pub struct Global {
    pub name: &'static str,
    pub addr: *mut u8,
    pub size: usize,
    pub tu: usize,
}

unsafe impl Send for Global {}
unsafe impl Sync for Global {}

pub struct Registry {
    pub kernels: Vec<Kernel>,
    pub globals: Vec<Global>,
    by_name: HashMap<&'static str, usize>,
}

impl Registry {
    pub fn find(&self, name: &str) -> Option<&Kernel> {
        self.by_name.get(name).map(|&i| &self.kernels[i])
    }
    /// A global by name, preferring the translation unit `tu`.
    pub fn global(&self, name: &str, tu: Option<usize>) -> Option<&Global> {
        let mut it = self.globals.iter().filter(|g| g.name == name);
        match tu {
            Some(t) => self
                .globals
                .iter()
                .find(|g| g.name == name && g.tu == t)
                .or_else(|| it.next()),
            None => it.next(),
        }
    }
}

unsafe fn cstr(p: *const c_char) -> &'static str {
    if p.is_null() {
        ""
    } else {
        CStr::from_ptr(p).to_str().unwrap_or("?")
    }
}

/// True when build.rs compiled the kernels (the CUDA headers were there).
pub fn kernels_compiled() -> bool {
    !cfg!(openuni_emu_no_kernels)
}

pub fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let mut reg = Registry {
            kernels: Vec::new(),
            globals: Vec::new(),
            by_name: HashMap::new(),
        };
        #[cfg(not(openuni_emu_no_kernels))]
        unsafe {
            let tus = std::ptr::addr_of!(openuni_emu_tus) as *const *const RawTu;
            for t in 0..openuni_emu_ntus as usize {
                let tu = &**tus.add(t);
                let file = cstr(tu.path);
                for k in 0..tu.nkernels as usize {
                    let raw = &*tu.kernels.add(k);
                    let n = raw.nparams as usize;
                    let kernel = Kernel {
                        name: cstr(raw.name),
                        file,
                        param_sizes: std::slice::from_raw_parts(raw.sizes, n),
                        param_aligns: std::slice::from_raw_parts(raw.aligns, n),
                        launch: raw.launch.expect("kernel descriptor without launcher"),
                        tu: t,
                    };
                    reg.by_name.insert(kernel.name, reg.kernels.len());
                    reg.kernels.push(kernel);
                }
                for g in 0..tu.nglobals as usize {
                    let raw = &*tu.globals.add(g);
                    reg.globals.push(Global {
                        name: cstr(raw.name),
                        addr: raw.addr as *mut u8,
                        size: raw.size,
                        tu: t,
                    });
                }
            }
        }
        reg
    })
}

/// The CPU-compiled kernel of that name.
pub fn find(name: &str) -> Option<&'static Kernel> {
    registry().find(name)
}
