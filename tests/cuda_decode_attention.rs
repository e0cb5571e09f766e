//! kernels/decode_attention.cu against its CPU twins (openuni_cpu::ops::{decode_attention,
//! kv_cache_append, kv_cache_rows}) through the CUDA executor on one-node graphs, f32 and bf16 storage: cache
//! lengths 1, below, at and past the kernel's key chunk (256), several sequences of different
//! lengths in one batch, GQA ratios 1, 2, 6 and 7 (InternVL3-2B 12/2 hd 128, 1B 14/2 hd 64), head
//! dims 64, 128 and odd-sized ones, with and without fused RoPE, and a position past the cache
//! (clamped alike by both twins).
//!
//! Tolerances (openuni_cuda::testing::check): f32 storage, relative L2 <= 1e-5 against the CPU twin;
//! bf16 storage, <= 2x the error of the CPU twin on bf16-rounded inputs (its output rounded to bf16).
//! The append is checked with the same rule on the whole cache and on the appended rows alone, and
//! every other row must be an exact copy.
//!
//! `kv_cache_append_on_a_state_persists_across_runs`: the append on an executor state is in place
//! and the cache persists across runs (CPU executor, then the device in both dtypes).
//!
//! One test needs no device: the CPU twin of a decode step (append K rotated and V at position p,
//! attend with q rotated at p) equals the last row of the prefill attention (`attention_ext`, causal,
//! fused RoPE) over the same p + 1 tokens. Without a CUDA device (real or emulated) the other
//! tests print `skipped: no CUDA device`.

use std::collections::HashMap;
use std::sync::Arc;

use openuni_cpu::ops::{self as cpu, AttentionDims, DecodeDims};
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor};
use openuni_graph::{Graph, GraphBuilder};
use openuni_tensor::{DType, HostTensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];
const THETA: f32 = 1e6;

fn run(
    dev: &Arc<CudaDevice>,
    g: &Graph,
    inputs: &[(&str, Vec<usize>, &[f32])],
    dtype: DType,
) -> Vec<f32> {
    let inputs: HashMap<String, HostTensor> = inputs
        .iter()
        .map(|(n, s, v)| {
            (
                n.to_string(),
                HostTensor::from_f32(s.clone(), v.to_vec()).unwrap(),
            )
        })
        .collect();
    let mut ex = CudaExecutor::new(dev, g, &HashMap::new(), dtype, false).unwrap();
    ex.run(&inputs).unwrap()["y"].to_f32_vec()
}

struct Case {
    positions: Vec<usize>,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    max_len: usize,
    rope: bool,
}

fn cases() -> Vec<Case> {
    let c = |positions: Vec<usize>, heads, kv_heads, hd, max_len, rope| Case {
        positions,
        heads,
        kv_heads,
        hd,
        max_len,
        rope,
    };
    vec![
        // One key (the first decoded token after an empty cache), no GQA.
        c(vec![0], 2, 2, 64, 5, true),
        // InternVL3-1B: 14/2 hd 64; 1, 257 (chunk + 1) and 301 keys in one batch.
        c(vec![0, 256, 300], 14, 2, 64, 301, true),
        // InternVL3-2B: 12/2 hd 128; exactly two chunks, and a short sequence beside it.
        c(vec![511, 100], 12, 2, 128, 520, true),
        // Odd head dim without RoPE, GQA 7, keys not a multiple of anything.
        c(vec![36, 4, 17], 7, 1, 40, 37, false),
        // Head dim 256 (two output dims per thread), a position past the cache (clamped).
        c(vec![2, 9], 4, 2, 256, 8, true),
    ]
}

fn dims(c: &Case) -> DecodeDims {
    DecodeDims {
        batch: c.positions.len(),
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.hd,
        max_len: c.max_len,
    }
}

