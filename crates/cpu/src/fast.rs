//! The fast CPU ops the executor runs by default: the same math as their plain twins in
//! [`crate::ops`] (same names, same arguments), restructured for speed: GEMMs on tiles
//! ([`crate::sgemm`]), f32 accumulation, and work split across rayon's global pool (one pool for
//! the process; the GEMMs inside a parallel task run on one thread). Each is tested against its twin
//! on odd shapes (crates/cpu/tests/fast.rs); the twins stay the oracle (`Kernels::Reference`).

use rayon::prelude::*;

use crate::ops::{self, AttentionDims, ModulationRef, MASKED_KEY_BIAS};
use crate::sgemm::{gemm as gemm_into, Threads, View};
use openuni_graph::UnaryFn;

/// Elements per parallel task of the elementwise ops: big enough to amortise a task.
const ELEMS_PER_TASK: usize = 1 << 14;

/// Defines `fn $name` that runs its body compiled for AVX2 (8 floats a vector) when the CPU has
/// it, else as built (baseline x86-64: SSE2, 4 floats). For the hot loops LLVM vectorises by
/// itself: the same operations in the same order either way (no FMA), so the results are
/// bit-identical; only the vector width changes.
macro_rules! with_avx2 {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

with_avx2! {
    /// `y = silu(x)` on one block.
    fn silu_block(x: &[f32], y: &mut [f32]) {
        y.iter_mut().zip(x).for_each(|(y, &v)| *y = silu(v));
    }
}

with_avx2! {
    /// `v = silu(v)` on one block.
    fn silu_in_place(v: &mut [f32]) {
        v.iter_mut().for_each(|v| *v = silu(*v));
    }
}

with_avx2! {
    /// `y = gelu_tanh(x)` on one block.
    fn gelu_tanh_block(x: &[f32], y: &mut [f32]) {
        y.iter_mut().zip(x).for_each(|(y, &v)| *y = gelu_tanh(v));
    }
}

with_avx2! {
    /// `y = silu(g) · u` on one block.
    fn swiglu_block(g: &[f32], u: &[f32], y: &mut [f32]) {
        y.iter_mut().zip(g.iter().zip(u)).for_each(|(o, (&g, &u))| *o = silu(g) * u);
    }
}

with_avx2! {
    /// The GLU of one row of depthwise results `acc` (pixels × 2H: u then g) into `o` (pixels × H).
    fn glu_row(acc: &[f32], hh: usize, o: &mut [f32]) {
        for (oy, a) in o.chunks_exact_mut(hh).zip(acc.chunks_exact(2 * hh)) {
            let (u, g) = a.split_at(hh);
            oy.iter_mut().zip(u.iter().zip(g)).for_each(|(y, (&u, &g))| *y = u * silu(g));
        }
    }
}

/// `out[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias)` on every thread.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    if let Some(b) = bias {
        out[..rows * n]
            .par_chunks_mut(n * (ELEMS_PER_TASK / n).max(1))
            .for_each(|c| c.chunks_exact_mut(n).for_each(|r| r.copy_from_slice(b)));
    }
    gemm_into(
        rows,
        n,
        k,
        out,
        0,
        n,
        bias.is_some(),
        View::new(x, 0, k, 1),
        View::new(w, 0, 1, k),
        Threads::All,
    );
}

/// [`ops::rmsnorm`], rows split across threads.
pub fn rmsnorm(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, cols: usize, out: &mut [f32]) {
    let rows_per_task = (ELEMS_PER_TASK / cols).max(1);
    out.par_chunks_mut(rows_per_task * cols)
        .zip(x.par_chunks(rows_per_task * cols))
        .for_each(|(y, x)| ops::rmsnorm(x, w, b, eps, cols, y));
}

/// [`ops::rmsnorm_residual`], rows split across threads (bit-identical to the twin).
pub fn rmsnorm_residual(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    residual: &[f32],
    eps: f32,
    cols: usize,
    out: &mut [f32],
) {
    let n = (ELEMS_PER_TASK / cols).max(1) * cols;
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(residual.par_chunks(n)))
        .for_each(|(y, (x, r))| ops::rmsnorm_residual(x, w, b, r, eps, cols, y));
}

/// [`ops::layernorm`], rows split across threads (f32 statistics, two passes).
/// [`ops::pixel_shuffle_layernorm`] with the norm across threads (the gather is one plain copy).
#[allow(clippy::too_many_arguments)]
pub fn pixel_shuffle_layernorm(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    batch: usize,
    grid: usize,
    skip: usize,
    c: usize,
    out: &mut [f32],
) {
    let mut shuffled = vec![0f32; out.len()];
    ops::pixel_shuffle(x, batch, grid, skip, c, &mut shuffled);
    layernorm(&shuffled, Some(w), Some(b), eps, 4 * c, None, out);
}

pub fn layernorm(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f32,
    cols: usize,
    modulation: Option<ModulationRef>,
    out: &mut [f32],
) {
    let rows_per_task = (ELEMS_PER_TASK / cols).max(1);
    out.par_chunks_mut(rows_per_task * cols)
        .enumerate()
        .for_each(|(t, yb)| {
            for (i, yr) in yb.chunks_exact_mut(cols).enumerate() {
                let r = t * rows_per_task + i;
                let xr = &x[r * cols..][..cols];
                let mean = xr.iter().sum::<f32>() / cols as f32;
                let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
                let inv = 1.0 / (var + eps).sqrt();
                for (j, (y, &v)) in yr.iter_mut().zip(xr).enumerate() {
                    let mut o = (v - mean) * inv;
                    if let Some(w) = w {
                        o *= w[j];
                    }
                    if let Some(b) = b {
                        o += b[j];
                    }
                    *y = o;
                }
                if let Some(m) = modulation {
                    let s = (r / m.tokens) * cols;
                    let (scale, shift) = (&m.scale[s..s + cols], &m.shift[s..s + cols]);
                    for ((y, &sc), &sh) in yr.iter_mut().zip(scale).zip(shift) {
                        *y = *y * (1.0 + sc) + sh;
                    }
                }
            }
        });
}

/// `e^x` in f32 written so that a loop over it vectorises (the libm `expf` call does not):
/// Cephes' `expf`, x = n·ln 2 + r with |r| <= ln 2 / 2 (Cody-Waite split of ln 2), a degree-6
/// polynomial in r, then times 2^n as two normal powers of two 2^⌊n/2⌋·2^(n-⌊n/2⌋), so that the
/// result underflows to subnormals and 0 and overflows to +inf where f32's `exp` does. Relative
/// error about 2e-7 in the normal range. NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits (no `round` call).
    const ROUND: f32 = 12_582_912.0;
    // e^-104 rounds to 0, e^89 is +inf: outside, the result no longer changes.
    let x = x.clamp(-104.0, 89.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 = 0.693359375 (the f32 of 0.6933594; few mantissa bits, so n·hi is exact) - 2.1219444e-4.
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let (n1, n2) = (n >> 1, n - (n >> 1));
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    y * pow2(n1) * pow2(n2)
}

/// [`ops::silu`] on [`exp_f32`].
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// [`ops::gelu_tanh`] in f32: `0.5·x·(1 + tanh(u)) = x·sigmoid(2u)` with `u = √(2/π)·(x + 0.044715·x³)`,
/// the logistic form on [`exp_f32`] (the twin takes an f64 `tanh`).
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const TWO_K: f32 = 2.0 * 0.797_884_6; // 2·√(2/π)
    x / (1.0 + exp_f32(-TWO_K * (x + 0.044_715 * x * x * x)))
}

