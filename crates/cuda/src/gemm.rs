//! cuBLASLt GEMMs for `Op::Linear`, through cudarc's `cublaslt::result`/`sys` layer with raw
//! device pointers (so operands can live anywhere in the one arena).
//!
//! `y[rows, out] = x[rows, in] · w[out, in]ᵀ (+ bias) (then GELU)`. cuBLASLt is column-major, and
//! a row-major [r, c] matrix is a column-major [c, r] one, so we compute yᵀ = w · xᵀ:
//!   A = w, stored column-major as [in, out] with lda = in, TRANSA = T  -> op(A) = [out, in]
//!   B = x, stored column-major as [in, rows] with ldb = in, TRANSB = N
//!   C = D = y, column-major [out, rows], ldc = out
//! so m = out, n = rows, k = in. The bias epilogue adds bias[out] to every column of D (every row
//! of y). bf16 storage: A, B, C, D and bias in bf16, compute and scale in f32
//! (CUBLAS_COMPUTE_32F); f32 storage: everything f32, CUBLAS_COMPUTE_32F (no TF32).
//!
//! The algorithm: on the first use of a (device, driver, cuBLASLt version, shape, dtypes,
//! epilogue, operand alignments) the top [`ALGO_CANDIDATES`] of cuBLASLt's heuristic are each
//! timed with CUDA events (one warm-up, then the median of 5 runs) and the fastest is kept, in
//! memory and on disk ([`crate::gemm_cache`]); later uses, in this process or the next, read the
//! choice. On the emulated GPU timing means nothing: every candidate still runs once (the code
//! path is exercised; above 2^27 multiply-adds only the first, to keep CPU time bounded) and the
//! choice is always the first, so results are deterministic there.

use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use openuni_tensor::DType;

use crate::device::{CudaDevice, DeviceBuffer};
use crate::error::{CudaError, DriverContext, Result};
use crate::gemm_cache::AlgoCache;

/// How many of cuBLASLt's heuristic candidates are timed on the first use of a shape.
pub const ALGO_CANDIDATES: usize = 4;

/// On the emulated GPU (CPU GEMMs) every candidate runs once only up to this many multiply-adds;
/// a larger GEMM runs just the first (the choice there) when its shape is first seen.
const EMU_TRY_ALL_MACS: u64 = 1 << 27;

/// The cuBLASLt handle of a device and its workspace (32 MiB from compute capability 9.0 on,
/// 4 MiB before, as NVIDIA recommends).
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
    /// Device name, compute capability, driver and cuBLASLt versions: the part of a choice's key
    /// that says where it was measured.
    identity: String,
    choices: AlgoCache,
}

// SAFETY: the handle is only used on the device's one stream; cuBLASLt handles may be shared
// between threads when calls are serialised, which the executor's &mut self guarantees.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

/// Whether libcublasLt can be loaded.
pub fn cublaslt_present() -> bool {
    // SAFETY: only tries to dlopen the library by name.
    unsafe { sys::is_culib_present() }
}

impl CudaDevice {
    /// cuBLASLt handle and workspace of this device handle, created on first use.
    pub fn blas(&self) -> Result<Arc<Blas>> {
        self.singleton(Blas::new)
    }
}

impl Blas {
    fn new(dev: &CudaDevice) -> Result<Blas> {
        if !cublaslt_present() {
            return Err(CudaError::NoCublasLt { node: "-".into() });
        }
        dev.context()
            .bind_to_thread()
            .ctx(|| "binding the context".into())?;
        let handle = lt::create_handle().ctx(|| "creating the cuBLASLt handle".into())?;
        let ws = if dev.compute_capability().0 >= 9 {
            32 << 20
        } else {
            4 << 20
        };
        let workspace = match dev.alloc(ws) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: created just above.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(e);
            }
        };
        let mut driver = 0i32;
        // SAFETY: writes one int.
        let _ = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        // SAFETY: a plain query of the loaded library.
        let lt_version = unsafe { sys::cublasLtGetVersion() };
        let (ma, mi) = dev.compute_capability();
        let identity = format!(
            "{} sm_{ma}{mi} driver {driver} cublasLt {lt_version}",
            dev.name()
        );
        Ok(Blas {
            handle,
            workspace,
            identity,
            choices: AlgoCache::default_location(),
        })
    }

    /// Where the per-shape algorithm choices are kept (None: in memory only).
    pub fn choice_cache(&self) -> Option<&std::path::Path> {
        self.choices.path()
    }

    /// The device and library versions that a cached choice was made on (part of every key).
    pub(crate) fn identity(&self) -> &str {
        &self.identity
    }

    /// The per-shape choices kept on disk (also the MixFFN's path choice, families::mixffn_inverted_glu).
    pub(crate) fn choices(&self) -> &AlgoCache {
        &self.choices
    }

    pub fn workspace_bytes(&self) -> usize {
        self.workspace.bytes()
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by create_handle, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// What runs after the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// `+ bias[out]`.
    Bias,
    /// cuBLASLt's GELU (the tanh approximation).
    Gelu,
    /// `+ bias`, then GELU (tanh).
    BiasGelu,
}

