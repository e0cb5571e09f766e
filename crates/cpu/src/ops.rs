//! The f32 reference ops: each written plainly, one function per CUDA kernel family, so a kernel's
//! CPU twin is easy to find (`kernels/norm.cu::rmsnorm_*` <-> `ops::rmsnorm`). Row statistics are
//! accumulated in f64 so the oracle is at least as exact as PyTorch's f32.

use openuni_graph::{coeff, UnaryFn};

/// RMSNorm over rows of `cols` values: `x / sqrt(mean(x²) + eps) · w (+ b)`.
pub fn rmsnorm(x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32, cols: usize, out: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / cols as f64;
        let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for j in 0..cols {
            yr[j] = xr[j] * inv * w[j] + b.map_or(0.0, |b| b[j]);
        }
    }
}

/// `residual + rmsnorm(x)`: [`rmsnorm`] then [`add`] with the residual first, as DC-AE's blocks
/// compute `x + norm(y)` (bit-identical to the two ops).
pub fn rmsnorm_residual(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    residual: &[f32],
    eps: f32,
    cols: usize,
    out: &mut [f32],
) {
    rmsnorm(x, w, b, eps, cols, out);
    for (y, &r) in out.iter_mut().zip(residual) {
        *y += r; // r + y: the same bits (f32 addition is commutative)
    }
}

/// adaLN modulation operands: `scale`/`shift` hold one row of `cols` per sample, each sample owning
/// `tokens` consecutive rows of the input.
#[derive(Clone, Copy)]
pub struct ModulationRef<'a> {
    pub scale: &'a [f32],
    pub shift: &'a [f32],
    pub tokens: usize,
}

/// LayerNorm over rows of `cols`: `(x - mean) / sqrt(var + eps) (· w) (+ b)`, then optionally
/// `· (1 + scale) + shift` per sample (biased variance, as PyTorch).
pub fn layernorm(
    x: &[f32],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    eps: f32,
    cols: usize,
    modulation: Option<ModulationRef>,
    out: &mut [f32],
) {
    for (r, (xr, yr)) in x
        .chunks_exact(cols)
        .zip(out.chunks_exact_mut(cols))
        .enumerate()
    {
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for j in 0..cols {
            let mut y = ((xr[j] as f64 - mean) * inv) as f32;
            if let Some(w) = w {
                y *= w[j];
            }
            if let Some(b) = b {
                y += b[j];
            }
            if let Some(m) = modulation {
                let s = (r / m.tokens) * cols + j;
                y = y * (1.0 + m.scale[s]) + m.shift[s];
            }
            yr[j] = y;
        }
    }
}

/// InternVL's pixel shuffle v2 (scale 0.5) as a gather: `x` [batch, skip + g·g, c] -> [batch,
/// (g/2)², 4c], row r·(g/2) + q holding tokens `skip + (2r + dy)·g + 2q + dx` as channels
/// `(2·dy + dx)·c + ch` (what the model's view/permute/view/permute computes).
pub fn pixel_shuffle(x: &[f32], batch: usize, grid: usize, skip: usize, c: usize, out: &mut [f32]) {
    let (h, tokens) = (grid / 2, skip + grid * grid);
    for b in 0..batch {
        for (row, (r, q)) in (0..h).flat_map(|r| (0..h).map(move |q| (r, q))).enumerate() {
            for (seg, (dy, dx)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                let src = (b * tokens + skip + (2 * r + dy) * grid + 2 * q + dx) * c;
                let dst = ((b * h * h + row) * 4 + seg) * c;
                out[dst..dst + c].copy_from_slice(&x[src..src + c]);
            }
        }
    }
}

/// `Op::PixelShuffleLayerNorm`: [`pixel_shuffle`], then [`layernorm`] over the 4c channels.
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
    pixel_shuffle(x, batch, grid, skip, c, &mut shuffled);
    layernorm(&shuffled, Some(w), Some(b), eps, 4 * c, None, out);
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    let k = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())) as f32
}

pub fn gelu_erf(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}

pub fn unary(f: UnaryFn, x: &[f32], out: &mut [f32]) {
    let g: fn(f32) -> f32 = match f {
        UnaryFn::Silu => silu,
        UnaryFn::GeluTanh => gelu_tanh,
        UnaryFn::GeluErf => gelu_erf,
        UnaryFn::Relu => |v| v.max(0.0),
    };
    for (y, &v) in out.iter_mut().zip(x) {
        *y = g(v);
    }
}

pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((y, &p), &q) in out.iter_mut().zip(a).zip(b) {
        *y = p + q;
    }
}

/// `x + gate · y`, with one `gate` row of `cols` per sample of `tokens` rows.
pub fn gated_add(x: &[f32], gate: &[f32], y: &[f32], tokens: usize, cols: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let (row, j) = (i / cols, i % cols);
        *o = x[i] + gate[(row / tokens) * cols + j] * y[i];
    }
}

