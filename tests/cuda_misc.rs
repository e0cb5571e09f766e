//! kernels/misc.cu against its CPU twins (openuni_cpu::ops::{modulation_table, chunk,
//! timestep_embedding, swiglu, slice_tokens (gather_tokens), concat, embedding_gather,
//! quantize_image_u8, any_nonfinite, guided_x0, dpm_solver_update, div_scalar, gaussian_noise}) on random and edge inputs, through
//! the CUDA executor on one-node graphs, f32 and bf16 storage, B = 2, odd widths (scalar paths)
//! and multiples of 8 (16-byte vector paths).
//!
//! Tolerances (openuni_cuda::testing::check), against the CPU twin on the f32 inputs: f32 storage,
//! relative L2 <= 1e-5; bf16 storage, <= 2x the relative L2 error of a plain bf16 run (the CPU
//! twin on the inputs rounded to bf16, its output rounded to bf16). Two stricter rules:
//! - the copies (chunk, gather_tokens, concat, embedding_gather) must equal the rounded input
//!   exactly, and the uint8 quantization, the non-finite flag, the division by a scalar and the
//!   seeded noise the CPU twin on it bit for bit;
//! - the timestep embedding in bf16 storage must be as close as the f32 result rounded to bf16
//!   (2x its error): the timestep is read from the input's f32 copy, so t = 999 is not the 1000
//!   bf16 would make of it.
//! Without a CUDA device (real or emulated) every test prints `skipped: no CUDA device`.

use std::collections::HashMap;
use std::sync::Arc;

use openuni_cpu::ops as cpu;
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor};
use openuni_graph::{Graph, GraphBuilder, UnaryFn};
use openuni_tensor::{DType, HostTensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

fn tensor(shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), v.to_vec()).unwrap()
}

/// Runs a graph with output `y` on the device.
fn run(
    dev: &Arc<CudaDevice>,
    g: &Graph,
    weights: &HashMap<String, HostTensor>,
    inputs: &[(&str, &[usize], &[f32])],
    dtype: DType,
) -> Vec<f32> {
    let inputs: HashMap<String, HostTensor> = inputs
        .iter()
        .map(|(n, s, v)| (n.to_string(), tensor(s, v)))
        .collect();
    let mut ex = CudaExecutor::new(dev, g, weights, dtype, false).unwrap();
    ex.run(&inputs).unwrap()["y"].to_f32_vec()
}

fn no_weights() -> HashMap<String, HostTensor> {
    HashMap::new()
}