#[test]
fn decode_attention_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(71);
    for c in cases() {
        let d = dims(&c);
        let b = d.batch;
        let rope = c.rope.then_some(THETA);
        let scale = 1.0 / (c.hd as f32).sqrt();
        let q = rng.normals(b * c.heads * c.hd, 0.0, 1.0);
        let cache_shape = vec![b, c.kv_heads, c.max_len, c.hd];
        let n_cache = b * c.kv_heads * c.max_len * c.hd;
        // Keys of scale 2 make the softmax peaky enough that the chunks' maxima differ.
        let k = rng.normals(n_cache, 0.0, 2.0);
        let v = rng.normals(n_cache, 0.0, 1.0);
        let pos: Vec<f32> = c.positions.iter().map(|&p| p as f32).collect();
        let mut want = vec![0.0; q.len()];
        cpu::decode_attention(&q, &k, &v, &pos, d, scale, rope, &mut want);

        let mut gb = GraphBuilder::new();
        let qi = gb.input("q", [b, c.heads * c.hd]).unwrap();
        let ki = gb.input("k_cache", cache_shape.clone()).unwrap();
        let vi = gb.input("v_cache", cache_shape.clone()).unwrap();
        let pi = gb.input("positions", [b]).unwrap();
        let y = gb
            .decode_attention(
                "decode", qi, ki, vi, pi, c.heads, c.kv_heads, c.hd, scale, rope,
            )
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        for dtype in DTYPES {
            let inputs = [
                ("q", vec![b, c.heads * c.hd], &q[..]),
                ("k_cache", cache_shape.clone(), &k[..]),
                ("v_cache", cache_shape.clone(), &v[..]),
                ("positions", vec![b], &pos[..]),
            ];
            let got = run(&dev, &g, &inputs, dtype);
            let mut base = vec![0.0; q.len()];
            cpu::decode_attention(
                &round_to(dtype, &q),
                &round_to(dtype, &k),
                &round_to(dtype, &v),
                &pos,
                d,
                scale,
                rope,
                &mut base,
            );
            let what = format!(
                "decode_attention {dtype} positions {:?} heads {}/{} hd {} max_len {} rope {}",
                c.positions, c.heads, c.kv_heads, c.hd, c.max_len, c.rope
            );
            check(&what, dtype, &got, &want, &base);
        }
    }
}

#[test]
fn kv_cache_append_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(72);
    for c in cases() {
        let d = dims(&c);
        let b = d.batch;
        let cache_shape = vec![b, c.kv_heads, c.max_len, c.hd];
        let cache = rng.normals(b * c.kv_heads * c.max_len * c.hd, 0.0, 1.0);
        let x = rng.normals(b * c.kv_heads * c.hd, 0.0, 1.0);
        let pos: Vec<f32> = c.positions.iter().map(|&p| p as f32).collect();
        for rope in [Some(THETA), None] {
            if rope.is_some() && c.hd % 2 != 0 {
                continue;
            }
            let mut want = vec![0.0; cache.len()];
            cpu::kv_cache_append(&cache, &x, &pos, d, rope, &mut want);
            let mut gb = GraphBuilder::new();
            let ci = gb.input("cache", cache_shape.clone()).unwrap();
            let xi = gb.input("x", [b, c.kv_heads * c.hd]).unwrap();
            let pi = gb.input("positions", [b]).unwrap();
            let y = gb
                .kv_cache_append("append", ci, xi, pi, c.kv_heads, c.hd, rope)
                .unwrap();
            gb.output("y", y).unwrap();
            let g = gb.finish();
            for dtype in DTYPES {
                let inputs = [
                    ("cache", cache_shape.clone(), &cache[..]),
                    ("x", vec![b, c.kv_heads * c.hd], &x[..]),
                    ("positions", vec![b], &pos[..]),
                ];
                let got = run(&dev, &g, &inputs, dtype);
                let mut base = vec![0.0; cache.len()];
                cpu::kv_cache_append(
                    &round_to(dtype, &cache),
                    &round_to(dtype, &x),
                    &pos,
                    d,
                    rope,
                    &mut base,
                );
                let what = format!(
                    "kv_cache_append {dtype} positions {:?} kv_heads {} hd {} max_len {} rope {}",
                    c.positions,
                    c.kv_heads,
                    c.hd,
                    c.max_len,
                    rope.is_some()
                );
                check(&what, dtype, &got, &want, &base);
                // The appended rows alone (the whole cache's rounding would hide their error).
                let rows: Vec<usize> = (0..b * c.kv_heads)
                    .flat_map(|bh| {
                        let start = (bh * c.max_len
                            + cpu::decode_position(pos[bh / c.kv_heads], c.max_len))
                            * c.hd;
                        start..start + c.hd
                    })
                    .collect();
                let pick = |v: &[f32]| rows.iter().map(|&e| v[e]).collect::<Vec<f32>>();
                check(
                    &format!("{what}, appended rows"),
                    dtype,
                    &pick(&got),
                    &pick(&want),
                    &pick(&base),
                );
                // Rows other than the appended ones are copied exactly.
                let r = round_to(dtype, &cache);
                let (hd, l) = (c.hd, c.max_len);
                let untouched = (0..got.len()).filter(|&e| {
                    let (row, bh) = ((e / hd) % l, e / (hd * l));
                    row != cpu::decode_position(pos[bh / c.kv_heads], l)
                });
                let bad = untouched
                    .filter(|&e| got[e].to_bits() != r[e].to_bits())
                    .count();
                assert_eq!(
                    bad, 0,
                    "{what}: {bad} cache elements outside the appended rows changed"
                );
            }
        }
    }
}

