//! InternVL's pixel shuffle read through its index map by mlp1's LayerNorm
//! (`kernels/pixel_shuffle.cu`, `Op::PixelShuffleLayerNorm`). CPU twin:
//! `openuni_cpu::ops::pixel_shuffle_layernorm`.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::norm::norm_launch;
use super::{i32_arg, suffix, Ctx, Launch};
use crate::device::KArg;
use crate::error::Result;

/// `pixel_shuffle_layernorm_<dtype>`: `x` [batch, skip + grid², c] -> `y` [batch, (grid/2)², 4c]
/// (see `Op::PixelShuffleLayerNorm`), in norm.cu's launch layout over rows of 4c; no launch for
/// an empty tensor.
#[allow(clippy::too_many_arguments)]
pub fn pixel_shuffle_layernorm(
    dtype: DType,
    x: u64,
    w: u64,
    b: u64,
    y: u64,
    batch: usize,
    c: usize,
    grid: usize,
    skip: usize,
    eps: f32,
) -> Result<Vec<Launch>> {
    let kernel = format!("pixel_shuffle_layernorm_{}", suffix(dtype)?);
    let rows = batch * (grid / 2) * (grid / 2);
    if rows == 0 || c == 0 {
        return Ok(vec![]);
    }
    i32_arg("4 · channels", 4 * c)?; // the kernel's row width
    let (block, grid_dim) = norm_launch(rows, 4 * c, dtype);
    let args = vec![
        KArg::Ptr(x),
        KArg::Ptr(w),
        KArg::Ptr(b),
        KArg::Ptr(y),
        KArg::I64(rows as i64),
        i32_arg("channels", c)?,
        i32_arg("grid", grid)?,
        i32_arg("skip", skip)?,
        KArg::F32(eps),
    ];
    Ok(vec![Launch {
        kernel,
        grid: grid_dim,
        block,
        smem: 0,
        args,
    }])
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let Op::PixelShuffleLayerNorm {
        x,
        weight,
        bias,
        eps,
        grid,
        skip,
    } = &node.op
    else {
        unreachable!("pixel_shuffle::resolve called for {}", node.op.name())
    };
    let xd = ctx.graph.shape(*x).dims();
    pixel_shuffle_layernorm(
        ctx.dtype,
        p(*x),
        p(*weight),
        p(*bias),
        p(node.output),
        xd[0],
        xd[2],
        *grid,
        *skip,
        *eps,
    )
}