#[test]
fn modulation_table_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(21);
    // (B, k, C, t per row): adaLN-single's block table (6 rows, t [B, 6C]) and head table (2 rows,
    // t [B, C] broadcast).
    for &(b, k, c, per_row) in &[
        (2, 6, 48, true),
        (2, 2, 48, false),
        (2, 6, 7, true),
        (2, 2, 1152, false),
        (1, 6, 1152, true),
    ] {
        let tw = if per_row { k * c } else { c };
        let t = rng.normals(b * tw, 0.0, 1.0);
        let table = rng.normals(k * c, 0.0, 0.5);
        let mut want = vec![0.0; b * k * c];
        cpu::modulation_table(&t, &table, b, k, c, &mut want);
        let mut gb = GraphBuilder::new();
        let ti = gb.input("t", [b, tw]).unwrap();
        let wi = gb.weight("scale_shift_table", [k, c]).unwrap();
        let y = gb.modulation_table("modulation", ti, wi).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let w = HashMap::from([("scale_shift_table".to_string(), tensor(&[k, c], &table))]);
        for dtype in DTYPES {
            let got = run(&dev, &g, &w, &[("t", &[b, tw], &t)], dtype);
            let mut base = vec![0.0; b * k * c];
            cpu::modulation_table(
                &round_to(dtype, &t),
                &round_to(dtype, &table),
                b,
                k,
                c,
                &mut base,
            );
            check(
                &format!("modulation_table {dtype} B={b} k={k} C={c} per_row={per_row}"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}

/// The copies are exact: the output equals the (rounded) input.
fn assert_copy(what: &str, dtype: DType, got: &[f32], want: &[f32]) {
    let r = round_to(dtype, want);
    assert_eq!(got.len(), r.len(), "{what}: length");
    let bad = got
        .iter()
        .zip(&r)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    println!("{what}: {bad} of {} elements differ", got.len());
    assert_eq!(bad, 0, "{what}: the copy is not exact");
}

#[test]
fn chunk_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(22);
    for &(b, k, c) in &[(2, 6, 7), (2, 6, 48), (2, 2, 1152)] {
        let x = rng.normals(b * k * c, 0.0, 1.0);
        for index in 0..k {
            let mut want = vec![0.0; b * c];
            cpu::chunk(&x, b, k, c, index, &mut want);
            let mut gb = GraphBuilder::new();
            let xi = gb.input("x", [b, k, c]).unwrap();
            let y = gb.chunk("chunk", xi, index).unwrap();
            gb.output("y", y).unwrap();
            let g = gb.finish();
            for dtype in DTYPES {
                let got = run(&dev, &g, &no_weights(), &[("x", &[b, k, c], &x)], dtype);
                assert_copy(
                    &format!("chunk {dtype} [{b}, {k}, {c}] row {index}"),
                    dtype,
                    &got,
                    &want,
                );
            }
        }
    }
}

#[test]
fn gather_tokens_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(29);
    // (T, C, starts, len): the meta-query states of packed sequences; odd C takes the scalar path.
    for (t, c, starts, len) in [
        (40, 64, vec![6, 20, 34], 6),
        (17, 5, vec![0, 3, 12], 5),
        (9, 48, vec![8], 1),
    ] {
        let x = rng.normals(t * c, 0.0, 1.0);
        let mut want = vec![0.0; starts.len() * len * c];
        for (i, &s) in starts.iter().enumerate() {
            cpu::slice_tokens(
                &x,
                1,
                t,
                c,
                s,
                len,
                &mut want[i * len * c..(i + 1) * len * c],
            );
        }
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [1, t, c]).unwrap();
        let y = gb.gather_tokens("gather", xi, &starts, len).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        for dtype in DTYPES {
            let got = run(&dev, &g, &no_weights(), &[("x", &[1, t, c], &x)], dtype);
            assert_copy(
                &format!("gather_tokens {dtype} [1, {t}, {c}] {starts:?}+{len}"),
                dtype,
                &got,
                &want,
            );
        }
    }
}

#[test]
fn concat_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(24);
    // Widths: odd (scalar path, unaligned destination columns), DC-AE's q|k|v (aligned), mixed.
    for widths in [
        vec![5, 7],
        vec![5, 7, 3],
        vec![64, 64, 64],
        vec![64, 128],
        vec![8, 3, 16],
    ] {
        let (b, n) = (2, 7);
        let xs: Vec<Vec<f32>> = widths
            .iter()
            .map(|&w| rng.normals(b * n * w, 0.0, 1.0))
            .collect();
        let total: usize = widths.iter().sum();
        let mut want = vec![0.0; b * n * total];
        let parts: Vec<&[f32]> = xs.iter().map(|v| &v[..]).collect();
        cpu::concat(&parts, &widths, &mut want);
        let mut gb = GraphBuilder::new();
        let names: Vec<String> = (0..widths.len()).map(|i| format!("x{i}")).collect();
        let ids: Vec<_> = names
            .iter()
            .zip(&widths)
            .map(|(nm, &w)| gb.input(nm, [b, n, w]).unwrap())
            .collect();
        let y = gb.concat("concat", &ids).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let shapes: Vec<[usize; 3]> = widths.iter().map(|&w| [b, n, w]).collect();
        let inputs: Vec<(&str, &[usize], &[f32])> = names
            .iter()
            .zip(&shapes)
            .zip(&xs)
            .map(|((nm, s), v)| (nm.as_str(), &s[..], &v[..]))
            .collect();
        for dtype in DTYPES {
            let got = run(&dev, &g, &no_weights(), &inputs, dtype);
            assert_copy(
                &format!("concat {dtype} widths {widths:?}"),
                dtype,
                &got,
                &want,
            );
        }
    }
}

