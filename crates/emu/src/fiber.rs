//! The scheduler of the emulated GPU: each CUDA thread is a corosensei fiber, each block runs on one
//! worker thread, blocks are shared out over a small pool of workers.
//!
//! Within a block the fibers run until they suspend at a barrier (`__syncthreads`), a warp exchange (every
//! warp intrinsic), a yield (`__nanosleep`) or exit. A warp exchange completes when every lane named in its
//! mask has arrived; the block barrier when every thread of the block has. When nothing can run and the
//! block is not finished, that is a deadlock, reported as CUDA_ERROR_LAUNCH_FAILED with every thread's
//! state, never a hang.
//!
//! Warp exchange buffers hold two slots per lane (the lane's exchange count parity). Each lane is resumed at
//! most once per pass, so a released lane has read its exchange before any lane can overwrite that slot.

use crate::registry::Kernel;
use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, OnceLock};

pub const CUDA_ERROR_INVALID_VALUE: i32 = 1;
pub const CUDA_ERROR_NOT_FOUND: i32 = 500;
pub const CUDA_ERROR_LAUNCH_FAILED: i32 = 719;

const XCHG_SLOT: usize = 64;
const MAX_DYN_SMEM: usize = 227 * 1024;

/// Mirrors `openuni_emu_thread` in include/openuni_emu_abi.h.
#[repr(C)]
pub struct ThreadState {
    tid: [u32; 3],
    bid: [u32; 3],
    bdim: [u32; 3],
    gdim: [u32; 3],
    lane: u32,
    warp: u32,
    ops: u32,
    parity: u32,
    sync_result: i32,
    reserved: u32,
    xchg: *mut u8,
    sched: *mut c_void,
}

/// Mirrors `openuni_emu_hooks`.
#[repr(C)]
struct Hooks {
    block_sync: unsafe extern "C" fn(*mut ThreadState, c_int, c_int, *const c_char, c_int),
    warp_sync: unsafe extern "C" fn(*mut ThreadState, u32, *const c_char, c_int),
    yield_now: unsafe extern "C" fn(*mut ThreadState),
    fail: unsafe extern "C" fn(*mut ThreadState, c_int, *const c_char, *const c_char, c_int),
    shared_register: unsafe extern "C" fn(*mut c_void, usize),
}

#[cfg(not(openuni_emu_no_kernels))]
extern "C" {
    fn openuni_emu_install_hooks(h: *const Hooks);
    fn openuni_emu_cur_slot() -> *mut *mut ThreadState;
    fn openuni_emu_dyn_smem_ptr() -> *mut u8;
    fn openuni_emu_block_begin(dyn_smem_size: u32);
}

/// The order in which a block's threads (and the grid's blocks) are run. Races that a missing barrier
/// causes show in one order or the other, so tests run both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Forward,
    Reverse,
}

#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dyn_smem: u32,
}

/// Per-launch overrides of the environment (`OPENUNI_EMU_THREAD_ORDER`, `OPENUNI_EMU_THREADS`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LaunchOptions {
    pub order: Option<Order>,
    pub threads: Option<usize>,
}

/// A failed launch: a CUDA error code and what happened.
#[derive(Clone, Debug)]
pub struct LaunchError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CUDA error {}: {}", self.code, self.message)
    }
}

impl std::error::Error for LaunchError {}

fn env_order() -> Order {
    static O: OnceLock<Order> = OnceLock::new();
    *O.get_or_init(|| match std::env::var("OPENUNI_EMU_THREAD_ORDER").as_deref() {
        Ok("reverse") => Order::Reverse,
        Ok("forward") | Err(_) | Ok("") => Order::Forward,
        Ok(other) => {
            eprintln!("openuni-emu: OPENUNI_EMU_THREAD_ORDER={other:?} is not forward|reverse; using forward");
            Order::Forward
        }
    })
}

