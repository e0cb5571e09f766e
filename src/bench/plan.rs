//! `openuni bench --plan`: what a batch costs, counted from the graphs a variant builds at real
//! size (shapes only: no weights are read, no device is opened). Per stage (conditioning, caption
//! path, one denoising step, decode): kernel launches as the CUDA backend resolves each node,
//! GEMM and non-GEMM FLOPs and bytes from the graph's cost model (`openuni_graph::node_cost`),
//! activation bytes per pass, the host<->device bytes of a batch as the pipeline moves them,
//! and the time a roofline model gives on an H100 and an H200 (docs/gpu-plan.md).
//!
//! Launch counts mirror `openuni_cuda::families::resolve` op by op (one exhaustive match, so a new
//! op does not compile until it is counted here), calling the families' own launch builders where
//! the count depends on the shapes, for the modelled H100 / H200 (sm_90: the attention's sm_90a
//! path where a call qualifies, its RoPE pre-pass's bytes added to the node). A `Linear` counts as one cuBLASLt matmul: on hardware the
//! algorithm cuBLASLt picks may add a split-K reduction kernel, so GEMM launches are a lower bound.

use std::collections::HashSet;

use anyhow::Result;
use openuni_cuda::families::{attention, attention_sm90, linear_attention, mixffn_inverted_glu};
use openuni_graph::{node_cost, Cost, Graph, Node, Op, ValueId};
use openuni_models::{sana, scheduler};
use openuni_tensor::DType;
use serde::Serialize;

use crate::pipeline::{graph_dtype, nonfinite_flag, tile_starts, DecodeOptions, Tiling, IMAGE_U8};
use openuni_models::dcae::LATENT;

/// A device's ceilings for the roofline model (vendor datasheets; docs/gpu-plan.md).
#[derive(Clone, Copy, Serialize)]
pub struct Roof {
    pub name: &'static str,
    /// Dense bf16 tensor-core FLOP/s.
    pub tflops: f64,
    /// HBM bytes/s.
    pub tbytes_per_s: f64,
}

/// NVIDIA H100 SXM5 and H200 SXM datasheets: 989 dense bf16 TFLOP/s (1979 with sparsity);
/// 3.35 TB/s HBM3 and 4.8 TB/s HBM3e.
pub const ROOFS: [Roof; 2] = [
    Roof {
        name: "H100 SXM",
        tflops: 989.0,
        tbytes_per_s: 3.35,
    },
    Roof {
        name: "H200 SXM",
        tflops: 989.0,
        tbytes_per_s: 4.8,
    },
];

/// Streaming multiprocessors of the modelled device (H100 SXM and H200 both have 132): grid-stride
/// kernels and the linear attention's chunking size their grids by it, not their launch counts.
const SM_COUNT: u32 = 132;

#[derive(Serialize, Default, Clone)]
pub struct StagePlan {
    pub stage: String,
    /// Times the stage's graph runs per batch (the step: once per denoising step).
    pub runs_per_batch: usize,
    pub nodes: usize,
    /// Kernel launches of one pass: node launches plus the bf16 staging casts of the inputs set
    /// from the host and the outputs read back to it on every pass.
    pub launches: usize,
    pub gemm_launches: usize,
    pub gemm_flops: f64,
    pub other_flops: f64,
    /// Bytes every node reads and writes at least once (cost model), bf16 storage; `other_bytes`
    /// includes the bf16<->f32 casts of the values that cross the host boundary every pass, and
    /// the caption path's device-to-device copy of its K/V into the step's inputs.
    pub gemm_bytes: f64,
    pub other_bytes: f64,
    /// Of those, the bytes that are not weight reads (activations in and out of every node).
    pub activation_bytes: f64,
    /// Host->device and device->host bytes of one batch for this stage (f32 as the pipeline hands them).
    pub htod_bytes_per_batch: f64,
    pub dtoh_bytes_per_batch: f64,
    /// Roofline time of one pass per device in `ROOFS` order, ms (sum over nodes of
    /// max(flops/peak, bytes/bandwidth); launch latency and PCIe not included).
    pub model_ms: Vec<f64>,
    /// The nodes' share of one pass by op kind, most bytes first (the staging casts and copies
    /// the stage adds are in the totals above, not here).
    pub ops: Vec<OpPlan>,
}