/// [`ops::unary`] across threads; SiLU and tanh-GELU on [`exp_f32`] (vectorised), the erf-GELU
/// and ReLU as the twin.
pub fn unary(f: UnaryFn, x: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(x.par_chunks(ELEMS_PER_TASK))
        .for_each(|(y, x)| match f {
            UnaryFn::Silu => silu_block(x, y),
            UnaryFn::GeluTanh => gelu_tanh_block(x, y),
            UnaryFn::GeluErf | UnaryFn::Relu => ops::unary(f, x, y),
        });
}

/// [`ops::add`] across threads.
pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            a.par_chunks(ELEMS_PER_TASK)
                .zip(b.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(y, (a, b))| ops::add(a, b, y));
}

/// [`ops::swiglu`] across threads, SiLU on [`exp_f32`].
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            gate.par_chunks(ELEMS_PER_TASK)
                .zip(up.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(y, (g, u))| swiglu_block(g, u, y));
}

/// [`ops::gated_add`] across threads, row by row.
pub fn gated_add(x: &[f32], gate: &[f32], y: &[f32], tokens: usize, cols: usize, out: &mut [f32]) {
    out.par_chunks_mut(cols)
        .enumerate()
        .with_min_len((ELEMS_PER_TASK / cols).max(1))
        .for_each(|(r, o)| {
            let g = &gate[(r / tokens) * cols..][..cols];
            let (xr, yr) = (&x[r * cols..][..cols], &y[r * cols..][..cols]);
            for j in 0..cols {
                o[j] = xr[j] + g[j] * yr[j];
            }
        });
}

with_avx2! {
    /// `row[j] = e^(row[j] - m)` for the `lim` visible keys ([`exp_f32`], vectorised), 0 for the rest;
    /// returns their sum (summed in key order).
    fn softmax_exp_row(row: &mut [f32], lim: usize, m: f32) -> f32 {
        for (j, sj) in row.iter_mut().enumerate() {
            *sj = if j < lim { exp_f32(*sj - m) } else { 0.0 };
        }
        row.iter().sum()
    }
}

/// Softmax attention as flash-attention does it: per (sample, block of `Q_BLOCK` queries, head),
/// the logits of `KV_BLOCK` keys at a time as one GEMM tile, an online softmax (running max and
/// sum, earlier output rescaled), and `P·V` accumulated by a second GEMM tile. Memory is
/// O(Q_BLOCK · KV_BLOCK) per task, K/V are read in place (GQA: query head h reads key/value head
/// h / (heads / kv_heads), never repeated). Same masking as [`ops::attention`].
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[f32]>,
    d: AttentionDims,
    out: &mut [f32],
) {
    const Q_BLOCK: usize = 64;
    const KV_BLOCK: usize = 256;
    let (qw, kw, hd) = (d.heads * d.head_dim, d.kv_heads * d.head_dim, d.head_dim);
    let group = d.heads / d.kv_heads;
    if d.q_len == 0 {
        return;
    }
    out[..d.batch * d.q_len * qw]
        .par_chunks_mut(d.q_len * qw)
        .enumerate()
        .for_each(|(b, ob)| {
            ob.par_chunks_mut(Q_BLOCK * qw)
                .enumerate()
                .for_each(|(blk, oblk)| {
                    let (q0, nq) = (blk * Q_BLOCK, oblk.len() / qw);
                    // Keys visible to query row i (causal: the last query sees the last key).
                    let visible = |i: usize| {
                        if d.causal {
                            (i + d.kv_len + 1).saturating_sub(d.q_len).min(d.kv_len)
                        } else {
                            d.kv_len
                        }
                    };
                    let kv_end = visible(q0 + nq - 1);
                    let mut s = vec![0f32; nq * KV_BLOCK];
                    let mut acc = vec![0f32; nq * hd];
                    let (mut max, mut sum) = (vec![0f32; nq], vec![0f32; nq]);
                    for h in 0..d.heads {
                        let kh = h / group;
                        max.fill(f32::NEG_INFINITY);
                        sum.fill(0.0);
                        acc.fill(0.0);
                        for j0 in (0..kv_end).step_by(KV_BLOCK) {
                            let nk = KV_BLOCK.min(kv_end - j0);
                            let qv = View::new(q, (b * d.q_len + q0) * qw + h * hd, qw, 1);
                            let kt = View::new(k, (b * d.kv_len + j0) * kw + kh * hd, 1, kw);
                            gemm_into(nq, nk, hd, &mut s, 0, nk, false, qv, kt, Threads::One);
                            for i in 0..nq {
                                let row = &mut s[i * nk..(i + 1) * nk];
                                let lim = visible(q0 + i).saturating_sub(j0).min(nk);
                                let mut m = f32::NEG_INFINITY;
                                for (j, sj) in row.iter_mut().enumerate().take(lim) {
                                    let bias = key_mask.map_or(0.0, |mk| {
                                        (1.0 - mk[b * d.kv_len + j0 + j]) * MASKED_KEY_BIAS
                                    });
                                    *sj = *sj * d.scale + bias;
                                    m = m.max(*sj);
                                }
                                let m_new = max[i].max(m);
                                let block_sum = softmax_exp_row(row, lim, m_new);
                                if m_new > max[i] {
                                    let corr = (max[i] - m_new).exp();
                                    sum[i] *= corr;
                                    acc[i * hd..(i + 1) * hd]
                                        .iter_mut()
                                        .for_each(|a| *a *= corr);
                                    max[i] = m_new;
                                }
                                sum[i] += block_sum;
                            }
                            let p = View::new(&s, 0, nk, 1);
                            let vv = View::new(v, (b * d.kv_len + j0) * kw + kh * hd, kw, 1);
                            gemm_into(nq, hd, nk, &mut acc, 0, hd, true, p, vv, Threads::One);
                        }
                        for i in 0..nq {
                            let inv = 1.0 / sum[i];
                            for (o, &a) in oblk[i * qw + h * hd..][..hd]
                                .iter_mut()
                                .zip(&acc[i * hd..(i + 1) * hd])
                            {
                                *o = a * inv;
                            }
                        }
                    }
                });
        });
}

