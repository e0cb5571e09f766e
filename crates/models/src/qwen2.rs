//! The Qwen2 decoder inside InternVL3 (transformers `Qwen2Model`), op by op as
//! docs/models.md ("Conditioning") describes it: RMSNorm, q/k/v with bias and o without, GQA, rotate-half
//! RoPE, SwiGLU, final norm. Upstream key names are kept under a prefix: "model." for a Qwen2
//! folder, "language_model.model." inside an InternVL3 checkpoint.

use openuni_graph::{AttentionParams, GraphBuilder, ValueId};
use serde::Deserialize;

use crate::config::{bounds, Bounds, ModelConfig};
use crate::nn::{linear, rms_norm, Scope};
use crate::{ModelError, Result};

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Qwen2Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// transformers 4.x and InternVL3 write `rope_theta` at the top level ...
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// ... transformers 5 writes `rope_parameters: {rope_type, rope_theta}`.
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_eps() -> f32 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}
fn default_max_pos() -> usize {
    32768
}

impl Qwen2Config {
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The RoPE base from either config form. The `dynamic` (NTK) scaling of InternVL3 only acts
    /// beyond `max_position_embeddings`, which [`check_length`](Self::check_length) refuses, so
    /// it means plain RoPE here; other scalings are refused.
    pub fn rope_theta(&self, origin: &str) -> Result<f32> {
        let err = |msg: String| ModelError::Config {
            path: origin.into(),
            msg,
        };
        let mut theta = self.rope_theta;
        let mut kinds = vec![];
        if let Some(p) = &self.rope_parameters {
            if let Some(t) = p.get("rope_theta").and_then(|t| t.as_f64()) {
                theta = theta.or(Some(t));
            }
            kinds.push(
                p.get("rope_type")
                    .and_then(|t| t.as_str())
                    .unwrap_or("default")
                    .to_string(),
            );
        }
        if let Some(s) = self.rope_scaling.as_ref().filter(|s| !s.is_null()) {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("?");
            kinds.push(kind.to_string());
        }
        if let Some(k) = kinds
            .iter()
            .find(|k| !matches!(k.as_str(), "default" | "dynamic"))
        {
            return Err(err(format!(
                "rope scaling `{k}` is not supported (default and dynamic are)"
            )));
        }
        theta.map(|t| t as f32).ok_or_else(|| {
            err("no rope_theta (neither at the top level nor in rope_parameters)".into())
        })
    }