/// One linear layer's GEMM with fixed shapes and pointers: descriptors, layouts and the algorithm
/// are chosen once, so running it makes exactly one `cublasLtMatmul` call (capturable in a CUDA
/// graph).
pub struct LinearGemm {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
    choice: AlgoChoice,
    /// m · n · k.
    macs: u64,
    x: u64,
    w: u64,
    y: u64,
    /// The C operand: `y` itself with beta = 0, or a residual added with beta = 1.
    c_ptr: u64,
    beta: f32,
}

/// Which heuristic candidate a [`LinearGemm`] runs, and how it was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlgoChoice {
    /// Position in cuBLASLt's heuristic list.
    pub index: usize,
    /// Candidates the heuristic returned (at most [`ALGO_CANDIDATES`]).
    pub candidates: usize,
    /// Read from the choice cache (no timing was needed).
    pub cached: bool,
}

// SAFETY: the descriptors are plain heap objects owned by this value.
unsafe impl Send for LinearGemm {}
unsafe impl Sync for LinearGemm {}

/// Shapes and operands of [`LinearGemm::new`].
#[derive(Clone, Copy, Debug)]
pub struct LinearArgs {
    pub dtype: DType,
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub epilogue: Epilogue,
    pub x: u64,
    pub w: u64,
    /// Required by [`Epilogue::Bias`] and [`Epilogue::BiasGelu`].
    pub bias: Option<u64>,
    pub y: u64,
}

/// Largest power of two (<= 256) dividing every address: the alignment cuBLASLt may assume.
fn alignment(ptrs: &[u64]) -> u32 {
    let mut a = 256u32;
    for &p in ptrs {
        while a > 1 && p % a as u64 != 0 {
            a /= 2;
        }
    }
    a
}

impl LinearGemm {
    /// Plans the GEMM: descriptors, layouts, and the algorithm (timed on first use of the shape,
    /// see the module docs; the timing runs write `y`, so plan before `y` holds anything).
    pub fn new(dev: &CudaDevice, blas: &Blas, p: &LinearArgs) -> Result<LinearGemm> {
        Self::with_residual(dev, blas, p, None)
    }

