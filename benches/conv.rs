//! Speed of kernels/conv.cu at the DC-AE decoder's shapes (batch 1, 512² and 1024² outputs).
//!
//! - 3×3 convolutions (`conv2d_bf16_tc`): TFLOP/s (2·MAC) and the fraction of a bf16 GEMM
//!   ceiling measured in the same run (cuBLASLt, 8192³, through the executor's `LinearGemm`);
//!   for the up blocks also the fused upsample conv (`upsample_conv2d_bf16_tc`, what the decoder
//!   runs), in effective TFLOP/s of the 3×3 conv it replaces.
//! - the memory-bound ops (depthwise, grouped 1×1): GB/s (bytes
//!   read + written once) and the fraction of the device-to-device copy bandwidth.
//!
//! CUDA events, warm-up, median of 50 samples. Prints one line per case and a JSON record
//! (device, date, commit; the conv lines carry TFLOP/s and the GEMM fraction in their label).
//! Without a CUDA device it prints `skipped: no CUDA device`; on the emulated GPU the shapes are
//! cut down (grids to 8×8, channels to 32) and the times are CPU times (a smoke run of this code).
//! Run: `cargo bench --bench conv` (or tools/gpu_run.sh). The comparison with cuDNN
//! (torch conv2d, bf16, channels_last) needs a PyTorch run on the same GPU.

