//! `openuni bench --chat`: the chat decoder (src/chat.rs, docs/decode.md) on a variant's LLM with
//! seeded random weights: the prefill time of a prompt, and the per-step decode time with every
//! batch slot holding a prompt of that length (the step captured after its first run on a GPU).
//! tools/bench_torch_chat.py measures transformers' Qwen2 the same way. With `--vit-tiles N` it also
//! times InternVL3's vision tower on N tiles (the baseline: the script's `--vit-tiles`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use openuni_models::config::MllmConfig;
use openuni_models::variant;
use openuni_tensor::{DType, Shape};
use serde::Serialize;

use super::{command_output, device_name, median, wall_ms, RandomWeights};
use crate::chat::CachedQwen2;
use crate::exec::Device;

pub struct ChatBenchOptions {
    pub variant: String,
    pub device: Device,
    pub dtype: DType,
    /// Decode batch sizes (slots).
    pub batches: Vec<usize>,
    /// Prompt tokens per sequence.
    pub prompt: usize,
    /// Timed decode steps per batch size (after the first, untimed one); timed ViT runs.
    pub iters: usize,
    /// Also time the vision tower (InternViT-300M + pixel shuffle + mlp1, random weights) on this
    /// many 448² tiles as one batch; 0: not.
    pub vit_tiles: usize,
    pub json: Option<PathBuf>,
    pub command: String,
}

#[derive(Serialize)]
pub struct ChatBenchRow {
    pub batch: usize,
    /// One prompt of `prompt_tokens` through the prefill graph, its K/V written into the cache
    /// (median over the batch's prefills after one warm-up).
    pub prefill_ms: f64,
    /// One decode step of all `batch` slots (median), logits downloaded.
    pub decode_step_ms: f64,
    pub tokens_per_s: f64,
    /// Bytes one decode step must read at least: every weight once, and each sequence's cached
    /// keys and values up to its position (mean over the timed steps), in the storage dtype.
    pub step_bytes: usize,
    /// `step_bytes` over the step's time: the decode target compares it with the device's HBM
    /// bandwidth (docs/decode.md, "Measuring the GPU targets").
    pub step_gb_per_s: f64,
}

#[derive(Serialize)]
pub struct ChatBenchReport {
    pub variant: String,
    pub device: String,
    pub dtype: String,
    pub hidden_size: usize,
    pub layers: usize,
    pub vocab_size: usize,
    pub prompt_tokens: usize,
    pub iters: usize,
    pub date: String,
    pub commit: String,
    pub command: String,
    pub rows: Vec<ChatBenchRow>,
    /// `--vit-tiles`: the vision tower's time on that many tiles.
    pub vit: Option<VitBenchRow>,
}

#[derive(Serialize)]
pub struct VitBenchRow {
    pub tiles: usize,
    /// pixel_values [tiles, 3, 448, 448] in (already on the device) -> image embeddings (median).
    pub ms: f64,
}

