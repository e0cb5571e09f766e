//! OpenUni text-to-image, end to end (spec/openuni.md §1, sana_dcae.md §4): prompt ids ->
//! LLM with meta-queries -> connector -> projector -> SANA with CFG and DPM-Solver++ -> DC-AE ->
//! uint8 pixels. Each stage is its own graph; what depends only on the prompt (the caption path
//! and every block's cross-attention K/V) runs once per generation, the step graph once per step.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use openuni_graph::GraphBuilder;
use openuni_models::config::read_json;
use openuni_models::connector::{self, ConnectorConfig};
use openuni_models::dcae::{self, DcaeConfig};
use openuni_models::qwen2::{self, Qwen2Config};
use openuni_models::sana::{self, SanaConfig};
use openuni_models::scheduler::{guide, Sampler, SamplerKind};
use openuni_tensor::{read_pth, DType, HostTensor, Overlay, TensorMap, TensorSource, Weights};

use crate::exec::{executor, Device};

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
}

/// The key by which a fine-tuned OpenUni checkpoint is recognised: it carries the whole SANA
/// transformer under `transformer.` (spec/openuni.md §4).
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

/// The conditioning of one prompt: rows ordered [uncond, cond].
pub struct Conditioning {
    /// [2, Q, caption_channels]
    pub prompt_embeds: HostTensor,
    /// The LLM's last Q hidden states after the final norm, [1, Q, D] each.
    pub hidden_uncond: HostTensor,
    pub hidden_cond: HostTensor,
    /// The connector output [2, Q, D].
    pub connector: HostTensor,
}

/// Per-step values a caller may want to see (verification, progress).
pub struct StepRecord {
    pub timestep: f32,
    /// The raw transformer output [2, 32, h, w] before guidance.
    pub model_output: HostTensor,
    /// The latents after the step [1, 32, h, w].
    pub latents: HostTensor,
}

fn ctx_path(p: &Path) -> String {
    p.display().to_string()
}