fn timestep_graph(b: usize, dim: usize, via_node: bool) -> Graph {
    let mut gb = GraphBuilder::new();
    let t = gb.input("t", [b]).unwrap();
    // `via_node`: the timestep is computed on the device (stored in the executor's dtype).
    let t = if via_node {
        gb.unary("t.relu", t, UnaryFn::Relu).unwrap()
    } else {
        t
    };
    let y = gb.timestep_embedding("time_proj", t, dim).unwrap();
    gb.output("y", y).unwrap();
    gb.finish()
}

#[test]
fn timestep_embedding_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    // SANA's timesteps are integers up to 999 (bf16 holds integers exactly only up to 256).
    for (t, dim) in [
        (vec![999.0, 0.0], 256),
        (vec![999.0, 998.0, 1.0, 517.0], 256),
        (vec![3.0, 261.0], 6),
        (vec![999.0, 501.0], 10),
    ] {
        let b = t.len();
        let mut want = vec![0.0; b * dim];
        cpu::timestep_embedding(&t, dim, &mut want);
        let g = timestep_graph(b, dim, false);
        for dtype in DTYPES {
            let got = run(&dev, &g, &no_weights(), &[("t", &[b], &t)], dtype);
            // Stricter than the plain bf16 run (which rounds t): only the output rounding is allowed.
            check(
                &format!("timestep_embedding {dtype} t={t:?} dim={dim}"),
                dtype,
                &got,
                &want,
                &want,
            );
        }
    }
}

#[test]
fn timestep_embedding_of_a_computed_timestep_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let (t, dim) = (vec![999.0, 250.0, 17.0], 256);
    let b = t.len();
    let mut want = vec![0.0; b * dim];
    cpu::timestep_embedding(&t, dim, &mut want);
    let g = timestep_graph(b, dim, true);
    for dtype in DTYPES {
        let got = run(&dev, &g, &no_weights(), &[("t", &[b], &t)], dtype);
        // A bf16 value computed on the device is rounded like the plain bf16 run's input.
        let mut base = vec![0.0; b * dim];
        cpu::timestep_embedding(&round_to(dtype, &t), dim, &mut base);
        check(
            &format!("timestep_embedding (computed t) {dtype}"),
            dtype,
            &got,
            &want,
            &base,
        );
    }
}

#[test]
fn swiglu_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(26);
    for &(b, n, c) in &[(2, 7, 96), (2, 3, 37), (2, 5, 8960), (1, 1, 3)] {
        let gate = rng.normals(b * n * c, 0.0, 2.0);
        let up = rng.normals(b * n * c, 0.0, 1.0);
        let mut want = vec![0.0; b * n * c];
        cpu::swiglu(&gate, &up, &mut want);
        let mut gb = GraphBuilder::new();
        let gi = gb.input("gate", [b, n, c]).unwrap();
        let ui = gb.input("up", [b, n, c]).unwrap();
        let y = gb.swiglu("act", gi, ui).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        for dtype in DTYPES {
            let got = run(
                &dev,
                &g,
                &no_weights(),
                &[("gate", &[b, n, c], &gate), ("up", &[b, n, c], &up)],
                dtype,
            );
            let mut base = vec![0.0; b * n * c];
            cpu::swiglu(&round_to(dtype, &gate), &round_to(dtype, &up), &mut base);
            check(
                &format!("swiglu {dtype} [{b}, {n}, {c}]"),
                dtype,
                &got,
                &want,
                &base,
            );
        }
    }
}

/// `a` and `b` equal bit for bit, NaN matching any NaN.
fn assert_same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| {
            !(got[i].to_bits() == want[i].to_bits() || got[i].is_nan() && want[i].is_nan())
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, the first at {}: {} against {}",
        bad.len(),
        got.len(),
        bad[0],
        got[bad[0]],
        want[bad[0]]
    );
}

