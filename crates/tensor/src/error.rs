use std::path::PathBuf;

use crate::{DType, Shape};

/// Errors name the file and the tensor, and give the expected and the found value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: tensor `{key}` not found ({available} tensors in the file set{hint})")]
    MissingKey {
        path: PathBuf,
        key: String,
        available: usize,
        hint: String,
    },
    #[error("{path}: tensor `{key}` has shape {found}, expected {expected}")]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Shape,
        found: Shape,
    },
    #[error("{path}: tensor `{key}` has dtype {found}, which {purpose}")]
    UnsupportedDType {
        path: PathBuf,
        key: String,
        found: String,
        purpose: String,
    },
    #[error("tensor data of {found} elements does not match shape {shape} ({expected} elements)")]
    DataLength {
        shape: Shape,
        expected: usize,
        found: usize,
    },
    #[error("{path}: index {index} is out of range for tensor `{key}` with {len} rows")]
    IndexOutOfRange {
        path: PathBuf,
        key: String,
        index: usize,
        len: usize,
    },
    #[error("{path}: derived weight `{name}`: {msg}")]
    Derived {
        path: PathBuf,
        name: String,
        msg: String,
    },
    #[error("cannot convert a {from} tensor to {to}")]
    Conversion { from: DType, to: DType },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
