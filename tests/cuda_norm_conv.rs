//! kernels/norm_conv.cu (`rmsnorm_relu_conv2d_*`, DC-AE's norm_out + ReLU + conv_out) against its
//! CPU twin `openuni_cpu::ops::rmsnorm_relu_conv2d` on random inputs, through the CUDA executor on
//! one-node graphs in f32 and bf16 storage; and the launcher's refusals.
//!
//! Shapes cross the kernel's 32-wide, 16-high output tile and its 4-row thread strips (w 33, 37
//! and 40; h 5, 9, 17, 19 and 35), take channel counts that are not a multiple of the 8-channel
//! chunk (5, 9, 12, 17) and the decoder's 128, k = 1 and 3, 1 to 4 output channels, B = 2. Channel
//! counts that are multiples of the 16-byte vector (24, 128; f32 also 12, whose last chunk is half
//! a chunk) take the vector loads, the others the element loads. Tolerances (openuni_cuda::testing::check): f32 relative L2 <= 1e-5;
//! bf16 <= 2x the error of a plain bf16 run (the twin on inputs rounded to bf16, output rounded).
//! Without a CUDA device (real or emulated) every test prints `skipped: no CUDA device`.

use std::collections::HashMap;

use openuni_cpu::ops as cpu;
use openuni_cuda::families::norm_conv::{self, NormConvArgs};
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::CudaExecutor;
use openuni_graph::GraphBuilder;
use openuni_tensor::{DType, HostTensor};

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), v).unwrap()
}

#[test]
fn rmsnorm_relu_conv2d_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(21);
    for &(b, h, w, cin, cout, k, biases) in &[
        (1, 1, 1, 1, 1, 3, true),
        (2, 9, 37, 24, 3, 3, true),
        (1, 5, 33, 128, 3, 3, false),
        (1, 6, 7, 5, 4, 1, true),
        (1, 3, 4, 17, 2, 3, true),
        (1, 35, 40, 24, 3, 3, true),
        (2, 17, 5, 9, 1, 3, false),
        (1, 19, 33, 128, 3, 1, true),
        (1, 18, 34, 12, 2, 3, true),
    ] {
        let x = rng.normals(b * h * w * cin, 0.3, 2.0);
        let (nw, nb) = (rng.normals(cin, 1.0, 0.3), rng.normals(cin, 0.0, 0.5));
        let (wt, bias) = (
            rng.normals(cout * cin * k * k, 0.0, 0.2),
            rng.normals(cout, 0.0, 0.5),
        );
        let twin = |x: &[f32], nw: &[f32], nb: &[f32], wt: &[f32], bias: &[f32]| {
            let mut y = vec![0.0; b * h * w * cout];
            cpu::rmsnorm_relu_conv2d(
                x,
                nw,
                biases.then_some(nb),
                1e-5,
                wt,
                biases.then_some(bias),
                b,
                h,
                w,
                cin,
                cout,
                k,
                &mut y,
            );
            y
        };
        let want = twin(&x, &nw, &nb, &wt, &bias);

        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, h * w, cin]).unwrap();
        let nwi = gb.weight("nw", [cin]).unwrap();
        let nbi = if biases {
            Some(gb.weight("nb", [cin]).unwrap())
        } else {
            None
        };
        let wi = gb.weight("w", [cout, cin, k, k]).unwrap();
        let bi = if biases {
            Some(gb.weight("b", [cout]).unwrap())
        } else {
            None
        };
        let y = gb
            .rmsnorm_relu_conv2d("conv_out", xi, nwi, nbi, 1e-5, wi, bi, h, w, k)
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let mut weights = HashMap::from([
            ("nw".to_string(), tensor(&[cin], nw.clone())),
            ("w".to_string(), tensor(&[cout, cin, k, k], wt.clone())),
        ]);
        if biases {
            weights.insert("nb".into(), tensor(&[cin], nb.clone()));
            weights.insert("b".into(), tensor(&[cout], bias.clone()));
        }
        let inputs = HashMap::from([("x".to_string(), tensor(&[b, h * w, cin], x.clone()))]);
        for dtype in [DType::F32, DType::BF16] {
            let mut ex = CudaExecutor::new(&dev, &g, &weights, dtype, false).unwrap();
            let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
            let r = |v: &[f32]| round_to(dtype, v);
            let base = twin(&r(&x), &r(&nw), &r(&nb), &r(&wt), &r(&bias));
            check(&format!("rmsnorm_relu_conv2d {dtype} [{b}, {h}x{w}, {cin}] -> {cout} k{k} biases={biases}"), dtype, &got, &want, &base);
        }
    }
}

/// More output channels than the kernel accumulates, or an even or too large kernel: a clear
/// error naming the value, never a launch (no device needed).
#[test]
fn rmsnorm_relu_conv2d_refuses_what_it_does_not_compute() {
    let a = NormConvArgs {
        dtype: DType::BF16,
        x: 0,
        nw: 0,
        nb: 0,
        w: 0,
        b: 0,
        y: 0,
        batch: 1,
        h: 4,
        w_px: 4,
        cin: 8,
        cout: 3,
        kernel: 3,
        eps: 1e-5,
    };
    assert_eq!(norm_conv::rmsnorm_relu_conv2d(&a).unwrap().len(), 1);
    let e = norm_conv::rmsnorm_relu_conv2d(&NormConvArgs { cout: 5, ..a })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("5 output channels") && e.contains("at most 4"),
        "{e}"
    );
    for k in [2, 5] {
        let e = norm_conv::rmsnorm_relu_conv2d(&NormConvArgs { kernel: k, ..a })
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("kernel size {k}")), "{e}");
    }
}