#[test]
fn embedding_gather_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(31);
    // V = 300 (ids above 256, which bf16 cannot hold: the kernel reads the ids' f32 copy), E = 4
    // extra rows (meta-queries as ids 300..304); then ids that must give NaN rows, never a read
    // outside the tables: past V + E, negative, not an integer, NaN.
    let (v, e) = (300usize, 4usize);
    let ids = [
        0.0,
        299.0,
        257.0,
        300.0,
        303.0,
        7.0,
        299.0,
        304.0,
        -1.0,
        2.5,
        f32::NAN,
        1e9,
    ];
    for d in [5usize, 64] {
        let table = rng.normals(v * d, 0.0, 1.0);
        let extra = rng.normals(e * d, 0.0, 1.0);
        let mut gb = GraphBuilder::new();
        let idi = gb.input("ids", [1, ids.len()]).unwrap();
        let ti = gb.weight("embed_tokens.weight", [v, d]).unwrap();
        let ei = gb.weight("meta_queries", [e, d]).unwrap();
        let y = gb.embedding_gather("embed", idi, ti, Some(ei)).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let w = HashMap::from([
            ("embed_tokens.weight".to_string(), tensor(&[v, d], &table)),
            ("meta_queries".to_string(), tensor(&[e, d], &extra)),
        ]);
        for dtype in DTYPES {
            let mut want = vec![0.0; ids.len() * d];
            cpu::embedding_gather(
                &ids,
                &round_to(dtype, &table),
                Some(&round_to(dtype, &extra)),
                d,
                &mut want,
            );
            assert!(
                want[7 * d..].iter().all(|x| x.is_nan())
                    && want[..7 * d].iter().all(|x| x.is_finite()),
                "the CPU twin's NaN rows"
            );
            let got = run(&dev, &g, &w, &[("ids", &[1, ids.len()], &ids)], dtype);
            assert_same(&format!("embedding_gather {dtype} D={d}"), &got, &want);
        }
    }
}

#[test]
fn quantize_u8_matches_the_host_rule_bit_for_bit() {
    let Some(dev) = device_or_skip() else { return };
    // The edges of the rule: -1, 1, 0, out of range, NaN (-> 0 as the host's saturating cast), ±Inf,
    // and for every pixel value k the inputs whose 127.5·x + 128 lands at k and at k + 0.5, with
    // their f32 neighbours (truncation and the no-FMA rounding are tested where they decide).
    let mut x = vec![
        -1.0,
        1.0,
        0.0,
        -1.5,
        1.5,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        1e-30,
    ];
    for k in 0..=256 {
        for at in [k as f32, k as f32 + 0.5] {
            let x0 = (at - 128.0) / 127.5;
            x.extend([x0, x0.next_up(), x0.next_down()]);
        }
    }
    let mut rng = Rng::new(32);
    // Random values up to whole images [B, 3, H, W] with B = 2, H·W = len / 6.
    let pad = 60 + (6 - x.len() % 6) % 6;
    x.extend(rng.normals(pad, 0.0, 0.7));
    let (b, pixels) = (2, x.len() / 6);
    let (h, w) = (1, pixels);
    let mut gb = GraphBuilder::new();
    let xi = gb.input("x", [b, 3, h, w]).unwrap();
    let y = gb.quantize_u8("quantize", xi).unwrap();
    gb.output("y", y).unwrap();
    let g = gb.finish();
    for dtype in DTYPES {
        let xr = round_to(dtype, &x);
        // The host rule (src/image.rs `to_uint8_nhwc` calls it) on the values the device holds.
        let mut want = vec![0.0; x.len()];
        cpu::quantize_image_u8(&xr, b, pixels, &mut want);
        let mut ex = CudaExecutor::new(&dev, &g, &no_weights(), dtype, false).unwrap();
        let got = ex
            .run(&HashMap::from([(
                "x".to_string(),
                tensor(&[b, 3, h, w], &x),
            )]))
            .unwrap()["y"]
            .to_f32_vec();
        assert_same(&format!("quantize_u8 {dtype}"), &got, &want);
        // Read back as bytes, one a value.
        let bytes = ex.output_tensor("y").unwrap().to_host_u8().unwrap();
        assert_eq!(bytes.shape.dims(), &[b, h, w, 3]);
        let want_bytes: Vec<u8> = want.iter().map(|&v| v as u8).collect();
        assert_eq!(
            bytes.data.as_bytes(),
            &want_bytes[..],
            "quantize_u8 {dtype}: the bytes read back"
        );
        // NaN -> 0 and the range ends, explicitly (channel 0 of image 0 holds x[0..pixels] in order).
        assert_eq!(
            [want[0], want[3], want[15], want[18], want[21]],
            [0.0, 255.0, 0.0, 255.0, 0.0],
            "{dtype}: -1, 1, NaN, Inf, -Inf"
        );
    }
}