/// [`ops::rope_at`] across threads (rows of `heads · head_dim`).
fn rope_at(
    x: &[f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    theta: f32,
    out: &mut [f32],
) {
    let w = heads * head_dim;
    let rows_per_task = (ELEMS_PER_TASK / w).max(1);
    out.par_chunks_mut(rows_per_task * w)
        .enumerate()
        .for_each(|(t, y)| {
            let r0 = t * rows_per_task;
            let n = y.len() / w;
            ops::rope_at(
                &x[r0 * w..(r0 + n) * w],
                &positions[r0..r0 + n],
                heads,
                head_dim,
                theta,
                y,
            );
        });
}

/// [`ops::attention_ext`] with the threaded RoPE and the blocked [`attention`].
#[allow(clippy::too_many_arguments)]
pub fn attention_ext(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[f32]>,
    d: AttentionDims,
    segments: Option<&[usize]>,
    rope_theta: Option<f32>,
    out: &mut [f32],
) {
    ops::attention_ext_with(
        ops::AttentionParts { rope_at, attention },
        q,
        k,
        v,
        key_mask,
        d,
        segments,
        rope_theta,
        out,
    )
}

/// Where head h's q, k and v columns start in a row of `row_stride` values.
struct HeadLayout {
    row_stride: usize,
    q: fn(usize, usize) -> usize,
    k: fn(usize, usize) -> usize,
    v: fn(usize, usize) -> usize,
}

/// ReLU linear attention (the math of [`ops::linear_attention`]) in two GEMM phases: per (sample,
/// head) the state `relu(K)ᵀ [V | 1]` (hd × hd+1, its last column the key sum), then per block of
/// rows `relu(Q) · state`, divided by the key-sum column. Output [B, N, heads·hd].
#[allow(clippy::too_many_arguments)]
fn linear_attention_core(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: HeadLayout,
    batch: usize,
    tokens: usize,
    heads: usize,
    hd: usize,
    out: &mut [f32],
) {
    const ROWS: usize = 256;
    let (rs, c, w) = (layout.row_stride, heads * hd, hd + 1);
    let states: Vec<Vec<f32>> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let (mut kr, mut v1) = (vec![0f32; tokens * hd], vec![1f32; tokens * w]);
            for m in 0..tokens {
                let row = (b * tokens + m) * rs;
                for (d, &s) in kr[m * hd..(m + 1) * hd]
                    .iter_mut()
                    .zip(&k[row + (layout.k)(h, hd)..][..hd])
                {
                    *d = s.max(0.0);
                }
                v1[m * w..m * w + hd].copy_from_slice(&v[row + (layout.v)(h, hd)..][..hd]);
            }
            let mut state = vec![0f32; hd * w];
            gemm_into(
                hd,
                w,
                tokens,
                &mut state,
                0,
                w,
                false,
                View::new(&kr, 0, 1, hd),
                View::new(&v1, 0, w, 1),
                Threads::One,
            );
            state
        })
        .collect();
    out[..batch * tokens * c]
        .par_chunks_mut(tokens * c)
        .enumerate()
        .for_each(|(b, ob)| {
            ob.par_chunks_mut(ROWS * c)
                .enumerate()
                .for_each(|(blk, oblk)| {
                    let (n0, nr) = (blk * ROWS, oblk.len() / c);
                    let (mut qr, mut res) = (vec![0f32; nr * hd], vec![0f32; nr * w]);
                    for h in 0..heads {
                        for i in 0..nr {
                            let src = &q[(b * tokens + n0 + i) * rs + (layout.q)(h, hd)..][..hd];
                            for (d, &s) in qr[i * hd..(i + 1) * hd].iter_mut().zip(src) {
                                *d = s.max(0.0);
                            }
                        }
                        gemm_into(
                            nr,
                            w,
                            hd,
                            &mut res,
                            0,
                            w,
                            false,
                            View::new(&qr, 0, hd, 1),
                            View::new(&states[b * heads + h], 0, w, 1),
                            Threads::One,
                        );
                        for i in 0..nr {
                            let r = &res[i * w..(i + 1) * w];
                            let inv = 1.0 / (r[hd] + 1e-15);
                            for (o, &num) in oblk[i * c + h * hd..][..hd].iter_mut().zip(r) {
                                *o = num * inv;
                            }
                        }
                    }
                });
        });
}

/// [`ops::linear_attention`]: q, k, v [B, N, heads·hd].
#[allow(clippy::too_many_arguments)]
pub fn linear_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    out: &mut [f32],
) {
    let layout = HeadLayout {
        row_stride: heads * head_dim,
        q: |h, hd| h * hd,
        k: |h, hd| h * hd,
        v: |h, hd| h * hd,
    };
    linear_attention_core(q, k, v, layout, batch, tokens, heads, head_dim, out)
}

/// [`ops::packed_linear_attention`]: group g of each `qkv` row is (q | k | v), read in place.
pub fn packed_linear_attention(
    qkv: &[f32],
    batch: usize,
    tokens: usize,
    groups: usize,
    hd: usize,
    out: &mut [f32],
) {
    let layout = HeadLayout {
        row_stride: 3 * groups * hd,
        q: |g, hd| 3 * g * hd,
        k: |g, hd| 3 * g * hd + hd,
        v: |g, hd| 3 * g * hd + 2 * hd,
    };
    linear_attention_core(qkv, qkv, qkv, layout, batch, tokens, groups, hd, out)
}

/// [`ops::packed_linear_attention_key_norm`]: the same key normalisation with [`rmsnorm`], then
/// [`packed_linear_attention`].
#[allow(clippy::too_many_arguments)]
pub fn packed_linear_attention_key_norm(
    qkv: &[f32],
    weight: &[f32],
    eps: f32,
    batch: usize,
    tokens: usize,
    groups: usize,
    hd: usize,
    out: &mut [f32],
) {
    packed_linear_attention(
        &ops::packed_keys_normalized(qkv, weight, eps, groups, hd, rmsnorm),
        batch,
        tokens,
        groups,
        hd,
        out,
    )
}

/// [`ops::multiscale_linear_attention`]: [`packed_linear_attention`] on each scale in place (no
/// concat of the inputs), its groups' outputs copied into their column range of `out`.
pub fn multiscale_linear_attention(
    scales: &[&[f32]],
    widths: &[usize],
    batch: usize,
    tokens: usize,
    hd: usize,
    out: &mut [f32],
) {
    let c: usize = widths.iter().map(|w| w / 3).sum();
    let mut col = 0;
    for (x, &wd) in scales.iter().zip(widths) {
        let (g, oc) = (wd / (3 * hd), wd / 3);
        if oc == 0 {
            continue;
        }
        let mut part = vec![0f32; batch * tokens * oc];
        packed_linear_attention(x, batch, tokens, g, hd, &mut part);
        out[..batch * tokens * c]
            .par_chunks_mut(c)
            .zip(part.par_chunks(oc))
            .for_each(|(o, p)| o[col..col + oc].copy_from_slice(p));
        col += oc;
    }
}

with_avx2! {
    /// Depthwise k×k of one image row into `acc` (w pixels × c channels, f32), with the weights
    /// transposed to tap-major `wt[tap][c]` so the inner loop runs along contiguous channels.
    #[allow(clippy::too_many_arguments)]
    fn depthwise_row(x: &[f32], wt: &[f32], bias: Option<&[f32]>, b: usize, y: usize, h: usize, w: usize, c: usize, kernel: usize, acc: &mut [f32]) {
        let p = kernel / 2;
        // (input offset, weight offset) of each tap inside the image, per pixel.
        let mut taps: Vec<(usize, usize)> = Vec::with_capacity(kernel * kernel);
        for (xx, a) in acc.chunks_exact_mut(c).enumerate() {
            taps.clear();
            for dy in 0..kernel {
                let Some(sy) = (y + dy).checked_sub(p).filter(|&s| s < h) else { continue };
                for dx in 0..kernel {
                    let Some(sx) = (xx + dx).checked_sub(p).filter(|&s| s < w) else { continue };
                    taps.push((((b * h + sy) * w + sx) * c, (dy * kernel + dx) * c));
                }
            }
            // DW_LANES channels at a time summed over every tap in registers (a whole-row pass per
            // tap streamed the row's accumulators through the cache k² times); same order of sums.
            let full = c - c % DW_LANES;
            for c0 in (0..full).step_by(DW_LANES) {
                let mut s: [f32; DW_LANES] = match bias {
                    Some(bb) => bb[c0..c0 + DW_LANES].try_into().expect("DW_LANES channels"),
                    None => [0.0; DW_LANES],
                };
                for &(xo, wo) in &taps {
                    let src: &[f32; DW_LANES] = x[xo + c0..][..DW_LANES].try_into().expect("DW_LANES channels");
                    let wk: &[f32; DW_LANES] = wt[wo + c0..][..DW_LANES].try_into().expect("DW_LANES channels");
                    for i in 0..DW_LANES {
                        s[i] += wk[i] * src[i];
                    }
                }
                a[c0..c0 + DW_LANES].copy_from_slice(&s);
            }
            let tail = &mut a[full..];
            match bias {
                Some(bb) => tail.copy_from_slice(&bb[full..c]),
                None => tail.fill(0.0),
            }
            for &(xo, wo) in &taps {
                for ((a, &s), &wv) in tail.iter_mut().zip(&x[xo + full..xo + c]).zip(&wt[wo + full..wo + c]) {
                    *a += wv * s;
                }
            }
        }
    }
}

