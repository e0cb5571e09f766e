//! The sgemm under the fast CPU ops (benches/gemm.rs and docs/cpu-performance.md say why).
//!
//! The system OpenBLAS (`libopenblas.so.0`, Debian `libopenblas0`), loaded at run time when present,
//! with its own threads off: its AVX-512 kernels are what PyTorch's MKL reaches on this class of
//! machine. Without it, the `gemm` crate (AVX2/FMA on stable Rust). `OPENUNI_CPU_SGEMM=gemm`
//! forces the crate. Either way the work is split across rayon's pool (one pool for the process):
//! a GEMM that is the only work in flight is cut into column blocks, one per thread; a GEMM inside
//! a parallel task runs on that task's thread.

use std::sync::OnceLock;

use gemm::Parallelism;
use rayon::prelude::*;

/// A matrix inside a slice: element (r, c) at `data[off + r·rs + c·cs]`, with `rs == 1` or
/// `cs == 1` (row- or column-major, what BLAS takes).
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    pub fn new(data: &'a [f32], off: usize, rs: usize, cs: usize) -> Self {
        assert!(
            rs == 1 || cs == 1,
            "a GEMM operand needs unit stride along rows or columns"
        );
        View { data, off, rs, cs }
    }

    /// Panics unless every element of a rows×cols block is inside the slice.
    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            let last = self.off + (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(
                last < self.data.len(),
                "GEMM operand out of bounds: {last} >= {}",
                self.data.len()
            );
        }
    }

    fn ptr(&self) -> *const f32 {
        self.data[self.off..].as_ptr()
    }
}

/// Which sgemm runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    OpenBlas,
    GemmCrate,
}

type CblasSgemm = unsafe extern "C" fn(
    i32,
    i32,
    i32,
    i32,
    i32,
    i32,
    f32,
    *const f32,
    i32,
    *const f32,
    i32,
    f32,
    *mut f32,
    i32,
);

struct OpenBlas {
    sgemm: CblasSgemm,
    _lib: libloading::Library,
}

fn openblas() -> Option<&'static OpenBlas> {
    static LIB: OnceLock<Option<OpenBlas>> = OnceLock::new();
    LIB.get_or_init(|| {
        if std::env::var("OPENUNI_CPU_SGEMM").is_ok_and(|v| v == "gemm") {
            return None;
        }
        // SAFETY: loading OpenBLAS runs no code of ours; the symbols have the CBLAS C signatures.
        unsafe {
            let lib = ["libopenblas.so.0", "libopenblas.so"]
                .iter()
                .find_map(|n| libloading::Library::new(n).ok())?;
            let sgemm = *lib.get::<CblasSgemm>(b"cblas_sgemm\0").ok()?;
            // Our threads split the work; OpenBLAS's own would spin against rayon's.
            let set_threads = *lib
                .get::<unsafe extern "C" fn(i32)>(b"openblas_set_num_threads\0")
                .ok()?;
            set_threads(1);
            Some(OpenBlas { sgemm, _lib: lib })
        }
    })
    .as_ref()
}

/// The backend in use (OpenBLAS when it loads).
pub fn backend() -> Backend {
    if openblas().is_some() {
        Backend::OpenBlas
    } else {
        Backend::GemmCrate
    }
}

/// Whether the caller is the only work in flight (split the GEMM across threads) or one of
/// many parallel tasks (stay on this thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, `dst` row-major with row stride `ldd` from `dst_off`;
/// `accumulate` adds to `dst` instead of overwriting it.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_off: usize,
    ldd: usize,
    accumulate: bool,
    a: View,
    b: View,
    threads: Threads,
) {
    gemm_with(
        backend(),
        m,
        n,
        k,
        dst,
        dst_off,
        ldd,
        accumulate,
        a,
        b,
        threads,
    )
}

/// [`gemm`] on a chosen backend (falls back to the crate when OpenBLAS is not loaded).
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    be: Backend,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_off: usize,
    ldd: usize,
    accumulate: bool,
    a: View,
    b: View,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k);
    b.check(k, n);
    assert!(
        n <= ldd && dst_off + (m - 1) * ldd + n <= dst.len(),
        "GEMM destination out of bounds"
    );
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|r| dst[dst_off + r * ldd..][..n].fill(0.0));
        }
        return;
    }
    let blas = if be == Backend::OpenBlas {
        openblas()
    } else {
        None
    };
    let dst = Dst(dst[dst_off..].as_mut_ptr());
    let whole = |c0: usize, c1: usize| {
        // SAFETY: the checks above bound every element of a, b and dst these calls touch; column
        // ranges [c0, c1) of different calls are disjoint, and `dst` is borrowed mutably.
        unsafe {
            one_gemm(
                blas,
                m,
                c1 - c0,
                k,
                dst.at(c0),
                ldd,
                accumulate,
                a,
                b.ptr().add(c0 * b.cs),
                b,
            )
        }
    };
    let t = rayon::current_num_threads();
    if threads == Threads::One || t == 1 || n < 32 {
        return whole(0, n);
    }
    // Column blocks (multiples of 16, for the kernels' vector width), one or two per thread.
    let parts = if n >= 64 * t { 2 * t } else { t };
    let step = n.div_ceil(parts).next_multiple_of(16);
    (0..n.div_ceil(step))
        .into_par_iter()
        .for_each(|p| whole(p * step, ((p + 1) * step).min(n)));
}

/// The destination pointer, shared by the column blocks of one GEMM (which write disjoint
/// columns).
#[derive(Clone, Copy)]
struct Dst(*mut f32);

impl Dst {
    /// The pointer `c` elements on (whole-struct use, so closures capture `Dst`, not the pointer).
    fn at(self, c: usize) -> *mut f32 {
        self.0.wrapping_add(c)
    }
}
// SAFETY: only used for disjoint column ranges, see `gemm_with`.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// One single-threaded GEMM; `bp` points at b's first column of this call.
///
/// # Safety
/// Every element of the m×k `a`, k×n `b` from `bp` and m×n `dst` (row stride ldd) must be valid.
#[allow(clippy::too_many_arguments)]
unsafe fn one_gemm(
    blas: Option<&OpenBlas>,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ldd: usize,
    accumulate: bool,
    a: View,
    bp: *const f32,
    b: View,
) {
    const ROW_MAJOR: i32 = 101;
    const NO_TRANS: i32 = 111;
    const TRANS: i32 = 112;
    // A rows×cols operand as CBLAS takes it: row-major (NoTrans, leading dim rs) when its columns
    // are contiguous, else the transpose of a row-major matrix (Trans, cs). A stride that never
    // steps (one row or column) is raised to the minimum CBLAS accepts.
    let layout = |v: &View, rows: usize, cols: usize| {
        if v.cs == 1 && (v.rs >= cols || rows == 1) {
            (NO_TRANS, v.rs.max(cols))
        } else {
            (TRANS, v.cs.max(rows))
        }
    };
    match blas {
        Some(lib) => {
            let ((ta, lda), (tb, ldb)) = (layout(&a, m, k), layout(&b, k, n));
            let beta = if accumulate { 1.0 } else { 0.0 };
            (lib.sgemm)(
                ROW_MAJOR,
                ta,
                tb,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.ptr(),
                lda as i32,
                bp,
                ldb as i32,
                beta,
                dst,
                ldd as i32,
            )
        }
        None => gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldd as isize,
            accumulate,
            a.ptr(),
            a.cs as isize,
            a.rs as isize,
            bp,
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        ),
    }
}
