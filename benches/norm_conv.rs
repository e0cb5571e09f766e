//! Bandwidth of kernels/norm_conv.cu (`rmsnorm_relu_conv2d_*`, DC-AE's norm_out + ReLU + conv_out)
//! at the decoder's head shapes, against the device-to-device copy bandwidth measured in the same
//! run: the kernel reads the 128-channel input and writes 3 channels, so it is memory bound and
//! its ceiling is one read of the input. CUDA events, warm-up, median of 50 samples, each sample a
//! batch of calls rotating through input sets 3x the L2 size. Without a CUDA device it prints
//! `skipped: no CUDA device`. Run: `cargo bench --bench norm_conv`.

use openuni_cuda::families::enqueue;
use openuni_cuda::families::norm_conv::{self, NormConvArgs};
use openuni_cuda::testing::{random_bytes, rotation, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

fn main() {
    let Some(mut r) = BenchReport::start("norm_conv", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let (cin, cout, k) = (128, 3, 3);
    let cases = [
        ("DC-AE conv_out, 1024² image", 1024, DType::BF16),
        ("DC-AE conv_out, 512² image", 512, DType::BF16),
        ("DC-AE conv_out, 512² image", 512, DType::F32),
    ];
    let mut rng = Rng::new(1);
    let (warmup, runs) = r.runs();
    for (label, side, dtype) in cases {
        let (h, w) = (r.rows(side), side);
        let dev = r.dev.clone();
        let es = dtype.size_in_bytes();
        let set = (h * w * cin * es).div_ceil(256) * 256;
        let sets = if dev.is_emulated() {
            1
        } else {
            rotation(&dev, set)
        };
        let x = dev.alloc(set * sets).unwrap();
        let y = dev.alloc(h * w * cout * es).unwrap();
        dev.copy_to_device(
            &random_bytes(&mut rng, dtype, h * w * cin, 0.3, 1.5),
            x.ptr(),
        )
        .unwrap();
        for s in 1..sets {
            dev.copy_on_device(x.ptr(), x.ptr() + (s * set) as u64, set)
                .unwrap();
        }
        let nw = dev
            .upload(&random_bytes(&mut rng, dtype, cin, 1.0, 0.2))
            .unwrap();
        let nb = dev
            .upload(&random_bytes(&mut rng, dtype, cin, 0.0, 0.2))
            .unwrap();
        let wt = dev
            .upload(&random_bytes(
                &mut rng,
                dtype,
                cout * cin * k * k,
                0.0,
                0.05,
            ))
            .unwrap();
        let b = dev
            .upload(&random_bytes(&mut rng, dtype, cout, 0.0, 0.2))
            .unwrap();
        let ms = time_ms(&dev, warmup, runs, sets, |i| {
            let a = NormConvArgs {
                dtype,
                x: x.ptr() + ((i % sets) * set) as u64,
                nw: nw.ptr(),
                nb: nb.ptr(),
                w: wt.ptr(),
                b: b.ptr(),
                y: y.ptr(),
                batch: 1,
                h,
                w_px: w,
                cin,
                cout,
                kernel: k,
                eps: 1e-5,
            };
            // SAFETY: every buffer holds the shapes launched.
            unsafe { norm_conv::rmsnorm_relu_conv2d(&a).and_then(|l| enqueue(&dev, &l)) }
        })
        .unwrap();
        let bytes = (h * w * (cin + cout) + 2 * cin + cout * (cin * k * k + 1)) * es;
        r.add(
            &format!("rmsnorm_relu_conv2d_{dtype}"),
            label,
            &[h, w, cin, cout],
            bytes,
            ms,
        );
    }
    r.finish();
}
