//! The CUDA backend's one dispatch path: [`resolve`] turns a graph node into the [`Step`] that
//! computes it, through one exhaustive `match` over [`Op`] (no `_` arm: an op without a CUDA
//! implementation does not compile). Each kernel file `kernels/<family>.cu` has its module here,
//! `families/<family>.rs`, with the launch builders (public, so tests and benchmarks launch exactly
//! what the executor launches) and the node -> launches mapping; `Op::Linear` is one cuBLASLt
//! matmul ([`crate::gemm`]). The executor only enqueues steps, so adding an op touches no
//! executor code (docs/architecture.md walks through it).
//!
//! Device memory: activations live in the executor's arena (the planner is the only allocator
//! of values). A family that needs memory of its own, scratch between its launches (linear
//! attention's per-head states) or constant tables (attention's RoPE cos/sin), asks for it at
//! resolve time through [`Ctx::workspace`] / [`Ctx::constant`]: the buffers are allocated once,
//! shared by key across the nodes of one executor, and owned by the executor ([`Resources`]) for
//! as long as the resolved launches exist, so a run still allocates nothing and can be captured.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use openuni_graph::{Graph, Node, Op, UnaryFn, ValueId, ValueKind};
use openuni_tensor::DType;

use crate::device::{CudaDevice, DeviceBuffer, KArg};
use crate::error::{CudaError, Result};
use crate::gemm::{Blas, Epilogue, LinearArgs, LinearGemm};

/// One kernel launch with its arguments resolved to device addresses and sizes.
#[derive(Clone, Debug)]
pub struct Launch {
    pub kernel: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
    pub args: Vec<KArg>,
}

impl Launch {
    /// # Safety
    /// The arguments must be valid for the kernel (the family that built it guarantees this).
    pub unsafe fn enqueue(&self, dev: &CudaDevice) -> Result<()> {
        dev.launch(&self.kernel, self.grid, self.block, self.smem, &self.args)
    }
}

/// Enqueues `launches` in order.
///
/// # Safety
/// As [`Launch::enqueue`], for each.
pub unsafe fn enqueue(dev: &CudaDevice, launches: &[Launch]) -> Result<()> {
    launches.iter().try_for_each(|l| l.enqueue(dev))
}

/// What one node runs: kernel launches, or one cuBLASLt matmul with the handle it was planned on.
pub enum Step {
    Launches(Vec<Launch>),
    Gemm(LinearGemm, Arc<Blas>),
    /// A matmul, then launches that read its output (a fused op's fallback path).
    GemmThen(LinearGemm, Arc<Blas>, Vec<Launch>),
}

impl Step {
    /// # Safety
    /// The pointers the step was resolved with must still be valid (the executor's buffers).
    pub unsafe fn enqueue(&self, dev: &CudaDevice) -> Result<()> {
        match self {
            Step::Launches(ls) => enqueue(dev, ls),
            Step::Gemm(g, blas) => g.run(dev, blas),
            Step::GemmThen(g, blas, ls) => {
                g.run(dev, blas)?;
                enqueue(dev, ls)
            }
        }
    }

    /// The kernel launches of the step (not its matmul).
    pub fn launches(&self) -> &[Launch] {
        match self {
            Step::Launches(ls) | Step::GemmThen(_, _, ls) => ls,
            Step::Gemm(..) => &[],
        }
    }
}

// ---- small helpers shared by the launch builders ------------------------------------------------

/// The kernel-name suffix of a storage type (kernels exist for f32 and bf16 storage).
pub fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => Err(CudaError::DType(d)),
    }
}

/// A 32-bit kernel argument, or an error naming the value that does not fit.
pub fn i32_arg(what: &str, v: usize) -> Result<KArg> {
    i32::try_from(v)
        .map(KArg::I32)
        .map_err(|_| CudaError::Invalid {
            what: what.into(),
            msg: format!("{v} does not fit 32 bits"),
        })
}

/// Elements of `dtype` per 16-byte vector.
pub fn vec_width(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// Threads per block of the grid-stride kernels.
pub const STRIDE_THREADS: u32 = 256;

/// Grid of a grid-stride kernel over `items` work items: enough blocks of [`STRIDE_THREADS`] for
/// the work, at most 16 per SM (a few waves; each thread then loops).
pub fn stride_grid(sm_count: u32, items: usize) -> (u32, u32, u32) {
    let cap = (sm_count.max(1) as usize) * 16;
    (
        items.div_ceil(STRIDE_THREADS as usize).clamp(1, cap) as u32,
        1,
        1,
    )
}

/// What a family needs to resolve a node.
pub struct Ctx<'a> {
    pub dev: &'a CudaDevice,
    pub graph: &'a Graph,
    /// Storage type of activations and weights: F32 or BF16.
    pub dtype: DType,
    /// Device address of any value.
    pub ptr: &'a dyn Fn(ValueId) -> u64,
    /// Device address of an f32 copy of a value, where one exists for the whole run: every value
    /// with f32 storage; with bf16 storage, the f32 staging slot of a graph input (so an op can read
    /// an input that bf16 cannot hold exactly, e.g. timestep 999, without the rounding).
    pub f32_ptr: &'a dyn Fn(ValueId) -> Option<u64>,
    /// Buffers the families own through the executor (see [`Ctx::workspace`]).
    pub resources: &'a RefCell<Resources>,
    /// The Linear + tanh-GELU pairs run as one GEMM (see [`gelu_fused_into_linear`]): the Linear's
    /// output -> the GELU's output.
    pub gelu_fusions: &'a HashMap<ValueId, ValueId>,
}

