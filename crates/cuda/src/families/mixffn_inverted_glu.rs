//! GLUMBConv from its input to the GLU (`kernels/mixffn_inverted_glu.cu`): `Op::MixFfnInvertedGlu`,
//! `conv_inverted` (1×1 conv C -> 2H) + SiLU + depthwise 3×3 + GLU. CPU twin:
//! `openuni_cpu::ops::mixffn_inverted_glu`.
//!
//! Two ways to run the node, chosen by [`fused_band`] (one place, tested):
//! - the two-op path, the default: the GEMM (cuBLASLt, bias epilogue) into a workspace, then
//!   `silu_depthwise_conv3_glu_<dtype>`;
//! - fused, opted into with `OPENUNI_MIXFFN=fused` ([`fused_opted_in`]): one launch of
//!   `mixffn_inverted_glu_bf16`, the GEMM tile kept in shared memory, where it applies
//!   ([`fused_band_applies`]: bf16 storage, C % 8 == 0, the whole latent in one block's [`MF_M`]
//!   tokens). It moves 21% fewer modelled bytes per b-512 step, but on an H200 it took 1.85 ms per
//!   Sana-600M batch-32 block against 1.02 ms for the two-op path (docs/gpu-results.md, run 2): its
//!   mma.sync GEMM reaches 119 TFLOP/s where cuBLASLt's reaches 700, so it is not the default.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::conv::{depthwise_conv3_glu, geometry};
use super::{i32_arg, Ctx, Launch, Step};
use crate::device::KArg;
use crate::error::{CudaError, Result};
use crate::gemm::{Epilogue, LinearArgs, LinearGemm};

/// GEMM rows (tokens) of one block: the output rows of its band plus a halo row on each side.
pub const MF_M: usize = geometry::MF_M;
/// Hidden channels of one block (it computes both GLU halves of each: 2 × this GEMM columns).
pub const MF_HC: usize = geometry::MF_HC;
/// Dynamic shared memory of a block: the stages' ring, later the activated GEMM tile.
pub const MF_SMEM: usize = geometry::MF_SMEM;

fn invalid(msg: String) -> CudaError {
    CudaError::Invalid {
        what: "mixffn_inverted_glu".into(),
        msg,
    }
}

/// Output rows per block of the fused kernel on an `h`×`w` latent: the whole image when it fits
/// [`MF_M`] tokens (no halo), else bands of `MF_M / w - 2` rows with a halo row above and below
/// computed twice (at least one output row, so `w <= MF_M / 3`).
pub fn band_rows(h: usize, w: usize) -> Option<usize> {
    if h == 0 || w == 0 {
        None
    } else if h * w <= MF_M {
        Some(h)
    } else {
        (MF_M / w).checked_sub(2).filter(|&r| r >= 1)
    }
}

/// The executor's choice: `Some(band)` when a node runs the fused kernel (`dtype` storage, `c`
/// input channels, an `h`×`w` latent), `None` for the two-op path. Fused only when opted into
/// ([`fused_opted_in`]), with bf16 storage
/// (the kernel is mma.sync bf16), C % 8 == 0 (16-byte cp.async rows) and the whole image in one
/// block (h·w <= [`MF_M`]: SANA at 512 px, 16×16). Bands with halo rows (SANA at 1024 px, 32×32:
/// 8 GEMM rows for 6 output rows) would compute the conv_inverted GEMM 4/3 times over; that GEMM
/// is compute bound at those shapes, so the launcher supports bands (tested) but the executor
/// does not pick them until a GPU measurement says they pay.
pub fn fused_band(dtype: DType, c: usize, h: usize, w: usize) -> Option<usize> {
    fused_band_applies(dtype, c, h, w).filter(|_| fused_opted_in())
}

/// Where the fused kernel can run (the rule of [`fused_band`] without the opt-in).
pub fn fused_band_applies(dtype: DType, c: usize, h: usize, w: usize) -> Option<usize> {
    if dtype != DType::BF16 || !c.is_multiple_of(8) || c == 0 || h * w > MF_M {
        return None;
    }
    band_rows(h, w)
}

/// `OPENUNI_MIXFFN=fused` selects the fused kernel where it applies; unset or `two-op`: the
/// two-op path (measured faster on an H200, see the module comment). Another value is named on
/// stderr once and read as `two-op`.
pub fn fused_opted_in() -> bool {
    match std::env::var("OPENUNI_MIXFFN").as_deref() {
        Ok("fused") => true,
        Ok("two-op") | Ok("") | Err(_) => false,
        Ok(other) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| eprintln!("warning: OPENUNI_MIXFFN=`{other}` is neither `fused` nor `two-op`: using the two-op MixFFN"));
            false
        }
    }
}

/// Pointers and shape of one call; `bi` and `bd` 0 when absent.
#[derive(Clone, Copy, Debug)]
pub struct MixFfnArgs {
    pub x: u64,
    pub wi: u64,
    pub bi: u64,
    pub wd: u64,
    pub bd: u64,
    pub y: u64,
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub hidden: usize,
}