pub fn run(o: &ChatBenchOptions) -> Result<ChatBenchReport> {
    let v = variant::any(&o.variant).map_err(anyhow::Error::msg)?;
    let cfg = MllmConfig::from_value((v.llm)(), &format!("variant {} llm", o.variant))?.llm;
    anyhow::ensure!(o.prompt >= 1, "--chat-prompt must be at least 1");
    let weights = RandomWeights {
        origin: format!("random {} llm weights", o.variant),
        tables: [(
            "model.embed_tokens.weight".to_string(),
            Shape::new(vec![cfg.vocab_size, cfg.hidden_size]),
        )]
        .into(),
    };
    let ids: Vec<usize> = (0..o.prompt)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size)
        .collect();
    let mut rows = vec![];
    for &batch in &o.batches {
        let mut llm = CachedQwen2::load_on(
            &weights,
            &cfg,
            "model.",
            "lm_head.weight",
            "bench --chat",
            o.device,
            o.dtype,
            batch,
        )?;
        llm.reserve(o.prompt + o.iters + 2);
        let embeds = llm.embed(&ids)?;
        // Warm-up (weights converted or uploaded once), then every slot's prefill timed.
        llm.prefill(0, &embeds)?;
        llm.free(0);
        let mut prefill = vec![];
        for slot in 0..batch {
            prefill.push(wall_ms(&mut || llm.prefill(slot, &embeds).map(drop))?);
        }
        let e = llm.embed(&[ids[0]])?;
        let tokens: Vec<(usize, &[f32])> = (0..batch).map(|s| (s, e.as_slice())).collect();
        llm.step(&tokens)?;
        let mut steps = vec![];
        for _ in 0..o.iters.max(1) {
            steps.push(wall_ms(&mut || llm.step(&tokens).map(drop))?);
        }
        let step = median(steps);
        // Timed step i attends keys 0..=prompt + 1 + i of every slot.
        let mean_keys = o.prompt + 2 + (o.iters.max(1) - 1) / 2;
        let kv = batch
            * cfg.num_hidden_layers
            * 2
            * cfg.num_key_value_heads
            * cfg.head_dim()
            * mean_keys
            * o.dtype.size_in_bytes();
        let step_bytes = llm.weight_bytes() + kv;
        rows.push(ChatBenchRow {
            batch,
            prefill_ms: median(prefill),
            decode_step_ms: step,
            tokens_per_s: batch as f64 * 1e3 / step,
            step_bytes,
            step_gb_per_s: step_bytes as f64 / (step * 1e6),
        });
    }
    let vit = match o.vit_tiles {
        0 => None,
        tiles => Some(VitBenchRow {
            tiles,
            ms: time_vit(o, cfg.hidden_size, tiles)?,
        }),
    };
    let report = ChatBenchReport {
        variant: o.variant.clone(),
        device: device_name(o.device),
        dtype: o.dtype.to_string(),
        hidden_size: cfg.hidden_size,
        layers: cfg.num_hidden_layers,
        vocab_size: cfg.vocab_size,
        prompt_tokens: o.prompt,
        iters: o.iters,
        date: command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        commit: command_output("git", &["rev-parse", "--short", "HEAD"]),
        command: o.command.clone(),
        rows,
        vit,
    };
    if let Some(p) = &o.json {
        crate::atomic::write_bytes(p, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("{}: cannot write the JSON report", p.display()))?;
    }
    Ok(report)
}

/// Median time of the vision tower of InternVL3 (`variant::internvl3_vision`) with random weights
/// on `tiles` tiles as one batch, after a warm-up run; the pixel values are set once.
fn time_vit(o: &ChatBenchOptions, llm_hidden: usize, tiles: usize) -> Result<f64> {
    use openuni_models::internvit;
    let vcfg = internvit::InternVlVisionConfig::from_json(
        &variant::internvl3_vision(llm_hidden),
        "InternVL3 vision",
    )?;
    let s = vcfg.image_size;
    let mut b = openuni_graph::GraphBuilder::new();
    let x = b.input("pixel_values", [tiles, 3, s, s])?;
    let out = internvit::build(&mut b, &vcfg, x)?;
    b.mark(internvit::VIT_EMBEDS, out.vit_embeds)?;
    let g = b.finish();
    let weights = RandomWeights {
        origin: format!("random InternViT-300M weights ({} llm width)", o.variant),
        tables: Default::default(),
    };
    let mut ex = crate::exec::executor(o.device, &g, &weights, o.dtype, false)?;
    let px: Vec<f32> = (0..tiles * 3 * s * s)
        .map(|i| ((i * 7919) % 255) as f32 / 127.5 - 1.0)
        .collect();
    ex.set_inputs(&std::collections::HashMap::from([(
        "pixel_values".to_string(),
        openuni_tensor::HostTensor::from_f32([tiles, 3, s, s], px)?,
    )]))?;
    Ok(median(ex.time_runs(o.iters.max(1))?))
}

pub fn render(r: &ChatBenchReport) -> String {
    let mut s = format!(
        "chat decoder of {} (LLM D={}, {} layers, vocab {}), {} {}, prompt {} tokens, median of {} decode steps\n",
        r.variant, r.hidden_size, r.layers, r.vocab_size, r.device, r.dtype, r.prompt_tokens, r.iters
    );
    s.push_str("batch  prefill_ms  decode_step_ms  tokens/s  step_MB  step_GB/s\n");
    for row in &r.rows {
        s.push_str(&format!(
            "{:>5}  {:>10.2}  {:>14.3}  {:>8.1}  {:>7.1}  {:>9.1}\n",
            row.batch,
            row.prefill_ms,
            row.decode_step_ms,
            row.tokens_per_s,
            row.step_bytes as f64 / 1e6,
            row.step_gb_per_s
        ));
    }
    if let Some(v) = &r.vit {
        s.push_str(&format!(
            "vision tower (InternViT-300M + mlp1), {} tiles: {:.2} ms\n",
            v.tiles, v.ms
        ));
    }
    if r.device.starts_with("emu") {
        s.push_str(
            "note: the emulated GPU checks correctness; its times are CPU times, not speed\n",
        );
    }
    s
}
