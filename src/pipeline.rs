//! OpenUni text-to-image, end to end (docs/architecture.md, "One generation";
//! docs/models.md): prompt ids ->
//! LLM with meta-queries -> connector -> projector -> SANA with CFG and DPM-Solver++ -> DC-AE ->
//! uint8 pixels. Each stage is its own graph; what depends only on the prompt (the caption path
//! and every block's cross-attention K/V) runs once per generation, the step graph once per step.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use openuni_graph::{Graph, GraphBuilder};
use openuni_models::config::{read_config, read_mllm_config};
use openuni_models::connector::{self, ConnectorConfig};
use openuni_models::dcae::{self, DcaeConfig};
use openuni_models::qwen2::{self, Qwen2Config};
use openuni_models::sana::{self, SanaConfig};
use openuni_models::scheduler::{guide, Sampler, SamplerKind};
use openuni_tensor::{read_pth, DType, HostTensor, Overlay, Routed, Shape, TensorMap, TensorSource, Weights};

use crate::exec::{executor_with, Device, GraphExecutor, WeightCache};

/// The models of one OpenUni variant, loaded from their folders.
pub struct OpenUni {
    pub llm_cfg: Qwen2Config,
    pub llm: Box<dyn TensorSource>,
    llm_prefix: &'static str,
    /// meta_queries, connector.*, projector.*, and for fine-tuned checkpoints transformer.*.
    pub openuni: Box<dyn TensorSource>,
    pub connector_cfg: ConnectorConfig,
    pub num_queries: usize,
    pub transformer_cfg: SanaConfig,
    transformer_base: Box<dyn TensorSource>,
    pub vae_cfg: DcaeConfig,
    pub vae: Box<dyn TensorSource>,
    /// Device weights and executors kept between calls (see [`Resident`]).
    resident: RefCell<Resident>,
    /// Asked before every denoising step (see [`set_stop_check`](Self::set_stop_check)).
    stop_check: RefCell<Option<StopCheck>>,
}

/// A check asked before every denoising step; `true` ends the generation with [`Stopped`].
pub type StopCheck = Box<dyn Fn() -> bool>;

/// The error of a generation ended by its [`StopCheck`] (e.g. every client of a served batch left).
#[derive(Debug)]
pub struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "generation stopped before its last step: nobody waits for it")
    }
}

impl std::error::Error for Stopped {}

/// What a graph reads its weights from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The LLM with the OpenUni checkpoint's meta-queries, connector and projector.
    Conditioning,
    Transformer,
    Vae,
}

/// An executor kept for reuse: which graph, at which input shape, on which device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ExecKey {
    graph: &'static str,
    dims: Vec<usize>,
    device: Device,
    dtype: DType,
}

/// What stays on the device between calls, so that the batches after the first of a shape
/// upload and allocate nothing: each stage's weights once per (device, dtype), and one executor
/// per graph for the last shape it ran (the step executor with its captured CUDA graph). The LLM graph depends
/// on the prompt lengths, so its executors are made per call (sharing the resident weights).
#[derive(Default)]
struct Resident {
    weights: HashMap<(Stage, Device, DType), WeightCache>,
    execs: HashMap<ExecKey, Box<dyn GraphExecutor>>,
}

/// The key by which a fine-tuned OpenUni checkpoint is recognised: it carries the whole SANA
/// transformer under `transformer.` (docs/models.md, "Variants").
const FINETUNED_PROBE: &str = "transformer.proj_out.weight";

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

/// Where the pieces are.
pub struct ModelPaths<'a> {
    pub llm: &'a Path,
    pub openuni: &'a Path,
    pub transformer: &'a Path,
    pub vae: &'a Path,
}

/// How the computation runs.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    pub device: Device,
    pub dtype: DType,
}

/// One batch for [`OpenUni::generate_batches`]: each image's (cond, uncond) prompt ids and the
/// batch's noise [N, 32, h, w].
pub struct GenerationBatch {
    pub prompts: Vec<(Vec<u32>, Vec<u32>)>,
    pub noise: HostTensor,
}

/// How the images are sampled and decoded.
#[derive(Clone, Copy, Debug)]
pub struct SamplingParams {
    pub steps: usize,
    pub guidance: f32,
    pub sampler: SamplerKind,
    pub flow_shift: f64,
    pub decode: DecodeOptions,
}

/// A conditioning enqueued by [`OpenUni::start_conditioning`].
pub struct PendingConditioning {
    exec: Box<dyn GraphExecutor>,
    n: usize,
}

/// The conditioning of N prompts: rows ordered [uncond_0 .. uncond_N-1, cond_0 .. cond_N-1]
/// (diffusers' CFG order: the transformer output's first half is unconditional).
pub struct Conditioning {
    /// [2N, Q, caption_channels]
    pub prompt_embeds: HostTensor,
    /// The LLM's last Q hidden states after the final norm, [N, Q, D] each.
    pub hidden_uncond: HostTensor,
    pub hidden_cond: HostTensor,
    /// The connector output [2N, Q, D].
    pub connector: HostTensor,
}