    /// As [`LinearGemm::new`], plus `residual` ([rows, out_features], same dtype) added to the
    /// product as cuBLASLt's C operand with beta = 1: `y = x·wᵀ (+ bias) + residual`, one rounding.
    /// `residual` may be `y` itself (in place) or another buffer. Planning runs the candidate
    /// algorithms, which write `y` (and, with `residual` = `y`, read it): plan before `y` holds
    /// the residual.
    pub fn with_residual(
        dev: &CudaDevice,
        blas: &Blas,
        p: &LinearArgs,
        residual: Option<u64>,
    ) -> Result<LinearGemm> {
        let what = |s: &'static str| {
            move || {
                format!(
                    "linear [{}, {}] x [{}, {}]ᵀ: {s}",
                    p.rows, p.in_features, p.out_features, p.in_features
                )
            }
        };
        let dt = match p.dtype {
            DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            d => return Err(CudaError::DType(d)),
        };
        let needs_bias = matches!(p.epilogue, Epilogue::Bias | Epilogue::BiasGelu);
        if needs_bias != p.bias.is_some() {
            return Err(CudaError::Invalid {
                what: "linear".into(),
                msg: format!("epilogue {:?} with bias {:?}", p.epilogue, p.bias),
            });
        }
        let (m, n, k) = (p.out_features as u64, p.rows as u64, p.in_features as u64);
        let mut g = LinearGemm {
            desc: std::ptr::null_mut(),
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            c: std::ptr::null_mut(),
            // SAFETY: a plain C struct, overwritten by the heuristic below.
            algo: unsafe { std::mem::zeroed() },
            choice: AlgoChoice {
                index: 0,
                candidates: 0,
                cached: false,
            },
            macs: (p.out_features * p.rows * p.in_features) as u64,
            x: p.x,
            w: p.w,
            y: p.y,
            c_ptr: residual.unwrap_or(p.y),
            beta: if residual.is_some() { 1.0 } else { 0.0 },
        };
        g.a = lt::create_matrix_layout(dt, k, m, k as i64).ctx(what("layout of A"))?;
        g.b = lt::create_matrix_layout(dt, k, n, k as i64).ctx(what("layout of B"))?;
        g.c = lt::create_matrix_layout(dt, m, n, m as i64).ctx(what("layout of C"))?;
        g.desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .ctx(what("matmul descriptor"))?;
        let set = |attr: sys::cublasLtMatmulDescAttributes_t, v: *const c_void, size: usize| {
            // SAFETY: `desc` is live; `v` points at `size` bytes of the attribute's type.
            unsafe { lt::set_matmul_desc_attribute(g.desc, attr, v, size) }
        };
        let trans_t: i32 = 1; // CUBLAS_OP_T
        let trans_n: i32 = 0; // CUBLAS_OP_N
        use sys::cublasLtMatmulDescAttributes_t as A;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSA,
            &trans_t as *const i32 as _,
            size_of::<i32>(),
        )
        .ctx(what("TRANSA"))?;
        set(
            A::CUBLASLT_MATMUL_DESC_TRANSB,
            &trans_n as *const i32 as _,
            size_of::<i32>(),
        )
        .ctx(what("TRANSB"))?;
        let epi = match p.epilogue {
            Epilogue::None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::Gelu => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU,
            Epilogue::BiasGelu => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        };
        set(
            A::CUBLASLT_MATMUL_DESC_EPILOGUE,
            &epi as *const _ as _,
            size_of::<sys::cublasLtEpilogue_t>(),
        )
        .ctx(what("EPILOGUE"))?;
        if let Some(bias) = p.bias {
            set(
                A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias as *const u64 as _,
                size_of::<u64>(),
            )
            .ctx(what("BIAS_POINTER"))?;
        }

        let pref = lt::create_matmul_pref().ctx(what("preference"))?;
        struct Pref(sys::cublasLtMatmulPreference_t);
        impl Drop for Pref {
            fn drop(&mut self) {
                // SAFETY: created above, destroyed once.
                let _ = unsafe { lt::destroy_matmul_pref(self.0) };
            }
        }
        let pref = Pref(pref);
        let ws = blas.workspace.bytes() as u64;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        // SAFETY: live preference; values of the attributes' types (u64 workspace, u32 alignments).
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as _,
                8,
            )
            .ctx(what("workspace preference"))?;
            for (attr, ptr) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.w),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.x),
                (
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    residual.unwrap_or(p.y),
                ),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.y),
            ] {
                let a = alignment(&[ptr]);
                lt::set_matmul_pref_attribute(pref.0, attr, &a as *const u32 as _, 4)
                    .ctx(what("alignment preference"))?;
            }
        }
        // SAFETY: all descriptors are live.
        let cands = unsafe { heuristic_candidates(blas, &g, pref.0) }.ctx(what(
            "no cuBLASLt algorithm (cublasLtMatmulAlgoGetHeuristic)",
        ))?;
        let align = |ptr: u64| alignment(&[ptr]);
        let key = format!(
            "{}|{:?}|m{m} n{n} k{k}|{:?}|align w{} x{} y{} bias{}|beta{}",
            blas.identity,
            p.dtype,
            p.epilogue,
            align(p.w),
            align(p.x),
            align(p.y),
            p.bias.map_or(0, align),
            residual.map_or(0, align)
        );
        let (index, cached) = match blas.choices.get(&key) {
            Some(i) if i < cands.len() => (i, true),
            _ => {
                let i = g.choose(dev, blas, &cands)?;
                blas.choices.insert(&key, i);
                (i, false)
            }
        };
        g.algo = cands[index].algo;
        g.choice = AlgoChoice {
            index,
            candidates: cands.len(),
            cached,
        };
        Ok(g)
    }

    /// The algorithm this GEMM runs and how it was chosen.
    pub fn algo_choice(&self) -> AlgoChoice {
        self.choice
    }

    /// The fastest candidate by CUDA-event timing (one warm-up, median of 5); on the emulated GPU
    /// each candidate runs once and the first is kept. A candidate that fails to run is skipped.
    fn choose(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        cands: &[sys::cublasLtMatmulHeuristicResult_t],
    ) -> Result<usize> {
        const RUNS: usize = 5;
        let mut best: Option<(f32, usize)> = None;
        let mut last_err = None;
        for (i, c) in cands.iter().enumerate() {
            // SAFETY: the operands given to `new` are valid for these shapes (its contract).
            if dev.is_emulated() && i > 0 && self.macs > EMU_TRY_ALL_MACS {
                break; // large on the emulator: only the choice itself runs
            }
            if let Err(e) = unsafe { self.run_algo(dev, blas, &c.algo) } {
                last_err = Some(e);
                continue;
            }
            if dev.is_emulated() {
                continue;
            }
            let (start, end) = (dev.timing_event()?, dev.timing_event()?);
            let mut times = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                dev.record(&start)?;
                // SAFETY: as above.
                unsafe { self.run_algo(dev, blas, &c.algo) }?;
                dev.record(&end)?;
                dev.synchronize()?;
                times.push(
                    start
                        .elapsed_ms(&end)
                        .ctx(|| "timing a cuBLASLt candidate".into())?,
                );
            }
            times.sort_by(|a, b| a.total_cmp(b));
            let median = times[RUNS / 2];
            if best.is_none_or(|(t, _)| median < t) {
                best = Some((median, i));
            }
        }
        dev.synchronize()?;
        if dev.is_emulated() && last_err.is_none() {
            return Ok(0);
        }
        match (best, last_err) {
            (Some((_, i)), _) => Ok(i),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(0),
        }
    }

    /// Enqueues the GEMM on `dev`'s stream.
    ///
    /// # Safety
    /// The pointers given to [`LinearGemm::new`] must still be valid for these shapes.
    pub unsafe fn run(&self, dev: &CudaDevice, blas: &Blas) -> Result<()> {
        self.run_algo(dev, blas, &self.algo)
    }

    /// # Safety
    /// As [`LinearGemm::run`].
    unsafe fn run_algo(
        &self,
        dev: &CudaDevice,
        blas: &Blas,
        algo: &sys::cublasLtMatmulAlgo_t,
    ) -> Result<()> {
        let alpha = 1.0f32;
        let beta = self.beta;
        lt::matmul(
            blas.handle,
            self.desc,
            &alpha as *const f32 as _,
            &beta as *const f32 as _,
            self.w as *const c_void,
            self.a,
            self.x as *const c_void,
            self.b,
            self.c_ptr as *const c_void,
            self.c,
            self.y as *mut c_void,
            self.c,
            algo,
            blas.workspace.ptr() as *mut c_void,
            blas.workspace.bytes(),
            dev.stream().cu_stream() as sys::cudaStream_t,
        )
        .ctx(|| "cublasLtMatmul".into())
    }
}

