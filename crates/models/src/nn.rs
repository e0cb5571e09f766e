//! The building blocks every model shares, so that a weight's name and shape are declared in one
//! place: `{p}.weight` is [out, in] (PyTorch's `nn.Linear` layout), `{p}.bias` [out], a norm's
//! `{p}.weight` (and LayerNorm's `{p}.bias`) [d]. The graph node is named `p` too, so an error
//! or a per-node diff names the upstream module.

use openuni_graph::{GraphBuilder, ValueId};

use crate::Result;

/// `x W^T (+ b)`: PyTorch `nn.Linear(din, dout, bias)`.
pub fn linear(b: &mut GraphBuilder, p: &str, x: ValueId, din: usize, dout: usize, bias: bool) -> Result<ValueId> {
    let w = b.weight(&format!("{p}.weight"), [dout, din])?;
    let bs = if bias { Some(b.weight(&format!("{p}.bias"), [dout])?) } else { None };
    Ok(b.linear(p, x, w, bs)?)
}

/// PyTorch `nn.LayerNorm(d, eps)` with weight and bias over the last axis.
pub fn layer_norm(b: &mut GraphBuilder, p: &str, x: ValueId, d: usize, eps: f32) -> Result<ValueId> {
    let w = b.weight(&format!("{p}.weight"), [d])?;
    let bias = b.weight(&format!("{p}.bias"), [d])?;
    Ok(b.layernorm(p, x, Some(w), Some(bias), eps, None)?)
}

/// RMSNorm with a weight and no bias over the last axis (Qwen2RMSNorm, diffusers `RMSNorm`).
pub fn rms_norm(b: &mut GraphBuilder, p: &str, x: ValueId, d: usize, eps: f32) -> Result<ValueId> {
    let w = b.weight(&format!("{p}.weight"), [d])?;
    Ok(b.rmsnorm(p, x, w, None, eps)?)
}