/// Per-step values a caller may want to see (verification, progress).
pub struct StepRecord {
    pub timestep: f32,
    /// The raw transformer output [2N, 32, h, w] before guidance.
    pub model_output: HostTensor,
    /// The latents after the step [N, 32, h, w].
    pub latents: HostTensor,
}

impl OpenUni {
    pub fn load(paths: &ModelPaths, connector_cfg: ConnectorConfig) -> Result<OpenUni> {
        let llm_cfg_path = paths.llm.join("config.json");
        let llm_cfg = read_mllm_config(&llm_cfg_path)?.llm;
        let llm = Weights::open(paths.llm)?;
        let (llm_prefix, _) = qwen2::detect_prefix(&mut llm.keys())
            .with_context(|| format!("{}: no Qwen2 or InternVL3 embedding table", paths.llm.display()))?;
        let openuni = open_weights(paths.openuni)?;
        let mq = openuni.shape_of("meta_queries")?;
        if mq.rank() != 2 || mq.dims()[1] != llm_cfg.hidden_size {
            bail!(
                "{}: `meta_queries` has shape {mq}, expected [Q, {}] (the LLM's hidden size)",
                paths.openuni.display(),
                llm_cfg.hidden_size
            );
        }
        if connector_cfg.hidden_size != llm_cfg.hidden_size {
            bail!("connector width {} differs from the LLM's hidden size {}", connector_cfg.hidden_size, llm_cfg.hidden_size);
        }
        let tcfg_path = paths.transformer.join("config.json");
        let transformer_cfg: SanaConfig = read_config(&tcfg_path)?;
        let vcfg_path = paths.vae.join("config.json");
        let vae_cfg: DcaeConfig = read_config(&vcfg_path)?;
        Ok(OpenUni {
            num_queries: mq.dims()[0],
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

    fn source(&self, stage: Stage) -> Box<dyn TensorSource + '_> {
        match stage {
            Stage::Conditioning => Box::new(Routed {
                routes: vec![("connector.", self.openuni.as_ref()), ("projector.", self.openuni.as_ref())],
                default: self.llm.as_ref(),
            }),
            Stage::Transformer => self.transformer(),
            Stage::Vae => Box::new(self.vae.as_ref()),
        }
    }

    /// The resident weights of `stage` on `run`'s device.
    fn weight_cache(&self, stage: Stage, run: RunOptions) -> Result<WeightCache> {
        let mut r = self.resident.borrow_mut();
        if let Some(c) = r.weights.get(&(stage, run.device, run.dtype)) {
            return Ok(c.clone());
        }
        if run.device == Device::Cpu && run.dtype != DType::F32 {
            bail!("--device cpu runs the f32 reference only; --dtype {} needs --device cuda", run.dtype);
        }
        // The conditioning runs on the device's second lane, so that the next batch's can overlap
        // this batch's denoising.
        let c = match stage {
            Stage::Conditioning => WeightCache::on_second_lane(run.device, run.dtype)?,
            _ => WeightCache::new(run.device, run.dtype)?,
        };
        r.weights.insert((stage, run.device, run.dtype), c.clone());
        Ok(c)
    }

    /// Bytes of resident weights (host f32 on the CPU, device memory on a GPU).
    pub fn resident_weight_bytes(&self) -> usize {
        self.resident.borrow().weights.values().map(|c| c.bytes()).sum()
    }

    /// Bytes of the resident executors' activations (arenas, workspaces, staging).
    pub fn resident_activation_bytes(&self) -> usize {
        self.resident.borrow().execs.values().map(|e| e.activation_bytes()).sum()
    }

    /// Runs `f` on the resident executor of graph `name` ("caption", "step", "decoder",
    /// "decoder.global", "decoder.tile") for input dims `dims`; an error if no call has made it yet.
    pub fn resident_executor<R>(&self, name: &str, dims: &[usize], run: RunOptions, f: impl FnOnce(&mut dyn GraphExecutor) -> Result<R>) -> Result<R> {
        let mut r = self.resident.borrow_mut();
        let e = r
            .execs
            .iter_mut()
            .find(|(k, _)| k.graph == name && k.dims == dims && k.device == run.device && k.dtype == run.dtype)
            .map(|(_, e)| e)
            .with_context(|| format!("no resident `{name}` executor for {dims:?} on {} {}", run.device, run.dtype))?;
        f(e.as_mut())
    }

    /// Sets (or with `None` clears) the check asked before every denoising step: when it says
    /// `true`, `denoise` and `generate_batches` end with [`Stopped`].
    pub fn set_stop_check(&self, check: Option<StopCheck>) {
        *self.stop_check.borrow_mut() = check;
    }

    /// Drops every resident executor (their weights stay).
    pub fn release_executors(&self) {
        self.resident.borrow_mut().execs.clear();
    }

    /// A new executor of `graph` reading `stage`'s resident weights.
    fn new_executor(&self, stage: Stage, graph: &Graph, run: RunOptions) -> Result<Box<dyn GraphExecutor>> {
        let cache = self.weight_cache(stage, run)?;
        executor_with(run.device, graph, self.source(stage).as_ref(), &cache, false)
    }

    /// Runs `f` on the resident executor of graph `name` for input dims `dims`, building it with
    /// `build` the first time (and capturing it into a CUDA graph when `capture`).
    fn with_executor<R>(
        &self,
        stage: Stage,
        name: &'static str,
        dims: &[usize],
        run: RunOptions,
        capture: bool,
        build: impl FnOnce() -> Result<Graph>,
        f: impl FnOnce(&mut dyn GraphExecutor) -> Result<R>,
    ) -> Result<R> {
        let key = ExecKey { graph: name, dims: dims.to_vec(), device: run.device, dtype: run.dtype };
        if !self.resident.borrow().execs.contains_key(&key) {
            // One resident executor per graph: a new shape (a last, smaller batch) replaces the
            // old one, freeing its memory first, so that memory stays bounded by the largest batch.
            self.resident.borrow_mut().execs.retain(|k, _| k.graph != name);
            let mut e = self.new_executor(stage, &build()?, run)?;
            if capture {
                e.capture().with_context(|| format!("capturing the {name} graph"))?;
            }
            self.resident.borrow_mut().execs.insert(key.clone(), e);
        }
        let mut r = self.resident.borrow_mut();
        f(r.execs.get_mut(&key).expect("inserted above").as_mut())
    }

    /// The transformer's weights: a fine-tuned checkpoint's `transformer.*` over the diffusers folder.
    pub fn transformer(&self) -> Box<dyn TensorSource + '_> {
        if self.openuni.contains(FINETUNED_PROBE) {
            Box::new(Overlay { top: self.openuni.as_ref(), prefix: "transformer.".into(), base: self.transformer_base.as_ref() })
        } else {
            Box::new(self.transformer_base.as_ref())
        }
    }

    /// Prompt ids (cond, uncond) -> prompt embeddings [2, Q, caption_channels], [uncond, cond].
    pub fn condition(&self, ids_cond: &[u32], ids_uncond: &[u32], run: RunOptions) -> Result<Conditioning> {
        self.condition_batch(&[(ids_cond, ids_uncond)], run)
    }

    /// N prompts' ids (cond, uncond) -> prompt embeddings [2N, Q, caption_channels] in the
    /// order [uncond_0..N-1, cond_0..N-1].
    pub fn condition_batch(&self, prompts: &[(&[u32], &[u32])], run: RunOptions) -> Result<Conditioning> {
        let pending = self.start_conditioning(prompts, run)?;
        self.finish_conditioning(pending)
    }

    /// The 2N sequences of N prompts in row order [uncond_0..N-1, cond_0..N-1], each with the
    /// meta-queries appended: their lengths (the packed segments).
    fn segments(&self, prompts: &[(&[u32], &[u32])]) -> Vec<usize> {
        prompts.iter().map(|p| p.1.len()).chain(prompts.iter().map(|p| p.0.len())).map(|l| l + self.num_queries).collect()
    }

    /// The conditioning graph of packed sequences of `segments` tokens (each ending in the Q
    /// meta-queries): the LLM with causal attention inside each sequence and no padding, the last
    /// Q states of every sequence after the final norm, the connector on all of them at once, the
    /// projector. Outputs `hidden` [S, Q, D], `connector` [S, Q, D], `prompt_embeds` [S, Q, cc].
    fn conditioning_graph(&self, segments: &[usize]) -> Result<Graph> {
        let (d, q, cc) = (self.llm_cfg.hidden_size, self.num_queries, self.transformer_cfg.caption_channels);
        let total: usize = segments.iter().sum();
        let mut b = GraphBuilder::new();
        let x = b.input("inputs_embeds", [1, total, d])?;
        let o = qwen2::build_packed(&mut b, &self.llm_cfg, self.llm_prefix, x, segments, "llm")?;
        let ends = segments.iter().scan(0, |at, &l| {
            *at += l;
            Some(*at - q)
        });
        let hidden = b.gather_tokens("queries", o.hidden_states, &ends.collect::<Vec<_>>(), q)?;
        let layers = connector::build(&mut b, &self.connector_cfg, "connector.", hidden, "connector")?;
        let c = *layers.last().unwrap_or(&hidden);
        let pw = b.weight("projector.weight", [cc, d])?;
        let pb = b.weight("projector.bias", [cc])?;
        let e = b.linear("projector", c, pw, Some(pb))?;
        b.output("hidden", hidden)?;
        b.output("connector", c)?;
        b.output("prompt_embeds", e)?;
        Ok(b.finish())
    }

    /// Starts the conditioning of N prompts (`conditioning_graph` on their packed sequences). On a
    /// GPU it is enqueued on the device's second lane and this returns before it has run, so the
    /// caller can denoise another batch meanwhile; [`finish_conditioning`](Self::finish_conditioning)
    /// waits for it.
    pub fn start_conditioning(&self, prompts: &[(&[u32], &[u32])], run: RunOptions) -> Result<PendingConditioning> {
        let n = prompts.len();
        if n == 0 {
            bail!("no prompts to condition on");
        }
        let (d, q) = (self.llm_cfg.hidden_size, self.num_queries);
        let queries = self.openuni.tensor_f32("meta_queries", &[q, d].into())?.to_f32_vec();
        let segments = self.segments(prompts);
        let total: usize = segments.iter().sum();
        let mut embeds = Vec::with_capacity(total * d);
        for ids in prompts.iter().map(|p| p.1).chain(prompts.iter().map(|p| p.0)) {
            let rows: Vec<usize> = ids
                .iter()
                .map(|&i| {
                    let i = i as usize;
                    if i < self.llm_cfg.vocab_size {
                        Ok(i)
                    } else {
                        bail!("token id {i} is outside the LLM's vocabulary of {}", self.llm_cfg.vocab_size)
                    }
                })
                .collect::<Result<_>>()?;
            embeds.extend(self.llm.rows_f32(&format!("{}embed_tokens.weight", self.llm_prefix), &rows)?.to_f32_vec());
            embeds.extend_from_slice(&queries);
        }
        // The graph depends on the prompts' lengths, so its executor is made per call (on the
        // resident weights).
        let mut exec = self.new_executor(Stage::Conditioning, &self.conditioning_graph(&segments)?, run)?;
        exec.set_inputs(&HashMap::from([("inputs_embeds".to_string(), HostTensor::from_f32([1, total, d], embeds)?)]))?;
        exec.execute()?;
        Ok(PendingConditioning { exec, n })
    }

    /// Waits for a conditioning started by [`start_conditioning`](Self::start_conditioning).
    pub fn finish_conditioning(&self, mut p: PendingConditioning) -> Result<Conditioning> {
        let (n, q, d) = (p.n, self.num_queries, self.llm_cfg.hidden_size);
        let mut out = p.exec.outputs()?;
        let hidden = out.remove("hidden").expect("graph output").to_f32_vec();
        let half = n * q * d;
        Ok(Conditioning {
            prompt_embeds: out.remove("prompt_embeds").expect("graph output"),
            connector: out.remove("connector").expect("graph output"),
            hidden_uncond: HostTensor::from_f32([n, q, d], hidden[..half].to_vec())?,
            hidden_cond: HostTensor::from_f32([n, q, d], hidden[half..].to_vec())?,
        })
    }

    /// The caption path graph (projection, norm, every block's cross-attention K/V).
    fn caption_graph(&self, prompt_embeds: &Shape) -> Result<Graph> {
        let mut b = GraphBuilder::new();
        let enc = b.input("encoder_hidden_states", prompt_embeds.clone())?;
        let (_, kv) = sana::caption_path(&mut b, &self.transformer_cfg, enc)?;
        for (i, p) in kv.iter().enumerate() {
            b.output(&format!("cross_kv.{i}.k"), p.k)?;
            b.output(&format!("cross_kv.{i}.v"), p.v)?;
        }
        Ok(b.finish())
    }

    /// The caption path for `prompt_embeds`.
    fn cross_kv(&self, prompt_embeds: &HostTensor, run: RunOptions) -> Result<HashMap<String, HostTensor>> {
        let dims = prompt_embeds.shape.dims().to_vec();
        let inputs = HashMap::from([("encoder_hidden_states".to_string(), prompt_embeds.clone())]);
        self.with_executor(Stage::Transformer, "caption", &dims, run, false, || self.caption_graph(&prompt_embeds.shape), |e| e.run(&inputs))
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
    fn step_graph(&self, kv: &HashMap<String, Shape>, batch2: usize, h: usize, w: usize) -> Result<Graph> {
        let cfg = &self.transformer_cfg;
        let mut b = GraphBuilder::new();
        let x = b.input("hidden_states", [batch2, cfg.in_channels, h, w])?;
        let t = b.input("timestep", [batch2])?;
        let mut kv_inputs = vec![];
        for i in 0..cfg.num_layers {
            let (kn, vn) = (format!("cross_kv.{i}.k"), format!("cross_kv.{i}.v"));
            let k = b.input(&kn, kv[&kn].clone())?;
            let v = b.input(&vn, kv[&vn].clone())?;
            kv_inputs.push(sana::CrossKv { k, v });
        }
        // OpenUni's prompt mask is all ones, which is the same as no mask.
        let o = sana::denoise(&mut b, cfg, x, t, &kv_inputs, None, h, w)?;
        b.output("velocity", o.output)?;
        Ok(b.finish())
    }

    /// Generates `batches` one after another: the conditioning of batch i + 1 is started (on the
    /// device's second lane) before batch i is denoised, so on a GPU the two overlap. Each batch's
    /// decoded images [N, 3, H, W] go to `done(batch index, images)`; `on_step(N)` after each step.
    pub fn generate_batches(
        &self,
        batches: &[GenerationBatch],
        p: &SamplingParams,
        run: RunOptions,
        mut on_step: impl FnMut(usize),
        mut done: impl FnMut(usize, HostTensor) -> Result<()>,
    ) -> Result<()> {
        let start = |b: &GenerationBatch| {
            let pairs: Vec<(&[u32], &[u32])> = b.prompts.iter().map(|(c, u)| (&c[..], &u[..])).collect();
            self.start_conditioning(&pairs, run)
        };
        let mut next = match batches.first() {
            Some(b) => Some(start(b)?),
            None => return Ok(()),
        };
        for (i, b) in batches.iter().enumerate() {
            let cond = self.finish_conditioning(next.take().expect("started before"))?;
            if let Some(after) = batches.get(i + 1) {
                next = Some(start(after)?);
            }
            // No image is written from a non-finite value: each stage's output is checked, and the
            // first one holding NaN/Inf is named (NaN weights, an overflow, a bad config value).
            check_finite("conditioning: the LLM's query states", &cond.hidden_uncond, i)?;
            check_finite("conditioning: the LLM's query states", &cond.hidden_cond, i)?;
            check_finite("conditioning: the connector output", &cond.connector, i)?;
            check_finite("conditioning: the projector output (prompt embeddings)", &cond.prompt_embeds, i)?;
            let n = b.prompts.len();
            let (mut k, mut first_bad) = (0, None);
            let latents = self.denoise(&cond.prompt_embeds, &b.noise, p.steps, p.guidance, p.sampler, p.flow_shift, run, |r| {
                on_step(n);
                k += 1;
                if first_bad.is_none() {
                    let at = format!("denoise step {k} of {}", p.steps);
                    first_bad = check_finite(&format!("{at}: the transformer output (from its weights, the caption path's K/V or the latents fed in)"), &r.model_output, i)
                        .and_then(|_| check_finite(&format!("{at}: the guided sampler update (guidance {})", p.guidance), &r.latents, i))
                        .err();
                }
            })?;
            if let Some(e) = first_bad {
                return Err(e);
            }
            check_finite("the latents after denoising", &latents, i)?;
            let sf = self.vae_cfg.scaling_factor;
            let scaled = HostTensor::from_f32(latents.shape.clone(), latents.to_f32_vec().iter().map(|x| x / sf).collect())?;
            check_finite(&format!("the decoder input (the latents / the VAE's scaling_factor {sf})"), &scaled, i)?;
            let decoded = self.decode_with(&latents, run, p.decode)?;
            check_finite(&format!("decode: the VAE output (latents / scaling_factor {} decoded)", self.vae_cfg.scaling_factor), &decoded, i)?;
            done(i, decoded)?;
        }
        Ok(())
    }

    /// The sampling loop from `noise` [N, 32, h, w] with `prompt_embeds` [2N, Q, cc] (uncond rows
    /// first): each step runs the transformer once on the batch [uncond, cond] of all N images,
    /// guides in f32 and takes a sampler step; latents stay f32. The caption path runs once, its
    /// K/V stay on the device for every step, and on a GPU the step is a captured CUDA graph.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        prompt_embeds: &HostTensor,
        noise: &HostTensor,
        steps: usize,
        guidance: f32,
        sampler: SamplerKind,
        flow_shift: f64,
        run: RunOptions,
        mut on_step: impl FnMut(StepRecord),
    ) -> Result<HostTensor> {
        let cfg = &self.transformer_cfg;
        let nd = noise.shape.dims().to_vec();
        if nd.len() != 4 || nd[0] == 0 || nd[1] != cfg.in_channels {
            bail!("noise has shape {}, expected [N, {}, h, w]", noise.shape, cfg.in_channels);
        }
        let n = nd[0];
        let pe = prompt_embeds.shape.dims().to_vec();
        if pe.len() != 3 || pe[0] != 2 * n || pe[2] != cfg.caption_channels {
            bail!("prompt embeddings have shape {}, expected [{}, Q, {}] (uncond and cond rows of {n} images)", prompt_embeds.shape, 2 * n, cfg.caption_channels);
        }
        let (h, w) = (nd[2], nd[3]);
        let kv = self.cross_kv(prompt_embeds, run)?;
        let kv_shapes: HashMap<String, Shape> = kv.iter().map(|(k, v)| (k.clone(), v.shape.clone())).collect();
        let dims = [2 * n, cfg.in_channels, h, w];
        let capture = run.device != Device::Cpu;
        let mut solver = Sampler::with_kind(sampler, steps, flow_shift).map_err(anyhow::Error::msg)?;
        let mut latents = noise.to_f32_vec();
        let per = latents.len();
        let mut guided = vec![0f32; per];
        self.with_executor(Stage::Transformer, "step", &dims, run, capture, || self.step_graph(&kv_shapes, 2 * n, h, w), |e| {
            // The batch's K/V once; only the latents and the timestep change per step.
            e.set_inputs(&kv)?;
            while let Some(ts) = solver.timestep() {
                if self.stop_check.borrow().as_ref().is_some_and(|stop| stop()) {
                    return Err(Stopped.into());
                }
                let mut x2 = latents.clone();
                x2.extend_from_slice(&latents);
                // The transformer sees the timestep as f32, as SanaPipeline passes it.
                let inputs = HashMap::from([
                    ("hidden_states".to_string(), HostTensor::from_f32(dims, x2)?),
                    ("timestep".to_string(), HostTensor::from_f32([2 * n], vec![ts; 2 * n])?),
                ]);
                e.set_inputs(&inputs)?;
                e.execute()?;
                let v = e.outputs()?.remove("velocity").expect("graph output");
                let vv = v.to_f32_vec();
                guide(&vv[..per], &vv[per..], guidance, &mut guided);
                solver.step(&guided, &mut latents).map_err(anyhow::Error::msg)?;
                on_step(StepRecord { timestep: ts, model_output: v, latents: HostTensor::from_f32(noise.shape.clone(), latents.clone())? });
            }
            Ok(())
        })?;
        Ok(HostTensor::from_f32(noise.shape.clone(), latents)?)
    }

    /// `decoder(latents / scaling_factor)` -> [B, 3, H, W] in nominal [-1, 1], in one piece.
    pub fn decode(&self, latents: &HostTensor, run: RunOptions) -> Result<HostTensor> {
        self.check_latent(latents)?;
        self.decode_piece(latents.shape.clone(), latents.to_f32_vec(), run)
    }

    /// Decodes as `opts` asks: tiled when a tile size is set and the latent does not fit in one
    /// tile, else in one piece (`decode`).
    pub fn decode_with(&self, latents: &HostTensor, run: RunOptions, opts: DecodeOptions) -> Result<HostTensor> {
        match tiling(&self.vae_cfg, latents.shape.dims(), opts)? {
            Some(t) => self.decode_tiled(latents, run, t),
            None => self.decode(latents, run),
        }
    }

    fn check_latent(&self, latents: &HostTensor) -> Result<()> {
        let d = latents.shape.dims();
        let c = self.vae_cfg.latent_channels;
        if d.len() != 4 || d[1] != c {
            bail!("the latent has shape {}, expected [B, {c}, h, w] (the VAE's latent channels)", latents.shape);
        }
        if d[0] == 0 || d[2] == 0 || d[3] == 0 {
            bail!("the latent has shape {}: an empty latent cannot be decoded", latents.shape);
        }
        Ok(())
    }

    /// Decodes raw (unscaled) latents `values` of `shape` on the resident decoder executor.
    fn decode_piece(&self, shape: Shape, values: Vec<f32>, run: RunOptions) -> Result<HostTensor> {
        let inputs = HashMap::from([("latent".to_string(), self.scaled_latent(shape.clone(), values)?)]);
        let mut out = self.with_executor(Stage::Vae, "decoder", shape.dims(), run, false, || decoder_graph(&self.vae_cfg, &shape), |e| e.run(&inputs))?;
        Ok(out.remove("sample").expect("graph output"))
    }

    fn scaled_latent(&self, shape: Shape, values: Vec<f32>) -> Result<HostTensor> {
        let sf = self.vae_cfg.scaling_factor;
        Ok(HostTensor::from_f32(shape, values.iter().map(|x| x / sf).collect())?)
    }

    /// Tiled decode, exact up to summation order (docs/models.md, "DC-AE decoder"). DC-AE's attention is
    /// global, so the decoder's global part (conv_in and the attention stages, at most 1/8 of the
    /// image's resolution for the SANA VAEs) runs on the whole latent once. Its features are then
    /// cut into overlapping `tiling.tile`-pixel tiles for the local part (the high-resolution
    /// ResBlock stages, where the memory is), each tile reaching `tiling.context` pixels beyond
    /// the region it keeps; with the model's own context (`Tiling::new`) every kept pixel sees
    /// all it depends on, so the stitched image is the one-piece decode's: no seam, no blend.
    /// Tiles start every `tile - 2·context` pixels, the last one in each direction clamped to the
    /// edge, so every tile has one shape and one resident executor serves them all.
    pub fn decode_tiled(&self, latents: &HostTensor, run: RunOptions, tiling: Tiling) -> Result<HostTensor> {
        self.check_latent(latents)?;
        let Tiling { tile, context } = tiling;
        if tile <= 2 * context {
            bail!("decode tile of {tile} feature pixels keeps nothing of its own with {context} pixels of context on each side");
        }
        let d = latents.shape.dims().to_vec();
        let (bsz, h, w) = (d[0], d[2], d[3]);
        let split = self.vae_cfg.local_split();
        let (up, fh, fw, ch) = (split.upscale, h * split.grid, w * split.grid, split.channels);
        let (ph, pw) = (fh * up, fw * up);
        let npix = bsz
            .checked_mul(3)
            .and_then(|n| n.checked_mul(ph))
            .and_then(|n| n.checked_mul(pw))
            .filter(|&n| n <= isize::MAX as usize / 4)
            .with_context(|| format!("the latent {} decodes to an image too large to hold in memory", latents.shape))?;
        let inputs = HashMap::from([("latent".to_string(), self.scaled_latent(latents.shape.clone(), latents.to_f32_vec())?)]);
        let mut out = self.with_executor(Stage::Vae, "decoder.global", &d, run, false, || decoder_global_graph(&self.vae_cfg, &latents.shape), |e| e.run(&inputs))?;
        let features = out.remove("features").expect("graph output").to_f32_vec();
        let (th, tw) = (tile.min(fh), tile.min(fw));
        let (ys, xs) = (tile_starts(fh, tile, 2 * context), tile_starts(fw, tile, 2 * context));
        let (own_y, own_x) = (owned_spans(&ys, fh, context), owned_spans(&xs, fw, context));
        let mut image = vec![0f32; npix];
        for (&y0, &(oy0, oy1)) in ys.iter().zip(&own_y) {
            for (&x0, &(ox0, ox1)) in xs.iter().zip(&own_x) {
                let mut piece = Vec::with_capacity(bsz * th * tw * ch);
                for bi in 0..bsz {
                    for y in y0..y0 + th {
                        let row = (bi * fh + y) * fw;
                        piece.extend_from_slice(&features[(row + x0) * ch..(row + x0 + tw) * ch]);
                    }
                }
                let inputs = HashMap::from([("features".to_string(), HostTensor::from_f32([bsz, th * tw, ch], piece)?)]);
                let dims = [bsz, th, tw];
                let mut out = self.with_executor(Stage::Vae, "decoder.tile", &dims, run, false, || decoder_tile_graph(&self.vae_cfg, bsz, th, tw), |e| e.run(&inputs))?;
                let decoded = out.remove("sample").expect("graph output").to_f32_vec();
                let (tph, tpw) = (th * up, tw * up);
                let (cx0, cx1) = ((ox0 - x0) * up, (ox1 - x0) * up);
                for bc in 0..bsz * 3 {
                    for y in oy0 * up..oy1 * up {
                        let src = &decoded[(bc * tph + y - y0 * up) * tpw..][cx0..cx1];
                        image[(bc * ph + y) * pw + ox0 * up..][..cx1 - cx0].copy_from_slice(src);
                    }
                }
            }
        }
        Ok(HostTensor::from_f32([bsz, 3, ph, pw], image)?)
    }
}

/// The decoder graph for latents of `shape`.
fn decoder_graph(vae: &DcaeConfig, shape: &Shape) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    let z = b.input("latent", shape.clone())?;
    let o = dcae::decoder(&mut b, vae, z, "vae")?;
    b.output("sample", o.sample)?;
    Ok(b.finish())
}

