use crate::ValueId;

/// Pointwise functions. Each has one CPU twin (`openuni_cpu::ops`) and one CUDA kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryFn {
    Silu,
    /// GELU with the tanh approximation (PyTorch `gelu(approximate="tanh")`, "gelu_pytorch_tanh").
    GeluTanh,
    /// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)).
    GeluErf,
    Relu,
}

impl UnaryFn {
    /// The activation names used in upstream configs.
    pub fn from_config_name(name: &str) -> Option<UnaryFn> {
        Some(match name {
            "silu" | "swish" => UnaryFn::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => UnaryFn::GeluTanh,
            "gelu" => UnaryFn::GeluErf,
            "relu" => UnaryFn::Relu,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            UnaryFn::Silu => "silu",
            UnaryFn::GeluTanh => "gelu_tanh",
            UnaryFn::GeluErf => "gelu_erf",
            UnaryFn::Relu => "relu",
        }
    }
}

/// adaLN modulation `x * (1 + scale) + shift`, with `scale` and `shift` of shape [B, C] broadcast
/// over the tokens of a [B, N, C] input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modulation {
    pub scale: ValueId,
    pub shift: ValueId,
}

/// One node's computation. Every tensor is contiguous and row-major; "rows" are all leading
/// dimensions flattened, and norms/linears act on the last dimension.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// `y = x · wᵀ + bias`, with `w` [out, in] in PyTorch's nn.Linear layout.
    Linear { x: ValueId, w: ValueId, bias: Option<ValueId> },
    /// `y = x / sqrt(mean(x²) + eps) · weight (+ bias)`; the bias form is DC-AE's channel RMSNorm.
    RmsNorm { x: ValueId, weight: ValueId, bias: Option<ValueId>, eps: f32 },
    /// `y = (x - mean) / sqrt(var + eps) (· weight + bias)`, then optionally modulated.
    LayerNorm { x: ValueId, weight: Option<ValueId>, bias: Option<ValueId>, eps: f32, modulation: Option<Modulation> },
    Unary { x: ValueId, f: UnaryFn },
    /// `a + b`, same shapes (residual add).
    Add { a: ValueId, b: ValueId },
    /// `x + gate · y` with `gate` [B, C] broadcast over the tokens of [B, N, C] (adaLN gated residual).
    GatedAdd { x: ValueId, gate: ValueId, y: ValueId },
    /// Softmax attention. `q` [B, N, heads·head_dim], `k`/`v` [B, M, kv_heads·head_dim] (GQA when
    /// kv_heads < heads), output [B, N, heads·head_dim]; softmax in f32 with `scale` on the logits.
    Attention { q: ValueId, k: ValueId, v: ValueId, heads: usize, kv_heads: usize, head_dim: usize, causal: bool, scale: f32 },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::LayerNorm { .. } => "layernorm",
            Op::Unary { f, .. } => f.name(),
            Op::Add { .. } => "add",
            Op::GatedAdd { .. } => "gated_add",
            Op::Attention { .. } => "attention",
        }
    }

    /// The values this op reads, in a fixed order.
    pub fn inputs(&self) -> Vec<ValueId> {
        let mut v = vec![];
        match self {
            Op::Linear { x, w, bias } => {
                v.extend([*x, *w]);
                v.extend(bias);
            }
            Op::RmsNorm { x, weight, bias, .. } => {
                v.extend([*x, *weight]);
                v.extend(bias);
            }
            Op::LayerNorm { x, weight, bias, modulation, .. } => {
                v.push(*x);
                v.extend(weight);
                v.extend(bias);
                if let Some(m) = modulation {
                    v.extend([m.scale, m.shift]);
                }
            }
            Op::Unary { x, .. } => v.push(*x),
            Op::Add { a, b } => v.extend([*a, *b]),
            Op::GatedAdd { x, gate, y } => v.extend([*x, *gate, *y]),
            Op::Attention { q, k, v: vv, .. } => v.extend([*q, *k, *vv]),
        }
        v
    }
}
