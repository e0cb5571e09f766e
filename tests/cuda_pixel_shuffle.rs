//! kernels/pixel_shuffle.cu (mlp1's LayerNorm reading InternVL's pixel shuffle through its index
//! map) against its CPU twin `openuni_cpu::ops::pixel_shuffle_layernorm`, through the CUDA
//! executor on one-node graphs, f32 and bf16 storage: InternViT's grid of 32 with the class token
//! skipped, small grids with and without a skipped token, channel counts on the vector path (64),
//! off it (6) and past the kernel's register cache (8201, the re-reading path).
//!
//! The twin's gather (`ops::pixel_shuffle`) is itself checked against InternVL's
//! `pixel_shuffle(x, 0.5)` + `ps_version == 'v2'` written as its view/permute steps on indices.
//!
//! Tolerances (openuni_cuda::testing::check): f32 storage, relative L2 <= 1e-5 against the twin;
//! bf16 storage, <= 2x the error of the twin on bf16-rounded inputs. Without a CUDA device (real
//! or emulated) the device test prints `skipped: no CUDA device`.

use std::collections::HashMap;

use openuni_cpu::ops as cpu;
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::CudaExecutor;
use openuni_graph::GraphBuilder;
use openuni_tensor::{DType, HostTensor};

/// InternVL's `pixel_shuffle` (v2, scale 0.5) on a [n, g, g, c] grid, step by step as the model
/// code does it with views and permutes, returning [n, (g/2)², 4c].
fn internvl_pixel_shuffle(x: &[f32], n: usize, g: usize, c: usize) -> Vec<f32> {
    // x.view(n, w, h/2, 2c): element (i, a, j, k) = x[i, a, 2j + k / c, k % c].
    let at = |i: usize, a: usize, col: usize, ch: usize| x[((i * g + a) * g + col) * c + ch];
    let h = g / 2;
    // permute(0, 2, 1, 3) -> [n, h/2, w, 2c]; view(n, h/2, w/2, 4c): element (i, j, b, k) =
    // previous (i, j, 2b + k / 2c, k % 2c); permute(0, 2, 1, 3) (v2) -> [n, w/2, h/2, 4c].
    let mut out = vec![0f32; n * h * h * 4 * c];
    for i in 0..n {
        for b in 0..h {
            for j in 0..h {
                for k in 0..4 * c {
                    let (a, k2) = (2 * b + k / (2 * c), k % (2 * c));
                    out[((i * h + b) * h + j) * 4 * c + k] = at(i, a, 2 * j + k2 / c, k2 % c);
                }
            }
        }
    }
    out
}

#[test]
fn pixel_shuffle_twin_is_internvls() {
    let mut rng = Rng::new(11);
    for (n, g, c, skip) in [(2, 4, 3, 1), (1, 6, 5, 0), (1, 32, 2, 1)] {
        let x = rng.normals(n * (skip + g * g) * c, 0.0, 1.0);
        let grid: Vec<f32> = (0..n)
            .flat_map(|i| x[(i * (skip + g * g) + skip) * c..(i + 1) * (skip + g * g) * c].to_vec())
            .collect();
        let mut got = vec![0f32; n * g * g * c];
        cpu::pixel_shuffle(&x, n, g, skip, c, &mut got);
        assert_eq!(
            got,
            internvl_pixel_shuffle(&grid, n, g, c),
            "n {n} grid {g} c {c} skip {skip}"
        );
    }
}

#[test]
fn pixel_shuffle_layernorm_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(12);
    for (n, g, c, skip) in [(2, 32, 64, 1), (3, 4, 6, 1), (1, 6, 64, 0), (1, 2, 8201, 1)] {
        let x = rng.normals(n * (skip + g * g) * c, 0.5, 2.0);
        let w = rng.normals(4 * c, 1.0, 0.3);
        let bias = rng.normals(4 * c, 0.0, 0.5);
        let rows = n * (g / 2) * (g / 2);
        let mut want = vec![0f32; rows * 4 * c];
        cpu::pixel_shuffle_layernorm(&x, &w, &bias, 1e-5, n, g, skip, c, &mut want);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [n, skip + g * g, c]).unwrap();
        let wi = gb.weight("w", [4 * c]).unwrap();
        let bi = gb.weight("b", [4 * c]).unwrap();
        let y = gb
            .pixel_shuffle_layernorm("mlp1.0", xi, wi, bi, 1e-5, g, skip)
            .unwrap();
        gb.output("y", y).unwrap();
        let graph = gb.finish();
        let weights: HashMap<String, HostTensor> = HashMap::from([
            (
                "w".to_string(),
                HostTensor::from_f32([4 * c], w.clone()).unwrap(),
            ),
            (
                "b".to_string(),
                HostTensor::from_f32([4 * c], bias.clone()).unwrap(),
            ),
        ]);
        for dtype in [DType::F32, DType::BF16] {
            let mut ex = CudaExecutor::new(&dev, &graph, &weights, dtype, false).unwrap();
            let inputs = HashMap::from([(
                "x".to_string(),
                HostTensor::from_f32([n, skip + g * g, c], x.clone()).unwrap(),
            )]);
            let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
            let mut base = vec![0f32; want.len()];
            cpu::pixel_shuffle_layernorm(
                &round_to(dtype, &x),
                &round_to(dtype, &w),
                &round_to(dtype, &bias),
                1e-5,
                n,
                g,
                skip,
                c,
                &mut base,
            );
            check(
                &format!("pixel_shuffle_layernorm {dtype} n {n} grid {g} c {c} skip {skip}"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}