#[test]
fn any_nonfinite_flags_nan_and_inf_and_resets() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(33);
    let n = 50_000;
    // Two flags in one graph (they share the zeroed workspace the finish launch re-zeroes).
    let mut gb = GraphBuilder::new();
    let (a, b) = (gb.input("a", [n]).unwrap(), gb.input("b", [7]).unwrap());
    let (fa, fb) = (
        gb.any_nonfinite("a.nonfinite", a).unwrap(),
        gb.any_nonfinite("b.nonfinite", b).unwrap(),
    );
    gb.output("fa", fa).unwrap();
    gb.output("fb", fb).unwrap();
    let g = gb.finish();
    let clean = rng.normals(n, 0.0, 100.0);
    let with = |i: usize, v: f32| {
        let mut x = clean.clone();
        x[i] = v;
        x
    };
    let small = rng.normals(7, 0.0, 1.0);
    let mut small_inf = small.clone();
    small_inf[6] = f32::NEG_INFINITY;
    for dtype in DTYPES {
        let mut ex = CudaExecutor::new(&dev, &g, &no_weights(), dtype, false).unwrap();
        // (a, b, flags): in order, so a set flag must not leak into the next run or the other node.
        for (av, bv, want) in [
            (with(n - 1, f32::NAN), small.clone(), [1.0, 0.0]),
            (clean.clone(), small.clone(), [0.0, 0.0]),
            (with(0, f32::INFINITY), small_inf.clone(), [1.0, 1.0]),
            (clean.clone(), small_inf.clone(), [0.0, 1.0]),
            (clean.clone(), small.clone(), [0.0, 0.0]),
        ] {
            let out = ex
                .run(&HashMap::from([
                    ("a".to_string(), tensor(&[n], &av)),
                    ("b".to_string(), tensor(&[7], &bv)),
                ]))
                .unwrap();
            let got = [out["fa"].to_f32_vec()[0], out["fb"].to_f32_vec()[0]];
            let cpu_want = [cpu::any_nonfinite(&av), cpu::any_nonfinite(&bv)];
            assert_eq!(cpu_want, want, "the CPU twin");
            assert_eq!(got, want, "any_nonfinite {dtype}");
        }
    }
}

