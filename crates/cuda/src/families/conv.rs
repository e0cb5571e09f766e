//! The DC-AE decoder's convolution family (`kernels/conv.cu`): `Conv2d` (3×3 bf16 on the tensor
//! cores, every other case on the CUDA cores), `UpsampleConv2d` (bf16: four 2×2 phase convolutions
//! on the tensor cores), `DepthwiseConv2d`, `DepthwiseConvGlu`, `GroupedLinear`, `RepeatChannels`.
//! All on tokens [B, h·w, C] (NHWC).
//!
//! The launch builders are public so that tests and benchmarks launch exactly what the executor
//! launches, on raw device pointers, and can reach the epilogue options (fused SiLU, residual)
//! that no graph op uses yet.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::{i32_arg, stride_grid, suffix, Ctx, Launch};
use crate::device::KArg;
use crate::error::{CudaError, Result};

/// Output tile of both conv2d kernels (`CV_TH`/`TC_TH`, `CV_TW`/`TC_TW`, `CV_BN`/`TC_BN`).
const TILE_H: usize = 8;
const TILE_W: usize = 16;
const TILE_N: usize = 64;
/// Largest kernel of `conv2d_{f32,bf16}` and `depthwise_conv2d_*` (`CV_KMAX`, `DW_KMAX`).
pub const MAX_KERNEL: usize = 7;
/// Rows × outputs of a `grouped_linear` block (`GL_BM`, `GL_BN`).
const GL_ROWS: usize = 128;
const GL_COLS: usize = 32;
/// Output rows per thread and channels per block of `depthwise_conv2d` (`DW_R`, `DW_CB`).
const DW_ROWS: usize = 4;
const DW_CHANNELS: usize = 128;

fn invalid(what: &str, msg: String) -> CudaError {
    CudaError::Invalid { what: what.into(), msg }
}

fn grid_dim(what: &str, v: usize, max: usize) -> Result<u32> {
    if v == 0 || v > max {
        return Err(invalid(what, format!("grid dimension {v} outside 1..={max}")));
    }
    Ok(v as u32)
}

/// The fused activation of a conv2d epilogue (after the bias, before the residual).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAct {
    None,
    Silu,
}

/// Which conv2d kernel to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// `conv2d_bf16_tc` for bf16 3×3, `conv2d_<dtype>` otherwise (what the executor uses).
    Auto,
    /// `conv2d_<dtype>` on the CUDA cores, whatever the shape.
    Direct,
}

/// One conv2d call: `y = act(conv(x, weight) + bias) + residual` over tokens [batch, h·w, cin] ->
/// [batch, h·w, cout], weight [cout, cin, k, k]. Pointers of 0 mean absent (bias, residual).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dArgs {
    pub dtype: DType,
    pub x: u64,
    pub weight: u64,
    pub bias: u64,
    pub residual: u64,
    pub y: u64,
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub act: ConvAct,
}

/// The launch of one conv2d.
pub fn conv2d(a: &Conv2dArgs, choice: ConvKernel) -> Result<Launch> {
    let what = "conv2d";
    let s = suffix(a.dtype)?;
    if a.kernel % 2 == 0 || a.kernel > MAX_KERNEL {
        return Err(invalid(what, format!("kernel {0}×{0}: the CUDA conv2d takes odd kernels up to {MAX_KERNEL}", a.kernel)));
    }
    if a.batch == 0 || a.h == 0 || a.w == 0 || a.cin == 0 || a.cout == 0 {
        return Err(invalid(what, format!("empty shape: batch {}, grid {}×{}, {} -> {} channels", a.batch, a.h, a.w, a.cin, a.cout)));
    }
    let tiles = a.h.div_ceil(TILE_H) * a.w.div_ceil(TILE_W) * a.batch;
    let grid = (grid_dim(what, tiles, i32::MAX as usize)?, grid_dim(what, a.cout.div_ceil(TILE_N), 65535)?, 1);
    let tensor_cores = choice == ConvKernel::Auto && a.dtype == DType::BF16 && a.kernel == 3;
    let mut args = vec![
        KArg::Ptr(a.x),
        KArg::Ptr(a.weight),
        KArg::Ptr(a.bias),
        KArg::Ptr(a.residual),
        KArg::Ptr(a.y),
        i32_arg("h", a.h)?,
        i32_arg("w", a.w)?,
        i32_arg("cin", a.cin)?,
        i32_arg("cout", a.cout)?,
    ];
    if !tensor_cores {
        args.push(KArg::I32(a.kernel as i32));
    }
    args.push(KArg::I32(match a.act {
        ConvAct::None => 0,
        ConvAct::Silu => 1,
    }));
    Ok(Launch {
        kernel: if tensor_cores { "conv2d_bf16_tc".into() } else { format!("conv2d_{s}") },
        grid,
        block: (256, 1, 1),
        smem: 0,
        args,
    })
}

/// One upsample conv (DC-AE's DCUpBlock2d): `conv3x3(upsample2x(x), weight) + bias
/// (+ pixel_shuffle_shortcut(x))` over tokens [batch, h·w, cin] -> [batch, 2h·2w, cout].
#[derive(Clone, Copy, Debug)]
pub struct UpsampleConv2dArgs {
    pub dtype: DType,
    pub x: u64,
    pub weight: u64,
    pub bias: u64,
    pub y: u64,
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub shortcut: bool,
}

