//! kernels/norm.cu against its CPU twins (openuni_cpu::ops::{rmsnorm, rmsnorm_residual, layernorm}) on random
//! inputs: through the CUDA executor on one-node graphs (f32 and bf16 storage), and launched
//! directly on misaligned and in-place pointers (the kernels' scalar paths).
//!
//! Tolerances (openuni_cuda::testing::check), both against the CPU twin on the f32 inputs:
//! f32 storage, relative L2 <= 1e-5; bf16 storage, <= 2x the relative L2 error of a plain bf16
//! run (the CPU twin on the inputs rounded to bf16, its output rounded to bf16).
//! Without a CUDA device (real or emulated) every test prints `skipped: no CUDA device`.

use std::collections::HashMap;
use std::sync::Arc;

use openuni_cpu::ops::{self as cpu, ModulationRef};
use openuni_cuda::families::{enqueue, norm};
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor};
use openuni_graph::{GraphBuilder, Modulation};
use openuni_tensor::{DType, HostTensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// Odd column counts (48, 96, 100: not a multiple of the bf16 vector width, 5003: past the
/// register cache of the scalar path), the model widths (1152, 1536, 2240), rows that are
/// multiples of nothing.
const SHAPES: &[(usize, usize)] = &[
    (1, 32),
    (7, 48),
    (37, 96),
    (5, 100),
    (13, 1152),
    (65, 1536),
    (3, 2240),
    (2, 5003),
];

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), v).unwrap()
}

fn run(
    dev: &Arc<CudaDevice>,
    g: &openuni_graph::Graph,
    w: &HashMap<String, HostTensor>,
    inputs: &HashMap<String, HostTensor>,
    dtype: DType,
) -> Vec<f32> {
    let mut ex = CudaExecutor::new(dev, g, w, dtype, false).unwrap();
    let out = ex.run(inputs).unwrap();
    out["y"].to_f32_vec()
}

#[test]
fn rmsnorm_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(1);
    for &(rows, cols) in SHAPES {
        for with_bias in [false, true] {
            let x = rng.normals(rows * cols, 0.5, 2.0);
            let w = rng.normals(cols, 1.0, 0.3);
            let b = rng.normals(cols, 0.0, 0.5);
            let eps = 1e-6;
            let mut want = vec![0.0; rows * cols];
            cpu::rmsnorm(&x, &w, with_bias.then_some(&b[..]), eps, cols, &mut want);

            let mut gb = GraphBuilder::new();
            let xi = gb.input("x", [rows, cols]).unwrap();
            let wi = gb.weight("w", [cols]).unwrap();
            let bi = if with_bias {
                Some(gb.weight("b", [cols]).unwrap())
            } else {
                None
            };
            let y = gb.rmsnorm("norm", xi, wi, bi, eps).unwrap();
            gb.output("y", y).unwrap();
            let g = gb.finish();
            let weights = HashMap::from([
                ("w".to_string(), tensor(&[cols], w.clone())),
                ("b".to_string(), tensor(&[cols], b.clone())),
            ]);
            let inputs = HashMap::from([("x".to_string(), tensor(&[rows, cols], x.clone()))]);
            for dtype in DTYPES {
                let got = run(&dev, &g, &weights, &inputs, dtype);
                let mut base = vec![0.0; rows * cols];
                let rb = round_to(dtype, &b);
                cpu::rmsnorm(
                    &round_to(dtype, &x),
                    &round_to(dtype, &w),
                    with_bias.then_some(&rb[..]),
                    eps,
                    cols,
                    &mut base,
                );
                check(
                    &format!("rmsnorm {dtype} [{rows}, {cols}] bias={with_bias}"),
                    dtype,
                    &got,
                    &want,
                    &base,
                );
            }
        }
    }
}

