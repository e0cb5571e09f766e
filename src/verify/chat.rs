//! Case component `chat`: input_ids [1,L] (the templated prompt with its `<IMG_CONTEXT>` slots)
//! and pixel_values [T,3,448,448] -> prefill_logits [1,V] (last prompt position, f32 tolerance)
//! and generated_ids [1,N] (greedy, KV cache; exact). model/ is an InternVL folder with
//! tokenizer.json (the `<IMG_CONTEXT>` id is read from its added tokens); case.json gives
//! `max_new_tokens` and `eos_token_id`.
//!
//! The ViT and the LLM (prefill graph, then the KV-cached decode-step graph) run on the chosen
//! device and dtype. On bf16 storage the prefill logits are judged by the bf16 rule and the
//! generated ids still exactly.

use crate::chat::{generate_greedy, scatter_image_embeds, CachedQwen2};
use anyhow::{bail, Context, Result};
use openuni_models::qwen2;
use openuni_tensor::{HostData, HostTensor, Weights};

use super::{run_graph, vit, Case, Kind, Options, Produced};

/// The id of an added token of a tokenizer.json, by its text.
pub fn added_token_id(tokenizer_json: &std::path::Path, content: &str) -> Result<usize> {
    let text = std::fs::read_to_string(tokenizer_json)
        .with_context(|| format!("{}: cannot read", tokenizer_json.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid JSON", tokenizer_json.display()))?;
    v.get("added_tokens")
        .and_then(|a| a.as_array())
        .and_then(|a| {
            a.iter()
                .find(|t| t.get("content").and_then(|c| c.as_str()) == Some(content))
        })
        .and_then(|t| t.get("id")?.as_u64())
        .map(|i| i as usize)
        .with_context(|| format!("{}: no added token `{content}`", tokenizer_json.display()))
}

pub fn run(case: &Case, opts: &Options) -> Result<Vec<Produced>> {
    let field = |k: &str| {
        case.json
            .get(k)
            .and_then(|v| v.as_u64())
            .with_context(|| format!("{}: case.json has no integer `{k}`", case.dir.display()))
    };
    let max_new = field("max_new_tokens")? as usize;
    let eos = field("eos_token_id")? as usize;
    let mdir = case.model_dir();
    let cfg_path = mdir.join("config.json");
    let llm_cfg = openuni_models::config::read_mllm_config(&cfg_path)?.llm;
    let context_id = added_token_id(&mdir.join("tokenizer.json"), "<IMG_CONTEXT>")?;

    // 1. The image embeddings: the vit component's graph on the chosen device.
    let (mut produced, _) = run_graph(case, vit::prepare_outputs(case, false)?, opts)?;
    let image = produced.remove(0).tensor.to_f32_vec();

    // 2. Prompt embeddings with the image rows scattered in, then prefill + cached greedy decode.
    let ids = case.tensor("input_ids")?;
    if ids.shape.rank() != 2 || ids.shape.dims()[0] != 1 {
        bail!(
            "{}: `input_ids` has shape {}, expected [1, L]",
            case.dir.display(),
            ids.shape
        );
    }
    let ids: Vec<usize> = ids
        .to_i64_vec()
        .into_iter()
        .map(|i| usize::try_from(i).with_context(|| format!("negative token id {i}")))
        .collect::<Result<_>>()?;
    let weights = Weights::open(&mdir)?;
    let (prefix, head_prefix) = qwen2::detect_prefix(&mut weights.keys()).with_context(|| {
        format!(
            "{}: no `language_model.model.embed_tokens.weight`",
            weights.origin().display()
        )
    })?;
    let head = format!("{head_prefix}lm_head.weight");
    let mut llm = CachedQwen2::load_on(
        &weights,
        &llm_cfg,
        prefix,
        &head,
        &cfg_path.display().to_string(),
        opts.device,
        opts.dtype,
        1,
    )?;
    let mut embeds = llm.embed(&ids)?;
    scatter_image_embeds(&mut embeds, &ids, context_id, &image, llm_cfg.hidden_size)?;
    let (prefill, generated) = generate_greedy(&mut llm, &embeds, max_new, Some(eos), |_| {})?;

    let v = prefill.len();
    // Compared position by position against the reference's length: a run that stops early is
    // padded with -1 and one that runs on is cut, so a different length is a FAIL, not an error.
    let n_ref = case.tensor("generated_ids")?.numel();
    let mut ids: Vec<i64> = generated.iter().map(|&i| i as i64).collect();
    ids.resize(n_ref, -1);
    let gen = HostTensor::new([1, n_ref], HostData::I64(ids))?;
    Ok(vec![
        Produced {
            reference: "prefill_logits".into(),
            tensor: HostTensor::from_f32([1, v], prefill)?,
            decisive: true,
            kind: Kind::Float,
        },
        Produced {
            reference: "generated_ids".into(),
            tensor: gen,
            decisive: true,
            kind: Kind::Exact,
        },
    ])
}