/// Channels of one depthwise register block (8 SSE or 4 AVX2 vectors).
const DW_LANES: usize = 32;

/// `weight` [C, 1, k, k] -> tap-major [k·k, C].
fn taps_major(weight: &[f32], c: usize, kernel: usize) -> Vec<f32> {
    let kk = kernel * kernel;
    let mut wt = vec![0f32; kk * c];
    for ch in 0..c {
        for t in 0..kk {
            wt[t * c + ch] = weight[ch * kk + t];
        }
    }
    wt
}

/// [`ops::depthwise_conv2d`], image rows split across threads.
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv2d(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    c: usize,
    kernel: usize,
    out: &mut [f32],
) {
    let wt = taps_major(weight, c, kernel);
    out[..batch * h * w * c]
        .par_chunks_mut(w * c)
        .enumerate()
        .for_each(|(r, o)| depthwise_row(x, &wt, bias, r / h, r % h, h, w, c, kernel, o));
}

/// [`ops::depthwise_conv_glu`] fused: each image row's 2H-channel depthwise result stays in a
/// row buffer and only `u · silu(g)` is written.
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv_glu(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    c2: usize,
    kernel: usize,
    out: &mut [f32],
) {
    let wt = taps_major(weight, c2, kernel);
    let hh = c2 / 2;
    out[..batch * h * w * hh]
        .par_chunks_mut(w * hh)
        .enumerate()
        .for_each_init(
            || vec![0f32; w * c2],
            |acc, (r, o)| {
                depthwise_row(x, &wt, bias, r / h, r % h, h, w, c2, kernel, acc);
                glu_row(acc, hh, o);
            },
        );
}

/// Output pixels per im2col block or [`conv_taps`] band: bounds each thread's scratch (as the
/// twins' BLOCK).
const CONV_BLOCK: usize = 1024;

/// From this output width on, a tap-major conv runs as [`conv_taps`]: the padding columns it
/// computes and drops cost (k-1)/width of the FLOPs. On the DC-AE decoder's 3×3 convs (512²×128,
/// 256²×256, 128²×512 channels) it took 8-12 % less time than im2col + one GEMM, both threads
/// (docs/cpu-performance.md).
const CONV_TAPS_MIN_WIDTH: usize = 64;

/// A k×k convolution on an `oh`×`ow` output grid as im2col blocks + GEMM, SiLU optionally
/// applied to each block while it is in cache. `src(b, y, x)` gives the input pixel's channels read
/// at output-grid position (y, x), so the same driver serves the plain and the 2×-upsampling
/// convolutions. Many blocks: one block per task, each GEMM on one thread; few blocks: blocks in
/// turn, each GEMM on every thread. When the image has more pixels than the conv has output
/// channels, the weights are permuted to tap-major [Cout, k·k, Cin] once per call, so that each
/// im2col row is k·k contiguous copies of Cin channels; else the im2col rows follow the weights'
/// [Cin, k·k] order. A 3×3 conv that `path` sends to Winograd goes to [`conv_winograd`] instead.
#[allow(clippy::too_many_arguments)]
fn conv_blocks<'a>(
    path: ConvPath,
    src: impl Fn(usize, usize, usize) -> &'a [f32] + Sync,
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    oh: usize,
    ow: usize,
    cin: usize,
    cout: usize,
    kernel: usize,
    silu: bool,
    out: &mut [f32],
) {
    if kernel == 3 && path.winograd(cin, cout, oh * ow) {
        return conv_winograd(src, weight, bias, batch, oh, ow, cin, cout, silu, out);
    }
    let (kk, taps, p) = (cin * kernel * kernel, kernel * kernel, kernel / 2);
    let block = CONV_BLOCK.min(oh * ow);
    let tap_major = taps > 1 && cout <= batch * oh * ow;
    let permuted: Vec<f32> = if tap_major {
        let mut wp = vec![0f32; cout * kk];
        wp.par_chunks_mut(kk)
            .zip(weight.par_chunks(kk))
            .for_each(|(d, s)| {
                for ci in 0..cin {
                    for t in 0..taps {
                        d[t * cin + ci] = s[ci * taps + t];
                    }
                }
            });
        wp
    } else {
        vec![]
    };
    let wmat = if tap_major { &permuted[..] } else { weight };
    if tap_major && ow >= CONV_TAPS_MIN_WIDTH {
        return conv_taps(src, wmat, bias, batch, oh, ow, cin, cout, kernel, silu, out);
    }
    let fill = |b: usize, start: usize, cols: &mut [f32]| {
        for (pi, col) in cols.chunks_exact_mut(kk).enumerate() {
            let (y, xx) = ((start + pi) / ow, (start + pi) % ow);
            for dy in 0..kernel {
                for dx in 0..kernel {
                    let t = dy * kernel + dx;
                    let s = (y + dy)
                        .checked_sub(p)
                        .filter(|&s| s < oh)
                        .zip((xx + dx).checked_sub(p).filter(|&s| s < ow));
                    match (s.map(|(sy, sx)| src(b, sy, sx)), tap_major) {
                        (Some(px), true) => col[t * cin..(t + 1) * cin].copy_from_slice(px),
                        (None, true) => col[t * cin..(t + 1) * cin].fill(0.0),
                        (Some(px), false) => px
                            .iter()
                            .enumerate()
                            .for_each(|(ci, &v)| col[ci * taps + t] = v),
                        (None, false) => (0..cin).for_each(|ci| col[ci * taps + t] = 0.0),
                    }
                }
            }
        }
    };
    let gemm_block = |cols: &[f32], n: usize, o: &mut [f32], par: Threads| {
        if let Some(bb) = bias {
            o.chunks_exact_mut(cout).for_each(|r| r.copy_from_slice(bb));
        }
        gemm_into(
            n,
            cout,
            kk,
            o,
            0,
            cout,
            bias.is_some(),
            View::new(cols, 0, kk, 1),
            View::new(wmat, 0, 1, kk),
            par,
        );
        if silu && par == Threads::One {
            silu_in_place(o);
        }
    };
    let blocks = batch * (oh * ow).div_ceil(block);
    let out = &mut out[..batch * oh * ow * cout];
    if blocks >= 2 * rayon::current_num_threads() {
        out.par_chunks_mut(oh * ow * cout)
            .enumerate()
            .for_each(|(b, ob)| {
                ob.par_chunks_mut(block * cout).enumerate().for_each_init(
                    || vec![0f32; block * kk],
                    |cols, (i, o)| {
                        let n = o.len() / cout;
                        fill(b, i * block, &mut cols[..n * kk]);
                        gemm_block(&cols[..n * kk], n, o, Threads::One);
                    },
                )
            });
    } else {
        let mut cols = vec![0f32; block * kk];
        for (b, ob) in out.chunks_mut(oh * ow * cout).enumerate() {
            for (i, o) in ob.chunks_mut(block * cout).enumerate() {
                let n = o.len() / cout;
                fill(b, i * block, &mut cols[..n * kk]);
                gemm_block(&cols[..n * kk], n, o, Threads::All);
            }
        }
        if silu {
            out.par_chunks_mut(ELEMS_PER_TASK).for_each(silu_in_place);
        }
    }
}

