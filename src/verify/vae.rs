//! Case component `vae`: latent [B,32,h,w] (decoder input as given, no scaling inside) ->
//! sample [B,3,32h,32w]; model/ is a diffusers AutoencoderDC folder (encoder keys are ignored).

use std::collections::HashMap;

use anyhow::{bail, Result};
use openuni_graph::GraphBuilder;
use openuni_models::config::read_config;
use openuni_models::dcae::{self, DcaeConfig};
use openuni_tensor::{DType, Weights};

use super::{Case, Check, Prepared};

pub fn prepare(case: &Case) -> Result<Prepared> {
    let cfg_path = case.model_dir().join("config.json");
    let cfg: DcaeConfig = read_config(&cfg_path)?;
    let latent = case.tensor("latent")?;
    let d = latent.shape.dims().to_vec();
    if d.len() != 4 || d[1] != cfg.latent_channels {
        bail!(
            "{}: `latent` has shape {}, expected [B, {}, h, w]",
            case.dir.display(),
            latent.shape,
            cfg.latent_channels
        );
    }
    let mut b = GraphBuilder::new();
    let z = b.input("latent", latent.shape.clone())?;
    let o = dcae::decoder(&mut b, &cfg, z, &cfg_path.display().to_string())?;
    let mut checks = vec![];
    checks.push(Check::mark(&mut b, "sample", o.sample, true)?);
    // Intermediates are NCHW in the case; ours are tokens: transpose for the comparison.
    let batch = d[0];
    let mut mids = vec![("mid.decoder.stem".to_string(), o.stem, d[2], d[3])];
    mids.extend(
        o.stages
            .iter()
            .enumerate()
            .map(|(i, &(v, h, w))| (format!("mid.decoder.up_blocks.{i}"), v, h, w)),
    );
    // The decoder's fused head never stores conv_out's input: rebuilt unfused when compared.
    let (last, lh, lw) = o.stages[0];
    if case.io.contains("mid.decoder.conv_out_input") {
        mids.push((
            "mid.decoder.conv_out_input".into(),
            dcae::conv_out_input(&mut b, &cfg, last)?,
            lh,
            lw,
        ));
    }
    for (name, v, h, w) in mids {
        if case.io.contains(&name) {
            let c = b.shape(v).last();
            let t = b.transpose(
                &format!("{name}.nchw"),
                v,
                batch,
                h * w,
                c,
                [batch, c, h, w],
            )?;
            checks.push(Check::mark(&mut b, &name, t, false)?);
        }
    }
    Ok(Prepared {
        graph: b.finish(),
        weights: Box::new(Weights::open(case.model_dir())?),
        inputs: HashMap::from([("latent".to_string(), latent.to_dtype(DType::F32)?)]),
        checks,
    })
}
