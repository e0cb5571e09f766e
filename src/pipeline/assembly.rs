//! Model assembly: an `OpenUni` from its folders (or from parts), the weight source of each
//! stage, and the graphs of a generation (conditioning, caption path, step) with their memory plans.

use std::cell::{Cell, RefCell};
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
    if path
        .extension()
        .is_some_and(|e| e == "pth" || e == "pt" || e == "bin")
    {
        let tensors = read_pth(path)?.into_iter().collect();
        Ok(Box::new(TensorMap {
            origin: path.display().to_string(),
            tensors,
        }))
    } else {
        Ok(Box::new(Weights::open(path)?))
    }
}

impl OpenUni {
    pub fn load(paths: &ModelPaths, connector_cfg: ConnectorConfig) -> Result<OpenUni> {
        let llm_cfg_path = paths.llm.join("config.json");
        let llm_cfg = read_mllm_config(&llm_cfg_path)?.llm;
        let llm = Weights::open(paths.llm)?;
        let (llm_prefix, _) = qwen2::detect_prefix(&mut llm.keys()).with_context(|| {
            format!(
                "{}: no Qwen2 or InternVL3 embedding table",
                paths.llm.display()
            )
        })?;
        let openuni = open_weights(paths.openuni)?;
        let num_queries = head::num_queries(openuni.as_ref(), &llm_cfg)?;
        if connector_cfg.hidden_size != llm_cfg.hidden_size {
            bail!(
                "connector width {} differs from the LLM's hidden size {}",
                connector_cfg.hidden_size,
                llm_cfg.hidden_size
            );
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
            release_stages: Cell::new(false),
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
            release_stages: Cell::new(false),
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
            Box::new(Overlay {
                top: self.openuni.as_ref(),
                prefix: head::TRANSFORMER_PREFIX.into(),
                base: self.transformer_base.as_ref(),
            })
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
        with_finite_flags(
            self.head().graph(segments)?,
            &[head::HIDDEN.0, head::CONNECTOR.0, head::PROMPT_EMBEDS.0],
        )
    }

    /// The caption path graph (projection, norm, every block's cross-attention K/V).
    pub(super) fn caption_graph(&self, prompt_embeds: &Shape) -> Result<Graph> {
        Ok(sana::caption_graph(&self.transformer_cfg, prompt_embeds)?)
    }

    /// The graphs alive together for a batch of `n` images with `h`×`w` latents decoded as
    /// `decode` says (conditioning, caption path, step, decoder or its global part and tile),
    /// for memory planning without a device.
    pub fn batch_graphs(
        &self,
        n: usize,
        h: usize,
        w: usize,
        decode: DecodeOptions,
    ) -> Result<Vec<(&'static str, Graph)>> {
        let (q, cc) = (self.num_queries, self.transformer_cfg.caption_channels);
        let caption = self.caption_graph(&[2 * n, q, cc].into())?;
        let kv: HashMap<String, Shape> = caption
            .outputs
            .iter()
            .map(|(name, id)| (name.clone(), caption.shape(*id).clone()))
            .collect();
        // The conditioning graph depends on the prompts' lengths: planned for the lengths
        // `openuni bench` uses (30-token prompts, 16-token unconditional prompts).
        let segments: Vec<usize> = (0..2 * n)
            .map(|i| if i < n { 16 + q } else { 30 + q })
            .collect();
        let mut graphs = vec![
            ("conditioning", self.conditioning_graph(&segments)?),
            ("step", self.step_graph(&kv, 2 * n, h, w)?),
            ("caption", caption),
        ];
        graphs.extend(super::sampling::sampler_graphs(
            n,
            self.transformer_cfg.in_channels * h * w,
        )?);
        graphs.push((
            "decoder.input",
            super::decode::decoder_input_graph(
                &self.vae_cfg,
                &[n, self.vae_cfg.latent_channels, h, w].into(),
            )?,
        ));
        graphs.extend(decode_graphs(&self.vae_cfg, n, h, w, decode)?);
        Ok(graphs)
    }

    /// Bytes of every weight the batch graphs read, stored as `dtype`.
    pub fn planned_weight_bytes(&self, h: usize, w: usize, dtype: DType) -> Result<usize> {
        let mut seen = HashMap::new();
        for (_, g) in self.batch_graphs(1, h, w, DecodeOptions::default())? {
            for (id, name) in g.weights() {
                seen.insert(
                    name.to_string(),
                    openuni_cuda::families::conv::planned_weight_elems(&g, id, dtype)
                        * dtype.size_in_bytes(),
                );
            }
        }
        Ok(seen.values().sum())
    }

    /// The memory a batch of `n` images of `h`×`w` latents plans (see [`MemoryPlan`]): weights
    /// and activation arenas per stage, stored as `dtype`.
    #[allow(clippy::too_many_arguments)]
    pub fn memory_plan(
        &self,
        n: usize,
        h: usize,
        w: usize,
        dtype: DType,
        decode: DecodeOptions,
        release_stages: bool,
        batches: usize,
    ) -> Result<MemoryPlan> {
        let mut plan = MemoryPlan {
            release_stages,
            single_batch: batches <= 1,
            ..MemoryPlan::default()
        };
        let mut seen: HashMap<(Stage, String), ()> = HashMap::new();
        for (name, g) in self.batch_graphs(n, h, w, decode)? {
            let stage = match name {
                "conditioning" => Stage::Conditioning,
                "step" | "caption" | "sampler" | "sampler.prime" => Stage::Transformer,
                _ => Stage::Vae,
            };
            let (weights, acts) = match stage {
                Stage::Conditioning => (
                    &mut plan.conditioning_weights,
                    &mut plan.conditioning_activations,
                ),
                Stage::Transformer => {
                    (&mut plan.transformer_weights, &mut plan.denoise_activations)
                }
                Stage::Vae => (&mut plan.vae_weights, &mut plan.decode_activations),
            };
            for (id, wname) in g.weights() {
                if seen.insert((stage, wname.to_string()), ()).is_none() {
                    *weights += openuni_cuda::families::conv::planned_weight_elems(&g, id, dtype)
                        * dtype.size_in_bytes();
                }
            }
            *acts += planned_graph_bytes(&g, graph_dtype(name, dtype));
        }
        Ok(plan)
    }

    /// Planned activation bytes of [`batch_graphs`](Self::batch_graphs) with `dtype` storage
    /// (see [`planned_graph_bytes`]).
    pub fn planned_batch_bytes(
        &self,
        n: usize,
        h: usize,
        w: usize,
        dtype: DType,
        decode: DecodeOptions,
    ) -> Result<usize> {
        Ok(self
            .batch_graphs(n, h, w, decode)?
            .iter()
            .map(|(name, g)| planned_graph_bytes(g, graph_dtype(name, dtype)))
            .sum())
    }

    /// The transformer step graph on [2N, C, h, w] reading the caption path's K/V (of the
    /// shapes in `kv`) as inputs.
    pub(super) fn step_graph(
        &self,
        kv: &HashMap<String, Shape>,
        batch2: usize,
        h: usize,
        w: usize,
    ) -> Result<Graph> {
        Ok(sana::step_graph(&self.transformer_cfg, kv, batch2, h, w)?)
    }
}

/// The storage dtype graph `name` of [`OpenUni::batch_graphs`] runs in: the device sampler's
/// graphs (sampling::sampler_graphs) and the decoder's input (decode::decoder_input_graph) are
/// f32 on every device, the others `dtype`.
pub fn graph_dtype(name: &str, dtype: DType) -> DType {
    if name.starts_with("sampler") || name == "decoder.input" {
        DType::F32
    } else {
        dtype
    }
}

/// What a batch plans to hold, in bytes: each stage's weights (graph weights read, counted once
/// per stage) and its graphs' activation arenas. Every stage's executors (the conditioning's for
/// the last prompt lengths, the caption path, step and sampler, the VAE's) stay resident between batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    pub conditioning_weights: usize,
    pub transformer_weights: usize,
    pub vae_weights: usize,
    pub conditioning_activations: usize,
    /// Caption path and step.
    pub denoise_activations: usize,
    pub decode_activations: usize,
    /// Whether each stage is released once the run no longer needs it
    /// ([`OpenUni::set_release_stages`]): the LLM before the transformer loads, the transformer
    /// before the last batch's decode.
    pub release_stages: bool,
    /// A run of one batch: with `release_stages` its decode holds no transformer.
    pub single_batch: bool,
}

