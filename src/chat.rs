//! InternVL image chat on the CPU in f32 (spec/internvl3.md §3, §7.5, §9): the image embeddings
//! scattered into the `<IMG_CONTEXT>` rows of the prompt's embeddings, then the Qwen2 decoder
//! with a KV cache: one prefill over the prompt, then one token per step against the cached
//! keys and values (post-RoPE k, as transformers caches them), greedy argmax (ties to the first
//! index) until `eos` or `max_new_tokens`.
//!
//! The arithmetic is the CPU reference ops' (`openuni_cpu::ops`), the same the graph's CPU
//! executor runs for `qwen2::build`; the cache is this module's own (the graph has no cache).

use openuni_cpu::ops::{self, AttentionDims};
use openuni_models::qwen2::Qwen2Config;
use openuni_models::{ModelError, Result};
use openuni_tensor::{Shape, TensorSource};


fn err(msg: String) -> ModelError {
    ModelError::Config { path: "chat".into(), msg }
}

/// Overwrites the rows of `embeds` ([ids.len(), d]) whose id is `context_id` with the rows of
/// `image` ([n, d], tiles in order, row-major within a tile). The counts must agree.
pub fn scatter_image_embeds(embeds: &mut [f32], ids: &[usize], context_id: usize, image: &[f32], d: usize) -> Result<()> {
    let slots = ids.iter().filter(|&&i| i == context_id).count();
    if slots * d != image.len() {
        return Err(err(format!(
            "the prompt has {slots} image context tokens (id {context_id}) but the images give {} embeddings",
            image.len() / d.max(1)
        )));
    }
    let mut rows = image.chunks_exact(d);
    for (row, &id) in embeds.chunks_exact_mut(d).zip(ids) {
        if id == context_id {
            row.copy_from_slice(rows.next().expect("counted above"));
        }
    }
    Ok(())
}

