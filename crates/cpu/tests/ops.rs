//! The reference ops against independent computations: textbook values, naive loops, and
//! identities (GQA = attention with repeated key/value heads).

use openuni_cpu::ops::{self, AttentionDims};
use openuni_graph::UnaryFn;
use rand::{Rng, SeedableRng};

fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

fn close(a: &[f32], b: &[f32], tol: f32) {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

#[test]
fn activations_match_textbook_values() {
    // Values from the closed forms at x = 1 and x = -0.5 (computed independently in f64).
    assert!((ops::silu(1.0) - 0.731_058_6).abs() < 1e-6);
    assert!((ops::gelu_erf(1.0) - 0.841_344_75).abs() < 1e-6);
    assert!((ops::gelu_tanh(1.0) - 0.841_191_99).abs() < 1e-6);
    assert!((ops::gelu_erf(-0.5) - -0.154_268_68).abs() < 1e-6);
    let mut y = [0.0; 3];
    ops::unary(UnaryFn::Relu, &[-1.0, 0.0, 2.0], &mut y);
    assert_eq!(y, [0.0, 0.0, 2.0]);
}

#[test]
fn rmsnorm_and_layernorm_by_hand() {
    // x = [3, 4]: mean square 12.5.
    let mut y = [0.0; 2];
    ops::rmsnorm(&[3.0, 4.0], &[1.0, 2.0], Some(&[0.5, 0.0]), 0.0, 2, &mut y);
    let r = 12.5f32.sqrt();
    close(&y, &[3.0 / r + 0.5, 8.0 / r], 1e-6);
    // LayerNorm of [1, 3]: mean 2, var 1 -> [-1, 1]; then modulation (1 + 0.5) and shift 1.
    let m = ops::ModulationRef {
        scale: &[0.5, 0.5],
        shift: &[1.0, 1.0],
        tokens: 1,
    };
    ops::layernorm(
        &[1.0, 3.0],
        Some(&[2.0, 2.0]),
        Some(&[0.0, 1.0]),
        0.0,
        2,
        Some(m),
        &mut y,
    );
    close(&y, &[(-2.0) * 1.5 + 1.0, 3.0 * 1.5 + 1.0], 1e-6);
}

#[test]
fn linear_matches_naive_loop() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let (rows, k, n) = (7, 13, 5);
    let (x, w, b) = (
        rand_vec(&mut rng, rows * k),
        rand_vec(&mut rng, n * k),
        rand_vec(&mut rng, n),
    );
    let mut y = vec![0.0; rows * n];
    ops::linear(&x, &w, Some(&b), rows, k, n, &mut y);
    let mut naive = vec![0.0; rows * n];
    for r in 0..rows {
        for o in 0..n {
            naive[r * n + o] = b[o] + (0..k).map(|i| x[r * k + i] * w[o * k + i]).sum::<f32>();
        }
    }
    close(&y, &naive, 1e-5);
}

#[test]
fn gated_add_broadcasts_per_sample() {
    // 2 samples x 2 tokens x 2 channels.
    let x = [1.0; 8];
    let y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let gate = [1.0, 0.0, 0.0, 2.0];
    let mut out = [0.0; 8];
    ops::gated_add(&x, &gate, &y, 2, 2, &mut out);
    assert_eq!(out, [2.0, 1.0, 4.0, 1.0, 1.0, 13.0, 1.0, 17.0]);
}

#[test]
fn attention_gqa_equals_repeated_heads_and_causal_first_row_is_v0() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let (b, n, hd) = (2, 5, 4);
    let q = rand_vec(&mut rng, b * n * 4 * hd);
    let k = rand_vec(&mut rng, b * n * 2 * hd);
    let v = rand_vec(&mut rng, b * n * 2 * hd);
    let d = AttentionDims {
        batch: b,
        q_len: n,
        kv_len: n,
        heads: 4,
        kv_heads: 2,
        head_dim: hd,
        causal: true,
        scale: 0.5,
    };
    let mut gqa = vec![0.0; q.len()];
    ops::attention(&q, &k, &v, None, d, &mut gqa);
    // Repeat each kv head twice (repeat_kv) and run plain multi-head attention.
    let rep = |t: &[f32]| -> Vec<f32> {
        t.chunks_exact(2 * hd)
            .flat_map(|row| [&row[..hd], &row[..hd], &row[hd..], &row[hd..]].concat())
            .collect()
    };
    let mut mha = vec![0.0; q.len()];
    ops::attention(
        &q,
        &rep(&k),
        &rep(&v),
        None,
        AttentionDims { kv_heads: 4, ..d },
        &mut mha,
    );
    close(&gqa, &mha, 1e-6);
    // Causal: the first query sees only the first key, so its output is v[0] of its kv head.
    for h in 0..4 {
        close(
            &gqa[h * hd..(h + 1) * hd],
            &v[(h / 2) * hd..(h / 2 + 1) * hd],
            1e-6,
        );
    }
}