/// One op kind's nodes in a stage's pass.
#[derive(Serialize, Default, Clone)]
pub struct OpPlan {
    pub op: String,
    pub nodes: usize,
    pub launches: usize,
    pub flops: f64,
    pub bytes: f64,
}

#[derive(Serialize)]
pub struct BatchPlan {
    pub batch: usize,
    pub stages: Vec<StagePlan>,
    /// Host<->device bytes of the whole batch, both directions.
    pub host_bytes_per_batch: f64,
    /// conditioning + caption + steps · step + decode, roofline, per device.
    pub model_batch_ms: Vec<f64>,
    pub model_images_per_s: Vec<f64>,
}

#[derive(Serialize)]
pub struct PlanReport {
    pub variant: String,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub dtype: String,
    pub date: String,
    pub commit: String,
    pub command: String,
    pub roofs: Vec<Roof>,
    pub launch_count_method: String,
    pub results: Vec<BatchPlan>,
}

/// Kernel launches the CUDA backend resolves `node` to (see the module comment).
pub fn cuda_launches(g: &Graph, node: &Node, dtype: DType) -> Result<usize> {
    let empty = g.shape(node.output).numel() == 0;
    let one = usize::from(!empty);
    Ok(match &node.op {
        Op::Linear { .. } | Op::LinearResidual { .. } => one,
        Op::AdaLayerNorm { .. } | Op::AdaGatedAdd { .. } => one,
        Op::RmsNorm { .. } | Op::LayerNorm { .. } => one,
        // A tanh-GELU after a Linear is that GEMM's epilogue (executor peephole): no launch.
        Op::Unary { .. }
            if openuni_cuda::families::gelu_fused_into_linear(g, node, false).is_some() =>
        {
            0
        }
        Op::RmsNormResidual { .. } | Op::RmsNormReluConv2d { .. } => one,
        Op::Unary { .. } | Op::Add { .. } | Op::GatedAdd { .. } => one,
        // The modelled H100 / H200 take the sm_90a attention where a call qualifies (with fused
        // RoPE: its pre-pass, then the attention), else attention.cu.
        Op::Attention { .. } => {
            let args = attention_args(g, node, dtype).expect("an attention node");
            if attention_sm90::selected_for(&args) {
                attention_sm90::launch_count(&args)
            } else {
                attention::launch(&args).map_err(anyhow::Error::msg)?.len()
            }
        }
        Op::LinearAttention {
            heads, head_dim, ..
        } => {
            let d = g.shape(node.output).dims();
            let dims = linear_attention::Dims::separate(d[0], d[1], *heads, *head_dim);
            linear_attention::launches(
                dtype,
                SM_COUNT,
                &dims,
                linear_attention::Pointers {
                    q: 0,
                    k: 0,
                    v: 0,
                    out: 0,
                    key_norm: None,
                },
                0,
                0,
            )?
            .len()
        }
        Op::PackedLinearAttention {
            groups,
            head_dim,
            key_norm,
            ..
        } => {
            let d = g.shape(node.output).dims();
            let dims = linear_attention::Dims::packed(d[0], d[1], *groups, *head_dim);
            // With a key norm: the 1/rms pre-pass launch first.
            let key_norm = key_norm.map(|n| linear_attention::KeyNormPointers {
                weight: 0,
                rstd: 0,
                eps: n.eps,
            });
            linear_attention::launches(
                dtype,
                SM_COUNT,
                &dims,
                linear_attention::Pointers {
                    q: 0,
                    k: 0,
                    v: 0,
                    out: 0,
                    key_norm,
                },
                0,
                0,
            )?
            .len()
        }
        Op::MultiscaleLinearAttention { scales, head_dim } => {
            let d = g.shape(node.output).dims();
            let mut n = 0;
            for &x in scales {
                let dims = linear_attention::Dims::packed(
                    d[0],
                    d[1],
                    g.shape(x).last() / (3 * head_dim),
                    *head_dim,
                )
                .in_columns(d[2]);
                n += linear_attention::launches(
                    dtype,
                    SM_COUNT,
                    &dims,
                    linear_attention::Pointers {
                        q: 0,
                        k: 0,
                        v: 0,
                        out: 0,
                        key_norm: None,
                    },
                    0,
                    0,
                )?
                .len();
            }
            n
        }
        // Decode: the chunked pass and the log-sum-exp merge; append: the cache copy (the planner
        // never aliases a value with its input) and the in-place write.
        Op::DecodeAttention { .. } | Op::KvCacheAppend { .. } => 2 * one,
        Op::KvCacheRows { .. } => one,
        Op::PixelShuffleLayerNorm { .. } => one,
        Op::Transpose { .. } => one,
        Op::ModulationTable { .. }
        | Op::Chunk { .. }
        | Op::TimestepEmbedding { .. }
        | Op::SwiGlu { .. }
        | Op::SliceTokens { .. } => one,
        Op::GatherTokens { starts, .. } => starts.len() * one,
        Op::EmbeddingGather { .. }
        | Op::QuantizeU8 { .. }
        | Op::GuidedX0 { .. }
        | Op::DpmSolverUpdate { .. }
        | Op::DivScalar { .. }
        | Op::GaussianNoise { .. } => one,
        // The flag over the tensor, then the finish launch that writes it and re-zeroes the flag.
        Op::AnyNonFinite { x } => usize::from(g.shape(*x).numel() > 0) + 1,
        Op::ClassPosEmbed { .. } => 3 * one,
        Op::Concat { xs } => xs.iter().filter(|&&x| g.shape(x).last() > 0).count() * one,
        Op::Conv2d { .. }
        | Op::UpsampleConv2d { .. }
        | Op::DepthwiseConv2d { .. }
        | Op::DepthwiseConvGlu { .. }
        | Op::GroupedLinear { .. }
        | Op::RepeatChannels { .. } => one,
        // Fused: one kernel; else the GEMM and the depthwise GLU (families::mixffn_inverted_glu).
        Op::MixFfnInvertedGlu { x, h, w, .. } => {
            one * mixffn_inverted_glu::launch_count(modelled_mixffn_path(
                dtype,
                g.shape(*x).last(),
                *h,
                *w,
            ))
        }
    })
}