/// `rmsnorm_residual_*` (DC-AE's `x + norm(y)`) against `cpu::rmsnorm_residual` on the same
/// shapes: the vector path (columns a multiple of 8) and the scalar path (48 in f32 aside, 100,
/// 5003), with and without the norm's bias.
#[test]
fn rmsnorm_residual_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(7);
    for &(rows, cols) in SHAPES {
        for with_bias in [false, true] {
            let x = rng.normals(rows * cols, 0.5, 2.0);
            let r = rng.normals(rows * cols, 0.0, 1.5);
            let w = rng.normals(cols, 1.0, 0.3);
            let b = rng.normals(cols, 0.0, 0.5);
            let eps = 1e-5;
            let mut want = vec![0.0; rows * cols];
            cpu::rmsnorm_residual(
                &x,
                &w,
                with_bias.then_some(&b[..]),
                &r,
                eps,
                cols,
                &mut want,
            );

            let mut gb = GraphBuilder::new();
            let xi = gb.input("x", [rows, cols]).unwrap();
            let ri = gb.input("r", [rows, cols]).unwrap();
            let wi = gb.weight("w", [cols]).unwrap();
            let bi = if with_bias {
                Some(gb.weight("b", [cols]).unwrap())
            } else {
                None
            };
            let y = gb.rmsnorm_residual("norm", xi, wi, bi, eps, ri).unwrap();
            gb.output("y", y).unwrap();
            let g = gb.finish();
            let weights = HashMap::from([
                ("w".to_string(), tensor(&[cols], w.clone())),
                ("b".to_string(), tensor(&[cols], b.clone())),
            ]);
            let inputs = HashMap::from([
                ("x".to_string(), tensor(&[rows, cols], x.clone())),
                ("r".to_string(), tensor(&[rows, cols], r.clone())),
            ]);
            for dtype in DTYPES {
                let got = run(&dev, &g, &weights, &inputs, dtype);
                let mut base = vec![0.0; rows * cols];
                let rb = round_to(dtype, &b);
                cpu::rmsnorm_residual(
                    &round_to(dtype, &x),
                    &round_to(dtype, &w),
                    with_bias.then_some(&rb[..]),
                    &round_to(dtype, &r),
                    eps,
                    cols,
                    &mut base,
                );
                check(
                    &format!("rmsnorm_residual {dtype} [{rows}, {cols}] bias={with_bias}"),
                    dtype,
                    &got,
                    &want,
                    &base,
                );
            }
        }
    }
}

#[test]
fn layernorm_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(2);
    for &(rows, cols) in SHAPES {
        // (weight, bias): SANA's norms have neither, the connector's both.
        for (with_w, with_b) in [(false, false), (true, true), (true, false)] {
            let x = rng.normals(rows * cols, 3.0, 1.5);
            let w = rng.normals(cols, 1.0, 0.3);
            let b = rng.normals(cols, 0.0, 0.5);
            let eps = 1e-5;
            let mut want = vec![0.0; rows * cols];
            cpu::layernorm(
                &x,
                with_w.then_some(&w[..]),
                with_b.then_some(&b[..]),
                eps,
                cols,
                None,
                &mut want,
            );

            let mut gb = GraphBuilder::new();
            let xi = gb.input("x", [rows, cols]).unwrap();
            let wi = if with_w {
                Some(gb.weight("w", [cols]).unwrap())
            } else {
                None
            };
            let bi = if with_b {
                Some(gb.weight("b", [cols]).unwrap())
            } else {
                None
            };
            let y = gb.layernorm("norm", xi, wi, bi, eps, None).unwrap();
            gb.output("y", y).unwrap();
            let g = gb.finish();
            let weights = HashMap::from([
                ("w".to_string(), tensor(&[cols], w.clone())),
                ("b".to_string(), tensor(&[cols], b.clone())),
            ]);
            let inputs = HashMap::from([("x".to_string(), tensor(&[rows, cols], x.clone()))]);
            for dtype in DTYPES {
                let got = run(&dev, &g, &weights, &inputs, dtype);
                let (rw, rb) = (round_to(dtype, &w), round_to(dtype, &b));
                let mut base = vec![0.0; rows * cols];
                cpu::layernorm(
                    &round_to(dtype, &x),
                    with_w.then_some(&rw[..]),
                    with_b.then_some(&rb[..]),
                    eps,
                    cols,
                    None,
                    &mut base,
                );
                check(
                    &format!("layernorm {dtype} [{rows}, {cols}] weight={with_w} bias={with_b}"),
                    dtype,
                    &got,
                    &want,
                    &base,
                );
            }
        }
    }
}