impl OpenUni {
    pub fn load(paths: &ModelPaths, connector_cfg: ConnectorConfig) -> Result<OpenUni> {
        let llm_cfg_path = paths.llm.join("config.json");
        // An InternVL3 folder nests the Qwen2 config under `llm_config`.
        let raw: serde_json::Value = read_json(&llm_cfg_path)?;
        let llm_cfg: Qwen2Config = serde_json::from_value(raw.get("llm_config").cloned().unwrap_or(raw))
            .with_context(|| format!("{}: not a Qwen2 (or InternVL3 llm_config) config", llm_cfg_path.display()))?;
        llm_cfg.validate(&ctx_path(&llm_cfg_path))?;
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
        let transformer_cfg: SanaConfig = read_json(&tcfg_path)?;
        transformer_cfg.validate(&ctx_path(&tcfg_path))?;
        let vcfg_path = paths.vae.join("config.json");
        let vae_cfg: DcaeConfig = read_json(&vcfg_path)?;
        vae_cfg.validate(&ctx_path(&vcfg_path))?;
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
        })
    }

    /// The transformer's weights: a fine-tuned checkpoint's `transformer.*` over the diffusers folder.
    pub fn transformer(&self) -> Box<dyn TensorSource + '_> {
        if self.openuni.contains(FINETUNED_PROBE) {
            Box::new(Overlay { top: self.openuni.as_ref(), prefix: "transformer.".into(), base: self.transformer_base.as_ref() })
        } else {
            Box::new(self.transformer_base.as_ref())
        }
    }

    /// The LLM over `ids` ++ meta-queries (one unpadded causal row), returning the last Q hidden
    /// states after the final norm [1, Q, D].
    fn llm_queries(&self, ids: &[u32], run: RunOptions) -> Result<HostTensor> {
        let (d, q) = (self.llm_cfg.hidden_size, self.num_queries);
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
        let mut embeds = self.llm.rows_f32(&format!("{}embed_tokens.weight", self.llm_prefix), &rows)?.to_f32_vec();
        embeds.extend(self.openuni.tensor_f32("meta_queries", &[q, d].into())?.to_f32_vec());
        let t = ids.len() + q;
        let mut b = GraphBuilder::new();
        let x = b.input("inputs_embeds", [1, t, d])?;
        let out = qwen2::build(&mut b, &self.llm_cfg, self.llm_prefix, x, "llm")?;
        let last = b.slice_tokens("queries", out.hidden_states, ids.len(), q)?;
        b.output("queries", last)?;
        let g = b.finish();
        let mut exec = executor(run.device, &g, self.llm.as_ref(), run.dtype, false)?;
        let inputs = HashMap::from([("inputs_embeds".to_string(), HostTensor::from_f32([1, t, d], embeds)?)]);
        Ok(exec.run(&inputs)?.remove("queries").expect("graph output"))
    }

    /// Prompt ids (cond, uncond) -> prompt embeddings [2, Q, caption_channels], [uncond, cond].
    pub fn condition(&self, ids_cond: &[u32], ids_uncond: &[u32], run: RunOptions) -> Result<Conditioning> {
        let hidden_cond = self.llm_queries(ids_cond, run)?;
        let hidden_uncond = self.llm_queries(ids_uncond, run)?;
        let (d, q) = (self.llm_cfg.hidden_size, self.num_queries);
        let mut both = hidden_uncond.to_f32_vec();
        both.extend(hidden_cond.to_f32_vec());
        let cc = self.transformer_cfg.caption_channels;
        let mut b = GraphBuilder::new();
        let x = b.input("queries", [2, q, d])?;
        let layers = connector::build(&mut b, &self.connector_cfg, "connector.", x, "connector")?;
        let c = *layers.last().unwrap_or(&x);
        let pw = b.weight("projector.weight", [cc, d])?;
        let pb = b.weight("projector.bias", [cc])?;
        let e = b.linear("projector", c, pw, Some(pb))?;
        b.output("connector", c)?;
        b.output("prompt_embeds", e)?;
        let g = b.finish();
        let mut exec = executor(run.device, &g, self.openuni.as_ref(), run.dtype, false)?;
        let mut out = exec.run(&HashMap::from([("queries".to_string(), HostTensor::from_f32([2, q, d], both)?)]))?;
        Ok(Conditioning {
            prompt_embeds: out.remove("prompt_embeds").expect("graph output"),
            connector: out.remove("connector").expect("graph output"),
            hidden_uncond,
            hidden_cond,
        })
    }

    /// The sampling loop from `noise` [1, 32, h, w]: each step runs the transformer once on the
    /// batch [uncond, cond], guides in f32 and takes a DPM-Solver++ step; latents stay f32.
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
        if nd.len() != 4 || nd[0] != 1 || nd[1] != cfg.in_channels {
            bail!("noise has shape {}, expected [1, {}, h, w]", noise.shape, cfg.in_channels);
        }
        let pe = prompt_embeds.shape.dims().to_vec();
        if pe.len() != 3 || pe[0] != 2 || pe[2] != cfg.caption_channels {
            bail!("prompt embeddings have shape {}, expected [2, Q, {}]", prompt_embeds.shape, cfg.caption_channels);
        }
        let (h, w) = (nd[2], nd[3]);

        // Once per generation: caption projection + norm and every block's cross-attention K/V.
        let mut b = GraphBuilder::new();
        let enc = b.input("encoder_hidden_states", prompt_embeds.shape.clone())?;
        let (_, kv) = sana::caption_path(&mut b, cfg, enc)?;
        for (i, p) in kv.iter().enumerate() {
            b.output(&format!("cross_kv.{i}.k"), p.k)?;
            b.output(&format!("cross_kv.{i}.v"), p.v)?;
        }
        let caption = b.finish();
        let weights = self.transformer();
        let mut exec = executor(run.device, &caption, weights.as_ref(), run.dtype, false)?;
        let kv_values = exec.run(&HashMap::from([("encoder_hidden_states".to_string(), prompt_embeds.clone())]))?;

        // The step graph reads them as inputs.
        let mut b = GraphBuilder::new();
        let x = b.input("hidden_states", [2, cfg.in_channels, h, w])?;
        let t = b.input("timestep", [2])?;
        let mut kv_inputs = vec![];
        for i in 0..cfg.num_layers {
            let (kn, vn) = (format!("cross_kv.{i}.k"), format!("cross_kv.{i}.v"));
            let k = b.input(&kn, kv_values[&kn].shape.clone())?;
            let v = b.input(&vn, kv_values[&vn].shape.clone())?;
            kv_inputs.push(sana::CrossKv { k, v });
        }
        // OpenUni's prompt mask is all ones, which is the same as no mask.
        let o = sana::denoise(&mut b, cfg, x, t, &kv_inputs, None, h, w)?;
        b.output("velocity", o.output)?;
        let step_graph = b.finish();
        let mut step_exec = executor(run.device, &step_graph, weights.as_ref(), run.dtype, false)?;
        let mut inputs: HashMap<String, HostTensor> = kv_values;

        let mut solver = Sampler::with_kind(sampler, steps, flow_shift).map_err(anyhow::Error::msg)?;
        let mut latents = noise.to_f32_vec();
        let per = latents.len();
        let mut guided = vec![0f32; per];
        while let Some(ts) = solver.timestep() {
            let mut x2 = latents.clone();
            x2.extend_from_slice(&latents);
            inputs.insert("hidden_states".into(), HostTensor::from_f32([2, cfg.in_channels, h, w], x2)?);
            // The transformer sees the timestep as f32, as SanaPipeline passes it.
            inputs.insert("timestep".into(), HostTensor::from_f32([2], vec![ts; 2])?);
            let v = step_exec.run(&inputs)?.remove("velocity").expect("graph output");
            let vv = v.to_f32_vec();
            guide(&vv[..per], &vv[per..], guidance, &mut guided);
            solver.step(&guided, &mut latents).map_err(anyhow::Error::msg)?;
            on_step(StepRecord { timestep: ts, model_output: v, latents: HostTensor::from_f32(noise.shape.clone(), latents.clone())? });
        }
        Ok(HostTensor::from_f32(noise.shape.clone(), latents)?)
    }

    /// `decoder(latents / scaling_factor)` -> [B, 3, H, W] in nominal [-1, 1].
    pub fn decode(&self, latents: &HostTensor, run: RunOptions) -> Result<HostTensor> {
        let sf = self.vae_cfg.scaling_factor;
        let scaled: Vec<f32> = latents.to_f32_vec().iter().map(|x| x / sf).collect();
        let mut b = GraphBuilder::new();
        let z = b.input("latent", latents.shape.clone())?;
        let o = dcae::decoder(&mut b, &self.vae_cfg, z, "vae")?;
        b.output("sample", o.sample)?;
        let g = b.finish();
        let mut exec = executor(run.device, &g, self.vae.as_ref(), run.dtype, false)?;
        let mut out = exec.run(&HashMap::from([("latent".to_string(), HostTensor::from_f32(latents.shape.clone(), scaled)?)]))?;
        Ok(out.remove("sample").expect("graph output"))
    }
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
