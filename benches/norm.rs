//! Bandwidth of kernels/norm.cu at the models' shapes, against the device-to-device copy
//! bandwidth measured in the same run (the ceiling of a streaming kernel; the target for
//! the norms is at least 85% of it). CUDA events, warm-up, median of 50 samples, each sample a batch of
//! calls rotating through input sets 3x the L2 size so that every call reads from DRAM.
//! Prints one line per kernel and a JSON record (device, date, commit); without a CUDA device it
//! prints `skipped: no CUDA device`. Run: `cargo bench --bench norm` (or tools/gpu_run.sh).

use openuni_cuda::families::enqueue;
use openuni_cuda::families::norm::{self, Modulation};
use openuni_cuda::testing::{random_bytes, rotation, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// LLM / caption RMSNorm (weight).
    Rms,
    /// DC-AE channel RMSNorm (weight and bias).
    RmsBias,
    /// DC-AE channel RMSNorm with the block's residual added (`rmsnorm_residual`).
    RmsBiasResidual,
    /// Connector LayerNorm (weight and bias).
    LayerNorm,
    /// SANA norm1/norm2: no affine, fused adaLN modulation per sample.
    LayerNormAdaLn { tokens: usize },
    /// SANA norm1/norm2 as the step runs them: `ada_layernorm`, the modulation rows read from the
    /// timestep projection [B, 6·C] and the [6, C] table.
    AdaLayerNorm { tokens: usize },
}

