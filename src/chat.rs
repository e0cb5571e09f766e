//! InternVL image chat on the CPU in f32 (docs/internvl3-vision.md "Chat"): the image embeddings
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

pub mod questions;


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

/// One sequence's KV cache: per layer, the keys (post-RoPE) and values of every position so far,
/// [len, kv_heads·head_dim] each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl KvCache {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A Qwen2 decoder with its KV cache (f32, CPU). [`CachedQwen2::forward`] runs one sequence
/// against the decoder's own cache; [`CachedQwen2::forward_batch`] runs several sequences, each
/// with its own [`KvCache`], through the same weights at once (continuous batching).
pub struct CachedQwen2<'a> {
    cfg: Qwen2Config,
    theta: f32,
    source: &'a dyn TensorSource,
    embed_key: String,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Vec<f32>,
    cache: KvCache,
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
        let mut llm = CachedQwen2 {
            cfg: cfg.clone(),
            theta: cfg.rope_theta(origin)?,
            source,
            embed_key,
            norm: get(format!("{prefix}norm.weight"), &[d])?,
            lm_head: get(head, &[cfg.vocab_size, d])?,
            cache: KvCache::default(),
            layers,
        };
        llm.cache = llm.new_cache();
        Ok(llm)
    }

    /// An empty cache for one more sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: vec![(vec![], vec![]); self.cfg.num_hidden_layers], len: 0 }
    }

    /// The model width D.
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
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

    /// Empties the decoder's own cache, for a new conversation on the same weights.
    pub fn reset(&mut self) {
        self.cache = self.new_cache();
    }

    /// Positions already in the decoder's own cache.
    pub fn cached_len(&self) -> usize {
        self.cache.len
    }

    /// Runs `embeds` ([n, D], n >= 1) at positions len..len+n, appends their keys and values to the
    /// decoder's own cache, and returns the logits [V] of the last position.
    pub fn forward(&mut self, embeds: &[f32]) -> Result<Vec<f32>> {
        let mut cache = std::mem::take(&mut self.cache);
        let out = self.forward_batch(&mut [(&mut cache, embeds)]);
        self.cache = cache;
        Ok(out?.remove(0))
    }

    /// Runs several sequences at once, each `(cache, embeds [n_i, D])` at its own positions
    /// len_i..len_i+n_i, appending to its own cache; returns each sequence's last-position logits.
    /// The projections and the MLP run over the rows of all sequences together (one matrix product
    /// per weight); attention runs per sequence against its own cache. Every row's arithmetic is
    /// the one it gets alone, so a sequence's logits do not depend on its batch mates.
    pub fn forward_batch(&self, seqs: &mut [(&mut KvCache, &[f32])]) -> Result<Vec<Vec<f32>>> {
        let c = &self.cfg;
        let (d, hd, inter) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        let (qw, kw) = (heads * hd, kv_heads * hd);
        let mut counts = vec![];
        let mut positions = vec![];
        for (cache, embeds) in seqs.iter() {
            let n = embeds.len() / d;
            if n == 0 || n * d != embeds.len() {
                return Err(err(format!("embeddings of {} values are not a whole number of {d}-wide rows", embeds.len())));
            }
            if cache.layers.len() != c.num_hidden_layers {
                return Err(err(format!("a KV cache of {} layers for a decoder of {}", cache.layers.len(), c.num_hidden_layers)));
            }
            c.check_length(cache.len + n)?;
            positions.extend(cache.len..cache.len + n);
            counts.push(n);
        }
        let rows = positions.len();
        let eps = c.rms_norm_eps;
        let mut x: Vec<f32> = seqs.iter().flat_map(|(_, e)| e.iter().copied()).collect();
        let mut h = vec![0f32; rows * d];
        for (li, layer) in self.layers.iter().enumerate() {
            ops::rmsnorm(&x, &layer.input_norm, None, eps, d, &mut h);
            let (mut q, mut k, mut v) = (vec![0f32; rows * qw], vec![0f32; rows * kw], vec![0f32; rows * kw]);
            ops::linear(&h, &layer.q.0, Some(&layer.q.1), rows, d, qw, &mut q);
            ops::linear(&h, &layer.k.0, Some(&layer.k.1), rows, d, kw, &mut k);
            ops::linear(&h, &layer.v.0, Some(&layer.v.1), rows, d, kw, &mut v);
            let (mut qr, mut kr) = (vec![0f32; q.len()], vec![0f32; k.len()]);
            ops::rope_at(&q, &positions, heads, hd, self.theta, &mut qr);
            ops::rope_at(&k, &positions, kv_heads, hd, self.theta, &mut kr);
            let mut o = vec![0f32; rows * qw];
            let mut start = 0;
            for ((cache, _), &n) in seqs.iter_mut().zip(&counts) {
                let (kc, vc) = &mut cache.layers[li];
                kc.extend_from_slice(&kr[start * kw..(start + n) * kw]);
                vc.extend_from_slice(&v[start * kw..(start + n) * kw]);
                // Causal over the whole cache: the last query sees every key (ops::attention
                // aligns the last query with the last key).
                let total = kc.len() / kw;
                let dims = AttentionDims { batch: 1, q_len: n, kv_len: total, heads, kv_heads, head_dim: hd, causal: true, scale: (hd as f32).powf(-0.5) };
                ops::attention(&qr[start * qw..(start + n) * qw], kc, vc, None, dims, &mut o[start * qw..(start + n) * qw]);
                start += n;
            }
            let mut y = vec![0f32; rows * d];
            ops::linear(&o, &layer.o, None, rows, qw, d, &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
            ops::rmsnorm(&x, &layer.post_norm, None, eps, d, &mut h);
            let (mut g, mut u) = (vec![0f32; rows * inter], vec![0f32; rows * inter]);
            ops::linear(&h, &layer.gate, None, rows, d, inter, &mut g);
            ops::linear(&h, &layer.up, None, rows, d, inter, &mut u);
            let mut a = vec![0f32; rows * inter];
            ops::swiglu(&g, &u, &mut a);
            ops::linear(&a, &layer.down, None, rows, inter, d, &mut y);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        // The last row of each sequence through the final norm and the head, together.
        let b = seqs.len();
        let mut last = vec![0f32; b * d];
        let mut end = 0;
        for ((cache, _), (&n, out)) in seqs.iter_mut().zip(counts.iter().zip(last.chunks_exact_mut(d))) {
            end += n;
            cache.len += n;
            ops::rmsnorm(&x[(end - 1) * d..end * d], &self.norm, None, eps, d, out);
        }
        let mut logits = vec![0f32; b * c.vocab_size];
        ops::linear(&last, &self.lm_head, None, b, d, c.vocab_size, &mut logits);
        Ok(logits.chunks_exact(c.vocab_size).map(|l| l.to_vec()).collect())
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

/// Sampling settings with transformers' `generate(do_sample=True)` semantics: the logits are
/// divided by `temperature`, then only the `top_k` largest (0: all; ties at the k-th value kept)
/// and the smallest set whose probability reaches `top_p` (1: all) stay; the next id is drawn
/// from their softmax with our own seeded generator (the same seed gives the same answer here,
/// not PyTorch's draw).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    /// Refuses settings with no meaning (temperature <= 0, top_p outside (0, 1]).
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(err(format!("temperature {} must be a positive number (leave sampling off for greedy)", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(err(format!("top_p {} must be in (0, 1]", self.top_p)));
        }
        Ok(())
    }

    /// The processed logits: removed tokens are −∞ (temperature, then top-k, then top-p).
    pub fn filter(&self, logits: &[f32]) -> Vec<f32> {
        let mut l: Vec<f32> = logits.iter().map(|&x| x / self.temperature).collect();
        if self.top_k > 0 && self.top_k < l.len() {
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[self.top_k - 1];
            l.iter_mut().filter(|x| **x < kth).for_each(|x| *x = f32::NEG_INFINITY);
        }
        if self.top_p < 1.0 {
            // Ascending order; drop the low tail whose cumulative probability is <= 1 - top_p,
            // always keeping the most likely token.
            let mut order: Vec<usize> = (0..l.len()).collect();
            order.sort_by(|&a, &b| l[a].total_cmp(&l[b]));
            let probs = softmax(&l);
            // f32 cumulative sum and threshold, as torch's cumsum and comparison compute them.
            let mut cum = 0.0f32;
            for (n, &i) in order.iter().enumerate() {
                cum += probs[i];
                if cum <= 1.0 - self.top_p && n + 1 < order.len() {
                    l[i] = f32::NEG_INFINITY;
                }
            }
        }
        l
    }
}

fn softmax(l: &[f32]) -> Vec<f32> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = l.iter().map(|&x| ((x - max) as f64).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|&x| (x / sum) as f32).collect()
}

/// How the next id is chosen.
pub enum Picker {
    Greedy,
    Sample(Sampling, Box<rand::rngs::StdRng>),
}

impl Picker {
    pub fn new(sampling: Option<Sampling>) -> Result<Picker> {
        use rand::SeedableRng;
        Ok(match sampling {
            None => Picker::Greedy,
            Some(s) => {
                s.validate()?;
                Picker::Sample(s, Box::new(rand::rngs::StdRng::seed_from_u64(s.seed)))
            }
        })
    }

    pub fn pick(&mut self, logits: &[f32]) -> usize {
        use rand::Rng;
        match self {
            Picker::Greedy => argmax(logits),
            Picker::Sample(s, rng) => {
                let probs = softmax(&s.filter(logits));
                let u: f64 = rng.random();
                let mut cum = 0.0f64;
                for (i, &p) in probs.iter().enumerate() {
                    cum += p as f64;
                    if u < cum {
                        return i;
                    }
                }
                argmax(&probs)
            }
        }
    }
}

/// Greedy decoding from prompt embeddings: returns the prefill logits (last prompt position)
/// and the generated ids (ending with `eos` when it was produced). `on_token` sees each id as
/// it is decoded (streaming).
pub fn generate_greedy(
    llm: &mut CachedQwen2,
    prompt_embeds: &[f32],
    max_new_tokens: usize,
    eos: Option<usize>,
    on_token: impl FnMut(usize),
) -> Result<(Vec<f32>, Vec<usize>)> {
    generate(llm, prompt_embeds, max_new_tokens, eos, &mut Picker::Greedy, on_token)
}

/// [`generate_greedy`] with any [`Picker`].
pub fn generate(
    llm: &mut CachedQwen2,
    prompt_embeds: &[f32],
    max_new_tokens: usize,
    eos: Option<usize>,
    picker: &mut Picker,
    mut on_token: impl FnMut(usize),
) -> Result<(Vec<f32>, Vec<usize>)> {
    generate_until(llm, prompt_embeds, max_new_tokens, eos, picker, |id| {
        on_token(id);
        true
    })
}

/// [`generate`] that also stops when `on_token` returns `false` (e.g. the reader went away).
pub fn generate_until(
    llm: &mut CachedQwen2,
    prompt_embeds: &[f32],
    max_new_tokens: usize,
    eos: Option<usize>,
    picker: &mut Picker,
    mut on_token: impl FnMut(usize) -> bool,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let prefill = llm.forward(prompt_embeds)?;
    let mut ids = vec![];
    let mut logits = prefill.clone();
    while ids.len() < max_new_tokens {
        let next = picker.pick(&logits);
        ids.push(next);
        let go_on = on_token(next);
        if Some(next) == eos || ids.len() == max_new_tokens || !go_on {
            break;
        }
        let e = llm.embed(&[next])?;
        logits = llm.forward(&e)?;
    }
    Ok((prefill, ids))
}

/// One sequence for [`generate_continuous`]: its prompt embeddings [L, D] and its budget.
pub struct BatchRequest<K> {
    pub key: K,
    pub prompt_embeds: Vec<f32>,
    pub max_new_tokens: usize,
}

/// Continuous batching on the CPU decoder: up to `max_batch` sequences decode together, one
/// [`KvCache`] each. Before every step, free places are filled from `requests` (a joining
/// sequence runs its prompt as part of that step: its prefill rides along with the others'
/// decode rows); after the step, a sequence that produced `eos` or reached its budget leaves and
/// `on_done` gets its generated ids (ending with `eos` when produced). Each sequence picks its
/// tokens with its own [`Picker`] (`sampling` None: greedy), so greedy answers are the ones
/// [`generate_greedy`] gives one at a time. An error from `requests` or `on_done` stops the run.
pub fn generate_continuous<K>(
    llm: &CachedQwen2,
    mut requests: impl Iterator<Item = anyhow::Result<BatchRequest<K>>>,
    max_batch: usize,
    eos: Option<usize>,
    sampling: Option<Sampling>,
    mut on_done: impl FnMut(K, Vec<usize>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    struct Live<K> {
        key: K,
        cache: KvCache,
        input: Vec<f32>,
        ids: Vec<usize>,
        max_new_tokens: usize,
        picker: Picker,
    }
    anyhow::ensure!(max_batch >= 1, "the batch size must be at least 1");
    let mut live: Vec<Live<K>> = vec![];
    let mut more = true;
    loop {
        while more && live.len() < max_batch {
            match requests.next().transpose()? {
                Some(r) if r.max_new_tokens == 0 => on_done(r.key, vec![])?,
                Some(r) => live.push(Live {
                    key: r.key,
                    cache: llm.new_cache(),
                    input: r.prompt_embeds,
                    ids: vec![],
                    max_new_tokens: r.max_new_tokens,
                    picker: Picker::new(sampling)?,
                }),
                None => more = false,
            }
        }
        if live.is_empty() {
            return Ok(());
        }
        let logits = {
            let mut batch: Vec<(&mut KvCache, &[f32])> = live.iter_mut().map(|s| (&mut s.cache, s.input.as_slice())).collect();
            llm.forward_batch(&mut batch)?
        };
        let mut still = vec![];
        for (mut s, l) in live.into_iter().zip(logits) {
            let next = s.picker.pick(&l);
            s.ids.push(next);
            if Some(next) == eos || s.ids.len() == s.max_new_tokens {
                on_done(s.key, s.ids)?;
            } else {
                s.input = llm.embed(&[next])?;
                still.push(s);
            }
        }
        live = still;
    }
}

// ---- `openuni chat`: template, tokens, image embeddings, streamed answer ----

/// The `internvl2_5` template's default system message (InternVL's conversation.py; the HF
/// remote code always uses it, spec §7.6).
pub const INTERNVL2_5_SYSTEM: &str =
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。";

/// The single-turn `internvl2_5` prompt as InternVL's `chat()` renders it: with an image of
/// `image_tokens` context tokens (256 per tile), `<img>` + that many `<IMG_CONTEXT>` + `</img>\n`
/// precede the question.
pub fn internvl2_5_prompt(question: &str, image_tokens: Option<usize>) -> String {
    internvl2_5_conversation(&[], question, image_tokens)
}

/// The multi-turn form: earlier (question, answer) turns rendered as `role + message + sep`
/// before the current question (InternVL's `chat(history=...)`; the image goes with the
/// current question).
pub fn internvl2_5_conversation(history: &[(String, String)], question: &str, image_tokens: Option<usize>) -> String {
    internvl2_5_with_images(history, question, image_tokens.as_slice())
}

/// The general form, with any number of images (`image_tokens[i]`: 256·T_i context tokens of
/// image i). One image: `<img>…</img>\n` before the question, as `chat()` prefixes `<image>\n`.
/// Several: the model card's multi-image form, `Image-1: <image>\nImage-2: <image>\n` before the
/// question, each `<image>` then replaced by its own `<img>…</img>` (`num_patches_list`).
pub fn internvl2_5_with_images(history: &[(String, String)], question: &str, image_tokens: &[usize]) -> String {
    internvl2_5_with_system(INTERNVL2_5_SYSTEM, history, question, image_tokens)
}

/// [`internvl2_5_with_images`] with another system message (InternVL's `model.system_message`).
pub fn internvl2_5_with_system(system: &str, history: &[(String, String)], question: &str, image_tokens: &[usize]) -> String {
    let block = |n: usize| format!("<img>{}</img>", "<IMG_CONTEXT>".repeat(n));
    let image = match image_tokens {
        [] => String::new(),
        [n] => format!("{}\n", block(*n)),
        many => many.iter().enumerate().map(|(i, &n)| format!("Image-{}: {}\n", i + 1, block(n))).collect(),
    };
    let mut s = format!("<|im_start|>system\n{system}<|im_end|>\n");
    for (q, a) in history {
        s.push_str(&format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"));
    }
    s.push_str(&format!("<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"));
    s
}

/// What `openuni chat` was asked.
pub struct ChatOptions {
    /// An InternVL folder (original layout); None: the built-in tiny random model.
    pub model: Option<std::path::PathBuf>,
    pub prompt: String,
    /// Earlier (question, answer) turns.
    pub history: Vec<(String, String)>,
    /// A safetensors file with `pixel_values` [T, 3, S, S] (what the model card's `load_image` returns).
    pub pixel_values: Option<std::path::PathBuf>,
    /// Image files (JPEG, PNG, WebP), tiled as the model card's `load_image` does.
    pub images: Vec<std::path::PathBuf>,
    /// The most tiles per image (the thumbnail comes on top when there is more than one).
    pub max_num: usize,
    pub max_new_tokens: usize,
    /// None: greedy.
    pub sampling: Option<Sampling>,
    /// Where the ViT runs (the LLM decodes on the CPU in f32).
    pub device: crate::exec::Device,
    pub dtype: openuni_tensor::DType,
}

/// Reads a history file: a JSON list of [question, answer] pairs.
pub fn read_history(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read the history", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list of [question, answer] pairs", path.display()))
}

/// The images of one question: all their tiles as one ViT batch, and the tiles per image.
pub struct ImageTiles {
    pub pixel_values: openuni_tensor::HostTensor,
    pub tiles: Vec<usize>,
}

/// The tile side InternViT takes.
pub const TILE: usize = 448;

/// Loads image files with the model card's `load_image(path, 448, max_num)` and stacks their
/// tiles in order.
pub fn load_images(paths: &[std::path::PathBuf], max_num: usize) -> anyhow::Result<Option<ImageTiles>> {
    if paths.is_empty() {
        return Ok(None);
    }
    let mut values = vec![];
    let mut tiles = vec![];
    for p in paths {
        let t = openuni_models::internvl_preprocess::load_image(p, TILE, max_num).map_err(|e| anyhow::anyhow!("image {e}"))?;
        tiles.push(t.shape.dims()[0]);
        values.extend(t.to_f32_vec());
    }
    let total = tiles.iter().sum::<usize>();
    Ok(Some(ImageTiles { pixel_values: openuni_tensor::HostTensor::from_f32([total, 3, TILE, TILE], values)?, tiles }))
}

/// An InternVL folder opened for chat: config (through the one reader), tokenizer, weights.
pub struct ChatModel {
    pub tiny: bool,
    pub cfg: openuni_models::config::MllmConfig,
    pub cfg_path: std::path::PathBuf,
    pub tok: openuni_models::prompt::PromptTokenizer,
    pub eos: usize,
    specials: Vec<String>,
    pub weights: openuni_tensor::Weights,
    device: crate::exec::Device,
    dtype: openuni_tensor::DType,
}

impl ChatModel {
    /// `model` None: the built-in tiny random model (written under the cache once).
    pub fn open(model: Option<&std::path::Path>, device: crate::exec::Device, dtype: openuni_tensor::DType) -> anyhow::Result<ChatModel> {
        use anyhow::{bail, Context};
        let dir = match model {
            Some(d) if d.is_dir() => d.to_path_buf(),
            // A hub repo id (OpenGVLab/InternVL3-1B) found in the Hugging Face cache, as generate does.
            Some(d) => {
                let repo = d.to_string_lossy();
                let cache = crate::generate::hf_hub_cache();
                match cache.as_deref().and_then(|c| crate::generate::hf_snapshot(c, &repo)) {
                    Some(snap) if repo.contains('/') => snap,
                    _ => bail!(
                        "--model {repo}: neither a folder nor a repository in the Hugging Face cache ({}); nothing is downloaded",
                        cache.map_or("no cache folder".into(), |c| c.display().to_string())
                    ),
                }
            }
            None => tiny_chat_model(&crate::tiny_model::default_dir().with_file_name("tiny-chat-v1"))?,
        };
        let cfg_path = dir.join("config.json");
        let cfg = openuni_models::config::read_mllm_config(&cfg_path)?;
        if let Some(t) = cfg.template.as_deref() {
            if t != "internvl2_5" {
                bail!("{}: template `{t}` is not supported (internvl2_5 is)", cfg_path.display());
            }
        }
        let tok = openuni_models::prompt::PromptTokenizer::from_dir(&dir)?;
        let eos = tok.token_id("<|im_end|>").map(|i| i as usize).with_context(|| format!("{}: no token `<|im_end|>`", tok.path().display()))?;
        let specials = tok.tokenizer().get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect();
        let weights = openuni_tensor::Weights::open(&dir)?;
        Ok(ChatModel { tiny: model.is_none(), cfg, cfg_path, tok, eos, specials, weights, device, dtype })
    }

    fn special(&self, t: &str) -> anyhow::Result<usize> {
        use anyhow::Context;
        self.tok.token_id(t).map(|i| i as usize).with_context(|| format!("{}: no token `{t}`", self.tok.path().display()))
    }

    /// Refuses user text holding special-token text (it would change the template).
    pub fn check_text(&self, what: &str, text: &str) -> anyhow::Result<()> {
        if let Some(t) = self.specials.iter().find(|t| text.contains(t.as_str())) {
            anyhow::bail!("{what} contains the special token `{t}` (it would change the template)");
        }
        Ok(())
    }

    /// The decoder (on the CPU in f32).
    pub fn llm(&self) -> anyhow::Result<CachedQwen2<'_>> {
        use anyhow::Context;
        let (prefix, head_prefix) = openuni_models::qwen2::detect_prefix(&mut self.weights.keys())
            .with_context(|| format!("{}: no `language_model.model.embed_tokens.weight`", self.weights.origin().display()))?;
        Ok(CachedQwen2::load(&self.weights, &self.cfg.llm, prefix, &format!("{head_prefix}lm_head.weight"), &self.cfg_path.display().to_string())?)
    }

    /// The vision tower + mlp1 over all tiles as one batch: [T·256, D] embeddings.
    /// `origin` names where the pixel values came from in errors.
    pub fn image_embeds(&self, px: &openuni_tensor::HostTensor, origin: &str) -> anyhow::Result<Vec<f32>> {
        use anyhow::{bail, Context};
        let vcfg = self.cfg.vision().map_err(|e| anyhow::anyhow!("an image was given, but {e}"))?;
        let layout = openuni_models::internvit::VitLayout::detect(&self.weights)
            .with_context(|| format!("an image was given, but {} has no vision tower weights", self.weights.origin().display()))?;
        openuni_models::internvit::check_position_table(&self.weights, &vcfg)?;
        let s = vcfg.image_size;
        if px.shape.rank() != 4 || px.shape.dims()[1..] != [vcfg.num_channels, s, s] || px.shape.dims()[0] == 0 {
            bail!("{origin}: `pixel_values` has shape {}, expected [T, {}, {s}, {s}]", px.shape, vcfg.num_channels);
        }
        let mut b = openuni_graph::GraphBuilder::new();
        let x = b.input("pixel_values", px.shape.clone())?;
        let out = openuni_models::internvit::build(&mut b, &vcfg, x)?;
        b.mark(openuni_models::internvit::VIT_EMBEDS, out.vit_embeds)?;
        let g = b.finish();
        let src = openuni_models::internvit::VitWeights { inner: &self.weights, layout };
        let mut ex = crate::exec::executor(self.device, &g, &src, self.dtype, false)?;
        let inputs = std::collections::HashMap::from([("pixel_values".to_string(), px.to_dtype(openuni_tensor::DType::F32)?)]);
        Ok(openuni_models::internvit::VIT_EMBEDS.take(&mut ex.run(&inputs)?)?.to_f32_vec())
    }

    /// The templated prompt's embeddings with the image rows scattered in. `images`: the
    /// pixel values of all tiles and the tiles per image.
    pub fn prompt_embeds(
        &self,
        llm: &CachedQwen2,
        history: &[(String, String)],
        question: &str,
        images: Option<(&openuni_tensor::HostTensor, &[usize])>,
        origin: &str,
    ) -> anyhow::Result<Vec<f32>> {
        self.prompt_embeds_with_system(llm, INTERNVL2_5_SYSTEM, history, question, images, origin)
    }

    /// [`prompt_embeds`](Self::prompt_embeds) with another system message.
    pub fn prompt_embeds_with_system(
        &self,
        llm: &CachedQwen2,
        system: &str,
        history: &[(String, String)],
        question: &str,
        images: Option<(&openuni_tensor::HostTensor, &[usize])>,
        origin: &str,
    ) -> anyhow::Result<Vec<f32>> {
        let image = match images {
            Some((px, tiles)) => {
                let e = self.image_embeds(px, origin)?;
                let per_tile = e.len() / self.cfg.llm.hidden_size / px.shape.dims()[0];
                Some((tiles.iter().map(|t| t * per_tile).collect::<Vec<_>>(), e))
            }
            None => None,
        };
        let text = internvl2_5_with_system(system, history, question, image.as_ref().map_or(&[][..], |(n, _)| n));
        let ids: Vec<usize> = self.tok.encode_text(&text, "prompt")?.into_iter().map(|i| i as usize).collect();
        let mut embeds = llm.embed(&ids)?;
        if let Some((_, img)) = &image {
            scatter_image_embeds(&mut embeds, &ids, self.special("<IMG_CONTEXT>")?, img, self.cfg.llm.hidden_size)?;
        }
        Ok(embeds)
    }

    /// The answer text of generated ids (special tokens skipped).
    pub fn detokenise(&self, ids: &[usize]) -> anyhow::Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tok.tokenizer().decode(&ids, true).map_err(|e| anyhow::anyhow!("detokenising the answer: {e}"))
    }

    pub fn note_if_tiny(&self) {
        if self.tiny {
            eprintln!("note: this is the built-in tiny model with random weights: its answers are not meaningful (use --model DIR for an InternVL3 folder)");
        }
    }
}