/// A k×k convolution (stride 1, zero padding k/2) as k² shifted GEMMs on bands of output rows,
/// no im2col: per band, the input rows it reads are copied once into a zero-padded scratch
/// ((rows + k - 1) × (ow + k - 1) pixels); on that padded grid the input pixels of tap (dy, dx)
/// for consecutive outputs are consecutive rows (stride Cin), so each tap is one GEMM
/// [band pixels, Cin] · [Cin, Cout] accumulated into a band result (the padding columns' rows are
/// computed and dropped). `src(b, y, x)` and `wmat` (tap-major [Cout, k², Cin]) as in
/// [`conv_blocks`].
#[allow(clippy::too_many_arguments)]
fn conv_taps<'a>(
    src: impl Fn(usize, usize, usize) -> &'a [f32] + Sync,
    wmat: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    oh: usize,
    ow: usize,
    cin: usize,
    cout: usize,
    kernel: usize,
    silu: bool,
    out: &mut [f32],
) {
    let (taps, p, pw) = (kernel * kernel, kernel / 2, ow + kernel - 1);
    let band = (CONV_BLOCK / ow).clamp(1, oh);
    let m = (band - 1) * pw + ow;
    let run_band = |b: usize,
                    y0: usize,
                    o: &mut [f32],
                    pad: &mut Vec<f32>,
                    acc: &mut Vec<f32>,
                    par: Threads| {
        let rows = o.len() / (ow * cout);
        pad.clear();
        pad.resize((rows + kernel - 1) * pw * cin, 0.0);
        for r in 0..rows + kernel - 1 {
            let Some(sy) = (y0 + r).checked_sub(p).filter(|&s| s < oh) else {
                continue;
            };
            for x in 0..ow {
                pad[(r * pw + x + p) * cin..][..cin].copy_from_slice(src(b, sy, x));
            }
        }
        let m = (rows - 1) * pw + ow;
        acc.resize(m * cout, 0.0);
        if let Some(bb) = bias {
            acc.chunks_exact_mut(cout)
                .for_each(|r| r.copy_from_slice(bb));
        }
        for t in 0..taps {
            let (dy, dx) = (t / kernel, t % kernel);
            let a = View::new(pad, (dy * pw + dx) * cin, cin, 1);
            gemm_into(
                m,
                cout,
                cin,
                acc,
                0,
                cout,
                t > 0 || bias.is_some(),
                a,
                View::new(wmat, t * cin, 1, taps * cin),
                par,
            );
        }
        for (r, orow) in o.chunks_exact_mut(ow * cout).enumerate() {
            orow.copy_from_slice(&acc[r * pw * cout..][..ow * cout]);
            if silu {
                silu_in_place(orow);
            }
        }
    };
    let bands = batch * oh.div_ceil(band);
    let out = &mut out[..batch * oh * ow * cout];
    let scratch = || {
        (
            Vec::with_capacity((band + kernel - 1) * pw * cin),
            Vec::with_capacity(m * cout),
        )
    };
    if bands >= 2 * rayon::current_num_threads() {
        out.par_chunks_mut(oh * ow * cout)
            .enumerate()
            .for_each(|(b, ob)| {
                ob.par_chunks_mut(band * ow * cout)
                    .enumerate()
                    .for_each_init(scratch, |(pad, acc), (i, o)| {
                        run_band(b, i * band, o, pad, acc, Threads::One)
                    })
            });
    } else {
        let (mut pad, mut acc) = scratch();
        for (b, ob) in out.chunks_mut(oh * ow * cout).enumerate() {
            for (i, o) in ob.chunks_mut(band * ow * cout).enumerate() {
                run_band(b, i * band, o, &mut pad, &mut acc, Threads::All);
            }
        }
    }
}

/// Which algorithm [`conv2d_on`] / [`upsample_conv2d_on`] use for a 3×3 convolution ([`conv2d`]
/// and [`upsample_conv2d`] take `Auto`); other kernel sizes always take the GEMM path. Public so
/// that the tests and the benchmark can force each path whatever the shape rule says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvPath {
    /// [`conv_winograd`] when the shape reaches [`WINOGRAD_MIN_CHANNELS`] and
    /// [`WINOGRAD_MIN_PIXELS`], else GEMM.
    Auto,
    /// im2col + GEMM or shifted GEMMs ([`conv_blocks`], [`conv_taps`]).
    Gemm,
    /// Winograd F(2×2, 3×3) ([`conv_winograd`]).
    Winograd,
}

/// `ConvPath::Auto` runs a 3×3 conv as Winograd from this many input and output channels on
/// and from [`WINOGRAD_MIN_PIXELS`] output pixels per image on: the transforms cost O(Cin + Cout)
/// per tile against the GEMMs' O(Cin·Cout), and the weight transform (16·Cin·Cout floats written
/// per call) needs enough tiles to amortise. Measured on the DC-AE decoder's shapes
/// (benches/cpu_conv.rs, docs/cpu-performance.md): 1.24-1.70x faster from 64×64 pixels on,
/// 0.82-1.06x at 32×32 with 1024 channels. Depends on the per-image shape only, never on the batch, so an
/// image's bits do not depend on what else is in the batch.
pub const WINOGRAD_MIN_CHANNELS: usize = 32;

/// See [`WINOGRAD_MIN_CHANNELS`].
pub const WINOGRAD_MIN_PIXELS: usize = 64 * 64;

impl ConvPath {
    fn winograd(self, cin: usize, cout: usize, pixels: usize) -> bool {
        match self {
            ConvPath::Auto => {
                cin >= WINOGRAD_MIN_CHANNELS
                    && cout >= WINOGRAD_MIN_CHANNELS
                    && pixels >= WINOGRAD_MIN_PIXELS
            }
            ConvPath::Gemm => false,
            ConvPath::Winograd => true,
        }
    }
}

/// 2×2-output tiles per [`conv_winograd`] band: bounds each thread's scratch (16·tiles·(Cin +
/// Cout) floats) while keeping each of the 16 GEMMs tall enough to amortise packing its weights.
const WINOGRAD_TILES: usize = 256;

/// Winograd's G (Lavin & Gray 2015, F(2×2, 3×3)): the weight transform U = G g Gᵀ.
const WINOGRAD_G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// The weights [Cout, Cin, 3, 3] transformed to U = G g Gᵀ, laid out [Cout, 16, Cin]: for each
/// element ξ = 4i + j of the 4×4 transformed tile, a [Cin, Cout] GEMM operand with row stride 1
/// and column stride 16·Cin. Each output channel's weights are read once; summed in f64 and
/// rounded once.
fn winograd_weights(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    let mut u = vec![0f32; cout * 16 * cin];
    u.par_chunks_mut(16 * cin)
        .zip(weight.par_chunks(9 * cin))
        .for_each(|(uc, wc)| {
            for (ci, g) in wc.chunks_exact(9).enumerate() {
                // G g (3 columns), then (G g) Gᵀ.
                let gg: [[f64; 3]; 4] = std::array::from_fn(|i| {
                    std::array::from_fn(|b| {
                        (0..3).map(|a| WINOGRAD_G[i][a] * g[a * 3 + b] as f64).sum()
                    })
                });
                for xi in 0..16 {
                    let (i, j) = (xi / 4, xi % 4);
                    uc[xi * cin + ci] =
                        (0..3).map(|b| gg[i][b] * WINOGRAD_G[j][b]).sum::<f64>() as f32;
                }
            }
        });
    u
}

/// Channels per step of the Winograd transforms: one AVX2 vector; the 16 values of a tile are
/// loaded into fixed-size arrays so that LLVM turns the per-lane arithmetic into vector ops.
const WINOGRAD_LANES: usize = 8;

