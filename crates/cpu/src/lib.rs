//! The f32 CPU backend. Each op is written twice: plainly in `ops`, the oracle every other path
//! (the fast ops, the CUDA kernels) is judged against, and restructured for speed in `fast`
//! (blocked, GEMM tiles, threaded on rayon's one pool). The executor runs a graph exactly as
//! planned, from one arena, with the fast ops by default or the plain ones ([`Kernels`]).

mod executor;
pub mod fast;
pub mod ops;
pub mod sgemm;

pub use executor::{CpuExecutor, CpuNodeTiming, ExecError, Kernels, WeightCache};