/// The MixFFN path of the modelled H100 / H200 (an sm_90a device, `OPENUNI_MIXFFN` as set; `run`
/// refuses a value it does not take): families::mixffn_inverted_glu::select before its first-use
/// timing, which on a GPU keeps the sm_90a fused kernel only if it is faster than the two-op path.
fn modelled_mixffn_path(dtype: DType, c: usize, h: usize, w: usize) -> mixffn_inverted_glu::Path {
    let request = mixffn_inverted_glu::request().unwrap_or(mixffn_inverted_glu::Request::Auto);
    mixffn_inverted_glu::select(request, true, dtype, c, h, w)
}

/// An `Op::MixFfnInvertedGlu` node the modelled device runs on its two-op path
/// ([`modelled_mixffn_path`]: f32 storage, C % 8 != 0, a latent larger than one block, or
/// `OPENUNI_MIXFFN=two-op`) as the two nodes it then is: the GEMM, which also writes the 2H-wide
/// output, and the depthwise GLU, which reads it back. `None` for every other node (and a fused MixFFN).
fn unfused_mixffn_parts(g: &Graph, node: &Node, dtype: DType) -> Option<[Cost; 2]> {
    let Op::MixFfnInvertedGlu {
        x,
        weight,
        bias,
        dw_weight,
        dw_bias,
        h,
        w,
    } = &node.op
    else {
        return None;
    };
    let xs = g.shape(*x);
    if modelled_mixffn_path(dtype, xs.last(), *h, *w) != mixffn_inverted_glu::Path::TwoOp {
        return None;
    }
    let numel = |id: &ValueId| g.shape(*id).numel() as f64;
    let (c, c2, rows) = (
        xs.last() as f64,
        g.shape(*weight).dims()[0] as f64,
        xs.rows() as f64,
    );
    let out = g.shape(node.output).numel() as f64;
    let gemm = Cost {
        flops: 2.0 * rows * c * c2,
        elems: numel(x) + numel(weight) + bias.as_ref().map_or(0.0, numel) + rows * c2,
    };
    let dw = Cost {
        flops: 4.0 * out * 9.0,
        elems: rows * c2 + numel(dw_weight) + dw_bias.as_ref().map_or(0.0, numel) + out,
    };
    Some([gemm, dw])
}

