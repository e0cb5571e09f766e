//! The cuBLASLt calls cudarc makes for a matmul, computed on the CPU (`libcublasLt.so.13`).
//!
//! Semantics from NVIDIA's cuBLASLt documentation: column-major layouts (`CUBLASLT_ORDER_COL` only),
//! `D = epilogue(alpha * op(A) @ op(B) + beta * C + bias)` with op(A) m x k, op(B) k x n, C and D m x n,
//! the bias a vector of m (one value per row of D), strided batches. Accumulation is f32 (matrixmultiply's
//! sgemm) and D is rounded once at the end, like a GPU with f32 accumulation. The FAST compute types
//! round the inputs first, as the tensor cores do: 32F_FAST_TF32 (77) to TF32 (round to nearest, ties
//! away), 32F_FAST_16BF (75) to bf16, 32F_FAST_16F (74) to f16. The GELU epilogues use the tanh form.
//! Operands are checked against the emulated driver's allocation table. Inside stream capture the matmul
//! is recorded (with copies of its descriptors) and runs at each graph replay.

#![allow(non_snake_case, non_camel_case_types, clippy::missing_safety_doc)]

use crate::driver::{self, Handle};
use half::{bf16, f16};
use std::ffi::{c_char, c_int, c_void};

pub type cublasStatus_t = c_int;
pub const CUBLAS_STATUS_SUCCESS: cublasStatus_t = 0;
pub const CUBLAS_STATUS_NOT_INITIALIZED: cublasStatus_t = 1;
pub const CUBLAS_STATUS_INVALID_VALUE: cublasStatus_t = 7;
pub const CUBLAS_STATUS_EXECUTION_FAILED: cublasStatus_t = 13;
pub const CUBLAS_STATUS_NOT_SUPPORTED: cublasStatus_t = 15;

const CUDA_R_32F: i32 = 0;
const CUDA_R_16F: i32 = 2;
const CUDA_R_16BF: i32 = 14;

fn fail(code: cublasStatus_t, msg: String) -> cublasStatus_t {
    eprintln!("openuni-emu cuBLASLt: status {code}: {msg}");
    code
}

#[derive(Clone, Copy, Debug)]
struct Layout {
    dtype: i32,
    rows: u64,
    cols: u64,
    ld: i64,
    batch: i32,
    stride: i64,
}

#[derive(Clone, Copy, Debug)]
struct MatmulDesc {
    compute: i32,
    scale: i32,
    transa: i32,
    transb: i32,
    epilogue: u32,
    bias: usize,
    bias_dtype: i32,
    bias_batch_stride: i64,
}

struct Handle_ {
    magic: u64,
}
const MAGIC: u64 = 0x0B1A_5171;