/// `out[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias)` through matrixmultiply's sgemm.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
) {
    assert!(x.len() >= rows * k && w.len() >= n * k && out.len() >= rows * n);
    if let Some(b) = bias {
        for r in out[..rows * n].chunks_exact_mut(n) {
            r.copy_from_slice(b);
        }
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    // SAFETY: the asserts above bound every index sgemm touches with these strides.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            beta,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Shapes of one softmax attention call (see `Op::Attention`).
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

/// The additive logit bias diffusers gives a padded key (mask 0): −10000, not −∞.
pub const MASKED_KEY_BIAS: f32 = -10000.0;

/// Softmax attention, head by head, softmax in f64. Query head h reads key/value head
/// h / (heads / kv_heads), as GQA's repeat_kv does. Causal masking aligns the last query with the
/// last key. `key_mask` [B, M] (1 keep, 0 pad) adds `(1 − mask)·(−10000)` to the logits.
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[f32]>,
    d: AttentionDims,
    out: &mut [f32],
) {
    let (qw, kw, hd) = (d.heads * d.head_dim, d.kv_heads * d.head_dim, d.head_dim);
    let group = d.heads / d.kv_heads;
    let mut p = vec![0f64; d.kv_len];
    for b in 0..d.batch {
        for h in 0..d.heads {
            let kh = h / group;
            for i in 0..d.q_len {
                let qrow = &q[(b * d.q_len + i) * qw + h * hd..][..hd];
                let visible = if d.causal {
                    i + d.kv_len - d.q_len + 1
                } else {
                    d.kv_len
                };
                let mut max = f64::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(visible) {
                    let krow = &k[(b * d.kv_len + j) * kw + kh * hd..][..hd];
                    let s: f32 = qrow.iter().zip(krow).map(|(a, c)| a * c).sum();
                    let bias =
                        key_mask.map_or(0.0, |m| (1.0 - m[b * d.kv_len + j]) * MASKED_KEY_BIAS);
                    *pj = (s * d.scale + bias) as f64;
                    max = max.max(*pj);
                }
                let mut sum = 0.0;
                for pj in p.iter_mut().take(visible) {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let orow = &mut out[(b * d.q_len + i) * qw + h * hd..][..hd];
                orow.fill(0.0);
                let mut acc = vec![0f64; hd];
                for (j, pj) in p.iter().enumerate().take(visible) {
                    let vrow = &v[(b * d.kv_len + j) * kw + kh * hd..][..hd];
                    for (a, &vv) in acc.iter_mut().zip(vrow) {
                        *a += pj / sum * vv as f64;
                    }
                }
                for (o, a) in orow.iter_mut().zip(acc) {
                    *o = a as f32;
                }
            }
        }
    }
}

/// SANA's ReLU linear attention (diffusers `SanaLinearAttnProcessor2_0`), per batch and head of
/// `head_dim` channels: `out_n = Σ_m v_m (k_m·q_n) / (Σ_m k_m·q_n + 1e-15)` with ReLU on q and k.
/// The state `Σ_m k_m v_mᵀ` and the key sum are accumulated in f64 (the oracle of the f32 kernel).
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
    let (c, hd) = (heads * head_dim, head_dim);
    let mut kv = vec![0f64; hd * hd];
    let mut ksum = vec![0f64; hd];
    for b in 0..batch {
        for h in 0..heads {
            kv.fill(0.0);
            ksum.fill(0.0);
            for m in 0..tokens {
                let base = (b * tokens + m) * c + h * hd;
                for i in 0..hd {
                    let ki = k[base + i].max(0.0) as f64;
                    ksum[i] += ki;
                    for j in 0..hd {
                        kv[i * hd + j] += ki * v[base + j] as f64;
                    }
                }
            }
            for n in 0..tokens {
                let base = (b * tokens + n) * c + h * hd;
                let qn: Vec<f64> = q[base..base + hd]
                    .iter()
                    .map(|&x| x.max(0.0) as f64)
                    .collect();
                let den: f64 = qn.iter().zip(&ksum).map(|(a, s)| a * s).sum::<f64>() + 1e-15;
                for j in 0..hd {
                    let num: f64 = (0..hd).map(|i| qn[i] * kv[i * hd + j]).sum();
                    out[base + j] = (num / den) as f32;
                }
            }
        }
    }
}

/// adaLN-single's table: `out[b, j, :] = table[j, :] + t_row(b, j)`, where `t` holds k·C values per
/// sample (one row per j) or C values (the same row for every j).
pub fn modulation_table(
    t: &[f32],
    table: &[f32],
    batch: usize,
    k: usize,
    c: usize,
    out: &mut [f32],
) {
    let per_row = t.len() / batch == k * c;
    for b in 0..batch {
        for j in 0..k {
            for i in 0..c {
                let tv = if per_row {
                    t[b * k * c + j * c + i]
                } else {
                    t[b * c + i]
                };
                out[(b * k + j) * c + i] = table[j * c + i] + tv;
            }
        }
    }
}

/// Row `index` of each sample of a [B, k, C] tensor.
pub fn chunk(x: &[f32], batch: usize, k: usize, c: usize, index: usize, out: &mut [f32]) {
    for b in 0..batch {
        out[b * c..(b + 1) * c].copy_from_slice(&x[(b * k + index) * c..][..c]);
    }
}

/// diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`. The
/// frequencies and the arguments are rounded to f32 exactly as PyTorch computes them, since at
/// t ≈ 1000 the argument's rounding is visible in the output.
pub fn timestep_embedding(t: &[f32], dim: usize, out: &mut [f32]) {
    let half = dim / 2;
    let ln = -(10000f64.ln() as f32);
    for (b, &tb) in t.iter().enumerate() {
        for i in 0..half {
            let freq = (ln * i as f32 / half as f32).exp();
            let arg = (tb * freq) as f64;
            out[b * dim + i] = arg.cos() as f32;
            out[b * dim + half + i] = arg.sin() as f32;
        }
    }
}

/// `Op::EmbeddingGather`: row `ids[t]` of `table` [V, D] (then of `extra` [E, D]) into row t of
/// `out`; an id that is not an integer in [0, V + E) gives a NaN row.
pub fn embedding_gather(
    ids: &[f32],
    table: &[f32],
    extra: Option<&[f32]>,
    d: usize,
    out: &mut [f32],
) {
    let v = table.len() / d.max(1);
    let e = extra.map_or(0, |x| x.len() / d.max(1));
    for (t, &id) in ids.iter().enumerate() {
        let row = &mut out[t * d..(t + 1) * d];
        let ok = id >= 0.0 && id.fract() == 0.0 && (id as usize) < v + e;
        match (ok, id as usize) {
            (true, i) if i < v => row.copy_from_slice(&table[i * d..(i + 1) * d]),
            (true, i) => {
                row.copy_from_slice(&extra.expect("id below V + E")[(i - v) * d..(i - v + 1) * d])
            }
            (false, _) => row.fill(f32::NAN),
        }
    }
}

/// The one definition of the uint8 pixel rule: `x` in nominal [-1, 1] -> `127.5·x + 128` (two
/// f32 roundings, no fused multiply-add), clamped to [0, 255] and truncated; NaN -> 0 (the
/// pipeline refuses a non-finite image before any pixel is written).
pub fn quantize_u8(x: f32) -> u8 {
    (127.5 * x + 128.0).clamp(0.0, 255.0) as u8
}

/// `Op::QuantizeU8`: a decoded image [B, 3, H, W] -> pixel values [B, H, W, 3] ([`quantize_u8`]).
pub fn quantize_image_u8(x: &[f32], batch: usize, pixels: usize, out: &mut [f32]) {
    for b in 0..batch {
        for c in 0..3 {
            for p in 0..pixels {
                out[(b * pixels + p) * 3 + c] = quantize_u8(x[(b * 3 + c) * pixels + p]) as f32;
            }
        }
    }
}

/// `Op::AnyNonFinite`: 1 if any value is NaN or ±Inf, else 0.
pub fn any_nonfinite(x: &[f32]) -> f32 {
    x.iter().any(|v| !v.is_finite()) as u8 as f32
}

/// `Op::GuidedX0`: `out = x − σ·(u + g·(c − u))` with `u`, `c` the halves of `v` (uncond rows,
/// then cond rows) and g, σ from `k` (`openuni_graph::coeff`). The sampler's guidance and clean
/// estimate, in the order and f32 roundings of `openuni_models::scheduler` (guide, then step).
pub fn guided_x0(v: &[f32], x: &[f32], k: &[f32], out: &mut [f32]) {
    let (g, s) = (k[coeff::GUIDANCE], k[coeff::SIGMA]);
    let (uncond, cond) = v.split_at(x.len());
    for (((o, &xv), &u), &c) in out.iter_mut().zip(x).zip(uncond).zip(cond) {
        let guided = u + g * (c - u);
        *o = xv - s * guided;
    }
}

/// `Op::DpmSolverUpdate`: by `k[ORDER]`, `d0` (0, Euler), `ratio·x − c·d0` (1) or
/// `(ratio·x − c·d0) − half_c·(inv_r0·(d0 − p))` (2), coefficients from `k` (`openuni_graph::coeff`).
pub fn dpm_solver_update(x: &[f32], x0: &[f32], prev: &[f32], k: &[f32], out: &mut [f32]) {
    let (ratio, c, half_c, inv_r0) = (
        k[coeff::RATIO],
        k[coeff::C],
        k[coeff::HALF_C],
        k[coeff::INV_R0],
    );
    let order = k[coeff::ORDER];
    for (((o, &xv), &d0), &p) in out.iter_mut().zip(x).zip(x0).zip(prev) {
        *o = if order == 0.0 {
            d0
        } else if order == 1.0 {
            ratio * xv - c * d0
        } else {
            let d1 = inv_r0 * (d0 - p);
            ratio * xv - c * d0 - half_c * d1
        };
    }
}

/// `Op::DivScalar`: `x / divisor`, one IEEE f32 division per element (never a multiply by the
/// reciprocal, which rounds differently): the one definition of the decoder's input
/// `latents / scaling_factor` (the pipeline's host path calls it too).
pub fn div_scalar(x: &[f32], divisor: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v / divisor;
    }
}