/// An attention node's call with placeholder addresses (16-byte aligned; the segment and RoPE
/// tables non-zero when the node has them), for the launch builders' and the selection's shape
/// rules; None for other ops.
fn attention_args(g: &Graph, node: &Node, dtype: DType) -> Option<attention::AttentionArgs> {
    let Op::Attention {
        q,
        k,
        heads,
        kv_heads,
        head_dim,
        causal,
        scale,
        segments,
        rope,
        ..
    } = &node.op
    else {
        return None;
    };
    let (qs, ks) = (g.shape(*q).dims(), g.shape(*k).dims());
    Some(attention::AttentionArgs {
        dtype,
        q: 0,
        k: 0,
        v: 0,
        mask: 0,
        segments: if segments.is_some() { 16 } else { 0 },
        rope_cs: if rope.is_some() { 16 } else { 0 },
        out: 0,
        batch: qs[0],
        n: qs[1],
        m: ks[1],
        heads: *heads,
        kv_heads: *kv_heads,
        head_dim: *head_dim,
        causal: *causal,
        scale: *scale,
    })
}

/// Bytes a node moves beyond its cost-model bytes on the modelled device: the sm_90a attention's
/// RoPE pre-pass reads q and k and writes their rotated copies.
fn extra_bytes(g: &Graph, node: &Node, dtype: DType) -> f64 {
    match attention_args(g, node, dtype) {
        Some(a)
            if a.rope_cs != 0
                && attention_sm90::selected_for(&a)
                && attention_sm90::launch_count(&a) > 0 =>
        {
            2.0 * attention_sm90::rope_scratch_bytes(&a) as f64
        }
        _ => 0.0,
    }
}

/// How the pipeline reads a graph output back (src/pipeline).
#[derive(Clone, Copy, PartialEq)]
enum Read {
    /// Never read back: the caption path's K/V and the conditioning's prompt embeddings, handed
    /// to the next graph's inputs device to device (`output_handles` / `set_input_handles`); the
    /// conditioning's other outputs and the decoder's f32 sample, checked on the device by their
    /// non-finite flags (read only when a flag is set, an error anyway).
    Stays,
    /// A non-finite flag: one scalar in the storage dtype (`TensorHandle::to_host`), no cast.
    Flag,
    /// The decoder's uint8 pixels: cast to bytes on the device, one byte a value.
    U8,
    /// Through `outputs()`: f32, after a staging cast with bf16 storage (the step's velocity).
    F32,
}

fn output_read(g: &Graph, name: &str) -> Read {
    let checked_on_device = g.outputs.iter().any(|(n, _)| *n == nonfinite_flag(name));
    if name == IMAGE_U8 {
        Read::U8
    } else if name == scheduler::VELOCITY_NONFINITE.0 {
        // Read only when the sampler's latents flag is set (an error anyway).
        Read::Stays
    } else if name.ends_with(&nonfinite_flag("")) {
        Read::Flag
    } else if name.starts_with("cross_kv.") || checked_on_device || HANDED_OVER.contains(&name) {
        Read::Stays
    } else {
        Read::F32
    }
}

