//! Model assembly: an `OpenUni` from its folders (or from parts), the weight source of each
//! stage, and the graphs of a generation (conditioning, caption path, step) with their memory plans.

use std::cell::RefCell;
use std::path::Path;

use openuni_models::config::{read_config, read_mllm_config};
use openuni_models::connector::ConnectorConfig;
use openuni_models::dcae::DcaeConfig;
use openuni_models::openuni::{self as head, Head};
use openuni_models::qwen2::{self, Qwen2Config};
use openuni_models::sana::{self, SanaConfig};
use openuni_tensor::{read_pth, Overlay, Routed, TensorMap, Weights};
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_graph::Graph;
use openuni_tensor::{DType, Shape, TensorSource};

use super::resident::Stage;
use super::sampling::with_finite_flags;
use super::{decode_graphs, DecodeOptions, ModelPaths, OpenUni};

/// Opens a weight file or folder: safetensors (file, folder, sharded index) or a PyTorch `.pth`
/// read by our own allow-listed unpickler (never executing checkpoint code).
pub fn open_weights(path: &Path) -> Result<Box<dyn TensorSource>> {
    if path.extension().is_some_and(|e| e == "pth" || e == "pt" || e == "bin") {
        let tensors = read_pth(path)?.into_iter().collect();
        Ok(Box::new(TensorMap { origin: path.display().to_string(), tensors }))
    } else {
        Ok(Box::new(Weights::open(path)?))
    }
}

impl OpenUni {
    pub fn load(paths: &ModelPaths, connector_cfg: ConnectorConfig) -> Result<OpenUni> {
        let llm_cfg_path = paths.llm.join("config.json");
        let llm_cfg = read_mllm_config(&llm_cfg_path)?.llm;
        let llm = Weights::open(paths.llm)?;
        let (llm_prefix, _) = qwen2::detect_prefix(&mut llm.keys())
            .with_context(|| format!("{}: no Qwen2 or InternVL3 embedding table", paths.llm.display()))?;
        let openuni = open_weights(paths.openuni)?;
        let num_queries = head::num_queries(openuni.as_ref(), &llm_cfg)?;
        if connector_cfg.hidden_size != llm_cfg.hidden_size {
            bail!("connector width {} differs from the LLM's hidden size {}", connector_cfg.hidden_size, llm_cfg.hidden_size);
        }
        let tcfg_path = paths.transformer.join("config.json");
        let transformer_cfg: SanaConfig = read_config(&tcfg_path)?;
        let vcfg_path = paths.vae.join("config.json");
        let vae_cfg: DcaeConfig = read_config(&vcfg_path)?;
        Ok(OpenUni {
            num_queries,
            llm_cfg,
            llm: Box::new(llm),
            llm_prefix,
            openuni,
            connector_cfg,
            transformer_cfg,
            transformer_base: Box::new(Weights::open(paths.transformer)?),
            vae_cfg,
            vae: Box::new(Weights::open(paths.vae)?),
            resident: RefCell::default(),
            stop_check: RefCell::default(),
        })
    }