/// Workers per launch: `OPENUNI_EMU_THREADS`, else min(cores, 4).
pub fn env_threads() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        std::env::var("OPENUNI_EMU_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
                    .min(4)
            })
    })
}

fn stack_size() -> usize {
    static S: OnceLock<usize> = OnceLock::new();
    *S.get_or_init(|| {
        std::env::var("OPENUNI_EMU_STACK_KB")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(128)
            * 1024
    })
}

// ---- per-thread scheduler records and the hooks the C++ side calls ---------------------------------------

const RUNNABLE: u8 = 0;
const WAIT_BLOCK: u8 = 1;
const WAIT_WARP: u8 = 2;
const EXITED: u8 = 3;
const FAILED: u8 = 4;
/// Gave way in a spin-wait (`__nanosleep`, the sm_90 twins' waits): runs again in the next pass over the
/// block, after every other warp has had its turn (a spin-wait across warps must let the other warps run).
const YIELDED: u8 = 5;

struct Rec {
    st: ThreadState,
    yielder: *const Yielder<(), ()>,
    status: u8,
    kind: i32,
    pred: i32,
    mask: u32,
    file: *const c_char,
    line: i32,
    fail_code: i32,
    fail_msg: String,
}

unsafe fn rec_of(t: *mut ThreadState) -> *mut Rec {
    (*t).sched as *mut Rec
}

unsafe fn suspend(r: *mut Rec) {
    (*(*r).yielder).suspend(());
}

unsafe extern "C" fn hook_block_sync(
    t: *mut ThreadState,
    kind: c_int,
    pred: c_int,
    file: *const c_char,
    line: c_int,
) {
    let r = rec_of(t);
    (*r).status = WAIT_BLOCK;
    (*r).kind = kind;
    (*r).pred = pred;
    (*r).file = file;
    (*r).line = line;
    suspend(r);
}

unsafe extern "C" fn hook_warp_sync(
    t: *mut ThreadState,
    mask: u32,
    file: *const c_char,
    line: c_int,
) {
    let r = rec_of(t);
    (*r).status = WAIT_WARP;
    (*r).mask = mask;
    (*r).file = file;
    (*r).line = line;
    suspend(r);
}

unsafe extern "C" fn hook_yield(t: *mut ThreadState) {
    let r = rec_of(t);
    (*r).status = YIELDED;
    suspend(r);
}

unsafe extern "C" fn hook_fail(
    t: *mut ThreadState,
    code: c_int,
    msg: *const c_char,
    file: *const c_char,
    line: c_int,
) {
    let r = rec_of(t);
    (*r).status = FAILED;
    (*r).fail_code = code;
    (*r).fail_msg = if msg.is_null() {
        String::new()
    } else {
        CStr::from_ptr(msg).to_string_lossy().into_owned()
    };
    (*r).file = file;
    (*r).line = line;
    // The scheduler never resumes a failed fiber; it is reset with the rest of the block.
    loop {
        suspend(r);
    }
}

thread_local! {
    /// Static `__shared__` arrays seen on this worker, per kernel: poisoned before each of its blocks.
    static SHARED_REGS: RefCell<HashMap<usize, Vec<(usize, usize)>>> = RefCell::new(HashMap::new());
    static CURRENT_KERNEL: Cell<usize> = const { Cell::new(0) };
}

unsafe extern "C" fn hook_shared_register(p: *mut c_void, n: usize) {
    // First use on this worker: nobody can have written it yet, so poison it now too.
    std::ptr::write_bytes(p as *mut u8, 0xFF, n);
    let k = CURRENT_KERNEL.with(|c| c.get());
    SHARED_REGS.with(|m| m.borrow_mut().entry(k).or_default().push((p as usize, n)));
}

#[cfg(not(openuni_emu_no_kernels))]
fn install_hooks() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        static HOOKS: Hooks = Hooks {
            block_sync: hook_block_sync,
            warp_sync: hook_warp_sync,
            yield_now: hook_yield,
            fail: hook_fail,
            shared_register: hook_shared_register,
        };
        unsafe { openuni_emu_install_hooks(&HOOKS) };
    });
}

