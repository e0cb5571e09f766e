//! The flags of `openuni serve`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::{serve, ServeOptions};
use crate::exec::{parse_dtype, Device};
use crate::generate::{variant, ModelFlags};

/// `openuni serve`: an OpenAI-compatible image server with dynamic batching.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// b-512, l-512 or l-1024 (models found as `generate` finds them; the built-in tiny model
    /// when none is configured or cached).
    #[arg(long, default_value = "b-512")]
    pub variant: String,
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long)]
    pub mllm: Option<PathBuf>,
    #[arg(long)]
    pub transformer: Option<PathBuf>,
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// cpu, cuda, cuda:N, or emu (the emulated GPU).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// bf16 or f32 (the CPU runs f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Address to bind: loopback unless told otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the bound address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// How long the oldest waiting request waits for others to share its batch.
    #[arg(long, default_value_t = 20)]
    pub batch_window_ms: u64,
    /// Images per batch. Default: on a GPU the largest batch of the variant's size that fits by
    /// the memory plan (at most 32); on the CPU 8.
    #[arg(long)]
    pub max_batch: Option<usize>,
    /// Requests waiting at most; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: $OPENUNI_API_KEY if set).
    #[arg(long, env = "OPENUNI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds a request may take from arrival to its images (then 504).
    #[arg(long, default_value_t = 300.0)]
    pub deadline_s: f64,
    /// Largest request body in bytes (then 413).
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Largest side of a requested image in pixels, bounding one request's memory (default:
    /// twice the model's size: 1024 px for the 512-px variants, 2048 for l-1024).
    #[arg(long, value_name = "PX")]
    pub max_side: Option<usize>,
    /// Default steps of a request without `steps`.
    #[arg(long, default_value_t = openuni_models::variant::DEFAULT_STEPS)]
    pub steps: usize,
    /// Default guidance of a request without `guidance_scale`.
    #[arg(long, default_value_t = 4.5)]
    pub guidance: f32,
    /// Default sampler of a request without `sampler`: dpm-solver or euler.
    #[arg(long, default_value = "dpm-solver")]
    pub sampler: String,
    /// The InternVL3 folder (with its vision tower) that answers POST /v1/chat/completions
    /// (default: the variant's LLM folder; the built-in tiny chat model with the built-in model).
    #[arg(long, value_name = "DIR")]
    pub chat_model: Option<PathBuf>,
    /// Largest chat request body in bytes (images come inline as base64), then 413.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_chat_body_bytes: usize,
}

pub fn run(a: ServeArgs) -> Result<()> {
    if !(a.deadline_s.is_finite() && a.deadline_s > 0.0) {
        anyhow::bail!(
            "--deadline-s {} is not a positive number of seconds",
            a.deadline_s
        );
    }
    let sampler = openuni_models::scheduler::SamplerKind::parse(&a.sampler).ok_or_else(|| {
        anyhow::anyhow!("--sampler `{}` is not one of dpm-solver, euler", a.sampler)
    })?;
    serve(ServeOptions {
        variant: variant(&a.variant)?,
        models: ModelFlags {
            checkpoint: a.checkpoint,
            mllm: a.mllm,
            transformer: a.transformer,
            vae: a.vae,
        },
        device: Device::parse(&a.device)?,
        dtype: parse_dtype(&a.dtype)?,
        host: a.host,
        port: a.port,
        batch_window: Duration::from_millis(a.batch_window_ms),
        max_batch: a.max_batch,
        queue: a.queue,
        api_key: a.api_key.filter(|k| !k.is_empty()),
        deadline: Duration::from_secs_f64(a.deadline_s),
        max_body_bytes: a.max_body_bytes,
        max_side: a.max_side,
        steps: a.steps,
        guidance: a.guidance,
        sampler,
        chat_model: a.chat_model,
        max_chat_body_bytes: a.max_chat_body_bytes,
    })
}
