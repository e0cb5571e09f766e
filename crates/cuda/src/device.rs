//! The device: a CUDA context, one stream, the kernel registry, and per-device singletons of the
//! modules above it (cuBLASLt: `crate::gemm`).
//!
//! Only standard driver calls are made (through cudarc), so the emulated GPU's `libcuda.so.1`
//! (crates/emu) runs this code unchanged. cudarc's per-buffer event tracking is switched off: the
//! backend uses one stream, raw device pointers into one arena, and CUDA-graph capture, where
//! cudarc's extra event records and waits would only get in the way.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};

use crate::error::{CudaError, DriverContext, Result};
use crate::kernels::KernelSet;
use crate::nvrtc::{KernelFormat, KernelTarget};

/// What `cuDeviceGetName` of the emulated GPU (crates/emu) contains, compared case-insensitively
/// (it reports e.g. "NVIDIA H100 80GB HBM3 (openuni emulated GPU)").
pub const EMULATED_DEVICE_NAME: &str = "openuni emulated gpu";

/// Whether a device name is the emulated GPU's.
pub fn is_emulated_name(name: &str) -> bool {
    name.to_ascii_lowercase().contains(EMULATED_DEVICE_NAME)
}

/// Whether a CUDA driver library (`libcuda.so.1`, real or emulated) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by name.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Number of CUDA devices; an error when there is no driver or `cuInit` fails.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    result::init().map_err(|e| CudaError::NoDevice {
        ordinal: 0,
        msg: format!("cuInit failed: {e}"),
    })?;
    let n = result::device::get_count().ctx(|| "counting devices".into())?;
    Ok(n.max(0) as usize)
}

/// True when a CUDA device (real or emulated) can be used. Never panics; cached.
pub fn device_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        std::panic::catch_unwind(|| device_count().map(|n| n > 0).unwrap_or(false)).unwrap_or(false)
    })
}

/// Loads a library by absolute path and keeps it loaded, so that cudarc's later load by name
/// (`libcuda.so.1`, `libcublasLt.so.13`, `libnvrtc.so.13`) finds this one: how a `--device emu`
/// flag selects the emulated driver without LD_LIBRARY_PATH. Call before any other CUDA call.
pub fn preload_library(path: &std::path::Path) -> Result<()> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading a shared library runs its initialisers; the caller names a CUDA library.
    let lib = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| {
        CudaError::Io {
            path: path.into(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    std::mem::forget(lib);
    Ok(())
}

/// Host<->device bytes counted by the emulated driver (crates/emu, `openuni_emu_traffic`), as
/// (host->device, device->host) since it was loaded or last [`reset_emu_traffic`]; `None` when the
/// loaded driver is not the emulated one (a real GPU's driver counts nothing). Memsets and
/// device->device copies are not counted.
pub fn emu_traffic() -> Option<(u64, u64)> {
    let f = emu_symbol::<unsafe extern "C" fn(*mut u64, *mut u64)>(b"openuni_emu_traffic\0")?;
    let (mut htod, mut dtoh) = (0u64, 0u64);
    // SAFETY: the emulated driver's exported reader writes two u64s through valid pointers.
    unsafe { f(&mut htod, &mut dtoh) };
    Some((htod, dtoh))
}

/// Sets the emulated driver's traffic counters to zero; false when the driver is not the emulated one.
pub fn reset_emu_traffic() -> bool {
    match emu_symbol::<unsafe extern "C" fn()>(b"openuni_emu_traffic_reset\0") {
        // SAFETY: the emulated driver's exported reset takes nothing and stores two atomics.
        Some(f) => {
            unsafe { f() };
            true
        }
        None => false,
    }
}

/// A symbol of the already-loaded `libcuda.so.1` (never loads it): through the handle of the
/// library cudarc loaded (RTLD_NOLOAD), else the process's global scope (`preload_library`).
fn emu_symbol<T: Copy>(name: &[u8]) -> Option<T> {
    use libloading::os::unix::{Library, RTLD_NOW};
    const RTLD_NOLOAD: std::ffi::c_int = 4; // glibc's value (dlfcn.h)
                                            // SAFETY: RTLD_NOLOAD only returns a handle to a library that is already loaded (no
                                            // initialisers run); the symbol's type is the one the emulated driver exports.
    unsafe {
        let lib = Library::open(Some("libcuda.so.1"), RTLD_NOW | RTLD_NOLOAD)
            .or_else(|_| Ok::<_, ()>(Library::this()))
            .ok()?;
        let f = lib.get::<T>(name).ok().map(|s| *s);
        // Keep the reference count balanced without unloading: the library stays loaded by cudarc.
        drop(lib);
        f
    }
}

/// A kernel argument: a device pointer (0 for "absent"), an integer, a float, or a TMA tensor map
/// passed by value (`const __grid_constant__ ou::TensorMap`, crate::tma).
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    Ptr(u64),
    I64(i64),
    I32(i32),
    F32(f32),
    TensorMap(crate::tma::TensorMap),
}

/// Dynamic shared memory a kernel may use without opting in (`cuFuncSetAttribute`).
const DEFAULT_DYNAMIC_SMEM: u32 = 48 * 1024;

/// An open device.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    name: String,
    cc: (i32, i32),
    sm_count: u32,
    emulated: bool,
    kernels: KernelSet,
    /// One instance per type of what the modules above the device keep per device handle
    /// (cuBLASLt's handle and workspace, `crate::gemm`), created on first use, dropped with the
    /// device: the device does not depend on them.
    singletons: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaDevice({} #{}, sm_{}{}, {})",
            self.name,
            self.ordinal,
            self.cc.0,
            self.cc.1,
            self.kernels.target().image_name()
        )
    }
}

