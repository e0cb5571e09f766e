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

use openuni_models::connector::ConnectorConfig;
use openuni_models::dcae::DcaeConfig;
use openuni_models::qwen2::Qwen2Config;
use openuni_models::sana::SanaConfig;
use openuni_models::scheduler::SamplerKind;
use openuni_tensor::{DType, HostTensor, TensorSource};

use crate::exec::{Device, TensorHandle};

pub use crate::image::to_uint8_nhwc;
pub use assembly::{graph_dtype, open_weights, planned_graph_bytes, MemoryPlan};
pub use decode::{decode_graphs, decoder_input_graph, pipeline_decoder_graph, DecodeOptions, DENOISED, IMAGE_U8};
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