/// The decoder's global part (conv_in and the attention stages) on latents of `shape`.
fn decoder_global_graph(vae: &DcaeConfig, shape: &Shape) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    let z = b.input("latent", shape.clone())?;
    let o = dcae::decoder_global(&mut b, vae, z, "vae")?;
    b.output("features", o.features)?;
    Ok(b.finish())
}

/// The decoder's local part on a tile of `batch` × `h`×`w` global features.
fn decoder_tile_graph(vae: &DcaeConfig, batch: usize, h: usize, w: usize) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    let x = b.input("features", [batch, h * w, vae.local_split().channels])?;
    let o = dcae::decoder_local(&mut b, vae, x, batch, h, w)?;
    b.output("sample", o.sample)?;
    Ok(b.finish())
}

/// The tiling `opts` asks for on latents of `dims`, or `None` when one tile would cover them.
fn tiling(vae: &DcaeConfig, dims: &[usize], opts: DecodeOptions) -> Result<Option<Tiling>> {
    let Some(px) = opts.tile else { return Ok(None) };
    let (t, grid) = (Tiling::new(vae, px)?, vae.local_split().grid);
    Ok((dims.len() == 4 && (dims[2] * grid > t.tile || dims[3] * grid > t.tile)).then_some(t))
}

/// The decode graphs a batch of `n` latents of `h`×`w` keeps resident as `opts` decodes: the
/// whole decoder, or its global part and one tile of the local part.
pub fn decode_graphs(vae: &DcaeConfig, n: usize, h: usize, w: usize, opts: DecodeOptions) -> Result<Vec<(&'static str, Graph)>> {
    let shape: Shape = [n, vae.latent_channels, h, w].into();
    Ok(match tiling(vae, shape.dims(), opts)? {
        None => vec![("decoder", decoder_graph(vae, &shape)?)],
        Some(t) => {
            let grid = vae.local_split().grid;
            vec![("decoder.global", decoder_global_graph(vae, &shape)?), ("decoder.tile", decoder_tile_graph(vae, n, t.tile.min(h * grid), t.tile.min(w * grid))?)]
        }
    })
}

