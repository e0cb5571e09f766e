//! OpenUni's models, each built as a graph that reads like the upstream module: one function per
//! upstream module, upstream key names kept, so a reader can hold the two side by side.

pub mod config;
pub mod connector;
pub mod dcae;
pub mod internvit;
pub mod internvl_preprocess;
pub mod nn;
pub mod openuni;
pub mod prompt;
pub mod qwen2;
pub mod qwen2_decode;
pub mod sana;
pub mod scheduler;
pub mod variant;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {msg}")]
    Config { path: String, msg: String },
    /// A request the model cannot serve (e.g. a decode tile smaller than the decoder's reach).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Graph(#[from] openuni_graph::GraphError),
    #[error(transparent)]
    Tensor(#[from] openuni_tensor::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
