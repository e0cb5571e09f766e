//! The built-in tiny OpenUni: the real structure (Qwen2 LLM, meta-queries, connector, projector,
//! SANA transformer, DC-AE decoder) at toy widths with seeded random weights. It lets a fresh
//! machine with no downloaded weights run `openuni generate` through every stage, including the
//! loaders: the model is written to disk in the upstream layouts and read back like a real one.
//! Its pictures are not meaningful.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use openuni_graph::{Graph, GraphBuilder};
use openuni_models::connector::{self, ConnectorConfig};
use openuni_models::dcae::{self, DcaeConfig};
use openuni_models::config::{parse_config, MllmConfig};
use openuni_models::nn::{self, Scope};
use openuni_models::openuni as head;
use openuni_models::qwen2;
use openuni_models::sana::{self, SanaConfig};
use openuni_models::variant::TINY;
use openuni_tensor::{write_safetensors, HostTensor, Shape};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::pipeline::ModelPaths;

const TOKENIZER: &str = include_str!("../assets/tiny_tokenizer.json");
const SEED: u64 = 20250530;
/// Bumped whenever the tiny model's structure or initialisation changes (cache key).
const VERSION: u32 = 1;
// The tiny model's sizes and configs are `variant::TINY`, in the table every variant is read from.

pub fn llm_config() -> serde_json::Value {
    (TINY.llm)()
}

pub fn connector_config() -> ConnectorConfig {
    (TINY.connector)()
}

/// How a random weight is drawn, as (standard deviation, mean): norms' weights near 1, biases
/// small, matrices ~ 1/sqrt(fan_in). Shared with the benchmark's random real-size models.
pub fn init_rule(name: &str, shape: &Shape) -> (f32, f32) {
    let fan_in: usize = shape.dims().iter().skip(1).product::<usize>().max(1);
    if shape.rank() == 1 && name.ends_with(".weight") {
        (0.05, 1.0)
    } else if shape.rank() == 1 {
        (0.02, 0.0)
    } else if name.contains("scale_shift_table") || name == "meta_queries" {
        (1.0 / (shape.last() as f32).sqrt(), 0.0)
    } else {
        (1.0 / (fan_in as f32).sqrt(), 0.0)
    }
}

fn init(name: &str, shape: &Shape, rng: &mut rand::rngs::StdRng) -> HostTensor {
    let (scale, offset) = init_rule(name, shape);
    let normal = Normal::new(0.0f32, 1.0).expect("valid normal");
    let v = (0..shape.numel()).map(|_| offset + scale * normal.sample(rng)).collect::<Vec<_>>();
    HostTensor::from_f32(shape.clone(), v).expect("sized")
}

/// Random weights for every weight a graph reads, plus `extra` named shapes.
fn weights_of(graphs: &[&Graph], extra: &[(&str, Vec<usize>)], rng: &mut rand::rngs::StdRng) -> Vec<(String, HostTensor)> {
    let mut seen = HashMap::new();
    for g in graphs {
        for (id, name) in g.weights() {
            // A weight made at load from stored parts (openuni_tensor::derived) is stored as its parts.
            let stored = openuni_tensor::derived::parts(name, g.shape(id)).unwrap_or_else(|| vec![(name.to_string(), g.shape(id).clone())]);
            for (n, s) in stored {
                seen.entry(n).or_insert(s);
            }
        }
    }
    for (name, s) in extra {
        seen.insert(name.to_string(), Shape::new(s.clone()));
    }
    let mut names: Vec<_> = seen.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    names.into_iter().map(|(n, s)| (n.clone(), init(&n, &s, rng))).collect()
}

fn save(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    write_safetensors(path, tensors.iter().map(|(k, v)| (k.as_str(), v)), None)?;
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?).with_context(|| format!("{}: cannot write", path.display()))
}

/// Where the tiny model lives; it is (re)written there when missing.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("OPENUNI_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/openuni")).unwrap_or_else(|| PathBuf::from(".openuni-cache"))
    });
    base.join(format!("tiny-model-v{VERSION}"))
}

