//! Every fast op (`openuni_cpu::fast`) against its plain twin (`openuni_cpu::ops`) on odd shapes:
//! sizes that are not multiples of any block or vector width, blocks that end mid-way, several
//! tasks per op. Relative L2 <= 1e-5 (f32 accumulation against the twins' f64), or exact where
//! the fast op runs the twin on parts.

use openuni_cpu::ops::{AttentionDims, ModulationRef};
use openuni_cpu::{fast, ops};
use openuni_graph::UnaryFn;
use rand::{Rng, SeedableRng};

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn rand_vec(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

/// Relative L2 error of `got` against `want`; also fails on any non-finite value.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: non-finite output"
    );
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let rel = (num / den.max(1e-30)).sqrt();
    assert!(rel <= tol, "{what}: relative L2 {rel:.2e} > {tol:.0e}");
}

#[test]
fn linear_matches_twin() {
    let mut r = rng(1);
    for (rows, k, n) in [(1, 1, 1), (7, 13, 5), (67, 129, 33), (300, 70, 9)] {
        let (x, w, b) = (
            rand_vec(&mut r, rows * k),
            rand_vec(&mut r, n * k),
            rand_vec(&mut r, n),
        );
        for bias in [None, Some(&b[..])] {
            let (mut f, mut p) = (vec![7.0; rows * n], vec![0.0; rows * n]);
            fast::linear(&x, &w, bias, rows, k, n, &mut f);
            ops::linear(&x, &w, bias, rows, k, n, &mut p);
            assert_close(
                &format!("linear {rows}x{k}x{n} bias {}", bias.is_some()),
                &f,
                &p,
                1e-6,
            );
        }
    }
}

#[test]
fn norms_match_twins() {
    let mut r = rng(2);
    for (rows, cols, tokens) in [(1, 3, 1), (37, 61, 37), (600, 45, 200)] {
        let x: Vec<f32> = rand_vec(&mut r, rows * cols)
            .iter()
            .map(|v| v * 3.0 + 1.0)
            .collect();
        let (w, b) = (rand_vec(&mut r, cols), rand_vec(&mut r, cols));
        let samples = rows / tokens;
        let (scale, shift) = (
            rand_vec(&mut r, samples * cols),
            rand_vec(&mut r, samples * cols),
        );
        let (mut f, mut p) = (vec![0.0; rows * cols], vec![0.0; rows * cols]);
        fast::rmsnorm(&x, &w, Some(&b), 1e-6, cols, &mut f);
        ops::rmsnorm(&x, &w, Some(&b), 1e-6, cols, &mut p);
        assert_eq!(f, p, "rmsnorm runs its twin on row blocks");
        let res = rand_vec(&mut r, rows * cols);
        fast::rmsnorm_residual(&x, &w, Some(&b), &res, 1e-6, cols, &mut f);
        ops::rmsnorm_residual(&x, &w, Some(&b), &res, 1e-6, cols, &mut p);
        assert_eq!(f, p, "rmsnorm_residual runs its twin on row blocks");
        for (wo, bo, m) in [
            (None, None, false),
            (Some(&w[..]), Some(&b[..]), false),
            (Some(&w[..]), None, true),
        ] {
            let m = m.then_some(ModulationRef {
                scale: &scale,
                shift: &shift,
                tokens,
            });
            fast::layernorm(&x, wo, bo, 1e-5, cols, m, &mut f);
            ops::layernorm(&x, wo, bo, 1e-5, cols, m, &mut p);
            assert_close(&format!("layernorm {rows}x{cols}"), &f, &p, 1e-5);
        }
    }
}

#[test]
fn elementwise_ops_match_twins() {
    let mut r = rng(3);
    let (rows, cols, tokens) = (91, 389, 13); // 35k elements: three tasks, the last one partial
    let n = rows * cols;
    let (a, b, g) = (
        rand_vec(&mut r, n),
        rand_vec(&mut r, n),
        rand_vec(&mut r, rows / tokens * cols),
    );
    let (mut f, mut p) = (vec![0.0; n], vec![0.0; n]);
    // SiLU and tanh-GELU on the vectorised exp: close; the others run the twin: exact.
    let wide: Vec<f32> = a.iter().map(|v| v * 50.0).collect(); // into both tails of the activations
    for u in [UnaryFn::Silu, UnaryFn::GeluTanh] {
        for x in [&a, &wide] {
            fast::unary(u, x, &mut f);
            ops::unary(u, x, &mut p);
            assert_close(&format!("{u:?}"), &f, &p, 1e-6);
        }
    }
    for u in [UnaryFn::GeluErf, UnaryFn::Relu] {
        fast::unary(u, &a, &mut f);
        ops::unary(u, &a, &mut p);
        assert_eq!(f, p, "{u:?}");
    }
    fast::add(&a, &b, &mut f);
    ops::add(&a, &b, &mut p);
    assert_eq!(f, p, "add");
    fast::swiglu(&a, &b, &mut f);
    ops::swiglu(&a, &b, &mut p);
    assert_close("swiglu", &f, &p, 1e-6);
    fast::gated_add(&a, &g, &b, tokens, cols, &mut f);
    ops::gated_add(&a, &g, &b, tokens, cols, &mut p);
    assert_eq!(f, p, "gated_add");
}