/// Planned activation bytes of `g` with `dtype` storage: its arena, plus with bf16 the f32
/// staging of every input and output (the kernels' small workspaces are not counted).
pub fn planned_graph_bytes(g: &Graph, dtype: DType) -> usize {
    let arena = openuni_graph::plan(g, false).arena_elems * dtype.size_in_bytes();
    let staged: usize = g.inputs().map(|(id, _)| g.shape(id).numel()).chain(g.outputs.iter().map(|(_, id)| g.shape(*id).numel())).sum();
    arena + if dtype == DType::F32 { 0 } else { staged * 4 }
}

/// How the DC-AE decode is split: `tile: None` decodes in one piece, else tiles of that many
/// output pixels a side (the tile bounds the local part's memory; see `decode_tiled`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    pub tile: Option<usize>,
}

impl DecodeOptions {
    /// Images with a side above this many pixels are tiled by default.
    pub const AUTO_ABOVE_PX: usize = 1024;
    pub const DEFAULT_TILE_PX: usize = 512;

    /// From `--decode-tile PX` (a multiple of the VAE's upscale, larger than twice its context)
    /// for an image of `height`×`width` pixels. No flag: tiled with the default tile when a side
    /// exceeds `AUTO_ABOVE_PX`.
    pub fn from_flags(tile_px: Option<usize>, height: usize, width: usize, vae: &DcaeConfig) -> Result<DecodeOptions> {
        let large = height > Self::AUTO_ABOVE_PX || width > Self::AUTO_ABOVE_PX;
        let tile = match tile_px {
            Some(t) => t,
            None if large => Self::DEFAULT_TILE_PX,
            None => return Ok(DecodeOptions::default()),
        };
        Tiling::new(vae, tile)?;
        Ok(DecodeOptions { tile: Some(tile) })
    }
}