/// V = Bᵀ d B for channels c..c + n of one tile (n <= [`WINOGRAD_LANES`]); inlined with n a
/// constant for the full vectors, so that the copies are fixed-size moves, not memcpy calls.
#[inline(always)]
fn winograd_input_lanes(d: &[&[f32]; 16], v: &mut [f32], cin: usize, c: usize, n: usize) {
    const L: usize = WINOGRAD_LANES;
    let mut x = [[0f32; L]; 16];
    for (xk, dk) in x.iter_mut().zip(d) {
        xk[..n].copy_from_slice(&dk[c..c + n]);
    }
    let mut y = [[0f32; L]; 16];
    for l in 0..L {
        // Bᵀ d (rows), column j: t0 = d0 - d2, t1 = d1 + d2, t2 = d2 - d1, t3 = d1 - d3.
        let t: [[f32; 4]; 4] = std::array::from_fn(|j| {
            [
                x[j][l] - x[8 + j][l],
                x[4 + j][l] + x[8 + j][l],
                x[8 + j][l] - x[4 + j][l],
                x[4 + j][l] - x[12 + j][l],
            ]
        });
        // (Bᵀ d) B (columns), row i.
        for i in 0..4 {
            y[4 * i][l] = t[0][i] - t[2][i];
            y[4 * i + 1][l] = t[1][i] + t[2][i];
            y[4 * i + 2][l] = t[2][i] - t[1][i];
            y[4 * i + 3][l] = t[1][i] - t[3][i];
        }
    }
    for (k, yk) in y.iter().enumerate() {
        v[k * cin + c..][..n].copy_from_slice(&yk[..n]);
    }
}

with_avx2! {
    /// V = Bᵀ d B of one 4×4 input tile, every channel at once: `d` the tile's 16 pixels
    /// row-major, `v` 16 rows of `cin` channels (row ξ = 4i + j). Adds and subtracts only.
    fn winograd_input_tile(d: &[&[f32]; 16], v: &mut [f32]) {
        const L: usize = WINOGRAD_LANES;
        let cin = v.len() / 16;
        let full = cin / L * L;
        for c in (0..full).step_by(L) {
            winograd_input_lanes(d, v, cin, c, L);
        }
        if full < cin {
            winograd_input_lanes(d, v, cin, full, cin - full);
        }
    }
}

/// Y = Aᵀ M A + bias for channels c..c + n of one tile, as [`winograd_input_lanes`].
#[inline(always)]
fn winograd_output_lanes(
    m: &[f32],
    bias: &[f32],
    y0: &mut [f32],
    y1: &mut [f32],
    c: usize,
    n: usize,
) {
    const L: usize = WINOGRAD_LANES;
    let cout = bias.len();
    let mut x = [[0f32; L]; 16];
    for (k, xk) in x.iter_mut().enumerate() {
        xk[..n].copy_from_slice(&m[k * cout + c..][..n]);
    }
    let mut b = [0f32; L];
    b[..n].copy_from_slice(&bias[c..c + n]);
    let mut y = [[0f32; L]; 4];
    for l in 0..L {
        // Aᵀ M (rows), column j: s0 = m0 + m1 + m2, s1 = m1 - m2 - m3.
        let s0: [f32; 4] = std::array::from_fn(|j| x[j][l] + x[4 + j][l] + x[8 + j][l]);
        let s1: [f32; 4] = std::array::from_fn(|j| x[4 + j][l] - x[8 + j][l] - x[12 + j][l]);
        y[0][l] = s0[0] + s0[1] + s0[2] + b[l];
        y[1][l] = s0[1] - s0[2] - s0[3] + b[l];
        y[2][l] = s1[0] + s1[1] + s1[2] + b[l];
        y[3][l] = s1[1] - s1[2] - s1[3] + b[l];
    }
    y0[c..c + n].copy_from_slice(&y[0][..n]);
    y0[cout + c..][..n].copy_from_slice(&y[1][..n]);
    y1[c..c + n].copy_from_slice(&y[2][..n]);
    y1[cout + c..][..n].copy_from_slice(&y[3][..n]);
}

with_avx2! {
    /// Y = Aᵀ M A + bias of one tile: `m` 16 rows of `cout` channels (row ξ = 4i + j), `y0` and
    /// `y1` the two output pixels of the tile's first and second row (2·Cout each).
    fn winograd_output_tile(m: &[f32], bias: &[f32], y0: &mut [f32], y1: &mut [f32]) {
        const L: usize = WINOGRAD_LANES;
        let cout = bias.len();
        let full = cout / L * L;
        for c in (0..full).step_by(L) {
            winograd_output_lanes(m, bias, y0, y1, c, L);
        }
        if full < cout {
            winograd_output_lanes(m, bias, y0, y1, full, cout - full);
        }
    }
}

/// A 3×3 convolution (stride 1, zero padding 1) as Winograd F(2×2, 3×3) (Lavin & Gray 2015,
/// "Fast Algorithms for Convolutional Neural Networks"): each 2×2 block of outputs comes from a
/// 4×4 input tile as Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A, so the channel mixing is 16 GEMMs
/// [tiles, Cin]·[Cin, Cout] over P/4 tiles: 16/36 of direct convolution's multiply-adds. Per
/// band of tile rows (bounded scratch, as [`conv_taps`]): the input transform into V
/// [tiles, 16, Cin], the 16 GEMMs into M [tiles, 16, Cout], the output transform + bias (+ SiLU)
/// into the output rows; a last tile row or column past an odd height or width computes its
/// outputs and drops them. `src(b, y, x)` as in [`conv_blocks`]; `weight` is [Cout, Cin, 3, 3].
/// Rounding: the transforms add a few f32 roundings per output; on the decoder's statistics the
/// relative L2 against the f64 twin is 3e-7, as the GEMM path's (tests/fast.rs).
#[allow(clippy::too_many_arguments)]
fn conv_winograd<'a>(
    src: impl Fn(usize, usize, usize) -> &'a [f32] + Sync,
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    oh: usize,
    ow: usize,
    cin: usize,
    cout: usize,
    silu: bool,
    out: &mut [f32],
) {
    let u = winograd_weights(weight, cin, cout);
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let band = (WINOGRAD_TILES / tw).clamp(1, th); // tile rows per band
    let zeros = vec![0f32; cin.max(cout)];
    let bias_row = bias.unwrap_or(&zeros[..cout]);
    let run_band =
        |b: usize, ty0: usize, o: &mut [f32], v: &mut Vec<f32>, m: &mut Vec<f32>, par: Threads| {
            let trows = (o.len() / (ow * cout)).div_ceil(2);
            let tiles = trows * tw;
            v.resize(tiles * 16 * cin, 0.0);
            m.resize(tiles * 16 * cout, 0.0);
            v.par_chunks_mut(tw * 16 * cin)
                .enumerate()
                .for_each(|(tr, vrow)| {
                    let y = 2 * (ty0 + tr); // the tile's first output row; its input rows start at y - 1
                    let sy: [Option<usize>; 4] =
                        std::array::from_fn(|i| (y + i).checked_sub(1).filter(|&s| s < oh));
                    for (tx, vt) in vrow.chunks_exact_mut(16 * cin).enumerate() {
                        let d: [&[f32]; 16] = std::array::from_fn(|k| {
                            let sx = (2 * tx + k % 4).checked_sub(1).filter(|&s| s < ow);
                            match (sy[k / 4], sx) {
                                (Some(sy), Some(sx)) => src(b, sy, sx),
                                _ => &zeros[..cin],
                            }
                        });
                        winograd_input_tile(&d, vt);
                    }
                });
            for xi in 0..16 {
                gemm_into(
                    tiles,
                    cout,
                    cin,
                    m,
                    xi * cout,
                    16 * cout,
                    false,
                    View::new(v, xi * cin, 16 * cin, 1),
                    View::new(&u, xi * cin, 1, 16 * cin),
                    par,
                );
            }
            o.par_chunks_mut(2 * ow * cout)
                .zip(m.par_chunks(tw * 16 * cout))
                .for_each(|(orow, mrow)| {
                    let (r0, r1) = orow.split_at_mut(ow * cout); // r1 is empty on a last odd row
                    let mut r1 = r1.chunks_mut(2 * cout);
                    for (y0, mt) in r0.chunks_mut(2 * cout).zip(mrow.chunks_exact(16 * cout)) {
                        match r1.next() {
                            Some(y1) if y0.len() == 2 * cout => {
                                winograd_output_tile(mt, bias_row, y0, y1)
                            }
                            y1 => {
                                // A tile past the bottom or right edge: compute all four, keep those inside.
                                let mut t = vec![0f32; 4 * cout];
                                let (t0, t1) = t.split_at_mut(2 * cout);
                                winograd_output_tile(mt, bias_row, t0, t1);
                                y0.copy_from_slice(&t0[..y0.len()]);
                                if let Some(y1) = y1 {
                                    y1.copy_from_slice(&t1[..y1.len()]);
                                }
                            }
                        }
                    }
                    if silu {
                        silu_in_place(orow);
                    }
                });
        };
    let out = &mut out[..batch * oh * ow * cout];
    let scratch = || {
        (
            Vec::with_capacity(band * tw * 16 * cin),
            Vec::with_capacity(band * tw * 16 * cout),
        )
    };
    // Bands per image, not per batch, choose between the two: an image's GEMMs then run the same
    // way (same rows, same threading) alone or in a batch, so its bits do not depend on the batch.
    if th.div_ceil(band) >= 2 * rayon::current_num_threads() {
        out.par_chunks_mut(oh * ow * cout)
            .enumerate()
            .for_each(|(b, ob)| {
                ob.par_chunks_mut(2 * band * ow * cout)
                    .enumerate()
                    .for_each_init(scratch, |(v, m), (i, o)| {
                        run_band(b, i * band, o, v, m, Threads::One)
                    })
            });
    } else {
        let (mut v, mut m) = scratch();
        for (b, ob) in out.chunks_mut(oh * ow * cout).enumerate() {
            for (i, o) in ob.chunks_mut(2 * band * ow * cout).enumerate() {
                run_band(b, i * band, o, &mut v, &mut m, Threads::All);
            }
        }
    }
}