fn attention_case(r: &mut rand::rngs::StdRng, d: AttentionDims, masked: bool) {
    let (qn, kn) = (
        d.batch * d.q_len * d.heads * d.head_dim,
        d.batch * d.kv_len * d.kv_heads * d.head_dim,
    );
    let (q, k, v) = (rand_vec(r, qn), rand_vec(r, kn), rand_vec(r, kn));
    let mask: Vec<f32> = (0..d.batch * d.kv_len)
        .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 })
        .collect();
    let m = masked.then_some(&mask[..]);
    let (mut f, mut p) = (vec![0.0; qn], vec![0.0; qn]);
    fast::attention(&q, &k, &v, m, d, &mut f);
    ops::attention(&q, &k, &v, m, d, &mut p);
    assert_close(&format!("attention {d:?} masked {masked}"), &f, &p, 1e-5);
}

#[test]
fn attention_matches_twin() {
    let mut r = rng(4);
    let base = AttentionDims {
        batch: 2,
        q_len: 1,
        kv_len: 1,
        heads: 1,
        kv_heads: 1,
        head_dim: 8,
        causal: false,
        scale: 0.35,
    };
    // Odd lengths across the 64-query and 256-key blocks, GQA, causal with fewer queries than keys.
    attention_case(
        &mut r,
        AttentionDims {
            q_len: 3,
            kv_len: 5,
            ..base
        },
        false,
    );
    attention_case(
        &mut r,
        AttentionDims {
            q_len: 131,
            kv_len: 300,
            heads: 6,
            kv_heads: 2,
            head_dim: 9,
            ..base
        },
        true,
    );
    attention_case(
        &mut r,
        AttentionDims {
            q_len: 70,
            kv_len: 70,
            heads: 4,
            kv_heads: 2,
            head_dim: 17,
            causal: true,
            ..base
        },
        false,
    );
    attention_case(
        &mut r,
        AttentionDims {
            batch: 1,
            q_len: 5,
            kv_len: 261,
            heads: 3,
            kv_heads: 1,
            causal: true,
            ..base
        },
        true,
    );
    attention_case(
        &mut r,
        AttentionDims {
            batch: 1,
            q_len: 260,
            kv_len: 260,
            heads: 2,
            kv_heads: 2,
            causal: true,
            ..base
        },
        true,
    );
}

#[test]
fn attention_ext_with_segments_and_rope_matches_twin() {
    let mut r = rng(5);
    let segs = [5usize, 70, 1, 11];
    let t: usize = segs.iter().sum();
    let d = AttentionDims {
        batch: 1,
        q_len: t,
        kv_len: t,
        heads: 4,
        kv_heads: 2,
        head_dim: 6,
        causal: true,
        scale: 0.4,
    };
    let (q, k, v) = (
        rand_vec(&mut r, t * 24),
        rand_vec(&mut r, t * 12),
        rand_vec(&mut r, t * 12),
    );
    let (mut f, mut p) = (vec![0.0; t * 24], vec![0.0; t * 24]);
    for (segments, rope) in [
        (Some(&segs[..]), Some(10000.0)),
        (None, Some(100.0)),
        (Some(&segs[..]), None),
    ] {
        fast::attention_ext(&q, &k, &v, None, d, segments, rope, &mut f);
        ops::attention_ext(&q, &k, &v, None, d, segments, rope, &mut p);
        assert_close(
            &format!(
                "attention_ext segments {} rope {rope:?}",
                segments.is_some()
            ),
            &f,
            &p,
            1e-5,
        );
    }
}

#[test]
fn multiscale_linear_attention_matches_twin() {
    let mut r = rng(13);
    // Scales of 2 and 1 groups (uneven), and DC-AE's two equal scales.
    for (b, n, hd, groups) in [
        (1, 1, 2, vec![2, 1]),
        (2, 300, 8, vec![3, 3]),
        (1, 70, 32, vec![1, 2, 1]),
    ] {
        let xs: Vec<Vec<f32>> = groups
            .iter()
            .map(|g| rand_vec(&mut r, b * n * g * 3 * hd))
            .collect();
        let parts: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
        let widths: Vec<usize> = groups.iter().map(|g| g * 3 * hd).collect();
        let c = groups.iter().sum::<usize>() * hd;
        let (mut f, mut p) = (vec![7.0; b * n * c], vec![0.0; b * n * c]);
        fast::multiscale_linear_attention(&parts, &widths, b, n, hd, &mut f);
        ops::multiscale_linear_attention(&parts, &widths, b, n, hd, &mut p);
        assert_close(
            &format!("multiscale_linear_attention {b}x{n} hd {hd} groups {groups:?}"),
            &f,
            &p,
            1e-5,
        );
    }
}