/// The device sampler's step (`guided_x0` then `dpm_solver_update`, one graph as the pipeline's
/// sampler graph) against the CPU twins, for each order (0 Euler, 1, 2) with coefficients of a
/// real schedule: f32 storage bit for bit (the kernels use no fused multiply-add), bf16 within
/// the rule. The coefficients are read in f32 under bf16 storage (their staging copy).
#[test]
fn guided_x0_and_dpm_solver_update_match_the_cpu_twins() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(41);
    // An odd element count (no vector path) across several blocks.
    let n = 2 * 3 * 37 * 29;
    let mut gb = GraphBuilder::new();
    let v = gb.input("velocity", [2 * n]).unwrap();
    let x = gb.input("sample", [n]).unwrap();
    let p = gb.input("prev_x0", [n]).unwrap();
    let k = gb.input("coeffs", [openuni_graph::SAMPLER_COEFFS]).unwrap();
    let x0 = gb.guided_x0("x0", v, x, k).unwrap();
    let y = gb.dpm_solver_update("y", x, x0, p, k).unwrap();
    gb.output("x0", x0).unwrap();
    gb.output("y", y).unwrap();
    let g = gb.finish();
    let (vv, xv, pv) = (
        rng.normals(2 * n, 0.0, 1.0),
        rng.normals(n, 0.0, 1.0),
        rng.normals(n, 0.0, 1.0),
    );
    // [guidance, sigma, ratio, c, half_c, inv_r0, order]: Euler (sigma = -dt), first and second order
    // (20 steps, shift 3, step 5).
    let coeff_sets: [[f32; 7]; 3] = [
        [4.5, 0.0183, 0.0, 0.0, 0.0, 0.0, 0.0],
        [4.5, 0.9997, 0.98, -0.0171, -0.00855, 0.0, 1.0],
        [4.5, 0.922, 0.9, -0.0835, -0.04175, 0.71, 2.0],
    ];
    for dtype in DTYPES {
        let mut ex = CudaExecutor::new(&dev, &g, &no_weights(), dtype, false).unwrap();
        for kv in coeff_sets {
            let inputs = HashMap::from([
                ("velocity".to_string(), tensor(&[2 * n], &vv)),
                ("sample".to_string(), tensor(&[n], &xv)),
                ("prev_x0".to_string(), tensor(&[n], &pv)),
                ("coeffs".to_string(), tensor(&[7], &kv)),
            ]);
            let out = ex.run(&inputs).unwrap();
            let (got_x0, got_y) = (out["x0"].to_f32_vec(), out["y"].to_f32_vec());
            let twin = |vv: &[f32], xv: &[f32], pv: &[f32]| {
                let (mut x0, mut y) = (vec![0f32; n], vec![0f32; n]);
                cpu::guided_x0(vv, xv, &kv, &mut x0);
                cpu::dpm_solver_update(xv, &x0, pv, &kv, &mut y);
                (x0, y)
            };
            let (want_x0, want_y) = twin(&vv, &xv, &pv);
            let what = format!("order {} {dtype}", kv[6]);
            if dtype == DType::F32 {
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got_x0), bits(&want_x0), "guided_x0 {what}");
                assert_eq!(bits(&got_y), bits(&want_y), "dpm_solver_update {what}");
            } else {
                // The plain bf16 run: rounded inputs, the estimate rounded before the update.
                let r = |v: &[f32]| round_to(dtype, v);
                let (plain_x0, _) = twin(&r(&vv), &r(&xv), &r(&pv));
                let mut plain_y = vec![0f32; n];
                cpu::dpm_solver_update(&r(&xv), &r(&plain_x0), &r(&pv), &kv, &mut plain_y);
                check(
                    &format!("guided_x0 {what}"),
                    dtype,
                    &got_x0,
                    &want_x0,
                    &plain_x0,
                );
                check(
                    &format!("dpm_solver_update {what}"),
                    dtype,
                    &got_y,
                    &want_y,
                    &plain_y,
                );
            }
        }
    }
}

/// The decoder's input `latents / scaling_factor` made on the device ("decoder.input") must be
/// the host's division bit for bit: one correctly rounded f32 division a value (`__fdiv_rn`),
/// not a multiply by the reciprocal, which rounds differently for some of these inputs (checked
/// here, so that the test can tell the two apart). bf16 storage: the quotient of the stored
/// (rounded) input, rounded once. Edge inputs: zeros, subnormals, the largest finite values
/// (whose quotient overflows for a divisor below 1), ±Inf and NaN.
#[test]
fn div_scalar_is_the_host_division_bit_for_bit() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(43);
    let mut x = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        1e-40,
        -1e-42,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ];
    x.extend(rng.normals(2 * 3 * 37 * 29, 0.0, 3.0));
    let n = x.len();
    // SANA's DC-AE f32c32 scaling factor, another model's, and an exact power of two.
    for divisor in [0.41407f32, 0.3189, 3.0, 0.5] {
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [n]).unwrap();
        let y = gb.div_scalar("divide", xi, divisor).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        if divisor != 0.5 {
            let r = 1.0 / divisor;
            assert!(
                x.iter().any(|&v| v * r != v / divisor && v.is_finite()),
                "divisor {divisor}: no input tells the division from a multiply"
            );
        }
        for dtype in DTYPES {
            let xr = round_to(dtype, &x);
            let mut want = vec![0f32; n];
            cpu::div_scalar(&xr, divisor, &mut want);
            let want = round_to(dtype, &want);
            let got = run(&dev, &g, &no_weights(), &[("x", &[n], &x)], dtype);
            assert_same(&format!("div_scalar by {divisor} {dtype}"), &got, &want);
        }
    }
}