/// [`ops::conv2d`] (k×k, stride 1, zero padding k/2), optionally followed by SiLU (the CUDA
/// kernel's fused epilogue).
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    kernel: usize,
    silu: bool,
    out: &mut [f32],
) {
    conv2d_on(
        ConvPath::Auto,
        x,
        weight,
        bias,
        batch,
        h,
        w,
        cin,
        cout,
        kernel,
        silu,
        out,
    );
}

/// [`conv2d`] with the 3×3 algorithm chosen by the caller.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_on(
    path: ConvPath,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    kernel: usize,
    silu: bool,
    out: &mut [f32],
) {
    let src = |b: usize, y: usize, xx: usize| &x[((b * h + y) * w + xx) * cin..][..cin];
    conv_blocks(
        path, src, weight, bias, batch, h, w, cin, cout, kernel, silu, out,
    );
}

/// [`ops::upsample_conv2d`]: the 3×3 conv reads the nearest-2× upsampled input in place, then
/// the pixel-shuffle shortcut is added row by row.
#[allow(clippy::too_many_arguments)]
pub fn upsample_conv2d(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    shortcut: bool,
    out: &mut [f32],
) {
    upsample_conv2d_on(
        ConvPath::Auto,
        x,
        weight,
        bias,
        batch,
        h,
        w,
        cin,
        cout,
        shortcut,
        out,
    );
}

/// [`upsample_conv2d`] with the 3×3 algorithm chosen by the caller.
#[allow(clippy::too_many_arguments)]
pub fn upsample_conv2d_on(
    path: ConvPath,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    shortcut: bool,
    out: &mut [f32],
) {
    let (hh, ww) = (2 * h, 2 * w);
    let src = |b: usize, y: usize, xx: usize| &x[((b * h + y / 2) * w + xx / 2) * cin..][..cin];
    conv_blocks(
        path, src, weight, bias, batch, hh, ww, cin, cout, 3, false, out,
    );
    if shortcut {
        let r = 4 * cout / cin;
        out[..batch * hh * ww * cout]
            .par_chunks_mut(ww * cout)
            .enumerate()
            .for_each(|(row, o)| {
                let (b, y) = (row / hh, row % hh);
                for (xx, px) in o.chunks_exact_mut(cout).enumerate() {
                    let s = &x[((b * h + y / 2) * w + xx / 2) * cin..][..cin];
                    for (c, v) in px.iter_mut().enumerate() {
                        *v += s[(4 * c + 2 * (y % 2) + xx % 2) / r];
                    }
                }
            });
    }
}

/// [`ops::grouped_linear`]: one GEMM per group on strided column ranges.
pub fn grouped_linear(
    x: &[f32],
    weight: &[f32],
    cin: usize,
    cout: usize,
    groups: usize,
    out: &mut [f32],
) {
    let (ci, co) = (cin / groups, cout / groups);
    let rows = out.len() / cout;
    for g in 0..groups {
        let xv = View::new(x, g * ci, cin, 1);
        let wv = View::new(weight, g * co * ci, 1, ci);
        gemm_into(rows, co, ci, out, g * co, cout, false, xv, wv, Threads::All);
    }
}

/// Output rows per task of [`rmsnorm_relu_conv2d`]: each task normalises its rows plus the k - 1
/// rows of context around them, so the normalised tensor exists only a band at a time.
const NORM_CONV_BAND: usize = 8;

/// [`ops::rmsnorm_relu_conv2d`] for few output channels: per task (a band of output rows of one
/// image), RMSNorm + ReLU of the rows it reads into a scratch band, then a direct convolution,
/// one dot product over the channels per (output channel, tap) with the weights permuted once
/// per call to [Cout, k·k, Cin]. No full-size temporary, no im2col; f32 accumulation in another
/// order than the twin's sgemm.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_relu_conv2d(
    x: &[f32],
    norm_weight: &[f32],
    norm_bias: Option<&[f32]>,
    eps: f32,
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    kernel: usize,
    out: &mut [f32],
) {
    let (taps, p) = (kernel * kernel, kernel / 2);
    let mut wt = vec![0f32; cout * taps * cin];
    for o in 0..cout {
        for ci in 0..cin {
            for t in 0..taps {
                wt[(o * taps + t) * cin + ci] = weight[(o * cin + ci) * taps + t];
            }
        }
    }
    let out = &mut out[..batch * h * w * cout];
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(h * w * cout)
        .enumerate()
        .for_each(|(b, ob)| {
            ob.par_chunks_mut(NORM_CONV_BAND * w * cout)
                .enumerate()
                .for_each_init(Vec::new, |band: &mut Vec<f32>, (i, o)| {
                    let (y0, rows) = (i * NORM_CONV_BAND, o.len() / (w * cout));
                    let (lo, hi) = (y0.saturating_sub(p), (y0 + rows + p).min(h));
                    band.resize((hi - lo) * w * cin, 0.0);
                    ops::rmsnorm(
                        &x[(b * h + lo) * w * cin..(b * h + hi) * w * cin],
                        norm_weight,
                        norm_bias,
                        eps,
                        cin,
                        band,
                    );
                    band.iter_mut().for_each(|v| *v = v.max(0.0));
                    let mut acc = vec![0f32; cout];
                    for yy in 0..rows {
                        for xx in 0..w {
                            match bias {
                                Some(bb) => acc.copy_from_slice(bb),
                                None => acc.fill(0.0),
                            }
                            for dy in 0..kernel {
                                let Some(sy) = (y0 + yy + dy).checked_sub(p).filter(|&s| s < h)
                                else {
                                    continue;
                                };
                                for dx in 0..kernel {
                                    let Some(sx) = (xx + dx).checked_sub(p).filter(|&s| s < w)
                                    else {
                                        continue;
                                    };
                                    let src = &band[((sy - lo) * w + sx) * cin..][..cin];
                                    let t = dy * kernel + dx;
                                    for (oc, a) in acc.iter_mut().enumerate() {
                                        *a += dot(src, &wt[(oc * taps + t) * cin..][..cin]);
                                    }
                                }
                            }
                            o[(yy * w + xx) * cout..][..cout].copy_from_slice(&acc);
                        }
                    }
                });
        });
}

