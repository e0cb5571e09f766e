//! kernels/layout.cu's transpose against its CPU twin (openuni_cpu::ops::transpose) on random
//! inputs: one-node graphs through the CUDA executor, f32 and bf16 storage; a copy, so the result
//! must equal the (rounded) input exactly in both. Shapes cross the 32 x 32 tiles in both
//! directions, and one has more than 65535 row tiles (grid.y could not hold them).
//! Without a CUDA device (real or emulated) every test prints `skipped: no CUDA device`.

use std::collections::HashMap;

use openuni_cpu::ops as cpu;
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::CudaExecutor;
use openuni_graph::GraphBuilder;
use openuni_tensor::{DType, HostTensor};

/// [B, rows, cols] -> [B, cols, rows].
#[test]
fn transpose_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(18);
    // 2_097_200 rows: more than 65535 row tiles (a 2048^2 image's H*W is 4M), which grid.y could not hold.
    for &(b, rows, cols) in &[
        (2usize, 3usize, 4usize),
        (1, 1, 1),
        (1, 33, 65),
        (3, 70, 3),
        (2, 32, 96),
        (1, 5, 100),
        (1, 2_097_200, 3),
    ] {
        let x = rng.normals(b * rows * cols, 0.0, 1.0);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, rows, cols]).unwrap();
        let y = gb
            .transpose("t", xi, b, rows, cols, [b, cols, rows])
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let mut want = vec![0.0; b * rows * cols];
        cpu::transpose(&x, b, rows, cols, &mut want);
        let inputs = HashMap::from([(
            "x".to_string(),
            HostTensor::from_f32(vec![b, rows, cols], x.clone()).unwrap(),
        )]);
        for dtype in [DType::F32, DType::BF16] {
            let mut ex = CudaExecutor::new(
                &dev,
                &g,
                &HashMap::<String, HostTensor>::new(),
                dtype,
                false,
            )
            .unwrap();
            let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
            let mut base = vec![0.0; b * rows * cols];
            cpu::transpose(&round_to(dtype, &x), b, rows, cols, &mut base);
            check(
                &format!("transpose [{b}, {rows}, {cols}] {dtype}"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}