// ---- one block on this worker ------------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct Warp {
    existing: u32,
    exited: u32,
    arrived: u32,
}

type Fiber = Coroutine<(), (), (), DefaultStack>;

#[derive(Default)]
struct Worker {
    stacks: Vec<DefaultStack>,
    recs: Vec<Rec>,
    warps: Vec<Warp>,
    xchg: Vec<u8>,
    fibers: Vec<Option<Fiber>>,
}

thread_local! {
    static WORKER: RefCell<Worker> = RefCell::new(Worker::default());
}

#[derive(Clone, Copy)]
struct Params(*mut *mut c_void);
unsafe impl Send for Params {}
unsafe impl Sync for Params {}

fn site(file: *const c_char, line: i32) -> String {
    if file.is_null() {
        return "?".into();
    }
    let f = unsafe { CStr::from_ptr(file) }.to_string_lossy();
    format!("{f}:{line}")
}

#[cfg(not(openuni_emu_no_kernels))]
fn run_block(
    k: &Kernel,
    cfg: &LaunchConfig,
    b: u64,
    params: Params,
    order: Order,
) -> Result<(), LaunchError> {
    WORKER.with(|w| {
        let mut w = w.borrow_mut();
        let w = &mut *w;
        let [bx, by, bz] = cfg.block;
        let [gx, gy, _] = cfg.grid;
        let n = (bx * by * bz) as usize;
        let nwarps = n.div_ceil(32);
        let bid = [
            (b % gx as u64) as u32,
            ((b / gx as u64) % gy as u64) as u32,
            (b / (gx as u64 * gy as u64)) as u32,
        ];

        w.xchg.resize(nwarps * 32 * 2 * XCHG_SLOT, 0);
        w.warps.clear();
        for i in 0..nwarps {
            let cnt = (n - i * 32).min(32);
            let existing = if cnt == 32 {
                u32::MAX
            } else {
                (1u32 << cnt) - 1
            };
            w.warps.push(Warp {
                existing,
                exited: 0,
                arrived: 0,
            });
        }
        w.recs.clear();
        w.recs.reserve(n);
        let xchg = w.xchg.as_mut_ptr();
        for lin in 0..n {
            let (x, y, z) = (
                lin as u32 % bx,
                (lin as u32 / bx) % by,
                lin as u32 / (bx * by),
            );
            w.recs.push(Rec {
                st: ThreadState {
                    tid: [x, y, z],
                    bid,
                    bdim: cfg.block,
                    gdim: cfg.grid,
                    lane: (lin % 32) as u32,
                    warp: (lin / 32) as u32,
                    ops: 0,
                    parity: 0,
                    sync_result: 0,
                    reserved: 0,
                    xchg: unsafe { xchg.add((lin / 32) * 32 * 2 * XCHG_SLOT) },
                    sched: std::ptr::null_mut(),
                },
                yielder: std::ptr::null(),
                status: RUNNABLE,
                kind: 0,
                pred: 0,
                mask: 0,
                file: std::ptr::null(),
                line: 0,
                fail_code: 0,
                fail_msg: String::new(),
            });
        }
        let recs = w.recs.as_mut_ptr();
        for lin in 0..n {
            unsafe { (*recs.add(lin)).st.sched = recs.add(lin) as *mut c_void };
        }

        // Poison shared memory: unwritten reads show as NaN / 0xFF bytes.
        let kkey = k as *const Kernel as usize;
        CURRENT_KERNEL.with(|c| c.set(kkey));
        SHARED_REGS.with(|m| {
            if let Some(v) = m.borrow().get(&kkey) {
                for &(p, len) in v {
                    unsafe { std::ptr::write_bytes(p as *mut u8, 0xFF, len) };
                }
            }
        });
        unsafe {
            std::ptr::write_bytes(
                openuni_emu_dyn_smem_ptr(),
                0xFF,
                (cfg.dyn_smem as usize).min(MAX_DYN_SMEM),
            );
            openuni_emu_block_begin(cfg.dyn_smem.min(MAX_DYN_SMEM as u32));
        };

        // One fiber per CUDA thread, on reused guard-paged stacks.
        let launch = k.launch;
        w.fibers.clear();
        for lin in 0..n {
            let stack = match w.stacks.pop() {
                Some(s) => s,
                None => DefaultStack::new(stack_size()).map_err(|e| LaunchError {
                    code: CUDA_ERROR_LAUNCH_FAILED,
                    message: format!("cannot allocate a fiber stack: {e}"),
                })?,
            };
            let rec = unsafe { recs.add(lin) } as usize;
            let p = params;
            w.fibers.push(Some(Coroutine::with_stack(
                stack,
                move |y: &Yielder<(), ()>, ()| {
                    let p = p;
                    unsafe {
                        (*(rec as *mut Rec)).yielder = y as *const _;
                        launch(p.0);
                    }
                },
            )));
        }

        let result = schedule(w, recs, n, order);
        let result = result.map_err(|msg| {
            let (bx_, by_, bz_) = (bid[0], bid[1], bid[2]);
            LaunchError {
                code: msg.0,
                message: format!(
                    "kernel `{}` ({}), block ({bx_},{by_},{bz_}) of {} threads: {}",
                    k.name, k.file, n, msg.1
                ),
            }
        });

        // Give the stacks back. A fiber still suspended (failure, deadlock) is reset without unwinding: its
        // frames hold nothing to drop, and unwinding through the C++ frames is not allowed.
        for f in w.fibers.drain(..) {
            if let Some(mut f) = f {
                if !f.done() {
                    unsafe { f.force_reset() };
                }
                w.stacks.push(f.into_stack());
            }
        }
        result
    })
}

