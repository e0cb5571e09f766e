//! The building blocks every model shares, so that a weight's name and shape are declared in one
//! place: `{p}.weight` is [out, in] (PyTorch's `nn.Linear` layout), `{p}.bias` [out], a norm's
//! `{p}.weight` (and LayerNorm's `{p}.bias`) [d]. The graph node is named `p` too, so an error
//! or a per-node diff names the upstream module.
//!
//! Names are built with a [`Scope`], the one way the models spell a weight's key: the upstream
//! module path, one `.pp(part)` per level (candle's `VarBuilder::pp`), and `.name(leaf)` at the end.

use std::fmt;

use openuni_graph::{GraphBuilder, ValueId};

use crate::Result;

/// A module path inside a checkpoint (`language_model.model.layers.3.self_attn`): the prefix of
/// its weights' keys and the name of its graph nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    path: String,
}

impl Scope {
    /// The scope under a key prefix as checkpoints spell it (`model.`, `connector.`, or empty
    /// for the top level); a trailing dot is optional.
    pub fn new(prefix: &str) -> Scope {
        Scope {
            path: prefix.trim_end_matches('.').to_string(),
        }
    }

    /// The sub-module `part` (a name or a layer index).
    pub fn pp(&self, part: impl fmt::Display) -> Scope {
        Scope {
            path: self.name(&part.to_string()),
        }
    }

    /// The full key (or node name) of `leaf` in this scope: `{path}.{leaf}`, or `leaf` at the top.
    pub fn name(&self, leaf: &str) -> String {
        if self.path.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.path)
        }
    }

    /// The module path itself (the name of the module's own node).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// `x W^T (+ b)`: PyTorch `nn.Linear(din, dout, bias)` (also a 1×1 conv stored [out, in]).
pub fn linear(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    din: usize,
    dout: usize,
    bias: bool,
) -> Result<ValueId> {
    let w = b.weight(&s.name("weight"), [dout, din])?;
    let bs = if bias {
        Some(b.weight(&s.name("bias"), [dout])?)
    } else {
        None
    };
    Ok(b.linear(s.path(), x, w, bs)?)
}

/// `residual + linear(x)` as one node: the GEMM adds the residual as its C input (beta = 1).
#[allow(clippy::too_many_arguments)]
pub fn linear_residual(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    din: usize,
    dout: usize,
    bias: bool,
    residual: ValueId,
) -> Result<ValueId> {
    let w = b.weight(&s.name("weight"), [dout, din])?;
    let bs = if bias {
        Some(b.weight(&s.name("bias"), [dout])?)
    } else {
        None
    };
    Ok(b.linear_residual(s.path(), x, w, bs, residual)?)
}

/// PyTorch `nn.LayerNorm(d, eps)` with weight and bias over the last axis.
pub fn layer_norm(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    d: usize,
    eps: f32,
) -> Result<ValueId> {
    let w = b.weight(&s.name("weight"), [d])?;
    let bias = b.weight(&s.name("bias"), [d])?;
    Ok(b.layernorm(s.path(), x, Some(w), Some(bias), eps, None)?)
}

/// RMSNorm with a weight and no bias over the last axis (Qwen2RMSNorm, diffusers `RMSNorm`).
pub fn rms_norm(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    d: usize,
    eps: f32,
) -> Result<ValueId> {
    let w = b.weight(&s.name("weight"), [d])?;
    Ok(b.rmsnorm(s.path(), x, w, None, eps)?)
}

/// RMSNorm with a weight and a bias over the last axis (diffusers `RMSNorm(elementwise_affine,
/// bias=True)`, DC-AE's channel norms).
pub fn rms_norm_biased(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    d: usize,
    eps: f32,
) -> Result<ValueId> {
    let w = b.weight(&s.name("weight"), [d])?;
    let bias = b.weight(&s.name("bias"), [d])?;
    Ok(b.rmsnorm(s.path(), x, w, Some(bias), eps)?)
}

/// `residual + rms_norm_biased(x)` as one node (`Op::RmsNormResidual`): DC-AE's `x + norm(y)`
/// block endings, without storing the normalised tensor.
pub fn rms_norm_biased_residual(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    d: usize,
    eps: f32,
    residual: ValueId,
) -> Result<ValueId> {
    let w = b.weight(&s.name("weight"), [d])?;
    let bias = b.weight(&s.name("bias"), [d])?;
    Ok(b.rmsnorm_residual(s.path(), x, w, Some(bias), eps, residual)?)
}

/// diffusers `GLUMBConv` without its optional norm and residual (SANA's feed-forward; DC-AE's
/// EfficientViT blocks add both): `conv_inverted` (1×1, bias) -> SiLU -> `conv_depth` (3×3
/// depthwise, bias) -> chunk into (u, gate) -> u · SiLU(gate) -> `conv_point` (1×1, no bias), on
/// tokens [B, h·w, din] of an h×w grid.
#[allow(clippy::too_many_arguments)]
pub fn glumb_conv(
    b: &mut GraphBuilder,
    s: &Scope,
    x: ValueId,
    din: usize,
    hidden: usize,
    dout: usize,
    h: usize,
    w: usize,
) -> Result<ValueId> {
    let inv = s.pp("conv_inverted");
    let iw = b.weight(&inv.name("weight"), [2 * hidden, din])?;
    let ib = b.weight(&inv.name("bias"), [2 * hidden])?;
    let dc = s.pp("conv_depth");
    let dw = b.weight(&dc.name("weight"), [2 * hidden, 1, 3, 3])?;
    let db = b.weight(&dc.name("bias"), [2 * hidden])?;
    // conv_inverted, its SiLU, conv_depth, the chunk and u · silu(gate): one node, so the 2·hidden
    // wide GEMM output is never stored (on a GPU it stays in shared memory for the depthwise conv).
    let u = b.mixffn_inverted_glu(dc.path(), x, iw, Some(ib), dw, Some(db), h, w)?;
    linear(b, &s.pp("conv_point"), u, hidden, dout, false)
}

#[cfg(test)]
mod tests {
    use super::Scope;

    #[test]
    fn scope_spells_upstream_keys() {
        let s = Scope::new("language_model.model.")
            .pp("layers")
            .pp(3)
            .pp("self_attn");
        assert_eq!(
            s.name("weight"),
            "language_model.model.layers.3.self_attn.weight"
        );
        assert_eq!(s.path(), "language_model.model.layers.3.self_attn");
        assert_eq!(
            Scope::new("").pp("caption_norm").name("weight"),
            "caption_norm.weight"
        );
        assert_eq!(
            Scope::new("connector").name("x"),
            Scope::new("connector.").name("x")
        );
    }
}