/// The fused launch (bf16 storage; bands where [`band_rows`] needs them), or an error naming a
/// shape the kernel does not compute or a pointer
/// that is not 16-byte aligned (x and wi are read in 16-byte cp.async copies).
pub fn mixffn_inverted_glu(a: &MixFfnArgs) -> Result<Launch> {
    let band = band_rows(a.h, a.w)
        .filter(|_| a.c.is_multiple_of(8) && a.c > 0)
        .ok_or_else(|| {
            invalid(format!(
                "{} channels on a {}x{} latent: the fused kernel needs C % 8 == 0 and w <= {}",
                a.c,
                a.h,
                a.w,
                MF_M / 3
            ))
        })?;
    for (name, p) in [("x", a.x), ("conv_inverted weight", a.wi)] {
        if !p.is_multiple_of(16) {
            return Err(invalid(format!("{name} at {p:#x} is not 16-byte aligned")));
        }
    }
    let grid = (a.hidden.div_ceil(MF_HC), a.h.div_ceil(band), a.batch);
    if grid.0 == 0 || grid.2 == 0 || grid.1 > 65535 || grid.2 > 65535 || grid.0 > i32::MAX as usize
    {
        return Err(invalid(format!(
            "grid {grid:?} is empty or exceeds 65535 in y or z"
        )));
    }
    Ok(Launch {
        kernel: "mixffn_inverted_glu_bf16".into(),
        grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
        block: (256, 1, 1),
        smem: MF_SMEM as u32,
        args: vec![
            KArg::Ptr(a.x),
            KArg::Ptr(a.wi),
            KArg::Ptr(a.bi),
            KArg::Ptr(a.wd),
            KArg::Ptr(a.bd),
            KArg::Ptr(a.y),
            i32_arg("h", a.h)?,
            i32_arg("w", a.w)?,
            i32_arg("channels", a.c)?,
            i32_arg("hidden", a.hidden)?,
            i32_arg("band", band)?,
        ],
    })
}

/// Launches of a node on the two-op path: 1 GEMM + 1 depthwise GLU; fused: 1.
pub fn launch_count(dtype: DType, c: usize, h: usize, w: usize) -> usize {
    if fused_band(dtype, c, h, w).is_some() {
        1
    } else {
        2
    }
}

pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Step> {
    let Op::MixFfnInvertedGlu {
        x,
        weight,
        bias,
        dw_weight,
        dw_bias,
        h,
        w,
    } = &node.op
    else {
        unreachable!("mixffn_inverted_glu::resolve called for {}", node.op.name())
    };
    let (p, g) = (ctx.ptr, ctx.graph);
    let xs = g.shape(*x);
    let (c, hidden) = (xs.last(), g.shape(node.output).last());
    let a = MixFfnArgs {
        x: p(*x),
        wi: p(*weight),
        bi: bias.map_or(0, p),
        wd: p(*dw_weight),
        bd: dw_bias.map_or(0, p),
        y: p(node.output),
        batch: xs.dims()[0],
        h: *h,
        w: *w,
        c,
        hidden,
    };
    if a.batch * a.h * a.w * hidden == 0 {
        return Ok(Step::Launches(vec![]));
    }
    if fused_band(ctx.dtype, c, *h, *w).is_some() {
        return Ok(Step::Launches(vec![mixffn_inverted_glu(&a)?]));
    }
    // The two-op path: the 2H-wide GEMM output in a workspace shared by every such node.
    let rows = xs.rows();
    let inverted = ctx.workspace(
        "mixffn_inverted_glu.inverted",
        rows * 2 * hidden * ctx.dtype.size_in_bytes(),
    )?;
    let blas = ctx.dev.blas()?;
    let args = LinearArgs {
        dtype: ctx.dtype,
        rows,
        in_features: c,
        out_features: 2 * hidden,
        epilogue: if bias.is_some() {
            Epilogue::Bias
        } else {
            Epilogue::None
        },
        x: a.x,
        w: a.wi,
        bias: bias.map(p),
        y: inverted,
    };
    let gemm = LinearGemm::new(ctx.dev, &blas, &args)?;
    let dw = depthwise_conv3_glu(
        ctx.dtype, inverted, a.wd, a.bd, a.y, a.batch, a.h, a.w, hidden, 3, true,
    )?;
    Ok(Step::GemmThen(gemm, blas, vec![dw]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_band_selects_the_kernel_only_where_it_applies() {
        // SANA 512 px: the whole 16x16 image in one block.
        assert_eq!(fused_band_applies(DType::BF16, 1152, 16, 16), Some(16));
        assert_eq!(fused_band_applies(DType::BF16, 8, 4, 4), Some(4));
        // 1024 px (32x32) would need halo bands: the two-op path, though the launcher has bands.
        assert_eq!(fused_band_applies(DType::BF16, 2240, 32, 32), None);
        assert_eq!(band_rows(32, 32), Some(MF_M / 32 - 2));
        assert_eq!(band_rows(4, MF_M / 3 + 1), None);
        // C not a multiple of 8, f32 storage: the two-op path.
        assert_eq!(fused_band_applies(DType::BF16, 12, 4, 4), None);
        assert_eq!(fused_band_applies(DType::F32, 64, 4, 4), None);
        // Only opted into (the only test of this binary that reads or sets OPENUNI_MIXFFN).
        std::env::remove_var("OPENUNI_MIXFFN");
        assert_eq!(fused_band(DType::BF16, 1152, 16, 16), None);
        assert_eq!(launch_count(DType::BF16, 1152, 16, 16), 2);
        std::env::set_var("OPENUNI_MIXFFN", "fused");
        assert_eq!(fused_band(DType::BF16, 1152, 16, 16), Some(16));
        assert_eq!(launch_count(DType::BF16, 1152, 16, 16), 1);
        assert_eq!(launch_count(DType::BF16, 2240, 32, 32), 2);
        assert_eq!(launch_count(DType::F32, 64, 4, 4), 2);
        std::env::remove_var("OPENUNI_MIXFFN");
    }
}
