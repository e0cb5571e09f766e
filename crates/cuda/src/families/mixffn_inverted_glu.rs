//! GLUMBConv from its input to the GLU (`kernels/mixffn_inverted_glu.cu`): `Op::MixFfnInvertedGlu`,
//! `conv_inverted` (1×1 conv C -> 2H) + SiLU + depthwise 3×3 + GLU. CPU twin:
//! `openuni_cpu::ops::mixffn_inverted_glu`.
//!
//! Three ways to run the node, chosen by [`select`] (one place, tested):
//! - [`Path::TwoOp`]: the GEMM (cuBLASLt, bias epilogue) into a workspace, then
//!   `silu_depthwise_conv3_glu_<dtype>`. It writes and reads back the 2H-wide GEMM output, SANA's
//!   widest activation (0.38 GB per Sana-600M batch-32 block).
//! - [`Path::Wgmma`]: one launch of `mixffn_inverted_glu_bf16_wgmma` (sm_90a: wgmma fed by TMA,
//!   the GEMM tile kept in shared memory). The default on an sm_90a device where it applies
//!   ([`fused_band_applies`]: bf16 storage, C % 8 == 0, the whole latent in one block's [`MF_M`]
//!   tokens); on a real GPU the executor times it against the two-op path once per shape and keeps
//!   the faster ([`resolve`], choice cached on disk beside cuBLASLt's).
//! - [`Path::Fused`]: `mixffn_inverted_glu_bf16` (mma.sync), only when `OPENUNI_MIXFFN=fused` asks
//!   for it on a device without the sm_90a kernels: on an H200 it took 1.85 ms per Sana-600M
//!   batch-32 block against 1.02 ms for the two-op path (docs/gpu-results.md, run 2), its mma.sync
//!   GEMM at 119 TFLOP/s where cuBLASLt's reaches 700.
//!
//! `OPENUNI_MIXFFN` ([`MIXFFN_ENV`]): `auto` (or unset) as above; `two-op` always the two-op path;
//! `fused` the fused kernel wherever it applies (wgmma on sm_90a, else mma.sync), untimed.

use openuni_graph::{Node, Op};
use openuni_tensor::DType;

use super::conv::{depthwise_conv3_glu, geometry};
use super::{i32_arg, Ctx, Launch, Step};
use crate::device::{CudaDevice, KArg};
use crate::error::{CudaError, Result};
use crate::gemm::{Epilogue, LinearArgs, LinearGemm};
use crate::tma;

/// GEMM rows (tokens) of one block: the output rows of its band plus a halo row on each side.
pub const MF_M: usize = geometry::MF_M;
/// Hidden channels of one block (it computes both GLU halves of each: 2 × this GEMM columns).
pub const MF_HC: usize = geometry::MF_HC;
/// Dynamic shared memory of a block: the stages' ring, later the activated GEMM tile.
pub const MF_SMEM: usize = geometry::MF_SMEM;
/// The sm_90a kernel's threads (1 producer + 2 consumer warpgroups) and dynamic shared memory.
pub const MF90_THREADS: usize = geometry::MF90_THREADS;
pub const MF90_SMEM: usize = geometry::MF90_SMEM;

/// The environment switch (see the module docs).
pub const MIXFFN_ENV: &str = "OPENUNI_MIXFFN";

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

/// How a node runs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    TwoOp,
    /// The mma.sync kernel with output bands of this many rows.
    Fused(usize),
    /// The sm_90a kernel (the whole latent in one block).
    Wgmma,
}

/// What `OPENUNI_MIXFFN` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Auto,
    TwoOp,
    Fused,
}

/// Reads [`MIXFFN_ENV`] (unset or empty: `auto`); another value is an error naming the variable,
/// the value and the ones it takes.
pub fn request() -> Result<Request> {
    match std::env::var(MIXFFN_ENV).as_deref().map(str::trim) {
        Ok("fused") => Ok(Request::Fused),
        Ok("two-op") => Ok(Request::TwoOp),
        Ok("auto") | Ok("") | Err(_) => Ok(Request::Auto),
        Ok(other) => Err(invalid(format!(
            "{MIXFFN_ENV}=`{other}`: expected `auto`, `fused` or `two-op`"
        ))),
    }
}