/// The denoising loop's values handed between the step and the sampler graphs on the device:
/// the step's velocity (an output and the sampler's input), the sampler's latents, estimate and
/// the step's next input (outputs), the sampler's sample and history (inputs), the step's
/// latents input; then the decoder's input `latents / scaling_factor`, made from the sampler's
/// latents by "decoder.input" and read by the decoder (or its global part).
const HANDED_OVER: [&str; 8] = [
    sana::VELOCITY.0,
    scheduler::LATENTS.0,
    scheduler::X0.0,
    scheduler::MODEL_INPUT.0,
    scheduler::SAMPLE,
    scheduler::PREV_X0,
    sana::HIDDEN_STATES,
    LATENT,
];

/// Graph inputs set from another graph's output on the device, never from the host: the step's
/// K/V, the caption path's prompt embeddings (the conditioning's output), and the denoising
/// loop's [`HANDED_OVER`] values.
fn input_from_device(name: &str) -> bool {
    name.starts_with("cross_kv.") || name == "encoder_hidden_states" || HANDED_OVER.contains(&name)
}

/// Host<->device bytes of one pass of a stage's graph as the pipeline drives it: every input
/// set from the host as f32 (`CudaExecutor::set_inputs`: the conditioning's token ids, the
/// step's latents and timesteps, the decoder's latents) and every output read back as
/// [`output_read`] says; values that stay on the device are not counted.
fn io_bytes(g: &Graph, es: f64) -> (f64, f64) {
    let numel = |id| g.shape(id).numel() as f64;
    // fold from +0.0: an empty f64 `sum` is -0.0, which would print as "-0.000".
    let inputs = g
        .inputs()
        .filter(|(_, n)| !input_from_device(n))
        .map(|(id, _)| numel(id) * 4.0)
        .fold(0.0, |a, b| a + b);
    let outputs = g
        .outputs
        .iter()
        .map(|(n, id)| match output_read(g, n) {
            Read::Stays => 0.0,
            Read::Flag => numel(*id) * es,
            Read::U8 => numel(*id),
            Read::F32 => numel(*id) * 4.0,
        })
        .fold(0.0, |a, b| a + b);
    (inputs, outputs)
}

