//! Kernel families beyond the first norms and elementwise ops: each op family has its own kernel
//! file (`kernels/<family>.cu`), its launchers here in `families/<family>.rs`, and one arm in
//! [`resolve`]. A family turns a graph node into the kernel launches that compute it; the
//! executor only enqueues them, so adding an op touches no executor code.
//!
//! Device memory: activations live in the executor's arena (the planner is the only allocator
//! of values). A family that needs memory of its own, scratch between its launches (linear
//! attention's per-head states) or constant tables (rope's inverse frequencies), asks for it at
//! resolve time through [`Ctx::workspace`] / [`Ctx::constant`]: the buffers are allocated once,
//! shared by key across the nodes of one executor, and owned by the executor ([`Resources`]) for
//! as long as the resolved launches exist, so a run still allocates nothing and can be captured.

use std::cell::RefCell;
use std::collections::HashMap;

use openuni_graph::{Graph, Node, Op, ValueId};
use openuni_tensor::DType;

use crate::device::{CudaDevice, DeviceBuffer, KArg};
use crate::error::Result;

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
        self.by_key.values().chain(&self.retired).map(|b| b.bytes()).sum()
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
    pub fn suffix(&self) -> &'static str {
        if self.dtype == DType::F32 {
            "f32"
        } else {
            "bf16"
        }
    }
}

/// Whether a family computes this op.
pub fn supports(op: &Op) -> bool {
    matches!(
        op,
        Op::Transpose { .. }
            | Op::LinearAttention { .. }
            | Op::PackedLinearAttention { .. }
            | Op::ModulationTable { .. }
            | Op::Chunk { .. }
            | Op::TimestepEmbedding { .. }
            | Op::SwiGlu { .. }
            | Op::GatherTokens { .. }
            | Op::Concat { .. }
            | Op::Conv2d { .. }
            | Op::UpsampleConv2d { .. }
            | Op::DepthwiseConv2d { .. }
            | Op::DepthwiseConvGlu { .. }
            | Op::GroupedLinear { .. }
            | Op::RepeatChannels { .. }
            | Op::Attention { .. }
    )
}

/// The launches of `node`, or `None` when no family computes its op.
pub fn resolve(ctx: &Ctx, node: &Node) -> Option<Result<Vec<Launch>>> {
    match &node.op {
        Op::Transpose { .. } => Some(layout::resolve(ctx, node)),
        Op::LinearAttention { .. } => Some(linear_attention::resolve(ctx, node)),
        Op::PackedLinearAttention { .. } => Some(linear_attention::resolve(ctx, node)),
        Op::ModulationTable { .. } => Some(misc::resolve(ctx, node)),
        Op::Chunk { .. } => Some(misc::resolve(ctx, node)),
        Op::TimestepEmbedding { .. } => Some(misc::resolve(ctx, node)),
        Op::SwiGlu { .. } => Some(misc::resolve(ctx, node)),
        Op::GatherTokens { .. } => Some(misc::resolve(ctx, node)),
        Op::Concat { .. } => Some(misc::resolve(ctx, node)),
        Op::Conv2d { .. }
        | Op::UpsampleConv2d { .. }
        | Op::DepthwiseConv2d { .. }
        | Op::DepthwiseConvGlu { .. }
        | Op::GroupedLinear { .. }
        | Op::RepeatChannels { .. } => Some(conv::resolve(ctx, node)),
        Op::Attention { .. } => Some(attention::resolve(ctx, node)),
        _ => None,
    }
}

pub mod attention;
pub mod conv;
pub mod layout;
pub mod linear_attention;
pub mod misc;
