//! Case component `pipeline`: OpenUni text-to-image end to end on a tiny model. case.json
//! {prompt, negative_prompt, num_steps, guidance_scale, height, width, num_queries, flow_shift,
//! connector}; model/ = llm/ (Qwen2 + tokenizer.json), openuni.safetensors, transformer/, vae/.
//! Checks the token ids, the prompt embeddings, the final latents from the given noise, and the
//! image; the `mid.*` values localise a mismatch.

use anyhow::{bail, Context, Result};
use openuni_models::config::{bounds, parse_config, MAX_FLOW_SHIFT};
use openuni_models::connector::ConnectorConfig;
use openuni_models::prompt::PromptTokenizer;
use openuni_models::scheduler::{SamplerKind, MAX_STEPS};
use openuni_tensor::{HostData, HostTensor};

use super::{Case, Kind, Options, Produced};
use crate::pipeline::{to_uint8_nhwc, ModelPaths, OpenUni, RunOptions};

/// The largest |guidance_scale| a case may ask for (OpenUni uses 3.5 to 4.5).
const MAX_GUIDANCE: f64 = 1000.0;

fn field<'a>(case: &'a Case, key: &str) -> Result<&'a serde_json::Value> {
    case.json
        .get(key)
        .with_context(|| format!("{}: case.json has no `{key}`", case.dir.display()))
}

fn ids_tensor(ids: &[u32]) -> Result<HostTensor> {
    Ok(HostTensor::new(
        [1, ids.len()],
        HostData::I64(ids.iter().map(|&i| i as i64).collect()),
    )?)
}

pub fn run(case: &Case, opts: &Options) -> Result<Vec<Produced>> {
    let m = case.model_dir();
    let prompt = field(case, "prompt")?
        .as_str()
        .context("`prompt` is not a string")?;
    let negative = match field(case, "negative_prompt")? {
        serde_json::Value::Null => None,
        v => Some(
            v.as_str()
                .context("`negative_prompt` is neither null nor a string")?,
        ),
    };
    let steps = case.int_field("num_steps", 1..=MAX_STEPS as u64)?;
    let guidance = case.num_field("guidance_scale", -MAX_GUIDANCE..=MAX_GUIDANCE)? as f32;
    let shift = if case.json.get("flow_shift").is_some() {
        case.positive_field("flow_shift", MAX_FLOW_SHIFT)?
    } else {
        3.0
    };
    let connector_cfg: ConnectorConfig = parse_config(
        field(case, "connector")?.clone(),
        &format!("{}: `connector`", case.dir.join("case.json").display()),
    )?;

    let model = OpenUni::load(
        &ModelPaths {
            llm: &m.join("llm"),
            openuni: &m.join("openuni.safetensors"),
            transformer: &m.join("transformer"),
            vae: &m.join("vae"),
        },
        connector_cfg,
    )?;
    let q_case = case.int_field("num_queries", 1..=bounds::POSITIONS as u64)?;
    if q_case != model.num_queries {
        bail!(
            "{}: case.json says {q_case} queries, openuni.safetensors has {}",
            case.dir.display(),
            model.num_queries
        );
    }
    let run = RunOptions {
        device: opts.device,
        dtype: opts.dtype,
    };
    let mut out = vec![];
    let push =
        |out: &mut Vec<Produced>, name: &str, tensor: HostTensor, decisive: bool, kind: Kind| {
            if case.io.contains(name) {
                out.push(Produced {
                    reference: name.into(),
                    tensor,
                    decisive,
                    kind,
                });
            }
        };

    // 1-2. Strings and token ids: ours must equal the reference's.
    let tok = PromptTokenizer::from_dir(&m.join("llm"))?;
    let max_tokens = model
        .llm_cfg
        .max_position_embeddings
        .saturating_sub(model.num_queries);
    let ids = tok.encode(prompt, negative, max_tokens)?;
    push(
        &mut out,
        "input_ids_cond",
        ids_tensor(&ids.cond)?,
        true,
        Kind::Exact,
    );
    push(
        &mut out,
        "input_ids_uncond",
        ids_tensor(&ids.uncond)?,
        true,
        Kind::Exact,
    );

    // 3-4. Conditioning.
    let c = model.condition(&ids.cond, &ids.uncond, run)?;
    push(
        &mut out,
        "prompt_embeds",
        c.prompt_embeds.clone(),
        true,
        Kind::Float,
    );
    push(
        &mut out,
        "mid.llm.hidden_cond",
        c.hidden_cond,
        false,
        Kind::Float,
    );
    push(
        &mut out,
        "mid.llm.hidden_uncond",
        c.hidden_uncond,
        false,
        Kind::Float,
    );
    push(&mut out, "mid.connector", c.connector, false, Kind::Float);

    // 5. Sampling from the case's noise.
    let noise = case.tensor("noise")?;
    let mut timesteps = vec![];
    let (mut dit_out, mut steps_latents) = (vec![], vec![]);
    let mut read_err = None;
    let latents = model.denoise(
        &c.prompt_embeds,
        &noise,
        steps,
        guidance,
        SamplerKind::DpmSolver,
        shift,
        run,
        |r| {
            timesteps.push(r.timestep);
            // The step's values where they lie (the device on a GPU), read while they are valid.
            match (r.model_output.to_host(), r.latents.to_host()) {
                (Ok(v), Ok(l)) => {
                    dit_out.extend(v.to_f32_vec());
                    steps_latents.extend(l.to_f32_vec());
                }
                (Err(e), _) | (_, Err(e)) => {
                    read_err.get_or_insert(e);
                }
            }
        },
    )?;
    if let Some(e) = read_err {
        return Err(e);
    }
    let n = timesteps.len();
    let ld = noise.shape.dims().to_vec();
    push(&mut out, "latents", latents.clone(), true, Kind::Float);
    let timesteps = timesteps.into_iter().map(|t| t as i64).collect();
    push(
        &mut out,
        "mid.timesteps",
        HostTensor::new([n], HostData::I64(timesteps))?,
        false,
        Kind::Exact,
    );
    push(
        &mut out,
        "mid.dit_out",
        HostTensor::from_f32([n, 2, ld[1], ld[2], ld[3]], dit_out)?,
        false,
        Kind::Float,
    );
    push(
        &mut out,
        "mid.latents_steps",
        HostTensor::from_f32([n, 1, ld[1], ld[2], ld[3]], steps_latents)?,
        false,
        Kind::Float,
    );

    // 6. Decode and OpenUni's uint8 conversion.
    let decoded = model.decode(&latents, run)?;
    let (pixels, shape) = to_uint8_nhwc(&decoded)?;
    push(&mut out, "mid.decoded", decoded, false, Kind::Float);
    push(
        &mut out,
        "image",
        HostTensor::new(shape.to_vec(), HostData::U8(pixels))?,
        true,
        Kind::Pixels,
    );
    Ok(out)
}
