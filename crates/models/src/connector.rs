//! OpenUni's connector (`ConnectorEncoder`, a SigLIP-vision-encoder stack without embeddings):
//! per layer `x = x + out_proj(MHA(LN1(x)))`, `x = x + fc2(gelu_tanh(fc1(LN2(x))))`; biased
//! projections, bidirectional attention with no mask, no position embedding, no final norm
//! (docs/models.md, "Conditioning").

use openuni_graph::{GraphBuilder, UnaryFn, ValueId};
use serde::Deserialize;

use crate::config::{bounds, Bounds, ModelConfig};
use crate::nn::{layer_norm, linear, Scope};
use crate::{ModelError, Result};

#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
pub struct ConnectorConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f32 {
    1e-6
}

fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}

impl ConnectorConfig {
    pub fn validate(&self, origin: &str) -> Result<UnaryFn> {
        let err = |msg: String| ModelError::Config {
            path: origin.into(),
            msg,
        };
        let b = Bounds(origin);
        b.int("hidden_size", self.hidden_size, 1..=bounds::WIDTH)?;
        b.int(
            "intermediate_size",
            self.intermediate_size,
            1..=bounds::MLP_WIDTH,
        )?;
        b.int(
            "num_attention_heads",
            self.num_attention_heads,
            1..=bounds::HEADS,
        )?;
        b.int(
            "num_hidden_layers",
            self.num_hidden_layers,
            1..=bounds::LAYERS,
        )?;
        b.positive("layer_norm_eps", self.layer_norm_eps as f64, 1.0)?;
        b.divisible(
            "hidden_size",
            self.hidden_size,
            "num_attention_heads",
            self.num_attention_heads,
        )?;
        UnaryFn::from_config_name(&self.hidden_act).ok_or_else(|| {
            err(format!(
                "hidden_act `{}` is not supported (expected gelu_pytorch_tanh, gelu, silu or relu)",
                self.hidden_act
            ))
        })
    }
}

impl ModelConfig for ConnectorConfig {
    fn validate(&self, origin: &str) -> Result<()> {
        ConnectorConfig::validate(self, origin).map(|_| ())
    }
}

/// Adds the connector to `b`: `x` is [B, N, hidden]. Returns each layer's output (same shape);
/// the last one is the connector's result. Weight names are `{scope}.layers.{i}.…` (the top
/// scope for a bare connector folder, `connector` inside an OpenUni checkpoint).
pub fn build(
    b: &mut GraphBuilder,
    cfg: &ConnectorConfig,
    scope: &Scope,
    x: ValueId,
    origin: &str,
) -> Result<Vec<ValueId>> {
    let act = cfg.validate(origin)?;
    let d = cfg.hidden_size;
    let xs = b.shape(x).clone();
    if xs.rank() != 3 || xs.last() != d {
        return Err(ModelError::Config {
            path: origin.into(),
            msg: format!("connector input has shape {xs}, expected [B, N, {d}]"),
        });
    }
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    let mut x = x;
    for i in 0..cfg.num_hidden_layers {
        x = encoder_layer(b, cfg, &scope.pp("layers").pp(i), x, act, d)?;
        layers.push(x);
    }
    Ok(layers)
}

fn encoder_layer(
    b: &mut GraphBuilder,
    cfg: &ConnectorConfig,
    s: &Scope,
    x: ValueId,
    act: UnaryFn,
    d: usize,
) -> Result<ValueId> {
    let h = layer_norm(b, &s.pp("layer_norm1"), x, d, cfg.layer_norm_eps)?;
    let a = self_attention(b, cfg, &s.pp("self_attn"), h, d)?;
    let x = b.add(&s.name("residual1"), x, a)?;
    let h = layer_norm(b, &s.pp("layer_norm2"), x, d, cfg.layer_norm_eps)?;
    let m = s.pp("mlp");
    let h = linear(b, &m.pp("fc1"), h, d, cfg.intermediate_size, true)?;
    let h = b.unary(&m.name("act"), h, act)?;
    let h = linear(b, &m.pp("fc2"), h, cfg.intermediate_size, d, true)?;
    Ok(b.add(&s.name("residual2"), x, h)?)
}

fn self_attention(
    b: &mut GraphBuilder,
    cfg: &ConnectorConfig,
    s: &Scope,
    x: ValueId,
    d: usize,
) -> Result<ValueId> {
    let heads = cfg.num_attention_heads;
    let head_dim = d / heads;
    let q = linear(b, &s.pp("q_proj"), x, d, d, true)?;
    let k = linear(b, &s.pp("k_proj"), x, d, d, true)?;
    let v = linear(b, &s.pp("v_proj"), x, d, d, true)?;
    let scale = (head_dim as f32).powf(-0.5);
    let o = b.attention(
        &s.name("attn"),
        q,
        k,
        v,
        None,
        heads,
        heads,
        head_dim,
        false,
        scale,
    )?;
    linear(b, &s.pp("out_proj"), o, d, d, true)
}