#[test]
fn linear_attention_matches_twins() {
    let mut r = rng(6);
    for (b, n, heads, hd) in [(1, 1, 1, 3), (2, 300, 3, 7), (1, 517, 2, 32)] {
        let c = heads * hd;
        let (q, k, v) = (
            rand_vec(&mut r, b * n * c),
            rand_vec(&mut r, b * n * c),
            rand_vec(&mut r, b * n * c),
        );
        let (mut f, mut p) = (vec![0.0; b * n * c], vec![0.0; b * n * c]);
        fast::linear_attention(&q, &k, &v, b, n, heads, hd, &mut f);
        ops::linear_attention(&q, &k, &v, b, n, heads, hd, &mut p);
        assert_close(
            &format!("linear_attention {b}x{n}x{heads}x{hd}"),
            &f,
            &p,
            1e-5,
        );
        let qkv = rand_vec(&mut r, b * n * 3 * c);
        fast::packed_linear_attention(&qkv, b, n, heads, hd, &mut f);
        ops::packed_linear_attention(&qkv, b, n, heads, hd, &mut p);
        assert_close(
            &format!("packed_linear_attention {b}x{n}x{heads}x{hd}"),
            &f,
            &p,
            1e-5,
        );
    }
}

/// The key-normed packed linear attention (SANA1.5's attn1, `Op::PackedLinearAttention` with
/// `key_norm`), plain and fast, against the unfused composition: unpack q, k, v, `rmsnorm` of k
/// across all heads, then the separate-tensor `linear_attention`. Relative L2 <= 1e-4.
#[test]
fn packed_linear_attention_key_norm_matches_unfused() {
    let mut r = rng(16);
    for (b, n, heads, hd) in [(1, 1, 1, 3), (2, 300, 3, 7), (1, 517, 2, 32), (2, 65, 5, 8)] {
        let c = heads * hd;
        let qkv = rand_vec(&mut r, b * n * 3 * c);
        // Norm weight with both signs (a negative weight flips which keys the ReLU keeps).
        let w = rand_vec(&mut r, c);
        let eps = 1e-6;
        let (mut q, mut k, mut v) = (
            vec![0.0; b * n * c],
            vec![0.0; b * n * c],
            vec![0.0; b * n * c],
        );
        for row in 0..b * n {
            for h in 0..heads {
                let src = &qkv[row * 3 * c + h * 3 * hd..][..3 * hd];
                q[row * c + h * hd..][..hd].copy_from_slice(&src[..hd]);
                k[row * c + h * hd..][..hd].copy_from_slice(&src[hd..2 * hd]);
                v[row * c + h * hd..][..hd].copy_from_slice(&src[2 * hd..]);
            }
        }
        let mut kn = vec![0.0; b * n * c];
        ops::rmsnorm(&k, &w, None, eps, c, &mut kn);
        let mut want = vec![0.0; b * n * c];
        ops::linear_attention(&q, &kn, &v, b, n, heads, hd, &mut want);
        let (mut f, mut p) = (vec![0.0; b * n * c], vec![0.0; b * n * c]);
        ops::packed_linear_attention_key_norm(&qkv, &w, eps, b, n, heads, hd, &mut p);
        fast::packed_linear_attention_key_norm(&qkv, &w, eps, b, n, heads, hd, &mut f);
        assert_close(
            &format!("packed_linear_attention_key_norm (plain) {b}x{n}x{heads}x{hd}"),
            &p,
            &want,
            1e-4,
        );
        assert_close(
            &format!("packed_linear_attention_key_norm (fast) {b}x{n}x{heads}x{hd}"),
            &f,
            &want,
            1e-4,
        );
        // The norm matters: without it the result is far from the composition.
        ops::packed_linear_attention(&qkv, b, n, heads, hd, &mut p);
        let num: f64 = p
            .iter()
            .zip(&want)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        assert!(
            (num / den).sqrt() > 1e-2,
            "{b}x{n}x{heads}x{hd}: the key norm changed nothing"
        );
    }
}

#[test]
fn depthwise_convs_match_twins() {
    let mut r = rng(7);
    // 70 and 130 channels: whole 32-channel register blocks and a tail (GLU: 35 and 65 out).
    for (b, h, w, c, kernel) in [
        (1, 1, 1, 2, 3),
        (2, 5, 7, 6, 3),
        (1, 9, 4, 34, 5),
        (1, 3, 2, 4, 1),
        (2, 4, 3, 70, 3),
        (1, 2, 5, 130, 3),
    ] {
        let x = rand_vec(&mut r, b * h * w * c);
        let (wt, bias) = (rand_vec(&mut r, c * kernel * kernel), rand_vec(&mut r, c));
        for bi in [None, Some(&bias[..])] {
            let (mut f, mut p) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            fast::depthwise_conv2d(&x, &wt, bi, b, h, w, c, kernel, &mut f);
            ops::depthwise_conv2d(&x, &wt, bi, b, h, w, c, kernel, &mut p);
            assert_close(
                &format!("depthwise {b}x{h}x{w}x{c} k{kernel}"),
                &f,
                &p,
                1e-6,
            );
            let (mut f, mut p) = (vec![0.0; x.len() / 2], vec![0.0; x.len() / 2]);
            fast::depthwise_conv_glu(&x, &wt, bi, b, h, w, c, kernel, &mut f);
            ops::depthwise_conv_glu(&x, &wt, bi, b, h, w, c, kernel, &mut p);
            assert_close(
                &format!("depthwise_conv_glu {b}x{h}x{w}x{c} k{kernel}"),
                &f,
                &p,
                1e-6,
            );
        }
    }
}