/// `Σ a·b` in 8 independent lanes (vectorises), then the lanes summed.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// [`ops::ada_layernorm`]: the two table rows ([batch, cols], small) as the twin makes them, then
/// [`layernorm`] across threads.
#[allow(clippy::too_many_arguments)]
pub fn ada_layernorm(
    x: &[f32],
    t: &[f32],
    table: &[f32],
    d: ops::AdaDims,
    scale: usize,
    shift: usize,
    eps: f32,
    out: &mut [f32],
) {
    let sc = ops::modulation_row(t, table, d.batch, d.k, d.cols, scale);
    let sh = ops::modulation_row(t, table, d.batch, d.k, d.cols, shift);
    layernorm(
        x,
        None,
        None,
        eps,
        d.cols,
        Some(ModulationRef {
            scale: &sc,
            shift: &sh,
            tokens: d.tokens,
        }),
        out,
    )
}

/// [`ops::ada_gated_add`]: the gate row as the twin makes it, then [`gated_add`] across threads.
#[allow(clippy::too_many_arguments)]
pub fn ada_gated_add(
    x: &[f32],
    t: &[f32],
    table: &[f32],
    d: ops::AdaDims,
    gate: usize,
    y: &[f32],
    out: &mut [f32],
) {
    let g = ops::modulation_row(t, table, d.batch, d.k, d.cols, gate);
    gated_add(x, &g, y, d.tokens, d.cols, out)
}

/// [`ops::silu_depthwise_conv_glu`]: the SiLU once per element into a scratch copy (on the CPU
/// that is cheaper than evaluating it in each of the k² taps that read an element, as the CUDA
/// kernel does to save the memory pass), then [`depthwise_conv_glu`].
#[allow(clippy::too_many_arguments)]
pub fn silu_depthwise_conv_glu(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    c2: usize,
    kernel: usize,
    out: &mut [f32],
) {
    let mut a = vec![0f32; batch * h * w * c2];
    unary(UnaryFn::Silu, &x[..a.len()], &mut a);
    depthwise_conv_glu(&a, weight, bias, batch, h, w, c2, kernel, out)
}

/// [`ops::mixffn_inverted_glu`]: the GEMM into a scratch buffer, then [`silu_depthwise_conv_glu`]
/// (which holds the SiLU's copy): the 2H-wide f32 buffers outside the memory plan that the two-op
/// graph held next to its planned GEMM output.
#[allow(clippy::too_many_arguments)]
pub fn mixffn_inverted_glu(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    dw_weight: &[f32],
    dw_bias: Option<&[f32]>,
    batch: usize,
    h: usize,
    w: usize,
    k: usize,
    c2: usize,
    out: &mut [f32],
) {
    let mut inverted = vec![0f32; batch * h * w * c2];
    linear(x, weight, bias, batch * h * w, k, c2, &mut inverted);
    // The same fast SiLU as the two-op graph's `silu_depthwise_conv_glu`: a MixFFN node
    // and its two-op form give the same bits, whichever a graph holds.
    silu_depthwise_conv_glu(&inverted, dw_weight, dw_bias, batch, h, w, c2, 3, out)
}

/// [`ops::linear_residual`]: [`linear`], then the residual added across threads.
#[allow(clippy::too_many_arguments)]
pub fn linear_residual(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    linear(x, w, bias, rows, k, n, out);
    out[..rows * n]
        .par_chunks_mut(ELEMS_PER_TASK)
        .zip(residual.par_chunks(ELEMS_PER_TASK))
        .for_each(|(o, r)| {
            for (o, &r) in o.iter_mut().zip(r) {
                *o += r;
            }
        });
}

/// Rows per parallel task of the data-movement ops for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (ELEMS_PER_TASK / width.max(1)).max(1)
}

/// [`ops::transpose`] in tiles of 32×32 (both sides stay in cache); tasks of 32 output rows (input
/// columns) of one sample across threads.
pub fn transpose(x: &[f32], batch: usize, rows: usize, cols: usize, out: &mut [f32]) {
    const TILE: usize = 32;
    let n = rows * cols;
    if n == 0 {
        return;
    }
    out[..batch * n]
        .par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(yo, xi)| {
            yo.par_chunks_mut(TILE * rows)
                .enumerate()
                .for_each(|(t, yb)| {
                    let c0 = t * TILE;
                    for r0 in (0..rows).step_by(TILE) {
                        for c in c0..(c0 + TILE).min(cols) {
                            let y = &mut yb[(c - c0) * rows..][..rows];
                            for r in r0..(r0 + TILE).min(rows) {
                                y[r] = xi[r * cols + c];
                            }
                        }
                    }
                })
        });
}

/// [`ops::concat`], row blocks across threads.
pub fn concat(xs: &[&[f32]], widths: &[usize], out: &mut [f32]) {
    let total: usize = widths.iter().sum();
    if total == 0 {
        return;
    }
    let rows_per = rows_per_task(total);
    out.par_chunks_mut(rows_per * total)
        .enumerate()
        .for_each(|(t, o)| {
            let r0 = t * rows_per;
            let rows = o.len() / total;
            let parts: Vec<&[f32]> = xs
                .iter()
                .zip(widths)
                .map(|(x, &wd)| &x[r0 * wd..(r0 + rows) * wd])
                .collect();
            ops::concat(&parts, widths, o);
        });
}

/// [`ops::chunk`], samples across threads.
pub fn chunk(x: &[f32], batch: usize, k: usize, c: usize, index: usize, out: &mut [f32]) {
    if c == 0 {
        return;
    }
    out[..batch * c]
        .par_chunks_mut(c)
        .enumerate()
        .with_min_len(rows_per_task(c))
        .for_each(|(b, o)| o.copy_from_slice(&x[(b * k + index) * c..][..c]));
}

/// [`ops::repeat_channels`], row blocks across threads.
pub fn repeat_channels(x: &[f32], cin: usize, repeats: usize, out: &mut [f32]) {
    let (width, rows_per) = (cin * repeats, rows_per_task(cin * repeats));
    if width == 0 {
        return;
    }
    out.par_chunks_mut(rows_per * width)
        .zip(x.par_chunks(rows_per * cin))
        .for_each(|(o, xi)| ops::repeat_channels(xi, cin, repeats, o));
}

/// [`ops::slice_tokens`], samples across threads.
pub fn slice_tokens(
    x: &[f32],
    batch: usize,
    tokens: usize,
    c: usize,
    start: usize,
    len: usize,
    out: &mut [f32],
) {
    out[..batch * len * c]
        .par_chunks_mut((len * c).max(1))
        .enumerate()
        .for_each(|(b, o)| o.copy_from_slice(&x[(b * tokens + start) * c..][..len * c]));
}

/// [`ops::embedding_gather`], token blocks across threads.
pub fn embedding_gather(
    ids: &[f32],
    table: &[f32],
    extra: Option<&[f32]>,
    d: usize,
    out: &mut [f32],
) {
    let per = rows_per_task(d);
    out[..ids.len() * d]
        .par_chunks_mut(per * d)
        .zip(ids.par_chunks(per))
        .for_each(|(o, ids)| ops::embedding_gather(ids, table, extra, d, o));
}
