//! Bandwidth of kernels/misc.cu (adaLN-single's modulation table and chunks, the timestep
//! sinusoid, SwiGLU, token gathers, concatenation, the token-embedding gather, the uint8
//! quantization and the non-finite flag) at the models' shapes, against the
//! device-to-device copy bandwidth measured in the same run. Each op runs as a one-node graph
//! through the CUDA executor (its launch builders need the executor's context) and is timed with
//! `CudaExecutor::profile` (CUDA events around the node only, no staging casts; median of 50).
//! Prints one line per case and a JSON record; without a CUDA device it prints
//! `skipped: no CUDA device`; on the emulated GPU the shapes are cut (a smoke run of the benchmark
//! code only). Run: `cargo bench --bench misc`.

use std::collections::HashMap;

use openuni_cuda::testing::{BenchReport, Rng};
use openuni_cuda::CudaExecutor;
use openuni_graph::{Graph, GraphBuilder, ValueId};
use openuni_tensor::{DType, HostTensor};

/// A one-node graph, its inputs (name, shape), and the bytes one call reads plus writes per
/// element size.
struct Case {
    label: &'static str,
    graph: Graph,
    inputs: Vec<(String, Vec<usize>)>,
    elems: usize,
}

fn case(
    label: &'static str,
    inputs: &[(&str, Vec<usize>)],
    build: impl FnOnce(&mut GraphBuilder, &[ValueId]) -> ValueId,
) -> Case {
    let mut gb = GraphBuilder::new();
    let ids: Vec<ValueId> = inputs
        .iter()
        .map(|(n, s)| gb.input(n, s.clone()).unwrap())
        .collect();
    let y = build(&mut gb, &ids);
    gb.output("y", y).unwrap();
    let graph = gb.finish();
    let elems = inputs
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum::<usize>()
        + graph.shape(y).numel();
    Case {
        label,
        graph,
        inputs: inputs
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect(),
        elems,
    }
}

fn main() {
    let Some(mut r) = BenchReport::start("misc", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let dev = r.dev.clone();
    // Token counts and widths, cut on the emulated GPU.
    let t = |n: usize| if dev.is_emulated() { n.min(8) } else { n };
    let c = |n: usize| if dev.is_emulated() { n.min(64) } else { n };
    let (d16, ff, conn) = (c(2240), c(8960), c(1536));
    let cases = vec![
        case(
            "SANA-1.6B block modulation table (t [2, 6·2240])",
            &[("t", vec![2, 6 * d16]), ("table", vec![6, d16])],
            |gb, v| gb.modulation_table("mod", v[0], v[1]).unwrap(),
        ),
        case(
            "SANA-1.6B shift_msa chunk of [2, 6, 2240]",
            &[("x", vec![2, 6, d16])],
            |gb, v| gb.chunk("chunk", v[0], 0).unwrap(),
        ),
        case(
            "timestep sinusoid (CFG batch 2, 256)",
            &[("t", vec![2])],
            |gb, v| gb.timestep_embedding("temb", v[0], 256).unwrap(),
        ),
        case(
            "InternVL3-2B MLP SwiGLU (300 tokens, 8960)",
            &[("g", vec![1, t(300), ff]), ("u", vec![1, t(300), ff])],
            |gb, v| gb.swiglu("mlp", v[0], v[1]).unwrap(),
        ),
        case(
            "meta-query gather (4 prompts x 256 of a packed 1200, 1536)",
            &[("x", vec![1, t(1200), conn])],
            |gb, v| {
                let len = t(256).min(t(1200) / 4);
                let starts: Vec<usize> = (0..4).map(|i| i * len).collect();
                gb.gather_tokens("gather", v[0], &starts, len).unwrap()
            },
        ),
        case(
            "concat of two [2, 256, 1536]",
            &[("a", vec![2, t(256), conn]), ("b", vec![2, t(256), conn])],
            |gb, v| gb.concat("cat", &[v[0], v[1]]).unwrap(),
        ),
        {
            // The conditioning's token gather: 32 prompt pairs of 46 tokens + 256 meta-queries each,
            // from a table of InternVL3-1B's width (rows cut: only the rows read count).
            let (tokens, rows, d) = (t(64 * 302), t(8192), c(896));
            let mut cs = case(
                "token-embedding gather (64 x 302 ids, D 896)",
                &[("ids", vec![1, tokens]), ("table", vec![rows, d])],
                |gb, v| gb.embedding_gather("embed", v[0], v[1], None).unwrap(),
            );
            cs.elems = tokens + 2 * tokens * d;
            cs
        },
        case(
            "uint8 quantize of 32 images 512 px",
            &[("x", vec![t(32), 3, c(512), c(512)])],
            |gb, v| gb.quantize_u8("quantize", v[0]).unwrap(),
        ),
        case(
            "non-finite flag of 32 images 512 px",
            &[("x", vec![t(32), 3, c(512), c(512)])],
            |gb, v| gb.any_nonfinite("flag", v[0]).unwrap(),
        ),
        case(
            "div_scalar: the decoder input of 32 latents 512 px",
            &[("x", vec![t(32), 32, c(16), c(16)])],
            |gb, v| gb.div_scalar("divide", v[0], 0.41407).unwrap(),
        ),
    ];
    let mut rng = Rng::new(4);
    let iters = if dev.is_emulated() { 3 } else { 50 };
    for dtype in [DType::BF16, DType::F32] {
        for cs in &cases {
            let feeds: HashMap<String, HostTensor> = cs
                .inputs
                .iter()
                .map(|(n, s)| {
                    let len = s.iter().product();
                    // Timesteps in [0, 1000), token ids spread over the table, everything else standard normal.
                    let v = if n == "t" && s.len() == 1 {
                        (0..len).map(|i| (i * 499 % 1000) as f32).collect()
                    } else if n == "ids" {
                        let rows = cs
                            .inputs
                            .iter()
                            .find(|(m, _)| m == "table")
                            .map_or(1, |(_, s)| s[0]);
                        (0..len).map(|i| (i * 7919 % rows) as f32).collect()
                    } else {
                        rng.normals(len, 0.0, 1.0)
                    };
                    (n.clone(), HostTensor::from_f32(s.clone(), v).unwrap())
                })
                .collect();
            let mut ex = CudaExecutor::new(
                &dev,
                &cs.graph,
                &HashMap::<String, HostTensor>::new(),
                dtype,
                false,
            )
            .unwrap();
            let timing = ex.profile(&feeds, iters).unwrap();
            let node = &timing[0];
            let shape: Vec<usize> = cs.inputs.iter().flat_map(|(_, s)| s.clone()).collect();
            r.add(
                &format!("{}_{dtype}", node.op),
                cs.label,
                &shape,
                cs.elems * dtype.size_in_bytes(),
                node.median_ms,
            );
        }
    }
    r.finish();
}
