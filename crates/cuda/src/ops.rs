//! Typed launchers for the kernels of `kernels/norm.cu` and `kernels/elementwise.cu`, on raw
//! device pointers. The executor, the tests and the benchmarks all launch through these, so the
//! launch configuration of each kernel is chosen in one place.
//!
//! All functions are `unsafe`: the pointers must be valid device addresses of `dtype` elements
//! for the given shapes (a pointer of 0 means "absent" where an argument is optional).

use openuni_graph::UnaryFn;
use openuni_tensor::DType;

use crate::device::{CudaDevice, KArg};
use crate::error::{CudaError, Result};

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => Err(CudaError::DType(d)),
    }
}

/// Elements per 16-byte vector.
fn vec_width(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

fn check_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| CudaError::Invalid {
        what: what.into(),
        msg: format!("{v} does not fit 32 bits"),
    })
}

/// Launch layout of the norm kernels: `(block (tx, ty), grid)`. Each row is handled by `tx`
/// threads so that each thread holds at most 4 items (16-byte vectors when `cols` is a multiple
/// of the vector width, else single elements) in registers: a power of two up to 32 (a sub-warp
/// per row, shuffles only), else a multiple of 32 up to 1024. `ty` rows share a block of at least
/// 128 threads.
pub fn norm_launch(rows: usize, cols: usize, dtype: DType) -> ((u32, u32, u32), (u32, u32, u32)) {
    let v = vec_width(dtype);
    let items = if cols.is_multiple_of(v) { cols / v } else { cols };
    let want = items.div_ceil(4).max(1);
    let tx = if want <= 32 {
        want.next_power_of_two()
    } else {
        (want.div_ceil(32) * 32).min(1024)
    };
    let ty = (128 / tx).max(1);
    let grid = rows.div_ceil(ty).max(1);
    ((tx as u32, ty as u32, 1), (grid as u32, 1, 1))
}

/// Grid of the grid-stride elementwise kernels: enough 256-thread blocks for the work, at most
/// 16 per SM (a few waves; each thread then loops).
fn elementwise_grid(dev: &CudaDevice, items: usize) -> (u32, u32, u32) {
    let cap = dev.sm_count() as usize * 16;
    (items.div_ceil(256).clamp(1, cap) as u32, 1, 1)
}

/// `rmsnorm_<dtype>`: `y = x / sqrt(mean(x²) + eps) · w (+ b)` over rows of `cols`.
///
/// # Safety
/// See the module comment.
#[allow(clippy::too_many_arguments)]
pub unsafe fn rmsnorm(
    dev: &CudaDevice,
    dtype: DType,
    x: u64,
    w: u64,
    b: u64,
    y: u64,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let (block, grid) = norm_launch(rows, cols, dtype);
    let k = format!("rmsnorm_{}", suffix(dtype)?);
    let args = [
        KArg::Ptr(x),
        KArg::Ptr(w),
        KArg::Ptr(b),
        KArg::Ptr(y),
        KArg::I64(rows as i64),
        KArg::I32(check_i32("cols", cols)?),
        KArg::F32(eps),
    ];
    dev.launch(&k, grid, block, 0, &args)
}

/// Fused adaLN modulation operands of [`layernorm`]: `scale`/`shift` [B, cols], one row per
/// sample of `tokens` rows.
#[derive(Clone, Copy, Debug)]
pub struct Modulation {
    pub scale: u64,
    pub shift: u64,
    pub tokens: usize,
}