/// The answer's text as its tokens arrive: what each new token adds to the detokenised answer
/// (special tokens skipped). A character split over tokens decodes as U+FFFD until its last
/// byte arrives, so its text waits until then.
#[derive(Default)]
pub struct TextStream {
    /// The ids so far.
    pub ids: Vec<u32>,
    shown: String,
}

impl TextStream {
    /// Adds `id`; the text it completes (often empty).
    pub fn push(&mut self, tok: &openuni_models::prompt::PromptTokenizer, id: usize) -> anyhow::Result<String> {
        self.ids.push(id as u32);
        let t = tok.tokenizer().decode(&self.ids, true).map_err(|e| anyhow::anyhow!("detokenising the answer: {e}"))?;
        if t.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = t.strip_prefix(self.shown.as_str()).unwrap_or_default().to_string();
        self.shown = t;
        Ok(new)
    }

    /// The text not yet given out (a last incomplete character) and the whole answer.
    pub fn finish(&self, tok: &openuni_models::prompt::PromptTokenizer) -> anyhow::Result<(String, String)> {
        let all = tok.tokenizer().decode(&self.ids, true).map_err(|e| anyhow::anyhow!("detokenising the answer: {e}"))?;
        let rest = all.strip_prefix(self.shown.as_str()).unwrap_or_default().to_string();
        Ok((rest, all))
    }
}