/// Runs the block's fibers to completion. Err((code, message)) on a deadlock or a failure.
#[cfg(not(openuni_emu_no_kernels))]
fn schedule(w: &mut Worker, recs: *mut Rec, n: usize, order: Order) -> Result<(), (i32, String)> {
    let slot = unsafe { openuni_emu_cur_slot() };
    let nwarps = w.warps.len();
    let mut exited = 0usize;
    let mut waiting_block = 0usize;
    loop {
        let mut yielded = false;
        for wi in 0..nwarps {
            let wi = if order == Order::Reverse {
                nwarps - 1 - wi
            } else {
                wi
            };
            let first = wi * 32;
            let cnt = (n - first).min(32);
            // Passes over the warp's lanes until none of them can run.
            loop {
                let mut progressed = false;
                for li in 0..cnt {
                    let lane = if order == Order::Reverse {
                        cnt - 1 - li
                    } else {
                        li
                    };
                    let i = first + lane;
                    let r = unsafe { &mut *recs.add(i) };
                    if r.status != RUNNABLE {
                        continue;
                    }
                    progressed = true;
                    unsafe { *slot = &mut r.st };
                    let res = w.fibers[i].as_mut().unwrap().resume(());
                    unsafe { *slot = std::ptr::null_mut() };
                    let r = unsafe { &mut *recs.add(i) };
                    match res {
                        CoroutineResult::Return(()) => {
                            r.status = EXITED;
                            exited += 1;
                            let warp = &mut w.warps[wi];
                            warp.exited |= 1 << lane;
                            // A lane waiting for an exchange that names this lane can never complete.
                            if warp.arrived != 0 {
                                for j in 0..cnt {
                                    let o = unsafe { &*recs.add(first + j) };
                                    if warp.arrived & (1 << j) != 0 && o.mask & (1 << lane) != 0 {
                                        return Err((
                                            CUDA_ERROR_LAUNCH_FAILED,
                                            format!(
                                                "warp {wi}: lane {lane} exited while lane {j} waits for it in a warp \
                                                 operation at {} (mask {:#010x})\n{}",
                                                site(o.file, o.line),
                                                o.mask,
                                                describe(recs, n)
                                            ),
                                        ));
                                    }
                                }
                            }
                        }
                        CoroutineResult::Yield(()) => match r.status {
                            WAIT_BLOCK => waiting_block += 1,
                            YIELDED => yielded = true,
                            WAIT_WARP => {
                                warp_arrive(&mut w.warps[wi], recs, first, cnt, lane, wi, n)?
                            }
                            FAILED => {
                                return Err((
                                    r.fail_code,
                                    format!(
                                        "thread ({},{},{}) at {}: {}",
                                        r.st.tid[0],
                                        r.st.tid[1],
                                        r.st.tid[2],
                                        site(r.file, r.line),
                                        r.fail_msg
                                    ),
                                ))
                            }
                            _ => {}
                        },
                    }
                }
                if !progressed {
                    break;
                }
            }
        }
        if yielded {
            for i in 0..n {
                let r = unsafe { &mut *recs.add(i) };
                if r.status == YIELDED {
                    r.status = RUNNABLE;
                }
            }
            continue;
        }
        if exited == n {
            return Ok(());
        }
        if waiting_block + exited == n && exited == 0 {
            // Everybody is at a barrier: the same one?
            let r0 = unsafe { &*recs };
            let mut same = true;
            let (mut count, mut all, mut any) = (0i32, true, false);
            for i in 0..n {
                let r = unsafe { &*recs.add(i) };
                same &= r.kind == r0.kind
                    && r.line == r0.line
                    && (r.file == r0.file || site(r.file, 0) == site(r0.file, 0));
                count += r.pred;
                all &= r.pred != 0;
                any |= r.pred != 0;
            }
            if !same {
                return Err((
                    CUDA_ERROR_LAUNCH_FAILED,
                    format!(
                        "barrier deadlock: the threads wait at different barriers\n{}",
                        describe(recs, n)
                    ),
                ));
            }
            let result = match r0.kind {
                1 => count,
                2 => all as i32,
                3 => any as i32,
                _ => 0,
            };
            for i in 0..n {
                let r = unsafe { &mut *recs.add(i) };
                r.st.sync_result = result;
                r.status = RUNNABLE;
            }
            waiting_block = 0;
            continue;
        }
        let what = if waiting_block > 0 && exited > 0 {
            "a barrier is not reached by all threads of the block (some exited)"
        } else if waiting_block > 0 {
            "a barrier is not reached by all threads of the block (others wait in warp operations)"
        } else {
            "warp operations cannot complete"
        };
        return Err((
            CUDA_ERROR_LAUNCH_FAILED,
            format!("barrier deadlock: {what}\n{}", describe(recs, n)),
        ));
    }
}

