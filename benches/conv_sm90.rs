//! The sm_90a conv kernels (kernels/conv_sm90.cu: wgmma + TMA) against the mma.sync kernels of
//! kernels/conv.cu on the same shapes, the large DC-AE decoder convs of a 1024² decode (batch 1):
//! the 512- and 256-channel ResBlock convs and the up blocks' fused upsample convs, in TFLOP/s (2·MAC;
//! the upsample conv counts the 3×3 conv it replaces, as benches/conv.rs) and as a fraction of a
//! bf16 GEMM ceiling measured in the same run (cuBLASLt 8192³), then the sm_90a / mma.sync speed-up.
//! The weight preparation (`conv3x3_weights_sm90`, once per weight at resolve time) is timed apart.
//!
//! CUDA events, warm-up, median of 50 samples; one line per case and a JSON record. Without a CUDA
//! device it prints `skipped: no CUDA device`; on a device that is not sm_90a, `skipped: not an
//! sm_90a device`; on the emulated GPU the shapes are cut (8×8 grids, 64 channels) and the times are
//! CPU times (a smoke run of this code). Run: `cargo bench --bench conv_sm90` (or tools/gpu_run.sh).

use openuni_cuda::families::conv::{
    self, Conv2dArgs, ConvAct, ConvKernel, ConvWeightLayout, UpsampleConv2dArgs,
};
use openuni_cuda::families::conv_sm90;
use openuni_cuda::gemm::{Epilogue, LinearArgs, LinearGemm};
use openuni_cuda::testing::{random_bytes, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

fn main() {
    let Some(mut r) = BenchReport::start("conv_sm90", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let dev = r.dev.clone();
    if !conv_sm90::device_supports(&dev) {
        println!(
            "skipped: not an sm_90a device ({:?}, kernels for {})",
            dev.compute_capability(),
            dev.kernels().target().arch
        );
        return;
    }
    let emu = dev.is_emulated();
    let (warmup, runs) = r.runs();
    let mut rng = Rng::new(1);
    let bf = DType::BF16;
    let cut = |v: usize, m: usize| if emu { v.min(m) } else { v };

    // The bf16 GEMM ceiling: cuBLASLt on a large square GEMM.
    let g = if emu { 256 } else { 8192 };
    let blas = dev.blas().expect("cuBLASLt");
    let a = dev
        .upload(&random_bytes(&mut rng, bf, g * g, 0.0, 1.0))
        .unwrap();
    let b = dev
        .upload(&random_bytes(&mut rng, bf, g * g, 0.0, 1.0))
        .unwrap();
    let c = dev.alloc(g * g * 2).unwrap();
    let gemm = LinearGemm::new(
        &dev,
        &blas,
        &LinearArgs {
            dtype: bf,
            rows: g,
            in_features: g,
            out_features: g,
            epilogue: Epilogue::None,
            x: a.ptr(),
            w: b.ptr(),
            bias: None,
            y: c.ptr(),
        },
    )
    .unwrap();
    // SAFETY: the three buffers hold [g, g] bf16 each.
    let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe { gemm.run(&dev, &blas) }).unwrap();
    let ceiling = 2.0 * (g as f64).powi(3) / (ms * 1e-3) / 1e12;
    println!("cuBLASLt bf16 GEMM {g}³: {ms:.3} ms, {ceiling:.1} TFLOP/s (the ceiling below)");
    drop((a, b, c, gemm));

    // (where, conv-grid h, w, cin, cout, upsample): the upsample convs' h, w are the output grid.
    let shapes: &[(&str, usize, usize, usize, usize, bool)] = &[
        (
            "up_blocks.2 ResBlock conv @1024²",
            256,
            256,
            512,
            512,
            false,
        ),
        (
            "up_blocks.1 ResBlock conv @1024²",
            512,
            512,
            256,
            256,
            false,
        ),
        (
            "up_blocks.1.0.conv (upsample) @1024²",
            512,
            512,
            512,
            256,
            true,
        ),
        (
            "up_blocks.0.0.conv (upsample) @1024²",
            1024,
            1024,
            256,
            128,
            true,
        ),
    ];
    for &(label, h, w, cin, cout, up) in shapes {
        let (h, w, cin, cout) = (cut(h, 8), cut(w, 8), cut(cin, 64), cut(cout, 64));
        let (lh, lw) = if up { (h / 2, w / 2) } else { (h, w) };
        let x = dev
            .upload(&random_bytes(&mut rng, bf, lh * lw * cin, 0.0, 1.0))
            .unwrap();
        let wt = dev
            .upload(&random_bytes(&mut rng, bf, cout * cin * 9, 0.0, 0.05))
            .unwrap();
        let bias = dev
            .upload(&random_bytes(&mut rng, bf, cout, 0.0, 0.1))
            .unwrap();
        // The mma.sync kernels read their own load-time layout (conv::prepare_conv_weight, padded
        // output channels): a buffer of that size (the values do not matter for timing).
        let wlen = conv::prepared_conv_weight_len(ConvWeightLayout::UpsamplePhases, cout, cin);
        let wt_mma = dev
            .upload(&random_bytes(&mut rng, bf, wlen, 0.0, 0.05))
            .unwrap();
        let y = dev.alloc(h * w * cout * 2).unwrap();
        let prepared = dev
            .alloc(conv_sm90::prepared_weight_bytes(cin, cout, up))
            .unwrap();
        let prep =
            conv_sm90::prepare_weights(dev.sm_count(), wt.ptr(), prepared.ptr(), cin, cout, up)
                .unwrap();
        let (mma, sm90) = if up {
            let a = UpsampleConv2dArgs {
                dtype: bf,
                x: x.ptr(),
                weight: wt.ptr(),
                bias: bias.ptr(),
                y: y.ptr(),
                batch: 1,
                h: lh,
                w: lw,
                cin,
                cout,
                shortcut: (4 * cout) % cin == 0,
            };
            (
                conv::upsample_conv2d(
                    &UpsampleConv2dArgs {
                        weight: wt_mma.ptr(),
                        ..a
                    },
                    ConvKernel::Auto,
                )
                .unwrap(),
                conv_sm90::upsample_conv2d(&a, prepared.ptr()).unwrap(),
            )
        } else {
            let a = Conv2dArgs {
                dtype: bf,
                x: x.ptr(),
                weight: wt.ptr(),
                bias: bias.ptr(),
                residual: 0,
                y: y.ptr(),
                batch: 1,
                h,
                w,
                cin,
                cout,
                kernel: 3,
                act: ConvAct::None,
            };
            (
                conv::conv2d(
                    &Conv2dArgs {
                        weight: wt_mma.ptr(),
                        ..a
                    },
                    ConvKernel::Auto,
                )
                .unwrap(),
                conv_sm90::conv2d(&a, prepared.ptr()).unwrap(),
            )
        };
        let flops = 2.0 * (h * w * cin * cout * 9) as f64;
        let bytes = 2 * (lh * lw * cin + h * w * cout + cout * cin * 9 + cout);
        // SAFETY (both timings and the preparation): the buffers hold the shapes launched.
        let ms_prep = time_ms(&dev, warmup, runs, 1, |_| unsafe { prep.enqueue(&dev) }).unwrap();
        let mut times = vec![];
        for l in [&mma, &sm90] {
            let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe { l.enqueue(&dev) }).unwrap();
            let frac = flops / (ms * 1e-3) / 1e12 / ceiling;
            r.add_flops(
                &l.kernel,
                &format!("{label}: {:.1}% of the GEMM ceiling", 100.0 * frac),
                &[lh, lw, cin, cout],
                flops,
                bytes,
                ms,
            );
            times.push(ms);
        }
        println!(
            "  {label}: sm_90a / mma.sync speed-up {:.2}x; weight preparation {ms_prep:.4} ms (once per weight)",
            times[0] / times[1]
        );
    }
    r.finish();
}