unsafe fn read_attr<T: Copy + Default>(
    buf: *const c_void,
    size: usize,
) -> Result<T, cublasStatus_t> {
    if buf.is_null() || size != std::mem::size_of::<T>() {
        return Err(CUBLAS_STATUS_INVALID_VALUE);
    }
    Ok(std::ptr::read_unaligned(buf as *const T))
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(h: *mut Handle) -> cublasStatus_t {
    if h.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *h = Box::into_raw(Box::new(Handle_ { magic: MAGIC })) as Handle;
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtDestroy(h: Handle) -> cublasStatus_t {
    if h.is_null() || (*(h as *const Handle_)).magic != MAGIC {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    (*(h as *mut Handle_)).magic = 0;
    drop(Box::from_raw(h as *mut Handle_));
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub extern "C" fn cublasLtGetVersion() -> usize {
    130000
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtGetStatusName(s: cublasStatus_t) -> *const c_char {
    let name: &'static [u8] = match s {
        0 => b"CUBLAS_STATUS_SUCCESS\0",
        1 => b"CUBLAS_STATUS_NOT_INITIALIZED\0",
        7 => b"CUBLAS_STATUS_INVALID_VALUE\0",
        13 => b"CUBLAS_STATUS_EXECUTION_FAILED\0",
        15 => b"CUBLAS_STATUS_NOT_SUPPORTED\0",
        _ => b"CUBLAS_STATUS_UNKNOWN\0",
    };
    name.as_ptr() as *const c_char
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtGetStatusString(s: cublasStatus_t) -> *const c_char {
    cublasLtGetStatusName(s)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtLoggerSetLevel(_level: c_int) -> cublasStatus_t {
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtLoggerOpenFile(_path: *const c_char) -> cublasStatus_t {
    CUBLAS_STATUS_SUCCESS
}

// ---- layouts -------------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    l: *mut Handle,
    dtype: i32,
    rows: u64,
    cols: u64,
    ld: i64,
) -> cublasStatus_t {
    if l.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if !matches!(dtype, CUDA_R_32F | CUDA_R_16F | CUDA_R_16BF) {
        return fail(
            CUBLAS_STATUS_NOT_SUPPORTED,
            format!("matrix data type {dtype} (supported: 32F=0, 16F=2, 16BF=14)"),
        );
    }
    *l = Box::into_raw(Box::new(Layout {
        dtype,
        rows,
        cols,
        ld,
        batch: 1,
        stride: 0,
    })) as Handle;
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutDestroy(l: Handle) -> cublasStatus_t {
    if !l.is_null() {
        drop(Box::from_raw(l as *mut Layout));
    }
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutSetAttribute(
    l: Handle,
    attr: c_int,
    buf: *const c_void,
    size: usize,
) -> cublasStatus_t {
    if l.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    let l = &mut *(l as *mut Layout);
    let r = (|| -> Result<(), cublasStatus_t> {
        match attr {
            0 => l.dtype = read_attr::<u32>(buf, size)? as i32,
            1 => {
                let order = read_attr::<i32>(buf, size)?;
                if order != 0 {
                    return Err(fail(CUBLAS_STATUS_NOT_SUPPORTED, format!("matrix order {order}: the emulated cuBLASLt supports CUBLASLT_ORDER_COL (0) only")));
                }
            }
            2 => l.rows = read_attr::<u64>(buf, size)?,
            3 => l.cols = read_attr::<u64>(buf, size)?,
            4 => l.ld = read_attr::<i64>(buf, size)?,
            5 => l.batch = read_attr::<i32>(buf, size)?,
            6 => l.stride = read_attr::<i64>(buf, size)?,
            _ => {
                return Err(fail(
                    CUBLAS_STATUS_NOT_SUPPORTED,
                    format!("matrix layout attribute {attr}"),
                ))
            }
        }
        Ok(())
    })();
    r.err().unwrap_or(CUBLAS_STATUS_SUCCESS)
}

// ---- matmul descriptors -------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(
    d: *mut Handle,
    compute: i32,
    scale: i32,
) -> cublasStatus_t {
    if d.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if !matches!(compute, 64 | 65 | 68 | 69 | 74 | 75 | 77) {
        return fail(
            CUBLAS_STATUS_NOT_SUPPORTED,
            format!("compute type {compute}"),
        );
    }
    if scale != CUDA_R_32F && !(scale == CUDA_R_16F && matches!(compute, 64 | 65)) {
        return fail(CUBLAS_STATUS_NOT_SUPPORTED, format!("scale type {scale}"));
    }
    *d = Box::into_raw(Box::new(MatmulDesc {
        compute,
        scale,
        transa: 0,
        transb: 0,
        epilogue: 1,
        bias: 0,
        bias_dtype: -1,
        bias_batch_stride: 0,
    })) as Handle;
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescDestroy(d: Handle) -> cublasStatus_t {
    if !d.is_null() {
        drop(Box::from_raw(d as *mut MatmulDesc));
    }
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    d: Handle,
    attr: c_int,
    buf: *const c_void,
    size: usize,
) -> cublasStatus_t {
    if d.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    let d = &mut *(d as *mut MatmulDesc);
    let r = (|| -> Result<(), cublasStatus_t> {
        match attr {
            0 => d.compute = read_attr::<i32>(buf, size)?,
            1 => d.scale = read_attr::<i32>(buf, size)?,
            2 => {
                let mode = read_attr::<i32>(buf, size)?;
                if mode != 0 {
                    return Err(fail(
                        CUBLAS_STATUS_NOT_SUPPORTED,
                        format!("pointer mode {mode}: only host alpha/beta (0)"),
                    ));
                }
            }
            3 | 4 | 5 => {
                let op = read_attr::<i32>(buf, size)?;
                if !(0..=1).contains(&op) || (attr == 5 && op != 0) {
                    return Err(fail(
                        CUBLAS_STATUS_NOT_SUPPORTED,
                        format!("operation {op} for attribute {attr} (N=0, T=1; C must be N)"),
                    ));
                }
                match attr {
                    3 => d.transa = op,
                    4 => d.transb = op,
                    _ => {}
                }
            }
            7 => {
                let e = read_attr::<u32>(buf, size)?;
                if !matches!(e, 1 | 2 | 4 | 6 | 32 | 36) {
                    return Err(fail(CUBLAS_STATUS_NOT_SUPPORTED, format!("epilogue {e} (supported: DEFAULT, RELU, BIAS, RELU_BIAS, GELU, GELU_BIAS)")));
                }
                d.epilogue = e;
            }
            8 => d.bias = read_attr::<u64>(buf, size)? as usize,
            10 => d.bias_batch_stride = read_attr::<i64>(buf, size)?,
            26 => d.bias_dtype = read_attr::<i32>(buf, size)?,
            // SM_COUNT_TARGET, FAST_ACCUM: no effect on the result here.
            15 | 25 => {}
            _ => {
                return Err(fail(
                    CUBLAS_STATUS_NOT_SUPPORTED,
                    format!("matmul descriptor attribute {attr}"),
                ))
            }
        }
        Ok(())
    })();
    r.err().unwrap_or(CUBLAS_STATUS_SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceCreate(p: *mut Handle) -> cublasStatus_t {
    if p.is_null() {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    *p = Box::into_raw(Box::new(0u64)) as Handle;
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceDestroy(p: Handle) -> cublasStatus_t {
    if !p.is_null() {
        drop(Box::from_raw(p as *mut u64));
    }
    CUBLAS_STATUS_SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulPreferenceSetAttribute(
    p: Handle,
    attr: c_int,
    buf: *const c_void,
    size: usize,
) -> cublasStatus_t {
    if p.is_null() {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if attr == 1 {
        // MAX_WORKSPACE_BYTES
        match read_attr::<u64>(buf, size) {
            Ok(v) => *(p as *mut u64) = v,
            Err(e) => return e,
        }
    }
    CUBLAS_STATUS_SUCCESS
}

/// Mirrors cublasLtMatmulHeuristicResult_t.
#[repr(C)]
pub struct HeuristicResult {
    algo: [u64; 8],
    workspace_size: usize,
    state: cublasStatus_t,
    waves: f32,
    reserved: [c_int; 4],
}

/// Heuristic candidates the emulated cuBLASLt returns at most.
const EMU_CANDIDATES: c_int = 3;

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulAlgoGetHeuristic(
    h: Handle,
    desc: Handle,
    a: Handle,
    b: Handle,
    c: Handle,
    d: Handle,
    _pref: Handle,
    requested: c_int,
    results: *mut HeuristicResult,
    count: *mut c_int,
) -> cublasStatus_t {
    if h.is_null()
        || desc.is_null()
        || a.is_null()
        || b.is_null()
        || c.is_null()
        || d.is_null()
        || results.is_null()
        || count.is_null()
        || requested < 1
    {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    if let Err(e) = Problem::new(
        &*(desc as *const MatmulDesc),
        &*(a as *const Layout),
        &*(b as *const Layout),
        &*(c as *const Layout),
        &*(d as *const Layout),
    ) {
        *count = 0;
        return e;
    }
    // Up to EMU_CANDIDATES candidates, as a GPU's heuristic returns several: they compute the
    // same (one CPU GEMM), so callers that time candidates run their whole code path. algo[0]
    // tells them apart.
    let n = requested.min(EMU_CANDIDATES);
    for i in 0..n {
        std::ptr::write(
            results.add(i as usize),
            HeuristicResult {
                algo: [
                    0x0E0E + i as u64,
                    0x0E0E,
                    0x0E0E,
                    0x0E0E,
                    0x0E0E,
                    0x0E0E,
                    0x0E0E,
                    0x0E0E,
                ],
                workspace_size: 0,
                state: CUBLAS_STATUS_SUCCESS,
                waves: 1.0,
                reserved: [0; 4],
            },
        );
    }
    *count = n;
    CUBLAS_STATUS_SUCCESS
}

// ---- the matmul -------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Problem {
    desc: MatmulDesc,
    a: Layout,
    b: Layout,
    c: Layout,
    d: Layout,
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
}

fn elem_bytes(t: i32) -> usize {
    if t == CUDA_R_32F {
        4
    } else {
        2
    }
}

impl Problem {
    fn new(
        desc: &MatmulDesc,
        a: &Layout,
        b: &Layout,
        c: &Layout,
        d: &Layout,
    ) -> Result<Problem, cublasStatus_t> {
        let bad = |m: String| Err(fail(CUBLAS_STATUS_INVALID_VALUE, m));
        let (m, n) = (d.rows as usize, d.cols as usize);
        let (am, ak) = if desc.transa == 0 {
            (a.rows, a.cols)
        } else {
            (a.cols, a.rows)
        };
        let (bk, bn) = if desc.transb == 0 {
            (b.rows, b.cols)
        } else {
            (b.cols, b.rows)
        };
        let k = ak as usize;
        if am as usize != m || bn as usize != n || bk != ak || c.rows != d.rows || c.cols != d.cols
        {
            return bad(format!(
                "shapes do not match: op(A) {am}x{ak}, op(B) {bk}x{bn}, C {}x{}, D {}x{} (column-major rows x cols, transa={}, transb={})",
                c.rows, c.cols, d.rows, d.cols, desc.transa, desc.transb
            ));
        }
        for (name, l) in [("A", a), ("B", b), ("C", c), ("D", d)] {
            if l.ld < l.rows.max(1) as i64 {
                return bad(format!(
                    "{name}: leading dimension {} < rows {}",
                    l.ld, l.rows
                ));
            }
            if l.batch < 1 {
                return bad(format!("{name}: batch count {}", l.batch));
            }
        }
        if a.dtype != b.dtype || c.dtype != d.dtype {
            return Err(fail(
                CUBLAS_STATUS_NOT_SUPPORTED,
                format!(
                    "A/B types {}/{} and C/D types {}/{} must match pairwise",
                    a.dtype, b.dtype, c.dtype, d.dtype
                ),
            ));
        }
        if a.dtype == CUDA_R_32F && !matches!(desc.compute, 68 | 69 | 74 | 75 | 77) {
            return Err(fail(
                CUBLAS_STATUS_NOT_SUPPORTED,
                format!("f32 inputs with compute type {}", desc.compute),
            ));
        }
        if matches!(desc.compute, 64 | 65) && (a.dtype != CUDA_R_16F || d.dtype != CUDA_R_16F) {
            return Err(fail(
                CUBLAS_STATUS_NOT_SUPPORTED,
                "compute 16F needs f16 matrices".into(),
            ));
        }
        let batch = d.batch as usize;
        for (name, l) in [("A", a), ("B", b), ("C", c)] {
            if l.batch as usize != batch && l.batch != 1 {
                return bad(format!("{name}: batch count {} but D has {batch}", l.batch));
            }
        }
        Ok(Problem {
            desc: *desc,
            a: *a,
            b: *b,
            c: *c,
            d: *d,
            m,
            n,
            k,
            batch,
        })
    }

    /// Bytes a layout spans over all batches (for the allocation check).
    fn span(l: &Layout, batch: usize) -> usize {
        if l.rows == 0 || l.cols == 0 {
            return 0;
        }
        let one = (l.cols as usize - 1) * l.ld as usize + l.rows as usize;
        let nb = if l.batch == 1 { 1 } else { batch };
        (one + (nb - 1) * l.stride.max(0) as usize) * elem_bytes(l.dtype)
    }
}

/// Reads element `i` of a matrix of type `t` as f32.
unsafe fn load(p: usize, t: i32, i: usize) -> f32 {
    match t {
        CUDA_R_32F => *(p as *const f32).add(i),
        CUDA_R_16BF => (*(p as *const bf16).add(i)).to_f32(),
        _ => (*(p as *const f16).add(i)).to_f32(),
    }
}

unsafe fn store(p: usize, t: i32, i: usize, v: f32) {
    match t {
        CUDA_R_32F => *(p as *mut f32).add(i) = v,
        CUDA_R_16BF => *(p as *mut bf16).add(i) = bf16::from_f32(v),
        _ => *(p as *mut f16).add(i) = f16::from_f32(v),
    }
}

/// f32 -> TF32 (10 explicit mantissa bits), round to nearest, ties away from zero (cvt.rna.tf32.f32).
fn to_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    f32::from_bits((x.to_bits() + 0x1000) & 0xFFFF_E000)
}

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

#[derive(Clone, Copy)]
struct Operands {
    a: usize,
    b: usize,
    c: usize,
    d: usize,
    bias: usize,
    alpha: f32,
    beta: f32,
}

impl Problem {
    /// A batch's matrix as dense column-major f32 (rows x cols), with the compute type's input rounding.
    unsafe fn gather(&self, l: &Layout, base: usize, bi: usize) -> Vec<f32> {
        let off = if l.batch == 1 {
            0
        } else {
            bi as i64 * l.stride
        } as isize;
        let p = (base as isize + off * elem_bytes(l.dtype) as isize) as usize;
        let (rows, cols, ld) = (l.rows as usize, l.cols as usize, l.ld as usize);
        let mut v = Vec::with_capacity(rows * cols);
        for j in 0..cols {
            for i in 0..rows {
                v.push(load(p, l.dtype, i + j * ld));
            }
        }
        match self.desc.compute {
            77 if l.dtype == CUDA_R_32F => v.iter_mut().for_each(|x| *x = to_tf32(*x)),
            75 if l.dtype == CUDA_R_32F => {
                v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32())
            }
            74 if l.dtype == CUDA_R_32F => {
                v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32())
            }
            _ => {}
        }
        v
    }

    unsafe fn run(&self, o: &Operands) {
        let (m, n, k) = (self.m, self.n, self.k);
        let bias_t = if self.desc.bias_dtype < 0 {
            self.d.dtype
        } else {
            self.desc.bias_dtype
        };
        let with_bias = matches!(self.desc.epilogue, 4 | 6 | 36);
        let mut acc = vec![0f32; m * n];
        for bi in 0..self.batch {
            let a = self.gather(&self.a, o.a, bi);
            let b = self.gather(&self.b, o.b, bi);
            // op(A)[i][p]: A is rows x cols dense column-major (row stride 1, column stride rows).
            let (rsa, csa) = if self.desc.transa == 0 {
                (1, self.a.rows as isize)
            } else {
                (self.a.rows as isize, 1)
            };
            let (rsb, csb) = if self.desc.transb == 0 {
                (1, self.b.rows as isize)
            } else {
                (self.b.rows as isize, 1)
            };
            if k == 0 {
                acc.iter_mut().for_each(|x| *x = 0.0);
            } else {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    o.alpha,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    0.0,
                    acc.as_mut_ptr(),
                    1,
                    m as isize,
                );
            }
            let coff = |l: &Layout| {
                if l.batch == 1 {
                    0
                } else {
                    bi as i64 * l.stride
                }
            };
            let cbase = (o.c as i64 + coff(&self.c) * elem_bytes(self.c.dtype) as i64) as usize;
            let dbase = (o.d as i64 + coff(&self.d) * elem_bytes(self.d.dtype) as i64) as usize;
            let bbase = (o.bias as i64
                + bi as i64 * self.desc.bias_batch_stride * elem_bytes(bias_t) as i64)
                as usize;
            for j in 0..n {
                for i in 0..m {
                    let mut v = acc[i + j * m];
                    // beta == 0: C is not read (NaN in C does not propagate), as in cuBLAS.
                    if o.beta != 0.0 {
                        v += o.beta * load(cbase, self.c.dtype, i + j * self.c.ld as usize);
                    }
                    if with_bias {
                        v += load(bbase, bias_t, i);
                    }
                    v = match self.desc.epilogue {
                        2 | 6 => v.max(0.0),
                        32 | 36 => gelu_tanh(v),
                        _ => v,
                    };
                    store(dbase, self.d.dtype, i + j * self.d.ld as usize, v);
                }
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmul(
    h: Handle,
    desc: Handle,
    alpha: *const c_void,
    a: *const c_void,
    adesc: Handle,
    b: *const c_void,
    bdesc: Handle,
    beta: *const c_void,
    c: *const c_void,
    cdesc: Handle,
    d: *mut c_void,
    ddesc: Handle,
    _algo: *const c_void,
    _workspace: *mut c_void,
    _workspace_size: usize,
    stream: Handle,
) -> cublasStatus_t {
    if h.is_null() || (*(h as *const Handle_)).magic != MAGIC {
        return CUBLAS_STATUS_NOT_INITIALIZED;
    }
    if desc.is_null()
        || adesc.is_null()
        || bdesc.is_null()
        || cdesc.is_null()
        || ddesc.is_null()
        || alpha.is_null()
        || beta.is_null()
    {
        return CUBLAS_STATUS_INVALID_VALUE;
    }
    let p = match Problem::new(
        &*(desc as *const MatmulDesc),
        &*(adesc as *const Layout),
        &*(bdesc as *const Layout),
        &*(cdesc as *const Layout),
        &*(ddesc as *const Layout),
    ) {
        Ok(p) => p,
        Err(e) => return e,
    };
    if p.desc.scale != CUDA_R_32F {
        return fail(
            CUBLAS_STATUS_NOT_SUPPORTED,
            "only f32 alpha/beta (scale type 32F)".into(),
        );
    }
    let o = Operands {
        a: a as usize,
        b: b as usize,
        c: c as usize,
        d: d as usize,
        bias: p.desc.bias,
        alpha: *(alpha as *const f32),
        beta: *(beta as *const f32),
    };
    // Operands must be device memory of the right size (a GPU would fault on the access).
    let bias_t = if p.desc.bias_dtype < 0 {
        p.d.dtype
    } else {
        p.desc.bias_dtype
    };
    let mut checks = vec![
        ("A", o.a, Problem::span(&p.a, p.batch)),
        ("B", o.b, Problem::span(&p.b, p.batch)),
        ("D", o.d, Problem::span(&p.d, p.batch)),
    ];
    if o.beta != 0.0 {
        checks.push(("C", o.c, Problem::span(&p.c, p.batch)));
    }
    if matches!(p.desc.epilogue, 4 | 6 | 36) {
        if p.desc.bias == 0 {
            return fail(
                CUBLAS_STATUS_INVALID_VALUE,
                "bias epilogue without CUBLASLT_MATMUL_DESC_BIAS_POINTER".into(),
            );
        }
        let nb = if p.desc.bias_batch_stride == 0 {
            1
        } else {
            p.batch
        };
        checks.push((
            "bias",
            p.desc.bias,
            (p.m + (nb - 1) * p.desc.bias_batch_stride as usize) * elem_bytes(bias_t),
        ));
    }
    for (name, ptr, bytes) in checks {
        if let Err(_e) =
            driver::check_device_range(ptr, bytes, &format!("cublasLtMatmul operand {name}"))
        {
            return fail(
                CUBLAS_STATUS_EXECUTION_FAILED,
                format!(
                    "operand {name} ({ptr:#x}, {bytes} bytes) is not inside one device allocation"
                ),
            );
        }
    }
    let job = move || {
        unsafe { p.run(&o) };
        driver::CUDA_SUCCESS
    };
    match driver::capture_or_run(stream, job) {
        Some(0) => CUBLAS_STATUS_SUCCESS,
        Some(_) => CUBLAS_STATUS_EXECUTION_FAILED,
        None => {
            p.run(&o);
            CUBLAS_STATUS_SUCCESS
        }
    }
}
