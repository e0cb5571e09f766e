//! The CUDA driver API on the CPU: the symbols cudarc 0.19 calls, exported from the cdylib that
//! tools/build_emu.sh installs as `libcuda.so.1`.
//!
//! Device memory is host memory. Each allocation is its own mapping: page-aligned start, the bytes past
//! the end up to the page boundary (at least 256) are a redzone filled with a canary, and PROT_NONE guard
//! pages sit on both sides. Fresh memory is filled with 0xFF (NaN). Copies are checked against the
//! allocation table (CUDA_ERROR_INVALID_VALUE outside an allocation). After each launch the redzones of the
//! allocations the kernel's pointer arguments point into are checked: a kernel that wrote past the end of
//! a buffer fails with CUDA_ERROR_ILLEGAL_ADDRESS (700), naming the allocation and the offset. Writes that
//! go beyond the redzone hit a guard page and crash the process (SIGSEGV) instead of corrupting memory.
//!
//! Every executed copy is counted by direction (host->device, device->host; memsets and device->device
//! copies are not traffic): `openuni_emu_traffic` reads the counters, `openuni_emu_traffic_reset` zeroes
//! them (non-CUDA exports, resolved with dlsym by `openuni_cuda::emu_traffic`).
//!
//! Everything runs synchronously on the calling thread (plus the block workers): streams only matter for
//! graph capture, events time with the host clock. Launch failures (700, 710, 715, 716, 719) are sticky, as
//! on a GPU: every later call returns the same error (set OPENUNI_EMU_STICKY=0 to turn that off).

#![allow(non_snake_case, clippy::missing_safety_doc)]

use crate::fiber::{self, LaunchConfig, LaunchOptions};
use crate::registry::{self, Kernel};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

pub type CUresult = c_uint;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type Handle = *mut c_void;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_IMAGE: CUresult = 200;
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
pub const CUDA_ERROR_FILE_NOT_FOUND: CUresult = 301;
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
pub const CUDA_ERROR_ILLEGAL_STATE: CUresult = 401;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CUresult = 700;
pub const CUDA_ERROR_LAUNCH_FAILED: CUresult = 719;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
pub const CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: CUresult = 900;
pub const CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: CUresult = 901;

const PAGE: usize = 4096;
const MIN_REDZONE: usize = 256;
const CANARY: u8 = 0xA5;
const DEFAULT_DYN_SMEM: usize = 48 * 1024;
const MAX_SMEM_OPTIN: usize = 227 * 1024;
const DEFAULT_MEMORY: usize = 80 << 30;

// ---- global state ------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum MemKind {
    Device,
    Host,
    Global,
}

#[derive(Clone, Copy, Debug)]
struct Alloc {
    size: usize,
    map_base: usize,
    map_len: usize,
    kind: MemKind,
}

pub(crate) struct Function {
    pub(crate) kernel: &'static Kernel,
    static_smem: usize,
    max_dyn_smem: usize,
}

struct Module {
    functions: HashMap<String, Box<Function>>,
    globals: HashSet<String>,
    tu: Option<usize>,
}

#[derive(Clone)]
pub(crate) enum Node {
    Kernel {
        func: usize,
        cfg: LaunchConfig,
        args: Arc<Vec<u8>>,
        offsets: Arc<Vec<usize>>,
    },
    Copy {
        dst: usize,
        src: usize,
        n: usize,
    },
    Memset {
        dst: usize,
        value: u32,
        elem: usize,
        count: usize,
    },
    Host(Arc<dyn Fn() -> CUresult + Send + Sync>),
}

struct Capture {
    nodes: Vec<Node>,
    invalidated: bool,
    global_mode: bool,
}

struct Stream {
    capture: Option<Capture>,
}

struct Event {
    flags: c_uint,
    recorded: Option<Instant>,
}

struct Graph {
    nodes: Vec<Node>,
}

struct State {
    initialized: bool,
    allocs: BTreeMap<usize, Alloc>,
    used: usize,
    cap: usize,
    modules: HashSet<usize>,
    functions: HashSet<usize>,
    streams: HashSet<usize>,
    events: HashSet<usize>,
    graphs: HashSet<usize>,
    execs: HashSet<usize>,
    /// A sticky launch error per device.
    sticky: [Option<CUresult>; MAX_DEVICES],
    ctx_refs: usize,
}

unsafe impl Send for State {}

fn state() -> MutexGuard<'static, State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| {
        Mutex::new(State {
            initialized: false,
            allocs: BTreeMap::new(),
            used: 0,
            cap: memory_cap(),
            modules: HashSet::new(),
            functions: HashSet::new(),
            streams: HashSet::new(),
            events: HashSet::new(),
            graphs: HashSet::new(),
            execs: HashSet::new(),
            sticky: [None; MAX_DEVICES],
            ctx_refs: 0,
        })
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

/// OPENUNI_EMU_MEMORY, e.g. `2GiB`, `512MiB`, `1G`, `1000000`; default 80 GiB (an H100).
fn memory_cap() -> usize {
    match std::env::var("OPENUNI_EMU_MEMORY") {
        Ok(s) => parse_size(&s).unwrap_or_else(|| {
            eprintln!("openuni-emu: cannot parse OPENUNI_EMU_MEMORY={s:?}; using 80GiB");
            DEFAULT_MEMORY
        }),
        Err(_) => DEFAULT_MEMORY,
    }
}

pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let mul: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((v * mul) as usize)
}

thread_local! {
    static CURRENT_CTX: Cell<usize> = const { Cell::new(0) };
}

/// The most emulated devices (`OPENUNI_EMU_DEVICES`).
pub const MAX_DEVICES: usize = 16;

/// OPENUNI_EMU_DEVICES: how many devices the driver reports (1..=16, default 1). They share one
/// memory pool (`OPENUNI_EMU_MEMORY`) and the kernel workers; each has its own primary context and
/// its own sticky launch error, so a failure on one leaves the others usable, as on real GPUs.
pub fn device_count() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| match std::env::var("OPENUNI_EMU_DEVICES") {
        Ok(s) => match s.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_DEVICES).contains(&n) => n,
            _ => {
                eprintln!("openuni-emu: OPENUNI_EMU_DEVICES={s:?} is not a number in 1..={MAX_DEVICES}; using 1");
                1
            }
        },
        Err(_) => 1,
    })
}

fn valid_device(dev: CUdevice) -> bool {
    dev >= 0 && (dev as usize) < device_count()
}

/// The primary context of device `ordinal` (an address that identifies it).
fn primary_ctx(ordinal: usize) -> usize {
    static CTX: [u64; MAX_DEVICES] = [0x0C0C_0C0C; MAX_DEVICES];
    &CTX[ordinal.min(MAX_DEVICES - 1)] as *const u64 as usize
}

/// The device whose primary context `ctx` is.
fn ctx_ordinal(ctx: usize) -> Option<usize> {
    (0..device_count()).find(|&d| primary_ctx(d) == ctx)
}

/// The device of the calling thread's current context (0 when none is current).
fn current_device() -> usize {
    ctx_ordinal(CURRENT_CTX.with(|c| c.get())).unwrap_or(0)
}

/// OPENUNI_EMU_FAIL_DEVICE=N (with OPENUNI_EMU_FAIL_AFTER=K, default 0): every kernel launch on
/// device N after its first K fails with CUDA_ERROR_LAUNCH_FAILED (sticky on that device), for
/// testing how a program survives a failing GPU.
fn injected_failure(ordinal: usize) -> Option<String> {
    static FAIL: OnceLock<Option<(usize, u64)>> = OnceLock::new();
    static LAUNCHES: [std::sync::atomic::AtomicU64; MAX_DEVICES] =
        [const { std::sync::atomic::AtomicU64::new(0) }; MAX_DEVICES];
    let (dev, after) = (*FAIL.get_or_init(|| {
        let dev = std::env::var("OPENUNI_EMU_FAIL_DEVICE")
            .ok()?
            .trim()
            .parse::<usize>()
            .ok()?;
        let after = std::env::var("OPENUNI_EMU_FAIL_AFTER")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Some((dev, after))
    }))?;
    if dev != ordinal {
        return None;
    }
    let n =
        LAUNCHES[ordinal.min(MAX_DEVICES - 1)].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    (n >= after).then(|| format!("injected failure (OPENUNI_EMU_FAIL_DEVICE={dev}, OPENUNI_EMU_FAIL_AFTER={after}): launch {} on device {dev} fails", n + 1))
}

static LAST_ERROR: Mutex<String> = Mutex::new(String::new());

fn report(code: CUresult, msg: String) -> CUresult {
    eprintln!("openuni-emu: {} ({}): {msg}", error_name(code), code);
    *LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()) = msg;
    code
}

