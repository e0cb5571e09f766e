//! Achieved bandwidth of kernels/decode_attention.cu at InternVL3's decode shapes: the bytes one
//! decode step must read per layer (the K and V rows of every sequence up to its position, plus q
//! and the output) over the time of both passes, against the measured device copy bandwidth.
//! The caches rotate through enough sets to exceed 3x the L2 (in a model the other layers' weights
//! evict them between steps), so the KV rows come from DRAM. CUDA events, warm-up, median of 50.
//! The append entries write one row per (sequence, KV head) in place (what a decoder that owns its
//! cache launches), counted as x read plus the row written. The rows entries lay one prompt of
//! max_len tokens out as cache rows (the prefill's keys, rotated), counted as read once, written once.
//! Prints one line per kernel and a JSON record (device, date, commit); without a CUDA device it
//! prints `skipped: no CUDA device`; on the emulated GPU the shapes are cut down (a smoke run of the
//! benchmark code, CPU times). Run: `cargo bench --bench decode_attention`.

use openuni_cuda::families::attention::rope_table;
use openuni_cuda::families::decode_attention::{
    append_launch, launch, rows_launch, workspace_bytes, AppendArgs, DecodeArgs, RowsArgs,
};
use openuni_cuda::testing::{random_bytes, rotation, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

struct Case {
    label: &'static str,
    batch: usize,
    /// Tokens already in the cache of sequence b: `base + (b * 37) % spread` (the new token's position).
    base: usize,
    spread: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
}

#[allow(clippy::too_many_arguments)]
const fn case(
    label: &'static str,
    batch: usize,
    base: usize,
    spread: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
) -> Case {
    Case {
        label,
        batch,
        base,
        spread,
        heads,
        kv_heads,
        head_dim,
        dtype,
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn main() {
    let Some(mut r) = BenchReport::start("decode_attention", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let bf = DType::BF16;
    let cases = [
        // One chat: an image (256 context tokens per tile, 7 tiles) plus text, then decoding.
        case(
            "InternVL3-2B decode, batch 1, 2k context",
            1,
            2048,
            1,
            12,
            2,
            128,
            bf,
        ),
        case(
            "InternVL3-1B decode, batch 1, 2k context",
            1,
            2048,
            1,
            14,
            2,
            64,
            bf,
        ),
        case(
            "InternVL3-2B decode, batch 1, 16k context",
            1,
            16384,
            1,
            12,
            2,
            128,
            bf,
        ),
        // Continuous batching: 64 questions of one image tile each, at different lengths.
        case(
            "InternVL3-2B decode, batch 64, 300-1300 tokens",
            64,
            300,
            1000,
            12,
            2,
            128,
            bf,
        ),
        case(
            "InternVL3-1B decode, batch 64, 300-1300 tokens",
            64,
            300,
            1000,
            14,
            2,
            64,
            bf,
        ),
        case(
            "InternVL3-2B decode, batch 1, 2k, f32 cache",
            1,
            2048,
            1,
            12,
            2,
            128,
            DType::F32,
        ),
    ];
    let mut rng = Rng::new(5);
    let (warmup, runs) = r.runs();
    let emulated = r.dev.is_emulated();
    for c in cases {
        let dev = r.dev.clone();
        // Emulated GPU: two sequences, at most 300 tokens.
        let (batch, base, spread) = if emulated {
            (c.batch.min(2), c.base.min(260), c.spread.min(40))
        } else {
            (c.batch, c.base, c.spread)
        };
        let positions: Vec<f32> = (0..batch)
            .map(|b| (base + (b * 37) % spread) as f32)
            .collect();
        let max_len = positions.iter().map(|&p| p as usize + 1).max().unwrap();
        let (hd, es) = (c.head_dim, c.dtype.size_in_bytes());
        let cache_elems = batch * c.kv_heads * max_len * hd;
        let kv_read: usize = positions
            .iter()
            .map(|&p| (p as usize + 1) * c.kv_heads * hd * 2 * es)
            .sum();
        let sets = if emulated {
            1
        } else {
            rotation(&dev, 2 * cache_elems * es)
        };
        let caches: Vec<_> = (0..sets)
            .map(|_| {
                let k = dev
                    .upload(&random_bytes(&mut rng, c.dtype, cache_elems, 0.0, 1.0))
                    .unwrap();
                let v = dev
                    .upload(&random_bytes(&mut rng, c.dtype, cache_elems, 0.0, 1.0))
                    .unwrap();
                (k, v)
            })
            .collect();
        let q = dev
            .upload(&random_bytes(
                &mut rng,
                c.dtype,
                batch * c.heads * hd,
                0.0,
                1.0,
            ))
            .unwrap();
        let x = dev
            .upload(&random_bytes(
                &mut rng,
                c.dtype,
                batch * c.kv_heads * hd,
                0.0,
                1.0,
            ))
            .unwrap();
        let out = dev.alloc(batch * c.heads * hd * es).unwrap();
        let pos = dev.upload(&f32_bytes(&positions)).unwrap();
        let rope = dev
            .upload(&f32_bytes(&rope_table(1e6, hd, max_len)))
            .unwrap();
        let partial = dev
            .alloc(workspace_bytes(batch, c.heads, max_len, hd))
            .unwrap();
        let launches: Vec<_> = caches
            .iter()
            .map(|(k, v)| {
                let a = DecodeArgs {
                    dtype: c.dtype,
                    q: q.ptr(),
                    k_cache: k.ptr(),
                    v_cache: v.ptr(),
                    positions: pos.ptr(),
                    rope_cs: rope.ptr(),
                    partial: partial.ptr(),
                    out: out.ptr(),
                    batch,
                    heads: c.heads,
                    kv_heads: c.kv_heads,
                    max_len,
                    head_dim: hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                };
                launch(&a).unwrap()
            })
            .collect();
        let ms = time_ms(&dev, warmup, runs, 1, |i| {
            // SAFETY: the buffers hold the shapes launched.
            unsafe { launches[i % sets].iter().try_for_each(|l| l.enqueue(&dev)) }
        })
        .unwrap();
        let bytes = kv_read + 2 * batch * c.heads * hd * es;
        r.add(
            "decode_attention",
            c.label,
            &[batch, max_len, c.heads, c.kv_heads, hd],
            bytes,
            ms,
        );

        // The in-place append of K (rotated) into the same caches.
        let appends: Vec<_> = caches
            .iter()
            .map(|(k, _)| {
                let a = AppendArgs {
                    dtype: c.dtype,
                    x: x.ptr(),
                    positions: pos.ptr(),
                    rope_cs: rope.ptr(),
                    cache: k.ptr(),
                    batch,
                    kv_heads: c.kv_heads,
                    max_len,
                    head_dim: hd,
                };
                append_launch(&a, dev.sm_count()).unwrap()
            })
            .collect();
        let ms = time_ms(&dev, warmup, runs, 1, |i| {
            // SAFETY: as above.
            unsafe { appends[i % sets].iter().try_for_each(|l| l.enqueue(&dev)) }
        })
        .unwrap();
        r.add(
            "kv_cache_append",
            c.label,
            &[batch, max_len, c.kv_heads, hd],
            2 * batch * c.kv_heads * hd * es,
            ms,
        );

        // The prefill's keys of a prompt of max_len tokens as cache rows (rotated): read once, written once.
        let n = max_len * c.kv_heads * hd;
        let (prompt, rows) = (
            dev.upload(&random_bytes(&mut rng, c.dtype, n, 0.0, 1.0))
                .unwrap(),
            dev.alloc(n * es).unwrap(),
        );
        let a = RowsArgs {
            dtype: c.dtype,
            x: prompt.ptr(),
            rope_cs: rope.ptr(),
            out: rows.ptr(),
            batch: 1,
            tokens: max_len,
            kv_heads: c.kv_heads,
            head_dim: hd,
        };
        let rows_l = rows_launch(&a, dev.sm_count()).unwrap();
        let ms = time_ms(&dev, warmup, runs, 1, |_| {
            // SAFETY: the buffers hold the shapes launched.
            unsafe { rows_l.iter().try_for_each(|l| l.enqueue(&dev)) }
        })
        .unwrap();
        r.add(
            "kv_cache_rows",
            c.label,
            &[1, max_len, c.kv_heads, hd],
            2 * n * es,
            ms,
        );
    }
    r.finish();
}
