//! The `openuni` program's library: device selection, running graphs on a backend, and the
//! reference-case harness behind `openuni verify`.

pub mod atomic;
pub mod bench;
pub mod chat;
pub mod compare;
pub mod convert;
pub mod eval;
pub mod exec;
pub mod generate;
pub mod image;
pub mod pipeline;
pub mod serve;
pub mod tiny_model;
pub mod verify;