/// A lane arrived at a warp exchange: release the lanes named in the mask once all of them have.
#[inline]
fn warp_arrive(
    warp: &mut Warp,
    recs: *mut Rec,
    first: usize,
    cnt: usize,
    lane: usize,
    wi: usize,
    n: usize,
) -> Result<(), (i32, String)> {
    let r = unsafe { &*recs.add(first + lane) };
    let eff = r.mask & warp.existing;
    if eff & (1 << lane) == 0 {
        return Err((
            CUDA_ERROR_LAUNCH_FAILED,
            format!("warp {wi} lane {lane}: warp operation at {} with mask {:#010x} that does not name the calling lane", site(r.file, r.line), r.mask),
        ));
    }
    if eff & warp.exited != 0 {
        return Err((
            CUDA_ERROR_LAUNCH_FAILED,
            format!(
                "warp {wi} lane {lane}: warp operation at {} names exited lanes (mask {:#010x}, exited {:#010x})\n{}",
                site(r.file, r.line),
                r.mask,
                warp.exited,
                describe(recs, n)
            ),
        ));
    }
    warp.arrived |= 1 << lane;
    if warp.arrived & eff != eff {
        return Ok(());
    }
    let mut parity = 0u32;
    for j in 0..cnt {
        if eff & (1 << j) != 0 {
            let o = unsafe { &*recs.add(first + j) };
            if o.mask & warp.existing != eff {
                return Err((
                    CUDA_ERROR_LAUNCH_FAILED,
                    format!(
                        "warp {wi}: lanes meet with different masks ({:#010x} at {}, {:#010x} at {})",
                        r.mask,
                        site(r.file, r.line),
                        o.mask,
                        site(o.file, o.line)
                    ),
                ));
            }
            parity |= (o.st.ops.wrapping_sub(1) & 1) << j;
        }
    }
    for j in 0..cnt {
        if eff & (1 << j) != 0 {
            let o = unsafe { &mut *recs.add(first + j) };
            o.st.parity = parity;
            o.status = RUNNABLE;
        }
    }
    warp.arrived &= !eff;
    Ok(())
}

