//! Case component `vit`: pixel_values [T,3,S,S] (f32) -> vit_embeds [T,256,D] (mlp1's output);
//! model/ is an InternVL folder (original or transformers layout). Optional intermediates
//! `mid.vision_model.encoder.layers.{i}` [T, grid²+1, C].

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_graph::GraphBuilder;
use openuni_models::config::read_internvl_vision;
use openuni_models::internvit::{self, VitLayout, VitWeights};
use openuni_tensor::{DType, Weights};

use super::{Case, Check, Prepared};

pub fn prepare(case: &Case) -> Result<Prepared> {
    prepare_outputs(case, true)
}

/// The vit graph of a case; `mids` adds the per-layer intermediates the case holds.
pub fn prepare_outputs(case: &Case, mids: bool) -> Result<Prepared> {
    let cfg = read_internvl_vision(&case.model_dir().join("config.json"))?;
    let weights = Weights::open(case.model_dir())?;
    let layout = VitLayout::detect(&weights).with_context(|| {
        format!(
            "{}: no vision tower (none of `vision_model.embeddings.patch_embedding.weight` (InternVL) or \
             `[model.]vision_tower.embeddings.patch_embeddings.projection.weight` (transformers))",
            weights.origin().display()
        )
    })?;
    internvit::check_position_table(&weights, &cfg)?;
    let pixels = case.tensor("pixel_values")?;
    let (s, ch) = (cfg.image_size, cfg.num_channels);
    if pixels.shape.rank() != 4
        || pixels.shape.dims()[1..] != [ch, s, s]
        || pixels.shape.dims()[0] == 0
    {
        bail!(
            "{}: `pixel_values` has shape {}, expected [T, {ch}, {s}, {s}] with T >= 1",
            case.dir.display(),
            pixels.shape
        );
    }
    let mut b = GraphBuilder::new();
    let x = b.input("pixel_values", pixels.shape.clone())?;
    let out = internvit::build(&mut b, &cfg, x)?;
    let mut checks = vec![Check::mark(
        &mut b,
        internvit::VIT_EMBEDS.0,
        out.vit_embeds,
        true,
    )?];
    for (i, &l) in out.layers.iter().enumerate() {
        let name = format!("mid.vision_model.encoder.layers.{i}");
        if mids && case.io.contains(&name) {
            checks.push(Check::mark(&mut b, &name, l, false)?);
        }
    }
    let weights = Box::new(VitWeights {
        inner: weights,
        layout,
    });
    Ok(Prepared {
        graph: b.finish(),
        weights,
        inputs: HashMap::from([("pixel_values".to_string(), pixels.to_dtype(DType::F32)?)]),
        checks,
    })
}
