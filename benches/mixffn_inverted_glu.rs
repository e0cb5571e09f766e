//! kernels/mixffn_inverted_glu.cu (`mixffn_inverted_glu_bf16` on mma.sync and, on sm_90a,
//! `mixffn_inverted_glu_bf16_wgmma`: GLUMBConv's conv_inverted + SiLU + depthwise 3×3 + GLU in one
//! kernel) against the two-op path they replace, in the same run: the
//! cuBLASLt GEMM (bias epilogue) writing the 2H-wide output, then `silu_depthwise_conv3_glu_bf16`
//! reading it back; then each of those two ops alone. Shape: Sana-600M (b-512) at batch 32, i.e.
//! 64 CFG rows of a 16×16 latent, C 1152 -> 2 × 2880 (on the emulated GPU a reduced shape, only to exercise the code). CUDA events,
//! warm-up, median of the samples, inputs rotated through sets 3x the L2 size. Without a CUDA
//! device it prints `skipped: no CUDA device`. Run: `cargo bench --bench mixffn_inverted_glu`.

use openuni_cuda::families::conv::depthwise_conv3_glu;
use openuni_cuda::families::enqueue;
use openuni_cuda::families::mixffn_inverted_glu::{self, MixFfnArgs};
use openuni_cuda::gemm::{Epilogue, LinearArgs, LinearGemm};
use openuni_cuda::testing::{random_bytes, rotation, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

fn main() {
    let Some(mut r) = BenchReport::start("mixffn_inverted_glu", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let dev = r.dev.clone();
    let (batch, h, w, c, hidden, label) = if dev.is_emulated() {
        (1, 16, 16, 64, 32, "emulated: reduced shape")
    } else {
        (
            64,
            16,
            16,
            1152,
            2880,
            "Sana-600M b-512 batch 32 (64 CFG rows)",
        )
    };
    let dtype = DType::BF16;
    let es = dtype.size_in_bytes();
    let rows = batch * h * w;
    let mut rng = Rng::new(13);
    let set = (rows * c * es).div_ceil(256) * 256;
    let sets = if dev.is_emulated() {
        1
    } else {
        rotation(&dev, set)
    };
    let x = dev.alloc(set * sets).unwrap();
    dev.copy_to_device(&random_bytes(&mut rng, dtype, rows * c, 0.0, 1.0), x.ptr())
        .unwrap();
    for s in 1..sets {
        dev.copy_on_device(x.ptr(), x.ptr() + (s * set) as u64, set)
            .unwrap();
    }
    let wi = dev
        .upload(&random_bytes(&mut rng, dtype, 2 * hidden * c, 0.0, 0.03))
        .unwrap();
    let bi = dev
        .upload(&random_bytes(&mut rng, dtype, 2 * hidden, 0.0, 0.1))
        .unwrap();
    let wd = dev
        .upload(&random_bytes(&mut rng, dtype, 2 * hidden * 9, 0.0, 0.3))
        .unwrap();
    let bd = dev
        .upload(&random_bytes(&mut rng, dtype, 2 * hidden, 0.0, 0.1))
        .unwrap();
    let y = dev.alloc(rows * hidden * es).unwrap();
    let inverted = dev.alloc(rows * 2 * hidden * es).unwrap();
    let (warmup, runs) = r.runs();
    let xp = |i: usize| x.ptr() + ((i % sets) * set) as u64;
    let flops = 2.0 * (rows * c * 2 * hidden) as f64 + 4.0 * (rows * hidden * 9) as f64;
    let io = (rows * (c + hidden) + 2 * hidden * (c + 11)) * es;

    // Arguments for input set `i` (x rotates through sets 3x the L2 size).
    let args = |i: usize| MixFfnArgs {
        x: xp(i),
        wi: wi.ptr(),
        bi: bi.ptr(),
        wd: wd.ptr(),
        bd: bd.ptr(),
        y: y.ptr(),
        batch,
        h,
        w,
        c,
        hidden,
    };
    let ms = time_ms(&dev, warmup, runs, sets, |i| {
        // SAFETY: every buffer holds the shapes launched.
        unsafe {
            mixffn_inverted_glu::mixffn_inverted_glu(&args(i)).and_then(|l| enqueue(&dev, &[l]))
        }
    })
    .unwrap();
    r.add_flops(
        "mixffn_inverted_glu",
        label,
        &[batch, h, w, c, hidden],
        flops,
        io,
        ms,
    );

    // The sm_90a kernel (wgmma + TMA), where the device runs it: the executor's default there.
    let ms_wgmma = if mixffn_inverted_glu::sm90(&dev) {
        let launches: Vec<_> = (0..sets)
            .map(|s| mixffn_inverted_glu::mixffn_inverted_glu_wgmma(&args(s)).unwrap())
            .collect();
        let ms = time_ms(&dev, warmup, runs, sets, |i| {
            // SAFETY: every buffer holds the shapes launched.
            unsafe { enqueue(&dev, std::slice::from_ref(&launches[i % sets])) }
        })
        .unwrap();
        r.add_flops(
            "mixffn_inverted_glu_wgmma",
            label,
            &[batch, h, w, c, hidden],
            flops,
            io,
            ms,
        );
        Some(ms)
    } else {
        println!("mixffn_inverted_glu_wgmma: skipped: not an sm_90a device");
        None
    };

    // The two-op path: the GEMM's 2H-wide output is written and read back.
    let blas = dev.blas().expect("cuBLASLt");
    let gemms: Vec<LinearGemm> = (0..sets)
        .map(|s| {
            let args = LinearArgs {
                dtype,
                rows,
                in_features: c,
                out_features: 2 * hidden,
                epilogue: Epilogue::Bias,
                x: xp(s),
                w: wi.ptr(),
                bias: Some(bi.ptr()),
                y: inverted.ptr(),
            };
            LinearGemm::new(&dev, &blas, &args).unwrap()
        })
        .collect();
    let dw = depthwise_conv3_glu(
        dtype,
        inverted.ptr(),
        wd.ptr(),
        bd.ptr(),
        y.ptr(),
        batch,
        h,
        w,
        hidden,
        3,
        true,
    )
    .unwrap();
    let ms2 = time_ms(&dev, warmup, runs, sets, |i| {
        // SAFETY: as above; the GEMM writes `inverted`, which the depthwise GLU reads.
        unsafe {
            gemms[i % sets].run(&dev, &blas)?;
            enqueue(&dev, std::slice::from_ref(&dw))
        }
    })
    .unwrap();
    r.add_flops(
        "gemm+silu_dwconv3_glu",
        label,
        &[batch, h, w, c, hidden],
        flops,
        io + 2 * rows * 2 * hidden * es,
        ms2,
    );
    println!("fused (mma.sync) / two-op time: {:.3}", ms / ms2);
    if let Some(t) = ms_wgmma {
        println!(
            "fused (wgmma) / two-op time: {:.3} (the executor keeps the faster per shape)",
            t / ms2
        );
    }

    // The two ops of that path alone, to tell which one holds the time: the GEMM (rotating its
    // input), then the depthwise GLU on the GEMM's output (2H-wide, larger than L2 at the real shape).
    let ms_gemm = time_ms(&dev, warmup, runs, sets, |i| {
        // SAFETY: as above.
        unsafe { gemms[i % sets].run(&dev, &blas) }
    })
    .unwrap();
    r.add_flops(
        "gemm (conv_inverted)",
        label,
        &[rows, c, 2 * hidden],
        2.0 * (rows * c * 2 * hidden) as f64,
        (rows * (c + 2 * hidden) + 2 * hidden * (c + 1)) * es,
        ms_gemm,
    );
    let ms_dw = time_ms(&dev, warmup, runs, 1, |_| {
        // SAFETY: as above.
        unsafe { enqueue(&dev, std::slice::from_ref(&dw)) }
    })
    .unwrap();
    r.add(
        &dw.kernel,
        label,
        &[batch, h, w, 2 * hidden],
        (rows * 3 * hidden + 2 * hidden * 10) * es,
        ms_dw,
    );
    r.finish();
}
