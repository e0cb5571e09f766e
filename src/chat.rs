//! InternVL image chat (docs/internvl3-vision.md "Chat"): the image embeddings scattered into
//! the `<IMG_CONTEXT>` rows of the prompt's embeddings, then the Qwen2 decoder with a KV cache on
//! the chosen device: one prefill graph over the prompt, then one decode-step graph per token
//! against the cached keys and values (post-RoPE k, as transformers caches them; an executor
//! state that persists across steps), greedy argmax (ties to the first index) until `eos` or
//! `max_new_tokens`. docs/decode.md describes the graphs and the cache.

use std::collections::HashMap;

use crate::exec::{Device, GraphExecutor, WeightCache};
use openuni_models::qwen2::Qwen2Config;
use openuni_models::qwen2_decode::{self, DecoderWeights};
use openuni_models::{ModelError, Result};
use openuni_tensor::{DType, HostTensor, Shape, TensorSource};

pub mod questions;

fn err(msg: String) -> ModelError {
    ModelError::Config {
        path: "chat".into(),
        msg,
    }
}

/// Overwrites the rows of `embeds` ([ids.len(), d]) whose id is `context_id` with the rows of
/// `image` ([n, d], tiles in order, row-major within a tile). The counts must agree.
pub fn scatter_image_embeds(
    embeds: &mut [f32],
    ids: &[usize],
    context_id: usize,
    image: &[f32],
    d: usize,
) -> Result<()> {
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

/// Token embeddings read from the checkpoint's table (the decoder's input, on the host: a decode
/// step uploads one D-wide row per sequence).
#[derive(Clone)]
pub struct Embeddings<'a> {
    source: &'a dyn TensorSource,
    key: String,
    vocab: usize,
}