/// Every thread's state, grouped into runs of consecutive threads in the same state.
fn describe(recs: *mut Rec, n: usize) -> String {
    let state = |i: usize| -> String {
        let r = unsafe { &*recs.add(i) };
        match r.status {
            RUNNABLE => "runnable".into(),
            YIELDED => "spin-waiting".into(),
            WAIT_BLOCK => {
                let name = [
                    "__syncthreads()",
                    "__syncthreads_count()",
                    "__syncthreads_and()",
                    "__syncthreads_or()",
                ][r.kind.clamp(0, 3) as usize];
                format!("waiting at {name} {}", site(r.file, r.line))
            }
            WAIT_WARP => format!(
                "waiting in a warp operation at {} (mask {:#010x})",
                site(r.file, r.line),
                r.mask
            ),
            EXITED => "exited".into(),
            _ => "failed".into(),
        }
    };
    let mut s = String::from("thread states (linear thread index):");
    let mut start = 0;
    let mut cur = state(0);
    for i in 1..=n {
        let next = if i < n { state(i) } else { String::new() };
        if i == n || next != cur {
            if start == i - 1 {
                write!(s, "\n  thread {start}: {cur}").unwrap();
            } else {
                write!(s, "\n  threads {start}-{}: {cur}", i - 1).unwrap();
            }
            start = i;
            cur = next;
        }
    }
    s
}

// ---- the grid: blocks over a pool of workers -------------------------------------------------------------

struct Job {
    kernel: &'static Kernel,
    cfg: LaunchConfig,
    params: Params,
    order: Order,
    total: u64,
    next: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<(u64, LaunchError)>>,
    pending: AtomicUsize,
    done: (Mutex<bool>, Condvar),
}

#[cfg(not(openuni_emu_no_kernels))]
fn run_job(job: &Job) {
    loop {
        if job.failed.load(Ordering::Relaxed) {
            return;
        }
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.total {
            return;
        }
        let b = if job.order == Order::Reverse {
            job.total - 1 - i
        } else {
            i
        };
        if let Err(e) = run_block(job.kernel, &job.cfg, b, job.params, job.order) {
            job.failed.store(true, Ordering::Relaxed);
            let mut slot = job.error.lock().unwrap();
            if slot.as_ref().map(|(ob, _)| b < *ob).unwrap_or(true) {
                *slot = Some((b, e));
            }
        }
    }
}

struct Pool {
    senders: Mutex<Vec<mpsc::Sender<Arc<Job>>>>,
}

