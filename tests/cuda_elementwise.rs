//! kernels/elementwise.cu against its CPU twins (openuni_cpu::ops::{unary, add, gated_add}) on
//! random inputs, through the CUDA executor on one-node graphs (f32 and bf16 storage) and
//! launched directly (misaligned pointers, in place, exact casts).
//!
//! Tolerances (openuni_cuda::testing::check), both against the CPU twin on the f32 inputs:
//! f32 storage, relative L2 <= 1e-5; bf16 storage, <= 2x the relative L2 error of a plain bf16
//! run (the CPU twin on the inputs rounded to bf16, its output rounded to bf16).
//! Without a CUDA device (real or emulated) every test prints `skipped: no CUDA device`.

use std::collections::HashMap;
use std::sync::Arc;

use half::bf16;
use openuni_cpu::ops as cpu;
use openuni_cuda::families::{elementwise, enqueue};
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor};
use openuni_graph::{Graph, GraphBuilder, UnaryFn};
use openuni_tensor::{DType, HostTensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];
const FNS: [UnaryFn; 4] = [
    UnaryFn::Silu,
    UnaryFn::GeluTanh,
    UnaryFn::GeluErf,
    UnaryFn::Relu,
];
/// Shapes whose element counts are and are not multiples of the vector widths.
const SHAPES: &[&[usize]] = &[&[1], &[7], &[37, 96], &[5, 1152], &[3, 2240], &[11, 1001]];

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), v).unwrap()
}

fn run(
    dev: &Arc<CudaDevice>,
    g: &Graph,
    inputs: &HashMap<String, HostTensor>,
    dtype: DType,
) -> Vec<f32> {
    let mut ex =
        CudaExecutor::new(dev, g, &HashMap::<String, HostTensor>::new(), dtype, false).unwrap();
    ex.run(inputs).unwrap()["y"].to_f32_vec()
}