    /// A model from configs and weight sources (e.g. random weights for benchmarks).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        llm_cfg: Qwen2Config,
        llm: Box<dyn TensorSource>,
        llm_prefix: &'static str,
        openuni: Box<dyn TensorSource>,
        connector_cfg: ConnectorConfig,
        num_queries: usize,
        transformer_cfg: SanaConfig,
        transformer: Box<dyn TensorSource>,
        vae_cfg: DcaeConfig,
        vae: Box<dyn TensorSource>,
    ) -> OpenUni {
        OpenUni {
            llm_cfg,
            llm,
            llm_prefix,
            openuni,
            connector_cfg,
            num_queries,
            transformer_cfg,
            transformer_base: transformer,
            vae_cfg,
            vae,
            resident: RefCell::default(),
            stop_check: RefCell::default(),
        }
    }

    pub(super) fn source(&self, stage: Stage) -> Box<dyn TensorSource + '_> {
        match stage {
            Stage::Conditioning => Box::new(Routed {
                routes: vec![
                    (head::CONNECTOR_PREFIX, self.openuni.as_ref()),
                    (head::PROJECTOR_PREFIX, self.openuni.as_ref()),
                    (head::META_QUERIES, self.openuni.as_ref()),
                ],
                default: self.llm.as_ref(),
            }),
            Stage::Transformer => self.transformer(),
            Stage::Vae => Box::new(self.vae.as_ref()),
        }
    }

    /// The transformer's weights: a fine-tuned checkpoint's `transformer.*` over the diffusers folder.
    pub fn transformer(&self) -> Box<dyn TensorSource + '_> {
        if self.openuni.contains(head::FINETUNED_PROBE) {
            Box::new(Overlay { top: self.openuni.as_ref(), prefix: head::TRANSFORMER_PREFIX.into(), base: self.transformer_base.as_ref() })
        } else {
            Box::new(self.transformer_base.as_ref())
        }
    }

    /// The OpenUni head of this model (meta-queries, LLM, connector, projector).
    pub(super) fn head(&self) -> Head<'_> {
        Head {
            llm: &self.llm_cfg,
            llm_prefix: self.llm_prefix,
            connector: &self.connector_cfg,
            num_queries: self.num_queries,
            caption_channels: self.transformer_cfg.caption_channels,
        }
    }

    /// The conditioning graph of packed sequences of `segments` tokens ([`Head::graph`]), with a
    /// non-finite flag after each of its outputs (read instead of the outputs themselves).
    pub(super) fn conditioning_graph(&self, segments: &[usize]) -> Result<Graph> {
        with_finite_flags(self.head().graph(segments)?, &[head::HIDDEN.0, head::CONNECTOR.0, head::PROMPT_EMBEDS.0])
    }

    /// The caption path graph (projection, norm, every block's cross-attention K/V).
    pub(super) fn caption_graph(&self, prompt_embeds: &Shape) -> Result<Graph> {
        Ok(sana::caption_graph(&self.transformer_cfg, prompt_embeds)?)
    }

    /// The graphs alive together for a batch of `n` images with `h`×`w` latents decoded as
    /// `decode` says (conditioning, caption path, step, decoder or its global part and tile),
    /// for memory planning without a device.
    pub fn batch_graphs(&self, n: usize, h: usize, w: usize, decode: DecodeOptions) -> Result<Vec<(&'static str, Graph)>> {
        let (q, cc) = (self.num_queries, self.transformer_cfg.caption_channels);
        let caption = self.caption_graph(&[2 * n, q, cc].into())?;
        let kv: HashMap<String, Shape> = caption.outputs.iter().map(|(name, id)| (name.clone(), caption.shape(*id).clone())).collect();
        // The conditioning graph depends on the prompts' lengths: planned for the lengths
        // `openuni bench` uses (30-token prompts, 16-token unconditional prompts).
        let segments: Vec<usize> = (0..2 * n).map(|i| if i < n { 16 + q } else { 30 + q }).collect();
        let mut graphs = vec![("conditioning", self.conditioning_graph(&segments)?), ("step", self.step_graph(&kv, 2 * n, h, w)?), ("caption", caption)];
        graphs.extend(super::sampling::sampler_graphs(n * self.transformer_cfg.in_channels * h * w)?);
        graphs.extend(decode_graphs(&self.vae_cfg, n, h, w, decode)?);
        Ok(graphs)
    }

    /// Bytes of every weight the batch graphs read, stored as `dtype`.
    pub fn planned_weight_bytes(&self, h: usize, w: usize, dtype: DType) -> Result<usize> {
        let mut seen = HashMap::new();
        for (_, g) in self.batch_graphs(1, h, w, DecodeOptions::default())? {
            for (id, name) in g.weights() {
                seen.insert(name.to_string(), g.shape(id).numel() * dtype.size_in_bytes());
            }
        }
        Ok(seen.values().sum())
    }

    /// Planned activation bytes of [`batch_graphs`](Self::batch_graphs) with `dtype` storage
    /// (see [`planned_graph_bytes`]).
    pub fn planned_batch_bytes(&self, n: usize, h: usize, w: usize, dtype: DType, decode: DecodeOptions) -> Result<usize> {
        Ok(self.batch_graphs(n, h, w, decode)?.iter().map(|(_, g)| planned_graph_bytes(g, dtype)).sum())
    }

    /// The transformer step graph on [2N, C, h, w] reading the caption path's K/V (of the
    /// shapes in `kv`) as inputs.
    pub(super) fn step_graph(&self, kv: &HashMap<String, Shape>, batch2: usize, h: usize, w: usize) -> Result<Graph> {
        Ok(sana::step_graph(&self.transformer_cfg, kv, batch2, h, w)?)
    }
}

/// Planned activation bytes of `g` with `dtype` storage: its arena, plus with bf16 the f32
/// staging of every input and output (the kernels' small workspaces are not counted).
pub fn planned_graph_bytes(g: &Graph, dtype: DType) -> usize {
    let arena = openuni_graph::plan(g, false).arena_elems * dtype.size_in_bytes();
    let staged: usize = g.inputs().map(|(id, _)| g.shape(id).numel()).chain(g.outputs.iter().map(|(_, id)| g.shape(*id).numel())).sum();
    arena + if dtype == DType::F32 { 0 } else { staged * 4 }
}
