//! `openuni serve`: an OpenAI-compatible image and chat server with dynamic batching.
//!
//! tokio + axum answer HTTP; one worker thread owns the image model (its resident weights and
//! executors) and generates batches formed by [`batcher`]; another owns the understanding model
//! and answers chat requests one at a time ([`chat`]). Endpoints: `POST /v1/images/generations`,
//! `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics`.
//! Limits: bounded queues (503 with Retry-After when full), a per-request deadline (504), request
//! body limits (413), cancellation of requests whose client disconnected (dropped before their
//! batch starts; in a running batch their rows leave at the next denoising step; a chat answer
//! stops at its next token), an optional API key compared in constant time, graceful shutdown on
//! SIGTERM or ctrl-c that finishes admitted work.

pub mod api;
pub mod batcher;
pub mod chat;
pub mod cli;
pub mod metrics;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openuni_models::prompt::{PromptIds, PromptTokenizer};
use openuni_models::scheduler::SamplerKind;
use openuni_models::variant::Variant;
use openuni_tensor::DType;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use crate::exec::Device;
use crate::generate::{flow_shift, resolve, ModelFlags};
use crate::pipeline::{DecodeOptions, ModelPaths, OpenUni, RunOptions};
use api::{ApiError, Limits};
use batcher::{BatchPolicy, Job, Queue, Worker};
use metrics::Metrics;

/// Everything `openuni serve` is told.
pub struct ServeOptions {
    pub variant: &'static Variant,
    pub models: ModelFlags,
    pub device: Device,
    pub dtype: DType,
    pub host: String,
    /// 0: any free port (the bound address is printed).
    pub port: u16,
    pub batch_window: Duration,
    /// Images per batch; `None`: on a GPU the largest batch of the default size that the memory
    /// plan fits (at most 32), on the CPU 8.
    pub max_batch: Option<usize>,
    /// Requests admitted and waiting at most; more get 503.
    pub queue: usize,
    pub api_key: Option<String>,
    pub deadline: Duration,
    pub max_body_bytes: usize,
    /// Largest side of a requested image; `None`: twice the model's default size.
    pub max_side: Option<usize>,
    pub steps: usize,
    pub guidance: f32,
    pub sampler: SamplerKind,
    /// The InternVL3 folder chat answers with; `None`: the variant's LLM folder (the built-in
    /// tiny chat model with the built-in tiny model).
    pub chat_model: Option<std::path::PathBuf>,
    /// Largest chat request body in bytes (images come inline).
    pub max_chat_body_bytes: usize,
}

/// What the handlers share.
struct AppState {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    tokenizer: PromptTokenizer,
    max_tokens: usize,
    limits: Limits,
    api_key: Option<Vec<u8>>,
    deadline: Duration,
    /// The chat endpoint's service, or why chat is off.
    chat: chat::Chat,
}

/// The model loaded by the worker thread, as the server needs to know it.
struct Loaded {
    max_tokens: usize,
    size_multiple: usize,
    max_batch: usize,
}