/// The fused DCUpBlock2d op is bit-identical to upsample2x -> conv2d -> + pixel_shuffle_shortcut,
/// on a non-square grid whose upsampled size crosses conv2d's 1024-pixel im2col block.
#[test]
fn upsample_conv2d_equals_the_unfused_ops() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for &(b, h, w, cin, cout, shortcut) in &[
        (2usize, 3usize, 5usize, 8usize, 4usize, true),
        (1, 17, 31, 4, 4, true),
        (1, 2, 3, 6, 5, false),
    ] {
        let x = rand_vec(&mut rng, b * h * w * cin);
        let wt = rand_vec(&mut rng, cout * cin * 9);
        let bias = rand_vec(&mut rng, cout);
        let n = b * 4 * h * w * cout;
        let mut up = vec![0.0; 4 * b * h * w * cin];
        ops::upsample2x(&x, b, h, w, cin, &mut up);
        let mut main = vec![0.0; n];
        ops::conv2d(
            &up,
            &wt,
            Some(&bias),
            b,
            2 * h,
            2 * w,
            cin,
            cout,
            3,
            &mut main,
        );
        let want = if shortcut {
            let mut sc = vec![0.0; n];
            ops::pixel_shuffle_shortcut(&x, b, h, w, cin, cout, &mut sc);
            let mut o = vec![0.0; n];
            ops::add(&main, &sc, &mut o);
            o
        } else {
            main
        };
        let mut got = vec![0.0; n];
        ops::upsample_conv2d(&x, &wt, Some(&bias), b, h, w, cin, cout, shortcut, &mut got);
        assert_eq!(
            got, want,
            "[{b}, {h}x{w}, {cin}] -> {cout} shortcut={shortcut}"
        );
    }
}

#[test]
fn rmsnorm_residual_equals_rmsnorm_then_add() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for (rows, cols) in [(1, 1), (7, 13), (40, 128)] {
        let (x, r) = (
            rand_vec(&mut rng, rows * cols),
            rand_vec(&mut rng, rows * cols),
        );
        let (w, b) = (rand_vec(&mut rng, cols), rand_vec(&mut rng, cols));
        for bias in [None, Some(&b[..])] {
            let (mut n, mut want, mut got) = (
                vec![0.0; rows * cols],
                vec![0.0; rows * cols],
                vec![0.0; rows * cols],
            );
            ops::rmsnorm(&x, &w, bias, 1e-5, cols, &mut n);
            ops::add(&r, &n, &mut want);
            ops::rmsnorm_residual(&x, &w, bias, &r, 1e-5, cols, &mut got);
            assert_eq!(got, want, "[{rows}, {cols}] bias={}", bias.is_some());
        }
    }
}

/// Packed segments [a, b, c] (causal, GQA, fused RoPE) equal running each sequence on its own:
/// the separate `rope` op (positions 0..len) then plain causal attention, segment by segment.
#[test]
fn packed_segments_with_rope_equal_separate_sequences() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (heads, kv_heads, hd, theta) = (4, 2, 16, 10000.0);
    let segs = [5usize, 1, 9];
    let t: usize = segs.iter().sum();
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let (q, k, v) = (
        rand_vec(&mut rng, t * qw),
        rand_vec(&mut rng, t * kw),
        rand_vec(&mut rng, t * kw),
    );
    for (causal, rope) in [(true, Some(theta)), (false, Some(theta)), (true, None)] {
        let d = AttentionDims {
            batch: 1,
            q_len: t,
            kv_len: t,
            heads,
            kv_heads,
            head_dim: hd,
            causal,
            scale: 0.3,
        };
        let mut packed = vec![0.0; t * qw];
        ops::attention_ext(&q, &k, &v, None, d, Some(&segs), rope, &mut packed);
        let mut s = 0;
        for &len in &segs {
            let (mut qs, mut ks) = (
                q[s * qw..(s + len) * qw].to_vec(),
                k[s * kw..(s + len) * kw].to_vec(),
            );
            if let Some(th) = rope {
                let (q0, k0) = (qs.clone(), ks.clone());
                ops::rope(&q0, 1, len, heads, hd, th, &mut qs);
                ops::rope(&k0, 1, len, kv_heads, hd, th, &mut ks);
            }
            let ds = AttentionDims {
                q_len: len,
                kv_len: len,
                ..d
            };
            let mut want = vec![0.0; len * qw];
            ops::attention(&qs, &ks, &v[s * kw..(s + len) * kw], None, ds, &mut want);
            close(&packed[s * qw..(s + len) * qw], &want, 1e-6);
            s += len;
        }
        // The segments matter: without them the first row of segment 2 would see segment 1.
        let mut whole = vec![0.0; t * qw];
        ops::attention_ext(&q, &k, &v, None, d, None, rope, &mut whole);
        assert!(whole[6 * qw..7 * qw]
            .iter()
            .zip(&packed[6 * qw..7 * qw])
            .any(|(a, b)| (a - b).abs() > 1e-3));
    }
}

/// Fused RoPE equals the `rope` op on q and k followed by attention (B = 2, position t in every row).
#[test]
fn fused_rope_equals_rope_then_attention() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let (b, t, heads, kv_heads, hd, theta) = (2, 23, 6, 2, 8, 1e6);
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let (q, k, v) = (
        rand_vec(&mut rng, b * t * qw),
        rand_vec(&mut rng, b * t * kw),
        rand_vec(&mut rng, b * t * kw),
    );
    let d = AttentionDims {
        batch: b,
        q_len: t,
        kv_len: t,
        heads,
        kv_heads,
        head_dim: hd,
        causal: true,
        scale: 0.35,
    };
    let mut fused = vec![0.0; q.len()];
    ops::attention_ext(&q, &k, &v, None, d, None, Some(theta), &mut fused);
    let (mut qr, mut kr) = (vec![0.0; q.len()], vec![0.0; k.len()]);
    ops::rope(&q, b, t, heads, hd, theta, &mut qr);
    ops::rope(&k, b, t, kv_heads, hd, theta, &mut kr);
    let mut want = vec![0.0; q.len()];
    ops::attention(&qr, &kr, &v, None, d, &mut want);
    close(&fused, &want, 1e-6);
    // And RoPE really changed the result.
    let mut plain = vec![0.0; q.len()];
    ops::attention(&q, &k, &v, None, d, &mut plain);
    assert!(plain.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3));
}