/// Answers one question (streamed to stdout); returns the answer text.
pub fn run_cli(o: &ChatOptions) -> anyhow::Result<String> {
    use anyhow::bail;
    use std::io::Write;

    if o.pixel_values.is_some() && !o.images.is_empty() {
        bail!("--pixel-values and --image both give the image: use one");
    }
    let m = ChatModel::open(o.model.as_deref(), o.device, o.dtype)?;
    let turns = o.history.iter().flat_map(|(q, a)| [("history", q), ("history", a)]);
    for (what, text) in std::iter::once(("--prompt", &o.prompt)).chain(turns) {
        m.check_text(what, text)?;
    }
    let (px, tiles, origin) = match (&o.pixel_values, load_images(&o.images, o.max_num)?) {
        (Some(p), _) => {
            let px = openuni_tensor::Weights::open(p)?.get("pixel_values")?;
            let n = px.shape.dims().first().copied().unwrap_or(0);
            (Some(px), vec![n], p.display().to_string())
        }
        (None, Some(t)) => (Some(t.pixel_values), t.tiles, "--image".to_string()),
        (None, None) => (None, vec![], String::new()),
    };
    let mut llm = m.llm()?;
    let embeds = m.prompt_embeds(&llm, &o.history, &o.prompt, px.as_ref().map(|p| (p, tiles.as_slice())), &origin)?;
    // Stream: print what each new token adds to the detokenised answer (special tokens skipped).
    let mut text = TextStream::default();
    let mut stdout = std::io::stdout();
    let mut decode_err = None;
    let mut picker = Picker::new(o.sampling)?;
    let eos = m.eos;
    generate(&mut llm, &embeds, o.max_new_tokens, Some(eos), &mut picker, |id| match text.push(&m.tok, id) {
        Ok(new) => {
            let _ = write!(stdout, "{new}");
            let _ = stdout.flush();
        }
        Err(e) => decode_err = Some(e),
    })?;
    if let Some(e) = decode_err {
        return Err(e);
    }
    let (rest, all) = text.finish(&m.tok)?;
    print!("{rest}");
    println!();
    let stop = if text.ids.last() == Some(&(eos as u32)) { "stopped at <|im_end|>" } else { "stopped at --max-new-tokens" };
    eprintln!("({} tokens, {stop})", text.ids.len());
    m.note_if_tiny();
    Ok(all)
}

