//! Bandwidth of kernels/linear_attention.cu (one call = both launches, state then apply) at the
//! models' shapes, against the device-to-device copy bandwidth measured in the same run (the
//! issue's target: at least 80% of it). Bytes per call: q, k, v read and the output written once,
//! 4·B·N·heads·head_dim elements (the per-head states are extra, a few MB that stay in L2); with
//! the key norm (SANA1.5, three launches) k is read once more by the 1/rms pre-pass, which also
//! writes and the state kernel reads one f32 per token: 5·B·N·heads·head_dim elements + 8·B·N bytes.
//! CUDA events, warm-up, median of 50 samples, each sample a batch of calls rotating through input
//! sets 3x the L2 size so that every call reads from DRAM. Prints one line per case and a JSON
//! record (device, date, commit); without a CUDA device it prints `skipped: no CUDA device`.
//! Run: `cargo bench --bench linear_attention` (or tools/gpu_run.sh).

use openuni_cuda::families::linear_attention::{
    chunking, launches, workspace_bytes, Dims, KeyNormPointers, Pointers,
};
use openuni_cuda::testing::{random_bytes, rotation, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

struct Case {
    label: &'static str,
    dims: Dims,
    packed: bool,
    /// SANA1.5's k RMSNorm across heads, applied inside (packed layout only).
    key_norm: bool,
    dtype: DType,
}

fn main() {
    let Some(mut r) = BenchReport::start("linear_attention", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let bf = DType::BF16;
    let sep = |b, n, h| Dims::separate(b, n, h, 32);
    let cases = [
        Case {
            label: "SANA-1.6B @1024, CFG step",
            dims: sep(2, 1024, 70),
            packed: false,
            key_norm: false,
            dtype: bf,
        },
        Case {
            label: "SANA-1.6B @1024, batch 32",
            dims: sep(32, 1024, 70),
            packed: false,
            key_norm: false,
            dtype: bf,
        },
        Case {
            label: "SANA-1.6B @1024, CFG step",
            dims: sep(2, 1024, 70),
            packed: false,
            key_norm: false,
            dtype: DType::F32,
        },
        Case {
            label: "SANA-600M @512, CFG step",
            dims: sep(2, 256, 36),
            packed: false,
            key_norm: false,
            dtype: bf,
        },
        Case {
            label: "SANA1.5-1.6B @1024, CFG step, key norm",
            dims: Dims::packed(2, 1024, 70, 32),
            packed: true,
            key_norm: true,
            dtype: bf,
        },
        Case {
            label: "SANA1.5-1.6B @1024, batch 32 (64 CFG rows), key norm",
            dims: Dims::packed(64, 1024, 70, 32),
            packed: true,
            key_norm: true,
            dtype: bf,
        },
        Case {
            label: "DC-AE stage 3, 1024² image",
            dims: Dims::packed(1, 128 * 128, 32, 32),
            packed: true,
            key_norm: false,
            dtype: bf,
        },
    ];
    let mut rng = Rng::new(1);
    let (warmup, runs) = r.runs();
    let dev = r.dev.clone();
    for case in cases {
        let mut d = case.dims;
        if dev.is_emulated() {
            // A smoke run of the benchmark code: small shapes.
            let (b, n, h) = (d.batch.min(2), d.tokens.min(300), d.heads.min(4));
            d = if case.packed {
                Dims::packed(b, n, h, d.head_dim)
            } else {
                Dims::separate(b, n, h, d.head_dim)
            };
        }
        let es = case.dtype.size_in_bytes();
        let rows = d.batch * d.tokens;
        let inner = d.heads * d.head_dim;
        // Per input set: q|k|v (one packed tensor, or three) and the output.
        let in_elems = if case.packed {
            rows * d.row_stride
        } else {
            3 * rows * inner
        };
        let set = ((in_elems + rows * inner) * es).div_ceil(256) * 256;
        let sets = if dev.is_emulated() {
            1
        } else {
            rotation(&dev, set)
        };
        let buf = dev.alloc(set * sets).unwrap();
        dev.copy_to_device(
            &random_bytes(&mut rng, case.dtype, in_elems, 0.2, 1.0),
            buf.ptr(),
        )
        .unwrap();
        for s in 1..sets {
            dev.copy_on_device(buf.ptr(), buf.ptr() + (s * set) as u64, in_elems * es)
                .unwrap();
        }
        let (chunks, chunk_len) = chunking(dev.sm_count(), &d);
        let (state_bytes, counter_bytes) = workspace_bytes(&d, chunks);
        let states = dev.alloc(state_bytes).unwrap();
        let counters = dev.alloc(counter_bytes).unwrap();
        dev.fill_bytes(counters.ptr(), 0, counter_bytes).unwrap();
        // The key norm's weight (about 1, both signs rare) and its 1/rms workspace.
        let key_w = dev.alloc(inner * es).unwrap();
        dev.copy_to_device(
            &random_bytes(&mut rng, case.dtype, inner, 1.0, 0.2),
            key_w.ptr(),
        )
        .unwrap();
        let key_rstd = dev.alloc((rows * 4).max(256)).unwrap();
        let key_norm = case.key_norm.then(|| KeyNormPointers {
            weight: key_w.ptr(),
            rstd: key_rstd.ptr(),
            eps: 1e-5,
        });
        let per_set: Vec<_> = (0..sets)
            .map(|s| {
                let base = buf.ptr() + (s * set) as u64;
                let t = (rows * inner * es) as u64;
                let p = if case.packed {
                    let hd = (d.head_dim * es) as u64;
                    Pointers {
                        q: base,
                        k: base + hd,
                        v: base + 2 * hd,
                        out: base + (in_elems * es) as u64,
                        key_norm,
                    }
                } else {
                    Pointers {
                        q: base,
                        k: base + t,
                        v: base + 2 * t,
                        out: base + 3 * t,
                        key_norm: None,
                    }
                };
                launches(
                    case.dtype,
                    dev.sm_count(),
                    &d,
                    p,
                    states.ptr(),
                    counters.ptr(),
                )
                .unwrap()
            })
            .collect();
        let ms = time_ms(&dev, warmup, runs, sets, |i| {
            // SAFETY: the buffers hold the shapes the launches were built for.
            per_set[i % sets]
                .iter()
                .try_for_each(|l| unsafe { l.enqueue(&dev) })
        })
        .unwrap();
        let bytes = if case.key_norm {
            5 * rows * inner * es + 8 * rows
        } else {
            4 * rows * inner * es
        };
        let kernel = format!(
            "linear_attention_{}{}{}",
            if case.packed { "packed_" } else { "" },
            if case.key_norm { "key_norm_" } else { "" },
            case.dtype
        );
        let label = format!("{} ({chunks}x{chunk_len} tokens/state CTA)", case.label);
        r.add(
            &kernel,
            &label,
            &[d.batch, d.tokens, d.heads, d.head_dim],
            bytes,
            ms,
        );
    }
    r.finish();
}