#[test]
fn convs_match_twins() {
    let mut r = rng(8);
    // 2·37·29 = 2146 pixels: blocks of 1024 split mid-row, several blocks per image (the
    // block-parallel path); 5x3 is one small block (the GEMM-parallel path); 2x3 with 9 output
    // channels keeps the weights' own layout (fewer pixels than channels). Widths from 64 on run
    // the shifted-GEMM path (`conv_taps`): 2x37x67 in bands of 15 rows, the last one short (the
    // band-parallel path), 1x3x70 one band (the GEMM-parallel path), 5x5 taps on 1x20x64.
    for (b, h, w, cin, cout, kernel) in [
        (2, 37, 29, 5, 7, 3),
        (1, 5, 3, 11, 4, 3),
        (1, 4, 6, 3, 2, 1),
        (1, 40, 30, 2, 3, 5),
        (1, 2, 3, 3, 9, 3),
        (2, 37, 67, 6, 5, 3),
        (1, 3, 70, 4, 3, 3),
        (1, 20, 64, 3, 4, 5),
    ] {
        let x = rand_vec(&mut r, b * h * w * cin);
        let (wt, bias) = (
            rand_vec(&mut r, cout * cin * kernel * kernel),
            rand_vec(&mut r, cout),
        );
        for (bi, silu) in [(None, false), (Some(&bias[..]), true)] {
            let (mut f, mut p) = (vec![0.0; b * h * w * cout], vec![0.0; b * h * w * cout]);
            fast::conv2d(&x, &wt, bi, b, h, w, cin, cout, kernel, silu, &mut f);
            ops::conv2d(&x, &wt, bi, b, h, w, cin, cout, kernel, &mut p);
            if silu {
                p.iter_mut().for_each(|v| *v = ops::silu(*v));
            }
            assert_close(
                &format!("conv2d {b}x{h}x{w} {cin}->{cout} k{kernel}"),
                &f,
                &p,
                1e-6,
            );
        }
    }
    for (b, h, w, cin, cout, shortcut) in [
        (2, 17, 19, 8, 4, true),
        (1, 3, 5, 6, 3, false),
        (1, 2, 1, 4, 8, true),
        (1, 1, 1, 4, 8, true),
        (2, 11, 33, 8, 4, true),
    ] {
        let x = rand_vec(&mut r, b * h * w * cin);
        let (wt, bias) = (rand_vec(&mut r, cout * cin * 9), rand_vec(&mut r, cout));
        let (mut f, mut p) = (
            vec![0.0; b * 4 * h * w * cout],
            vec![0.0; b * 4 * h * w * cout],
        );
        fast::upsample_conv2d(&x, &wt, Some(&bias), b, h, w, cin, cout, shortcut, &mut f);
        ops::upsample_conv2d(&x, &wt, Some(&bias), b, h, w, cin, cout, shortcut, &mut p);
        assert_close(
            &format!("upsample_conv2d {b}x{h}x{w} {cin}->{cout} shortcut {shortcut}"),
            &f,
            &p,
            1e-6,
        );
    }
}