use openuni_cuda::families::conv::{
    self, Conv2dArgs, ConvAct, ConvKernel, ConvWeightLayout, UpsampleConv2dArgs,
};
use openuni_cuda::gemm::{Epilogue, LinearArgs, LinearGemm};
use openuni_cuda::testing::{random_bytes, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

/// (where the shape comes from, h, w, cin, cout) of every distinct 3×3 conv of the decoder at an
/// output of `px`² (batch 1).
fn conv_shapes(px: usize) -> Vec<(String, usize, usize, usize, usize)> {
    let s = |d: usize| px / d;
    vec![
        (format!("conv_in @{px}²"), s(32), s(32), 32, 1024),
        (
            format!("up_blocks.4.0.conv @{px}²"),
            s(16),
            s(16),
            1024,
            1024,
        ),
        (format!("up_blocks.3.0.conv @{px}²"), s(8), s(8), 1024, 512),
        (
            format!("up_blocks.2.0.conv, ResBlocks @{px}²"),
            s(4),
            s(4),
            512,
            512,
        ),
        (format!("up_blocks.1.0.conv @{px}²"), s(2), s(2), 512, 256),
        (format!("up_blocks.1 ResBlock @{px}²"), s(2), s(2), 256, 256),
        (format!("up_blocks.0.0.conv @{px}²"), px, px, 256, 128),
        (format!("up_blocks.0 ResBlock @{px}²"), px, px, 128, 128),
        (format!("conv_out @{px}²"), px, px, 128, 3),
    ]
}

fn main() {
    let Some(mut r) = BenchReport::start("conv", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let dev = r.dev.clone();
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

    for px in [512usize, 1024] {
        for (label, h, w, cin, cout) in conv_shapes(px) {
            let (h, w, cin, cout) = (cut(h, 8), cut(w, 8), cut(cin, 32), cut(cout, 32));
            let x = dev
                .upload(&random_bytes(&mut rng, bf, h * w * cin, 0.0, 1.0))
                .unwrap();
            // Large enough for either prepared layout the tensor-core kernels read (the upsample
            // phases' 16 taps per chunk is the larger), and for the upstream [cout, cin, 3, 3].
            let wlen = conv::prepared_conv_weight_len(ConvWeightLayout::UpsamplePhases, cout, cin);
            let wt = dev
                .upload(&random_bytes(&mut rng, bf, wlen, 0.0, 0.05))
                .unwrap();
            let bias = dev
                .upload(&random_bytes(&mut rng, bf, cout, 0.0, 0.1))
                .unwrap();
            let y = dev.alloc(h * w * cout * 2).unwrap();
            let l = conv::conv2d(
                &Conv2dArgs {
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
                },
                ConvKernel::Auto,
            )
            .unwrap();
            // SAFETY: the buffers hold the shapes launched.
            let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe { l.enqueue(&dev) }).unwrap();
            let flops = 2.0 * (h * w * cin * cout * 9) as f64;
            let tflops = flops / (ms * 1e-3) / 1e12;
            let frac = tflops / ceiling;
            let bytes = 2 * (h * w * (cin + cout) + cout * cin * 9 + cout); // the weight's useful bytes
            r.add(
                &l.kernel,
                &format!(
                    "{label}: {tflops:.2} TFLOP/s = {:.1}% of the GEMM ceiling",
                    100.0 * frac
                ),
                &[h, w, cin, cout],
                bytes,
                ms,
            );

            // The up blocks' conv as the fused op: upsample + 3x3 conv + pixel-shuffle shortcut,
            // computed as four 2x2 phase convolutions on the low-resolution input. TFLOP/s count
            // the 3x3 conv's FLOPs at the output resolution (the work it replaces; the kernel does
            // 4/9 of them), so the lines compare directly with the one above.
            if label.starts_with("up_blocks.") && label.contains(".0.conv") {
                let (lh, lw) = ((h / 2).max(1), (w / 2).max(1));
                let l = conv::upsample_conv2d(
                    &UpsampleConv2dArgs {
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
                    },
                    ConvKernel::Auto,
                )
                .unwrap();
                // SAFETY: x holds [lh·lw, cin] (a quarter of what it holds), y [4·lh·lw, cout].
                let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe { l.enqueue(&dev) }).unwrap();
                let flops = 2.0 * (4 * lh * lw * cin * cout * 9) as f64;
                let tflops = flops / (ms * 1e-3) / 1e12;
                let frac = tflops / ceiling;
                let bytes = 2 * (lh * lw * cin + 4 * lh * lw * cout + cout * cin * 9 + cout);
                r.add(
                    &l.kernel,
                    &format!("{label} (fused: upsample + conv + shortcut): {tflops:.2} effective TFLOP/s = {:.1}% of the GEMM ceiling", 100.0 * frac),
                    &[lh, lw, cin, cout],
                    bytes,
                    ms,
                );
            }
        }
    }

    // Memory-bound ops of the EfficientViT stages (1024² output).
    let sms = dev.sm_count();
    let cases: Vec<(&str, &str, usize, usize, usize, usize)> = vec![
        // (kernel, where, h, w, channels, kernel size or groups or cout)
        (
            "depthwise_conv2d",
            "up_blocks.5 multiscale dw5x5 (3·1024) @1024²",
            32,
            32,
            3072,
            5,
        ),
        (
            "depthwise_conv2d",
            "up_blocks.3 multiscale dw5x5 (3·512) @1024²",
            128,
            128,
            1536,
            5,
        ),
        (
            "depthwise_conv2d",
            "up_blocks.5 GLUMBConv dw3x3 (8·1024) @1024²",
            32,
            32,
            8192,
            3,
        ),
        (
            "depthwise_conv2d",
            "up_blocks.3 GLUMBConv dw3x3 (8·512) @1024²",
            128,
            128,
            4096,
            3,
        ),
        (
            "grouped_linear",
            "up_blocks.3 multiscale proj_out (3·512, 48 groups) @1024²",
            128,
            128,
            1536,
            48,
        ),
    ];
    for (kernel, label, h, w, c, p) in cases {
        let (h, w, c) = (cut(h, 8), cut(w, 8), cut(c, 96));
        let p = if kernel == "grouped_linear" {
            cut(p, 3)
        } else {
            p
        };
        let n = h * w * c;
        let x = dev
            .upload(&random_bytes(&mut rng, bf, n, 0.0, 1.0))
            .unwrap();
        let y = dev.alloc(4 * n * 2).unwrap();
        let (l, bytes) = match kernel {
            "depthwise_conv2d" => {
                let wt = dev
                    .upload(&random_bytes(&mut rng, bf, c * p * p, 0.0, 0.1))
                    .unwrap();
                let l =
                    conv::depthwise_conv2d(bf, sms, x.ptr(), wt.ptr(), 0, y.ptr(), 1, h, w, c, p)
                        .unwrap();
                std::mem::forget(wt); // lives to the end of the process
                (l, 2 * (2 * n + c * p * p))
            }
            _ => {
                let ci = c / p;
                let wt = dev
                    .upload(&random_bytes(&mut rng, bf, c * ci, 0.0, 0.1))
                    .unwrap();
                let l =
                    conv::grouped_linear(bf, x.ptr(), wt.ptr(), y.ptr(), h * w, c, c, p).unwrap();
                std::mem::forget(wt);
                (l, 2 * (2 * n + c * ci))
            }
        };
        // SAFETY: the buffers hold the shapes launched.
        let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe { l.enqueue(&dev) }).unwrap();
        r.add(&l.kernel, label, &[h, w, c, p], bytes, ms);
    }

    // The depthwise 3x3 + SiLU gate with the SiLU of its input folded in (GLUMBConv after
    // conv_inverted): reads [.., 2c], writes [.., c].
    let glu_cases: Vec<(&str, usize, usize, usize, usize)> = vec![
        // (where, images, h, w, output channels)
        (
            "Sana-600M MixFFN, b-512 batch 32 (64 CFG rows of 16²)",
            64,
            16,
            16,
            2880,
        ),
        (
            "SANA1.5-1.6B MixFFN, l-1024 batch 1 (2 CFG rows of 32²)",
            2,
            32,
            32,
            5600,
        ),
        (
            "DC-AE up_blocks.3 GLUMBConv (4·512) @1024²",
            1,
            128,
            128,
            2048,
        ),
    ];
    for (label, b, h, w, c) in glu_cases {
        let (b, h, w, c) = (cut(b, 1), cut(h, 8), cut(w, 8), cut(c, 96));
        let n = b * h * w * c;
        let x = dev
            .upload(&random_bytes(&mut rng, bf, 2 * n, 0.0, 1.0))
            .unwrap();
        let y = dev.alloc(n * 2).unwrap();
        let wt = dev
            .upload(&random_bytes(&mut rng, bf, 2 * c * 9, 0.0, 0.3))
            .unwrap();
        let l = conv::depthwise_conv3_glu(bf, x.ptr(), wt.ptr(), 0, y.ptr(), b, h, w, c, 3, true)
            .unwrap();
        // SAFETY: the buffers hold the shapes launched.
        let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe { l.enqueue(&dev) }).unwrap();
        r.add(
            &l.kernel,
            label,
            &[b, h, w, 2 * c],
            2 * (3 * n + 2 * c * 9),
            ms,
        );
        std::mem::forget((x, y, wt)); // live to the end of the process
    }
    r.finish();
}
