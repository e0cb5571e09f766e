//! Case component `dit`: hidden_states [B,32,h,w], encoder_hidden_states [B,L,C], timestep [B],
//! optional encoder_attention_mask [B,L] -> output [B,32,h,w]; model/ is a diffusers
//! SanaTransformer2DModel folder.

use std::collections::HashMap;

use anyhow::{bail, Result};
use openuni_graph::GraphBuilder;
use openuni_models::config::read_config;
use openuni_models::sana::{self, SanaConfig};
use openuni_tensor::{DType, Weights};

use super::{Case, Check, Prepared};

pub fn prepare(case: &Case) -> Result<Prepared> {
    let cfg_path = case.model_dir().join("config.json");
    let cfg: SanaConfig = read_config(&cfg_path)?;
    let x = case.tensor("hidden_states")?;
    let enc = case.tensor("encoder_hidden_states")?;
    let t = case.tensor("timestep")?;
    let (xd, ed) = (x.shape.dims().to_vec(), enc.shape.dims().to_vec());
    if xd.len() != 4 || xd[1] != cfg.in_channels {
        bail!(
            "{}: `hidden_states` has shape {}, expected [B, {}, h, w]",
            case.dir.display(),
            x.shape,
            cfg.in_channels
        );
    }
    let batch = xd[0];
    if ed.len() != 3 || ed[0] != batch || ed[2] != cfg.caption_channels {
        bail!(
            "{}: `encoder_hidden_states` has shape {}, expected [{batch}, L, {}]",
            case.dir.display(),
            enc.shape,
            cfg.caption_channels
        );
    }
    if t.shape.dims() != [batch] {
        bail!(
            "{}: `timestep` has shape {}, expected [{batch}]",
            case.dir.display(),
            t.shape
        );
    }
    sana::check_timesteps(&t.to_f32_vec())
        .map_err(|e| anyhow::anyhow!("{}: {e}", case.dir.display()))?;
    let mut b = GraphBuilder::new();
    let xi = b.input("hidden_states", x.shape.clone())?;
    let ei = b.input("encoder_hidden_states", enc.shape.clone())?;
    let ti = b.input("timestep", t.shape.clone())?;
    let mut inputs = HashMap::from([
        ("hidden_states".to_string(), x.to_dtype(DType::F32)?),
        (
            "encoder_hidden_states".to_string(),
            enc.to_dtype(DType::F32)?,
        ),
        ("timestep".to_string(), t.to_dtype(DType::F32)?),
    ]);
    let mask = if case.io.contains("encoder_attention_mask") {
        let m = case.tensor("encoder_attention_mask")?;
        if m.shape.dims() != [batch, ed[1]] {
            bail!(
                "{}: `encoder_attention_mask` has shape {}, expected [{batch}, {}]",
                case.dir.display(),
                m.shape,
                ed[1]
            );
        }
        let mi = b.input("encoder_attention_mask", m.shape.clone())?;
        inputs.insert("encoder_attention_mask".into(), m.to_dtype(DType::F32)?);
        Some(mi)
    } else {
        None
    };
    let (caption_proj_norm, kv) = sana::caption_path(&mut b, &cfg, ei)?;
    let o = sana::denoise(&mut b, &cfg, xi, ti, &kv, mask, xd[2], xd[3])?;

    let mut checks = vec![];
    checks.push(Check::mark(&mut b, "output", o.output, true)?);
    let mut mids = vec![
        ("mid.patch_embed".to_string(), o.patch_embed),
        ("mid.time_embed.timestep".into(), o.t6),
        (
            "mid.time_embed.embedded_timestep".into(),
            o.embedded_timestep,
        ),
        ("mid.caption_norm".into(), caption_proj_norm),
        ("mid.norm_out".into(), o.norm_out),
    ];
    mids.extend(
        o.blocks
            .iter()
            .enumerate()
            .map(|(i, &v)| (format!("mid.transformer_blocks.{i}"), v)),
    );
    for (name, v) in mids {
        if case.io.contains(&name) {
            checks.push(Check::mark(&mut b, &name, v, false)?);
        }
    }
    Ok(Prepared {
        graph: b.finish(),
        weights: Box::new(Weights::open(case.model_dir())?),
        inputs,
        checks,
    })
}