/// Writes the tiny model under `dir` (once) and returns its paths.
pub fn ensure(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf, PathBuf)> {
    let (llm, transformer, vae) = (dir.join("llm"), dir.join("transformer"), dir.join("vae"));
    let openuni = dir.join("openuni.safetensors");
    let done = dir.join(".complete");
    if !done.exists() {
        build(dir, &llm, &transformer, &vae, &openuni).with_context(|| format!("writing the built-in tiny model to {}", dir.display()))?;
        std::fs::write(&done, b"")?;
    }
    Ok((llm, openuni, transformer, vae))
}

fn build(dir: &Path, llm: &Path, transformer: &Path, vae: &Path, openuni: &Path) -> Result<()> {
    for d in [dir, llm, transformer, vae] {
        std::fs::create_dir_all(d).with_context(|| format!("{}: cannot create", d.display()))?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);

    // LLM (Qwen2 folder layout).
    let lc = MllmConfig::from_value(llm_config(), "tiny llm")?.llm;
    let mut b = GraphBuilder::new();
    let x = b.input("x", [1, 4, lc.hidden_size])?;
    qwen2::build(&mut b, &lc, &Scope::new("model"), x, "tiny llm")?;
    let g = b.finish();
    let w = weights_of(&[&g], &[("model.embed_tokens.weight", vec![lc.vocab_size, lc.hidden_size])], &mut rng);
    save(&llm.join("model.safetensors"), &w)?;
    write_json(&llm.join("config.json"), &llm_config())?;
    std::fs::write(llm.join("tokenizer.json"), TOKENIZER)?;

    // OpenUni checkpoint: meta-queries, connector, projector.
    let cc = connector_config();
    let tc: SanaConfig = parse_config((TINY.transformer)(), "tiny transformer")?;
    let mut b = GraphBuilder::new();
    let x = b.input("x", [1, TINY.num_queries, cc.hidden_size])?;
    let layers = connector::build(&mut b, &cc, &Scope::new(head::CONNECTOR_PREFIX), x, "tiny connector")?;
    nn::linear(&mut b, &Scope::new(head::PROJECTOR_PREFIX), *layers.last().unwrap_or(&x), cc.hidden_size, tc.caption_channels, true)?;
    let g = b.finish();
    save(openuni, &weights_of(&[&g], &[(head::META_QUERIES, vec![TINY.num_queries, lc.hidden_size])], &mut rng))?;

    // Transformer (diffusers folder layout).
    let mut b = GraphBuilder::new();
    let enc = b.input("enc", [2, TINY.num_queries, tc.caption_channels])?;
    let (_, kv) = sana::caption_path(&mut b, &tc, enc)?;
    let xs = b.input("x", [2, tc.in_channels, 2, 2])?;
    let t = b.input("t", [2])?;
    sana::denoise(&mut b, &tc, xs, t, &kv, None, 2, 2)?;
    let g = b.finish();
    save(&transformer.join("diffusion_pytorch_model.safetensors"), &weights_of(&[&g], &[], &mut rng))?;
    write_json(&transformer.join("config.json"), &(TINY.transformer)())?;

    // VAE (diffusers AutoencoderDC folder layout, decoder only).
    let vc: DcaeConfig = parse_config((TINY.vae)(), "tiny vae")?;
    let mut b = GraphBuilder::new();
    let z = b.input("z", [1, vc.latent_channels, 4, 4])?;
    dcae::decoder(&mut b, &vc, z, "tiny vae")?;
    let g = b.finish();
    save(&vae.join("diffusion_pytorch_model.safetensors"), &weights_of(&[&g], &[], &mut rng))?;
    write_json(&vae.join("config.json"), &(TINY.vae)())?;
    Ok(())
}

/// The tiny model's paths as the pipeline takes them.
pub fn paths(p: &(PathBuf, PathBuf, PathBuf, PathBuf)) -> ModelPaths<'_> {
    ModelPaths { llm: &p.0, openuni: &p.1, transformer: &p.2, vae: &p.3 }
}