/// The initial noise drawn on the device ("sampler.prime", `Op::GaussianNoise`) must be the CPU
/// twin's bit for bit (every float operation of the kernel is an explicit IEEE operation, so the
/// same holds on hardware): seeds 0, 1, a large one and u64::MAX, several seeds per launch,
/// counts that are and are not a multiple of the four values one Philox call gives, and a count
/// above 2^16 groups. bf16 storage: the twin's value rounded once. A graph whose seeds are not an
/// input is refused, naming the op.
#[test]
fn gaussian_noise_is_the_cpu_twin_bit_for_bit() {
    let Some(dev) = device_or_skip() else { return };
    let limbs = openuni_graph::seed::LIMBS;
    for (seeds, per_seed) in [
        (vec![0u64], 8usize),
        (vec![1, 2, 3], 4099),
        (vec![0x0123_4567_89AB_CDEF, u64::MAX], 1),
        (vec![42], 262_147),
    ] {
        let l: Vec<f32> = seeds
            .iter()
            .flat_map(|&s| openuni_graph::seed::limbs(s))
            .collect();
        let n = seeds.len();
        let mut gb = GraphBuilder::new();
        let si = gb.input("seeds", [n, limbs]).unwrap();
        let y = gb.gaussian_noise("noise", si, per_seed).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let mut want = vec![0f32; n * per_seed];
        cpu::gaussian_noise(&l, per_seed, &mut want);
        assert!(
            want.iter().all(|v| v.is_finite()),
            "the twin drew a non-finite value"
        );
        for dtype in DTYPES {
            let got = run(
                &dev,
                &g,
                &no_weights(),
                &[("seeds", &[n, limbs], &l)],
                dtype,
            );
            assert_same(
                &format!("gaussian_noise {dtype} seeds {seeds:?} x {per_seed}"),
                &got,
                &round_to(dtype, &want),
            );
        }
    }
    // Seeds computed inside the graph: read as they are under f32 storage; under bf16 storage
    // (where a limb above 256 would not survive) there is no f32 copy to read, so refused,
    // naming the op.
    let mut gb = GraphBuilder::new();
    let si = gb.input("x", [1, limbs]).unwrap();
    let s2 = gb.div_scalar("computed", si, 1.0).unwrap();
    let y = gb.gaussian_noise("noise", s2, 4).unwrap();
    gb.output("y", y).unwrap();
    let g = gb.finish();
    let x = [1.0, 0.0, 0.0, 0.0];
    let mut want = vec![0f32; 4];
    cpu::gaussian_noise(&x, 4, &mut want);
    assert_same(
        "gaussian_noise of computed seeds, f32",
        &run(
            &dev,
            &g,
            &no_weights(),
            &[("x", &[1, limbs], &x)],
            DType::F32,
        ),
        &want,
    );
    let e = CudaExecutor::new(&dev, &g, &no_weights(), DType::BF16, false).and_then(|mut ex| {
        ex.run(&HashMap::from([("x".to_string(), tensor(&[1, limbs], &x))]))
            .map(|_| ())
    });
    let msg = format!(
        "{:?}",
        e.expect_err("bf16: seeds computed in the graph must be refused")
    );
    assert!(
        msg.contains("gaussian_noise") && msg.contains("seeds"),
        "{msg}"
    );
}
