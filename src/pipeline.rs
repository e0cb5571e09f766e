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
use openuni_tensor::{read_pth, DType, HostTensor, Overlay, Shape, TensorMap, TensorSource, Weights};

use crate::exec::{executor, Device, GraphExecutor};

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

    /// `decoder(latents / scaling_factor)` -> [B, 3, H, W] in nominal [-1, 1], in one piece.
    pub fn decode(&self, latents: &HostTensor, run: RunOptions) -> Result<HostTensor> {
        self.check_latent(latents)?;
        let mut exec = self.decoder_exec(&latents.shape, run)?;
        self.decode_piece(exec.as_mut(), latents.shape.clone(), latents.to_f32_vec())
    }

    /// Decodes as `opts` asks: tiled when a tile size is set and the latent does not fit in one
    /// tile, else in one piece (`decode`).
    pub fn decode_with(&self, latents: &HostTensor, run: RunOptions, opts: DecodeOptions) -> Result<HostTensor> {
        let d = latents.shape.dims();
        match opts.tile {
            Some(t) if d.len() == 4 && (d[2] > t || d[3] > t) => self.decode_tiled(latents, run, t, opts.overlap),
            _ => self.decode(latents, run),
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

    /// An executor of the decoder graph for latents of `shape`.
    fn decoder_exec(&self, shape: &Shape, run: RunOptions) -> Result<Box<dyn GraphExecutor>> {
        let mut b = GraphBuilder::new();
        let z = b.input("latent", shape.clone())?;
        let o = dcae::decoder(&mut b, &self.vae_cfg, z, "vae")?;
        b.output("sample", o.sample)?;
        let g = b.finish();
        executor(run.device, &g, self.vae.as_ref(), run.dtype, false)
    }

    /// Runs `exec` on raw (unscaled) latents `values` of `shape`.
    fn decode_piece(&self, exec: &mut dyn GraphExecutor, shape: Shape, values: Vec<f32>) -> Result<HostTensor> {
        let sf = self.vae_cfg.scaling_factor;
        let scaled: Vec<f32> = values.iter().map(|x| x / sf).collect();
        let mut out = exec.run(&HashMap::from([("latent".to_string(), HostTensor::from_f32(shape, scaled)?)]))?;
        Ok(out.remove("sample").expect("graph output"))
    }

    /// Tiled decode (diffusers `enable_tiling` style) bounding the decoder's activation memory by
    /// the tile: `tile` and `overlap` are in latent pixels. Tiles start every `tile - overlap`
    /// latent pixels, the last one in each direction clamped to the edge (so every tile has the
    /// same shape and one graph serves them all); a dimension no larger than `tile` is one tile.
    /// Each tile is decoded with the whole batch, then blended in pixel space: on an edge shared
    /// with a neighbouring tile its weight ramps linearly from ~0 to 1 over `overlap · upscale`
    /// pixels (not at image borders), weights are separable (wy·wx), and the sum is normalised by
    /// the summed weights, so the result is a continuous mix with no seam. With one tile covering
    /// the latent the result is exactly `decode`'s.
    pub fn decode_tiled(&self, latents: &HostTensor, run: RunOptions, tile: usize, overlap: usize) -> Result<HostTensor> {
        self.check_latent(latents)?;
        if tile < 2 {
            bail!("decode tile of {tile} latent pixel(s): a tile needs at least 2 latent pixels ({} px)", 2 * self.vae_cfg.upscale());
        }
        if overlap >= tile {
            bail!("decode overlap of {overlap} latent pixels must be smaller than the tile of {tile}");
        }
        let d = latents.shape.dims().to_vec();
        let (bsz, c, h, w) = (d[0], d[1], d[2], d[3]);
        let up = self.vae_cfg.upscale();
        let (th, tw) = (tile.min(h), tile.min(w));
        let (ys, xs) = (tile_starts(h, tile, overlap), tile_starts(w, tile, overlap));
        let (ph, pw) = (h * up, w * up);
        let npix = bsz
            .checked_mul(3)
            .and_then(|n| n.checked_mul(ph))
            .and_then(|n| n.checked_mul(pw))
            .filter(|&n| n <= isize::MAX as usize / 4)
            .with_context(|| format!("the latent {} decodes to an image too large to hold in memory", latents.shape))?;
        let z = latents.to_f32_vec();
        let mut acc = vec![0f32; npix];
        let mut wsum = vec![0f32; ph * pw];
        // One executor per distinct tile shape (with clamped tiles there is only one).
        let mut execs: HashMap<(usize, usize), Box<dyn GraphExecutor>> = HashMap::new();
        for (iy, &y0) in ys.iter().enumerate() {
            let wy = ramp(th * up, overlap * up, iy > 0, iy + 1 < ys.len());
            for (ix, &x0) in xs.iter().enumerate() {
                let wx = ramp(tw * up, overlap * up, ix > 0, ix + 1 < xs.len());
                let mut piece = Vec::with_capacity(bsz * c * th * tw);
                for bc in 0..bsz * c {
                    for y in y0..y0 + th {
                        let row = (bc * h + y) * w;
                        piece.extend_from_slice(&z[row + x0..row + x0 + tw]);
                    }
                }
                let shape: Shape = [bsz, c, th, tw].into();
                let exec = match execs.entry((th, tw)) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(self.decoder_exec(&shape, run)?),
                };
                let out = self.decode_piece(exec.as_mut(), shape, piece)?.to_f32_vec();
                let (tph, tpw, py0, px0) = (th * up, tw * up, y0 * up, x0 * up);
                for (y, &a) in wy.iter().enumerate() {
                    for (x, &b) in wx.iter().enumerate() {
                        wsum[(py0 + y) * pw + px0 + x] += a * b;
                    }
                }
                for bc in 0..bsz * 3 {
                    for (y, &a) in wy.iter().enumerate() {
                        let src = &out[(bc * tph + y) * tpw..(bc * tph + y + 1) * tpw];
                        let dst = &mut acc[(bc * ph + py0 + y) * pw + px0..(bc * ph + py0 + y) * pw + px0 + tpw];
                        for ((o, &s), &b) in dst.iter_mut().zip(src).zip(&wx) {
                            *o += a * b * s;
                        }
                    }
                }
            }
        }
        for bc in 0..bsz * 3 {
            for (o, &s) in acc[bc * ph * pw..(bc + 1) * ph * pw].iter_mut().zip(&wsum) {
                *o /= s;
            }
        }
        Ok(HostTensor::from_f32([bsz, 3, ph, pw], acc)?)
    }
}