/// Runs the server until SIGTERM or ctrl-c, then finishes admitted requests and returns.
pub fn serve(o: ServeOptions) -> Result<()> {
    if o.queue == 0 {
        bail!("--queue must be at least 1");
    }
    if o.max_batch == Some(0) {
        bail!("--max-batch must be at least 1");
    }
    if o.max_side == Some(0) {
        bail!("--max-side must be positive");
    }
    if o.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if o.device == Device::Cpu && o.dtype != DType::F32 {
        bail!(
            "--device cpu runs the f32 reference only; --dtype {} needs --device cuda or emu",
            o.dtype
        );
    }
    let loopback = o.host == "localhost"
        || o.host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback && o.api_key.is_none() {
        eprintln!("warning: --host {} serves beyond this machine without an API key (--api-key or $OPENUNI_API_KEY)", o.host);
    }
    let resolved = resolve(o.variant, &o.models)?;
    if resolved.builtin {
        eprintln!("note: no OpenUni weights configured or cached; serving the built-in tiny random model. Its pictures are not meaningful.");
    }
    let model_id = if resolved.builtin {
        "openuni-tiny".to_string()
    } else {
        format!("openuni-{}", o.variant.name)
    };
    let tokenizer = PromptTokenizer::from_dir(&resolved.llm)?;
    // Chat answers with the variant's InternVL3 when its folder has the vision tower.
    let chat_dir = o
        .chat_model
        .clone()
        .or_else(|| (!resolved.builtin).then(|| resolved.llm.clone()));
    let chat_id = if resolved.builtin && o.chat_model.is_none() {
        "openuni-tiny-chat".to_string()
    } else {
        format!("{model_id}-chat")
    };
    let metrics = Arc::new(Metrics::new());
    let queue = Arc::new(Queue::new(o.queue, metrics.clone()));

    // The model lives on the worker thread from load to drop: its executors are not shared.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Loaded>>();
    let worker = {
        let (queue, metrics) = (queue.clone(), metrics.clone());
        let run = RunOptions {
            device: o.device,
            dtype: o.dtype,
        };
        let (window, requested_batch, default_size) =
            (o.batch_window, o.max_batch, resolved.default_size);
        std::thread::Builder::new()
            .name("openuni-worker".into())
            .spawn(move || {
                let loaded = (|| -> Result<Worker> {
                    let paths = ModelPaths {
                        llm: &resolved.llm,
                        openuni: &resolved.openuni,
                        transformer: &resolved.transformer,
                        vae: &resolved.vae,
                    };
                    let model = OpenUni::load(&paths, resolved.connector.clone())?;
                    let max_batch = match requested_batch {
                        Some(b) => b,
                        None => default_max_batch(&model, run, default_size),
                    };
                    let policy = BatchPolicy { window, max_batch };
                    Ok(Worker {
                        flow_shift: flow_shift(&resolved.transformer)?,
                        model,
                        run,
                        metrics,
                        policy,
                    })
                })();
                match loaded {
                    Ok(w) => {
                        let info = Loaded {
                            max_tokens: w
                                .model
                                .llm_cfg
                                .max_position_embeddings
                                .saturating_sub(w.model.num_queries),
                            size_multiple: w.model.vae_cfg.upscale(),
                            max_batch: w.policy.max_batch,
                        };
                        let _ = ready_tx.send(Ok(info));
                        w.serve(&queue);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?
    };
    let loaded = ready_rx
        .recv()
        .context("the worker thread stopped while loading the model")??;
    let chat = chat::start(
        chat_dir,
        o.device,
        o.dtype,
        o.queue,
        chat_id,
        metrics.clone(),
    );
    match &chat {
        Ok(c) => eprintln!(
            "openuni serve: chat with {} (POST /v1/chat/completions)",
            c.limits.model_id
        ),
        Err(why) => eprintln!("note: chat is off: {why}"),
    }
    let limits = Limits {
        model_id,
        default_size: resolved.default_size,
        size_multiple: loaded.size_multiple,
        max_side: o.max_side.unwrap_or(2 * resolved.default_size),
        max_n: loaded.max_batch.min(10),
        max_steps: MAX_STEPS,
        max_prompt_chars: MAX_PROMPT_CHARS,
        default_steps: o.steps,
        default_guidance: o.guidance,
        default_sampler: o.sampler,
    };
    let state = Arc::new(AppState {
        queue: queue.clone(),
        metrics,
        tokenizer,
        max_tokens: loaded.max_tokens,
        limits,
        api_key: o.api_key.map(String::into_bytes),
        deadline: o.deadline,
        chat,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((o.host.as_str(), o.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", o.host, o.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        println!(
            "openuni serve: {} on {} {}, max batch {}, listening on http://{addr}",
            state.limits.model_id, o.device, o.dtype, loaded.max_batch
        );
        std::io::stdout().flush()?;
        axum::serve(
            listener,
            router(state.clone(), o.max_body_bytes, o.max_chat_body_bytes),
        )
        .with_graceful_shutdown(shutdown_signal())
        .await?;
        anyhow::Ok(())
    });
    // Every connection is finished; the worker drains what is left (nothing, normally) and stops.
    queue.close();
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the worker thread panicked outside a batch"))?;
    eprintln!("openuni serve: stopped");
    served
}

const MAX_STEPS: usize = 1000;
const MAX_PROMPT_CHARS: usize = 8000;

/// Default images per batch: on a GPU the largest batch of `size`² images whose planned memory
/// (with a quarter more for workspaces, as `generate`'s advice) fits in free memory, at most 32;
/// on the CPU 8 (larger batches give no more images/s there).
fn default_max_batch(model: &OpenUni, run: RunOptions, size: usize) -> usize {
    if run.device == Device::Cpu {
        return 8;
    }
    let up = model.vae_cfg.upscale();
    let (lh, lw) = (size / up, size / up);
    let Ok(free) = crate::exec::open_device(run.device)
        .and_then(|d| Ok(d.memory_info()?))
        .map(|(f, _)| f)
    else {
        return 1;
    };
    let weights = model.planned_weight_bytes(lh, lw, run.dtype).unwrap_or(0);
    let decode = DecodeOptions::from_flags(None, size, size, &model.vae_cfg).unwrap_or_default();
    let need = |k: usize| {
        model
            .planned_batch_bytes(k, lh, lw, run.dtype, decode)
            .map(|b| b + b / 4 + weights)
            .unwrap_or(usize::MAX)
    };
    (1..=32).rev().find(|&k| need(k) <= free).unwrap_or(1)
}

fn router(state: Arc<AppState>, max_body: usize, max_chat_body: usize) -> Router {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/chat/completions", post(chat::completions).layer(DefaultBodyLimit::max(max_chat_body)))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such endpoint; see /v1/images/generations, /v1/chat/completions, /v1/models, /health, /metrics") })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Resolves on ctrl-c or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("openuni serve: shutting down; finishing admitted requests");
}

/// `Authorization: Bearer KEY` against the configured key, compared in constant time.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(key)) {
        Ok(())
    } else {
        let e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key: send `Authorization: Bearer KEY`",
        );
        state.metrics.error(e.metric_kind());
        Err(e)
    }
}

