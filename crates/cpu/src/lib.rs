//! The f32 CPU reference backend. It is the oracle every other path is judged against, so each op
//! is written plainly (`ops`), and the executor runs a graph exactly as planned, from one arena.

mod executor;
pub mod ops;

pub use executor::{CpuExecutor, CpuNodeTiming, ExecError, WeightCache};
