//! The f32 reference ops: each written plainly, one function per CUDA kernel family, so a kernel's
//! CPU twin is easy to find (`kernels/norm.cu::rmsnorm_*` <-> `ops::rmsnorm`). Row statistics are
//! accumulated in f64 so the oracle is at least as exact as PyTorch's f32.

use openuni_graph::UnaryFn;

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
    for (r, (xr, yr)) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)).enumerate() {
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
pub fn linear(x: &[f32], w: &[f32], bias: Option<&[f32]>, rows: usize, k: usize, n: usize, out: &mut [f32]) {
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
            rows, k, n, 1.0,
            x.as_ptr(), k as isize, 1,
            w.as_ptr(), 1, k as isize,
            beta,
            out.as_mut_ptr(), n as isize, 1,
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

/// Softmax attention, head by head, softmax in f64. Query head h reads key/value head
/// h / (heads / kv_heads), as GQA's repeat_kv does. Causal masking aligns the last query with the
/// last key.
pub fn attention(q: &[f32], k: &[f32], v: &[f32], d: AttentionDims, out: &mut [f32]) {
    let (qw, kw, hd) = (d.heads * d.head_dim, d.kv_heads * d.head_dim, d.head_dim);
    let group = d.heads / d.kv_heads;
    let mut p = vec![0f64; d.kv_len];
    for b in 0..d.batch {
        for h in 0..d.heads {
            let kh = h / group;
            for i in 0..d.q_len {
                let qrow = &q[(b * d.q_len + i) * qw + h * hd..][..hd];
                let visible = if d.causal { i + d.kv_len - d.q_len + 1 } else { d.kv_len };
                let mut max = f64::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate().take(visible) {
                    let krow = &k[(b * d.kv_len + j) * kw + kh * hd..][..hd];
                    let s: f32 = qrow.iter().zip(krow).map(|(a, c)| a * c).sum();
                    *pj = (s * d.scale) as f64;
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