fn main() {
    let Some(mut r) = BenchReport::start("norm", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let bf = DType::BF16;
    let cases: Vec<(&str, Kind, usize, usize, DType)> = vec![
        (
            "SANA-1.6B adaLN LN",
            Kind::LayerNormAdaLn { tokens: 1024 },
            2 * 1024,
            2240,
            bf,
        ),
        (
            "SANA-1.6B adaLN LN",
            Kind::LayerNormAdaLn { tokens: 1024 },
            2 * 1024,
            2240,
            DType::F32,
        ),
        (
            "SANA-600M adaLN LN",
            Kind::LayerNormAdaLn { tokens: 1024 },
            2 * 1024,
            1152,
            bf,
        ),
        (
            "SANA-600M adaLN LN, table rows",
            Kind::AdaLayerNorm { tokens: 1024 },
            2 * 1024,
            1152,
            bf,
        ),
        // The step's norm1/norm2 at batch 32 (64 CFG rows): b-512 (256 tokens a row) and l-1024.
        (
            "b-512 batch 32 step adaLN LN",
            Kind::AdaLayerNorm { tokens: 256 },
            64 * 256,
            1152,
            bf,
        ),
        (
            "l-1024 batch 32 step adaLN LN",
            Kind::AdaLayerNorm { tokens: 1024 },
            64 * 1024,
            2240,
            bf,
        ),
        ("SANA-1.6B RMSNorm", Kind::Rms, 2 * 1024, 2240, bf),
        ("connector LN", Kind::LayerNorm, 2 * 256, 1536, bf),
        ("connector LN (1 prompt)", Kind::LayerNorm, 256, 1536, bf),
        ("LLM RMSNorm", Kind::Rms, 2 * 300, 1536, bf),
        ("DC-AE channel RMSNorm", Kind::RmsBias, 512 * 512, 128, bf),
        ("DC-AE channel RMSNorm", Kind::RmsBias, 128 * 128, 512, bf),
        (
            "DC-AE RMSNorm + residual",
            Kind::RmsBiasResidual,
            512 * 512,
            128,
            bf,
        ),
        (
            "DC-AE RMSNorm + residual",
            Kind::RmsBiasResidual,
            128 * 128,
            512,
            bf,
        ),
    ];
    let mut rng = Rng::new(1);
    let (warmup, runs) = r.runs();
    for (label, kind, rows, cols, dtype) in cases {
        let rows = r.rows(rows);
        let dev = r.dev.clone();
        let es = dtype.size_in_bytes();
        let set = (rows * cols * es).div_ceil(256) * 256;
        let sets = if dev.is_emulated() {
            1
        } else {
            rotation(&dev, 2 * set)
        };
        let x = dev.alloc(set * sets).unwrap();
        let y = dev.alloc(set * sets).unwrap();
        dev.copy_to_device(
            &random_bytes(&mut rng, dtype, rows * cols, 0.3, 1.5),
            x.ptr(),
        )
        .unwrap();
        for s in 1..sets {
            dev.copy_on_device(x.ptr(), x.ptr() + (s * set) as u64, set)
                .unwrap();
        }
        let w = dev
            .upload(&random_bytes(&mut rng, dtype, cols, 1.0, 0.2))
            .unwrap();
        let b = dev
            .upload(&random_bytes(&mut rng, dtype, cols, 0.0, 0.2))
            .unwrap();
        let samples = match kind {
            Kind::LayerNormAdaLn { tokens } | Kind::AdaLayerNorm { tokens } => {
                rows.div_ceil(tokens.min(rows))
            }
            _ => 0,
        };
        let sc = dev
            .upload(&random_bytes(
                &mut rng,
                dtype,
                samples.max(1) * cols,
                0.0,
                0.3,
            ))
            .unwrap();
        let sh = dev
            .upload(&random_bytes(
                &mut rng,
                dtype,
                samples.max(1) * cols,
                0.0,
                0.3,
            ))
            .unwrap();
        // adaLN-single's timestep projection [B, 6·C] and table [6, C] (AdaLayerNorm).
        let t6 = dev
            .upload(&random_bytes(
                &mut rng,
                dtype,
                samples.max(1) * 6 * cols,
                0.0,
                0.3,
            ))
            .unwrap();
        let table = dev
            .upload(&random_bytes(&mut rng, dtype, 6 * cols, 0.0, 0.3))
            .unwrap();
        let (kernel, extra) = match kind {
            Kind::Rms => ("rmsnorm", cols),
            Kind::RmsBias => ("rmsnorm+bias", 2 * cols),
            Kind::RmsBiasResidual => ("rmsnorm_residual", 2 * cols + rows * cols),
            Kind::LayerNorm => ("layernorm", 2 * cols),
            Kind::LayerNormAdaLn { .. } => ("layernorm+adaLN", 2 * samples * cols),
            Kind::AdaLayerNorm { .. } => ("ada_layernorm", 2 * samples * cols + 2 * cols),
        };
        let ms = time_ms(&dev, warmup, runs, sets, |i| {
            let off = ((i % sets) * set) as u64;
            let (xp, yp) = (x.ptr() + off, y.ptr() + off);
            // SAFETY: every buffer holds the shapes launched.
            unsafe {
                match kind {
                    Kind::Rms => norm::rmsnorm(dtype, xp, w.ptr(), 0, yp, rows, cols, 1e-6)
                        .and_then(|l| enqueue(&dev, &l)),
                    Kind::RmsBias => {
                        norm::rmsnorm(dtype, xp, w.ptr(), b.ptr(), yp, rows, cols, 1e-6)
                            .and_then(|l| enqueue(&dev, &l))
                    }
                    // The residual is another set of the rotation (the same shape, also from DRAM).
                    Kind::RmsBiasResidual => {
                        let rp = x.ptr() + (((i + 1) % sets) * set) as u64;
                        norm::rmsnorm_residual(
                            dtype,
                            xp,
                            w.ptr(),
                            b.ptr(),
                            rp,
                            yp,
                            rows,
                            cols,
                            1e-5,
                        )
                        .and_then(|l| enqueue(&dev, &l))
                    }
                    Kind::LayerNorm => {
                        norm::layernorm(dtype, xp, w.ptr(), b.ptr(), None, yp, rows, cols, 1e-5)
                            .and_then(|l| enqueue(&dev, &l))
                    }
                    Kind::LayerNormAdaLn { tokens } => {
                        let m = Modulation {
                            scale: sc.ptr(),
                            shift: sh.ptr(),
                            tokens: tokens.min(rows),
                        };
                        norm::layernorm(dtype, xp, 0, 0, Some(m), yp, rows, cols, 1e-6)
                            .and_then(|l| enqueue(&dev, &l))
                    }
                    Kind::AdaLayerNorm { tokens } => {
                        let (scale, stride) =
                            norm::table_row(t6.ptr(), 6 * cols, table.ptr(), 6, cols, 1, es);
                        let (shift, _) =
                            norm::table_row(t6.ptr(), 6 * cols, table.ptr(), 6, cols, 0, es);
                        norm::ada_layernorm(
                            dtype,
                            xp,
                            scale,
                            shift,
                            stride,
                            yp,
                            rows,
                            cols,
                            tokens.min(rows),
                            1e-6,
                        )
                        .and_then(|l| enqueue(&dev, &l))
                    }
                }
            }
        })
        .unwrap();
        let bytes = (2 * rows * cols + extra) * es;
        r.add(
            &format!("{kernel}_{dtype}"),
            label,
            &[rows, cols],
            bytes,
            ms,
        );
    }
    r.finish();
}