/// The launch of one upsample conv: `upsample_conv2d_bf16_tc` (four 2×2 phase convolutions on
/// the low-resolution input, on the tensor cores; grid z = phase) for bf16 with
/// [`ConvKernel::Auto`], else `upsample_conv2d_<dtype>` (the 3×3 conv on the CUDA cores, reading
/// the upsampled input through index arithmetic).
pub fn upsample_conv2d(a: &UpsampleConv2dArgs, choice: ConvKernel) -> Result<Launch> {
    let what = "upsample_conv2d";
    let s = suffix(a.dtype)?;
    if a.batch == 0 || a.h == 0 || a.w == 0 || a.cin == 0 || a.cout == 0 {
        return Err(invalid(what, format!("empty shape: batch {}, grid {}×{}, {} -> {} channels", a.batch, a.h, a.w, a.cin, a.cout)));
    }
    if a.shortcut && (4 * a.cout) % a.cin != 0 {
        return Err(invalid(what, format!("4·{} output channels are not a multiple of {} (shortcut)", a.cout, a.cin)));
    }
    let tensor_cores = choice == ConvKernel::Auto && a.dtype == DType::BF16;
    // Tiles of the low-resolution grid (tensor cores, one per phase) or of the output grid.
    let (gh, gw, phases) = if tensor_cores { (a.h, a.w, 4) } else { (2 * a.h, 2 * a.w, 1) };
    let tiles = gh.div_ceil(TILE_H) * gw.div_ceil(TILE_W) * a.batch;
    Ok(Launch {
        kernel: if tensor_cores { "upsample_conv2d_bf16_tc".into() } else { format!("upsample_conv2d_{s}") },
        grid: (grid_dim(what, tiles, i32::MAX as usize)?, grid_dim(what, a.cout.div_ceil(TILE_N), 65535)?, phases),
        block: (256, 1, 1),
        smem: 0,
        args: vec![
            KArg::Ptr(a.x),
            KArg::Ptr(a.weight),
            KArg::Ptr(a.bias),
            KArg::Ptr(a.y),
            i32_arg("h", a.h)?,
            i32_arg("w", a.w)?,
            i32_arg("cin", a.cin)?,
            i32_arg("cout", a.cout)?,
            KArg::I32(a.shortcut as i32),
        ],
    })
}

/// The launch shared by the depthwise kernels: blocks of (32, 8) threads, 128 channels
/// (blockIdx.y) x 8 (sample, 4-row block, column) items at a time; about 16 blocks per SM in all,
/// each striding over its items. `kernel_arg` is passed last when the kernel takes its size.
#[allow(clippy::too_many_arguments)]
fn depthwise_launch(
    name: String,
    what: &str,
    sm_count: u32,
    [x, weight, bias, y]: [u64; 4],
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    kernel_arg: Option<usize>,
) -> Result<Launch> {
    let items = batch * h.div_ceil(DW_ROWS) * w;
    let gy = grid_dim(what, c.div_ceil(DW_CHANNELS), 65535)?;
    let gx = items.div_ceil(8).clamp(1, ((sm_count.max(1) as usize) * 16).div_ceil(gy as usize));
    let mut args = vec![
        KArg::Ptr(x),
        KArg::Ptr(weight),
        KArg::Ptr(bias),
        KArg::Ptr(y),
        i32_arg("batch", batch)?,
        i32_arg("h", h)?,
        i32_arg("w", w)?,
        i32_arg("channels", c)?,
    ];
    if let Some(k) = kernel_arg {
        args.push(i32_arg("kernel", k)?);
    }
    Ok(Launch { kernel: name, grid: (gx as u32, gy, 1), block: (32, 8, 1), smem: 0, args })
}

/// `depthwise_conv3_glu_<dtype>`: the 3×3 depthwise conv of a [.., 2c] input fused with the SiLU
/// gate, `u · silu(g)` -> [.., c] (`c` output channels). Same work split as [`depthwise_conv2d`].
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv3_glu(
    dtype: DType,
    sm_count: u32,
    x: u64,
    weight: u64,
    bias: u64,
    y: u64,
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    kernel: usize,
) -> Result<Launch> {
    let what = "depthwise_conv_glu";
    if kernel != 3 {
        return Err(invalid(what, format!("kernel {kernel}: the fused CUDA depthwise conv + GLU is 3x3 only (GLUMBConv's)")));
    }
    let name = format!("depthwise_conv3_glu_{}", suffix(dtype)?);
    depthwise_launch(name, what, sm_count, [x, weight, bias, y], batch, h, w, c, None)
}