/// The path of a node (`dtype` storage, `c` input channels, an `h`×`w` latent) on a device with
/// (`sm90`) or without the sm_90a kernels, before any timing: where the fused kernel applies, the
/// wgmma kernel on sm_90a unless `two-op` is asked for, the mma.sync kernel elsewhere only when
/// `fused` is asked for; otherwise the two-op path. Bands with halo rows (SANA at 1024 px, 32×32:
/// 8 GEMM rows for 6 output rows) would compute the conv_inverted GEMM 4/3 times over; that GEMM
/// is compute bound at those shapes, so the mma.sync launcher supports bands (tested) but no
/// selection picks them until a GPU measurement says they pay.
pub fn select(request: Request, sm90: bool, dtype: DType, c: usize, h: usize, w: usize) -> Path {
    match (fused_band_applies(dtype, c, h, w), request) {
        (None, _) | (Some(_), Request::TwoOp) => Path::TwoOp,
        (Some(_), _) if sm90 => Path::Wgmma,
        (Some(band), Request::Fused) => Path::Fused(band),
        (Some(_), Request::Auto) => Path::TwoOp,
    }
}

/// Where the fused kernels can run (whole latents only; see [`select`]).
pub fn fused_band_applies(dtype: DType, c: usize, h: usize, w: usize) -> Option<usize> {
    if dtype != DType::BF16 || !c.is_multiple_of(8) || c == 0 || h * w > MF_M {
        return None;
    }
    band_rows(h, w)
}

/// Whether `dev` runs the sm_90a kernel (conv_sm90's rule: compute capability 9.0, sm_90a kernels,
/// not `OPENUNI_KERNELS=mma`).
pub fn sm90(dev: &CudaDevice) -> bool {
    super::conv_sm90::selected(dev)
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
/// shape the kernel does not compute or a pointer that is not 16-byte aligned.
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
    require_aligned("mixffn_inverted_glu_bf16", a)?;
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
        args: [
            vec![KArg::Ptr(a.x), KArg::Ptr(a.wi)],
            epilogue_args(a)?,
            vec![i32_arg("band", band)?],
        ]
        .concat(),
    })
}

/// x and the conv_inverted weight are read in 16-byte copies (cp.async, or TMA boxes).
fn require_aligned(what: &str, a: &MixFfnArgs) -> Result<()> {
    for (name, p) in [("x", a.x), ("conv_inverted weight", a.wi)] {
        if !p.is_multiple_of(16) {
            return Err(invalid(format!(
                "{what}: {name} at {p:#x} is not 16-byte aligned"
            )));
        }
    }
    Ok(())
}

/// The arguments both kernels take after their two GEMM operands, in the same order.
fn epilogue_args(a: &MixFfnArgs) -> Result<Vec<KArg>> {
    Ok(vec![
        KArg::Ptr(a.bi),
        KArg::Ptr(a.wd),
        KArg::Ptr(a.bd),
        KArg::Ptr(a.y),
        i32_arg("h", a.h)?,
        i32_arg("w", a.w)?,
        i32_arg("channels", a.c)?,
        i32_arg("hidden", a.hidden)?,
    ])
}

/// The sm_90a launch (the whole latent in one block per image and [`MF_HC`] channels), or an error
/// naming what the kernel does not compute: C % 8 != 0 (TMA row strides are multiples of 16
/// bytes), more than [`MF_M`] tokens, x or the weight not 16-byte aligned.
pub fn mixffn_inverted_glu_wgmma(a: &MixFfnArgs) -> Result<Launch> {
    let what = "mixffn_inverted_glu_bf16_wgmma";
    if a.c == 0 || !a.c.is_multiple_of(8) || a.h * a.w == 0 || a.h * a.w > MF_M {
        return Err(invalid(format!(
            "{what}: {} channels on a {}x{} latent: needs C % 8 == 0 and at most {MF_M} tokens",
            a.c, a.h, a.w
        )));
    }
    require_aligned(what, a)?;
    let grid = (a.hidden.div_ceil(MF_HC), a.batch);
    if grid.0 == 0
        || grid.1 == 0
        || grid.1 > 65535
        || grid.0 > i32::MAX as usize
        || 2 * a.hidden > i32::MAX as usize
    {
        return Err(invalid(format!(
            "{what}: grid {grid:?} is empty or exceeds 65535 images"
        )));
    }
    let (c, tokens) = (a.c as u64, (a.h * a.w) as u64);
    let chunk = geometry::MF90_CHUNK as u32;
    let map_x = tma::tiled_bf16_swizzle128(
        &format!("{what} x"),
        a.x,
        &[c, tokens, a.batch as u64],
        &[2 * c, 2 * c * tokens],
        &[chunk, (MF_M / 2) as u32, 1],
    )?;
    let map_w = tma::tiled_bf16_swizzle128(
        &format!("{what} conv_inverted weight"),
        a.wi,
        &[c, 2 * a.hidden as u64],
        &[2 * c],
        &[chunk, MF_HC as u32],
    )?;
    Ok(Launch {
        kernel: what.into(),
        grid: (grid.0 as u32, 1, grid.1 as u32),
        block: (MF90_THREADS as u32, 1, 1),
        smem: MF90_SMEM as u32,
        args: [
            vec![KArg::TensorMap(map_x), KArg::TensorMap(map_w)],
            epilogue_args(a)?,
        ]
        .concat(),
    })
}