#[cfg(not(openuni_emu_no_kernels))]
fn pool_send(extra: usize, job: &Arc<Job>) {
    static POOL: OnceLock<Pool> = OnceLock::new();
    let pool = POOL.get_or_init(|| Pool {
        senders: Mutex::new(Vec::new()),
    });
    let mut senders = pool.senders.lock().unwrap();
    while senders.len() < extra {
        let (tx, rx) = mpsc::channel::<Arc<Job>>();
        let idx = senders.len() + 1;
        std::thread::Builder::new()
            .name(format!("openuni-emu-{idx}"))
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    run_job(&job);
                    finish(&job);
                }
            })
            .expect("spawning an emulator worker");
        senders.push(tx);
    }
    for tx in senders.iter().take(extra) {
        tx.send(job.clone()).expect("emulator worker is gone");
    }
}

fn finish(job: &Job) {
    if job.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
        let mut d = job.done.0.lock().unwrap();
        *d = true;
        job.done.1.notify_all();
    }
}

/// Checks a launch configuration against an H100's limits.
pub fn check_config(cfg: &LaunchConfig) -> Result<(), LaunchError> {
    let [bx, by, bz] = cfg.block;
    let [gx, gy, gz] = cfg.grid;
    let bad = |m: String| {
        Err(LaunchError {
            code: CUDA_ERROR_INVALID_VALUE,
            message: m,
        })
    };
    if bx == 0 || by == 0 || bz == 0 || gx == 0 || gy == 0 || gz == 0 {
        return bad(format!(
            "zero-sized grid ({gx},{gy},{gz}) or block ({bx},{by},{bz})"
        ));
    }
    if bx > 1024 || by > 1024 || bz > 64 || (bx as u64 * by as u64 * bz as u64) > 1024 {
        return bad(format!(
            "block ({bx},{by},{bz}) exceeds 1024 threads per block (max dims 1024, 1024, 64)"
        ));
    }
    if gx > i32::MAX as u32 || gy > 65535 || gz > 65535 {
        return bad(format!(
            "grid ({gx},{gy},{gz}) exceeds the maximum grid size (2^31-1, 65535, 65535)"
        ));
    }
    if cfg.dyn_smem as usize > MAX_DYN_SMEM {
        return bad(format!(
            "{} bytes of dynamic shared memory exceed the 227 KiB per block",
            cfg.dyn_smem
        ));
    }
    Ok(())
}

/// Runs `kernel` on the CPU, synchronously. `params[i]` points at argument i's value, as for cuLaunchKernel.
///
/// # Safety
/// `params` must hold `kernel.param_sizes.len()` valid pointers to values of the kernel's parameter types,
/// and every pointer argument must be valid for what the kernel does with it.
pub unsafe fn launch(
    kernel: &'static Kernel,
    cfg: &LaunchConfig,
    params: *mut *mut c_void,
    opts: &LaunchOptions,
) -> Result<(), LaunchError> {
    check_config(cfg)?;
    #[cfg(openuni_emu_no_kernels)]
    {
        let _ = (kernel, params, opts);
        return Err(LaunchError {
            code: CUDA_ERROR_NOT_FOUND,
            message: crate::registry::NO_KERNELS_MSG.into(),
        });
    }
    #[cfg(not(openuni_emu_no_kernels))]
    {
        install_hooks();
        let order = opts.order.unwrap_or_else(env_order);
        let total = cfg.grid[0] as u64 * cfg.grid[1] as u64 * cfg.grid[2] as u64;
        let workers = (opts.threads.unwrap_or_else(env_threads).max(1) as u64).min(total) as usize;
        let job = Arc::new(Job {
            kernel,
            cfg: *cfg,
            params: Params(params),
            order,
            total,
            next: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            pending: AtomicUsize::new(workers),
            done: (Mutex::new(false), Condvar::new()),
        });
        if workers > 1 {
            pool_send(workers - 1, &job);
        }
        run_job(&job);
        finish(&job);
        let mut d = job.done.0.lock().unwrap();
        while !*d {
            d = job.done.1.wait(d).unwrap();
        }
        drop(d);
        let err = job.error.lock().unwrap().take();
        match err {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }
}
