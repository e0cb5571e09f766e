//! Case component `llm`: input_ids [B,L] (i64) -> hidden_states [B,L,D] (last layer, after the
//! final norm); model/ is a Qwen2 (transformers) or InternVL3 folder.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_graph::GraphBuilder;
use openuni_models::config::read_mllm_config;
use openuni_models::nn::Scope;
use openuni_models::qwen2;
use openuni_tensor::Weights;

use super::{Case, Check, Prepared};

pub fn prepare(case: &Case) -> Result<Prepared> {
    let cfg_path = case.model_dir().join("config.json");
    let cfg = read_mllm_config(&cfg_path)?.llm;
    let origin = cfg_path.display().to_string();
    let weights = Weights::open(case.model_dir())?;
    let (prefix, head_prefix) = qwen2::detect_prefix(&mut weights.keys())
        .with_context(|| format!("{}: no `model.embed_tokens.weight` (Qwen2) or `language_model.model.embed_tokens.weight` (InternVL3)", weights.origin().display()))?;
    let ids = case.tensor("input_ids")?;
    let dims = ids.shape.dims().to_vec();
    if dims.len() != 2 {
        bail!(
            "{}: `input_ids` has shape {}, expected [B, L]",
            case.dir.display(),
            ids.shape
        );
    }
    let ids: Vec<usize> = ids
        .to_i64_vec()
        .into_iter()
        .map(|i| {
            usize::try_from(i)
                .ok()
                .filter(|&u| u < cfg.vocab_size)
                .with_context(|| {
                    format!(
                        "token id {i} is outside the vocabulary of {}",
                        cfg.vocab_size
                    )
                })
        })
        .collect::<Result<_>>()?;
    // The embedding lookup runs on the host, reading only the rows used.
    let embed_key = Scope::new(prefix).pp("embed_tokens").name("weight");
    let embeds = weights.rows_f32(&embed_key, &ids)?;
    let d = cfg.hidden_size;
    let embeds = openuni_tensor::HostTensor::from_f32([dims[0], dims[1], d], embeds.to_f32_vec())?;

    let mut b = GraphBuilder::new();
    let x = b.input("inputs_embeds", embeds.shape.clone())?;
    let out = qwen2::build(&mut b, &cfg, &Scope::new(prefix), x, &origin)?;
    let mut checks = vec![];
    checks.push(Check::mark(
        &mut b,
        "hidden_states",
        out.hidden_states,
        true,
    )?);
    for (i, &l) in out.layers.iter().enumerate() {
        let name = format!("mid.layers.{i}");
        if case.io.contains(&name) {
            checks.push(Check::mark(&mut b, &name, l, false)?);
        }
    }
    if case.io.contains("mid.logits") {
        let head = if cfg.tie_word_embeddings {
            embed_key.clone()
        } else {
            Scope::new(head_prefix).pp("lm_head").name("weight")
        };
        let w = b.weight(&head, [cfg.vocab_size, d])?;
        let logits = b.linear("lm_head", out.hidden_states, w, None)?;
        checks.push(Check::mark(&mut b, "mid.logits", logits, false)?);
    }
    if case.io.contains("mid.embed_tokens") {
        // The lookup ran on the host; the graph input is that result.
        checks.push(Check::mark(&mut b, "mid.embed_tokens", x, false)?);
    }
    Ok(Prepared {
        graph: b.finish(),
        weights: Box::new(weights),
        inputs: HashMap::from([("inputs_embeds".to_string(), embeds)]),
        checks,
    })
}