/// Launches of a node on `path`: 1 for the fused kernels, 2 (GEMM + depthwise GLU) for the two-op path.
pub fn launch_count(path: Path) -> usize {
    match path {
        Path::TwoOp => 2,
        Path::Fused(_) | Path::Wgmma => 1,
    }
}

/// The two-op step: the GEMM into a workspace shared by every such node, then the depthwise GLU.
fn two_op_step(ctx: &Ctx, a: &MixFfnArgs, bias: Option<u64>, rows: usize) -> Result<Step> {
    let inverted = ctx.workspace(
        "mixffn_inverted_glu.inverted",
        rows * 2 * a.hidden * ctx.dtype.size_in_bytes(),
    )?;
    let blas = ctx.dev.blas()?;
    let args = LinearArgs {
        dtype: ctx.dtype,
        rows,
        in_features: a.c,
        out_features: 2 * a.hidden,
        epilogue: if bias.is_some() {
            Epilogue::Bias
        } else {
            Epilogue::None
        },
        x: a.x,
        w: a.wi,
        bias,
        y: inverted,
    };
    let gemm = LinearGemm::new(ctx.dev, &blas, &args)?;
    let dw = depthwise_conv3_glu(
        ctx.dtype, inverted, a.wd, a.bd, a.y, a.batch, a.h, a.w, a.hidden, 3, true,
    )?;
    Ok(Step::GemmThen(gemm, blas, vec![dw]))
}

/// Median of 5 event-timed runs of `step` after one warm-up, in ms.
fn time_step(dev: &CudaDevice, step: &Step) -> Result<f32> {
    const RUNS: usize = 5;
    // SAFETY (all enqueues): the step was resolved against the executor's live buffers.
    unsafe { step.enqueue(dev)? };
    let (start, end) = (dev.timing_event()?, dev.timing_event()?);
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        dev.record(&start)?;
        unsafe { step.enqueue(dev)? };
        dev.record(&end)?;
        dev.synchronize()?;
        times.push(
            start
                .elapsed_ms(&end)
                .map_err(|e| invalid(format!("timing the MixFFN paths: {e}")))?,
        );
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[RUNS / 2])
}

/// The key of a node's timed choice: the device and libraries (cuBLASLt's identity), the kernel
/// file's fingerprint (a changed kernel is timed again) and the shape.
fn choice_key(blas: &crate::gemm::Blas, a: &MixFfnArgs, bias: bool) -> String {
    let src = crate::kernels::kernel_sources()
        .iter()
        .find(|(f, _)| *f == "mixffn_inverted_glu.cu")
        .map_or("", |(_, s)| s);
    let fp = crate::kernels::source_fingerprint(src, crate::kernels::kernel_headers());
    format!(
        "{} mixffn_inverted_glu {fp:016x} b{} {}x{} c{} h{} bias{}",
        blas.identity(),
        a.batch,
        a.h,
        a.w,
        a.c,
        a.hidden,
        bias as u8
    )
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
    let request = request()?;
    match select(request, sm90(ctx.dev), ctx.dtype, c, *h, *w) {
        Path::TwoOp => two_op_step(ctx, &a, bias.map(p), xs.rows()),
        Path::Fused(_) => Ok(Step::Launches(vec![mixffn_inverted_glu(&a)?])),
        Path::Wgmma => {
            let fused = Step::Launches(vec![mixffn_inverted_glu_wgmma(&a)?]);
            if request == Request::Fused || ctx.dev.is_emulated() {
                return Ok(fused); // asked for, or nothing to time (the emulated GPU's clock is the CPU's)
            }
            // `auto` on a GPU: the faster of the two, timed once per shape (both write only y and
            // the shared workspace, which the executor's later steps overwrite before reading).
            let blas = ctx.dev.blas()?;
            let key = choice_key(&blas, &a, bias.is_some());
            match blas.choices().get(&key) {
                // Chosen before: only the chosen path is built (the two-op workspace is 2H wide).
                Some(1) => Ok(fused),
                Some(_) => two_op_step(ctx, &a, bias.map(p), xs.rows()),
                None => {
                    let two_op = two_op_step(ctx, &a, bias.map(p), xs.rows())?;
                    let keep = timed_choice(ctx.dev, blas.choices(), &key, &fused, &two_op)?;
                    Ok(if keep { fused } else { two_op })
                }
            }
        }
    }
}