/// The message of the last error the driver reported (deadlock thread states, out-of-bounds writes, ...).
pub fn last_error_message() -> String {
    LAST_ERROR.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn sticky_enabled() -> bool {
    static S: OnceLock<bool> = OnceLock::new();
    *S.get_or_init(|| {
        std::env::var("OPENUNI_EMU_STICKY")
            .map(|v| v != "0")
            .unwrap_or(true)
    })
}

/// Clears a sticky launch error (emulator tests only: a real process would have to restart).
pub fn reset_sticky_error() {
    state().sticky = [None; MAX_DEVICES];
}

macro_rules! check_init {
    ($st:expr) => {{
        if !$st.initialized {
            return CUDA_ERROR_NOT_INITIALIZED;
        }
        if let Some(code) = $st.sticky[current_device()] {
            return code;
        }
    }};
}

// ---- memory ---------------------------------------------------------------------------------------------

fn round_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl State {
    /// The allocation containing [p, p+n).
    fn find(&self, p: usize, n: usize) -> Option<(usize, Alloc)> {
        let (&start, a) = self.allocs.range(..=p).next_back()?;
        if p.checked_add(n)? <= start + a.size {
            Some((start, *a))
        } else {
            None
        }
    }

    fn check_range(&self, p: usize, n: usize, what: &str) -> Result<(), CUresult> {
        if n == 0 {
            return Ok(());
        }
        if self.find(p, n).is_some() {
            return Ok(());
        }
        let near = match self.allocs.range(..=p).next_back() {
            Some((&s, a)) if p < s + a.size + PAGE => format!(
                " (allocation {s:#x} has {} bytes; the range ends {} bytes past it)",
                a.size,
                p + n - (s + a.size)
            ),
            _ => String::new(),
        };
        Err(report(
            CUDA_ERROR_INVALID_VALUE,
            format!("{what}: [{p:#x}, +{n}) is not inside one device allocation{near}"),
        ))
    }

    fn alloc(&mut self, size: usize, kind: MemKind) -> Result<usize, CUresult> {
        let charged = round_up(size.max(1), 512);
        if kind == MemKind::Device && self.used + charged > self.cap {
            return Err(report(
                CUDA_ERROR_OUT_OF_MEMORY,
                format!(
                    "cannot allocate {size} bytes: {} of {} bytes in use (OPENUNI_EMU_MEMORY)",
                    self.used, self.cap
                ),
            ));
        }
        let data = round_up(size + MIN_REDZONE, PAGE);
        let map_len = data + 2 * PAGE;
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(report(
                CUDA_ERROR_OUT_OF_MEMORY,
                format!("mmap of {map_len} bytes failed"),
            ));
        }
        let p = base as usize + PAGE;
        unsafe {
            if libc::mprotect(p as *mut c_void, data, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                libc::munmap(base, map_len);
                return Err(report(CUDA_ERROR_OUT_OF_MEMORY, "mprotect failed".into()));
            }
            std::ptr::write_bytes(p as *mut u8, 0xFF, size);
            std::ptr::write_bytes((p + size) as *mut u8, CANARY, data - size);
        }
        if kind == MemKind::Device {
            self.used += charged;
        }
        self.allocs.insert(
            p,
            Alloc {
                size,
                map_base: base as usize,
                map_len,
                kind,
            },
        );
        Ok(p)
    }

    fn free(&mut self, p: usize, kind: MemKind) -> CUresult {
        match self.allocs.get(&p).copied() {
            Some(a) if a.kind == kind => {
                if let Some(msg) = redzone_damage(p, &a) {
                    // Report, but free anyway: the write happened in an earlier launch.
                    report(CUDA_ERROR_ILLEGAL_ADDRESS, format!("found at free: {msg}"));
                }
                self.allocs.remove(&p);
                if kind == MemKind::Device {
                    self.used -= round_up(a.size.max(1), 512);
                }
                unsafe { libc::munmap(a.map_base as *mut c_void, a.map_len) };
                CUDA_SUCCESS
            }
            _ => report(
                CUDA_ERROR_INVALID_VALUE,
                format!("free of {p:#x}, which is not the start of a live allocation"),
            ),
        }
    }
}

/// Checks the canary past the end of an allocation.
fn redzone_damage(p: usize, a: &Alloc) -> Option<String> {
    if a.kind != MemKind::Device {
        return None;
    }
    let end = a.map_base + a.map_len - PAGE;
    let zone = unsafe { std::slice::from_raw_parts((p + a.size) as *const u8, end - p - a.size) };
    let first = zone.iter().position(|&b| b != CANARY)?;
    let last = zone.iter().rposition(|&b| b != CANARY).unwrap();
    Some(format!(
        "out-of-bounds write past the end of allocation {p:#x} ({} bytes): bytes {}..{} after its end were written",
        a.size,
        first,
        last + 1
    ))
}

unsafe fn copy_checked(
    st: &State,
    dst: usize,
    dst_dev: bool,
    src: usize,
    src_dev: bool,
    n: usize,
) -> CUresult {
    if n == 0 {
        return CUDA_SUCCESS;
    }
    if dst_dev {
        if let Err(e) = st.check_range(dst, n, "copy destination") {
            return e;
        }
    }
    if src_dev {
        if let Err(e) = st.check_range(src, n, "copy source") {
            return e;
        }
    }
    if (!dst_dev && dst == 0) || (!src_dev && src == 0) {
        return report(
            CUDA_ERROR_INVALID_VALUE,
            "copy with a null host pointer".into(),
        );
    }
    std::ptr::copy(src as *const u8, dst as *mut u8, n);
    count_traffic(st, dst, src, n);
    CUDA_SUCCESS
}

// ---- host<->device traffic ---------------------------------------------------------------------------

/// Bytes copied host->device and device->host since load or the last `openuni_emu_traffic_reset`.
/// Every executed copy passes `copy_checked` (eager copies, async variants and graph replays), so
/// this is the one place they are counted; memsets and device->device copies are not traffic.
static TRAFFIC_HTOD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static TRAFFIC_DTOH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a copy by where its ends really live: pinned host memory (`cuMemHostAlloc`) is in the
/// allocation table but is host memory, whatever the copy entry point claimed.
fn count_traffic(st: &State, dst: usize, src: usize, n: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    let on_device = |p: usize| st.find(p, 1).is_some_and(|(_, a)| a.kind != MemKind::Host);
    match (on_device(dst), on_device(src)) {
        (true, false) => TRAFFIC_HTOD.fetch_add(n as u64, Relaxed),
        (false, true) => TRAFFIC_DTOH.fetch_add(n as u64, Relaxed),
        _ => 0,
    };
}

/// Reads the host->device and device->host byte counters (either pointer may be null). Not a CUDA
/// entry point: the Rust side resolves it with dlsym (`openuni_cuda::emu_traffic`).
#[no_mangle]
pub unsafe extern "C" fn openuni_emu_traffic(htod: *mut u64, dtoh: *mut u64) {
    use std::sync::atomic::Ordering::Relaxed;
    if !htod.is_null() {
        *htod = TRAFFIC_HTOD.load(Relaxed);
    }
    if !dtoh.is_null() {
        *dtoh = TRAFFIC_DTOH.load(Relaxed);
    }
}

/// Sets both traffic counters to zero.
#[no_mangle]
pub extern "C" fn openuni_emu_traffic_reset() {
    use std::sync::atomic::Ordering::Relaxed;
    TRAFFIC_HTOD.store(0, Relaxed);
    TRAFFIC_DTOH.store(0, Relaxed);
}

unsafe fn memset_checked(
    st: &State,
    dst: usize,
    value: u32,
    elem: usize,
    count: usize,
) -> CUresult {
    if count == 0 {
        return CUDA_SUCCESS;
    }
    if let Err(e) = st.check_range(dst, elem * count, "memset destination") {
        return e;
    }
    do_memset(dst, value, elem, count);
    CUDA_SUCCESS
}

unsafe fn do_memset(dst: usize, value: u32, elem: usize, count: usize) {
    match elem {
        1 => std::ptr::write_bytes(dst as *mut u8, value as u8, count),
        2 => std::slice::from_raw_parts_mut(dst as *mut u16, count).fill(value as u16),
        _ => std::slice::from_raw_parts_mut(dst as *mut u32, count).fill(value),
    }
}

fn stream_ok(st: &State, s: Handle) -> bool {
    s.is_null() || st.streams.contains(&(s as usize))
}

/// The capture a stream is recording into, if any.
// The Capture belongs to the stream object behind its raw handle, not to `State`: holding the
// state lock (`st`) is what serialises access to every stream, so the borrow is tied to it.
#[allow(clippy::mut_from_ref)]
fn capture_of<'a>(st: &'a State, s: Handle) -> Option<&'a mut Capture> {
    if s.is_null() || !st.streams.contains(&(s as usize)) {
        return None;
    }
    // SAFETY: `s` is a live stream of this state (checked above) and the caller holds the lock.
    unsafe { (*(s as *mut Stream)).capture.as_mut() }
}

fn any_global_capture(st: &State) -> bool {
    st.streams.iter().any(|&s| unsafe {
        (*(s as *mut Stream))
            .capture
            .as_ref()
            .map(|c| c.global_mode)
            .unwrap_or(false)
    })
}

// ---- init, device, context ---------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuInit(flags: c_uint) -> CUresult {
    if flags != 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    state().initialized = true;
    CUDA_SUCCESS
}

