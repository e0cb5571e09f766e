//! DC-AE's output head (`kernels/norm_conv.cu`): `Op::RmsNormReluConv2d`, conv_out(relu(norm_out(x)))
//! in one launch, for few output channels. CPU twin: `openuni_cpu::ops::rmsnorm_relu_conv2d`.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::{i32_arg, suffix, Ctx, Launch};
use crate::device::KArg;
use crate::error::{CudaError, Result};

use super::norm::geometry as g;

/// Output tile of one CTA (`NC_TW` × `NC_TH` pixels; a thread owns `NC_RPT` pixels of one column),
/// from kernels/include/norm_geometry.cuh.
const TILE_W: usize = g::NC_TW;
const TILE_H: usize = g::NC_RPT * g::NC_TROWS;
/// Threads per CTA (`NC_THREADS`).
const THREADS: usize = g::NC_TW * g::NC_TROWS;
/// Most output channels the kernel accumulates (`NC_MAX_COUT`): DC-AE's conv_out has 3.
pub const MAX_COUT: usize = g::NC_MAX_COUT;
/// Largest kernel (`NC_MAX_K`); the kernel is 1 or 3.
pub const MAX_KERNEL: usize = g::NC_MAX_K;

/// The pointers and shape of one call; `nb` and `b` may be 0 (absent).
#[derive(Clone, Copy, Debug)]
pub struct NormConvArgs {
    pub dtype: DType,
    pub x: u64,
    pub nw: u64,
    pub nb: u64,
    pub w: u64,
    pub b: u64,
    pub y: u64,
    pub batch: usize,
    pub h: usize,
    pub w_px: usize,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub eps: f32,
}

fn invalid(msg: String) -> CudaError {
    CudaError::Invalid {
        what: "rmsnorm_relu_conv2d".into(),
        msg,
    }
}

/// `rmsnorm_relu_conv2d_<dtype>`: `y = conv(relu(rmsnorm(x)))`; no launch for an empty output.
/// Refuses more than [`MAX_COUT`] output channels or a kernel size other than 1 or
/// [`MAX_KERNEL`], naming the value.
pub fn rmsnorm_relu_conv2d(a: &NormConvArgs) -> Result<Vec<Launch>> {
    let kernel = format!("rmsnorm_relu_conv2d_{}", suffix(a.dtype)?);
    if a.cout > MAX_COUT {
        return Err(invalid(format!(
            "{} output channels, the kernel computes at most {MAX_COUT}",
            a.cout
        )));
    }
    if a.kernel != 1 && a.kernel != MAX_KERNEL {
        return Err(invalid(format!(
            "kernel size {}, expected 1 or {MAX_KERNEL}",
            a.kernel
        )));
    }
    if a.batch == 0 || a.h == 0 || a.w_px == 0 || a.cout == 0 {
        return Ok(vec![]);
    }
    let gy = a.h.div_ceil(TILE_H);
    if gy > 65535 || a.batch > 65535 {
        return Err(invalid(format!(
            "grid ({}, {gy}, {}) exceeds 65535 in y or z",
            a.w_px.div_ceil(TILE_W),
            a.batch
        )));
    }
    let args = vec![
        KArg::Ptr(a.x),
        KArg::Ptr(a.nw),
        KArg::Ptr(a.nb),
        KArg::Ptr(a.w),
        KArg::Ptr(a.b),
        KArg::Ptr(a.y),
        i32_arg("h", a.h)?,
        i32_arg("w", a.w_px)?,
        i32_arg("cin", a.cin)?,
        i32_arg("cout", a.cout)?,
        i32_arg("kernel", a.kernel)?,
        KArg::F32(a.eps),
    ];
    let grid = (a.w_px.div_ceil(TILE_W) as u32, gy as u32, a.batch as u32);
    Ok(vec![Launch {
        kernel,
        grid,
        block: (THREADS as u32, 1, 1),
        smem: 0,
        args,
    }])
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    match &node.op {
        Op::RmsNormReluConv2d {
            x,
            norm_weight,
            norm_bias,
            eps,
            weight,
            bias,
            h,
            w,
            kernel,
        } => {
            let out = ctx.graph.shape(node.output);
            rmsnorm_relu_conv2d(&NormConvArgs {
                dtype: ctx.dtype,
                x: p(*x),
                nw: p(*norm_weight),
                nb: norm_bias.map_or(0, p),
                w: p(*weight),
                b: bias.map_or(0, p),
                y: p(node.output),
                batch: out.dims()[0],
                h: *h,
                w_px: *w,
                cin: ctx.graph.shape(*x).last(),
                cout: out.last(),
                kernel: *kernel,
                eps: *eps,
            })
        }
        _ => unreachable!("norm_conv::resolve called for {}", node.op.name()),
    }
}