/// `Op::GaussianNoise`: `per_seed` standard-normal values for each seed of `seeds` (rows of
/// `openuni_graph::seed::LIMBS` limbs), row after row. Value j of a seed: Philox4x32-10 of
/// counter (j / 4 as a u64, 0, 0) under key (seed low 32 bits, seed high 32 bits) gives four
/// words; Box–Muller turns words (0, 1) into values 0, 1 and words (2, 3) into values 2, 3
/// ([`box_muller`]). The one definition: kernels/misc.cu's `gaussian_noise` makes the same
/// bits (only IEEE-exact integer ops, multiplies, adds, fused multiply-adds and square roots).
pub fn gaussian_noise(seeds: &[f32], per_seed: usize, out: &mut [f32]) {
    let limbs = openuni_graph::seed::LIMBS;
    for (lr, or) in seeds
        .chunks_exact(limbs)
        .zip(out.chunks_mut(per_seed.max(1)))
    {
        let seed = openuni_graph::seed::from_limbs(lr);
        let key = [seed as u32, (seed >> 32) as u32];
        for (g, o4) in or.chunks_mut(4).enumerate() {
            let w = philox4x32_10([g as u32, ((g as u64) >> 32) as u32, 0, 0], key);
            let (z0, z1) = box_muller(w[0], w[1]);
            let (z2, z3) = box_muller(w[2], w[3]);
            for (o, z) in o4.iter_mut().zip([z0, z1, z2, z3]) {
                *o = z;
            }
        }
    }
}

/// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
/// SC 2011), with Random123's multipliers and key increments.
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (ctr, key);
    for round in 0..10 {
        if round > 0 {
            k = [
                k[0].wrapping_add(0x9E37_79B9),
                k[1].wrapping_add(0xBB67_AE85),
            ];
        }
        let p0 = 0xD251_1F53u64 * c[0] as u64;
        let p1 = 0xCD9E_8D57u64 * c[2] as u64;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// Two standard-normal values from two random words: radius `sqrt(-2 ln u1)` with `u1` in
/// (0, 1] from `a`'s top 24 bits, angle `2π u2` with `u2` in [0, 1) from `b`'s; (r cos, r sin).
pub fn box_muller(a: u32, b: u32) -> (f32, f32) {
    let u1 = ((a >> 8) + 1) as f32 * (1.0 / 16_777_216.0);
    let r = (-2.0 * noise_ln(u1)).sqrt();
    let (s, c) = noise_sincos_turn(b >> 8);
    (r * c, r * s)
}

/// ln x for x in (0, 1] (normal numbers): Cephes' `logf` (S. L. Moshier) reduction and
/// polynomial, every operation spelled out, so the kernel's twin rounds the same way.
pub fn noise_ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 126;
    // x = m · 2^e with m in [0.5, 1).
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    if m < std::f32::consts::FRAC_1_SQRT_2 {
        e -= 1;
        m = (m + m) - 1.0;
    } else {
        m -= 1.0;
    }
    let z = m * m;
    let mut p = 7.0376836e-2f32;
    for c in [
        -1.151461e-1f32,
        1.16769984e-1,
        -1.2420141e-1,
        1.4249323e-1,
        -1.6668057e-1,
        2.0000714e-1,
        -2.4999994e-1,
        3.333333e-1,
    ] {
        p = p.mul_add(m, c);
    }
    let fe = e as f32;
    let mut y = (p * m) * z;
    y = fe.mul_add(-2.1219444e-4, y);
    y = (-0.5f32).mul_add(z, y);
    // ln 2 split: 0.6933594 is 355/512 exactly (the kernel's 0.693359375f), the rest went into y.
    (m + y) + fe * 0.693_359_4
}