impl Embeddings<'_> {
    /// Token embeddings [ids.len(), D] (rows read from the checkpoint).
    pub fn embed(&self, ids: &[usize]) -> Result<Vec<f32>> {
        if let Some(&bad) = ids.iter().find(|&&i| i >= self.vocab) {
            return Err(err(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        self.source
            .rows_f32(&self.key, ids)
            .map(|t| t.to_f32_vec())
            .map_err(|e| ModelError::Config {
                path: self.source.origin(),
                msg: e.to_string(),
            })
    }
}

/// The decode-step executor and the cache length it was built for.
struct DecodeStep {
    exec: Box<dyn GraphExecutor>,
    max_len: usize,
    /// Steps run; after the first (eager) one the step is captured and then replayed.
    runs: usize,
}

/// The Qwen2 decoder of chat with a KV cache of `slots` sequences, run as the graphs of
/// `openuni_models::qwen2_decode` on a device (docs/decode.md): [`CachedQwen2::prefill`] runs a
/// prompt and writes its keys and values into a slot's rows of the decode step's cache (an
/// executor state); [`CachedQwen2::step`] decodes one token for any of the slots at once. On a
/// GPU the step is captured into a CUDA graph after its first run and replayed from then on.
/// The cache grows (the step rebuilt, the cached rows copied over) when a sequence needs more
/// positions than it holds.
pub struct CachedQwen2<'a> {
    cfg: Qwen2Config,
    source: &'a dyn TensorSource,
    embeddings: Embeddings<'a>,
    weights: DecoderWeights,
    device: Device,
    cache: WeightCache,
    origin: String,
    /// Tokens cached per slot.
    lens: Vec<usize>,
    step: Option<DecodeStep>,
    /// Positions the next cache build holds at least (`reserve`).
    reserved: usize,
}

impl<'a> CachedQwen2<'a> {
    /// The decoder under `prefix` ("language_model.model." in an InternVL checkpoint) with the
    /// head `head_key` (ignored with tied embeddings), on the CPU in f32 with one slot.
    pub fn load(
        source: &'a dyn TensorSource,
        cfg: &Qwen2Config,
        prefix: &str,
        head_key: &str,
        origin: &str,
    ) -> anyhow::Result<CachedQwen2<'a>> {
        Self::load_on(
            source,
            cfg,
            prefix,
            head_key,
            origin,
            Device::Cpu,
            DType::F32,
            1,
        )
    }

    /// As [`CachedQwen2::load`], on `device` with `dtype` storage (the KV cache too: f32 on the
    /// CPU, bf16 or f32 on a GPU) and `slots` sequences decoding together.
    #[allow(clippy::too_many_arguments)]
    pub fn load_on(
        source: &'a dyn TensorSource,
        cfg: &Qwen2Config,
        prefix: &str,
        head_key: &str,
        origin: &str,
        device: Device,
        dtype: DType,
        slots: usize,
    ) -> anyhow::Result<CachedQwen2<'a>> {
        cfg.validate(origin)?;
        cfg.rope_theta(origin)?;
        anyhow::ensure!(slots >= 1, "the decoder needs at least one batch slot");
        if device == Device::Cpu && dtype != DType::F32 {
            anyhow::bail!("--device cpu runs the f32 reference only; --dtype {dtype} needs --device cuda or emu");
        }
        let embed_key = format!("{prefix}embed_tokens.weight");
        let head_key = if cfg.tie_word_embeddings {
            embed_key.clone()
        } else {
            head_key.to_string()
        };
        Ok(CachedQwen2 {
            cfg: cfg.clone(),
            source,
            embeddings: Embeddings {
                source,
                key: embed_key,
                vocab: cfg.vocab_size,
            },
            weights: DecoderWeights {
                prefix: prefix.to_string(),
                head_key,
            },
            device,
            cache: WeightCache::new(device, dtype)?,
            origin: origin.to_string(),
            lens: vec![0; slots],
            step: None,
            reserved: 0,
        })
    }

    /// The model width D.
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Bytes of the decoder's weights on its device (the head included, the embedding table only
    /// when tied to it: the table is read on the host), what a decode step streams once.
    pub fn weight_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Sequences that can decode together.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// The embedding table (a handle that does not borrow the decoder).
    pub fn embeddings(&self) -> Embeddings<'a> {
        self.embeddings.clone()
    }

    /// Token embeddings [ids.len(), D] (rows read from the checkpoint).
    pub fn embed(&self, ids: &[usize]) -> Result<Vec<f32>> {
        self.embeddings.embed(ids)
    }

    /// Empties every slot, for a new conversation on the same weights.
    pub fn reset(&mut self) {
        self.lens.iter_mut().for_each(|l| *l = 0);
    }

    /// Positions cached in slot 0.
    pub fn cached_len(&self) -> usize {
        self.lens[0]
    }

    /// The decode step's executor once a prompt has been prefilled (for its traffic counters).
    pub fn step_executor(&self) -> Option<&dyn GraphExecutor> {
        self.step.as_ref().map(|s| s.exec.as_ref())
    }

    /// Makes the next cache build hold at least `positions` per slot (a caller that knows its
    /// prompt and budget avoids a rebuild mid-answer).
    pub fn reserve(&mut self, positions: usize) {
        self.reserved = self.reserved.max(positions);
    }

    /// Forgets slot `slot`'s sequence (its rows are overwritten by the next prefill).
    pub fn free(&mut self, slot: usize) {
        self.lens[slot] = 0;
    }

    /// Runs `embeds` ([n, D], n >= 1) on slot 0: a prompt on an empty slot, else one decode
    /// token; returns the logits [V] of the last position.
    pub fn forward(&mut self, embeds: &[f32]) -> anyhow::Result<Vec<f32>> {
        if self.lens[0] == 0 {
            return self.prefill(0, embeds);
        }
        anyhow::ensure!(
            embeds.len() == self.cfg.hidden_size,
            "slot 0 already holds {} tokens: only one token at a time can follow (a new prompt needs an empty slot)",
            self.lens[0]
        );
        Ok(self.step(&[(0, embeds)])?.remove(0))
    }

    /// Runs the prompt `embeds` [L, D] on slot `slot` (which must be empty) with the prefill graph,
    /// copies its keys (rotated at their positions by the graph) and values on the device into the
    /// slot's cache rows 0..L (no host round trip), and returns the logits [V] of its last position.
    pub fn prefill(&mut self, slot: usize, embeds: &[f32]) -> anyhow::Result<Vec<f32>> {
        let c = self.cfg.clone();
        let (d, hd, kv) = (c.hidden_size, c.head_dim(), c.num_key_value_heads);
        let n = embeds.len() / d;
        anyhow::ensure!(
            n > 0 && n * d == embeds.len(),
            "embeddings of {} values are not a whole number of {d}-wide rows",
            embeds.len()
        );
        anyhow::ensure!(
            slot < self.slots() && self.lens[slot] == 0,
            "slot {slot} is not a free slot of {}",
            self.slots()
        );
        c.check_length(n)?;
        let g = qwen2_decode::build_prefill(&c, &self.weights, n, &self.origin)?;
        let mut ex = crate::exec::executor_with(self.device, &g, self.source, &self.cache, false)?;
        let input = HostTensor::from_f32([1, n, d], embeds.to_vec())?;
        ex.set_inputs(&HashMap::from([(qwen2_decode::EMBEDS.to_string(), input)]))?;
        ex.execute()?;
        // Left where they are (on a GPU: the device, in the storage dtype).
        let mut out = ex.output_handles()?;
        self.ensure_capacity((n + 1).min(c.max_position_embeddings))?;
        let step = self.step.as_mut().expect("made by ensure_capacity");
        let max_len = step.max_len;
        for layer in 0..c.num_hidden_layers {
            for keys in [true, false] {
                let rows = out
                    .remove(&qwen2_decode::prefill_kv_name(layer, keys))
                    .expect("graph output");
                // [1, kv, L, hd] -> rows 0..L of each (slot, kv head) of [slots, kv, max_len, hd].
                for h in 0..kv {
                    step.exec.copy_to_state(
                        &qwen2_decode::cache_name(layer, keys),
                        (slot * kv + h) * max_len * hd,
                        &rows,
                        h * n * hd,
                        n * hd,
                    )?;
                }
            }
        }
        self.lens[slot] = n;
        Ok(out
            .remove(qwen2_decode::LOGITS)
            .expect("graph output")
            .to_host()?
            .to_f32_vec())
    }

    /// One decode step: each `(slot, embedding [D])` at its slot's next position, all slots in one
    /// run of the step graph (slots not named compute at their next free row and are ignored);
    /// returns the logits [V] of each, in order.
    pub fn step(&mut self, tokens: &[(usize, &[f32])]) -> anyhow::Result<Vec<Vec<f32>>> {
        let (d, v, slots) = (self.cfg.hidden_size, self.cfg.vocab_size, self.slots());
        for (i, &(slot, e)) in tokens.iter().enumerate() {
            anyhow::ensure!(
                slot < slots && self.lens[slot] > 0,
                "slot {slot} holds no prompt (prefill first)"
            );
            anyhow::ensure!(
                e.len() == d,
                "the embedding of slot {slot} has {} values, expected {d}",
                e.len()
            );
            anyhow::ensure!(
                !tokens[..i].iter().any(|t| t.0 == slot),
                "slot {slot} is given twice in one step"
            );
            self.cfg.check_length(self.lens[slot] + 1)?;
        }
        let need = self.lens.iter().max().copied().unwrap_or(0) + 1;
        self.ensure_capacity(need)?;
        let mut embeds = vec![0f32; slots * d];
        for &(slot, e) in tokens {
            embeds[slot * d..(slot + 1) * d].copy_from_slice(e);
        }
        let positions: Vec<f32> = self.lens.iter().map(|&l| l as f32).collect();
        let inputs = HashMap::from([
            (
                qwen2_decode::EMBEDS.to_string(),
                HostTensor::from_f32([slots, d], embeds)?,
            ),
            (
                qwen2_decode::POSITIONS.to_string(),
                HostTensor::from_f32([slots], positions)?,
            ),
        ]);
        let step = self.step.as_mut().expect("made by ensure_capacity");
        let logits = step
            .exec
            .run(&inputs)?
            .remove(qwen2_decode::LOGITS)
            .expect("graph output")
            .to_f32_vec();
        step.runs += 1;
        if step.runs == 1 && self.device != Device::Cpu {
            // The launches never change between steps (fixed pointers, max_len-sized grids, the
            // positions read on the device): capture once after the eager warm-up, then replay.
            step.exec.capture()?;
        }
        for &(slot, _) in tokens {
            self.lens[slot] += 1;
        }
        Ok(tokens
            .iter()
            .map(|&(slot, _)| logits[slot * v..(slot + 1) * v].to_vec())
            .collect())
    }

    /// Makes the decode step hold at least `need` positions per slot: built on first use, rebuilt
    /// (at least doubled, multiples of 256, within the model's context) with the cached rows
    /// copied over when it is too small.
    fn ensure_capacity(&mut self, need: usize) -> anyhow::Result<()> {
        let old = self.step.as_ref().map_or(0, |s| s.max_len);
        if need <= old {
            return Ok(());
        }
        let c = &self.cfg;
        let max_len = need
            .max(self.reserved)
            .max(2 * old)
            .next_multiple_of(256)
            .min(c.max_position_embeddings)
            .max(need);
        let slots = self.slots();
        let g = qwen2_decode::build_decode_step(c, &self.weights, slots, max_len, &self.origin)?;
        let mut exec =
            crate::exec::executor_with(self.device, &g, self.source, &self.cache, false)?;
        if let Some(prev) = &self.step {
            let (kv, hd) = (c.num_key_value_heads, c.head_dim());
            for layer in 0..c.num_hidden_layers {
                for keys in [true, false] {
                    let name = qwen2_decode::cache_name(layer, keys);
                    for (slot, &len) in self.lens.iter().enumerate() {
                        for h in 0..kv {
                            let row = slot * kv + h;
                            let rows = prev.exec.read_state(&name, row * old * hd, len * hd)?;
                            exec.write_state(&name, row * max_len * hd, &rows)?;
                        }
                    }
                }
            }
        }
        self.step = Some(DecodeStep {
            exec,
            max_len,
            runs: 0,
        });
        Ok(())
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
            return Err(err(format!(
                "temperature {} must be a positive number (leave sampling off for greedy)",
                self.temperature
            )));
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
            l.iter_mut()
                .filter(|x| **x < kth)
                .for_each(|x| *x = f32::NEG_INFINITY);
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

/// Greedy decoding from prompt embeddings on slot 0: returns the prefill logits (last prompt
/// position) and the generated ids (ending with `eos` when it was produced). `on_token` sees
/// each id as it is decoded (streaming).
pub fn generate_greedy(
    llm: &mut CachedQwen2,
    prompt_embeds: &[f32],
    max_new_tokens: usize,
    eos: Option<usize>,
    on_token: impl FnMut(usize),
) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
    generate(
        llm,
        prompt_embeds,
        max_new_tokens,
        eos,
        &mut Picker::Greedy,
        on_token,
    )
}