/// Whether the fused step is kept for `key`: the choice in `cache` if there is one, else both
/// steps timed now ([`time_step`]) and the faster recorded (1: fused, 0: two-op). Both steps must
/// be resolved against live buffers; they write only their output and workspace.
pub fn timed_choice(
    dev: &CudaDevice,
    cache: &crate::gemm_cache::AlgoCache,
    key: &str,
    fused: &Step,
    two_op: &Step,
) -> Result<bool> {
    if let Some(i) = cache.get(key) {
        return Ok(i == 1);
    }
    let (tf, tt) = (time_step(dev, fused)?, time_step(dev, two_op)?);
    cache.insert(key, (tf < tt) as usize);
    // Once per shape and device (later runs read the cache): which path a profile will show.
    eprintln!(
        "mixffn_inverted_glu: {key}: fused {tf:.4} ms, two-op {tt:.4} ms (median of 5): keeping {}",
        if tf < tt { "fused" } else { "two-op" }
    );
    Ok(tf < tt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_picks_the_path_by_device_request_and_shape() {
        // SANA 512 px: the whole 16x16 image in one block.
        assert_eq!(fused_band_applies(DType::BF16, 1152, 16, 16), Some(16));
        assert_eq!(fused_band_applies(DType::BF16, 8, 4, 4), Some(4));
        // 1024 px (32x32) would need halo bands: the two-op path, though the mma.sync launcher has bands.
        assert_eq!(fused_band_applies(DType::BF16, 2240, 32, 32), None);
        assert_eq!(band_rows(32, 32), Some(MF_M / 32 - 2));
        assert_eq!(band_rows(4, MF_M / 3 + 1), None);
        // C not a multiple of 8, f32 storage: the two-op path.
        assert_eq!(fused_band_applies(DType::BF16, 12, 4, 4), None);
        assert_eq!(fused_band_applies(DType::F32, 64, 4, 4), None);
        use Request::*;
        let sana512 = |r, sm90| select(r, sm90, DType::BF16, 1152, 16, 16);
        // sm_90a: the wgmma kernel unless two-op is asked for; elsewhere mma.sync only when asked.
        assert_eq!(sana512(Auto, true), Path::Wgmma);
        assert_eq!(sana512(Fused, true), Path::Wgmma);
        assert_eq!(sana512(TwoOp, true), Path::TwoOp);
        assert_eq!(sana512(Auto, false), Path::TwoOp);
        assert_eq!(sana512(Fused, false), Path::Fused(16));
        assert_eq!(sana512(TwoOp, false), Path::TwoOp);
        for r in [Auto, Fused, TwoOp] {
            for sm90 in [false, true] {
                assert_eq!(select(r, sm90, DType::BF16, 2240, 32, 32), Path::TwoOp);
                assert_eq!(select(r, sm90, DType::F32, 64, 4, 4), Path::TwoOp);
                assert_eq!(select(r, sm90, DType::BF16, 12, 4, 4), Path::TwoOp);
            }
        }
        assert_eq!(
            (
                launch_count(Path::TwoOp),
                launch_count(Path::Wgmma),
                launch_count(Path::Fused(4))
            ),
            (2, 1, 1)
        );
    }

    #[test]
    fn request_reads_the_environment() {
        // The only test of this binary that reads or sets OPENUNI_MIXFFN.
        for (v, want) in [
            ("fused", Request::Fused),
            ("two-op", Request::TwoOp),
            ("auto", Request::Auto),
            ("", Request::Auto),
        ] {
            std::env::set_var(MIXFFN_ENV, v);
            assert_eq!(request().unwrap(), want, "{v}");
        }
        std::env::set_var(MIXFFN_ENV, "fusd");
        let e = request().unwrap_err().to_string();
        assert!(
            e.contains("OPENUNI_MIXFFN=`fusd`") && e.contains("`two-op`"),
            "{e}"
        );
        std::env::remove_var(MIXFFN_ENV);
        assert_eq!(request().unwrap(), Request::Auto);
    }
}