/// (sin, cos) of the angle `2π t / 2^24` for `t` < 2^24: the nearest quarter turn is taken out
/// in integers (exact), the rest, |x| <= π/4, goes through Cephes' `sinf`/`cosf` polynomials.
pub fn noise_sincos_turn(t: u32) -> (f32, f32) {
    let q = ((t + (1 << 21)) >> 22) & 3;
    let f = t as i32 - (((t + (1 << 21)) >> 22) << 22) as i32; // in [-2^21, 2^21)
    let x = f as f32 * (std::f32::consts::PI / 8_388_608.0); // f · (π/2) / 2^22
    let z = x * x;
    let ps = (-1.9515296e-4f32)
        .mul_add(z, 8.332161e-3)
        .mul_add(z, -1.6666655e-1);
    let s = (ps * z).mul_add(x, x);
    let pc = 2.4433157e-5f32
        .mul_add(z, -1.3887316e-3)
        .mul_add(z, 4.1666646e-2);
    let c = pc.mul_add(z * z, (-0.5f32).mul_add(z, 1.0));
    match q {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

/// [batch, rows, cols] -> [batch, cols, rows].
pub fn transpose(x: &[f32], batch: usize, rows: usize, cols: usize, out: &mut [f32]) {
    for b in 0..batch {
        let (xi, yo) = (
            &x[b * rows * cols..][..rows * cols],
            &mut out[b * rows * cols..][..rows * cols],
        );
        for r in 0..rows {
            for c in 0..cols {
                yo[c * rows + r] = xi[r * cols + c];
            }
        }
    }
}

/// Depthwise k×k convolution, zero padding k/2, over tokens [B, h·w, C] on an h×w grid;
/// `weight` [C, 1, k, k].
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
    let p = (kernel / 2) as isize;
    for b in 0..batch {
        for y in 0..h {
            for xx in 0..w {
                let o = &mut out[((b * h + y) * w + xx) * c..][..c];
                for (ch, ov) in o.iter_mut().enumerate() {
                    let mut acc = bias.map_or(0.0, |bb| bb[ch] as f64);
                    for dy in 0..kernel {
                        let sy = y as isize + dy as isize - p;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        for dx in 0..kernel {
                            let sx = xx as isize + dx as isize - p;
                            if sx < 0 || sx >= w as isize {
                                continue;
                            }
                            let xv = x[((b * h + sy as usize) * w + sx as usize) * c + ch];
                            acc += weight[(ch * kernel + dy) * kernel + dx] as f64 * xv as f64;
                        }
                    }
                    *ov = acc as f32;
                }
            }
        }
    }
}

/// `[u | g] -> u · silu(g)` over rows of 2·`hh` values.
pub fn glu_silu(x: &[f32], hh: usize, out: &mut [f32]) {
    for r in 0..out.len() / hh {
        for i in 0..hh {
            out[r * hh + i] = x[r * 2 * hh + i] * silu(x[r * 2 * hh + hh + i]);
        }
    }
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// The rotary inverse frequencies as transformers computes them in f32:
/// `1 / theta^(float(2i) / head_dim)`.
pub fn rope_inv_freq(theta: f32, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Rotary embedding ("rotate_half") on [batch, tokens, heads·head_dim], token t at position t.
/// Angles are f32 products like transformers'; cos/sin of the f32 angle are taken in f64.
pub fn rope(
    x: &[f32],
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
    theta: f32,
    out: &mut [f32],
) {
    let pos: Vec<usize> = (0..batch).flat_map(|_| 0..tokens).collect();
    rope_at(x, &pos, heads, head_dim, theta, out)
}

/// The (cos, sin) of RoPE at `pos` for frequency `inv_freq`: the f32 angle, cos/sin in f64
/// rounded to f32. The CUDA kernels use tables of exactly these values.
pub fn rope_cos_sin(pos: usize, inv_freq: f32) -> (f32, f32) {
    let ang = (pos as f32 * inv_freq) as f64;
    (ang.cos() as f32, ang.sin() as f32)
}

/// [`rope`] with an explicit position per token row (`positions.len()` rows of heads·head_dim).
pub fn rope_at(
    x: &[f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    theta: f32,
    out: &mut [f32],
) {
    let inv = rope_inv_freq(theta, head_dim);
    let half = head_dim / 2;
    for (r, &p) in positions.iter().enumerate() {
        for i in 0..half {
            let (c, s) = rope_cos_sin(p, inv[i]);
            for h in 0..heads {
                let base = (r * heads + h) * head_dim;
                let (x1, x2) = (x[base + i], x[base + half + i]);
                out[base + i] = x1 * c - x2 * s;
                out[base + half + i] = x2 * c + x1 * s;
            }
        }
    }
}

/// The RoPE position of every token row of `batch` rows of `tokens`: restarting at 0 at each
/// segment start when `segments` is given (batch 1), else 0..tokens per row.
pub fn token_positions(batch: usize, tokens: usize, segments: Option<&[usize]>) -> Vec<usize> {
    match segments {
        Some(s) => s.iter().flat_map(|&len| 0..len).collect(),
        None => (0..batch).flat_map(|_| 0..tokens).collect(),
    }
}

/// `Op::Attention` with its packed segments and fused RoPE: RoPE (as [`rope_at`]) on q and k,
/// then [`attention`] on each segment as its own sequence (batch 1) or on the whole batch.
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
    attention_ext_with(
        AttentionParts { rope_at, attention },
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

/// The two computations [`attention_ext_with`] is made of: the plain ones here, or the threaded
/// ones of `fast.rs` (the composition is the same, so it is written once).
pub struct AttentionParts {
    pub rope_at: fn(&[f32], &[usize], usize, usize, f32, &mut [f32]),
    pub attention: fn(&[f32], &[f32], &[f32], Option<&[f32]>, AttentionDims, &mut [f32]),
}

/// [`attention_ext`] with the given parts.
#[allow(clippy::too_many_arguments)]
pub fn attention_ext_with(
    parts: AttentionParts,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: Option<&[f32]>,
    d: AttentionDims,
    segments: Option<&[usize]>,
    rope_theta: Option<f32>,
    out: &mut [f32],
) {
    let (qw, kw) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let rotated;
    let (q, k) = match rope_theta {
        Some(theta) => {
            let pos = token_positions(d.batch, d.q_len, segments);
            let (mut qr, mut kr) = (vec![0f32; q.len()], vec![0f32; k.len()]);
            (parts.rope_at)(q, &pos, d.heads, d.head_dim, theta, &mut qr);
            (parts.rope_at)(k, &pos, d.kv_heads, d.head_dim, theta, &mut kr);
            rotated = (qr, kr);
            (&rotated.0[..], &rotated.1[..])
        }
        None => (q, k),
    };
    let Some(segs) = segments else {
        return (parts.attention)(q, k, v, key_mask, d, out);
    };
    assert_eq!(d.batch, 1, "packed segments need batch 1");
    let mut s = 0;
    for &len in segs {
        let ds = AttentionDims {
            q_len: len,
            kv_len: len,
            ..d
        };
        (parts.attention)(
            &q[s * qw..(s + len) * qw],
            &k[s * kw..(s + len) * kw],
            &v[s * kw..(s + len) * kw],
            key_mask.map(|m| &m[s..s + len]),
            ds,
            &mut out[s * qw..(s + len) * qw],
        );
        s += len;
    }
}

/// DC-AE's packed layout: group g of `qkv` rows is (q | k | v), each `hd` wide. Unpacks into three
/// [tokens, groups·hd] tensors and runs [`linear_attention`].
pub fn packed_linear_attention(
    qkv: &[f32],
    batch: usize,
    tokens: usize,
    groups: usize,
    hd: usize,
    out: &mut [f32],
) {
    let rows = batch * tokens;
    let c = groups * hd;
    let (mut q, mut k, mut v) = (
        vec![0f32; rows * c],
        vec![0f32; rows * c],
        vec![0f32; rows * c],
    );
    for r in 0..rows {
        for g in 0..groups {
            let src = &qkv[r * 3 * c + g * 3 * hd..][..3 * hd];
            q[r * c + g * hd..][..hd].copy_from_slice(&src[..hd]);
            k[r * c + g * hd..][..hd].copy_from_slice(&src[hd..2 * hd]);
            v[r * c + g * hd..][..hd].copy_from_slice(&src[2 * hd..]);
        }
    }
    linear_attention(&q, &k, &v, batch, tokens, groups, hd, out);
}

/// [`packed_linear_attention`] with the keys RMS-normalised across all groups first
/// (`Op::PackedLinearAttention`'s `key_norm`, SANA1.5's `norm_k`): exactly [`rmsnorm`] of each
/// token's gathered k row ([`packed_keys_normalized`]), then the attention.
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
        &packed_keys_normalized(qkv, weight, eps, groups, hd, rmsnorm),
        batch,
        tokens,
        groups,
        hd,
        out,
    );
}

/// The row-norm function of [`packed_keys_normalized`] (`rmsnorm`'s signature).
pub type RowNorm = fn(&[f32], &[f32], Option<&[f32]>, f32, usize, &mut [f32]);

/// A copy of the packed `qkv` (rows of `groups`·(q | k | v), each `hd` wide) whose k columns are
/// replaced by `norm` (an [`rmsnorm`]) of each row's k channels gathered across the groups
/// (channel g·hd + i, the weight's index).
pub fn packed_keys_normalized(
    qkv: &[f32],
    weight: &[f32],
    eps: f32,
    groups: usize,
    hd: usize,
    norm: RowNorm,
) -> Vec<f32> {
    let c = groups * hd;
    let rows = qkv.len() / (3 * c);
    let mut k = vec![0f32; rows * c];
    for (r, kr) in k.chunks_exact_mut(c).enumerate() {
        for g in 0..groups {
            kr[g * hd..][..hd].copy_from_slice(&qkv[r * 3 * c + g * 3 * hd + hd..][..hd]);
        }
    }
    let mut kn = vec![0f32; rows * c];
    norm(&k, weight, None, eps, c, &mut kn);
    let mut out = qkv.to_vec();
    for (r, kr) in kn.chunks_exact(c).enumerate() {
        for g in 0..groups {
            out[r * 3 * c + g * 3 * hd + hd..][..hd].copy_from_slice(&kr[g * hd..][..hd]);
        }
    }
    out
}

/// DC-AE's multi-scale linear attention over packed `scales` ([`Op::MultiscaleLinearAttention`]):
/// [`concat`] of the scales (widths `widths`), then [`packed_linear_attention`].
///
/// [`Op::MultiscaleLinearAttention`]: openuni_graph::Op::MultiscaleLinearAttention
pub fn multiscale_linear_attention(
    scales: &[&[f32]],
    widths: &[usize],
    batch: usize,
    tokens: usize,
    hd: usize,
    out: &mut [f32],
) {
    let total: usize = widths.iter().sum();
    let mut all = vec![0f32; batch * tokens * total];
    concat(scales, widths, &mut all);
    packed_linear_attention(&all, batch, tokens, total / (3 * hd), hd, out);
}

/// k×k convolution (stride 1, zero padding k/2) over tokens [B, h·w, Cin] -> [B, h·w, Cout], as
/// im2col in row blocks + sgemm; `weight` [Cout, Cin, k, k].
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
    out: &mut [f32],
) {
    let kk = cin * kernel * kernel;
    let p = (kernel / 2) as isize;
    const BLOCK: usize = 1024; // output pixels per im2col block: bounds the scratch memory
    let mut cols = vec![0f32; BLOCK.min(h * w) * kk];
    for b in 0..batch {
        let xb = &x[b * h * w * cin..][..h * w * cin];
        let ob = &mut out[b * h * w * cout..][..h * w * cout];
        for start in (0..h * w).step_by(BLOCK) {
            let n = BLOCK.min(h * w - start);
            for (pi, col) in cols.chunks_exact_mut(kk).take(n).enumerate() {
                let (y, xx) = ((start + pi) / w, (start + pi) % w);
                for ci in 0..cin {
                    for dy in 0..kernel {
                        let sy = y as isize + dy as isize - p;
                        for dx in 0..kernel {
                            let sx = xx as isize + dx as isize - p;
                            let inside = sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize;
                            col[(ci * kernel + dy) * kernel + dx] = if inside {
                                xb[(sy as usize * w + sx as usize) * cin + ci]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
            linear(
                &cols[..n * kk],
                weight,
                bias,
                n,
                kk,
                cout,
                &mut ob[start * cout..(start + n) * cout],
            );
        }
    }
}

/// DC-AE's output head: [`conv2d`] of `relu(rmsnorm(x, norm_weight, norm_bias))` (the three
/// ops in turn, through a full-size temporary: the plain twin of the fused kernel).
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
    let (mut n, mut r) = (
        vec![0f32; batch * h * w * cin],
        vec![0f32; batch * h * w * cin],
    );
    rmsnorm(x, norm_weight, norm_bias, eps, cin, &mut n);
    unary(UnaryFn::Relu, &n, &mut r);
    conv2d(&r, weight, bias, batch, h, w, cin, cout, kernel, out);
}

/// DCUpBlock2d (interpolate): `conv2d(upsample2x(x), weight, bias)` (3×3) on an h×w grid ->
/// 2h×2w, plus `pixel_shuffle_shortcut(x, cout)` when `shortcut`. The same im2col blocks and
/// sgemm calls as [`conv2d`] on the upsampled tensor, read from `x` directly, then the shortcut
/// added as [`add`] would: bit-identical to the unfused ops.
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
    let (hh, ww, kk) = (2 * h, 2 * w, cin * 9);
    const BLOCK: usize = 1024; // as conv2d
    let mut cols = vec![0f32; BLOCK.min(hh * ww) * kk];
    for b in 0..batch {
        let xb = &x[b * h * w * cin..][..h * w * cin];
        let ob = &mut out[b * hh * ww * cout..][..hh * ww * cout];
        for start in (0..hh * ww).step_by(BLOCK) {
            let n = BLOCK.min(hh * ww - start);
            for (pi, col) in cols.chunks_exact_mut(kk).take(n).enumerate() {
                let (y, xx) = ((start + pi) / ww, (start + pi) % ww);
                for ci in 0..cin {
                    for dy in 0..3 {
                        let sy = y as isize + dy as isize - 1;
                        for dx in 0..3 {
                            let sx = xx as isize + dx as isize - 1;
                            let inside = sy >= 0 && sy < hh as isize && sx >= 0 && sx < ww as isize;
                            col[(ci * 3 + dy) * 3 + dx] = if inside {
                                xb[(sy as usize / 2 * w + sx as usize / 2) * cin + ci]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
            linear(
                &cols[..n * kk],
                weight,
                bias,
                n,
                kk,
                cout,
                &mut ob[start * cout..(start + n) * cout],
            );
        }
        if shortcut {
            let r = 4 * cout / cin;
            for (p, o) in ob.chunks_exact_mut(cout).enumerate() {
                let (y, xx) = (p / ww, p % ww);
                let src = &xb[(y / 2 * w + xx / 2) * cin..][..cin];
                for (c, v) in o.iter_mut().enumerate() {
                    *v += src[(4 * c + 2 * (y % 2) + xx % 2) / r];
                }
            }
        }
    }
}

/// `repeat_interleave` over the last dim: output channel c is input channel c / repeats.
pub fn repeat_channels(x: &[f32], cin: usize, repeats: usize, out: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(cin).zip(out.chunks_exact_mut(cin * repeats)) {
        for (c, y) in yr.iter_mut().enumerate() {
            *y = xr[c / repeats];
        }
    }
}

/// Nearest 2× upsampling of tokens [B, h·w, C] -> [B, 2h·2w, C].
pub fn upsample2x(x: &[f32], batch: usize, h: usize, w: usize, c: usize, out: &mut [f32]) {
    for b in 0..batch {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                let src = &x[((b * h + y / 2) * w + xx / 2) * c..][..c];
                out[((b * 2 * h + y) * 2 * w + xx) * c..][..c].copy_from_slice(src);
            }
        }
    }
}

/// `pixel_shuffle(repeat_interleave(x, R, channel), 2)`: `out[c, 2y+i, 2x+j] = x[(4c+2i+j)/R, y, x]`
/// with R = 4·cout/cin, in token layout.
#[allow(clippy::too_many_arguments)]
pub fn pixel_shuffle_shortcut(
    x: &[f32],
    batch: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    out: &mut [f32],
) {
    let r = 4 * cout / cin;
    for b in 0..batch {
        for y in 0..h {
            for xx in 0..w {
                let src = &x[((b * h + y) * w + xx) * cin..][..cin];
                for i in 0..2 {
                    for j in 0..2 {
                        let dst = &mut out[((b * 2 * h + 2 * y + i) * 2 * w + 2 * xx + j) * cout..]
                            [..cout];
                        for (c, d) in dst.iter_mut().enumerate() {
                            *d = src[(4 * c + 2 * i + j) / r];
                        }
                    }
                }
            }
        }
    }
}

/// Concatenation along the last dim of tensors with `widths[i]` columns each.
pub fn concat(xs: &[&[f32]], widths: &[usize], out: &mut [f32]) {
    let total: usize = widths.iter().sum();
    for (r, row) in out.chunks_exact_mut(total).enumerate() {
        let mut at = 0;
        for (x, &wd) in xs.iter().zip(widths) {
            row[at..at + wd].copy_from_slice(&x[r * wd..(r + 1) * wd]);
            at += wd;
        }
    }
}

/// Grouped 1×1 convolution: group g maps input channels [g·ci, (g+1)·ci) to output channels
/// [g·co, (g+1)·co) with `weight` rows [g·co, (g+1)·co) of width ci.
pub fn grouped_linear(
    x: &[f32],
    weight: &[f32],
    cin: usize,
    cout: usize,
    groups: usize,
    out: &mut [f32],
) {
    let (ci, co) = (cin / groups, cout / groups);
    for (xr, yr) in x.chunks_exact(cin).zip(out.chunks_exact_mut(cout)) {
        for g in 0..groups {
            for o in 0..co {
                let wrow = &weight[(g * co + o) * ci..][..ci];
                yr[g * co + o] = wrow
                    .iter()
                    .zip(&xr[g * ci..(g + 1) * ci])
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum::<f64>() as f32;
            }
        }
    }
}

/// A ViT's input tokens: for each of `batch` samples, row 0 = `cls + pos[0]`, row 1 + i =
/// `x[i] + pos[1 + i]` for the `n` patch tokens of `c` channels.
pub fn class_pos_embed(
    x: &[f32],
    cls: &[f32],
    pos: &[f32],
    batch: usize,
    n: usize,
    c: usize,
    out: &mut [f32],
) {
    for (b, sample) in out.chunks_exact_mut((n + 1) * c).enumerate().take(batch) {
        let (first, rest) = sample.split_at_mut(c);
        for ((o, &t), &p) in first.iter_mut().zip(cls).zip(&pos[..c]) {
            *o = t + p;
        }
        for ((o, &t), &p) in rest
            .iter_mut()
            .zip(&x[b * n * c..(b + 1) * n * c])
            .zip(&pos[c..])
        {
            *o = t + p;
        }
    }
}

/// Tokens [start, start + len) of each of `batch` rows of `tokens` tokens × `c` channels.
pub fn slice_tokens(
    x: &[f32],
    batch: usize,
    tokens: usize,
    c: usize,
    start: usize,
    len: usize,
    out: &mut [f32],
) {
    for b in 0..batch {
        out[b * len * c..(b + 1) * len * c]
            .copy_from_slice(&x[(b * tokens + start) * c..(b * tokens + start + len) * c]);
    }
}

/// `glu_silu(depthwise_conv2d(x))`: the CPU twin of the fused kernel is the two ops in a row.
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
    let mut mid = vec![0f32; batch * h * w * c2];
    depthwise_conv2d(x, weight, bias, batch, h, w, c2, kernel, &mut mid);
    glu_silu(&mid, c2 / 2, out);
}

/// Shapes of `Op::DecodeAttention` / `Op::KvCacheAppend`: caches [batch, kv_heads, max_len, head_dim].
#[derive(Clone, Copy, Debug)]
pub struct DecodeDims {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_len: usize,
}

/// A new token's position as the ops read it: the integer part of the f32, clamped to
/// [0, max_len) (the CUDA kernels clamp the same way, so no access leaves the cache).
pub fn decode_position(p: f32, max_len: usize) -> usize {
    if p.is_nan() || p < 0.0 {
        0
    } else {
        (p as usize).min(max_len - 1)
    }
}

/// `Op::DecodeAttention`: for each sequence b and query head h, softmax(scale · q·kᵀ) · V over keys
/// [0, p_b] of KV head h / (heads / kv_heads), q rotated at position p_b when `rope` is given.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    positions: &[f32],
    d: DecodeDims,
    scale: f32,
    rope: Option<f32>,
    out: &mut [f32],
) {
    let hd = d.head_dim;
    let group = d.heads / d.kv_heads;
    let mut qr = vec![0f32; d.heads * hd];
    let mut scores = vec![0f32; d.max_len];
    for b in 0..d.batch {
        let p = decode_position(positions[b], d.max_len);
        let qb = &q[b * d.heads * hd..(b + 1) * d.heads * hd];
        match rope {
            Some(theta) => rope_at(qb, &[p], d.heads, hd, theta, &mut qr),
            None => qr.copy_from_slice(qb),
        }
        for h in 0..d.heads {
            let base = (b * d.kv_heads + h / group) * d.max_len * hd;
            let qh = &qr[h * hd..(h + 1) * hd];
            let mut mx = f32::NEG_INFINITY;
            for (j, s) in scores[..=p].iter_mut().enumerate() {
                let k = &k_cache[base + j * hd..base + (j + 1) * hd];
                *s = scale * qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
                mx = mx.max(*s);
            }
            let mut sum = 0f32;
            for s in &mut scores[..=p] {
                *s = (*s - mx).exp();
                sum += *s;
            }
            let o = &mut out[(b * d.heads + h) * hd..(b * d.heads + h + 1) * hd];
            o.fill(0.0);
            for (j, &s) in scores[..=p].iter().enumerate() {
                let v = &v_cache[base + j * hd..base + (j + 1) * hd];
                for (oo, &vv) in o.iter_mut().zip(v) {
                    *oo += s / sum * vv;
                }
            }
        }
    }
}

/// `Op::KvCacheAppend`: `out` = `cache` with row p_b of every (b, KV head) set to `x` (rotated at
/// position p_b when `rope` is given).
pub fn kv_cache_append(
    cache: &[f32],
    x: &[f32],
    positions: &[f32],
    d: DecodeDims,
    rope: Option<f32>,
    out: &mut [f32],
) {
    out.copy_from_slice(cache);
    kv_cache_write(x, positions, d, rope, out);
}

/// `Op::KvCacheRows`: a prompt `x` [batch, tokens, kv_heads·hd] as cache rows [batch, kv_heads,
/// tokens, hd]: token t written as the append writes the token at position t (rotated at t when
/// `rope` is given), so the prefill's rows equal what `tokens` appends would have cached.
pub fn kv_cache_rows(
    x: &[f32],
    batch: usize,
    tokens: usize,
    kv_heads: usize,
    head_dim: usize,
    rope: Option<f32>,
    out: &mut [f32],
) {
    let w = kv_heads * head_dim;
    let d = DecodeDims {
        batch: 1,
        heads: kv_heads,
        kv_heads,
        head_dim,
        max_len: tokens,
    };
    for (b, cache) in out.chunks_exact_mut(tokens * w).take(batch).enumerate() {
        for t in 0..tokens {
            let row = &x[(b * tokens + t) * w..(b * tokens + t + 1) * w];
            kv_cache_write(row, &[t as f32], d, rope, cache);
        }
    }
}

/// `Op::KvCacheAppend` in place (the cache is an executor state): row p_b of every (b, KV head)
/// of `cache` set to `x`, rotated at p_b when `rope` is given.
pub fn kv_cache_write(
    x: &[f32],
    positions: &[f32],
    d: DecodeDims,
    rope: Option<f32>,
    cache: &mut [f32],
) {
    let (hd, w) = (d.head_dim, d.kv_heads * d.head_dim);
    let mut row = vec![0f32; w];
    for b in 0..d.batch {
        let p = decode_position(positions[b], d.max_len);
        let xb = &x[b * w..(b + 1) * w];
        match rope {
            Some(theta) => rope_at(xb, &[p], d.kv_heads, hd, theta, &mut row),
            None => row.copy_from_slice(xb),
        }
        for h in 0..d.kv_heads {
            let dst = ((b * d.kv_heads + h) * d.max_len + p) * hd;
            cache[dst..dst + hd].copy_from_slice(&row[h * hd..(h + 1) * hd]);
        }
    }
}

/// Row `row` of `modulation_table(t, table)` for every sample: [batch, c] (`t` [batch, k·c] or
/// [batch, c], `table` [k, c]); the one place the fused adaLN ops read the table.
pub fn modulation_row(
    t: &[f32],
    table: &[f32],
    batch: usize,
    k: usize,
    c: usize,
    row: usize,
) -> Vec<f32> {
    let mut m = vec![0f32; batch * k * c];
    modulation_table(t, table, batch, k, c, &mut m);
    let mut out = vec![0f32; batch * c];
    chunk(&m, batch, k, c, row, &mut out);
    out
}

/// Shapes of the fused adaLN ops: `batch` samples of `tokens` rows of `cols`, a table of `k` rows.
#[derive(Clone, Copy, Debug)]
pub struct AdaDims {
    pub batch: usize,
    pub tokens: usize,
    pub cols: usize,
    pub k: usize,
}

/// `Op::AdaLayerNorm`: `layernorm(x)` without affine, modulated by rows `scale` and `shift` of
/// `modulation_table(t, table)`; composed of those twins.
#[allow(clippy::too_many_arguments)]
pub fn ada_layernorm(
    x: &[f32],
    t: &[f32],
    table: &[f32],
    d: AdaDims,
    scale: usize,
    shift: usize,
    eps: f32,
    out: &mut [f32],
) {
    let sc = modulation_row(t, table, d.batch, d.k, d.cols, scale);
    let sh = modulation_row(t, table, d.batch, d.k, d.cols, shift);
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

/// `Op::AdaGatedAdd`: `gated_add(x, m[gate], y)` with row `gate` of `modulation_table(t, table)`.
#[allow(clippy::too_many_arguments)]
pub fn ada_gated_add(
    x: &[f32],
    t: &[f32],
    table: &[f32],
    d: AdaDims,
    gate: usize,
    y: &[f32],
    out: &mut [f32],
) {
    let g = modulation_row(t, table, d.batch, d.k, d.cols, gate);
    gated_add(x, &g, y, d.tokens, d.cols, out)
}

/// `Op::DepthwiseConvGlu` with `silu_input`: `depthwise_conv_glu(silu(x))`.
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
    let mut a = vec![0f32; x.len()];
    unary(UnaryFn::Silu, x, &mut a);
    depthwise_conv_glu(&a, weight, bias, batch, h, w, c2, kernel, out)
}

/// `Op::MixFfnInvertedGlu`: `silu_depthwise_conv_glu(linear(x, weight, bias), dw_weight, dw_bias)`,
/// 3×3, the composition of the two ops (`weight` [c2, k], x [batch, h·w, k]). CPU twin of the
/// CUDA kernel `mixffn_inverted_glu_bf16`.
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
    silu_depthwise_conv_glu(&inverted, dw_weight, dw_bias, batch, h, w, c2, 3, out)
}

/// `Op::LinearResidual`: `residual + linear(x, w, bias)` (the linear's output rounded first, as
/// PyTorch's `x + proj(o)`).
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
    for (o, &r) in out[..rows * n].iter_mut().zip(residual) {
        *o += r;
    }
}