/// [`generate_greedy`] with any [`Picker`].
pub fn generate(
    llm: &mut CachedQwen2,
    prompt_embeds: &[f32],
    max_new_tokens: usize,
    eos: Option<usize>,
    picker: &mut Picker,
    mut on_token: impl FnMut(usize),
) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
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
) -> anyhow::Result<(Vec<f32>, Vec<usize>)> {
    llm.reserve(llm.cached_len() + prompt_embeds.len() / llm.hidden_size().max(1) + max_new_tokens);
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

/// Continuous batching over the decoder's batch slots: up to `llm.slots()` sequences decode
/// together, each in its own slot of the KV cache. Before every step, free slots are filled from
/// `requests` (a joining sequence runs its prefill and picks its first token); then one decode
/// step runs every live sequence; a sequence that produced `eos` or reached its budget leaves
/// (its slot is freed for the next) and `on_done` gets its generated ids (ending with `eos` when
/// produced). Each sequence picks its tokens with its own [`Picker`] (`sampling` None: greedy),
/// so greedy answers are the ones [`generate_greedy`] gives one at a time. An error from
/// `requests` or `on_done` stops the run.
pub fn generate_continuous<K>(
    llm: &mut CachedQwen2,
    mut requests: impl Iterator<Item = anyhow::Result<BatchRequest<K>>>,
    eos: Option<usize>,
    sampling: Option<Sampling>,
    mut on_done: impl FnMut(K, Vec<usize>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    struct Live<K> {
        key: K,
        slot: usize,
        input: Vec<f32>,
        ids: Vec<usize>,
        max_new_tokens: usize,
        picker: Picker,
    }
    let mut live: Vec<Live<K>> = vec![];
    let mut free: Vec<usize> = (0..llm.slots()).rev().collect();
    let mut more = true;
    loop {
        while more && !free.is_empty() {
            match requests.next().transpose()? {
                Some(r) if r.max_new_tokens == 0 => on_done(r.key, vec![])?,
                Some(r) => {
                    let slot = free.pop().expect("checked");
                    let logits = llm.prefill(slot, &r.prompt_embeds)?;
                    let mut picker = Picker::new(sampling)?;
                    let next = picker.pick(&logits);
                    if Some(next) == eos || r.max_new_tokens == 1 {
                        llm.free(slot);
                        free.push(slot);
                        on_done(r.key, vec![next])?;
                    } else {
                        live.push(Live {
                            key: r.key,
                            slot,
                            input: llm.embed(&[next])?,
                            ids: vec![next],
                            max_new_tokens: r.max_new_tokens,
                            picker,
                        });
                    }
                }
                None => more = false,
            }
        }
        if live.is_empty() {
            if more {
                continue;
            }
            return Ok(());
        }
        let logits = llm.step(
            &live
                .iter()
                .map(|s| (s.slot, s.input.as_slice()))
                .collect::<Vec<_>>(),
        )?;
        let mut still = vec![];
        for (mut s, l) in live.into_iter().zip(logits) {
            let next = s.picker.pick(&l);
            s.ids.push(next);
            if Some(next) == eos || s.ids.len() == s.max_new_tokens {
                llm.free(s.slot);
                free.push(s.slot);
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
pub fn internvl2_5_conversation(
    history: &[(String, String)],
    question: &str,
    image_tokens: Option<usize>,
) -> String {
    internvl2_5_with_images(history, question, image_tokens.as_slice())
}

/// The general form, with any number of images (`image_tokens[i]`: 256·T_i context tokens of
/// image i). One image: `<img>…</img>\n` before the question, as `chat()` prefixes `<image>\n`.
/// Several: the model card's multi-image form, `Image-1: <image>\nImage-2: <image>\n` before the
/// question, each `<image>` then replaced by its own `<img>…</img>` (`num_patches_list`).
pub fn internvl2_5_with_images(
    history: &[(String, String)],
    question: &str,
    image_tokens: &[usize],
) -> String {
    internvl2_5_with_system(INTERNVL2_5_SYSTEM, history, question, image_tokens)
}

/// [`internvl2_5_with_images`] with another system message (InternVL's `model.system_message`).
pub fn internvl2_5_with_system(
    system: &str,
    history: &[(String, String)],
    question: &str,
    image_tokens: &[usize],
) -> String {
    let block = |n: usize| format!("<img>{}</img>", "<IMG_CONTEXT>".repeat(n));
    let image = match image_tokens {
        [] => String::new(),
        [n] => format!("{}\n", block(*n)),
        many => many
            .iter()
            .enumerate()
            .map(|(i, &n)| format!("Image-{}: {}\n", i + 1, block(n)))
            .collect(),
    };
    let mut s = format!("<|im_start|>system\n{system}<|im_end|>\n");
    for (q, a) in history {
        s.push_str(&format!(
            "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        ));
    }
    s.push_str(&format!(
        "<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"
    ));
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
    /// Where the ViT and the LLM run.
    pub device: crate::exec::Device,
    pub dtype: openuni_tensor::DType,
}

/// Reads a history file: a JSON list of [question, answer] pairs.
pub fn read_history(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the history", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of [question, answer] pairs",
            path.display()
        )
    })
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
pub fn load_images(
    paths: &[std::path::PathBuf],
    max_num: usize,
) -> anyhow::Result<Option<ImageTiles>> {
    if paths.is_empty() {
        return Ok(None);
    }
    let mut values = vec![];
    let mut tiles = vec![];
    for p in paths {
        let t = openuni_models::internvl_preprocess::load_image(p, TILE, max_num)
            .map_err(|e| anyhow::anyhow!("image {e}"))?;
        tiles.push(t.shape.dims()[0]);
        values.extend(t.to_f32_vec());
    }
    let total = tiles.iter().sum::<usize>();
    Ok(Some(ImageTiles {
        pixel_values: openuni_tensor::HostTensor::from_f32([total, 3, TILE, TILE], values)?,
        tiles,
    }))
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
    /// The vision tower's weights, converted or uploaded by the first image and kept for the next
    /// (a questions file runs the ViT once per question).
    vit_weights: crate::exec::WeightCache,
}

impl ChatModel {
    /// `model` None: the built-in tiny random model (written under the cache once).
    pub fn open(
        model: Option<&std::path::Path>,
        device: crate::exec::Device,
        dtype: openuni_tensor::DType,
    ) -> anyhow::Result<ChatModel> {
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
            None => {
                tiny_chat_model(&crate::tiny_model::default_dir().with_file_name("tiny-chat-v1"))?
            }
        };
        let cfg_path = dir.join("config.json");
        let cfg = openuni_models::config::read_mllm_config(&cfg_path)?;
        if let Some(t) = cfg.template.as_deref() {
            if t != "internvl2_5" {
                bail!(
                    "{}: template `{t}` is not supported (internvl2_5 is)",
                    cfg_path.display()
                );
            }
        }
        let tok = openuni_models::prompt::PromptTokenizer::from_dir(&dir)?;
        let eos = tok
            .token_id("<|im_end|>")
            .map(|i| i as usize)
            .with_context(|| format!("{}: no token `<|im_end|>`", tok.path().display()))?;
        let specials = tok
            .tokenizer()
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special)
            .map(|t| t.content.clone())
            .collect();
        let weights = openuni_tensor::Weights::open(&dir)?;
        if device == crate::exec::Device::Cpu && dtype != openuni_tensor::DType::F32 {
            bail!("--device cpu runs the f32 reference only; --dtype {dtype} needs --device cuda or emu");
        }
        let vit_weights = crate::exec::WeightCache::new(device, dtype)?;
        Ok(ChatModel {
            tiny: model.is_none(),
            cfg,
            cfg_path,
            tok,
            eos,
            specials,
            weights,
            device,
            dtype,
            vit_weights,
        })
    }

    fn special(&self, t: &str) -> anyhow::Result<usize> {
        use anyhow::Context;
        self.tok
            .token_id(t)
            .map(|i| i as usize)
            .with_context(|| format!("{}: no token `{t}`", self.tok.path().display()))
    }

    /// Refuses user text holding special-token text (it would change the template).
    pub fn check_text(&self, what: &str, text: &str) -> anyhow::Result<()> {
        if let Some(t) = self.specials.iter().find(|t| text.contains(t.as_str())) {
            anyhow::bail!("{what} contains the special token `{t}` (it would change the template)");
        }
        Ok(())
    }

    /// The decoder on the chosen device and dtype, with `slots` sequences decoding together.
    pub fn llm(&self, slots: usize) -> anyhow::Result<CachedQwen2<'_>> {
        use anyhow::Context;
        let (prefix, head_prefix) = openuni_models::qwen2::detect_prefix(&mut self.weights.keys())
            .with_context(|| {
                format!(
                    "{}: no `language_model.model.embed_tokens.weight`",
                    self.weights.origin().display()
                )
            })?;
        let head = format!("{head_prefix}lm_head.weight");
        CachedQwen2::load_on(
            &self.weights,
            &self.cfg.llm,
            prefix,
            &head,
            &self.cfg_path.display().to_string(),
            self.device,
            self.dtype,
            slots,
        )
    }

    /// The vision tower + mlp1 over all tiles as one batch: [T·256, D] embeddings.
    /// `origin` names where the pixel values came from in errors.
    pub fn image_embeds(
        &self,
        px: &openuni_tensor::HostTensor,
        origin: &str,
    ) -> anyhow::Result<Vec<f32>> {
        use anyhow::{bail, Context};
        let vcfg = self
            .cfg
            .vision()
            .map_err(|e| anyhow::anyhow!("an image was given, but {e}"))?;
        let layout =
            openuni_models::internvit::VitLayout::detect(&self.weights).with_context(|| {
                format!(
                    "an image was given, but {} has no vision tower weights",
                    self.weights.origin().display()
                )
            })?;
        openuni_models::internvit::check_position_table(&self.weights, &vcfg)?;
        let s = vcfg.image_size;
        if px.shape.rank() != 4
            || px.shape.dims()[1..] != [vcfg.num_channels, s, s]
            || px.shape.dims()[0] == 0
        {
            bail!(
                "{origin}: `pixel_values` has shape {}, expected [T, {}, {s}, {s}]",
                px.shape,
                vcfg.num_channels
            );
        }
        let mut b = openuni_graph::GraphBuilder::new();
        let x = b.input("pixel_values", px.shape.clone())?;
        let out = openuni_models::internvit::build(&mut b, &vcfg, x)?;
        b.mark(openuni_models::internvit::VIT_EMBEDS, out.vit_embeds)?;
        let g = b.finish();
        let src = openuni_models::internvit::VitWeights {
            inner: &self.weights,
            layout,
        };
        let mut ex = crate::exec::executor_with(self.device, &g, &src, &self.vit_weights, false)?;
        let inputs = std::collections::HashMap::from([(
            "pixel_values".to_string(),
            px.to_dtype(openuni_tensor::DType::F32)?,
        )]);
        Ok(openuni_models::internvit::VIT_EMBEDS
            .take(&mut ex.run(&inputs)?)?
            .to_f32_vec())
    }

    /// The templated prompt's embeddings with the image rows scattered in. `images`: the
    /// pixel values of all tiles and the tiles per image.
    pub fn prompt_embeds(
        &self,
        llm: &Embeddings,
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
        llm: &Embeddings,
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
        let text = internvl2_5_with_system(
            system,
            history,
            question,
            image.as_ref().map_or(&[][..], |(n, _)| n),
        );
        let ids: Vec<usize> = self
            .tok
            .encode_text(&text, "prompt")?
            .into_iter()
            .map(|i| i as usize)
            .collect();
        let mut embeds = llm.embed(&ids)?;
        if let Some((_, img)) = &image {
            scatter_image_embeds(
                &mut embeds,
                &ids,
                self.special("<IMG_CONTEXT>")?,
                img,
                self.cfg.llm.hidden_size,
            )?;
        }
        Ok(embeds)
    }

    /// The answer text of generated ids (special tokens skipped).
    pub fn detokenise(&self, ids: &[usize]) -> anyhow::Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tok
            .tokenizer()
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("detokenising the answer: {e}"))
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
    pub fn push(
        &mut self,
        tok: &openuni_models::prompt::PromptTokenizer,
        id: usize,
    ) -> anyhow::Result<String> {
        self.ids.push(id as u32);
        let t = tok
            .tokenizer()
            .decode(&self.ids, true)
            .map_err(|e| anyhow::anyhow!("detokenising the answer: {e}"))?;
        if t.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = t
            .strip_prefix(self.shown.as_str())
            .unwrap_or_default()
            .to_string();
        self.shown = t;
        Ok(new)
    }

    /// The text not yet given out (a last incomplete character) and the whole answer.
    pub fn finish(
        &self,
        tok: &openuni_models::prompt::PromptTokenizer,
    ) -> anyhow::Result<(String, String)> {
        let all = tok
            .tokenizer()
            .decode(&self.ids, true)
            .map_err(|e| anyhow::anyhow!("detokenising the answer: {e}"))?;
        let rest = all
            .strip_prefix(self.shown.as_str())
            .unwrap_or_default()
            .to_string();
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
    let turns = o
        .history
        .iter()
        .flat_map(|(q, a)| [("history", q), ("history", a)]);
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
    let mut llm = m.llm(1)?;
    let embeds = m.prompt_embeds(
        &llm.embeddings(),
        &o.history,
        &o.prompt,
        px.as_ref().map(|p| (p, tiles.as_slice())),
        &origin,
    )?;
    // Stream: print what each new token adds to the detokenised answer (special tokens skipped).
    let mut text = TextStream::default();
    let mut stdout = std::io::stdout();
    let mut decode_err = None;
    let mut picker = Picker::new(o.sampling)?;
    let eos = m.eos;
    generate(
        &mut llm,
        &embeds,
        o.max_new_tokens,
        Some(eos),
        &mut picker,
        |id| match text.push(&m.tok, id) {
            Ok(new) => {
                let _ = write!(stdout, "{new}");
                let _ = stdout.flush();
            }
            Err(e) => decode_err = Some(e),
        },
    )?;
    if let Some(e) = decode_err {
        return Err(e);
    }
    let (rest, all) = text.finish(&m.tok)?;
    print!("{rest}");
    println!();
    let stop = if text.ids.last() == Some(&(eos as u32)) {
        "stopped at <|im_end|>"
    } else {
        "stopped at --max-new-tokens"
    };
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
    openuni_models::qwen2::build(
        &mut b,
        &lcfg,
        &openuni_models::nn::Scope::new("language_model.model"),
        e,
        "tiny chat llm",
    )?;
    let g = b.finish();
    let mut shapes: Vec<(String, Vec<usize>)> = g
        .weights()
        .map(|(id, n)| (n.to_string(), g.shape(id).dims().to_vec()))
        .collect();
    let (v, d) = (lcfg.vocab_size, lcfg.hidden_size);
    shapes.push((
        "language_model.model.embed_tokens.weight".into(),
        vec![v, d],
    ));
    shapes.push(("language_model.lm_head.weight".into(), vec![v, d]));
    // Graph names -> stored tensors: q/k/v thirds back into one fused qkv, and the stored shapes.
    let mut stored: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (name, s) in shapes {
        let (key, shape) = match name.strip_suffix("[q]") {
            Some(base) => (base.to_string(), {
                let mut s = s.clone();
                s[0] *= 3;
                s
            }),
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
            let v = (0..shape.numel())
                .map(|_| offset + scale * normal.sample(&mut rng))
                .collect();
            (
                n,
                openuni_tensor::HostTensor::from_f32(shape, v).expect("sized"),
            )
        })
        .collect();
    openuni_tensor::write_safetensors(
        &dir.join("model.safetensors"),
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        None,
    )?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    std::fs::write(
        dir.join("tokenizer.json"),
        include_str!("../assets/tiny_tokenizer.json"),
    )?;
    std::fs::write(dir.join(".complete"), b"")?;
    Ok(dir.to_path_buf())
}