/// A tiled decode's geometry on the grid of the decoder's local part (`dcae::LocalSplit`):
/// tiles of `tile` pixels a side, each decoding `context` pixels beyond the region it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tiling {
    pub tile: usize,
    pub context: usize,
}

impl Tiling {
    /// Tiles of `tile_px` output pixels with the decoder's whole receptive field as context.
    pub fn new(vae: &DcaeConfig, tile_px: usize) -> Result<Tiling> {
        let (up, s) = (vae.upscale(), vae.local_split());
        if tile_px == 0 || tile_px % up != 0 {
            bail!("--decode-tile {tile_px} is not a positive multiple of {up} (one latent pixel is {up}x{up} pixels)");
        }
        let t = Tiling { tile: tile_px / s.upscale, context: s.context };
        if t.tile <= 2 * t.context {
            let ctx = t.context * s.upscale;
            bail!(
                "--decode-tile {tile_px} keeps no pixels of its own: each tile decodes {ctx} px of context on each side \
                 (the decoder's receptive field beyond its attention stages), so a tile must be larger than {} px",
                2 * ctx
            );
        }
        Ok(t)
    }
}

/// Start offsets of tiles of `tile` covering `n` with stride `tile - overlap`, the last one
/// clamped so that it ends at `n`; one tile at 0 when `n <= tile`.
pub fn tile_starts(n: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if n <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut v = vec![];
    let mut s = 0;
    while s + tile < n {
        v.push(s);
        s += stride;
    }
    v.push(n - tile);
    v
}