/// How the DC-AE decode is split, in latent pixels: `tile: None` decodes in one piece.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    pub tile: Option<usize>,
    pub overlap: usize,
}

impl DecodeOptions {
    /// Images with a side above this many pixels are tiled by default (like diffusers'
    /// `enable_tiling`: 512-px tiles, 448-px stride, 64-px blend).
    pub const AUTO_ABOVE_PX: usize = 1024;
    pub const DEFAULT_TILE_PX: usize = 512;
    pub const DEFAULT_OVERLAP_PX: usize = 64;

    /// From `--decode-tile PX` and `--decode-overlap PX` (pixels, multiples of the VAE's
    /// upscale `up`) for an image of `height`×`width` pixels. No tile flag: tiled with the
    /// defaults when a side exceeds `AUTO_ABOVE_PX` (or when only an overlap is given).
    pub fn from_flags(tile_px: Option<usize>, overlap_px: Option<usize>, height: usize, width: usize, up: usize) -> Result<DecodeOptions> {
        if let Some(t) = tile_px {
            if t == 0 || t % up != 0 {
                bail!("--decode-tile {t} is not a positive multiple of {up} (one latent pixel is {up}x{up} pixels)");
            }
            if t < 2 * up {
                bail!("--decode-tile {t} is smaller than 2 latent pixels ({} px), the smallest tile the decoder takes", 2 * up);
            }
        }
        if let Some(o) = overlap_px {
            if o % up != 0 {
                bail!("--decode-overlap {o} is not a multiple of {up} (one latent pixel is {up}x{up} pixels)");
            }
        }
        let large = height > Self::AUTO_ABOVE_PX || width > Self::AUTO_ABOVE_PX;
        let tile = match tile_px {
            Some(t) => t,
            None if large || overlap_px.is_some() => Self::DEFAULT_TILE_PX.div_ceil(up) * up,
            None => return Ok(DecodeOptions::default()),
        };
        // The default overlap: 64 px, at most half the tile.
        let overlap = overlap_px.unwrap_or_else(|| Self::DEFAULT_OVERLAP_PX.min(tile / 2) / up * up);
        if overlap >= tile {
            bail!("--decode-overlap {overlap} must be smaller than the decode tile {tile} (--decode-tile)");
        }
        Ok(DecodeOptions { tile: Some(tile / up), overlap: overlap / up })
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

/// A tile's blend weights along one axis of `len` pixels: 1, ramping linearly over `blend`
/// pixels at an edge shared with a neighbour (`(i + 0.5) / blend`, so that two regularly spaced
/// tiles' weights sum to exactly 1 across their overlap).
fn ramp(len: usize, blend: usize, before: bool, after: bool) -> Vec<f32> {
    let mut w = vec![1f32; len];
    let blend = blend.min(len);
    for i in 0..blend {
        let r = (i as f32 + 0.5) / blend as f32;
        if before {
            w[i] *= r;
        }
        if after {
            w[len - 1 - i] *= r;
        }
    }
    w
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