/// The kernel target for a device: `$OPENUNI_KERNEL_FORMAT` (`ptx` | `cubin`) and
/// `$OPENUNI_KERNEL_ARCH` (e.g. `sm_90a`) override; otherwise PTX on the emulated GPU and CUBIN
/// for the device's own architecture on a real one.
pub fn default_target(cc: (i32, i32), emulated: bool) -> Result<KernelTarget> {
    let format = match std::env::var("OPENUNI_KERNEL_FORMAT") {
        Ok(s) if !s.is_empty() => KernelFormat::parse(&s).ok_or_else(|| CudaError::Invalid {
            what: "OPENUNI_KERNEL_FORMAT".into(),
            msg: format!("`{s}` is neither `ptx` nor `cubin`"),
        })?,
        _ if emulated => KernelFormat::Ptx,
        _ => KernelFormat::Cubin,
    };
    let arch = match std::env::var("OPENUNI_KERNEL_ARCH") {
        Ok(s) if !s.is_empty() => s,
        _ => KernelTarget::arch_for(cc),
    };
    Ok(KernelTarget::new(arch, format))
}

impl CudaDevice {
    /// Opens device `ordinal` with the [`default_target`]. A missing driver, no device or a
    /// failing driver call is an `Err`, never a panic.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        CudaDevice::open_with(ordinal, None)
    }

    /// Opens device `ordinal`, compiling kernels for `target` when given.
    pub fn open_with(ordinal: usize, target: Option<KernelTarget>) -> Result<Arc<CudaDevice>> {
        match std::panic::catch_unwind(|| CudaDevice::open_inner(ordinal, target)) {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic in the CUDA driver bindings".into());
                Err(CudaError::NoDevice { ordinal, msg })
            }
        }
    }

    fn open_inner(ordinal: usize, target: Option<KernelTarget>) -> Result<Arc<CudaDevice>> {
        let n = device_count()?;
        if ordinal >= n {
            return Err(CudaError::NoDevice {
                ordinal,
                msg: format!("{n} CUDA device(s) present"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaError::NoDevice {
            ordinal,
            msg: e.to_string(),
        })?;
        // SAFETY: the backend orders all work on its one stream itself (see the module comment).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().ctx(|| "creating the stream".into())?;
        let name = ctx.name().ctx(|| "reading the device name".into())?;
        let cc = ctx
            .compute_capability()
            .ctx(|| "reading the compute capability".into())?;
        let sm_count = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .ctx(|| "reading the SM count".into())?
            .max(1) as u32;
        let emulated = is_emulated_name(&name);
        let target = match target {
            Some(t) => t,
            None => default_target(cc, emulated)?,
        };
        let kernels = KernelSet::new(ctx.clone(), target);
        Ok(Arc::new(CudaDevice {
            ctx,
            stream,
            ordinal,
            name,
            cc,
            sm_count,
            emulated,
            kernels,
            singletons: Mutex::default(),
        }))
    }

    /// Another handle on the same device and context with its own stream, cuBLASLt workspace and
    /// loaded kernels, so that work enqueued on it can run concurrently with this handle's (the
    /// next batch's conditioning beside the current batch's denoising). Device memory is shared;
    /// nothing orders work between lanes, so a value made on one lane must reach another through
    /// a synchronizing copy.
    pub fn lane(&self) -> Result<Arc<CudaDevice>> {
        let stream = self
            .ctx
            .new_stream()
            .ctx(|| "creating a second stream".into())?;
        Ok(Arc::new(CudaDevice {
            ctx: self.ctx.clone(),
            stream,
            ordinal: self.ordinal,
            name: self.name.clone(),
            cc: self.cc,
            sm_count: self.sm_count,
            emulated: self.emulated,
            kernels: KernelSet::new(self.ctx.clone(), self.kernels.target().clone()),
            singletons: Mutex::default(),
        }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn is_emulated(&self) -> bool {
        self.emulated
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The one stream every kernel, copy and GEMM of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn kernels(&self) -> &KernelSet {
        &self.kernels
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().ctx(|| "reading memory info".into())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .ctx(|| "synchronizing the stream".into())
    }

    /// This handle's instance of `T`, made by `make` on first use (see `singletons`).
    pub(crate) fn singleton<T: Any + Send + Sync>(
        &self,
        make: impl FnOnce(&CudaDevice) -> Result<T>,
    ) -> Result<Arc<T>> {
        let mut m = self.singletons.lock().unwrap();
        if let Some(v) = m.get(&TypeId::of::<T>()) {
            return Ok(v.clone().downcast::<T>().expect("keyed by its type"));
        }
        let v = Arc::new(make(self)?);
        m.insert(TypeId::of::<T>(), v.clone());
        Ok(v)
    }

    /// Allocates `bytes` (at least 1) of device memory, 256-byte aligned, contents undefined.
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        // SAFETY: u8 has no invalid bit patterns; the memory is written before it is read.
        let slice =
            unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|err| CudaError::Driver {
                what: format!("allocating {bytes} bytes of device memory"),
                err,
            })?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(DeviceBuffer {
            _slice: slice,
            ptr,
            bytes,
        })
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DeviceBuffer> {
        let b = self.alloc(std::mem::size_of_val(data))?;
        self.copy_to_device(data, b.ptr())?;
        Ok(b)
    }

    /// Copies host data to device address `dst` (stream-ordered).
    pub fn copy_to_device<T: bytemuck::Pod>(&self, data: &[T], dst: u64) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .ctx(|| "binding the context".into())?;
        // SAFETY: the caller owns `dst` for size_of_val(data) bytes; pageable source memory is
        // staged by the driver before the call returns.
        unsafe { result::memcpy_htod_async(dst, data, self.stream.cu_stream()) }.ctx(|| {
            format!(
                "copying {} bytes to the device",
                std::mem::size_of_val(data)
            )
        })
    }

    /// Copies `out.len()` elements from device address `src` into `out`, and waits for the copy.
    pub fn copy_to_host<T: bytemuck::Pod>(&self, src: u64, out: &mut [T]) -> Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .ctx(|| "binding the context".into())?;
        let n = std::mem::size_of_val(out);
        // SAFETY: the caller guarantees `src` holds n readable bytes.
        unsafe { result::memcpy_dtoh_async(out, src, self.stream.cu_stream()) }
            .ctx(|| format!("copying {n} bytes to the host"))?;
        self.synchronize()
    }

    /// Device-to-device copy (stream-ordered).
    pub fn copy_on_device(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .ctx(|| "binding the context".into())?;
        // SAFETY: the caller owns both ranges.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .ctx(|| format!("copying {bytes} bytes on the device"))
    }

    /// Sets `bytes` bytes at `dst` to `value` (0xFF poisons f32 and bf16 data with NaN).
    pub fn fill_bytes(&self, dst: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .ctx(|| "binding the context".into())?;
        // SAFETY: the caller owns the range.
        unsafe { result::memset_d8_async(dst, value, bytes, self.stream.cu_stream()) }
            .ctx(|| format!("filling {bytes} bytes on the device"))
    }

    /// An event that records time (for [`CudaEvent::elapsed_ms`]).
    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .ctx(|| "creating an event".into())
    }

    /// Records `event` on the device's stream.
    pub fn record(&self, event: &CudaEvent) -> Result<()> {
        event
            .record(&self.stream)
            .ctx(|| "recording an event".into())
    }

    /// Launches kernel `kernel` (from any `kernels/*.cu`) on the device's stream.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, order and types, and every
    /// pointer must be valid for what the kernel reads and writes with these arguments.
    pub unsafe fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        args: &[KArg],
    ) -> Result<()> {
        let f = self.kernels.function(kernel)?;
        if smem > DEFAULT_DYNAMIC_SMEM {
            // Above 48 KiB a kernel must opt in to its dynamic shared memory (a host-side attribute,
            // so it also holds for launches recorded into a CUDA graph).
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .ctx(|| format!("allowing kernel `{kernel}` {smem} bytes of dynamic shared memory"))?;
        }
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                KArg::Ptr(p) => b.arg(p),
                KArg::I64(v) => b.arg(v),
                KArg::I32(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
                KArg::TensorMap(m) => b.arg(m),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem,
        };
        b.launch(cfg).map(|_| ()).map_err(|err| CudaError::Launch {
            kernel: kernel.into(),
            err,
        })
    }
}

/// Device memory owned by the backend, addressed by raw pointer (the arena, weights, staging).
pub struct DeviceBuffer {
    /// Owns the allocation (freed on drop, stream-ordered).
    _slice: CudaSlice<u8>,
    ptr: u64,
    bytes: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuffer({:#x}, {} bytes)", self.ptr, self.bytes)
    }
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes as requested.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The address `offset` bytes in; an error past the end.
    pub fn at(&self, offset: usize) -> Result<u64> {
        if offset > self.bytes {
            return Err(CudaError::Invalid {
                what: "device buffer".into(),
                msg: format!("offset {offset} past its {} bytes", self.bytes),
            });
        }
        Ok(self.ptr + offset as u64)
    }
}
