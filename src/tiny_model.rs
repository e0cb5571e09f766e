//! The built-in tiny OpenUni: the real structure (Qwen2 LLM, meta-queries, connector, projector,
//! SANA transformer, DC-AE decoder) at toy widths with seeded random weights. It lets a fresh
//! machine with no downloaded weights run `openuni generate` through every stage, including the
//! loaders: the model is written to disk in the upstream layouts and read back like a real one.
//! Its pictures are not meaningful.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use openuni_graph::{Graph, GraphBuilder};
use openuni_models::config::{parse_config, MllmConfig};
use openuni_models::connector::{self, ConnectorConfig};
use openuni_models::dcae::{self, DcaeConfig};
use openuni_models::nn::{self, Scope};
use openuni_models::openuni as head;
use openuni_models::qwen2;
use openuni_models::sana::{self, SanaConfig};
use openuni_models::variant::{Variant, TINY};
use openuni_tensor::{write_safetensors, DType, HostTensor, Shape, TensorSource};
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
    let v = (0..shape.numel())
        .map(|_| offset + scale * normal.sample(rng))
        .collect::<Vec<_>>();
    HostTensor::from_f32(shape.clone(), v).expect("sized")
}

/// The name and shape of every weight the graphs read, plus `extra` named shapes, sorted by name.
fn shapes_of(graphs: &[&Graph], extra: &[(&str, Vec<usize>)]) -> Vec<(String, Shape)> {
    let mut seen = HashMap::new();
    for g in graphs {
        for (id, name) in g.weights() {
            // A weight made at load from stored parts (openuni_tensor::derived) is stored as its parts.
            let stored = openuni_tensor::derived::parts(name, g.shape(id))
                .unwrap_or_else(|| vec![(name.to_string(), g.shape(id).clone())]);
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
    names
}

/// One file of a model written to disk: where (relative to the model folder) and its tensors.
struct ModelFile {
    path: &'static str,
    tensors: Vec<(String, Shape)>,
}

/// The files of `v`'s model in the upstream layouts (Qwen2 folder `llm/`, OpenUni checkpoint
/// `openuni.safetensors`, diffusers `transformer/` and `vae/`), with the tensors the pipeline reads.
fn layout(v: &Variant) -> Result<Vec<ModelFile>> {
    // LLM (Qwen2 folder layout).
    let lc = MllmConfig::from_value((v.llm)(), &format!("{} llm", v.name))?.llm;
    let mut b = GraphBuilder::new();
    let x = b.input("x", [1, 4, lc.hidden_size])?;
    qwen2::build(&mut b, &lc, &Scope::new("model"), x, v.name)?;
    let llm = shapes_of(
        &[&b.finish()],
        &[(
            "model.embed_tokens.weight",
            vec![lc.vocab_size, lc.hidden_size],
        )],
    );

    // OpenUni checkpoint: meta-queries, connector, projector.
    let cc = (v.connector)();
    let tc: SanaConfig = parse_config((v.transformer)(), &format!("{} transformer", v.name))?;
    let mut b = GraphBuilder::new();
    let x = b.input("x", [1, v.num_queries, cc.hidden_size])?;
    let layers = connector::build(&mut b, &cc, &Scope::new(head::CONNECTOR_PREFIX), x, v.name)?;
    nn::linear(
        &mut b,
        &Scope::new(head::PROJECTOR_PREFIX),
        *layers.last().unwrap_or(&x),
        cc.hidden_size,
        tc.caption_channels,
        true,
    )?;
    let openuni = shapes_of(
        &[&b.finish()],
        &[(head::META_QUERIES, vec![v.num_queries, lc.hidden_size])],
    );

    // Transformer (diffusers folder layout).
    let mut b = GraphBuilder::new();
    let enc = b.input("enc", [2, v.num_queries, tc.caption_channels])?;
    let (_, kv) = sana::caption_path(&mut b, &tc, enc)?;
    let xs = b.input("x", [2, tc.in_channels, 2, 2])?;
    let t = b.input("t", [2])?;
    sana::denoise(&mut b, &tc, xs, t, &kv, None, 2, 2)?;
    let transformer = shapes_of(&[&b.finish()], &[]);

    // VAE (diffusers AutoencoderDC folder layout, decoder only).
    let vc: DcaeConfig = parse_config((v.vae)(), &format!("{} vae", v.name))?;
    let mut b = GraphBuilder::new();
    let z = b.input("z", [1, vc.latent_channels, 4, 4])?;
    dcae::decoder(&mut b, &vc, z, v.name)?;
    let vae = shapes_of(&[&b.finish()], &[]);
    Ok(vec![
        ModelFile {
            path: "llm/model.safetensors",
            tensors: llm,
        },
        ModelFile {
            path: "openuni.safetensors",
            tensors: openuni,
        },
        ModelFile {
            path: "transformer/diffusion_pytorch_model.safetensors",
            tensors: transformer,
        },
        ModelFile {
            path: "vae/diffusion_pytorch_model.safetensors",
            tensors: vae,
        },
    ])
}

/// Writes the configs (and the tiny tokenizer) of `v` next to its weight files under `dir`.
fn write_configs(dir: &Path, v: &Variant) -> Result<()> {
    for d in ["llm", "transformer", "vae"] {
        std::fs::create_dir_all(dir.join(d))
            .with_context(|| format!("{}: cannot create", dir.join(d).display()))?;
    }
    write_json(&dir.join("llm/config.json"), &(v.llm)())?;
    std::fs::write(dir.join("llm/tokenizer.json"), TOKENIZER)?;
    write_json(&dir.join("transformer/config.json"), &(v.transformer)())?;
    write_json(&dir.join("vae/config.json"), &(v.vae)())
}

/// A tensor written by [`write_random_model`]: its values drawn when the writer asks for them,
/// so that only one tensor is in memory at a time.
struct Drawn {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
}

impl safetensors::View for &Drawn {
    fn dtype(&self) -> safetensors::Dtype {
        if self.dtype == DType::BF16 {
            safetensors::Dtype::BF16
        } else {
            safetensors::Dtype::F32
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let shape = Shape::new(self.shape.clone());
        let t = crate::bench::RandomWeights {
            origin: String::new(),
            tables: HashMap::new(),
        }
        .tensor_f32(&self.name, &shape)
        .expect("random weights of any shape");
        let v = t.into_f32_vec();
        std::borrow::Cow::Owned(match self.dtype {
            DType::BF16 => v
                .iter()
                .flat_map(|x| openuni_tensor::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

/// Writes `v`'s model at its real size with seeded random weights (the benchmark's, see
/// `bench::RandomWeights`) stored as `dtype` (f32 or bf16) under `dir`, in the layouts
/// `generate` reads (`--mllm DIR/llm --checkpoint DIR/openuni.safetensors --transformer
/// DIR/transformer --vae DIR/vae`), for measuring memory and speed without the published
/// weights. Its pictures are not meaningful. Returns the bytes written.
pub fn write_random_model(v: &Variant, dir: &Path, dtype: DType) -> Result<u64> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        anyhow::bail!("random models are written as f32 or bf16, not {dtype}");
    }
    write_configs(dir, v)?;
    let mut bytes = 0;
    for f in layout(v)? {
        let path = dir.join(f.path);
        let drawn: Vec<Drawn> = f
            .tensors
            .into_iter()
            .map(|(name, s)| Drawn {
                name,
                shape: s.dims().to_vec(),
                dtype,
            })
            .collect();
        safetensors::serialize_to_file(drawn.iter().map(|d| (d.name.clone(), d)), None, &path)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    }
    Ok(bytes)
}

fn save(path: &Path, tensors: &[(String, HostTensor)]) -> Result<()> {
    write_safetensors(path, tensors.iter().map(|(k, v)| (k.as_str(), v)), None)?;
    Ok(())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Where the tiny model lives; it is (re)written there when missing.
pub fn default_dir() -> PathBuf {
    let base = std::env::var_os("OPENUNI_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/openuni"))
                .unwrap_or_else(|| PathBuf::from(".openuni-cache"))
        });
    base.join(format!("tiny-model-v{VERSION}"))
}

/// Writes the tiny model under `dir` (once) and returns its paths.
pub fn ensure(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf, PathBuf)> {
    let (llm, transformer, vae) = (dir.join("llm"), dir.join("transformer"), dir.join("vae"));
    let openuni = dir.join("openuni.safetensors");
    let done = dir.join(".complete");
    if !done.exists() {
        build(dir)
            .with_context(|| format!("writing the built-in tiny model to {}", dir.display()))?;
        std::fs::write(&done, b"")?;
    }
    Ok((llm, openuni, transformer, vae))
}

fn build(dir: &Path) -> Result<()> {
    write_configs(dir, &TINY)?;
    // One generator across the files, in their order, each file's tensors in name order.
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    for f in layout(&TINY)? {
        let tensors: Vec<(String, HostTensor)> = f
            .tensors
            .into_iter()
            .map(|(n, s)| {
                let t = init(&n, &s, &mut rng);
                (n, t)
            })
            .collect();
        save(&dir.join(f.path), &tensors)?;
    }
    Ok(())
}

/// The tiny model's paths as the pipeline takes them.
pub fn paths(p: &(PathBuf, PathBuf, PathBuf, PathBuf)) -> ModelPaths<'_> {
    ModelPaths {
        llm: &p.0,
        openuni: &p.1,
        transformer: &p.2,
        vae: &p.3,
    }
}