/// Depthwise k×k conv (odd k <= [`MAX_KERNEL`]), weight [c, 1, k, k], `bias` 0 when absent.
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv2d(
    dtype: DType,
    sm_count: u32,
    x: u64,
    weight: u64,
    bias: u64,
    y: u64,
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    kernel: usize,
) -> Result<Launch> {
    let what = "depthwise_conv2d";
    if kernel % 2 == 0 || kernel > MAX_KERNEL {
        return Err(invalid(what, format!("kernel {kernel}: the CUDA depthwise conv takes odd kernels up to {MAX_KERNEL}")));
    }
    let name = format!("depthwise_conv2d_{}", suffix(dtype)?);
    depthwise_launch(name, what, sm_count, [x, weight, bias, y], batch, h, w, c, Some(kernel))
}

/// Block-diagonal 1×1 conv: `rows` tokens, `cin` -> `cout` channels in `groups` groups, weight
/// [cout, cin / groups].
#[allow(clippy::too_many_arguments)]
pub fn grouped_linear(dtype: DType, x: u64, weight: u64, y: u64, rows: usize, cin: usize, cout: usize, groups: usize) -> Result<Launch> {
    let what = "grouped_linear";
    if groups == 0 || cin % groups != 0 || cout % groups != 0 {
        return Err(invalid(what, format!("{cin} -> {cout} channels do not split into {groups} groups")));
    }
    let y_blocks = groups * (cout / groups).div_ceil(GL_COLS);
    Ok(Launch {
        kernel: format!("grouped_linear_{}", suffix(dtype)?),
        grid: (grid_dim(what, rows.div_ceil(GL_ROWS), i32::MAX as usize)?, grid_dim(what, y_blocks, 65535)?, 1),
        block: (256, 1, 1),
        smem: 0,
        args: vec![
            KArg::Ptr(x),
            KArg::Ptr(weight),
            KArg::Ptr(y),
            KArg::I64(rows as i64),
            i32_arg("cin", cin)?,
            i32_arg("cout", cout)?,
            i32_arg("groups", groups)?,
        ],
    })
}

/// `repeat_interleave` over the last dim of `rows` rows of `cin` channels.
pub fn repeat_channels(dtype: DType, sm_count: u32, x: u64, y: u64, rows: usize, cin: usize, repeats: usize) -> Result<Launch> {
    Ok(Launch {
        kernel: format!("repeat_channels_{}", suffix(dtype)?),
        grid: stride_grid(sm_count, rows * cin * repeats / (16 / dtype.size_in_bytes()) + 1),
        block: (256, 1, 1),
        smem: 0,
        args: vec![KArg::Ptr(x), KArg::Ptr(y), KArg::I64(rows as i64), i32_arg("cin", cin)?, i32_arg("repeats", repeats)?],
    })
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Vec<Launch>> {
    let p = ctx.ptr;
    let g = ctx.graph;
    let sms = ctx.dev.sm_count();
    let out = p(node.output);
    let launch = match &node.op {
        Op::Conv2d { x, weight, bias, h, w, kernel, silu } => {
            let xs = g.shape(*x);
            conv2d(
                &Conv2dArgs {
                    dtype: ctx.dtype,
                    x: p(*x),
                    weight: p(*weight),
                    bias: bias.map_or(0, p),
                    residual: 0,
                    y: out,
                    batch: xs.dims()[0],
                    h: *h,
                    w: *w,
                    cin: xs.last(),
                    cout: g.shape(*weight).dims()[0],
                    kernel: *kernel,
                    act: if *silu { ConvAct::Silu } else { ConvAct::None },
                },
                ConvKernel::Auto,
            )?
        }
        Op::UpsampleConv2d { x, weight, bias, h, w, shortcut } => {
            let xs = g.shape(*x);
            upsample_conv2d(
                &UpsampleConv2dArgs {
                    dtype: ctx.dtype,
                    x: p(*x),
                    weight: p(*weight),
                    bias: bias.map_or(0, p),
                    y: out,
                    batch: xs.dims()[0],
                    h: *h,
                    w: *w,
                    cin: xs.last(),
                    cout: g.shape(*weight).dims()[0],
                    shortcut: *shortcut,
                },
                ConvKernel::Auto,
            )?
        }
        Op::DepthwiseConv2d { x, weight, bias, h, w, kernel } => {
            let xs = g.shape(*x);
            depthwise_conv2d(ctx.dtype, sms, p(*x), p(*weight), bias.map_or(0, p), out, xs.dims()[0], *h, *w, xs.last(), *kernel)?
        }
        Op::DepthwiseConvGlu { x, weight, bias, h, w, kernel } => {
            let xs = g.shape(*x);
            depthwise_conv3_glu(ctx.dtype, sms, p(*x), p(*weight), bias.map_or(0, p), out, xs.dims()[0], *h, *w, xs.last() / 2, *kernel)?
        }
        Op::GroupedLinear { x, weight, groups } => {
            let xs = g.shape(*x);
            grouped_linear(ctx.dtype, p(*x), p(*weight), out, xs.rows(), xs.last(), g.shape(*weight).dims()[0], *groups)?
        }
        Op::RepeatChannels { x, repeats } => {
            let xs = g.shape(*x);
            repeat_channels(ctx.dtype, sms, p(*x), out, xs.rows(), xs.last(), *repeats)?
        }
        _ => unreachable!("conv::resolve called for {}", node.op.name()),
    };
    Ok(vec![launch])
}