impl MemoryPlan {
    /// The phases of a run as (weights, activations) held at once: with stages released,
    /// conditioning, then denoising and decoding (one batch: denoising, then decoding alone);
    /// else one phase holding everything.
    pub fn phases(&self) -> Vec<(&'static str, usize, usize)> {
        let (c, t, v) = (
            (self.conditioning_weights, self.conditioning_activations),
            (self.transformer_weights, self.denoise_activations),
            (self.vae_weights, self.decode_activations),
        );
        match (self.release_stages, self.single_batch) {
            (false, _) => vec![("all stages", c.0 + t.0 + v.0, c.1 + t.1 + v.1)],
            (true, false) => vec![
                ("conditioning", c.0, c.1),
                ("denoise and decode", t.0 + v.0, t.1 + v.1),
            ],
            (true, true) => vec![
                ("conditioning", c.0, c.1),
                ("denoise", t.0, t.1),
                ("decode", v.0, v.1),
            ],
        }
    }

    /// The phase with the largest total: (name, weights, activations).
    pub fn peak_phase(&self) -> (&'static str, usize, usize) {
        self.phases()
            .into_iter()
            .max_by_key(|p| p.1 + p.2)
            .expect("at least one phase")
    }

    /// The peak phase's (weights, activations).
    pub fn peak_parts(&self) -> (usize, usize) {
        let (_, w, a) = self.peak_phase();
        (w, a)
    }

    /// Weights of the stages resident at once at the peak.
    pub fn weights_at_peak(&self) -> usize {
        self.peak_parts().0
    }

    /// Planned peak of weights and activations.
    pub fn peak(&self) -> usize {
        let (w, a) = self.peak_parts();
        w + a
    }

    /// Every stage's weights and activations at once (nothing released).
    pub fn resident_all(&self) -> usize {
        MemoryPlan {
            release_stages: false,
            ..*self
        }
        .peak()
    }
}

/// Planned activation bytes of `g` with `dtype` storage: its arena, plus with bf16 the f32
/// staging of every input and output (the kernels' small workspaces are not counted).
pub fn planned_graph_bytes(g: &Graph, dtype: DType) -> usize {
    let arena = openuni_graph::plan(g, false).arena_elems * dtype.size_in_bytes();
    let staged: usize = g
        .inputs()
        .map(|(id, _)| g.shape(id).numel())
        .chain(g.outputs.iter().map(|(_, id)| g.shape(*id).numel()))
        .sum();
    arena + if dtype == DType::F32 { 0 } else { staged * 4 }
}