/// The decode step's CPU twins against the prefill attention: appending p + 1 tokens one by one and
/// attending with the last one gives the last row of causal attention with fused RoPE.
#[test]
fn decode_step_equals_last_row_of_prefill() {
    let mut rng = Rng::new(73);
    for &(n, heads, kv_heads, hd) in &[
        (1usize, 2usize, 1usize, 8usize),
        (7, 14, 2, 64),
        (300, 12, 2, 128),
    ] {
        let max_len = n + 3;
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let q = rng.normals(n * qw, 0.0, 1.0);
        let k = rng.normals(n * kw, 0.0, 1.0);
        let v = rng.normals(n * kw, 0.0, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let ad = AttentionDims {
            batch: 1,
            q_len: n,
            kv_len: n,
            heads,
            kv_heads,
            head_dim: hd,
            causal: true,
            scale,
        };
        let mut prefill = vec![0.0; n * qw];
        cpu::attention_ext(&q, &k, &v, None, ad, None, Some(THETA), &mut prefill);

        let d = DecodeDims {
            batch: 1,
            heads,
            kv_heads,
            head_dim: hd,
            max_len,
        };
        let (mut kc, mut vc) = (
            vec![0.0; kv_heads * max_len * hd],
            vec![0.0; kv_heads * max_len * hd],
        );
        for t in 0..n {
            let pos = [t as f32];
            let (mut k2, mut v2) = (vec![0.0; kc.len()], vec![0.0; vc.len()]);
            cpu::kv_cache_append(&kc, &k[t * kw..(t + 1) * kw], &pos, d, Some(THETA), &mut k2);
            cpu::kv_cache_append(&vc, &v[t * kw..(t + 1) * kw], &pos, d, None, &mut v2);
            (kc, vc) = (k2, v2);
        }
        let mut out = vec![0.0; qw];
        cpu::decode_attention(
            &q[(n - 1) * qw..],
            &kc,
            &vc,
            &[(n - 1) as f32],
            d,
            scale,
            Some(THETA),
            &mut out,
        );
        let e = openuni_cuda::testing::rel_l2(&out, &prefill[(n - 1) * qw..]);
        println!("decode step vs prefill last row, n {n} heads {heads}/{kv_heads} hd {hd}: rel L2 {e:.3e}");
        assert!(
            e <= 1e-5,
            "decode step differs from the prefill's last row: rel L2 {e:.3e}"
        );
    }
}

/// `KvCacheRows` (a prompt's K/V as cache rows) on the device against its CPU twin, and the twin
/// against the rotation done directly (`rope_at` over the prompt at positions 0..T, then the
/// [T, kv, hd] -> [kv, T, hd] move): prompt lengths 1, 3 and 300, kv heads 1 and 2, hd 64 and 40.
#[test]
fn kv_cache_rows_matches_cpu() {
    let mut rng = Rng::new(73);
    let dev = device_or_skip();
    for (batch, tokens, kv, hd) in [(1, 1, 2, 64), (2, 3, 1, 40), (1, 300, 2, 64)] {
        let x = rng.normals(batch * tokens * kv * hd, 0.0, 1.0);
        for rope in [Some(THETA), None] {
            let mut want = vec![0.0; x.len()];
            cpu::kv_cache_rows(&x, batch, tokens, kv, hd, rope, &mut want);
            let positions: Vec<usize> = (0..tokens).collect();
            for b in 0..batch {
                let xb = &x[b * tokens * kv * hd..(b + 1) * tokens * kv * hd];
                let mut r = xb.to_vec();
                if let Some(theta) = rope {
                    cpu::rope_at(xb, &positions, kv, hd, theta, &mut r);
                }
                for (t, h, d) in (0..tokens)
                    .flat_map(|t| (0..kv).flat_map(move |h| (0..hd).map(move |d| (t, h, d))))
                {
                    let got = want[((b * kv + h) * tokens + t) * hd + d];
                    assert_eq!(
                        got.to_bits(),
                        r[(t * kv + h) * hd + d].to_bits(),
                        "kv_cache_rows twin: b {b} t {t} h {h} d {d}"
                    );
                }
            }
            let Some(dev) = &dev else { continue };
            let mut gb = GraphBuilder::new();
            let xi = gb.input("x", [batch, tokens, kv * hd]).unwrap();
            let y = gb.kv_cache_rows("rows", xi, kv, hd, rope).unwrap();
            gb.output("y", y).unwrap();
            let g = gb.finish();
            for dtype in DTYPES {
                let got = run(
                    dev,
                    &g,
                    &[("x", vec![batch, tokens, kv * hd], &x[..])],
                    dtype,
                );
                let mut base = vec![0.0; x.len()];
                cpu::kv_cache_rows(&round_to(dtype, &x), batch, tokens, kv, hd, rope, &mut base);
                check(&format!("kv_cache_rows {dtype} batch {batch} tokens {tokens} kv {kv} hd {hd} rope {}", rope.is_some()), dtype, &got, &want, &base);
            }
        }
    }
}

/// `KvCacheAppend` on an executor state (`GraphBuilder::state`) writes in place and the cache
/// persists across runs: three runs at positions 0, 1, 2 leave the three appended rows (and zeros
/// elsewhere), on the CPU executor and on the device in both storage dtypes, with the attention
/// of the last run reading all three rows.
#[test]
fn kv_cache_append_on_a_state_persists_across_runs() {
    let (b, kv, hd, max_len) = (2, 2, 64, 5);
    let mut gb = GraphBuilder::new();
    let cache = gb.state("k_cache", [b, kv, max_len, hd]).unwrap();
    let xi = gb.input("x", [b, kv * hd]).unwrap();
    let pi = gb.input("positions", [b]).unwrap();
    let qi = gb.input("q", [b, 2 * kv * hd]).unwrap();
    let c2 = gb
        .kv_cache_append("append", cache, xi, pi, kv, hd, Some(THETA))
        .unwrap();
    let y = gb
        .decode_attention("attn", qi, c2, c2, pi, 2 * kv, kv, hd, 0.125, Some(THETA))
        .unwrap();
    gb.output("y", y).unwrap();
    let g = gb.finish();
    let mut rng = Rng::new(73);
    let xs: Vec<Vec<f32>> = (0..3).map(|_| rng.normals(b * kv * hd, 0.0, 1.0)).collect();
    let q = rng.normals(b * 2 * kv * hd, 0.0, 1.0);
    // The expected cache and last output from the CPU twins, appended one run at a time.
    let d = DecodeDims {
        batch: b,
        heads: kv,
        kv_heads: kv,
        head_dim: hd,
        max_len,
    };
    let mut want = vec![0f32; b * kv * max_len * hd];
    for (p, x) in xs.iter().enumerate() {
        cpu::kv_cache_write(x, &[p as f32; 2], d, Some(THETA), &mut want);
    }
    let mut want_y = vec![0f32; q.len()];
    cpu::decode_attention(
        &q,
        &want,
        &want,
        &[2.0; 2],
        DecodeDims { heads: 2 * kv, ..d },
        0.125,
        Some(THETA),
        &mut want_y,
    );
    let inputs = |p: usize| -> HashMap<String, HostTensor> {
        HashMap::from([
            (
                "x".to_string(),
                HostTensor::from_f32([b, kv * hd], xs[p].clone()).unwrap(),
            ),
            (
                "positions".to_string(),
                HostTensor::from_f32([b], vec![p as f32; b]).unwrap(),
            ),
            (
                "q".to_string(),
                HostTensor::from_f32([b, 2 * kv * hd], q.clone()).unwrap(),
            ),
        ])
    };
    let mut cpu_ex = openuni_cpu::CpuExecutor::new(&g, &HashMap::new(), false).unwrap();
    let mut y = vec![];
    for p in 0..3 {
        y = cpu_ex.run(&inputs(p)).unwrap()["y"].to_f32_vec();
    }
    assert_eq!(
        cpu_ex.read_state("k_cache", 0, want.len()).unwrap(),
        want,
        "cpu executor state"
    );
    assert_eq!(y, want_y, "cpu executor attention over the state");
    let Some(dev) = device_or_skip() else { return };
    for dtype in DTYPES {
        let mut ex = CudaExecutor::new(&dev, &g, &HashMap::new(), dtype, false).unwrap();
        for p in 0..3 {
            y = ex.run(&inputs(p)).unwrap()["y"].to_f32_vec();
        }
        let got = ex.read_state("k_cache", 0, want.len()).unwrap();
        check(
            &format!("state cache {dtype}"),
            dtype,
            &got,
            &want,
            &round_to(dtype, &want),
        );
        assert!(
            got.chunks(hd)
                .enumerate()
                .all(|(r, row)| r % max_len < 3 || row.iter().all(|&v| v == 0.0)),
            "{dtype}: rows past the appended ones are not zero"
        );
        check(
            &format!("attention over the state {dtype}"),
            dtype,
            &y,
            &want_y,
            &want_y,
        );
        // write_state then read_state round-trips (bf16: values that bf16 holds exactly).
        ex.write_state("k_cache", hd, &[0.5; 64]).unwrap();
        assert_eq!(ex.read_state("k_cache", hd, 64).unwrap(), vec![0.5; 64]);
        assert!(ex
            .write_state("k_cache", want.len() - 1, &[0.0; 2])
            .is_err());
        assert!(ex.write_state("x", 0, &[0.0]).is_err());
    }
}