/// The plan of one graph's pass, with `runs` passes per batch.
fn stage_plan(
    stage: &str,
    g: &Graph,
    runs: usize,
    dtype: DType,
    step_dtype: DType,
) -> Result<StagePlan> {
    let es = dtype.size_in_bytes() as f64;
    let step_es = step_dtype.size_in_bytes() as f64;
    let numel_of = |g: &Graph, id| g.shape(id).numel() as f64;
    let weights: HashSet<_> = g.weights().map(|(id, _)| id).collect();
    let mut p = StagePlan {
        stage: stage.into(),
        runs_per_batch: runs,
        nodes: g.nodes.len(),
        model_ms: vec![0.0; ROOFS.len()],
        ..Default::default()
    };
    let mut by_op: std::collections::BTreeMap<&str, OpPlan> = Default::default();
    for node in &g.nodes {
        let c = node_cost(g, node);
        // What the node runs as: one kernel, or (a MixFFN's two-op path) a GEMM and a depthwise GLU;
        // plus what the modelled device moves beyond the cost model (the sm_90a RoPE pre-pass).
        let parts = unfused_mixffn_parts(g, node, dtype).unwrap_or([c, Cost::default()]);
        let extra = extra_bytes(g, node, dtype);
        let bytes = (parts[0].elems + parts[1].elems) * es + extra;
        let weight_bytes: f64 = node
            .op
            .inputs()
            .iter()
            .filter(|i| weights.contains(i))
            .map(|&i| g.shape(i).numel() as f64 * es)
            .sum();
        let launches = cuda_launches(g, node, dtype)?;
        let op = by_op.entry(node.op.name()).or_insert_with(|| OpPlan {
            op: node.op.name().into(),
            ..Default::default()
        });
        op.nodes += 1;
        op.launches += launches;
        op.flops += c.flops;
        op.bytes += bytes;
        p.launches += launches;
        p.activation_bytes += bytes - weight_bytes;
        if matches!(
            node.op,
            Op::Linear { .. } | Op::LinearResidual { .. } | Op::MixFfnInvertedGlu { .. }
        ) {
            p.gemm_launches += launches;
            p.gemm_flops += c.flops;
            p.gemm_bytes += bytes;
        } else {
            p.other_flops += c.flops;
            p.other_bytes += bytes;
        }
        for (t, roof) in p.model_ms.iter_mut().zip(ROOFS) {
            for (i, part) in parts.iter().enumerate() {
                let part_bytes = part.elems * es + if i == 0 { extra } else { 0.0 };
                *t += (part.flops / (roof.tflops * 1e12))
                    .max(part_bytes / (roof.tbytes_per_s * 1e12))
                    * 1e3;
            }
        }
    }
    let add_bytes = |p: &mut StagePlan, bytes: f64| {
        p.other_bytes += bytes;
        p.activation_bytes += bytes;
        for (t, roof) in p.model_ms.iter_mut().zip(ROOFS) {
            *t += bytes / (roof.tbytes_per_s * 1e12) * 1e3;
        }
    };
    // bf16 storage: one cast launch per input set from the host (f32 staging -> arena, when it is
    // set) and per output read back through `outputs()` (arena -> f32 staging, when it is read).
    // Every input and output that crosses the host boundary does so on every pass (the step's
    // latents, timestep and velocity); values handed over on the device are never cast, flags are
    // read in the storage dtype.
    if dtype == DType::BF16 {
        // The step's latents come from the f32 sampler, the decoder's from the f32 "decoder.input",
        // into the f32 staging slot: still cast.
        let ins = g
            .inputs()
            .filter(|(_, n)| !input_from_device(n) || *n == sana::HIDDEN_STATES || *n == LATENT)
            .map(|(id, _)| id);
        let outs = g
            .outputs
            .iter()
            .filter(|(n, _)| output_read(g, n) == Read::F32)
            .map(|(_, id)| *id);
        let staged: Vec<f64> = ins
            .chain(outs)
            .map(|id| g.shape(id).numel() as f64)
            .filter(|&n| n > 0.0)
            .collect();
        p.launches += staged.len();
        add_bytes(&mut p, staged.iter().map(|n| n * (4.0 + es)).sum());
    }
    // The uint8 pixels are cast to bytes on the device when read (any storage): one launch, the
    // value read in the storage dtype and written at one byte a value.
    let u8_out: Vec<f64> = g
        .outputs
        .iter()
        .filter(|(n, _)| output_read(g, n) == Read::U8)
        .map(|(_, id)| g.shape(*id).numel() as f64)
        .collect();
    p.launches += u8_out.len();
    add_bytes(&mut p, u8_out.iter().map(|n| n * (es + 1.0)).sum());
    // Values handed over are copied device to device (read and write once per batch, in the
    // storage dtype): the K/V counted with the caption path that makes them (the step runs many
    // times per batch), the prompt embeddings with the caption path that reads them.
    let bytes = |id| g.shape(id).numel() as f64 * es * 2.0;
    let made: f64 = g
        .outputs
        .iter()
        .filter(|(n, _)| n.starts_with("cross_kv."))
        .map(|(_, id)| bytes(*id))
        .sum();
    let read: f64 = g
        .inputs()
        .filter(|(_, n)| input_from_device(n) && !n.starts_with("cross_kv."))
        .map(|(id, _)| bytes(id))
        .sum();
    add_bytes(&mut p, made + read);
    // The denoising loop's hand-overs, every step: the step's velocity cast bf16 -> f32 into the
    // sampler (one launch), the sampler's latents (f32) copied into the step's staging slot and its
    // latents and estimate into its own inputs (device-to-device copies, read and written).
    if stage == "sampler" {
        let v = g
            .input_id(scheduler::VELOCITY)
            .map_or(0.0, |id| numel_of(g, id));
        let l = g
            .input_id(scheduler::SAMPLE)
            .map_or(0.0, |id| numel_of(g, id));
        p.launches += 1;
        add_bytes(
            &mut p,
            v * (step_es + 4.0) + 2.0 * v * 4.0 + 2.0 * 2.0 * l * 4.0,
        );
    }
    p.ops = by_op.into_values().collect();
    p.ops.sort_by(|a, b| b.bytes.total_cmp(&a.bytes));
    let (every_in, out) = io_bytes(g, es);
    p.htod_bytes_per_batch = runs as f64 * every_in;
    p.dtoh_bytes_per_batch = runs as f64 * out;
    Ok(p)
}