/// NVRTC dlopens libcuda.so.1 and asks for private export tables: say no, so it compiles on its own.
#[no_mangle]
pub unsafe extern "C" fn cuGetExportTable(
    table: *mut *const c_void,
    _id: *const c_void,
) -> CUresult {
    if !table.is_null() {
        *table = std::ptr::null();
    }
    CUDA_ERROR_NOT_SUPPORTED
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    if v.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *v = 13000;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(dev: *mut CUdevice, ordinal: c_int) -> CUresult {
    if !state().initialized {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    if dev.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !valid_device(ordinal) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    *dev = ordinal;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    if !state().initialized {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    if n.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *n = device_count() as c_int;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: CUdevice) -> CUresult {
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if name.is_null() || len <= 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let s = b"NVIDIA H100 80GB HBM3 (openuni emulated GPU)";
    let n = s.len().min(len as usize - 1);
    std::ptr::copy_nonoverlapping(s.as_ptr() as *const c_char, name, n);
    *name.add(n) = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut u8, dev: CUdevice) -> CUresult {
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if uuid.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::ptr::copy_nonoverlapping(b"openuni-emu-gpu0".as_ptr(), uuid, 16);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut u8, dev: CUdevice) -> CUresult {
    cuDeviceGetUuid_v2(uuid, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, dev: CUdevice) -> CUresult {
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if bytes.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *bytes = state().cap;
    CUDA_SUCCESS
}

/// An H100 SXM (compute capability 9.0, 132 SMs).
pub fn device_attribute(attr: c_int) -> Option<c_int> {
    Some(match attr {
        1 => 1024,              // MAX_THREADS_PER_BLOCK
        2 | 3 => 1024,          // MAX_BLOCK_DIM_X, Y
        4 => 64,                // MAX_BLOCK_DIM_Z
        5 => i32::MAX,          // MAX_GRID_DIM_X
        6 | 7 => 65535,         // MAX_GRID_DIM_Y, Z
        8 => 49152,             // MAX_SHARED_MEMORY_PER_BLOCK
        9 => 65536,             // TOTAL_CONSTANT_MEMORY
        10 => 32,               // WARP_SIZE
        11 => i32::MAX,         // MAX_PITCH
        12 => 65536,            // MAX_REGISTERS_PER_BLOCK
        13 => 1_980_000,        // CLOCK_RATE (kHz)
        14 => 512,              // TEXTURE_ALIGNMENT
        15 => 1,                // GPU_OVERLAP
        16 => 132,              // MULTIPROCESSOR_COUNT
        17 => 0,                // KERNEL_EXEC_TIMEOUT
        18 => 0,                // INTEGRATED
        19 => 1,                // CAN_MAP_HOST_MEMORY
        20 => 0,                // COMPUTE_MODE default
        30 => 512,              // SURFACE_ALIGNMENT
        31 => 1,                // CONCURRENT_KERNELS
        32 => 1,                // ECC_ENABLED
        33..=35 => 0,           // PCI bus/device, TCC
        36 => 2_619_000,        // MEMORY_CLOCK_RATE (kHz)
        37 => 5120,             // GLOBAL_MEMORY_BUS_WIDTH
        38 => 50 * 1024 * 1024, // L2_CACHE_SIZE
        39 => 2048,             // MAX_THREADS_PER_MULTIPROCESSOR
        40 => 3,                // ASYNC_ENGINE_COUNT
        41 => 1,                // UNIFIED_ADDRESSING
        50 => 0,                // PCI_DOMAIN_ID
        75 => 9,                // COMPUTE_CAPABILITY_MAJOR
        76 => 0,                // COMPUTE_CAPABILITY_MINOR
        78..=80 => 1,           // STREAM_PRIORITIES, GLOBAL_L1, LOCAL_L1
        81 => 233472,           // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        82 => 65536,            // MAX_REGISTERS_PER_MULTIPROCESSOR
        83 => 1,                // MANAGED_MEMORY
        84 | 85 => 0,           // MULTI_GPU_BOARD(_GROUP_ID)
        86 => 0,                // HOST_NATIVE_ATOMIC_SUPPORTED
        87 => 2,                // SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO
        88 => 0,                // PAGEABLE_MEMORY_ACCESS
        89..=91 => 1,
        92..=94 => 1,
        95 => 1, // COOPERATIVE_LAUNCH
        96 => 0,
        97 => 232448, // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        98 | 99 => 1,
        100 | 101 => 0,
        102 | 103 => 1,
        104 | 105 => 0,
        106 => 32, // MAX_BLOCKS_PER_MULTIPROCESSOR
        107 => 1,
        108 => 32 * 1024 * 1024,
        109 => 134_213_632,
        110 => 1,
        111 => 1024, // RESERVED_SHARED_MEMORY_PER_BLOCK
        112 | 113 | 114 => 1,
        115 => 1, // MEMORY_POOLS_SUPPORTED
        116..=119 => 0,
        120..=135 => 0,
        21..=29 | 42..=49 | 51..=74 | 77 => 0, // texture/surface limits: unused
        _ => return None,
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(
    pi: *mut c_int,
    attrib: c_int,
    dev: CUdevice,
) -> CUresult {
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if pi.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match device_attribute(attrib) {
        Some(v) => {
            *pi = v;
            CUDA_SUCCESS
        }
        None => CUDA_ERROR_INVALID_VALUE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceComputeCapability(
    major: *mut c_int,
    minor: *mut c_int,
    dev: CUdevice,
) -> CUresult {
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if major.is_null() || minor.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *major = 9;
    *minor = 0;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(pctx: *mut Handle, dev: CUdevice) -> CUresult {
    let mut st = state();
    if !st.initialized {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    if pctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    st.ctx_refs += 1;
    *pctx = primary_ctx(dev as usize) as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRelease_v2(dev: CUdevice) -> CUresult {
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    let mut st = state();
    st.ctx_refs = st.ctx_refs.saturating_sub(1);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxReset_v2(dev: CUdevice) -> CUresult {
    if !valid_device(dev) {
        return CUDA_ERROR_INVALID_DEVICE;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(pctx: *mut Handle) -> CUresult {
    if !state().initialized {
        return CUDA_ERROR_NOT_INITIALIZED;
    }
    if pctx.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pctx = CURRENT_CTX.with(|c| c.get()) as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCurrent(ctx: Handle) -> CUresult {
    if !ctx.is_null() && ctx_ordinal(ctx as usize).is_none() {
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    CURRENT_CTX.with(|c| c.set(ctx as usize));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPushCurrent_v2(ctx: Handle) -> CUresult {
    cuCtxSetCurrent(ctx)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxPopCurrent_v2(pctx: *mut Handle) -> CUresult {
    if !pctx.is_null() {
        *pctx = CURRENT_CTX.with(|c| c.get()) as Handle;
    }
    CURRENT_CTX.with(|c| c.set(0));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut CUdevice) -> CUresult {
    if dev.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let Some(ordinal) = ctx_ordinal(CURRENT_CTX.with(|c| c.get())) else {
        return CUDA_ERROR_INVALID_CONTEXT;
    };
    *dev = ordinal as CUdevice;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetApiVersion(_ctx: Handle, v: *mut c_uint) -> CUresult {
    if v.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *v = 13000;
    CUDA_SUCCESS
}

/// Extra contexts are the primary context: there is one device and everything is synchronous.
#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v4(
    pctx: *mut Handle,
    _p: *mut c_void,
    _flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    let r = cuDevicePrimaryCtxRetain(pctx, dev);
    if r == CUDA_SUCCESS {
        CURRENT_CTX.with(|c| c.set(primary_ctx(dev as usize)));
    }
    r
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxCreate_v3(
    pctx: *mut Handle,
    _p: *mut c_void,
    _n: c_int,
    flags: c_uint,
    dev: CUdevice,
) -> CUresult {
    cuCtxCreate_v4(pctx, std::ptr::null_mut(), flags, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxDestroy_v2(ctx: Handle) -> CUresult {
    let Some(ordinal) = ctx_ordinal(ctx as usize) else {
        return CUDA_ERROR_INVALID_CONTEXT;
    };
    cuDevicePrimaryCtxRelease_v2(ordinal as CUdevice)
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSynchronize() -> CUresult {
    let st = state();
    check_init!(st);
    if any_global_capture(&st) {
        return report(
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "cuCtxSynchronize while a stream is capturing".into(),
        );
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetLimit(_limit: c_int, _value: usize) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetLimit(value: *mut usize, limit: c_int) -> CUresult {
    if value.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    // STACK_SIZE, PRINTF_FIFO_SIZE, MALLOC_HEAP_SIZE, ...: plausible H100 defaults.
    *value = match limit {
        0 => 1024,
        1 => 1 << 20,
        2 => 8 << 20,
        _ => 0,
    };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetCacheConfig(_c: c_int) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCacheConfig(c: *mut c_int) -> CUresult {
    if !c.is_null() {
        *c = 0;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxSetFlags(_f: c_uint) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetStreamPriorityRange(
    least: *mut c_int,
    greatest: *mut c_int,
) -> CUresult {
    if !least.is_null() {
        *least = 0;
    }
    if !greatest.is_null() {
        *greatest = -5;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuProfilerStart() -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuProfilerStop() -> CUresult {
    CUDA_SUCCESS
}

// ---- memory API ------------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CUdeviceptr, bytesize: usize) -> CUresult {
    let mut st = state();
    check_init!(st);
    if dptr.is_null() || bytesize == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match st.alloc(bytesize, MemKind::Device) {
        Ok(p) => {
            *dptr = p as u64;
            CUDA_SUCCESS
        }
        Err(e) => e,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    stream: Handle,
) -> CUresult {
    {
        let st = state();
        check_init!(st);
        if !stream_ok(&st, stream) {
            return CUDA_ERROR_INVALID_HANDLE;
        }
        if dptr.is_null() {
            return CUDA_ERROR_INVALID_VALUE;
        }
        if bytesize == 0 {
            *dptr = 0;
            return CUDA_SUCCESS;
        }
    }
    // During capture the allocation is made now and outlives the graph (its address is baked into it).
    cuMemAlloc_v2(dptr, bytesize)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocFromPoolAsync(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    _pool: Handle,
    stream: Handle,
) -> CUresult {
    cuMemAllocAsync(dptr, bytesize, stream)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CUdeviceptr) -> CUresult {
    let mut st = state();
    check_init!(st);
    if dptr == 0 {
        return CUDA_SUCCESS;
    }
    st.free(dptr as usize, MemKind::Device)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeAsync(dptr: CUdeviceptr, stream: Handle) -> CUresult {
    let mut st = state();
    check_init!(st);
    if !stream_ok(&st, stream) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if dptr == 0 {
        return CUDA_SUCCESS;
    }
    if capture_of(&st, stream).is_some() {
        // A free captured into a graph would free memory the graph's replays still use: keep it.
        return CUDA_SUCCESS;
    }
    st.free(dptr as usize, MemKind::Device)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocManaged(
    dptr: *mut CUdeviceptr,
    bytesize: usize,
    _flags: c_uint,
) -> CUresult {
    cuMemAlloc_v2(dptr, bytesize)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(
    pp: *mut *mut c_void,
    bytesize: usize,
    _flags: c_uint,
) -> CUresult {
    let mut st = state();
    check_init!(st);
    if pp.is_null() || bytesize == 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    match st.alloc(bytesize, MemKind::Host) {
        Ok(p) => {
            *pp = p as *mut c_void;
            CUDA_SUCCESS
        }
        Err(e) => e,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(pp: *mut *mut c_void, bytesize: usize) -> CUresult {
    cuMemHostAlloc(pp, bytesize, 0)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    let mut st = state();
    check_init!(st);
    st.free(p as usize, MemKind::Host)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostGetDevicePointer_v2(
    pdptr: *mut CUdeviceptr,
    p: *mut c_void,
    _flags: c_uint,
) -> CUresult {
    let st = state();
    if pdptr.is_null() || st.find(p as usize, 1).is_none() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pdptr = p as u64;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    let st = state();
    check_init!(st);
    if !free.is_null() {
        *free = st.cap.saturating_sub(st.used);
    }
    if !total.is_null() {
        *total = st.cap;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPrefetchAsync_v2(
    _p: CUdeviceptr,
    _n: usize,
    _loc: CUmemLocation,
    _flags: c_uint,
    _s: Handle,
) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAdvise_v2(
    _p: CUdeviceptr,
    _n: usize,
    _advice: c_int,
    _loc: CUmemLocation,
) -> CUresult {
    CUDA_SUCCESS
}

/// CUmemLocation (passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CUmemLocation {
    pub typ: c_int,
    pub id: c_int,
}

static DEFAULT_POOL: u64 = 0x9001;

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetDefaultMemPool(pool: *mut Handle, _dev: CUdevice) -> CUresult {
    if pool.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pool = &DEFAULT_POOL as *const u64 as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetMemPool(pool: *mut Handle, dev: CUdevice) -> CUresult {
    cuDeviceGetDefaultMemPool(pool, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceSetMemPool(_dev: CUdevice, _pool: Handle) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolSetAttribute(
    _pool: Handle,
    _attr: c_int,
    _value: *mut c_void,
) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolGetAttribute(
    _pool: Handle,
    _attr: c_int,
    value: *mut u64,
) -> CUresult {
    if !value.is_null() {
        *value = 0;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolTrimTo(_pool: Handle, _keep: usize) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolCreate(pool: *mut Handle, _props: *const c_void) -> CUresult {
    cuDeviceGetDefaultMemPool(pool, 0)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemPoolDestroy(_pool: Handle) -> CUresult {
    CUDA_SUCCESS
}

/// External memory (Vulkan/DirectX interop) has no meaning here.
#[no_mangle]
pub unsafe extern "C" fn cuImportExternalMemory(
    _out: *mut Handle,
    _desc: *const c_void,
) -> CUresult {
    report(
        CUDA_ERROR_NOT_SUPPORTED,
        "external memory is not supported by the emulated GPU".into(),
    )
}

#[no_mangle]
pub unsafe extern "C" fn cuExternalMemoryGetMappedBuffer(
    _p: *mut CUdeviceptr,
    _m: Handle,
    _d: *const c_void,
) -> CUresult {
    CUDA_ERROR_NOT_SUPPORTED
}

#[no_mangle]
pub unsafe extern "C" fn cuDestroyExternalMemory(_m: Handle) -> CUresult {
    CUDA_ERROR_NOT_SUPPORTED
}

/// Copies and memsets: checked against the allocation table, recorded when the stream is capturing.
unsafe fn copy(
    dst: usize,
    dst_dev: bool,
    src: usize,
    src_dev: bool,
    n: usize,
    stream: Handle,
) -> CUresult {
    let st = state();
    check_init!(st);
    if !stream_ok(&st, stream) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if let Some(cap) = capture_of(&st, stream) {
        if dst_dev {
            if let Err(e) = st.check_range(dst, n, "captured copy destination") {
                return e;
            }
        }
        if src_dev {
            if let Err(e) = st.check_range(src, n, "captured copy source") {
                return e;
            }
        }
        cap.nodes.push(Node::Copy { dst, src, n });
        return CUDA_SUCCESS;
    }
    copy_checked(&st, dst, dst_dev, src, src_dev, n)
}

unsafe fn memset(dst: usize, value: u32, elem: usize, count: usize, stream: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    if !stream_ok(&st, stream) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if let Some(cap) = capture_of(&st, stream) {
        if let Err(e) = st.check_range(dst, elem * count, "captured memset destination") {
            return e;
        }
        cap.nodes.push(Node::Memset {
            dst,
            value,
            elem,
            count,
        });
        return CUDA_SUCCESS;
    }
    memset_checked(&st, dst, value, elem, count)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoD_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
) -> CUresult {
    copy(
        dst as usize,
        true,
        src as usize,
        false,
        n,
        std::ptr::null_mut(),
    )
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyHtoDAsync_v2(
    dst: CUdeviceptr,
    src: *const c_void,
    n: usize,
    s: Handle,
) -> CUresult {
    copy(dst as usize, true, src as usize, false, n, s)
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: CUdeviceptr, n: usize) -> CUresult {
    copy(
        dst as usize,
        false,
        src as usize,
        true,
        n,
        std::ptr::null_mut(),
    )
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoHAsync_v2(
    dst: *mut c_void,
    src: CUdeviceptr,
    n: usize,
    s: Handle,
) -> CUresult {
    copy(dst as usize, false, src as usize, true, n, s)
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoD_v2(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    copy(
        dst as usize,
        true,
        src as usize,
        true,
        n,
        std::ptr::null_mut(),
    )
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyDtoDAsync_v2(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    s: Handle,
) -> CUresult {
    copy(dst as usize, true, src as usize, true, n, s)
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyAsync(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    n: usize,
    s: Handle,
) -> CUresult {
    // Unified addressing: either side may be host or device memory.
    let (dd, sd) = {
        let st = state();
        (
            st.find(dst as usize, 1).is_some(),
            st.find(src as usize, 1).is_some(),
        )
    };
    copy(dst as usize, dd, src as usize, sd, n, s)
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpy(dst: CUdeviceptr, src: CUdeviceptr, n: usize) -> CUresult {
    cuMemcpyAsync(dst, src, n, std::ptr::null_mut())
}
#[no_mangle]
pub unsafe extern "C" fn cuMemcpyPeerAsync(
    dst: CUdeviceptr,
    _dc: Handle,
    src: CUdeviceptr,
    _sc: Handle,
    n: usize,
    s: Handle,
) -> CUresult {
    copy(dst as usize, true, src as usize, true, n, s)
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8_v2(dst: CUdeviceptr, v: u8, n: usize) -> CUresult {
    memset(dst as usize, v as u32, 1, n, std::ptr::null_mut())
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD8Async(dst: CUdeviceptr, v: u8, n: usize, s: Handle) -> CUresult {
    memset(dst as usize, v as u32, 1, n, s)
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16_v2(dst: CUdeviceptr, v: u16, n: usize) -> CUresult {
    memset(dst as usize, v as u32, 2, n, std::ptr::null_mut())
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD16Async(
    dst: CUdeviceptr,
    v: u16,
    n: usize,
    s: Handle,
) -> CUresult {
    memset(dst as usize, v as u32, 2, n, s)
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32_v2(dst: CUdeviceptr, v: u32, n: usize) -> CUresult {
    memset(dst as usize, v, 4, n, std::ptr::null_mut())
}
#[no_mangle]
pub unsafe extern "C" fn cuMemsetD32Async(
    dst: CUdeviceptr,
    v: u32,
    n: usize,
    s: Handle,
) -> CUresult {
    memset(dst as usize, v, 4, n, s)
}

/// Checks that [p, p+n) lies in one allocation (cuBLASLt's operands).
pub(crate) fn check_device_range(p: usize, n: usize, what: &str) -> Result<(), CUresult> {
    state().check_range(p, n, what)
}

// ---- modules ---------------------------------------------------------------------------------------------

/// An entry point read from the image.
#[derive(Debug)]
pub struct ImageEntry {
    pub name: String,
    /// Parameter sizes, when the image says (PTX always does).
    pub param_sizes: Option<Vec<usize>>,
    pub static_smem: usize,
}

/// Entry points and globals of a PTX text.
pub fn parse_ptx(ptx: &str) -> (Vec<ImageEntry>, Vec<String>) {
    let mut entries = Vec::new();
    let mut globals = Vec::new();
    // Module-scope .shared declarations (name, bytes), charged to the entries that mention them.
    let mut module_shared: Vec<(String, usize)> = Vec::new();
    let mut depth = 0i32;
    let b = ptx.as_bytes();
    let mut i = 0;
    let mut line_start = 0;
    while i <= b.len() {
        if i == b.len() || b[i] == b'\n' {
            let line = ptx[line_start..i].trim();
            if depth == 0 {
                if let Some(rest) = line
                    .strip_prefix(".const")
                    .or_else(|| line.strip_prefix(".global"))
                    .or_else(|| line.strip_prefix(".visible .global"))
                    .or_else(|| line.strip_prefix(".visible .const"))
                {
                    if let Some(name) = decl_name(rest) {
                        globals.push(name);
                    }
                }
                if line.starts_with(".shared") {
                    if let Some(name) = decl_name(line) {
                        module_shared.push((name, decl_bytes(line)));
                    }
                }
            }
            line_start = i + 1;
        }
        if i < b.len() {
            match b[i] {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                _ => {}
            }
        }
        i += 1;
    }
    let mut pos = 0;
    while let Some(off) = ptx[pos..].find(".entry") {
        let start = pos + off + ".entry".len();
        pos = start;
        let rest = ptx[start..].trim_start();
        let name_end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(rest.len());
        let name = rest[..name_end].to_string();
        let rest = &rest[name_end..];
        let mut sizes = Vec::new();
        let mut body_from = 0;
        if let Some(p0) = rest.find(['(', '{']) {
            if rest.as_bytes()[p0] == b'(' {
                let p1 = rest[p0..].find(')').map(|x| x + p0).unwrap_or(rest.len());
                for decl in rest[p0 + 1..p1].split(',') {
                    let d = decl.trim();
                    if d.starts_with(".param") {
                        sizes.push(param_bytes(d));
                    }
                }
                body_from = p1;
            }
        }
        // The body: from the first `{` after the parameters to its matching `}`.
        let mut smem = 0usize;
        if let Some(ob) = rest[body_from..].find('{') {
            let bstart = body_from + ob;
            let mut d = 0;
            let mut bend = rest.len();
            for (k, c) in rest[bstart..].char_indices() {
                match c {
                    '{' => d += 1,
                    '}' => {
                        d -= 1;
                        if d == 0 {
                            bend = bstart + k;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let body = &rest[bstart..bend];
            for l in body.lines() {
                let l = l.trim();
                if l.starts_with(".shared") {
                    smem += decl_bytes(l);
                }
            }
            for (n, bytes) in &module_shared {
                if contains_ident(body, n) {
                    smem += bytes;
                }
            }
        }
        if !name.is_empty() {
            entries.push(ImageEntry {
                name,
                param_sizes: Some(sizes),
                static_smem: smem,
            });
        }
    }
    (entries, globals)
}

fn contains_ident(text: &str, name: &str) -> bool {
    let mut from = 0;
    while let Some(p) = text[from..].find(name) {
        let s = from + p;
        let e = s + name.len();
        let before = text[..s]
            .chars()
            .next_back()
            .map(|c| c.is_alphanumeric() || c == '_' || c == '$')
            .unwrap_or(false);
        let after = text[e..]
            .chars()
            .next()
            .map(|c| c.is_alphanumeric() || c == '_' || c == '$')
            .unwrap_or(false);
        if !before && !after {
            return true;
        }
        from = e;
    }
    false
}

/// The declared name in `... .b8 name[16];` / `... .f32 name;`.
fn decl_name(decl: &str) -> Option<String> {
    let d = decl.trim().trim_end_matches(';');
    let d = d.split('=').next()?.trim();
    let last = d.split_whitespace().last()?;
    let name = last.split('[').next()?;
    if name.starts_with('.') || name.is_empty() {
        None
    } else {
        Some(name.to_string())
    }
}

fn type_bytes(tok: &str) -> Option<usize> {
    let t = tok.strip_prefix('.')?;
    let digits: String = t.chars().skip(1).collect();
    if !matches!(t.chars().next(), Some('u' | 's' | 'b' | 'f')) {
        return None;
    }
    digits.parse::<usize>().ok().map(|bits| bits / 8)
}

/// Bytes of a `.shared .align 4 .b8 name[1024];` declaration (0 for `.extern` / unsized).
fn decl_bytes(l: &str) -> usize {
    if l.contains(".extern") {
        return 0;
    }
    let elem = l.split_whitespace().find_map(type_bytes).unwrap_or(1);
    let count = l
        .split('[')
        .nth(1)
        .and_then(|r| r.split(']').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(1);
    elem * count
}

/// Bytes of one `.param .u64 name` / `.param .align 8 .b8 name[16]` declaration.
fn param_bytes(d: &str) -> usize {
    let elem = d
        .split_whitespace()
        .skip(1)
        .find_map(type_bytes)
        .unwrap_or(0);
    let count = d
        .split('[')
        .nth(1)
        .and_then(|r| r.split(']').next())
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(1);
    elem * count
}

/// Kernel names from a CUBIN's symbol table (ELF64): global functions in `.text.<name>` sections. A CUBIN
/// does not say its parameters in a documented form, so only PTX gets the parameter check.
pub fn parse_cubin(img: &[u8]) -> Result<(Vec<ImageEntry>, Vec<String>), String> {
    let rd16 = |o: usize| -> Option<usize> {
        img.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let rd32 = |o: usize| -> Option<usize> {
        img.get(o..o + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let rd64 = |o: usize| -> Option<usize> {
        img.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let bad = || "malformed ELF image".to_string();
    if img.len() < 64 || img[4] != 2 || img[5] != 1 {
        return Err("not a little-endian ELF64 CUBIN".into());
    }
    let shoff = rd64(0x28).ok_or_else(bad)?;
    let shentsize = rd16(0x3A).ok_or_else(bad)?;
    let shnum = rd16(0x3C).ok_or_else(bad)?;
    let shstrndx = rd16(0x3E).ok_or_else(bad)?;
    struct Sh {
        name: usize,
        typ: usize,
        off: usize,
        size: usize,
        link: usize,
        entsize: usize,
    }
    let mut secs = Vec::new();
    for k in 0..shnum {
        let o = shoff + k * shentsize;
        secs.push(Sh {
            name: rd32(o).ok_or_else(bad)?,
            typ: rd32(o + 4).ok_or_else(bad)?,
            off: rd64(o + 0x18).ok_or_else(bad)?,
            size: rd64(o + 0x20).ok_or_else(bad)?,
            link: rd32(o + 0x28).ok_or_else(bad)?,
            entsize: rd64(o + 0x38).ok_or_else(bad)?,
        });
    }
    let cstr_at = |off: usize| -> String {
        let s = &img[off.min(img.len())..];
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        String::from_utf8_lossy(&s[..end]).into_owned()
    };
    let shstr = secs.get(shstrndx).ok_or_else(bad)?.off;
    let sec_name = |s: &Sh| cstr_at(shstr + s.name);
    let mut entries = Vec::new();
    let mut globals = Vec::new();
    for symtab in secs.iter().filter(|s| s.typ == 2) {
        let strtab = secs.get(symtab.link).ok_or_else(bad)?.off;
        let n = if symtab.entsize == 0 {
            0
        } else {
            symtab.size / symtab.entsize
        };
        for k in 0..n {
            let o = symtab.off + k * symtab.entsize;
            let name = cstr_at(strtab + rd32(o).ok_or_else(bad)?);
            let info = *img.get(o + 4).ok_or_else(bad)?;
            let shndx = rd16(o + 6).ok_or_else(bad)?;
            let (bind, typ) = (info >> 4, info & 0xf);
            let sec = secs.get(shndx).map(&sec_name).unwrap_or_default();
            if typ == 2 && bind == 1 && sec == format!(".text.{name}") {
                // The parameter list is in .nv.info.<name>, in an undocumented format: names only.
                entries.push(ImageEntry {
                    name,
                    param_sizes: None,
                    static_smem: 0,
                });
            } else if typ == 1
                && bind == 1
                && (sec.starts_with(".nv.constant") || sec.starts_with(".nv.global"))
            {
                globals.push(name);
            }
        }
    }
    if entries.is_empty() {
        return Err("no kernel entry points in the CUBIN's symbol table".into());
    }
    Ok((entries, globals))
}

/// Loads a module image: matches its entry points against the CPU build.
unsafe fn load_image(module: *mut Handle, img: *const u8) -> CUresult {
    let mut st = state();
    check_init!(st);
    if module.is_null() || img.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !registry::kernels_compiled() {
        return report(CUDA_ERROR_NOT_FOUND, registry::NO_KERNELS_MSG.into());
    }
    let head = std::slice::from_raw_parts(img, 4);
    let (entries, globals) = if head == b"\x7fELF" {
        // The ELF header gives the image size: the section header table ends it.
        let h = std::slice::from_raw_parts(img, 64);
        let shoff = u64::from_le_bytes(h[0x28..0x30].try_into().unwrap()) as usize;
        let shnum = u16::from_le_bytes([h[0x3C], h[0x3D]]) as usize;
        let shentsize = u16::from_le_bytes([h[0x3A], h[0x3B]]) as usize;
        let data = std::slice::from_raw_parts(img, shoff + shnum * shentsize);
        match parse_cubin(data) {
            Ok(x) => x,
            Err(e) => return report(CUDA_ERROR_INVALID_IMAGE, e),
        }
    } else if head == [0x50, 0xED, 0x55, 0xBA] || head == [0xB1, 0x43, 0x62, 0x46] {
        return report(
            CUDA_ERROR_INVALID_IMAGE,
            "fatbin images are not supported by the emulated GPU: load PTX (or a CUBIN)".into(),
        );
    } else {
        let text = CStr::from_ptr(img as *const c_char).to_string_lossy();
        if !text.contains(".entry") && !text.contains(".version") {
            return report(
                CUDA_ERROR_INVALID_IMAGE,
                "the image is neither PTX text nor an ELF CUBIN".into(),
            );
        }
        parse_ptx(&text)
    };
    let reg = registry::registry();
    let mut functions = HashMap::new();
    let mut tu = None;
    for e in &entries {
        let Some(k) = reg.find(&e.name) else {
            return report(
                CUDA_ERROR_NOT_FOUND,
                format!("kernel `{}` is in the module but not in the emulator's CPU build (rebuild openuni-emu: tools/build_emu.sh)", e.name),
            );
        };
        if let Some(sizes) = &e.param_sizes {
            let cpu: Vec<usize> = k.param_sizes.iter().map(|&s| s as usize).collect();
            if sizes.len() != cpu.len() {
                return report(
                    CUDA_ERROR_INVALID_IMAGE,
                    format!("kernel `{}`: the module has {} parameters, the CPU build ({}) has {} (stale emulator build?)", e.name, sizes.len(), k.file, cpu.len()),
                );
            }
            if *sizes != cpu {
                return report(
                    CUDA_ERROR_INVALID_IMAGE,
                    format!("kernel `{}`: parameter sizes {:?} in the module, {:?} in the CPU build ({}) (stale emulator build?)", e.name, sizes, cpu, k.file),
                );
            }
        }
        tu.get_or_insert(k.tu);
        let f = Box::new(Function {
            kernel: k,
            static_smem: e.static_smem,
            max_dyn_smem: DEFAULT_DYN_SMEM.saturating_sub(e.static_smem),
        });
        functions.insert(e.name.clone(), f);
    }
    // __constant__ / __device__ globals become addressable device memory.
    let mut gset = HashSet::new();
    for g in globals {
        if let Some(rg) = reg.global(&g, tu) {
            let p = rg.addr as usize;
            st.allocs.entry(p).or_insert(Alloc {
                size: rg.size,
                map_base: p,
                map_len: rg.size,
                kind: MemKind::Global,
            });
        }
        gset.insert(g);
    }
    let m = Box::new(Module {
        functions,
        globals: gset,
        tu,
    });
    for f in m.functions.values() {
        st.functions.insert(&**f as *const Function as usize);
    }
    let h = Box::into_raw(m);
    st.modules.insert(h as usize);
    *module = h as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut Handle, image: *const c_void) -> CUresult {
    load_image(module, image as *const u8)
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadDataEx(
    module: *mut Handle,
    image: *const c_void,
    _n: c_uint,
    _o: *mut c_int,
    _v: *mut *mut c_void,
) -> CUresult {
    load_image(module, image as *const u8)
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoad(module: *mut Handle, fname: *const c_char) -> CUresult {
    if fname.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let path = CStr::from_ptr(fname).to_string_lossy().into_owned();
    match std::fs::read(&path) {
        Ok(mut data) => {
            data.push(0);
            load_image(module, data.as_ptr())
        }
        Err(e) => report(CUDA_ERROR_FILE_NOT_FOUND, format!("{path}: {e}")),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(module: Handle) -> CUresult {
    let mut st = state();
    if !st.modules.remove(&(module as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let m = Box::from_raw(module as *mut Module);
    for f in m.functions.values() {
        st.functions.remove(&(&**f as *const Function as usize));
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    hfunc: *mut Handle,
    module: Handle,
    name: *const c_char,
) -> CUresult {
    let st = state();
    check_init!(st);
    if hfunc.is_null() || name.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !st.modules.contains(&(module as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let m = &*(module as *const Module);
    let name = CStr::from_ptr(name).to_string_lossy();
    match m.functions.get(name.as_ref()) {
        Some(f) => {
            *hfunc = &**f as *const Function as Handle;
            CUDA_SUCCESS
        }
        None => report(
            CUDA_ERROR_NOT_FOUND,
            format!("no kernel `{name}` in the module"),
        ),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetGlobal_v2(
    dptr: *mut CUdeviceptr,
    bytes: *mut usize,
    module: Handle,
    name: *const c_char,
) -> CUresult {
    let st = state();
    check_init!(st);
    if name.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !st.modules.contains(&(module as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let m = &*(module as *const Module);
    let name = CStr::from_ptr(name).to_string_lossy();
    let g = if m.globals.contains(name.as_ref()) {
        registry::registry().global(&name, m.tu)
    } else {
        None
    };
    match g {
        Some(g) => {
            if !dptr.is_null() {
                *dptr = g.addr as u64;
            }
            if !bytes.is_null() {
                *bytes = g.size;
            }
            CUDA_SUCCESS
        }
        None => report(CUDA_ERROR_NOT_FOUND, format!("no global `{name}` in the module (only namespace-scope __constant__ variables are registered)")),
    }
}

// ---- functions and launches ------------------------------------------------------------------------------

unsafe fn function(st: &State, f: Handle) -> Option<&'static mut Function> {
    if st.functions.contains(&(f as usize)) {
        Some(&mut *(f as *mut Function))
    } else {
        None
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: Handle, attrib: c_int, value: c_int) -> CUresult {
    let st = state();
    check_init!(st);
    let Some(func) = function(&st, f) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    match attrib {
        // MAX_DYNAMIC_SHARED_SIZE_BYTES
        8 => {
            if value < 0 || value as usize + func.static_smem > MAX_SMEM_OPTIN {
                return report(
                    CUDA_ERROR_INVALID_VALUE,
                    format!(
                        "{}: {} bytes of dynamic shared memory + {} static exceed 227 KiB",
                        func.kernel.name, value, func.static_smem
                    ),
                );
            }
            func.max_dyn_smem = value as usize;
            CUDA_SUCCESS
        }
        // PREFERRED_SHARED_MEMORY_CARVEOUT, cluster attributes, ...: accepted, no effect on a CPU.
        9..=13 => CUDA_SUCCESS,
        _ => CUDA_ERROR_INVALID_VALUE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(pi: *mut c_int, attrib: c_int, f: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    let Some(func) = function(&st, f) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if pi.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *pi = match attrib {
        0 => 1024,                       // MAX_THREADS_PER_BLOCK
        1 => func.static_smem as c_int,  // SHARED_SIZE_BYTES
        2 => 0,                          // CONST_SIZE_BYTES
        3 => 0,                          // LOCAL_SIZE_BYTES
        4 => 32,                         // NUM_REGS
        5 | 6 => 90,                     // PTX_VERSION, BINARY_VERSION
        7 => 0,                          // CACHE_MODE_CA
        8 => func.max_dyn_smem as c_int, // MAX_DYNAMIC_SHARED_SIZE_BYTES
        9 => -1,                         // PREFERRED_SHARED_MEMORY_CARVEOUT
        _ => 0,
    };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetCacheConfig(_f: Handle, _c: c_int) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
    n: *mut c_int,
    _f: Handle,
    block: c_int,
    dyn_smem: usize,
) -> CUresult {
    if n.is_null() || block <= 0 {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let by_threads = 2048 / block.max(1);
    let by_smem = if dyn_smem == 0 {
        32
    } else {
        (233472 / (dyn_smem + 1024)) as c_int
    };
    *n = by_threads.min(by_smem).min(32);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(
    n: *mut c_int,
    f: Handle,
    block: c_int,
    dyn_smem: usize,
    _flags: c_uint,
) -> CUresult {
    cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, block, dyn_smem)
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyAvailableDynamicSMemPerBlock(
    smem: *mut usize,
    f: Handle,
    _blocks: c_int,
    _block: c_int,
) -> CUresult {
    let st = state();
    check_init!(st);
    let Some(func) = function(&st, f) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if smem.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *smem = MAX_SMEM_OPTIN - func.static_smem;
    CUDA_SUCCESS
}

pub type CUoccupancyB2DSize = Option<unsafe extern "C" fn(c_int) -> usize>;

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSizeWithFlags(
    min_grid: *mut c_int,
    block: *mut c_int,
    _f: Handle,
    _b2d: CUoccupancyB2DSize,
    _dyn_smem: usize,
    limit: c_int,
    _flags: c_uint,
) -> CUresult {
    if min_grid.is_null() || block.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let b = if limit > 0 { limit.min(1024) } else { 1024 };
    *block = b;
    *min_grid = 132 * (2048 / b).max(1);
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialBlockSize(
    min_grid: *mut c_int,
    block: *mut c_int,
    f: Handle,
    b2d: CUoccupancyB2DSize,
    dyn_smem: usize,
    limit: c_int,
) -> CUresult {
    cuOccupancyMaxPotentialBlockSizeWithFlags(min_grid, block, f, b2d, dyn_smem, limit, 0)
}

/// Thread block clusters: the portable maximum of 8 blocks, one cluster per SM pair.
#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxPotentialClusterSize(
    n: *mut c_int,
    _f: Handle,
    _cfg: *const c_void,
) -> CUresult {
    if n.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *n = 8;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuOccupancyMaxActiveClusters(
    n: *mut c_int,
    _f: Handle,
    _cfg: *const c_void,
) -> CUresult {
    if n.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *n = 16;
    CUDA_SUCCESS
}

/// Runs a kernel now and checks the redzones of the allocations its pointer arguments point into.
unsafe fn run_kernel(func: &Function, cfg: &LaunchConfig, params: *mut *mut c_void) -> CUresult {
    let k = func.kernel;
    if let Some(msg) = injected_failure(current_device()) {
        if sticky_enabled() {
            state().sticky[current_device()] = Some(CUDA_ERROR_LAUNCH_FAILED);
        }
        return report(CUDA_ERROR_LAUNCH_FAILED, format!("{}: {msg}", k.name));
    }
    if let Err(e) = fiber::launch(k, cfg, params, &LaunchOptions::default()) {
        let code = e.code as CUresult;
        if sticky_enabled() && matches!(code, 700 | 710 | 714..=719) {
            state().sticky[current_device()] = Some(code);
        }
        return report(code, e.message);
    }
    let st = state();
    let mut seen = HashSet::new();
    for (i, &sz) in k.param_sizes.iter().enumerate() {
        if sz != 8 {
            continue;
        }
        let v = *(*params.add(i) as *const u64) as usize;
        if let Some((&start, a)) = st.allocs.range(..=v).next_back() {
            if v <= start + a.size && seen.insert(start) {
                if let Some(msg) = redzone_damage(start, a) {
                    drop(st);
                    if sticky_enabled() {
                        state().sticky[current_device()] = Some(CUDA_ERROR_ILLEGAL_ADDRESS);
                    }
                    return report(
                        CUDA_ERROR_ILLEGAL_ADDRESS,
                        format!("kernel `{}` ({}), argument {i}: {msg}", k.name, k.file),
                    );
                }
            }
        }
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    let st = state();
    check_init!(st);
    let Some(func) = function(&st, f) else {
        return CUDA_ERROR_INVALID_HANDLE;
    };
    if !stream_ok(&st, stream) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let k = func.kernel;
    if !extra.is_null() {
        return report(
            CUDA_ERROR_NOT_SUPPORTED,
            "cuLaunchKernel with `extra` is not supported by the emulated GPU: use kernelParams"
                .into(),
        );
    }
    if params.is_null() && !k.param_sizes.is_empty() {
        return report(
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "{}: kernelParams is NULL but the kernel has {} parameters",
                k.name,
                k.param_sizes.len()
            ),
        );
    }
    let cfg = LaunchConfig {
        grid: [gx, gy, gz],
        block: [bx, by, bz],
        dyn_smem: smem,
    };
    if let Err(e) = fiber::check_config(&cfg) {
        return report(
            CUDA_ERROR_INVALID_VALUE,
            format!("{}: {}", k.name, e.message),
        );
    }
    if smem as usize > func.max_dyn_smem {
        return report(
            CUDA_ERROR_INVALID_VALUE,
            format!(
                "{}: {} bytes of dynamic shared memory exceed the limit of {} (raise it with cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES), up to 227 KiB)",
                k.name, smem, func.max_dyn_smem
            ),
        );
    }
    if let Some(cap) = capture_of(&st, stream) {
        // Argument values are copied now, as the graph node does on a GPU.
        let mut args = Vec::new();
        let mut offsets = Vec::new();
        for (i, (&sz, &al)) in k.param_sizes.iter().zip(k.param_aligns).enumerate() {
            let off = round_up(args.len(), al.max(1) as usize);
            args.resize(off, 0);
            args.extend_from_slice(std::slice::from_raw_parts(
                *params.add(i) as *const u8,
                sz as usize,
            ));
            offsets.push(off);
        }
        cap.nodes.push(Node::Kernel {
            func: f as usize,
            cfg,
            args: Arc::new(args),
            offsets: Arc::new(offsets),
        });
        return CUDA_SUCCESS;
    }
    drop(st);
    run_kernel(func, &cfg, params)
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: Handle,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    smem: c_uint,
    stream: Handle,
    params: *mut *mut c_void,
) -> CUresult {
    cuLaunchKernel(
        f,
        gx,
        gy,
        gz,
        bx,
        by,
        bz,
        smem,
        stream,
        params,
        std::ptr::null_mut(),
    )
}

pub type CUhostFn = Option<unsafe extern "C" fn(*mut c_void)>;

#[no_mangle]
pub unsafe extern "C" fn cuLaunchHostFunc(
    stream: Handle,
    f: CUhostFn,
    user: *mut c_void,
) -> CUresult {
    let st = state();
    check_init!(st);
    let Some(f) = f else {
        return CUDA_ERROR_INVALID_VALUE;
    };
    if let Some(cap) = capture_of(&st, stream) {
        let user = user as usize;
        cap.nodes.push(Node::Host(Arc::new(move || {
            f(user as *mut c_void);
            CUDA_SUCCESS
        })));
        return CUDA_SUCCESS;
    }
    drop(st);
    f(user);
    CUDA_SUCCESS
}

/// Records a host-side operation into the stream's capture, or says it must run now.
pub(crate) fn capture_or_run(
    stream: Handle,
    node: impl Fn() -> CUresult + Send + Sync + 'static,
) -> Option<CUresult> {
    let st = state();
    if let Some(code) = st.sticky[current_device()] {
        return Some(code);
    }
    if !stream_ok(&st, stream) {
        return Some(CUDA_ERROR_INVALID_HANDLE);
    }
    if let Some(cap) = capture_of(&st, stream) {
        cap.nodes.push(Node::Host(Arc::new(node)));
        return Some(CUDA_SUCCESS);
    }
    None
}

// ---- streams, events -------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(ph: *mut Handle, _flags: c_uint) -> CUresult {
    let mut st = state();
    check_init!(st);
    if ph.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let s = Box::into_raw(Box::new(Stream { capture: None }));
    st.streams.insert(s as usize);
    *ph = s as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(
    ph: *mut Handle,
    flags: c_uint,
    _prio: c_int,
) -> CUresult {
    cuStreamCreate(ph, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: Handle) -> CUresult {
    let mut st = state();
    if !st.streams.remove(&(s as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    drop(Box::from_raw(s as *mut Stream));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamSynchronize(s: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    if !stream_ok(&st, s) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if let Some(cap) = capture_of(&st, s) {
        cap.invalidated = true;
        return report(
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "cuStreamSynchronize on a capturing stream (the capture is invalidated)".into(),
        );
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamQuery(s: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    if !stream_ok(&st, s) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if capture_of(&st, s).is_some() {
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(s: Handle, e: Handle, _flags: c_uint) -> CUresult {
    let st = state();
    check_init!(st);
    if !stream_ok(&st, s) || !st.events.contains(&(e as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamAttachMemAsync(
    _s: Handle,
    _p: CUdeviceptr,
    _n: usize,
    _f: c_uint,
) -> CUresult {
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(ph: *mut Handle, flags: c_uint) -> CUresult {
    let mut st = state();
    check_init!(st);
    if ph.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    let e = Box::into_raw(Box::new(Event {
        flags,
        recorded: None,
    }));
    st.events.insert(e as usize);
    *ph = e as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(e: Handle) -> CUresult {
    let mut st = state();
    if !st.events.remove(&(e as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    drop(Box::from_raw(e as *mut Event));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: Handle, s: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    if !st.events.contains(&(e as usize)) || !stream_ok(&st, s) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    // Work is synchronous: everything before the record has finished now.
    (*(e as *mut Event)).recorded = Some(Instant::now());
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(e: Handle, s: Handle, _flags: c_uint) -> CUresult {
    cuEventRecord(e, s)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(e: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    if !st.events.contains(&(e as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: Handle) -> CUresult {
    cuEventQuery(e)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(
    ms: *mut f32,
    start: Handle,
    end: Handle,
) -> CUresult {
    let st = state();
    check_init!(st);
    if ms.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !st.events.contains(&(start as usize)) || !st.events.contains(&(end as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let (a, b) = (&*(start as *const Event), &*(end as *const Event));
    // CU_EVENT_DISABLE_TIMING (2): no timestamps, as on a GPU.
    if a.flags & 2 != 0 || b.flags & 2 != 0 {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    match (a.recorded, b.recorded) {
        (Some(ta), Some(tb)) => {
            *ms = if tb >= ta {
                (tb - ta).as_secs_f64() * 1e3
            } else {
                -((ta - tb).as_secs_f64() * 1e3)
            } as f32;
            CUDA_SUCCESS
        }
        _ => CUDA_ERROR_INVALID_HANDLE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: Handle, end: Handle) -> CUresult {
    cuEventElapsedTime_v2(ms, start, end)
}

// ---- graphs ------------------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture_v2(s: Handle, mode: c_int) -> CUresult {
    let st = state();
    check_init!(st);
    if s.is_null() {
        return report(
            CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
            "stream capture on the NULL (legacy) stream".into(),
        );
    }
    if !st.streams.contains(&(s as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let stream = &mut *(s as *mut Stream);
    if stream.capture.is_some() {
        return CUDA_ERROR_ILLEGAL_STATE;
    }
    stream.capture = Some(Capture {
        nodes: Vec::new(),
        invalidated: false,
        global_mode: mode == 0,
    });
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamBeginCapture(s: Handle) -> CUresult {
    cuStreamBeginCapture_v2(s, 0)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(s: Handle, graph: *mut Handle) -> CUresult {
    let mut st = state();
    if graph.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if s.is_null() || !st.streams.contains(&(s as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let stream = &mut *(s as *mut Stream);
    let Some(cap) = stream.capture.take() else {
        return CUDA_ERROR_ILLEGAL_STATE;
    };
    if cap.invalidated {
        *graph = std::ptr::null_mut();
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    let g = Box::into_raw(Box::new(Graph { nodes: cap.nodes }));
    st.graphs.insert(g as usize);
    *graph = g as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(s: Handle, status: *mut c_int) -> CUresult {
    let st = state();
    check_init!(st);
    if status.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !stream_ok(&st, s) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *status = match capture_of(&st, s) {
        None => 0,
        Some(c) if c.invalidated => 2,
        Some(_) => 1,
    };
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(
    exec: *mut Handle,
    graph: Handle,
    _flags: u64,
) -> CUresult {
    let mut st = state();
    check_init!(st);
    if exec.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if !st.graphs.contains(&(graph as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let nodes = (*(graph as *const Graph)).nodes.clone();
    let e = Box::into_raw(Box::new(Graph { nodes }));
    st.execs.insert(e as usize);
    *exec = e as Handle;
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphUpload(exec: Handle, s: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    if !st.execs.contains(&(exec as usize)) || !stream_ok(&st, s) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: Handle, s: Handle) -> CUresult {
    let st = state();
    check_init!(st);
    if !st.execs.contains(&(exec as usize)) || !stream_ok(&st, s) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    let nodes = (*(exec as *const Graph)).nodes.clone();
    if let Some(cap) = capture_of(&st, s) {
        cap.nodes.extend(nodes);
        return CUDA_SUCCESS;
    }
    drop(st);
    replay(&nodes)
}

/// Replays captured work in order.
unsafe fn replay(nodes: &[Node]) -> CUresult {
    for n in nodes {
        let r = match n {
            Node::Kernel {
                func,
                cfg,
                args,
                offsets,
            } => {
                let func = {
                    let st = state();
                    if let Some(code) = st.sticky[current_device()] {
                        return code;
                    }
                    match function(&st, *func as Handle) {
                        Some(f) => f as *const Function,
                        None => {
                            return report(
                                CUDA_ERROR_INVALID_HANDLE,
                                "graph replay: the kernel's module was unloaded".into(),
                            )
                        }
                    }
                };
                let base = args.as_ptr() as *mut u8;
                let mut ptrs: Vec<*mut c_void> = offsets
                    .iter()
                    .map(|&o| base.add(o) as *mut c_void)
                    .collect();
                run_kernel(&*func, cfg, ptrs.as_mut_ptr())
            }
            Node::Copy { dst, src, n } => {
                let st = state();
                let dd = st.find(*dst, *n).is_some();
                let sd = st.find(*src, *n).is_some();
                copy_checked(&st, *dst, dd, *src, sd, *n)
            }
            Node::Memset {
                dst,
                value,
                elem,
                count,
            } => {
                let st = state();
                memset_checked(&st, *dst, *value, *elem, *count)
            }
            Node::Host(f) => f(),
        };
        if r != CUDA_SUCCESS {
            return r;
        }
    }
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(g: Handle) -> CUresult {
    let mut st = state();
    if !st.graphs.remove(&(g as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    drop(Box::from_raw(g as *mut Graph));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(e: Handle) -> CUresult {
    let mut st = state();
    if !st.execs.remove(&(e as usize)) {
        return CUDA_ERROR_INVALID_HANDLE;
    }
    drop(Box::from_raw(e as *mut Graph));
    CUDA_SUCCESS
}

// ---- errors ------------------------------------------------------------------------------------------------

pub fn error_name(code: CUresult) -> &'static str {
    match code {
        0 => "CUDA_SUCCESS",
        1 => "CUDA_ERROR_INVALID_VALUE",
        2 => "CUDA_ERROR_OUT_OF_MEMORY",
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        4 => "CUDA_ERROR_DEINITIALIZED",
        100 => "CUDA_ERROR_NO_DEVICE",
        101 => "CUDA_ERROR_INVALID_DEVICE",
        200 => "CUDA_ERROR_INVALID_IMAGE",
        201 => "CUDA_ERROR_INVALID_CONTEXT",
        218 => "CUDA_ERROR_INVALID_PTX",
        222 => "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        301 => "CUDA_ERROR_FILE_NOT_FOUND",
        400 => "CUDA_ERROR_INVALID_HANDLE",
        401 => "CUDA_ERROR_ILLEGAL_STATE",
        500 => "CUDA_ERROR_NOT_FOUND",
        600 => "CUDA_ERROR_NOT_READY",
        700 => "CUDA_ERROR_ILLEGAL_ADDRESS",
        701 => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        710 => "CUDA_ERROR_ASSERT",
        715 => "CUDA_ERROR_ILLEGAL_INSTRUCTION",
        716 => "CUDA_ERROR_MISALIGNED_ADDRESS",
        719 => "CUDA_ERROR_LAUNCH_FAILED",
        801 => "CUDA_ERROR_NOT_SUPPORTED",
        900 => "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
        901 => "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
        999 => "CUDA_ERROR_UNKNOWN",
        _ => "CUDA_ERROR_UNKNOWN_CODE",
    }
}

fn error_string(code: CUresult) -> &'static str {
    match code {
        0 => "no error",
        1 => "invalid argument",
        2 => "out of memory",
        3 => "initialization error",
        101 => "invalid device ordinal",
        200 => "device kernel image is invalid",
        201 => "invalid device context",
        301 => "file not found",
        400 => "invalid resource handle",
        401 => "the operation cannot be performed in the present state",
        500 => "named symbol not found",
        600 => "device not ready",
        700 => "an illegal memory access was encountered",
        710 => "device-side assert triggered",
        715 => "an illegal instruction was encountered",
        716 => "misaligned address",
        719 => "unspecified launch failure",
        801 => "operation not supported",
        900 => "operation not permitted when stream is capturing",
        901 => "operation failed due to a previous error during capture",
        _ => "unknown error",
    }
}

fn static_cstr(s: &'static str) -> *const c_char {
    // Interned NUL-terminated copies, kept for the life of the process.
    static TABLE: OnceLock<Mutex<HashMap<&'static str, &'static CStr>>> = OnceLock::new();
    let mut t = TABLE
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    t.entry(s)
        .or_insert_with(|| Box::leak(std::ffi::CString::new(s).unwrap().into_boxed_c_str()))
        .as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, p: *mut *const c_char) -> CUresult {
    if p.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *p = static_cstr(error_string(code));
    CUDA_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, p: *mut *const c_char) -> CUresult {
    if p.is_null() {
        return CUDA_ERROR_INVALID_VALUE;
    }
    *p = static_cstr(error_name(code));
    CUDA_SUCCESS
}

// ---- tensor maps (TMA) -----------------------------------------------------------------------------------

/// The 128-byte `CUtensorMap` blob as this driver fills it; mirrors `openuni_emu_tensor_map` in
/// include/openuni_emu_abi.h, which kernels/include/tma.cuh reads on the device side.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default)]
pub struct TensorMapBlob {
    pub magic: u32,
    pub rank: u8,
    pub dtype: u8,
    pub elem_bytes: u8,
    pub swizzle: u8,
    pub oob_nan: u8,
    pub l2_promotion: u8,
    pub reserved0: [u8; 6],
    pub global_address: u64,
    pub dims: [u64; 5],
    pub strides: [u64; 5],
    pub box_dims: [u16; 5],
    pub element_strides: [u8; 5],
    pub reserved1: [u8; 9],
}
const _: () = assert!(std::mem::size_of::<TensorMapBlob>() == 128);
pub const TENSOR_MAP_MAGIC: u32 = 0x5041_4d54;

/// Bytes per element of a `CUtensorMapDataType` (UINT8 .. TFLOAT32_FTZ), and whether it is a float type.
fn tensor_map_dtype(t: u32) -> Option<(u8, bool)> {
    Some(match t {
        0 => (1, false),               // UINT8
        1 => (2, false),               // UINT16
        2 | 3 => (4, false),           // UINT32, INT32
        4 | 5 => (8, false),           // UINT64, INT64
        6 | 9 => (2, true),            // FLOAT16, BFLOAT16
        7 | 10 | 11 | 12 => (4, true), // FLOAT32, FLOAT32_FTZ, TFLOAT32, TFLOAT32_FTZ
        8 => (8, true),                // FLOAT64
        _ => return None,
    })
}

/// `cuTensorMapEncodeTiled`, with the argument checks the driver API documents. The emulated GPU supports
/// tiled maps without interleave and with element strides 1 (what TMA GEMM/attention kernels use); other
/// valid values are `CUDA_ERROR_NOT_SUPPORTED`, invalid ones `CUDA_ERROR_INVALID_VALUE`, each with a message.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cuTensorMapEncodeTiled(
    tensor_map: *mut c_void,
    data_type: c_uint,
    rank: c_uint,
    global_address: *mut c_void,
    global_dim: *const u64,
    global_strides: *const u64,
    box_dim: *const c_uint,
    element_strides: *const c_uint,
    interleave: c_uint,
    swizzle: c_uint,
    l2_promotion: c_uint,
    oob_fill: c_uint,
) -> CUresult {
    let bad = |msg: String| {
        report(
            CUDA_ERROR_INVALID_VALUE,
            format!("cuTensorMapEncodeTiled: {msg}"),
        )
    };
    let unsupported = |msg: String| {
        report(
            CUDA_ERROR_NOT_SUPPORTED,
            format!("cuTensorMapEncodeTiled: {msg}"),
        )
    };
    if tensor_map.is_null() || (tensor_map as usize) % 64 != 0 {
        return bad(format!(
            "tensorMap {tensor_map:p} must be non-null and 64-byte aligned"
        ));
    }
    let Some((elem_bytes, is_float)) = tensor_map_dtype(data_type) else {
        if (13..=15).contains(&data_type) {
            return unsupported(format!(
                "tensorDataType {data_type}: packed 4/6-bit types are not emulated"
            ));
        }
        return bad(format!(
            "tensorDataType {data_type}: expected 0..=15 (UINT8 .. 16U6_ALIGN16B)"
        ));
    };
    if !(1..=5).contains(&rank) {
        return bad(format!("tensorRank {rank}: expected 1..=5"));
    }
    if interleave > 2 {
        return bad(format!(
            "interleave {interleave}: expected 0 (NONE), 1 (16B) or 2 (32B)"
        ));
    }
    if interleave != 0 {
        if rank < 3 {
            return bad(format!(
                "interleave {interleave} needs tensorRank >= 3, found {rank}"
            ));
        }
        return unsupported(
            "interleaved layouts are not emulated (interleave must be NONE)".into(),
        );
    }
    if swizzle > 6 {
        return bad(format!(
            "swizzle {swizzle}: expected 0..=6 (NONE, 32B, 64B, 128B, 128B_ATOM_*)"
        ));
    }
    if swizzle > 3 {
        return unsupported(format!(
            "swizzle {swizzle}: the 128B_ATOM_* modes are not emulated"
        ));
    }
    if l2_promotion > 3 {
        return bad(format!("l2Promotion {l2_promotion}: expected 0..=3"));
    }
    if oob_fill > 1 {
        return bad(format!(
            "oobFill {oob_fill}: expected 0 (NONE) or 1 (NAN_REQUEST_ZERO_FMA)"
        ));
    }
    if oob_fill == 1 && !is_float {
        return bad(format!(
            "oobFill NAN_REQUEST_ZERO_FMA needs a floating-point tensorDataType, found {data_type}"
        ));
    }
    if global_address.is_null() || (global_address as usize) % 16 != 0 {
        return bad(format!(
            "globalAddress {global_address:p} must be 16-byte aligned"
        ));
    }
    if global_dim.is_null()
        || box_dim.is_null()
        || element_strides.is_null()
        || (rank > 1 && global_strides.is_null())
    {
        return bad(
            "globalDim, globalStrides (rank > 1), boxDim and elementStrides must be non-null"
                .into(),
        );
    }
    let r = rank as usize;
    let mut blob = TensorMapBlob {
        magic: TENSOR_MAP_MAGIC,
        rank: rank as u8,
        dtype: data_type as u8,
        elem_bytes,
        swizzle: swizzle as u8,
        oob_nan: oob_fill as u8,
        l2_promotion: l2_promotion as u8,
        global_address: global_address as u64,
        ..Default::default()
    };
    for i in 0..r {
        let d = *global_dim.add(i);
        if d == 0 || d > 1 << 32 {
            return bad(format!("globalDim[{i}] = {d}: expected 1..=2^32"));
        }
        blob.dims[i] = d;
        let b = *box_dim.add(i);
        if b == 0 || b > 256 {
            return bad(format!("boxDim[{i}] = {b}: expected 1..=256"));
        }
        blob.box_dims[i] = b as u16;
        let e = *element_strides.add(i);
        if e == 0 || e > 8 {
            return bad(format!("elementStrides[{i}] = {e}: expected 1..=8"));
        }
        // elementStrides[0] is ignored without interleave (TMA has no stride in dimension 0).
        if e != 1 && i > 0 {
            return unsupported(format!("elementStrides[{i}] = {e}: only 1 is emulated"));
        }
        blob.element_strides[i] = 1;
    }
    blob.strides[0] = elem_bytes as u64;
    for i in 1..r {
        let s = *global_strides.add(i - 1);
        if s % 16 != 0 || s >= 1 << 40 {
            return bad(format!(
                "globalStrides[{}] = {s}: expected a multiple of 16 below 2^40",
                i - 1
            ));
        }
        blob.strides[i] = s;
    }
    let inner = blob.box_dims[0] as u64 * elem_bytes as u64;
    if inner % 16 != 0 {
        return bad(format!(
            "boxDim[0] * element size = {inner} bytes: must be a multiple of 16 (interleave NONE)"
        ));
    }
    let span = [0u64, 32, 64, 128][swizzle as usize];
    if swizzle != 0 && inner > span {
        return bad(format!(
            "boxDim[0] * element size = {inner} bytes exceeds the {span}-byte swizzle span"
        ));
    }
    std::ptr::write(tensor_map as *mut TensorMapBlob, blob);
    CUDA_SUCCESS
}
