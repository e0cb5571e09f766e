//! The sm_90a attention (kernels/attention_sm90.cu: FA3-style, wgmma + TMA) against attention.cu's
//! mma.sync kernel on the same shapes: ViT (InternViT, head dim 64, non-causal) and LLM prefill
//! (causal, GQA; head dims 64 and 128) and SANA's cross-attention at batch 32 (head dims 72 and 112),
//! in TFLOP/s (4 · n · m_visible · hd FLOPs per batch · head, a
//! causal call counting the visible half, as benches/attention.rs), and the sm_90a / mma.sync speed-up.
//! The last prefill packs 4 sequences into one row (segments, as the text-to-image conditioning
//! packs cond and uncond and batched chat its prompts). The prefill shapes run with fused RoPE (theta 1e6, as the engine's LLM prefill): attention.cu
//! rotates its tiles in shared memory, the sm_90a path runs its pre-pass `attention_rope_bf16`
//! into scratch and then the wgmma kernel; the sm_90a time is both launches (the pre-pass alone is
//! also reported, as bytes/s over its 2 · (q + k) bytes).
//!
//! CUDA events, warm-up, median of 50 samples; one line per kernel and a JSON record. Without a
//! CUDA device: `skipped: no CUDA device`; not sm_90a: `skipped: not an sm_90a device`; on the
//! emulated GPU the shapes are cut (a smoke run, CPU times). Run: `cargo bench --bench attention_sm90`.

use openuni_cuda::families::attention::{launch, rope_table, segment_table, AttentionArgs};
use openuni_cuda::families::{attention_sm90, conv_sm90};
use openuni_cuda::testing::{random_bytes, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

fn main() {
    let Some(mut r) = BenchReport::start("attention_sm90", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let dev = r.dev.clone();
    if !conv_sm90::device_supports(&dev) {
        println!(
            "skipped: not an sm_90a device ({:?})",
            dev.compute_capability()
        );
        return;
    }
    let emu = dev.is_emulated();
    let (warmup, runs) = r.runs();
    let mut rng = Rng::new(3);
    let bf = DType::BF16;
    // (label, batch, n = m, heads, kv_heads, head dim, causal, sequences packed into the row)
    let cases: &[(&str, usize, usize, usize, usize, usize, bool, usize)] = &[
        (
            "InternViT-300M, 8 tiles of 448² (1025 tokens)",
            8,
            1025,
            16,
            16,
            64,
            false,
            1,
        ),
        (
            "LLM prefill, hd 64 (Qwen2.5-0.5B), 2048 tokens",
            1,
            2048,
            14,
            2,
            64,
            true,
            1,
        ),
        (
            "LLM prefill, hd 64, 8192 tokens",
            1,
            8192,
            14,
            2,
            64,
            true,
            1,
        ),
        (
            "LLM prefill, hd 128 (Qwen2.5-1.5B), 4096 tokens",
            1,
            4096,
            12,
            2,
            128,
            true,
            1,
        ),
        (
            "LLM prefill packed, hd 64: 4 sequences of 1024 tokens in one row",
            1,
            4096,
            14,
            2,
            64,
            true,
            4,
        ),
        // The step's cross-attention at 512 px, batch 32 (64 CFG rows): 16x16 latent tokens attend to
        // the connector's 256 condition tokens (n = m by coincidence); head dims 72 and 112 run on the
        // hd80 / hd112 wgmma kernels (the hd128 one before 2026-12-04's change) and on mma.sync's
        // hd80 / hd112.
        (
            "SANA-600M cross-attn, b-512 batch 32 (64 rows x 256 tokens, hd 72)",
            64,
            256,
            16,
            16,
            72,
            false,
            1,
        ),
        (
            "SANA-1.6B cross-attn, l-512 batch 32 (64 rows x 256 tokens, hd 112)",
            64,
            256,
            20,
            20,
            112,
            false,
            1,
        ),
    ];
    for &(label, b, n, heads, kv_heads, hd, causal, packed) in cases {
        let (b, n, heads, kv_heads) = if emu {
            (
                1,
                n.min(130),
                heads.min(2),
                kv_heads.min(2).min(heads.min(2)),
            )
        } else {
            (b, n, heads, kv_heads)
        };
        let segs = vec![n / packed; packed];
        let n = segs.iter().sum::<usize>();
        let q = dev
            .upload(&random_bytes(&mut rng, bf, b * n * heads * hd, 0.0, 1.0))
            .unwrap();
        let k = dev
            .upload(&random_bytes(&mut rng, bf, b * n * kv_heads * hd, 0.0, 1.0))
            .unwrap();
        let v = dev
            .upload(&random_bytes(&mut rng, bf, b * n * kv_heads * hd, 0.0, 1.0))
            .unwrap();
        let o = dev.alloc(b * n * heads * hd * 2).unwrap();
        // The prefill (causal) shapes fuse RoPE, as the engine's LLM prefill does.
        let table = dev
            .upload(
                &rope_table(1e6, hd, segs[0])
                    .iter()
                    .flat_map(|c| c.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .unwrap();
        let seg_table = dev
            .upload(
                &segment_table(&segs)
                    .iter()
                    .flat_map(|c| c.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .unwrap();
        let a = AttentionArgs {
            dtype: bf,
            q: q.ptr(),
            k: k.ptr(),
            v: v.ptr(),
            mask: 0,
            segments: if packed > 1 { seg_table.ptr() } else { 0 },
            rope_cs: if causal { table.ptr() } else { 0 },
            out: o.ptr(),
            batch: b,
            n,
            m: n,
            heads,
            kv_heads,
            head_dim: hd,
            causal,
            scale: 1.0 / (hd as f32).sqrt(),
        };
        let visible: usize = segs
            .iter()
            .map(|&l| if causal { l * (l + 1) / 2 } else { l * l })
            .sum();
        let flops = 4.0 * (b * heads * visible * hd) as f64;
        let bytes = 2 * (2 * b * n * heads * hd + 2 * b * n * kv_heads * hd);
        let scratch = dev
            .alloc(attention_sm90::rope_scratch_bytes(&a).max(16))
            .unwrap();
        let shape = [b, n, heads, kv_heads, hd];
        let mut times = vec![];
        for ls in [
            launch(&a).unwrap(),
            attention_sm90::launch(&a, scratch.ptr()).unwrap(),
        ] {
            let names: Vec<&str> = ls.iter().map(|l| l.kernel.as_str()).collect();
            // The pre-pass reads and writes q and k once more.
            let extra = if ls.len() > 1 {
                2 * 2 * b * n * (heads + kv_heads) * hd
            } else {
                0
            };
            // SAFETY: the buffers hold the shapes launched.
            let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe {
                openuni_cuda::families::enqueue(&dev, &ls)
            })
            .unwrap();
            r.add_flops(&names.join(" + "), label, &shape, flops, bytes + extra, ms);
            times.push(ms);
            if ls.len() > 1 {
                // SAFETY: as above.
                let pre =
                    time_ms(&dev, warmup, runs, 1, |_| unsafe { ls[0].enqueue(&dev) }).unwrap();
                r.add(&ls[0].kernel, label, &shape, extra, pre);
            }
        }
        println!(
            "  {label}: sm_90a / mma.sync speed-up {:.2}x",
            times[0] / times[1]
        );
    }
    r.finish();
}