/// Executor-side peephole (issue 13 item 5, docs/gpu-plan.md): a tanh-GELU node
/// (`Op::Unary { f: GeluTanh }`) whose input is a `Linear`'s output read by nothing else (and not
/// a graph output) is computed by that Linear's GEMM with cuBLASLt's (bias +) GELU epilogue, which
/// is the tanh form, written straight into the GELU's output; the GELU node launches nothing.
/// The erf GELU is never fused (cuBLASLt does not compute it). Only when the GELU is the next node
/// and the Linear's activation inputs outlive it (so no memory the GEMM reads can be the GELU's
/// output); off with `keep_all` (every value must stay readable, and the Linear's own output is
/// never written). Returns the Linear's output.
pub fn gelu_fused_into_linear(g: &Graph, node: &Node, keep_all: bool) -> Option<ValueId> {
    let Op::Unary {
        x,
        f: UnaryFn::GeluTanh,
    } = &node.op
    else {
        return None;
    };
    if keep_all || g.outputs.iter().any(|(_, o)| o == x) {
        return None;
    }
    let ValueKind::Activation { node: producer } = g.value(*x).kind else {
        return None;
    };
    let ValueKind::Activation { node: this } = g.value(node.output).kind else {
        return None;
    };
    let linear = g.nodes.get(producer)?;
    if !matches!(linear.op, Op::Linear { .. }) || this != producer + 1 {
        return None;
    }
    let readers = g.nodes.iter().filter(|n| n.op.inputs().contains(x)).count();
    // The GEMM writes the GELU's output one node early. The planner keeps that memory apart from
    // every value live at the GELU node, but a value whose life ends at the Linear node may share
    // it: only the Linear's own inputs can, so each activation input must be read later too.
    let outlives = |v: &ValueId| match g.value(*v).kind {
        ValueKind::Activation { .. } => {
            g.outputs.iter().any(|(_, o)| o == v)
                || g.nodes[producer + 1..]
                    .iter()
                    .any(|n| n.op.inputs().contains(v))
        }
        _ => true, // inputs and states live for the whole run, weights are not in the arena
    };
    (readers == 1 && linear.op.inputs().iter().all(outlives)).then_some(*x)
}

/// Device memory a family requested at resolve time (workspaces, constant tables), kept alive by
/// the executor as long as its resolved launches.
#[derive(Debug, Default)]
pub struct Resources {
    by_key: HashMap<String, DeviceBuffer>,
    /// Buffers replaced by a bigger one under the same key: earlier nodes still point into them.
    retired: Vec<DeviceBuffer>,
}

impl Resources {
    /// Bytes of device memory held.
    pub fn bytes(&self) -> usize {
        self.by_key
            .values()
            .chain(&self.retired)
            .map(|b| b.bytes())
            .sum()
    }
}

impl Ctx<'_> {
    /// A zero-filled workspace of at least `bytes`, shared by every node that asks with the same
    /// `key` (nodes run one after another, so they may share scratch). Whatever a family needs to
    /// be zero at the start of its launches it must leave zero at their end. A bigger request
    /// than the key's current buffer gets a new buffer (earlier nodes keep the old one).
    pub fn workspace(&self, key: &str, bytes: usize) -> Result<u64> {
        let mut r = self.resources.borrow_mut();
        if let Some(b) = r.by_key.get(key) {
            if b.bytes() >= bytes {
                return Ok(b.ptr());
            }
        }
        let b = self.dev.alloc(bytes)?;
        self.dev.fill_bytes(b.ptr(), 0, bytes)?;
        let ptr = b.ptr();
        if let Some(old) = r.by_key.insert(key.to_string(), b) {
            r.retired.push(old);
        }
        Ok(ptr)
    }

    /// A constant table uploaded once per `key` (the key must determine the contents).
    pub fn constant(&self, key: &str, data: &[u8]) -> Result<u64> {
        let mut r = self.resources.borrow_mut();
        if let Some(b) = r.by_key.get(key) {
            return Ok(b.ptr());
        }
        let b = self.dev.upload(data)?;
        let ptr = b.ptr();
        r.by_key.insert(key.to_string(), b);
        Ok(ptr)
    }

    /// The kernel-name suffix of the storage type.
    pub fn suffix(&self) -> Result<&'static str> {
        suffix(self.dtype)
    }
}