/// Standard normal samples (Box-Muller), scaled by `std`.
fn normal_vec(rng: &mut rand::rngs::StdRng, n: usize, std: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (
                rng.random_range(f32::EPSILON..1.0),
                rng.random_range(0.0..1.0),
            );
            std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

#[test]
fn winograd_convs_match_twins() {
    let mut r = rng(14);
    // The Winograd path forced on (whatever `WINOGRAD_MIN_CHANNELS` says): 1-pixel, 1-row and
    // 1-column images (tiles past both edges), odd and even heights and widths (a last tile row
    // or column half outside), channel counts off any vector width; 2x37x67 is three bands of 7
    // tile rows per image, six in all (the band-parallel path), 1x3x70 one band (the
    // GEMM-parallel path). Tolerance 1e-6 as the GEMM paths: F(2x2, 3x3)'s transforms add only
    // a few f32 roundings (see `winograd_error_on_decoder_like_convs`).
    for (b, h, w, cin, cout) in [
        (1, 1, 1, 3, 2),
        (1, 1, 7, 5, 4),
        (1, 6, 1, 4, 3),
        (2, 5, 7, 17, 9),
        (1, 8, 6, 33, 20),
        (2, 37, 67, 6, 5),
        (1, 3, 70, 4, 3),
    ] {
        let x = rand_vec(&mut r, b * h * w * cin);
        let (wt, bias) = (rand_vec(&mut r, cout * cin * 9), rand_vec(&mut r, cout));
        for (bi, silu) in [
            (None, false),
            (Some(&bias[..]), true),
            (Some(&bias[..]), false),
        ] {
            let (mut f, mut p) = (vec![7.0; b * h * w * cout], vec![0.0; b * h * w * cout]);
            fast::conv2d_on(
                fast::ConvPath::Winograd,
                &x,
                &wt,
                bi,
                b,
                h,
                w,
                cin,
                cout,
                3,
                silu,
                &mut f,
            );
            ops::conv2d(&x, &wt, bi, b, h, w, cin, cout, 3, &mut p);
            if silu {
                p.iter_mut().for_each(|v| *v = ops::silu(*v));
            }
            assert_close(
                &format!(
                    "winograd conv2d {b}x{h}x{w} {cin}->{cout} bias {} silu {silu}",
                    bi.is_some()
                ),
                &f,
                &p,
                1e-6,
            );
        }
    }
    for (b, h, w, cin, cout, shortcut) in [
        (2, 17, 19, 8, 4, true),
        (1, 3, 5, 6, 3, false),
        (1, 1, 1, 4, 8, true),
        (2, 11, 33, 8, 4, true),
    ] {
        let x = rand_vec(&mut r, b * h * w * cin);
        let (wt, bias) = (rand_vec(&mut r, cout * cin * 9), rand_vec(&mut r, cout));
        let (mut f, mut p) = (
            vec![7.0; b * 4 * h * w * cout],
            vec![0.0; b * 4 * h * w * cout],
        );
        fast::upsample_conv2d_on(
            fast::ConvPath::Winograd,
            &x,
            &wt,
            Some(&bias),
            b,
            h,
            w,
            cin,
            cout,
            shortcut,
            &mut f,
        );
        ops::upsample_conv2d(&x, &wt, Some(&bias), b, h, w, cin, cout, shortcut, &mut p);
        assert_close(
            &format!("winograd upsample_conv2d {b}x{h}x{w} {cin}->{cout} shortcut {shortcut}"),
            &f,
            &p,
            1e-6,
        );
    }
}

#[test]
fn winograd_conv_is_batch_invariant() {
    // An image's output alone and next to another image, bit for bit (the executor runs a whole
    // batch through one call): 40x300 is 20 bands of one tile row per image (the band-parallel
    // path), 36x40 two bands of 12 tile rows (GEMMs on all threads, split by columns: 64 output
    // channels), 70x64 five bands of 8.
    let mut r = rng(16);
    for (h, w, cin, cout) in [(40, 300, 8, 9), (36, 40, 16, 64), (70, 64, 3, 4)] {
        let (a, b) = (rand_vec(&mut r, h * w * cin), rand_vec(&mut r, h * w * cin));
        let (wt, bias) = (rand_vec(&mut r, cout * cin * 9), rand_vec(&mut r, cout));
        let mut alone = vec![0.0; h * w * cout];
        fast::conv2d_on(
            fast::ConvPath::Winograd,
            &a,
            &wt,
            Some(&bias),
            1,
            h,
            w,
            cin,
            cout,
            3,
            true,
            &mut alone,
        );
        let mut both = vec![0.0; 2 * h * w * cout];
        fast::conv2d_on(
            fast::ConvPath::Winograd,
            &[b, a].concat(),
            &wt,
            Some(&bias),
            2,
            h,
            w,
            cin,
            cout,
            3,
            true,
            &mut both,
        );
        assert!(
            alone == both[h * w * cout..],
            "winograd {h}x{w} {cin}->{cout}: the second image of a batch differs from it alone"
        );
    }
}

#[test]
fn winograd_error_on_decoder_like_convs() {
    // The decoder's statistics: activations ~N(0, 1), weights ~N(0, 1/(9 cin)) (unit-variance
    // outputs), 128 to 512 channels, on a small image (edges and interior). Measured relative L2
    // against the f64 twin (2026-12-04): Winograd 3.1e-7 to 3.4e-7, the GEMM path 3.5e-7 to
    // 3.7e-7, so the GEMM paths' 1e-6 holds; the whole-model rule is 1e-4 against PyTorch.
    let mut r = rng(15);
    for (h, w, cin, cout) in [(9, 12, 128, 128), (6, 7, 256, 256), (4, 5, 512, 512)] {
        let x = normal_vec(&mut r, h * w * cin, 1.0);
        let (wt, bias) = (
            normal_vec(&mut r, cout * cin * 9, (1.0 / (9.0 * cin as f32)).sqrt()),
            normal_vec(&mut r, cout, 0.1),
        );
        let (mut f, mut g, mut p) = (
            vec![0.0; h * w * cout],
            vec![0.0; h * w * cout],
            vec![0.0; h * w * cout],
        );
        fast::conv2d_on(
            fast::ConvPath::Winograd,
            &x,
            &wt,
            Some(&bias),
            1,
            h,
            w,
            cin,
            cout,
            3,
            false,
            &mut f,
        );
        fast::conv2d_on(
            fast::ConvPath::Gemm,
            &x,
            &wt,
            Some(&bias),
            1,
            h,
            w,
            cin,
            cout,
            3,
            false,
            &mut g,
        );
        ops::conv2d(&x, &wt, Some(&bias), 1, h, w, cin, cout, 3, &mut p);
        let rel = |a: &[f32]| {
            (a.iter()
                .zip(&p)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                / p.iter().map(|b| (*b as f64).powi(2)).sum::<f64>())
            .sqrt()
        };
        eprintln!(
            "{h}x{w} {cin}->{cout}: relative L2 winograd {:.2e}, gemm {:.2e}",
            rel(&f),
            rel(&g)
        );
        assert_close(
            &format!("winograd conv2d {h}x{w} {cin}->{cout}"),
            &f,
            &p,
            1e-6,
        );
    }
}

#[test]
fn rmsnorm_relu_conv2d_matches_twin() {
    let mut r = rng(12);
    // Bands of 8 output rows: 19 and 17 rows end mid-band; a 1-row image; k = 1 and 3; channel
    // counts below, at and past the 8-lane dot product (5, 8, 24, 70); 1 to 4 output channels.
    for (b, h, w, cin, cout, kernel) in [
        (1, 1, 1, 1, 1, 1),
        (2, 19, 7, 5, 3, 3),
        (1, 17, 33, 24, 4, 3),
        (2, 3, 4, 70, 3, 1),
        (1, 9, 5, 8, 2, 3),
    ] {
        let x: Vec<f32> = rand_vec(&mut r, b * h * w * cin)
            .iter()
            .map(|v| v * 3.0)
            .collect();
        let (nw, nb) = (rand_vec(&mut r, cin), rand_vec(&mut r, cin));
        let (wt, bias) = (
            rand_vec(&mut r, cout * cin * kernel * kernel),
            rand_vec(&mut r, cout),
        );
        for (nbi, bi) in [(None, None), (Some(&nb[..]), Some(&bias[..]))] {
            let (mut f, mut p) = (vec![7.0; b * h * w * cout], vec![0.0; b * h * w * cout]);
            fast::rmsnorm_relu_conv2d(
                &x, &nw, nbi, 1e-5, &wt, bi, b, h, w, cin, cout, kernel, &mut f,
            );
            ops::rmsnorm_relu_conv2d(
                &x, &nw, nbi, 1e-5, &wt, bi, b, h, w, cin, cout, kernel, &mut p,
            );
            assert_close(
                &format!(
                    "rmsnorm_relu_conv2d {b}x{h}x{w} {cin}->{cout} k{kernel} bias {}",
                    bi.is_some()
                ),
                &f,
                &p,
                1e-6,
            );
        }
    }
}

#[test]
fn grouped_linear_matches_twin() {
    let mut r = rng(9);
    for (rows, cin, cout, groups) in [(1, 3, 6, 3), (77, 12, 9, 3), (301, 20, 40, 4)] {
        let (x, w) = (
            rand_vec(&mut r, rows * cin),
            rand_vec(&mut r, cout * cin / groups),
        );
        let (mut f, mut p) = (vec![0.0; rows * cout], vec![0.0; rows * cout]);
        fast::grouped_linear(&x, &w, cin, cout, groups, &mut f);
        ops::grouped_linear(&x, &w, cin, cout, groups, &mut p);
        assert_close(
            &format!("grouped_linear {rows}x{cin}->{cout} g{groups}"),
            &f,
            &p,
            1e-6,
        );
    }
}

/// Both sgemm backends against a naive loop, for every operand layout the fast ops use
/// (row-major, transposed, strided sub-matrices), accumulation, one and all threads (column
/// blocks), and degenerate sizes. OpenBLAS is loaded at run time; without it only the crate runs.
#[test]
fn sgemm_backends_match_naive_loop() {
    use openuni_cpu::sgemm::{self, Backend, Threads, View};
    let mut r = rng(10);
    if sgemm::backend() == Backend::GemmCrate {
        println!("OpenBLAS not loaded (libopenblas.so.0 missing or OPENUNI_CPU_SGEMM=gemm): the gemm crate only");
    }
    for (m, k, n) in [
        (1, 1, 1),
        (1, 5, 1),
        (3, 1, 70),
        (37, 19, 101),
        (130, 67, 300),
    ] {
        // a: m×k inside a wider buffer (row stride k+3, offset 2) or transposed; b likewise.
        let abuf = rand_vec(&mut r, (m + 1) * (k + 3) + (k + 1) * (m + 3));
        let bbuf = rand_vec(&mut r, (k + 1) * (n + 3) + (n + 1) * (k + 3));
        for (a, b) in [
            (View::new(&abuf, 2, k + 3, 1), View::new(&bbuf, 1, n + 3, 1)),
            (View::new(&abuf, 0, 1, m + 3), View::new(&bbuf, 3, 1, k + 3)),
        ] {
            let at = |i: usize, j: usize| a.data[a.off + i * a.rs + j * a.cs];
            let bt = |i: usize, j: usize| b.data[b.off + i * b.rs + j * b.cs];
            let init = rand_vec(&mut r, m * (n + 2));
            for accumulate in [false, true] {
                let mut want = init.clone();
                for i in 0..m {
                    for j in 0..n {
                        let s: f32 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
                        want[i * (n + 2) + 1 + j] = s + if accumulate {
                            init[i * (n + 2) + 1 + j]
                        } else {
                            0.0
                        };
                    }
                }
                for be in [Backend::GemmCrate, Backend::OpenBlas] {
                    for threads in [Threads::One, Threads::All] {
                        let mut got = init.clone();
                        sgemm::gemm_with(
                            be,
                            m,
                            n,
                            k,
                            &mut got,
                            1,
                            n + 2,
                            accumulate,
                            a,
                            b,
                            threads,
                        );
                        assert_close(
                            &format!(
                                "{be:?} {m}x{k}x{n} strides a {}/{} acc {accumulate} {threads:?}",
                                a.rs, a.cs
                            ),
                            &got,
                            &want,
                            1e-6,
                        );
                    }
                }
            }
        }
    }
}

/// The fused DiT ops' fast versions against their plain twins: the adaLN ops reading the
/// modulation table ([B, k·C] and [B, C] t), the SiLU-input depthwise GLU, the residual linear.
#[test]
fn dit_fusions_match_twins() {
    let mut r = rng(11);
    for (b, n, c, k, per_row) in [(2usize, 5usize, 12usize, 6usize, true), (3, 7, 9, 2, false)] {
        let tc = if per_row { k * c } else { c };
        let (x, y) = (rand_vec(&mut r, b * n * c), rand_vec(&mut r, b * n * c));
        let (t, table) = (rand_vec(&mut r, b * tc), rand_vec(&mut r, k * c));
        let d = ops::AdaDims {
            batch: b,
            tokens: n,
            cols: c,
            k,
        };
        let (mut f, mut p) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        fast::ada_layernorm(&x, &t, &table, d, 1, 0, 1e-6, &mut f);
        ops::ada_layernorm(&x, &t, &table, d, 1, 0, 1e-6, &mut p);
        assert_close(&format!("ada_layernorm {b}x{n}x{c} k{k}"), &f, &p, 1e-6);
        fast::ada_gated_add(&x, &t, &table, d, k - 1, &y, &mut f);
        ops::ada_gated_add(&x, &t, &table, d, k - 1, &y, &mut p);
        assert_close(&format!("ada_gated_add {b}x{n}x{c} k{k}"), &f, &p, 1e-6);
    }
    for (b, h, w, c2, k) in [
        (2, 5, 7, 6, 3),
        (1, 9, 4, 70, 3),
        (1, 1, 3, 4, 3),
        (2, 10, 3, 6, 5),
    ] {
        let x = rand_vec(&mut r, b * h * w * c2);
        let (wt, bias) = (rand_vec(&mut r, c2 * k * k), rand_vec(&mut r, c2));
        let (mut f, mut p) = (vec![0.0; x.len() / 2], vec![0.0; x.len() / 2]);
        fast::silu_depthwise_conv_glu(&x, &wt, Some(&bias), b, h, w, c2, k, &mut f);
        ops::silu_depthwise_conv_glu(&x, &wt, Some(&bias), b, h, w, c2, k, &mut p);
        assert_close(
            &format!("silu_depthwise_conv_glu {b}x{h}x{w}x{c2} k{k}"),
            &f,
            &p,
            1e-6,
        );
    }
    let (b, h, w, c2, k) = (2, 5, 7, 6, 10);
    let (wt, bias) = (rand_vec(&mut r, c2 * 9), rand_vec(&mut r, c2));
    let (x, wi, bi) = (
        rand_vec(&mut r, b * h * w * k),
        rand_vec(&mut r, c2 * k),
        rand_vec(&mut r, c2),
    );
    let (mut f, mut p) = (vec![0.0; b * h * w * c2 / 2], vec![0.0; b * h * w * c2 / 2]);
    fast::mixffn_inverted_glu(&x, &wi, Some(&bi), &wt, Some(&bias), b, h, w, k, c2, &mut f);
    ops::mixffn_inverted_glu(&x, &wi, Some(&bi), &wt, Some(&bias), b, h, w, k, c2, &mut p);
    assert_close("mixffn_inverted_glu", &f, &p, 1e-5);
    let (rows, kk, nn) = (9, 13, 11);
    let (x, wt, bias, res) = (
        rand_vec(&mut r, rows * kk),
        rand_vec(&mut r, nn * kk),
        rand_vec(&mut r, nn),
        rand_vec(&mut r, rows * nn),
    );
    let (mut f, mut p) = (vec![0.0; rows * nn], vec![0.0; rows * nn]);
    fast::linear_residual(&x, &wt, Some(&bias), &res, rows, kk, nn, &mut f);
    ops::linear_residual(&x, &wt, Some(&bias), &res, rows, kk, nn, &mut p);
    assert_close("linear_residual", &f, &p, 1e-5);
}

/// The vectorisable `exp_f32` against f64's `exp` over f32's normal range, into the
/// subnormals, past both ends, and on NaN; the activations on it at extreme inputs.
#[test]
fn exp_f32_matches_f64_exp() {
    let mut worst = 0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.7 * i as f32 / 200_000.0;
        let want = (x as f64).exp();
        worst = worst.max(((fast::exp_f32(x) as f64 - want) / want).abs());
    }
    assert!(worst < 4e-7, "exp_f32: worst relative error {worst:.2e}");
    for x in [-87.5f32, -95.0, -100.0, -103.5] {
        let (got, want) = (fast::exp_f32(x) as f64, (x as f64).exp());
        assert!(
            (got - want).abs() <= 2e-45 + 1e-6 * want,
            "exp_f32({x}) = {got:e}, want {want:e} (a subnormal)"
        );
    }
    assert!(fast::exp_f32(f32::NAN).is_nan());
    assert_eq!(fast::exp_f32(-1e30), 0.0);
    assert_eq!(fast::exp_f32(89.0), f32::INFINITY);
    assert_eq!(fast::exp_f32(1e30), f32::INFINITY);
    assert_eq!(fast::silu(-1e30), ops::silu(-1e30));
    assert_eq!(fast::silu(1e30), ops::silu(1e30));
    assert_eq!(fast::gelu_tanh(-1e4), ops::gelu_tanh(-1e4));
    assert_eq!(fast::gelu_tanh(1e4), ops::gelu_tanh(1e4));
}

