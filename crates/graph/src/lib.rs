//! The tensor graph: typed ops with static shapes, built once per (model, batch, resolution), and
//! the liveness planner that places every activation in one arena so that running the graph
//! allocates nothing.
//!
//! Shapes are checked here, when a node is added, and nowhere else: a backend may assume every
//! node it is handed is well formed.

mod builder;
mod cost;
mod op;
mod planner;

pub use builder::{
    AttentionParams, Graph, GraphBuilder, Node, OutputName, Value, ValueId, ValueKind,
};
pub use cost::{node_cost, Cost};
pub use op::{coeff, seed, KeyNorm, Modulation, Op, UnaryFn, SAMPLER_COEFFS};
pub use planner::{plan, Plan, ARENA_ALIGN_ELEMS};

use openuni_tensor::Shape;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("duplicate {what} name `{name}`")]
    Duplicate { what: &'static str, name: String },
    /// A run's outputs lack one the caller reads (the graph was built without marking it).
    #[error("the graph has no output `{name}`")]
    MissingOutput { name: String },
}

pub type Result<T, E = GraphError> = std::result::Result<T, E>;

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> GraphError {
    GraphError::Shape {
        op,
        msg: msg.into(),
    }
}

pub(crate) fn expect_shape(
    op: &'static str,
    what: &str,
    found: &Shape,
    expected: &Shape,
) -> Result<()> {
    if found != expected {
        return Err(shape_err(
            op,
            format!("{what} has shape {found}, expected {expected}"),
        ));
    }
    Ok(())
}