async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let mut data = vec![
        json!({"id": state.limits.model_id, "object": "model", "created": 0, "owned_by": "openuni"}),
    ];
    if let Ok(c) = &state.chat {
        data.push(json!({"id": c.limits.model_id, "object": "model", "created": 0, "owned_by": "openuni"}));
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Marks its request cancelled when dropped before `done`: the client went away (hyper drops
/// the handler's future) or the deadline passed. The worker then skips the request.
struct CancelOnDrop {
    flag: Arc<AtomicBool>,
    done: bool,
    metrics: Arc<Metrics>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.flag.store(true, Ordering::Relaxed);
            self.metrics.error("cancelled");
        }
    }
}

async fn generations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    state.metrics.requests.inc();
    let counted = |e: ApiError| {
        state.metrics.error(e.metric_kind());
        e
    };
    authorize(&state, &headers)?;
    let body = body.map_err(|e| {
        counted(ApiError {
            status: e.status(),
            code: Some(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "invalid_body"
            }),
            param: None,
            ..ApiError::invalid(
                "",
                format!("cannot read the request body: {}", e.body_text()),
            )
        })
    })?;
    let request = api::parse_image_request(&body, &state.limits).map_err(counted)?;
    let refused = |field: &'static str, e: openuni_models::prompt::PromptError| {
        counted(ApiError::invalid(
            field,
            format!("`{field}` cannot be used: {e}"),
        ))
    };
    let cond = state
        .tokenizer
        .cond_ids(&request.prompt, state.max_tokens)
        .map_err(|e| refused("prompt", e))?;
    let uncond = state
        .tokenizer
        .uncond_ids(request.negative_prompt.as_deref(), state.max_tokens)
        .map_err(|e| refused("negative_prompt", e))?;
    let ids = PromptIds { cond, uncond };
    let seed = request.seed.unwrap_or_else(|| rand::random::<u64>() >> 1);
    let n = request.n;
    let (tx, rx) = oneshot::channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let job = Job {
        request,
        seed,
        ids,
        admitted: arrived,
        deadline: arrived + state.deadline,
        cancelled: cancelled.clone(),
        reply: tx,
    };
    if let Err(why) = state.queue.push(job) {
        let e = if why == "queue_full" {
            ApiError {
                retry_after: Some(retry_after(&state)),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "queue_full",
                    "the request queue is full; retry later",
                )
            }
        } else {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                "the server is shutting down",
            )
        };
        return Err(counted(e));
    }
    let mut guard = CancelOnDrop {
        flag: cancelled,
        done: false,
        metrics: state.metrics.clone(),
    };
    let answer = tokio::time::timeout(state.deadline, rx).await;
    guard.done = true;
    let images = match answer {
        Err(_) => {
            guard.flag.store(true, Ordering::Relaxed);
            return Err(counted(deadline_error(&state)));
        }
        // The worker dropped the request unanswered: its deadline passed before its batch.
        Ok(Err(_)) if arrived.elapsed() >= state.deadline => {
            return Err(counted(deadline_error(&state)))
        }
        Ok(Err(_)) => {
            return Err(counted(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                "the worker stopped before this request ran",
            )))
        }
        // Its batch stopped because every request in it was gone: for a client still waiting, that
        // means the deadline passed (the worker saw it a moment before this handler's timer).
        Ok(Ok(Err(e))) if e.code == "cancelled" => return Err(counted(deadline_error(&state))),
        Ok(Ok(Err(e))) => {
            return Err(counted(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                e.code,
                e.message,
            )))
        }
        Ok(Ok(Ok(images))) => images,
    };
    debug_assert_eq!(images.len(), n);
    state
        .metrics
        .request_latency
        .observe(arrived.elapsed().as_secs_f64());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let data: Vec<_> = images
        .into_iter()
        .map(|i| json!({"b64_json": i.png_base64, "seed": i.seed}))
        .collect();
    Ok(Json(json!({"created": created, "data": data})).into_response())
}

fn deadline_error(state: &AppState) -> ApiError {
    let msg = format!(
        "the request did not finish within the server's deadline of {:.1} s (--deadline-s)",
        state.deadline.as_secs_f64()
    );
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "server_error",
        "deadline_exceeded",
        msg,
    )
}

/// Seconds a refused client should wait: the time the queue ahead needs at the last batch's pace.
fn retry_after(state: &AppState) -> u64 {
    let ips = state.metrics.images_per_second.get();
    let waiting = state.metrics.queue_depth.get().max(1) as f64;
    if ips > 0.0 {
        (waiting / ips).ceil().clamp(1.0, 60.0) as u64
    } else {
        1
    }
}
