//! Throughput of kernels/attention.cu at the models' shapes, in TFLOP/s (4 · n · m_visible · hd
//! FLOPs per batch · head: Q Kᵀ and P V, 2 FLOPs per multiply-add; a causal call counts only the
//! visible half, as flash-attention's benchmarks do). CUDA events, warm-up, median of 50 samples.
//! The inputs are not rotated through DRAM: attention is compute-bound at these shapes, and in the
//! models q, k, v were just written by the projection GEMMs (they sit in L2).
//! Prints one line per kernel and a JSON record (device, date, commit); without a CUDA device it
//! prints `skipped: no CUDA device`; on the emulated GPU the shapes are cut down (a smoke run of
//! the benchmark code, CPU times). Run: `cargo bench --bench attention` (or tools/gpu_run.sh).
//! Packed entries run several causal sequences of unequal lengths along one token axis (batch 1,
//! `Op::Attention`'s segments) with RoPE fused into the kernel; their FLOPs count each sequence's
//! own causal triangle only (what a padded batch would waste is not counted as work).

use openuni_cuda::families::attention::{launch, rope_table, segment_table, AttentionArgs};
use openuni_cuda::testing::{random_bytes, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

struct Case {
    label: &'static str,
    batch: usize,
    n: usize,
    m: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    mask: bool,
    dtype: DType,
    /// Packed sequence lengths (batch must be 1); empty: none.
    segs: &'static [usize],
    /// Fused RoPE (theta 1e6).
    rope: bool,
}

#[allow(clippy::too_many_arguments)]
const fn case(
    label: &'static str,
    batch: usize,
    n: usize,
    m: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    causal: bool,
    mask: bool,
    dtype: DType,
) -> Case {
    Case {
        label,
        batch,
        n,
        m,
        heads,
        kv_heads,
        head_dim,
        causal,
        mask,
        dtype,
        segs: &[],
        rope: false,
    }
}

/// Causal sequences `segs` packed along one token axis, with fused RoPE.
const fn packed(
    label: &'static str,
    segs: &'static [usize],
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
) -> Case {
    let mut n = 0;
    let mut i = 0;
    while i < segs.len() {
        n += segs[i];
        i += 1;
    }
    Case {
        label,
        batch: 1,
        n,
        m: n,
        heads,
        kv_heads,
        head_dim,
        causal: true,
        mask: false,
        dtype,
        segs,
        rope: true,
    }
}

/// 32 prompts of 266..297 tokens (text + 256 queries), cond and uncond: 64 sequences.
const PROMPTS_64: [usize; 64] = {
    let mut v = [0usize; 64];
    let mut i = 0;
    while i < 64 {
        v[i] = if i % 2 == 0 { 270 + (i * 7) % 28 } else { 266 };
        i += 1;
    }
    v
};

fn main() {
    let Some(mut r) = BenchReport::start("attention", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let bf = DType::BF16;
    let cases = [
        // SANA cross-attention: 1024 latent tokens (512 px) attend to the 300 caption tokens.
        case(
            "SANA-1.6B cross-attn (CFG batch)",
            2,
            1024,
            300,
            20,
            20,
            112,
            false,
            true,
            bf,
        ),
        case(
            "SANA-1.6B cross-attn (batch 32)",
            32,
            1024,
            300,
            20,
            20,
            112,
            false,
            true,
            bf,
        ),
        case(
            "SANA-1.5 1024px cross-attn",
            2,
            4096,
            300,
            20,
            20,
            112,
            false,
            true,
            bf,
        ),
        case(
            "SANA-600M cross-attn (CFG batch)",
            2,
            1024,
            300,
            16,
            16,
            72,
            false,
            true,
            bf,
        ),
        // InternVL3 LLM over prompt + 256 queries (~300 tokens), cond and uncond.
        case(
            "LLM 2B causal GQA 12/2",
            2,
            300,
            300,
            12,
            2,
            128,
            true,
            false,
            bf,
        ),
        case(
            "LLM 1B causal GQA 14/2",
            2,
            300,
            300,
            14,
            2,
            64,
            true,
            false,
            bf,
        ),
        case(
            "LLM 2B causal GQA, 32 prompts",
            64,
            300,
            300,
            12,
            2,
            128,
            true,
            false,
            bf,
        ),
        // Connector: 256 queries, bidirectional.
        case(
            "connector L 24x64",
            2,
            256,
            256,
            24,
            24,
            64,
            false,
            false,
            bf,
        ),
        case(
            "connector B 14x64",
            2,
            256,
            256,
            14,
            14,
            64,
            false,
            false,
            bf,
        ),
        // The same LLM shapes packed (cond ~290 tokens, uncond 266, no padding), RoPE fused.
        packed(
            "LLM 2B packed cond/uncond, fused RoPE",
            &[290, 266],
            12,
            2,
            128,
            bf,
        ),
        packed(
            "LLM 1B packed cond/uncond, fused RoPE",
            &[290, 266],
            14,
            2,
            64,
            bf,
        ),
        packed(
            "LLM 2B packed 32 prompts, fused RoPE",
            &PROMPTS_64,
            12,
            2,
            128,
            bf,
        ),
        // The f32 reference path at one shape, for comparison.
        case(
            "SANA-1.6B cross-attn, f32 reference",
            2,
            1024,
            300,
            20,
            20,
            112,
            false,
            true,
            DType::F32,
        ),
    ];
    let mut rng = Rng::new(1);
    let (warmup, runs) = r.runs();
    let emulated = r.dev.is_emulated();
    for c in cases {
        // Emulated GPU: one sample, two heads, at most 64 queries and keys (packed: 4 sequences).
        let segs: Vec<usize> = match (c.segs.is_empty(), emulated) {
            (true, _) => vec![],
            (false, true) => vec![37, 5, 20, 2],
            (false, false) => c.segs.to_vec(),
        };
        let (batch, heads, kv_heads, n, m) = if emulated {
            (
                1,
                2,
                if c.kv_heads < c.heads { 1 } else { 2 },
                c.n.min(64),
                c.m.min(64),
            )
        } else {
            (c.batch, c.heads, c.kv_heads, c.n, c.m)
        };
        let m = if c.causal { n } else { m };
        let (n, m) = if segs.is_empty() {
            (n, m)
        } else {
            (segs.iter().sum(), segs.iter().sum())
        };
        let dev = r.dev.clone();
        let (hd, es) = (c.head_dim, c.dtype.size_in_bytes());
        let q = dev
            .upload(&random_bytes(
                &mut rng,
                c.dtype,
                batch * n * heads * hd,
                0.0,
                1.0,
            ))
            .unwrap();
        let k = dev
            .upload(&random_bytes(
                &mut rng,
                c.dtype,
                batch * m * kv_heads * hd,
                0.0,
                1.0,
            ))
            .unwrap();
        let v = dev
            .upload(&random_bytes(
                &mut rng,
                c.dtype,
                batch * m * kv_heads * hd,
                0.0,
                1.0,
            ))
            .unwrap();
        let out = dev.alloc(batch * n * heads * hd * es).unwrap();
        // OpenUni's caption mask is all ones (the bias is then zero); the kernel reads it anyway.
        let mask = c.mask.then(|| {
            let ones = vec![1.0f32; batch * m];
            let bytes: Vec<u8> = match c.dtype {
                DType::F32 => ones.iter().flat_map(|f| f.to_le_bytes()).collect(),
                _ => ones
                    .iter()
                    .flat_map(|&f| half::bf16::from_f32(f).to_bits().to_le_bytes())
                    .collect(),
            };
            dev.upload(&bytes).unwrap()
        });
        let bytes_i32 = |v: &[i32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let bytes_f32 = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let seg_buf =
            (!segs.is_empty()).then(|| dev.upload(&bytes_i32(&segment_table(&segs))).unwrap());
        let longest = segs.iter().copied().max().unwrap_or(n);
        let rope_buf = c.rope.then(|| {
            dev.upload(&bytes_f32(&rope_table(1e6, hd, longest)))
                .unwrap()
        });
        let args = AttentionArgs {
            dtype: c.dtype,
            q: q.ptr(),
            k: k.ptr(),
            v: v.ptr(),
            mask: mask.as_ref().map_or(0, |b| b.ptr()),
            segments: seg_buf.as_ref().map_or(0, |b| b.ptr()),
            rope_cs: rope_buf.as_ref().map_or(0, |b| b.ptr()),
            out: out.ptr(),
            batch,
            n,
            m,
            heads,
            kv_heads,
            head_dim: hd,
            causal: c.causal,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let launches = launch(&args).unwrap();
        let kernel = launches[0].kernel.clone();
        let ms = time_ms(&dev, warmup, runs, 1, |_| {
            // SAFETY: the buffers hold the shapes launched.
            unsafe { launches.iter().try_for_each(|l| l.enqueue(&dev)) }
        })
        .unwrap();
        // Visible (query, key) pairs: all of them, or the causal lower triangle.
        let pairs = if !segs.is_empty() {
            segs.iter().map(|&l| (l * (l + 1) / 2) as f64).sum::<f64>()
        } else if c.causal {
            (0..n).map(|i| (i + m - n + 1) as f64).sum::<f64>()
        } else {
            (n * m) as f64
        };
        let flops = 4.0 * (batch * heads) as f64 * pairs * hd as f64;
        let bytes = (2 * batch * n * heads * hd + 2 * batch * m * kv_heads * hd) * es
            + if c.mask { batch * m * es } else { 0 };
        r.add_flops(
            &kernel,
            c.label,
            &[batch, n, m, heads, kv_heads, hd],
            flops,
            bytes,
            ms,
        );
    }
    r.finish();
}