/// The data-movement ops split across threads: exactly their twins, on shapes with partial tiles
/// and tasks.
#[test]
fn data_movement_ops_match_twins() {
    let mut r = rng(12);
    for (batch, rows, cols) in [(1, 1, 1), (2, 33, 65), (3, 700, 31), (1, 5, 4000)] {
        let x = rand_vec(&mut r, batch * rows * cols);
        let (mut f, mut p) = (vec![9.0; x.len()], vec![0.0; x.len()]);
        fast::transpose(&x, batch, rows, cols, &mut f);
        ops::transpose(&x, batch, rows, cols, &mut p);
        assert_eq!(f, p, "transpose {batch}x{rows}x{cols}");
    }
    let widths = [3usize, 1, 130];
    let rows = 401; // 134 columns: 122 rows per task, the last task partial
    let parts: Vec<Vec<f32>> = widths.iter().map(|&w| rand_vec(&mut r, rows * w)).collect();
    let refs: Vec<&[f32]> = parts.iter().map(|v| &v[..]).collect();
    let total: usize = widths.iter().sum();
    let (mut f, mut p) = (vec![9.0; rows * total], vec![0.0; rows * total]);
    fast::concat(&refs, &widths, &mut f);
    ops::concat(&refs, &widths, &mut p);
    assert_eq!(f, p, "concat");
    let (batch, k, c) = (37, 6, 23);
    let x = rand_vec(&mut r, batch * k * c);
    for index in [0, 5] {
        let (mut f, mut p) = (vec![9.0; batch * c], vec![0.0; batch * c]);
        fast::chunk(&x, batch, k, c, index, &mut f);
        ops::chunk(&x, batch, k, c, index, &mut p);
        assert_eq!(f, p, "chunk {index}");
    }
    let (rows, cin, repeats) = (1001, 3, 7);
    let x = rand_vec(&mut r, rows * cin);
    let (mut f, mut p) = (
        vec![9.0; rows * cin * repeats],
        vec![0.0; rows * cin * repeats],
    );
    fast::repeat_channels(&x, cin, repeats, &mut f);
    ops::repeat_channels(&x, cin, repeats, &mut p);
    assert_eq!(f, p, "repeat_channels");
    let (batch, tokens, c, start, len) = (3, 50, 17, 4, 29);
    let x = rand_vec(&mut r, batch * tokens * c);
    let (mut f, mut p) = (vec![9.0; batch * len * c], vec![0.0; batch * len * c]);
    fast::slice_tokens(&x, batch, tokens, c, start, len, &mut f);
    ops::slice_tokens(&x, batch, tokens, c, start, len, &mut p);
    assert_eq!(f, p, "slice_tokens");
    // ids past the table read `extra`; out of range and fractional ids give NaN rows.
    let (v, e, d) = (50, 4, 9);
    let (table, extra) = (rand_vec(&mut r, v * d), rand_vec(&mut r, e * d));
    let ids: Vec<f32> = (0..3000)
        .map(|i| match i % 101 {
            0 => 54.0,
            1 => 2.5,
            _ => ((i * 7) % (v + e)) as f32,
        })
        .collect();
    let (mut f, mut p) = (vec![9.0; ids.len() * d], vec![0.0; ids.len() * d]);
    fast::embedding_gather(&ids, &table, Some(&extra), d, &mut f);
    ops::embedding_gather(&ids, &table, Some(&extra), d, &mut p);
    assert!(
        f.iter().zip(&p).all(|(a, b)| a.to_bits() == b.to_bits()),
        "embedding_gather"
    );
    assert!(f.iter().any(|v| v.is_nan()), "the bad ids gave NaN rows");
}
