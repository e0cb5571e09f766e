//! The Qwen2 decoder for generation, as two graphs built from the same layer as [`crate::qwen2`]
//! (docs/decode.md, "The decoder as graphs"):
//!
//! - the **prefill** graph runs a prompt [1, L, D] with causal attention and gives the logits of
//!   its last position and every layer's keys (rotated) and values as KV-cache rows
//!   [1, kv_heads, L, hd] (`KvCacheRows`), which the caller copies on the device into a
//!   sequence's rows of the decode step's KV cache;
//! - the **decode step** graph runs one new token per batch slot: embeddings [B, D] and positions
//!   [B] in, per layer the k/v projections appended to the layer's KV cache in place
//!   (`KvCacheAppend`, keys rotated at each slot's position) and `DecodeAttention` over it, logits
//!   [B, V] out. The caches are executor states ([`openuni_graph::ValueKind::State`],
//!   [B, kv_heads, max_len, hd]) that persist across steps, so a step moves only the embeddings,
//!   the positions and the logits between host and device, and its launches never change (a CUDA
//!   graph captured once is replayed for every step).

use openuni_graph::{GraphBuilder, ValueId};

use crate::nn::{rms_norm, Scope};
use crate::qwen2::{causal_attention, layer_with, Qwen2Config};
use crate::{ModelError, Result};

/// Graph input names.
pub const EMBEDS: &str = "embeds";
pub const POSITIONS: &str = "positions";
/// Graph output name (both graphs).
pub const LOGITS: &str = "logits";

/// The decode step's state holding layer `layer`'s keys (post-RoPE) or values.
pub fn cache_name(layer: usize, keys: bool) -> String {
    format!("layers.{layer}.{}_cache", if keys { "k" } else { "v" })
}

/// The prefill graph's output holding layer `layer`'s keys (rotated) or values as cache rows
/// [1, kv_heads, L, hd].
pub fn prefill_kv_name(layer: usize, keys: bool) -> String {
    format!("layers.{layer}.{}_rows", if keys { "k" } else { "v" })
}

/// Where the decoder reads its weights: the layers under `prefix` ("language_model.model."),
/// the head at `head_key` (the embedding table's key with tied embeddings).
#[derive(Clone, Debug)]
pub struct DecoderWeights {
    pub prefix: String,
    pub head_key: String,
}

/// The final norm and the LM head on [.., D] -> [.., V].
fn head(
    b: &mut GraphBuilder,
    cfg: &Qwen2Config,
    w: &DecoderWeights,
    x: ValueId,
) -> Result<ValueId> {
    let x = rms_norm(
        b,
        &Scope::new(&w.prefix).pp("norm"),
        x,
        cfg.hidden_size,
        cfg.rms_norm_eps,
    )?;
    let lm = b.weight(&w.head_key, [cfg.vocab_size, cfg.hidden_size])?;
    Ok(b.linear("lm_head", x, lm, None)?)
}

/// The prefill graph of a prompt of `len` tokens: input [`EMBEDS`] [1, len, D]; outputs
/// [`LOGITS`] [1, 1, V] (last position) and [`prefill_kv_name`] of every layer.
pub fn build_prefill(
    cfg: &Qwen2Config,
    w: &DecoderWeights,
    len: usize,
    origin: &str,
) -> Result<openuni_graph::Graph> {
    cfg.validate(origin)?;
    cfg.check_length(len)?;
    if len == 0 {
        return Err(ModelError::Config {
            path: origin.into(),
            msg: "an empty prompt (no tokens to prefill)".into(),
        });
    }
    let theta = cfg.rope_theta(origin)?;
    let mut b = GraphBuilder::new();
    let mut x = b.input(EMBEDS, [1, len, cfg.hidden_size])?;
    for i in 0..cfg.num_hidden_layers {
        let mut kv = None;
        x = layer_with(
            &mut b,
            cfg,
            &Scope::new(&w.prefix).pp("layers").pp(i),
            x,
            |b, a, q, k, v| {
                kv = Some((k, v));
                Ok(b.attention_ext(&a.name("attn"), q, k, v, causal_attention(cfg, theta, None))?)
            },
        )?;
        let (k, v) = kv.expect("the layer calls attend");
        let (kv_heads, hd) = (cfg.num_key_value_heads, cfg.head_dim());
        let layer = Scope::new(&w.prefix).pp("layers").pp(i);
        let k = b.kv_cache_rows(&layer.name("k_rows"), k, kv_heads, hd, Some(theta))?;
        let v = b.kv_cache_rows(&layer.name("v_rows"), v, kv_heads, hd, None)?;
        b.output(&prefill_kv_name(i, true), k)?;
        b.output(&prefill_kv_name(i, false), v)?;
    }
    let last = b.slice_tokens("last_position", x, len - 1, 1)?;
    let logits = head(&mut b, cfg, w, last)?;
    b.output(LOGITS, logits)?;
    Ok(b.finish())
}

/// The decode-step graph for `slots` sequences and caches of `max_len` positions: inputs
/// [`EMBEDS`] [slots, D] and [`POSITIONS`] [slots] (each slot's new position, integer-valued);
/// states [`cache_name`] [slots, kv_heads, max_len, hd] per layer; output [`LOGITS`] [slots, V].
pub fn build_decode_step(
    cfg: &Qwen2Config,
    w: &DecoderWeights,
    slots: usize,
    max_len: usize,
    origin: &str,
) -> Result<openuni_graph::Graph> {
    cfg.validate(origin)?;
    cfg.check_length(max_len)?;
    if slots == 0 || max_len == 0 {
        return Err(ModelError::Config { path: origin.into(), msg: format!("a decode step needs at least one slot and one position (got {slots} slots of {max_len})") });
    }
    let theta = cfg.rope_theta(origin)?;
    let (heads, kv_heads, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let mut b = GraphBuilder::new();
    let mut x = b.input(EMBEDS, [slots, cfg.hidden_size])?;
    let pos = b.input(POSITIONS, [slots])?;
    for i in 0..cfg.num_hidden_layers {
        let kc = b.state(&cache_name(i, true), [slots, kv_heads, max_len, hd])?;
        let vc = b.state(&cache_name(i, false), [slots, kv_heads, max_len, hd])?;
        x = layer_with(
            &mut b,
            cfg,
            &Scope::new(&w.prefix).pp("layers").pp(i),
            x,
            |b, a, q, k, v| {
                let kc =
                    b.kv_cache_append(&a.name("k_append"), kc, k, pos, kv_heads, hd, Some(theta))?;
                let vc = b.kv_cache_append(&a.name("v_append"), vc, v, pos, kv_heads, hd, None)?;
                Ok(b.decode_attention(
                    &a.name("attn"),
                    q,
                    kc,
                    vc,
                    pos,
                    heads,
                    kv_heads,
                    hd,
                    (hd as f32).powf(-0.5),
                    Some(theta),
                )?)
            },
        )?;
    }
    let logits = head(&mut b, cfg, w, x)?;
    b.output(LOGITS, logits)?;
    Ok(b.finish())
}