pub struct PlanOptions {
    pub variant: String,
    pub batches: Vec<usize>,
    pub steps: usize,
    pub size: Option<usize>,
    pub json: Option<std::path::PathBuf>,
    pub command: String,
}

pub fn run(o: &PlanOptions) -> Result<PlanReport> {
    mixffn_inverted_glu::request()?;
    if o.batches.is_empty() || o.batches.contains(&0) {
        anyhow::bail!("--batch takes a comma-separated list of positive batch sizes");
    }
    let (model, own_size) = super::random_model(&o.variant)?;
    let up = model.vae_cfg.upscale();
    let size = o.size.unwrap_or(own_size);
    if size == 0 || !size.is_multiple_of(up) {
        anyhow::bail!(
            "--size {size} is not a positive multiple of {up} (the VAE upscales latents {up}x)"
        );
    }
    let (lh, lw) = (size / up, size / up);
    let dtype = DType::BF16;
    let decode = DecodeOptions::from_flags(None, size, size, &model.vae_cfg)?;
    let mut results = vec![];
    for &n in &o.batches {
        let mut stages = vec![];
        for (name, g) in model.batch_graphs(n, lh, lw, decode)? {
            let runs = match name {
                "step" | "sampler" => o.steps,
                "decoder.tile" => {
                    let t = Tiling::new(&model.vae_cfg, decode.tile.unwrap_or(size))?;
                    let grid = model.vae_cfg.local_split().grid;
                    tile_starts(lh * grid, t.tile, 2 * t.context).len()
                        * tile_starts(lw * grid, t.tile, 2 * t.context).len()
                }
                _ => 1,
            };
            // The sampler and the decoder's input run in f32 whatever the step's storage.
            stages.push(stage_plan(name, &g, runs, graph_dtype(name, dtype), dtype)?);
        }
        let host_bytes_per_batch = stages
            .iter()
            .map(|s| s.htod_bytes_per_batch + s.dtoh_bytes_per_batch)
            .sum();
        let model_batch_ms: Vec<f64> = (0..ROOFS.len())
            .map(|i| {
                stages
                    .iter()
                    .map(|s| s.runs_per_batch as f64 * s.model_ms[i])
                    .sum()
            })
            .collect();
        let model_images_per_s = model_batch_ms
            .iter()
            .map(|ms| n as f64 / (ms * 1e-3))
            .collect();
        results.push(BatchPlan {
            batch: n,
            stages,
            host_bytes_per_batch,
            model_batch_ms,
            model_images_per_s,
        });
    }
    let report = PlanReport {
        variant: o.variant.clone(),
        height: size,
        width: size,
        steps: o.steps,
        dtype: dtype.to_string(),
        date: super::command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        commit: super::command_output("git", &["rev-parse", "--short", "HEAD"]),
        command: o.command.clone(),
        roofs: ROOFS.to_vec(),
        launch_count_method: "exact mirror of the CUDA backend's per-node resolution (families' launch builders); a GEMM counts as one cuBLASLt matmul".into(),
        results,
    };
    if let Some(p) = &o.json {
        crate::atomic::write_bytes(p, serde_json::to_string_pretty(&report)?.as_bytes())
            .map_err(|e| anyhow::anyhow!("{}: cannot write the JSON plan: {e}", p.display()))?;
    }
    Ok(report)
}