#[test]
fn unary_functions_match_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(10);
    for shape in SHAPES {
        let n: usize = shape.iter().product();
        for f in FNS {
            let x = rng.normals(n, 0.0, 3.0);
            let mut want = vec![0.0; n];
            cpu::unary(f, &x, &mut want);
            let mut gb = GraphBuilder::new();
            let xi = gb.input("x", shape.to_vec()).unwrap();
            let y = gb.unary("act", xi, f).unwrap();
            gb.output("y", y).unwrap();
            let g = gb.finish();
            let inputs = HashMap::from([("x".to_string(), tensor(shape, x.clone()))]);
            for dtype in DTYPES {
                let got = run(&dev, &g, &inputs, dtype);
                let mut base = vec![0.0; n];
                cpu::unary(f, &round_to(dtype, &x), &mut base);
                check(
                    &format!("{} {dtype} {shape:?}", f.name()),
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
fn add_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(11);
    for shape in SHAPES {
        let n: usize = shape.iter().product();
        let a = rng.normals(n, 0.0, 1.0);
        let b = rng.normals(n, 0.5, 2.0);
        let mut want = vec![0.0; n];
        cpu::add(&a, &b, &mut want);
        let mut gb = GraphBuilder::new();
        let ai = gb.input("a", shape.to_vec()).unwrap();
        let bi = gb.input("b", shape.to_vec()).unwrap();
        let y = gb.add("residual", ai, bi).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let inputs = HashMap::from([
            ("a".to_string(), tensor(shape, a.clone())),
            ("b".to_string(), tensor(shape, b.clone())),
        ]);
        for dtype in DTYPES {
            let got = run(&dev, &g, &inputs, dtype);
            let mut base = vec![0.0; n];
            cpu::add(&round_to(dtype, &a), &round_to(dtype, &b), &mut base);
            check(&format!("add {dtype} {shape:?}"), dtype, &got, &want, &base);
        }
    }
}

#[test]
fn gated_add_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(12);
    // [B, N, C], C both a multiple of the vector widths and not (17, 100).
    for &(b, n, c) in &[
        (1, 1, 32),
        (2, 37, 96),
        (3, 5, 1152),
        (2, 3, 2240),
        (2, 9, 17),
        (3, 4, 100),
    ] {
        let total = b * n * c;
        let x = rng.normals(total, 0.0, 1.0);
        let gate = rng.normals(b * c, 0.0, 1.0);
        let v = rng.normals(total, 0.0, 1.0);
        let mut want = vec![0.0; total];
        cpu::gated_add(&x, &gate, &v, n, c, &mut want);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, c]).unwrap();
        let gi = gb.input("gate", [b, c]).unwrap();
        let vi = gb.input("v", [b, n, c]).unwrap();
        let y = gb.gated_add("gated_residual", xi, gi, vi).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let inputs = HashMap::from([
            ("x".to_string(), tensor(&[b, n, c], x.clone())),
            ("gate".to_string(), tensor(&[b, c], gate.clone())),
            ("v".to_string(), tensor(&[b, n, c], v.clone())),
        ]);
        for dtype in DTYPES {
            let got = run(&dev, &g, &inputs, dtype);
            let mut base = vec![0.0; total];
            cpu::gated_add(
                &round_to(dtype, &x),
                &round_to(dtype, &gate),
                &round_to(dtype, &v),
                n,
                c,
                &mut base,
            );
            check(
                &format!("gated_add {dtype} [{b}, {n}, {c}]"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}

/// f32 -> bf16 must round to nearest even exactly as `half` does (NaN stays NaN), bf16 -> f32 is
/// exact; odd lengths and a misaligned start exercise the scalar tail.
#[test]
fn casts_are_exact() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(13);
    let mut x = rng.normals(10_007, 0.0, 100.0);
    // Ties (exactly halfway between two bf16 values), signed zeros, infinities, NaN, subnormals,
    // the largest finite f32 (rounds to infinity).
    x.extend([
        f32::from_bits(0x3F80_8000),
        f32::from_bits(0x3F81_8000),
        -0.0,
        0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-40,
        -3e-39,
        f32::MAX,
        f32::MIN_POSITIVE,
    ]);
    for offset in [0usize, 1] {
        let n = x.len() - offset;
        let src = dev.upload(&x).unwrap();
        let mid = dev.alloc((n + 8) * 2).unwrap();
        let back = dev.alloc((n + 8) * 4).unwrap();
        let (sp, mp, bp) = (
            src.ptr() + 4 * offset as u64,
            mid.ptr() + 2 * offset as u64,
            back.ptr() + 4 * offset as u64,
        );
        dev.fill_bytes(mid.ptr(), 0xFF, mid.bytes()).unwrap();
        dev.fill_bytes(back.ptr(), 0xFF, back.bytes()).unwrap();
        unsafe {
            enqueue(
                &dev,
                &elementwise::cast(DType::BF16, dev.sm_count(), sp, mp, n).unwrap(),
            )
            .unwrap();
            enqueue(
                &dev,
                &elementwise::cast(DType::F32, dev.sm_count(), mp, bp, n).unwrap(),
            )
            .unwrap();
        }
        let mut h = vec![0u16; n];
        dev.copy_to_host(mp, &mut h).unwrap();
        let mut f = vec![0f32; n];
        dev.copy_to_host(bp, &mut f).unwrap();
        let mut bad = 0;
        for i in 0..n {
            let want = bf16::from_f32(x[i + offset]);
            let got = bf16::from_bits(h[i]);
            let same = if want.is_nan() {
                got.is_nan()
            } else {
                want.to_bits() == got.to_bits()
            };
            let exact_back = if got.is_nan() {
                f[i].is_nan()
            } else {
                f[i].to_bits() == got.to_f32().to_bits()
            };
            if !same || !exact_back {
                if bad < 5 {
                    println!(
                        "element {i}: {} -> {:#06x} (want {:#06x}) -> {}",
                        x[i + offset],
                        h[i],
                        want.to_bits(),
                        f[i]
                    );
                }
                bad += 1;
            }
        }
        println!("casts, {n} elements, offset {offset}: {bad} mismatches");
        assert_eq!(bad, 0);
    }
}

/// Direct launches: misaligned inputs (one element past a 16-byte boundary) and in-place
/// updates, with the output poisoned first.
#[test]
fn elementwise_on_misaligned_and_in_place_pointers() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(14);
    let (b, n, c) = (2usize, 5usize, 96usize);
    let total = b * n * c;
    for dtype in DTYPES {
        let es = dtype.size_in_bytes() as u64;
        let to_dev = |v: &[f32]| -> Vec<u8> {
            match dtype {
                DType::F32 => v.iter().flat_map(|f| f.to_le_bytes()).collect(),
                _ => v
                    .iter()
                    .flat_map(|&f| bf16::from_f32(f).to_bits().to_le_bytes())
                    .collect(),
            }
        };
        let read = |p: u64, len: usize| -> Vec<f32> {
            match dtype {
                DType::F32 => {
                    let mut o = vec![0f32; len];
                    dev.copy_to_host(p, &mut o).unwrap();
                    o
                }
                _ => {
                    let mut o = vec![0u16; len];
                    dev.copy_to_host(p, &mut o).unwrap();
                    o.into_iter().map(|x| bf16::from_bits(x).to_f32()).collect()
                }
            }
        };
        let x = rng.normals(total, 0.0, 2.0);
        let v = rng.normals(total, 0.0, 1.0);
        let gate = rng.normals(b * c, 0.0, 1.0);
        let (xr, vr, gr) = (
            round_to(dtype, &x),
            round_to(dtype, &v),
            round_to(dtype, &gate),
        );
        let mut xb = to_dev(&[0.0]);
        xb.extend(to_dev(&x));
        let mut vb = to_dev(&[0.0]);
        vb.extend(to_dev(&v));
        let xbuf = dev.upload(&xb).unwrap();
        let vbuf = dev.upload(&vb).unwrap();
        let gbuf = dev.upload(&to_dev(&gate)).unwrap();
        let ybuf = dev.alloc((total + 1) * es as usize).unwrap();
        let (xp, vp, yp) = (xbuf.ptr() + es, vbuf.ptr() + es, ybuf.ptr() + es);

        // silu, misaligned.
        dev.fill_bytes(ybuf.ptr(), 0xFF, ybuf.bytes()).unwrap();
        unsafe {
            enqueue(
                &dev,
                &elementwise::unary(dtype, dev.sm_count(), UnaryFn::Silu, xp, yp, total).unwrap(),
            )
            .unwrap()
        };
        let (mut want, mut base) = (vec![0.0; total], vec![0.0; total]);
        cpu::unary(UnaryFn::Silu, &x, &mut want);
        cpu::unary(UnaryFn::Silu, &xr, &mut base);
        check(
            &format!("silu {dtype} misaligned"),
            dtype,
            &read(yp, total),
            &want,
            &base,
        );

        // gated_add, misaligned x and v, aligned gate, in place over v.
        unsafe {
            enqueue(
                &dev,
                &elementwise::gated_add(dtype, dev.sm_count(), xp, gbuf.ptr(), vp, vp, total, n, c)
                    .unwrap(),
            )
            .unwrap()
        };
        cpu::gated_add(&x, &gate, &v, n, c, &mut want);
        cpu::gated_add(&xr, &gr, &vr, n, c, &mut base);
        check(
            &format!("gated_add {dtype} misaligned, in place"),
            dtype,
            &read(vp, total),
            &want,
            &base,
        );

        // add in place over misaligned x, odd length.
        let (a0, m) = (xbuf.ptr() + es, total - 3);
        let before = read(a0, m);
        unsafe {
            enqueue(
                &dev,
                &elementwise::add(dtype, dev.sm_count(), a0, yp, a0, m).unwrap(),
            )
            .unwrap()
        };
        let y = read(yp, m);
        let want_add: Vec<f32> = before.iter().zip(&y).map(|(p, q)| p + q).collect();
        check(
            &format!("add {dtype} in place"),
            dtype,
            &read(a0, m),
            &want_add,
            &round_to(dtype, &want_add),
        );
    }
}

/// `ada_gated_add`: the gate row read from adaLN-single's table (`t` [B, k·C] or [B, C]) against
/// the twin composed of modulation_table, chunk and gated_add; C a multiple of the vector widths
/// and not (17, 100).
#[test]
fn ada_gated_add_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(13);
    // (B, N, C, k, per-row t, gate row)
    for &(b, n, c, k, per_row, gate) in &[
        (2usize, 37usize, 96usize, 6usize, true, 2usize),
        (3, 5, 1152, 6, true, 5),
        (2, 9, 17, 6, true, 2),
        (3, 4, 100, 3, false, 1),
    ] {
        let tc = if per_row { k * c } else { c };
        let total = b * n * c;
        let x = rng.normals(total, 0.0, 1.0);
        let t = rng.normals(b * tc, 0.0, 1.0);
        let table = rng.normals(k * c, 0.0, 0.5);
        let v = rng.normals(total, 0.0, 1.0);
        let d = cpu::AdaDims {
            batch: b,
            tokens: n,
            cols: c,
            k,
        };
        let mut want = vec![0.0; total];
        cpu::ada_gated_add(&x, &t, &table, d, gate, &v, &mut want);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, c]).unwrap();
        let ti = gb.input("t", [b, tc]).unwrap();
        let tab = gb.input("table", [k, c]).unwrap();
        let vi = gb.input("v", [b, n, c]).unwrap();
        let y = gb
            .ada_gated_add("gated_residual", xi, ti, tab, gate, vi)
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let inputs = HashMap::from([
            ("x".to_string(), tensor(&[b, n, c], x.clone())),
            ("t".to_string(), tensor(&[b, tc], t.clone())),
            ("table".to_string(), tensor(&[k, c], table.clone())),
            ("v".to_string(), tensor(&[b, n, c], v.clone())),
        ]);
        for dtype in DTYPES {
            let got = run(&dev, &g, &inputs, dtype);
            let r = |a: &[f32]| round_to(dtype, a);
            let mut base = vec![0.0; total];
            cpu::ada_gated_add(&r(&x), &r(&t), &r(&table), d, gate, &r(&v), &mut base);
            check(
                &format!("ada_gated_add {dtype} [{b}, {n}, {c}] table [{k}, {c}] t [{b}, {tc}]"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}
