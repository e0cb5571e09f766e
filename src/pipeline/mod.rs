//! OpenUni text-to-image, end to end (docs/architecture.md, "One generation";
//! docs/models.md): prompt ids ->
//! LLM with meta-queries -> connector -> projector -> SANA with CFG and DPM-Solver++ -> DC-AE ->
//! uint8 pixels. Each stage is its own graph, built by its model in `crates/models` (the OpenUni
//! head by `openuni::Head`); what depends only on the prompt (the caption path's K/V) runs once
//! per batch.

mod assembly;
mod decode;
mod resident;
mod sampling;

use std::cell::{Cell, RefCell};
use std::path::Path;

use anyhow::Result;
use openuni_models::connector::ConnectorConfig;
use openuni_models::dcae::DcaeConfig;
use openuni_models::qwen2::Qwen2Config;
use openuni_models::sana::SanaConfig;
use openuni_models::scheduler::SamplerKind;
use openuni_tensor::{DType, HostTensor, Shape, TensorSource};

use crate::exec::{Device, TensorHandle};

pub use crate::image::to_uint8_nhwc;
pub use assembly::{graph_dtype, open_weights, planned_graph_bytes, MemoryPlan};
pub use decode::{
    decode_graphs, decoder_input_graph, pipeline_decoder_graph, DecodeOptions, DENOISED, IMAGE_U8,
};
pub use openuni_models::dcae::{owned_spans, tile_starts, Tiling};
use resident::Resident;
pub use resident::Stage;
pub use sampling::{check_finite, nonfinite_flag, StopCheck, Stopped};

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
    /// Whether [`generate_batches`](Self::generate_batches) releases the LLM once its batches are
    /// conditioned (see [`set_release_stages`](Self::set_release_stages)).
    release_stages: Cell<bool>,
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
    pub noise: LatentNoise,
}

/// A batch's initial latents [N, C, h, w].
#[derive(Clone, Debug)]
pub enum LatentNoise {
    /// Given values (a reference case's, a caller's own), uploaded once per batch.
    Values(HostTensor),
    /// Image i's noise drawn from `seeds[i]` where the sampler runs (on a GPU the device;
    /// `Op::GaussianNoise`, the same bits on every device as [`seeded_noise`]).
    Seeded {
        seeds: Vec<u64>,
        channels: usize,
        height: usize,
        width: usize,
    },
}

impl LatentNoise {
    pub fn seeded(seeds: Vec<u64>, channels: usize, height: usize, width: usize) -> LatentNoise {
        LatentNoise::Seeded {
            seeds,
            channels,
            height,
            width,
        }
    }

    pub fn shape(&self) -> Shape {
        match self {
            LatentNoise::Values(t) => t.shape.clone(),
            LatentNoise::Seeded {
                seeds,
                channels,
                height,
                width,
            } => Shape::from([seeds.len(), *channels, *height, *width]),
        }
    }

    /// The values on the host (seeded noise drawn by the CPU twin).
    pub fn to_host(&self) -> Result<HostTensor> {
        match self {
            LatentNoise::Values(t) => Ok(t.clone()),
            LatentNoise::Seeded {
                seeds,
                channels,
                height,
                width,
            } => {
                let per = channels * height * width;
                let mut v = vec![];
                for &s in seeds {
                    v.extend(seeded_noise(s, per));
                }
                Ok(HostTensor::from_f32(
                    [seeds.len(), *channels, *height, *width],
                    v,
                )?)
            }
        }
    }
}

/// The seeded noise's generator, kept in every image's PNG text chunks ("noise"): an image
/// made by an earlier generator (without the chunk) is made again, not kept as if the seed gave it.
pub const NOISE_GENERATOR: &str = "philox4x32-10 box-muller";

/// `n` standard-normal values from `seed`: what `Op::GaussianNoise` draws for it on any device
/// (its CPU twin, `openuni_cpu::ops::gaussian_noise`: Philox4x32-10 and Box–Muller).
pub fn seeded_noise(seed: u64, n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    openuni_cpu::ops::gaussian_noise(&openuni_graph::seed::limbs(seed), n, &mut v);
    v
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

/// A conditioning enqueued by [`OpenUni::start_conditioning`] on the resident executor of its
/// prompts' segment lengths.
pub struct PendingConditioning {
    segments: Vec<usize>,
    run: RunOptions,
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
    /// `prompt_embeds` where the conditioning left them (on a GPU: its output on the device, which
    /// keeps the conditioning's memory alive), so that the caption path reads them without a host
    /// round trip; `condition_batch` gives a host copy instead.
    pub prompt_embeds_on_device: TensorHandle,
}

/// Per-step values a caller may want to see (verification, progress).
pub struct StepRecord {
    pub timestep: f32,
    /// The raw transformer output [2N, 32, h, w] before guidance, where it lies (on a GPU the
    /// device; `to_host` reads it, valid during the callback).
    pub model_output: crate::exec::TensorHandle,
    /// The latents after the step [N, 32, h, w] (f32), where they lie.
    pub latents: crate::exec::TensorHandle,
}