struct Layer {
    input_norm: Vec<f32>,
    q: (Vec<f32>, Vec<f32>),
    k: (Vec<f32>, Vec<f32>),
    v: (Vec<f32>, Vec<f32>),
    o: Vec<f32>,
    post_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// A Qwen2 decoder with its KV cache (f32, CPU).
pub struct CachedQwen2<'a> {
    cfg: Qwen2Config,
    theta: f32,
    source: &'a dyn TensorSource,
    embed_key: String,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Vec<f32>,
    /// Per layer: keys and values of every position so far, [len, kv_heads·head_dim] each.
    cache: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl<'a> CachedQwen2<'a> {
    /// Loads the decoder under `prefix` ("language_model.model." in an InternVL checkpoint) and the
    /// head `head_key` (ignored with tied embeddings).
    pub fn load(source: &'a dyn TensorSource, cfg: &Qwen2Config, prefix: &str, head_key: &str, origin: &str) -> Result<CachedQwen2<'a>> {
        cfg.validate(origin)?;
        let (d, hd, i) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
        let (qw, kw) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        let get = |name: String, shape: &[usize]| -> Result<Vec<f32>> {
            source
                .tensor_f32(&name, &Shape::new(shape.to_vec()))
                .map(|t| t.to_f32_vec())
                .map_err(|e| ModelError::Config { path: source.origin(), msg: e.to_string() })
        };
        let mut layers = vec![];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("{prefix}layers.{l}");
            let a = format!("{p}.self_attn");
            layers.push(Layer {
                input_norm: get(format!("{p}.input_layernorm.weight"), &[d])?,
                q: (get(format!("{a}.q_proj.weight"), &[qw, d])?, get(format!("{a}.q_proj.bias"), &[qw])?),
                k: (get(format!("{a}.k_proj.weight"), &[kw, d])?, get(format!("{a}.k_proj.bias"), &[kw])?),
                v: (get(format!("{a}.v_proj.weight"), &[kw, d])?, get(format!("{a}.v_proj.bias"), &[kw])?),
                o: get(format!("{a}.o_proj.weight"), &[d, qw])?,
                post_norm: get(format!("{p}.post_attention_layernorm.weight"), &[d])?,
                gate: get(format!("{p}.mlp.gate_proj.weight"), &[i, d])?,
                up: get(format!("{p}.mlp.up_proj.weight"), &[i, d])?,
                down: get(format!("{p}.mlp.down_proj.weight"), &[d, i])?,
            });
        }
        let embed_key = format!("{prefix}embed_tokens.weight");
        let head = if cfg.tie_word_embeddings { embed_key.clone() } else { head_key.to_string() };
        Ok(CachedQwen2 {
            cfg: cfg.clone(),
            theta: cfg.rope_theta(origin)?,
            source,
            embed_key,
            norm: get(format!("{prefix}norm.weight"), &[d])?,
            lm_head: get(head, &[cfg.vocab_size, d])?,
            cache: vec![(vec![], vec![]); cfg.num_hidden_layers],
            layers,
            len: 0,
        })
    }

    /// Token embeddings [ids.len(), D] (rows read from the checkpoint).
    pub fn embed(&self, ids: &[usize]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i >= self.cfg.vocab_size) {
            return Err(err(format!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab_size)));
        }
        self.source
            .rows_f32(&self.embed_key, ids)
            .map(|t| t.to_f32_vec())
            .map_err(|e| ModelError::Config { path: self.source.origin(), msg: e.to_string() })
    }

    /// Positions already in the cache.
    pub fn cached_len(&self) -> usize {
        self.len
    }

    /// Runs `embeds` ([n, D], n >= 1) at positions len..len+n, appends their keys and values to the
    /// cache, and returns the logits [V] of the last position.
    pub fn forward(&mut self, embeds: &[f32]) -> Result<Vec<f32>> {
        let c = &self.cfg;
        let (d, hd, inter) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let n = embeds.len() / d;
        if n == 0 || n * d != embeds.len() {
            return Err(err(format!("embeddings of {} values are not a whole number of {d}-wide rows", embeds.len())));
        }
        c.check_length(self.len + n)?;
        let positions: Vec<usize> = (self.len..self.len + n).collect();
        let total = self.len + n;
        let eps = c.rms_norm_eps;
        let mut x = embeds.to_vec();
        let mut h = vec![0f32; n * d];
        for (layer, (kc, vc)) in self.layers.iter().zip(self.cache.iter_mut()) {
            ops::rmsnorm(&x, &layer.input_norm, None, eps, d, &mut h);
            let (mut q, mut k, mut v) = (vec![0f32; n * qw], vec![0f32; n * kw], vec![0f32; n * kw]);
            ops::linear(&h, &layer.q.0, Some(&layer.q.1), n, d, qw, &mut q);
            ops::linear(&h, &layer.k.0, Some(&layer.k.1), n, d, kw, &mut k);
            ops::linear(&h, &layer.v.0, Some(&layer.v.1), n, d, kw, &mut v);
            let (mut qr, mut kr) = (vec![0f32; q.len()], vec![0f32; k.len()]);
            ops::rope_at(&q, &positions, heads, hd, self.theta, &mut qr);
            ops::rope_at(&k, &positions, kv_heads, hd, self.theta, &mut kr);
            kc.extend_from_slice(&kr);
            vc.extend_from_slice(&v);
            // Causal over the whole cache: the last query sees every key (ops::attention aligns
            // the last query with the last key).
            let dims = AttentionDims { batch: 1, q_len: n, kv_len: total, heads, kv_heads, head_dim: hd, causal: true, scale: (hd as f32).powf(-0.5) };
            let mut o = vec![0f32; n * qw];
            ops::attention(&qr, kc, vc, None, dims, &mut o);
            let mut y = vec![0f32; n * d];
            ops::linear(&o, &layer.o, None, n, qw, d, &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            ops::rmsnorm(&x, &layer.post_norm, None, eps, d, &mut h);
            let (mut g, mut u) = (vec![0f32; n * inter], vec![0f32; n * inter]);
            ops::linear(&h, &layer.gate, None, n, d, inter, &mut g);
            ops::linear(&h, &layer.up, None, n, d, inter, &mut u);
            let mut a = vec![0f32; n * inter];
            ops::swiglu(&g, &u, &mut a);
            ops::linear(&a, &layer.down, None, n, inter, d, &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        self.len = total;
        let mut last = vec![0f32; d];
        ops::rmsnorm(&x[(n - 1) * d..], &self.norm, None, eps, d, &mut last);
        let mut logits = vec![0f32; c.vocab_size];
        ops::linear(&last, &self.lm_head, None, 1, d, c.vocab_size, &mut logits);
        Ok(logits)
    }
}

/// The first index of the largest logit (PyTorch's argmax tie rule).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Greedy decoding from prompt embeddings: returns the prefill logits (last prompt position)
/// and the generated ids (ending with `eos` when it was produced). `on_token` sees each id as
/// it is decoded (streaming).
pub fn generate_greedy(
    llm: &mut CachedQwen2,
    prompt_embeds: &[f32],
    max_new_tokens: usize,
    eos: Option<usize>,
    mut on_token: impl FnMut(usize),
) -> Result<(Vec<f32>, Vec<usize>)> {
    let prefill = llm.forward(prompt_embeds)?;
    let mut ids = vec![];
    let mut logits = prefill.clone();
    while ids.len() < max_new_tokens {
        let next = argmax(&logits);
        ids.push(next);
        on_token(next);
        if Some(next) == eos || ids.len() == max_new_tokens {
            break;
        }
        let e = llm.embed(&[next])?;
        logits = llm.forward(&e)?;
    }
    Ok((prefill, ids))
}