impl Drop for LinearGemm {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created by this value and is destroyed once.
        unsafe {
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
            for l in [self.a, self.b, self.c] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
        }
    }
}

/// Up to [`ALGO_CANDIDATES`] heuristic results with a success state, best first.
///
/// # Safety
/// The descriptors of `g` and `pref` must be live.
unsafe fn heuristic_candidates(
    blas: &Blas,
    g: &LinearGemm,
    pref: sys::cublasLtMatmulPreference_t,
) -> std::result::Result<
    Vec<sys::cublasLtMatmulHeuristicResult_t>,
    cudarc::cublaslt::result::CublasError,
> {
    let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
        vec![std::mem::zeroed(); ALGO_CANDIDATES];
    let mut count = 0i32;
    sys::cublasLtMatmulAlgoGetHeuristic(
        blas.handle,
        g.desc,
        g.a,
        g.b,
        g.c,
        g.c,
        pref,
        ALGO_CANDIDATES as i32,
        results.as_mut_ptr(),
        &mut count,
    )
    .result()?;
    results.truncate(count.clamp(0, ALGO_CANDIDATES as i32) as usize);
    results.retain(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    if results.is_empty() {
        return Err(cudarc::cublaslt::result::CublasError(
            sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
        ));
    }
    Ok(results)
}