/// `layernorm_<dtype>`: `y = (x - mean) / sqrt(var + eps) (· w) (+ b)`, then
/// `· (1 + scale) + shift` when `modulation` is given. `w`, `b` may be 0.
///
/// # Safety
/// See the module comment.
#[allow(clippy::too_many_arguments)]
pub unsafe fn layernorm(
    dev: &CudaDevice,
    dtype: DType,
    x: u64,
    w: u64,
    b: u64,
    modulation: Option<Modulation>,
    y: u64,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let (block, grid) = norm_launch(rows, cols, dtype);
    let k = format!("layernorm_{}", suffix(dtype)?);
    let (sc, sh, tokens) = match modulation {
        Some(m) if m.tokens > 0 => (m.scale, m.shift, m.tokens),
        Some(_) => {
            return Err(CudaError::Invalid {
                what: "layernorm modulation".into(),
                msg: "tokens is 0".into(),
            })
        }
        None => (0, 0, 1),
    };
    let args = [
        KArg::Ptr(x),
        KArg::Ptr(w),
        KArg::Ptr(b),
        KArg::Ptr(sc),
        KArg::Ptr(sh),
        KArg::Ptr(y),
        KArg::I64(rows as i64),
        KArg::I32(check_i32("cols", cols)?),
        KArg::I32(check_i32("tokens", tokens)?),
        KArg::F32(eps),
    ];
    dev.launch(&k, grid, block, 0, &args)
}

/// `silu|gelu_tanh|gelu_erf|relu_<dtype>`: `y = f(x)` over `n` elements (in place allowed).
///
/// # Safety
/// See the module comment.
pub unsafe fn unary(dev: &CudaDevice, dtype: DType, f: UnaryFn, x: u64, y: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let k = format!("{}_{}", f.name(), suffix(dtype)?);
    let grid = elementwise_grid(dev, n / vec_width(dtype) + n % vec_width(dtype));
    dev.launch(
        &k,
        grid,
        (256, 1, 1),
        0,
        &[KArg::Ptr(x), KArg::Ptr(y), KArg::I64(n as i64)],
    )
}

/// `add_<dtype>`: `y = a + b`.
///
/// # Safety
/// See the module comment.
pub unsafe fn add(dev: &CudaDevice, dtype: DType, a: u64, b: u64, y: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let k = format!("add_{}", suffix(dtype)?);
    let grid = elementwise_grid(dev, n / vec_width(dtype) + n % vec_width(dtype));
    dev.launch(
        &k,
        grid,
        (256, 1, 1),
        0,
        &[KArg::Ptr(a), KArg::Ptr(b), KArg::Ptr(y), KArg::I64(n as i64)],
    )
}

/// `gated_add_<dtype>`: `out = x + gate[s, c] · v` over `n` elements of a [rows, cols] view,
/// `s = row / tokens`.
///
/// # Safety
/// See the module comment.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gated_add(
    dev: &CudaDevice,
    dtype: DType,
    x: u64,
    gate: u64,
    v: u64,
    out: u64,
    n: usize,
    tokens: usize,
    cols: usize,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    if tokens == 0 || cols == 0 {
        return Err(CudaError::Invalid {
            what: "gated_add".into(),
            msg: format!("tokens {tokens}, cols {cols}"),
        });
    }
    let k = format!("gated_add_{}", suffix(dtype)?);
    let grid = elementwise_grid(dev, n / vec_width(dtype) + n % vec_width(dtype));
    let args = [
        KArg::Ptr(x),
        KArg::Ptr(gate),
        KArg::Ptr(v),
        KArg::Ptr(out),
        KArg::I64(n as i64),
        KArg::I32(check_i32("tokens", tokens)?),
        KArg::I32(check_i32("cols", cols)?),
    ];
    dev.launch(&k, grid, (256, 1, 1), 0, &args)
}

/// `cast_f32_to_bf16` (`to == BF16`) or `cast_bf16_to_f32` (`to == F32`) over `n` elements.
///
/// # Safety
/// See the module comment.
pub unsafe fn cast(dev: &CudaDevice, to: DType, x: u64, y: u64, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let k = match to {
        DType::BF16 => "cast_f32_to_bf16",
        DType::F32 => "cast_bf16_to_f32",
        d => return Err(CudaError::DType(d)),
    };
    let grid = elementwise_grid(dev, n / 8 + n % 8);
    dev.launch(
        k,
        grid,
        (256, 1, 1),
        0,
        &[KArg::Ptr(x), KArg::Ptr(y), KArg::I64(n as i64)],
    )
}