/// The span of `[0, n)` each tile starting at `starts` keeps: from `context` past its start (0 for
/// the first) to where the next one's begins (`n` for the last). With stride <= tile - 2·context
/// every kept pixel is at least `context` from its tile's inner edges.
pub fn owned_spans(starts: &[usize], n: usize, context: usize) -> Vec<(usize, usize)> {
    let lo = |i: usize| if i == 0 { 0 } else { starts[i] + context };
    (0..starts.len()).map(|i| (lo(i), if i + 1 < starts.len() { lo(i + 1) } else { n })).collect()
}

/// An error unless every value of `t` is finite: names the stage, the batch, what was found and
/// where to look (the stage's weights, `openuni verify --diff-nodes` to find the op).
pub fn check_finite(stage: &str, t: &HostTensor, batch: usize) -> Result<()> {
    let v = t.to_f32_vec();
    let Some(first) = v.iter().position(|x| !x.is_finite()) else { return Ok(()) };
    let (nan, inf) = v.iter().fold((0usize, 0usize), |(n, i), x| (n + x.is_nan() as usize, i + x.is_infinite() as usize));
    bail!(
        "non-finite values first appeared in {stage} (batch {batch}): {nan} NaN and {inf} infinite of {} values, the first at \
         flat index {first} of shape {} ({}); no image was written. A NaN/Inf weight or config value of that stage, or an \
         overflow, causes this: check the model files, and run `openuni verify CASE --diff-nodes` on a reference case \
         of the component to find the first diverging op",
        v.len(),
        t.shape,
        v[first]
    )
}

/// OpenUni's post-processing: `uint8(clamp(127.5·x + 128, 0, 255))` (the cast truncates), NCHW
/// [B, 3, H, W] -> NHWC bytes [B, H, W, 3].
pub fn to_uint8_nhwc(decoded: &HostTensor) -> Result<(Vec<u8>, [usize; 4])> {
    let d = decoded.shape.dims();
    if d.len() != 4 || d[1] != 3 {
        bail!("decoded image has shape {}, expected [B, 3, H, W]", decoded.shape);
    }
    let (b, h, w) = (d[0], d[2], d[3]);
    let x = decoded.to_f32_vec();
    let mut out = vec![0u8; b * h * w * 3];
    for bi in 0..b {
        for c in 0..3 {
            for p in 0..h * w {
                let v = (127.5 * x[(bi * 3 + c) * h * w + p] + 128.0).clamp(0.0, 255.0);
                out[(bi * h * w + p) * 3 + c] = v as u8;
            }
        }
    }
    Ok((out, [b, h, w, 3]))
}
