//! Case component `connector`: inputs [B,N,D] -> outputs [B,N,D]; model/ holds config.json and
//! model.safetensors with keys `layers.{i}.…`.

use std::collections::HashMap;

use anyhow::{bail, Result};
use openuni_graph::GraphBuilder;
use openuni_models::config::read_config;
use openuni_models::connector::{self, ConnectorConfig};
use openuni_models::nn::Scope;
use openuni_tensor::Weights;

use super::{Case, Check, Prepared};

pub fn prepare(case: &Case) -> Result<Prepared> {
    let cfg_path = case.model_dir().join("config.json");
    let cfg: ConnectorConfig = read_config(&cfg_path)?;
    let inputs = case.tensor("inputs")?;
    let s = inputs.shape.dims().to_vec();
    if s.len() != 3 || s[2] != cfg.hidden_size {
        bail!(
            "{}: `inputs` has shape {}, expected [B, N, {}]",
            case.dir.display(),
            inputs.shape,
            cfg.hidden_size
        );
    }
    let mut b = GraphBuilder::new();
    let x = b.input("inputs", inputs.shape.clone())?;
    let layers = connector::build(
        &mut b,
        &cfg,
        &Scope::default(),
        x,
        &cfg_path.display().to_string(),
    )?;
    let mut checks = vec![];
    checks.push(Check::mark(
        &mut b,
        "outputs",
        *layers.last().unwrap_or(&x),
        true,
    )?);
    for (i, &l) in layers.iter().enumerate() {
        let name = format!("mid.layers.{i}");
        if case.io.contains(&name) {
            checks.push(Check::mark(&mut b, &name, l, false)?);
        }
    }
    let weights = Weights::open(case.model_dir())?;
    Ok(Prepared {
        graph: b.finish(),
        weights: Box::new(weights),
        inputs: HashMap::from([(
            "inputs".to_string(),
            inputs.to_dtype(openuni_tensor::DType::F32)?,
        )]),
        checks,
    })
}
