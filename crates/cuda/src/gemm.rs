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

use std::ffi::c_void;
use std::mem::size_of;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use openuni_tensor::DType;

use crate::device::{CudaDevice, DeviceBuffer};
use crate::error::{CudaError, DriverContext, Result};

/// The cuBLASLt handle of a device and its workspace (32 MiB from compute capability 9.0 on,
/// 4 MiB before, as NVIDIA recommends).
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
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
        dev.context().bind_to_thread().ctx(|| "binding the context".into())?;
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
        Ok(Blas { handle, workspace })
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
    x: u64,
    w: u64,
    y: u64,
    /// The C operand: `y` itself with beta = 0, or a residual added with beta = 1.
    c_ptr: u64,
    beta: f32,
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
    pub fn new(blas: &Blas, p: &LinearArgs) -> Result<LinearGemm> {
        Self::with_residual(blas, p, None)
    }

    /// As [`LinearGemm::new`], plus `residual` ([rows, out_features], same dtype) added to the
    /// product as cuBLASLt's C operand with beta = 1: `y = x·wᵀ (+ bias) + residual`, one rounding.
    /// `residual` may be `y` itself (in place) or another buffer.
    pub fn with_residual(blas: &Blas, p: &LinearArgs, residual: Option<u64>) -> Result<LinearGemm> {
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
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, residual.unwrap_or(p.y)),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.y),
            ] {
                let a = alignment(&[ptr]);
                lt::set_matmul_pref_attribute(pref.0, attr, &a as *const u32 as _, 4)
                    .ctx(what("alignment preference"))?;
            }
        }
        // SAFETY: all descriptors are live.
        let h = unsafe { lt::get_matmul_algo_heuristic(blas.handle, g.desc, g.a, g.b, g.c, g.c, pref.0) }
            .ctx(what("no cuBLASLt algorithm (cublasLtMatmulAlgoGetHeuristic)"))?;
        g.algo = h.algo;
        Ok(g)
    }

    /// Enqueues the GEMM on `dev`'s stream.
    ///
    /// # Safety
    /// The pointers given to [`LinearGemm::new`] must still be valid for these shapes.
    pub unsafe fn run(&self, dev: &CudaDevice, blas: &Blas) -> Result<()> {
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
            &self.algo,
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