#[test]
fn layernorm_with_adaln_modulation_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(3);
    // [B, N, C]: the modulation rows change every N rows.
    for &(b, n, c) in &[
        (1, 1, 48),
        (2, 37, 96),
        (3, 5, 1152),
        (2, 3, 2240),
        (2, 7, 100),
    ] {
        let x = rng.normals(b * n * c, -1.0, 2.0);
        let scale = rng.normals(b * c, 0.0, 0.5);
        let shift = rng.normals(b * c, 0.0, 0.5);
        let eps = 1e-6;
        let mut want = vec![0.0; b * n * c];
        let m = ModulationRef {
            scale: &scale,
            shift: &shift,
            tokens: n,
        };
        cpu::layernorm(&x, None, None, eps, c, Some(m), &mut want);

        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, c]).unwrap();
        let si = gb.input("scale", [b, c]).unwrap();
        let hi = gb.input("shift", [b, c]).unwrap();
        let y = gb
            .layernorm(
                "norm1",
                xi,
                None,
                None,
                eps,
                Some(Modulation {
                    scale: si,
                    shift: hi,
                }),
            )
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let inputs = HashMap::from([
            ("x".to_string(), tensor(&[b, n, c], x.clone())),
            ("scale".to_string(), tensor(&[b, c], scale.clone())),
            ("shift".to_string(), tensor(&[b, c], shift.clone())),
        ]);
        for dtype in DTYPES {
            let got = run(&dev, &g, &HashMap::new(), &inputs, dtype);
            let (rs, rh) = (round_to(dtype, &scale), round_to(dtype, &shift));
            let mut base = vec![0.0; b * n * c];
            let m = ModulationRef {
                scale: &rs,
                shift: &rh,
                tokens: n,
            };
            cpu::layernorm(&round_to(dtype, &x), None, None, eps, c, Some(m), &mut base);
            check(
                &format!("layernorm+adaLN {dtype} [{b}, {n}, {c}]"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}

/// Launches the kernels directly: x one element past a 16-byte boundary (scalar path), and the
/// output written in place over x. Output memory is poisoned (NaN) first.
#[test]
fn norms_on_misaligned_and_in_place_pointers() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(4);
    for &(rows, cols) in &[(5usize, 96usize), (3, 1152), (9, 48)] {
        for dtype in DTYPES {
            let es = dtype.size_in_bytes();
            let x = rng.normals(rows * cols, 0.2, 1.0);
            let w = rng.normals(cols, 1.0, 0.2);
            let host = |v: &[f32]| -> Vec<u8> {
                match dtype {
                    DType::F32 => bytemuck_f32(v),
                    _ => v
                        .iter()
                        .flat_map(|&f| half::bf16::from_f32(f).to_bits().to_le_bytes())
                        .collect(),
                }
            };
            let read = |buf: u64, n: usize| -> Vec<f32> {
                match dtype {
                    DType::F32 => {
                        let mut o = vec![0f32; n];
                        dev.copy_to_host(buf, &mut o).unwrap();
                        o
                    }
                    _ => {
                        let mut o = vec![0u16; n];
                        dev.copy_to_host(buf, &mut o).unwrap();
                        o.into_iter()
                            .map(|b| half::bf16::from_bits(b).to_f32())
                            .collect()
                    }
                }
            };
            let n = rows * cols;
            let xbuf = dev.alloc((n + 1) * es).unwrap();
            let wbuf = dev.upload(&host(&w)).unwrap();
            let ybuf = dev.alloc((n + 1) * es).unwrap();
            let xp = xbuf.ptr() + es as u64; // misaligned by one element
            let yp = ybuf.ptr() + es as u64;
            let (xr, wr) = (round_to(dtype, &x), round_to(dtype, &w));

            // RMSNorm, misaligned x and y.
            dev.copy_to_device(&host(&x), xp).unwrap();
            dev.fill_bytes(ybuf.ptr(), 0xFF, ybuf.bytes()).unwrap();
            unsafe {
                enqueue(
                    &dev,
                    &norm::rmsnorm(dtype, xp, wbuf.ptr(), 0, yp, rows, cols, 1e-6).unwrap(),
                )
                .unwrap()
            };
            let got = read(yp, n);
            let (mut want, mut base) = (vec![0.0; n], vec![0.0; n]);
            cpu::rmsnorm(&x, &w, None, 1e-6, cols, &mut want);
            cpu::rmsnorm(&xr, &wr, None, 1e-6, cols, &mut base);
            check(
                &format!("rmsnorm {dtype} [{rows}, {cols}] misaligned"),
                dtype,
                &got,
                &want,
                &base,
            );

            // LayerNorm in place over misaligned x.
            unsafe {
                enqueue(
                    &dev,
                    &norm::layernorm(dtype, xp, wbuf.ptr(), 0, None, xp, rows, cols, 1e-5).unwrap(),
                )
                .unwrap()
            };
            let got = read(xp, n);
            cpu::layernorm(&x, Some(&w), None, 1e-5, cols, None, &mut want);
            cpu::layernorm(&xr, Some(&wr), None, 1e-5, cols, None, &mut base);
            check(
                &format!("layernorm {dtype} [{rows}, {cols}] in place, misaligned"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}

fn bytemuck_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// `ada_layernorm`: the modulation rows read from adaLN-single's table (`t` [B, k·C] per row, or
/// [B, C] broadcast, as SANA's head) against the twin composed of modulation_table, chunk and
/// layernorm; C a multiple of the vector width and not (100: scalar path), rows out of order.
#[test]
fn ada_layernorm_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(5);
    // (B, N, C, k rows, per-row t, scale row, shift row)
    for &(b, n, c, k, per_row, scale, shift) in &[
        (2usize, 37usize, 96usize, 6usize, true, 1usize, 0usize),
        (3, 5, 1152, 6, true, 4, 3),
        (2, 7, 100, 6, true, 1, 5),
        (2, 3, 1152, 2, false, 1, 0),
        (1, 4, 100, 2, false, 0, 1),
    ] {
        let tc = if per_row { k * c } else { c };
        let x = rng.normals(b * n * c, -1.0, 2.0);
        let t = rng.normals(b * tc, 0.0, 0.5);
        let table = rng.normals(k * c, 0.0, 0.3);
        let eps = 1e-6;
        let d = cpu::AdaDims {
            batch: b,
            tokens: n,
            cols: c,
            k,
        };
        let mut want = vec![0.0; b * n * c];
        cpu::ada_layernorm(&x, &t, &table, d, scale, shift, eps, &mut want);

        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, c]).unwrap();
        let ti = gb.input("t", [b, tc]).unwrap();
        let tab = gb.weight("table", [k, c]).unwrap();
        let y = gb
            .ada_layernorm("norm1", xi, ti, tab, scale, shift, eps)
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let weights = HashMap::from([("table".to_string(), tensor(&[k, c], table.clone()))]);
        let inputs = HashMap::from([
            ("x".to_string(), tensor(&[b, n, c], x.clone())),
            ("t".to_string(), tensor(&[b, tc], t.clone())),
        ]);
        for dtype in DTYPES {
            let got = run(&dev, &g, &weights, &inputs, dtype);
            let mut base = vec![0.0; b * n * c];
            cpu::ada_layernorm(
                &round_to(dtype, &x),
                &round_to(dtype, &t),
                &round_to(dtype, &table),
                d,
                scale,
                shift,
                eps,
                &mut base,
            );
            check(
                &format!("ada_layernorm {dtype} [{b}, {n}, {c}] table [{k}, {c}] t [{b}, {tc}]"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}
