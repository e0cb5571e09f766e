//! Kernel families beyond the first norms and elementwise ops: each op family has its own kernel
//! file (`kernels/<family>.cu`), its launchers here in `families/<family>.rs`, and one arm in
//! [`resolve`]. A family turns a graph node into the kernel launches that compute it; the
//! executor only enqueues them, so adding an op touches no executor code.

use openuni_graph::{Graph, Node, Op, ValueId};
use openuni_tensor::DType;

use crate::device::{CudaDevice, KArg};
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
}

impl Ctx<'_> {
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
    matches!(op, Op::Transpose { .. } | Op::Attention { .. })
}

/// The launches of `node`, or `None` when no family computes its op.
pub fn resolve(ctx: &Ctx, node: &Node) -> Option<Result<Vec<Launch>>> {
    match &node.op {
        Op::Transpose { .. } => Some(layout::resolve(ctx, node)),
        Op::Attention { .. } => Some(attention::resolve(ctx, node)),
        _ => None,
    }
}

pub mod attention;
pub mod layout;