/// The built-in tiny chat model (an InternVL folder in the original layout, seeded random
/// weights, the tiny tokenizer with InternVL's special tokens), written under `dir` once.
pub fn tiny_chat_model(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    if dir.join(".complete").exists() {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let llm = crate::tiny_model::llm_config();
    let cfg = serde_json::json!({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1, "force_image_size": 448,
        "vision_config": {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
            "image_size": 448, "patch_size": 14, "num_channels": 3, "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6, "qkv_bias": true, "qk_normalization": false, "hidden_act": "gelu"
        },
        "llm_config": llm,
    });
    let vcfg = openuni_models::internvit::InternVlVisionConfig::from_json(&cfg, "tiny chat model")?;
    let lcfg: Qwen2Config = serde_json::from_value(cfg["llm_config"].clone())?;
    let mut b = openuni_graph::GraphBuilder::new();
    let x = b.input("px", [1, 3, 448, 448])?;
    openuni_models::internvit::build(&mut b, &vcfg, x)?;
    let e = b.input("e", [1, 4, lcfg.hidden_size])?;
    openuni_models::qwen2::build(&mut b, &lcfg, &openuni_models::nn::Scope::new("language_model.model"), e, "tiny chat llm")?;
    let g = b.finish();
    let mut shapes: Vec<(String, Vec<usize>)> = g.weights().map(|(id, n)| (n.to_string(), g.shape(id).dims().to_vec())).collect();
    let (v, d) = (lcfg.vocab_size, lcfg.hidden_size);
    shapes.push(("language_model.model.embed_tokens.weight".into(), vec![v, d]));
    shapes.push(("language_model.lm_head.weight".into(), vec![v, d]));
    // Graph names -> stored tensors: q/k/v thirds back into one fused qkv, and the stored shapes.
    let mut stored: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (name, s) in shapes {
        let (key, shape) = match name.strip_suffix("[q]") {
            Some(base) => (base.to_string(), { let mut s = s.clone(); s[0] *= 3; s }),
            None if name.ends_with("[k]") || name.ends_with("[v]") => continue,
            None if name.ends_with("patch_embedding.weight") => (name, vec![s[0], 3, 14, 14]),
            None if name.ends_with("class_embedding") => (name, vec![1, 1, s[0]]),
            None if name.ends_with("position_embedding") => (name, vec![1, s[0], s[1]]),
            None if name.ends_with(".ls1") || name.ends_with(".ls2") => (name, vec![s[1]]),
            None => (name, s),
        };
        stored.insert(key, shape);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(20250531);
    let normal = Normal::new(0.0f32, 1.0).expect("valid normal");
    let tensors: Vec<(String, openuni_tensor::HostTensor)> = stored
        .into_iter()
        .map(|(n, s)| {
            let shape = Shape::new(s);
            let (scale, offset) = crate::tiny_model::init_rule(&n, &shape);
            let v = (0..shape.numel()).map(|_| offset + scale * normal.sample(&mut rng)).collect();
            (n, openuni_tensor::HostTensor::from_f32(shape, v).expect("sized"))
        })
        .collect();
    openuni_tensor::write_safetensors(&dir.join("model.safetensors"), tensors.iter().map(|(k, v)| (k.as_str(), v)), None)?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(dir.join("tokenizer.json"), include_str!("../assets/tiny_tokenizer.json"))?;
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(dir.to_path_buf())
}