    /// Refuses configs this port does not implement or whose values are out of bounds, naming the
    /// field (the bounds: [`crate::config::bounds`]).
    pub fn validate(&self, origin: &str) -> Result<()> {
        let err = |msg: String| {
            Err(ModelError::Config {
                path: origin.into(),
                msg,
            })
        };
        let b = Bounds(origin);
        b.int("hidden_size", self.hidden_size, 1..=bounds::WIDTH)?;
        b.int(
            "intermediate_size",
            self.intermediate_size,
            1..=bounds::MLP_WIDTH,
        )?;
        b.int(
            "num_hidden_layers",
            self.num_hidden_layers,
            1..=bounds::LAYERS,
        )?;
        b.int(
            "num_attention_heads",
            self.num_attention_heads,
            1..=bounds::HEADS,
        )?;
        b.int(
            "num_key_value_heads",
            self.num_key_value_heads,
            1..=bounds::HEADS,
        )?;
        b.int("vocab_size", self.vocab_size, 1..=bounds::VOCAB)?;
        b.int(
            "max_position_embeddings",
            self.max_position_embeddings,
            1..=bounds::POSITIONS,
        )?;
        b.positive("rms_norm_eps", self.rms_norm_eps as f64, 1.0)?;
        match self.head_dim {
            Some(hd) => {
                b.int("head_dim", hd, 1..=bounds::HEAD_DIM)?;
                b.product(
                    "num_attention_heads x head_dim",
                    self.num_attention_heads,
                    hd,
                    1..=bounds::WIDTH,
                )?;
            }
            None => b.divisible(
                "hidden_size",
                self.hidden_size,
                "num_attention_heads",
                self.num_attention_heads,
            )?,
        }
        if self.head_dim() % 2 != 0 {
            return err(format!(
                "head dim {} is odd (rotate-half RoPE needs an even head dim)",
                self.head_dim()
            ));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return err(format!(
                "{} attention heads cannot share {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.hidden_act != "silu" {
            return err(format!(
                "hidden_act `{}` is not supported (Qwen2 uses silu)",
                self.hidden_act
            ));
        }
        if self.use_sliding_window {
            return err("use_sliding_window=true is not supported".into());
        }
        b.positive("rope_theta", self.rope_theta(origin)? as f64, 1e12)?;
        Ok(())
    }

    /// Refuses sequences longer than the model's context (where dynamic NTK would change RoPE).
    pub fn check_length(&self, tokens: usize) -> Result<()> {
        if tokens > self.max_position_embeddings {
            return Err(ModelError::Config {
                path: "llm".into(),
                msg: format!(
                    "sequence of {tokens} tokens exceeds the model's context of {} tokens",
                    self.max_position_embeddings
                ),
            });
        }
        Ok(())
    }
}

impl ModelConfig for Qwen2Config {
    fn validate(&self, origin: &str) -> Result<()> {
        Qwen2Config::validate(self, origin)
    }
}

/// Outputs of [`build`] that callers may compare.
pub struct Qwen2Outputs {
    /// The last layer's output after the final RMSNorm (what OpenUni reads).
    pub hidden_states: ValueId,
    /// Each decoder layer's output, before the final norm.
    pub layers: Vec<ValueId>,
}

/// The decoder stack on `embeds` [B, T, D] (the token embeddings, with OpenUni's meta-queries
/// appended); every row is one causal sequence at positions 0..T-1. RoPE is fused into the
/// attention node (the same arithmetic as a separate rope op on q and k; see `Op::Attention`).
pub fn build(
    b: &mut GraphBuilder,
    cfg: &Qwen2Config,
    scope: &Scope,
    embeds: ValueId,
    origin: &str,
) -> Result<Qwen2Outputs> {
    let s = check_embeds(b, cfg, embeds, origin)?;
    cfg.check_length(s.dims()[1])?;
    stack(b, cfg, scope, embeds, None, origin)
}

/// The decoder stack on several sequences packed along the token axis: `embeds` [1, T, D] holds
/// the sequences one after another, `segments` their lengths (summing to T). Each sequence is
/// causal on its own at positions 0..len-1, exactly as [`build`] on each sequence separately,
/// with no padding: cond and uncond (or a batch of prompts) of unequal lengths in one pass.
pub fn build_packed(
    b: &mut GraphBuilder,
    cfg: &Qwen2Config,
    scope: &Scope,
    embeds: ValueId,
    segments: &[usize],
    origin: &str,
) -> Result<Qwen2Outputs> {
    let s = check_embeds(b, cfg, embeds, origin)?;
    let err = |msg: String| {
        Err(ModelError::Config {
            path: origin.into(),
            msg,
        })
    };
    let total: usize = segments.iter().sum();
    if s.dims()[0] != 1 || total != s.dims()[1] || segments.is_empty() || segments.contains(&0) {
        return err(format!(
            "packed embeddings {s} need batch 1 and non-empty sequence lengths summing to the token count; got {segments:?} (sum {total})"
        ));
    }
    for (i, &len) in segments.iter().enumerate() {
        cfg.check_length(len).map_err(|e| ModelError::Config {
            path: origin.into(),
            msg: format!("packed sequence {i}: {e}"),
        })?;
    }
    stack(b, cfg, scope, embeds, Some(segments), origin)
}

/// Checks `embeds` is [B, T, D] and returns its shape.
fn check_embeds(
    b: &GraphBuilder,
    cfg: &Qwen2Config,
    embeds: ValueId,
    origin: &str,
) -> Result<openuni_tensor::Shape> {
    cfg.validate(origin)?;
    let s = b.shape(embeds).clone();
    if s.rank() != 3 || s.last() != cfg.hidden_size {
        return Err(ModelError::Config {
            path: origin.into(),
            msg: format!(
                "embeddings have shape {s}, expected [B, T, {}]",
                cfg.hidden_size
            ),
        });
    }
    Ok(s)
}

fn stack(
    b: &mut GraphBuilder,
    cfg: &Qwen2Config,
    scope: &Scope,
    embeds: ValueId,
    segments: Option<&[usize]>,
    origin: &str,
) -> Result<Qwen2Outputs> {
    let theta = cfg.rope_theta(origin)?;
    let mut x = embeds;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        x = decoder_layer(b, cfg, &scope.pp("layers").pp(i), x, theta, segments)?;
        layers.push(x);
    }
    let hidden_states = rms_norm(b, &scope.pp("norm"), x, cfg.hidden_size, cfg.rms_norm_eps)?;
    Ok(Qwen2Outputs {
        hidden_states,
        layers,
    })
}

fn decoder_layer(
    b: &mut GraphBuilder,
    cfg: &Qwen2Config,
    s: &Scope,
    x: ValueId,
    theta: f32,
    segments: Option<&[usize]>,
) -> Result<ValueId> {
    let ap = causal_attention(cfg, theta, segments);
    layer_with(b, cfg, s, x, |b, a, q, k, v| {
        Ok(b.attention_ext(&a.name("attn"), q, k, v, ap)?)
    })
}

/// The decoder's causal self-attention over a prompt: RoPE on q and k inside the attention node
/// (positions restart at each packed sequence when `segments` are given).
pub(crate) fn causal_attention(
    cfg: &Qwen2Config,
    theta: f32,
    segments: Option<&[usize]>,
) -> AttentionParams {
    let hd = cfg.head_dim();
    AttentionParams {
        key_mask: None,
        heads: cfg.num_attention_heads,
        kv_heads: cfg.num_key_value_heads,
        head_dim: hd,
        causal: true,
        scale: (hd as f32).powf(-0.5),
        segments: segments.map(|s| s.to_vec()),
        rope: Some(theta),
    }
}

/// One decoder layer in scope `s` around `attend(builder, s.self_attn, q, k, v)`, which returns
/// the attention output (heads·hd wide, before o_proj): the causal prompt attention of [`build`],
/// or the KV-cache append + decode attention of `qwen2_decode` (one place for the layer).
pub(crate) fn layer_with(
    b: &mut GraphBuilder,
    cfg: &Qwen2Config,
    s: &Scope,
    x: ValueId,
    attend: impl FnOnce(&mut GraphBuilder, &Scope, ValueId, ValueId, ValueId) -> Result<ValueId>,
) -> Result<ValueId> {
    let d = cfg.hidden_size;
    let (heads, kv_heads, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let h = rms_norm(b, &s.pp("input_layernorm"), x, d, cfg.rms_norm_eps)?;
    let a = s.pp("self_attn");
    let q = linear(b, &a.pp("q_proj"), h, d, heads * hd, true)?;
    let k = linear(b, &a.pp("k_proj"), h, d, kv_heads * hd, true)?;
    let v = linear(b, &a.pp("v_proj"), h, d, kv_heads * hd, true)?;
    let o = attend(b, &a, q, k, v)?;
    let o = linear(b, &a.pp("o_proj"), o, heads * hd, d, false)?;
    let x = b.add(&s.name("residual1"), x, o)?;
    let h = rms_norm(b, &s.pp("post_attention_layernorm"), x, d, cfg.rms_norm_eps)?;
    let m = s.pp("mlp");
    let g = linear(b, &m.pp("gate_proj"), h, d, cfg.intermediate_size, false)?;
    let u = linear(b, &m.pp("up_proj"), h, d, cfg.intermediate_size, false)?;
    let a = b.swiglu(&m.name("act"), g, u)?;
    let y = linear(b, &m.pp("down_proj"), a, cfg.intermediate_size, d, false)?;
    Ok(b.add(&s.name("residual2"), x, y)?)
}

/// Where the decoder's weights live in a checkpoint: "model." in a Qwen2 folder,
/// "language_model.model." in an InternVL3 one. Returns (decoder prefix, lm_head key prefix).
pub fn detect_prefix(keys: &mut dyn Iterator<Item = &str>) -> Option<(&'static str, &'static str)> {
    let mut found = None;
    for k in keys {
        if k == "model.embed_tokens.weight" {
            found = Some(("model.", ""));
        } else if k == "language_model.model.embed_tokens.weight" {
            return Some(("language_model.model.", "language_model."));
        }
    }
    found
}