/// The step that computes `node`: the one place where an op meets its CUDA implementation.
pub fn resolve(ctx: &Ctx, node: &Node) -> Result<Step> {
    let launches = match &node.op {
        Op::Linear { x, w, bias } => return linear(ctx, node, *x, *w, *bias),
        Op::LinearResidual {
            x,
            w,
            bias,
            residual,
        } => return linear_residual(ctx, node, *x, *w, *bias, Some(*residual)),
        Op::RmsNorm { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNormResidual { .. }
        | Op::AdaLayerNorm { .. } => norm::resolve(ctx, node),
        Op::RmsNormReluConv2d { .. } => norm_conv::resolve(ctx, node),
        Op::Unary { x, .. } if ctx.gelu_fusions.contains_key(x) => Ok(vec![]), // in the Linear's GEMM
        Op::Unary { .. } | Op::Add { .. } | Op::GatedAdd { .. } | Op::AdaGatedAdd { .. } => {
            elementwise::resolve(ctx, node)
        }
        Op::Attention { .. } => attention::resolve(ctx, node),
        Op::DecodeAttention { .. } | Op::KvCacheAppend { .. } | Op::KvCacheRows { .. } => {
            decode_attention::resolve(ctx, node)
        }
        Op::LinearAttention { .. }
        | Op::PackedLinearAttention { .. }
        | Op::MultiscaleLinearAttention { .. } => linear_attention::resolve(ctx, node),
        Op::Transpose { .. } => layout::resolve(ctx, node),
        Op::PixelShuffleLayerNorm { .. } => pixel_shuffle::resolve(ctx, node),
        Op::ModulationTable { .. }
        | Op::Chunk { .. }
        | Op::TimestepEmbedding { .. }
        | Op::SwiGlu { .. }
        | Op::SliceTokens { .. }
        | Op::GatherTokens { .. }
        | Op::EmbeddingGather { .. }
        | Op::QuantizeU8 { .. }
        | Op::AnyNonFinite { .. }
        | Op::GuidedX0 { .. }
        | Op::DpmSolverUpdate { .. }
        | Op::DivScalar { .. }
        | Op::GaussianNoise { .. }
        | Op::ClassPosEmbed { .. }
        | Op::Concat { .. } => misc::resolve(ctx, node),
        Op::Conv2d { .. }
        | Op::UpsampleConv2d { .. }
        | Op::DepthwiseConv2d { .. }
        | Op::DepthwiseConvGlu { .. }
        | Op::GroupedLinear { .. }
        | Op::RepeatChannels { .. } => conv::resolve(ctx, node),
        Op::MixFfnInvertedGlu { .. } => return mixffn_inverted_glu::resolve(ctx, node),
    };
    launches.map(Step::Launches)
}

/// `Op::Linear`: one cuBLASLt matmul, planned now (`crate::gemm`).
fn linear(ctx: &Ctx, node: &Node, x: ValueId, w: ValueId, bias: Option<ValueId>) -> Result<Step> {
    linear_residual(ctx, node, x, w, bias, None)
}

/// `Op::Linear`, or `Op::LinearResidual` with the residual as the matmul's C (beta = 1).
fn linear_residual(
    ctx: &Ctx,
    node: &Node,
    x: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    residual: Option<ValueId>,
) -> Result<Step> {
    let blas = ctx.dev.blas()?;
    let out = ctx.graph.shape(node.output);
    // A tanh-GELU reading only this output is done by the epilogue, into the GELU's output.
    let gelu = ctx.gelu_fusions.get(&node.output).copied();
    let epilogue = match (bias.is_some(), gelu.is_some()) {
        (false, false) => Epilogue::None,
        (true, false) => Epilogue::Bias,
        (false, true) => Epilogue::Gelu,
        (true, true) => Epilogue::BiasGelu,
    };
    let args = LinearArgs {
        dtype: ctx.dtype,
        rows: out.rows(),
        in_features: ctx.graph.shape(x).last(),
        out_features: out.last(),
        epilogue,
        x: (ctx.ptr)(x),
        w: (ctx.ptr)(w),
        bias: bias.map(ctx.ptr),
        y: (ctx.ptr)(gelu.unwrap_or(node.output)),
    };
    Ok(Step::Gemm(
        LinearGemm::with_residual(ctx.dev, &blas, &args, residual.map(ctx.ptr))?,
        blas,
    ))
}

pub mod attention;
pub mod attention_sm90;
pub mod conv;
pub mod conv_sm90;
pub mod decode_attention;
pub mod elementwise;
pub mod layout;
pub mod linear_attention;
pub mod misc;
pub mod mixffn_inverted_glu;
pub mod norm;
pub mod norm_conv;
pub mod pixel_shuffle;