/// The plan as a text table; with `by_op`, each stage's ops below it (`--plan --profile`).
pub fn render(r: &PlanReport, by_op: bool) -> String {
    use std::fmt::Write;
    let gb = |b: f64| b / 1e9;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "openuni bench --plan: {} {}x{}, {} steps, {} storage (counted from the graphs; no device)",
        r.variant, r.width, r.height, r.steps, r.dtype
    );
    let _ = writeln!(s, "commit {}, {}", r.commit, r.date);
    let _ = writeln!(
        s,
        "model times: roofline per node, max(FLOPs / peak, bytes / bandwidth), {}; launch latency and PCIe not included",
        r.roofs.iter().map(|x| format!("{} {} TFLOP/s bf16, {} TB/s", x.name, x.tflops, x.tbytes_per_s)).collect::<Vec<_>>().join("; ")
    );
    for b in &r.results {
        let _ = writeln!(s, "\nbatch {} ({} CFG rows)", b.batch, 2 * b.batch);
        let _ = writeln!(
            s,
            "{:<15} {:>5} {:>6} {:>8} {:>6} {:>10} {:>10} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>9}",
            "stage", "runs", "nodes", "launches", "gemm", "GEMM TF", "other TF", "GEMM GB", "other GB", "act. GB", "HtoD GB/b", "DtoH GB/b", "H100 ms", "H200 ms"
        );
        for st in &b.stages {
            let _ = writeln!(
                s,
                "{:<15} {:>5} {:>6} {:>8} {:>6} {:>10.3} {:>10.3} {:>9.3} {:>9.3} {:>9.3} {:>10.3} {:>10.3} {:>9.3} {:>9.3}",
                st.stage,
                st.runs_per_batch,
                st.nodes,
                st.launches,
                st.gemm_launches,
                st.gemm_flops / 1e12,
                st.other_flops / 1e12,
                gb(st.gemm_bytes),
                gb(st.other_bytes),
                gb(st.activation_bytes),
                gb(st.htod_bytes_per_batch),
                gb(st.dtoh_bytes_per_batch),
                st.model_ms[0],
                st.model_ms.get(1).copied().unwrap_or(0.0)
            );
        }
        if by_op {
            for st in &b.stages {
                let total: f64 = st.ops.iter().map(|o| o.bytes).sum();
                let _ = writeln!(
                    s,
                    "  {} by op (one pass): {:>5} {:>8} {:>10} {:>9} {:>7}",
                    st.stage, "nodes", "launches", "TF", "GB", "bytes"
                );
                for o in &st.ops {
                    let share = if total > 0.0 {
                        100.0 * o.bytes / total
                    } else {
                        0.0
                    };
                    let _ = writeln!(
                        s,
                        "    {:<28} {:>5} {:>8} {:>10.3} {:>9.3} {:>6.1}%",
                        o.op,
                        o.nodes,
                        o.launches,
                        o.flops / 1e12,
                        gb(o.bytes),
                        share
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "batch total (stages x runs): host<->device {:.3} GB; model {} ",
            gb(b.host_bytes_per_batch),
            r.roofs
                .iter()
                .zip(b.model_batch_ms.iter().zip(&b.model_images_per_s))
                .map(|(roof, (ms, ips))| format!(
                    "{} {:.1} ms ({:.1} images/s)",
                    roof.name, ms, ips
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s
}
