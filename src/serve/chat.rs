//! `POST /v1/chat/completions`: InternVL3 image chat in the OpenAI Chat Completions shape, on the
//! engine of `openuni chat` (src/chat.rs: its template, image preprocessing, vision tower,
//! KV-cache decoder, sampling and streamed detokenising).
//!
//! One chat worker thread owns the understanding model and answers requests one at a time, in
//! arrival order, from a bounded queue (full: 503 with Retry-After). The handler parses and
//! checks the body (every 4xx names its field), decodes inline images (base64 `data:` URLs, at
//! most `max_image_bytes` each; http(s) URLs are refused: the server fetches nothing), and
//! passes the request to the worker; the worker's events (start, text, end) become one
//! `chat.completion` object or, with `stream: true`, server-sent `chat.completion.chunk` events
//! ending with `data: [DONE]`. A client that goes away (or a passed deadline) stops the decoding
//! at its next token.

use std::borrow::Cow;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures_util::StreamExt;
use openuni_tensor::HostTensor;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::api::ApiError;
use super::metrics::Metrics;
use super::{authorize, AppState};
use crate::chat::{
    generate_until, ChatModel, Picker, Sampling, TextStream, INTERNVL2_5_SYSTEM, TILE,
};

/// What a chat request may ask, fixed at start-up.
#[derive(Clone, Debug)]
pub struct ChatLimits {
    /// The id of the chat model in `GET /v1/models`; a request's `model`, when given, must be it.
    pub model_id: String,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// The decoder's context (`max_position_embeddings`): prompt and answer together.
    pub context: usize,
    /// Images per request.
    pub max_images: usize,
    /// Decoded bytes of one image.
    pub max_image_bytes: usize,
    /// Tiles per image (the model card's `max_num`; a thumbnail comes on top).
    pub max_num: usize,
    /// Characters of all the text of a request.
    pub max_text_chars: usize,
}

/// A checked chat request.
#[derive(Debug)]
pub struct ChatRequest {
    /// The system message (InternVL's default when none is given).
    pub system: Option<String>,
    /// Earlier (user, assistant) turns.
    pub history: Vec<(String, String)>,
    /// The last user message's text.
    pub question: String,
    /// The last user message's images: pixel values [T, 3, 448, 448] each.
    pub images: Vec<HostTensor>,
    /// Every text with the field it came from, for the model's special-token check.
    pub texts: Vec<(String, String)>,
    pub max_tokens: usize,
    /// None: greedy (as `openuni chat` without --temperature).
    pub sampling: Option<Sampling>,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage`.
    pub stream_usage: bool,
}

const KNOWN: [&str; 12] = [
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stream",
    "stream_options",
    "n",
    "user",
];

fn bad(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> ApiError {
    ApiError::invalid_at(param, message)
}

/// Parses and checks a `/v1/chat/completions` body, decoding its images.
pub fn parse_chat_request(body: &[u8], l: &ChatLimits) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        param: None,
        code: Some("invalid_json"),
        ..bad("", format!("the request body is not valid JSON: {e}"))
    })?;
    let Value::Object(o) = v else {
        return Err(ApiError {
            param: None,
            code: Some("invalid_json"),
            ..bad("", "the request body must be a JSON object")
        });
    };
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ApiError {
            param: None,
            code: Some("unknown_parameter"),
            ..bad(
                "",
                format!(
                    "unknown or unsupported field `{k}`; known fields: {}",
                    KNOWN.join(", ")
                ),
            )
        });
    }
    if let Some(m) = o.get("model").filter(|m| !m.is_null()) {
        if m.as_str() != Some(l.model_id.as_str()) {
            return Err(ApiError {
                code: Some("model_not_found"),
                ..bad(
                    "model",
                    format!(
                        "`model` is {m}; this server's chat model is `{}`",
                        l.model_id
                    ),
                )
            });
        }
    }
    if let Some(n) = o.get("n").filter(|n| !n.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(bad(
                "n",
                format!("`n` is {n}; this server gives one choice per request (1)"),
            ));
        }
    }
    let max_tokens = match (
        o.get("max_tokens").filter(|v| !v.is_null()),
        o.get("max_completion_tokens").filter(|v| !v.is_null()),
    ) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "max_tokens",
                "give `max_tokens` or `max_completion_tokens`, not both",
            ))
        }
        (Some(v), None) => uint(v, "max_tokens", 1, l.context as u64)? as usize,
        (None, Some(v)) => uint(v, "max_completion_tokens", 1, l.context as u64)? as usize,
        (None, None) => l.default_max_tokens,
    };
    let number = |field: &'static str| -> Result<Option<f64>, ApiError> {
        match o.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| bad(field, format!("`{field}` is {v}, expected a number"))),
        }
    };
    let temperature = number("temperature")?.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            "temperature",
            format!("`temperature` is {temperature}, expected a number from 0 to 2 (0: greedy)"),
        ));
    }
    let top_p = number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            "top_p",
            format!("`top_p` is {top_p}, expected a number in (0, 1]"),
        ));
    }
    let top_k = match o.get("top_k") {
        None | Some(Value::Null) => 0,
        Some(v) => uint(v, "top_k", 0, u32::MAX as u64)? as usize,
    };
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(s) => Some(s.as_u64().ok_or_else(|| {
            bad(
                "seed",
                format!("`seed` is {s}, expected an integer from 0 to {}", u64::MAX),
            )
        })?),
    };
    let sampling = (temperature > 0.0).then(|| Sampling {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed: seed.unwrap_or_else(|| rand::random::<u64>() >> 1),
    });
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(bad(
                "stream",
                format!("`stream` is {v}, expected true or false"),
            ))
        }
    };
    let stream_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => match so.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(bad(
                    "stream_options.include_usage",
                    format!("`stream_options.include_usage` is {v}, expected true or false"),
                ))
            }
        },
        Some(v) => {
            return Err(bad(
                "stream_options",
                format!("`stream_options` is {v}, expected an object"),
            ))
        }
    };
    let (system, history, question, images, texts) = parse_messages(&o, l)?;
    Ok(ChatRequest {
        system,
        history,
        question,
        images,
        texts,
        max_tokens,
        sampling,
        stream,
        stream_usage,
    })
}

type Messages = (
    Option<String>,
    Vec<(String, String)>,
    String,
    Vec<HostTensor>,
    Vec<(String, String)>,
);

/// `messages`: an optional `system` first, then `user` and `assistant` turns alternating,
/// ending with `user`; images only in that last user message.
fn parse_messages(o: &Map<String, Value>, l: &ChatLimits) -> Result<Messages, ApiError> {
    let msgs = match o.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            return Err(bad(
                "messages",
                "`messages` is empty; it needs at least one `user` message",
            ))
        }
        Some(v) => {
            return Err(bad(
                "messages",
                format!("`messages` is {}, expected an array of messages", kind(v)),
            ))
        }
        None => {
            return Err(ApiError {
                code: Some("missing_required_parameter"),
                ..bad("messages", "`messages` is required")
            })
        }
    };
    let mut system = None;
    let mut turns: Vec<(usize, &'static str, String, Vec<HostTensor>)> = vec![];
    let mut texts = vec![];
    let last = msgs.len() - 1;
    let mut chars = 0;
    for (i, m) in msgs.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(bad(
                at.clone(),
                format!(
                    "`{at}` is {}, expected an object with `role` and `content`",
                    kind(m)
                ),
            ));
        };
        if let Some(k) = m
            .keys()
            .find(|k| !["role", "content", "name"].contains(&k.as_str()))
        {
            return Err(bad(
                format!("{at}.{k}"),
                format!("`{at}.{k}` is not supported (a message has `role` and `content`)"),
            ));
        }
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("system" | "developer")) if i == 0 => {
                if r == "system" {
                    "system"
                } else {
                    "developer"
                }
            }
            Some("system" | "developer") => {
                return Err(bad(
                    format!("{at}.role"),
                    format!("`{at}.role`: a system message may only come first"),
                ))
            }
            Some("user") => "user",
            Some("assistant") => "assistant",
            Some(r) => {
                return Err(bad(
                    format!("{at}.role"),
                    format!(
                        "`{at}.role` is \"{r}\", expected \"system\", \"user\" or \"assistant\""
                    ),
                ))
            }
            None => {
                return Err(bad(
                    format!("{at}.role"),
                    format!("`{at}.role` is missing or not a string"),
                ))
            }
        };
        let (text, images) = parse_content(
            m.get("content"),
            &format!("{at}.content"),
            role == "user" && i == last,
            l,
        )?;
        chars += text.chars().count();
        if chars > l.max_text_chars {
            return Err(bad(
                format!("{at}.content"),
                format!(
                    "the messages' text is longer than {} characters",
                    l.max_text_chars
                ),
            ));
        }
        if role != "assistant" && text.trim().is_empty() && images.is_empty() {
            return Err(bad(
                format!("{at}.content"),
                format!("`{at}.content` is empty"),
            ));
        }
        texts.push((format!("{at}.content"), text.clone()));
        if role == "system" || role == "developer" {
            system = Some(text);
            continue;
        }
        let expected = if turns.len().is_multiple_of(2) {
            "user"
        } else {
            "assistant"
        };
        if role != expected {
            return Err(bad(format!("{at}.role"), format!("`{at}.role` is \"{role}\" where \"{expected}\" was expected: user and assistant messages alternate, starting with user")));
        }
        turns.push((i, role, text, images));
    }
    match turns.last() {
        Some((_, "user", ..)) => {}
        Some((i, ..)) => return Err(bad(format!("messages[{i}].role"), format!("`messages[{i}].role`: the last message must be a `user` message (the question to answer)"))),
        None => return Err(bad("messages", "`messages` has no `user` message")),
    }
    let (_, _, question, images) = turns.pop().expect("checked above");
    let history = turns
        .chunks_exact(2)
        .map(|p| (p[0].2.clone(), p[1].2.clone()))
        .collect();
    Ok((system, history, question, images, texts))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A message's `content`: a string, or parts `{"type": "text", "text"}` and (only where
/// `images_allowed`) `{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}`.
/// Text parts are joined with newlines.
fn parse_content(
    c: Option<&Value>,
    at: &str,
    images_allowed: bool,
    l: &ChatLimits,
) -> Result<(String, Vec<HostTensor>), ApiError> {
    let parts = match c {
        Some(Value::String(s)) => return Ok((s.clone(), vec![])),
        Some(Value::Array(parts)) => parts,
        Some(v) => {
            return Err(bad(
                at.to_string(),
                format!(
                    "`{at}` is {}, expected a string or an array of content parts",
                    kind(v)
                ),
            ))
        }
        None => {
            return Err(ApiError {
                code: Some("missing_required_parameter"),
                ..bad(at.to_string(), format!("`{at}` is required"))
            })
        }
    };
    let mut texts = vec![];
    let mut images = vec![];
    for (j, p) in parts.iter().enumerate() {
        let pat = format!("{at}[{j}]");
        let Value::Object(p) = p else {
            return Err(bad(
                pat.clone(),
                format!("`{pat}` is {}, expected an object with `type`", kind(p)),
            ));
        };
        match p.get("type").and_then(Value::as_str) {
            Some("text") => match p.get("text") {
                Some(Value::String(t)) => texts.push(t.clone()),
                other => return Err(bad(format!("{pat}.text"), format!("`{pat}.text` is {}, expected a string", other.map_or("missing", kind)))),
            },
            Some("image_url") if !images_allowed => {
                return Err(bad(pat.clone(), format!("`{pat}`: images are taken only in the last message, which must be a user message (InternVL answers about the images of the current question)")))
            }
            Some("image_url") => {
                if images.len() == l.max_images {
                    return Err(bad(pat.clone(), format!("`{pat}`: at most {} images per request", l.max_images)));
                }
                let url = match p.get("image_url") {
                    Some(Value::Object(u)) => u.get("url"),
                    other => return Err(bad(format!("{pat}.image_url"), format!("`{pat}.image_url` is {}, expected an object with `url`", other.map_or("missing", kind)))),
                };
                let uat = format!("{pat}.image_url.url");
                let Some(Value::String(url)) = url else { return Err(bad(uat.clone(), format!("`{uat}` is missing or not a string"))) };
                images.push(image_from_url(url, &uat, l)?);
            }
            Some(t) => return Err(bad(format!("{pat}.type"), format!("`{pat}.type` is \"{t}\", expected \"text\" or \"image_url\""))),
            None => return Err(bad(format!("{pat}.type"), format!("`{pat}.type` is missing or not a string"))),
        }
    }
    Ok((texts.join("\n"), images))
}

/// The pixel values of a `data:image/(png|jpeg|webp);base64,...` URL, tiled as the model card's
/// `load_image(..., 448, max_num)`. Other URLs are refused (nothing is fetched).
fn image_from_url(url: &str, at: &str, l: &ChatLimits) -> Result<HostTensor, ApiError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(bad(at.to_string(), format!("`{at}`: http(s) image URLs are not fetched (this server makes no network requests); send the image inline as \"data:image/png;base64,...\"")));
    }
    let Some((head, data)) = url.strip_prefix("data:").and_then(|r| r.split_once(',')) else {
        return Err(bad(
            at.to_string(),
            format!("`{at}` must be a data URL, \"data:image/png;base64,...\" (PNG, JPEG or WebP)"),
        ));
    };
    let Some(mime) = head.strip_suffix(";base64") else {
        return Err(bad(
            at.to_string(),
            format!("`{at}`: the data URL must be base64 (\"data:image/png;base64,...\")"),
        ));
    };
    if !["image/png", "image/jpeg", "image/jpg", "image/webp"]
        .contains(&mime.to_ascii_lowercase().as_str())
    {
        return Err(bad(
            at.to_string(),
            format!("`{at}`: media type `{mime}` is not one of image/png, image/jpeg, image/webp"),
        ));
    }
    // Decoded size is 3/4 of the text: refuse before decoding.
    if data.len() / 4 * 3 > l.max_image_bytes + 3 {
        return Err(bad(
            at.to_string(),
            format!(
                "`{at}`: the image is larger than {} bytes",
                l.max_image_bytes
            ),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| {
            bad(
                at.to_string(),
                format!("`{at}`: the base64 data cannot be decoded: {e}"),
            )
        })?;
    let img = openuni_models::internvl_preprocess::decode_rgb_bytes(&bytes, &format!("`{at}`"))
        .map_err(|e| bad(at.to_string(), format!("{e}")))?;
    Ok(openuni_models::internvl_preprocess::pixel_values(
        &img, TILE, l.max_num,
    ))
}

/// An integer in [lo, hi].
fn uint(v: &Value, field: &'static str, lo: u64, hi: u64) -> Result<u64, ApiError> {
    match v.as_u64() {
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        _ => Err(bad(
            field,
            format!("`{field}` is {v}, expected an integer from {lo} to {hi}"),
        )),
    }
}

/// What the chat worker tells the handler of one request.
#[derive(Debug)]
pub enum ChatEvent {
    /// The prompt is ready (its token count); decoding starts.
    Started {
        prompt_tokens: usize,
    },
    /// Text the last tokens completed.
    Text(String),
    /// The answer ended: `stop` (at `<|im_end|>`) or `length` (at `max_tokens`).
    Done {
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

/// A request given to the chat worker.
pub struct ChatJob {
    pub request: ChatRequest,
    pub deadline: Instant,
    pub events: UnboundedSender<ChatEvent>,
}

/// The chat side of the server: the queue to its worker and what requests may ask.
pub struct ChatService {
    pub queue: SyncSender<ChatJob>,
    pub limits: ChatLimits,
}

/// Why chat is off, or the running service.
pub type Chat = std::result::Result<ChatService, String>;

/// Opens the understanding model (`dir` None: the built-in tiny chat model) on a worker thread
/// and starts serving chat jobs; `Err(why)` (for a clear 501) when the folder has no vision
/// tower or cannot be opened for chat.
pub fn start(
    dir: Option<PathBuf>,
    device: crate::exec::Device,
    dtype: openuni_tensor::DType,
    queue: usize,
    model_id: String,
    metrics: Arc<Metrics>,
) -> Chat {
    let (ready_tx, ready_rx) =
        std::sync::mpsc::channel::<std::result::Result<ChatLimits, String>>();
    let (tx, rx) = std::sync::mpsc::sync_channel::<ChatJob>(queue);
    let spawned = std::thread::Builder::new()
        .name("openuni-chat".into())
        .spawn(move || {
            let m = match open_chat_model(dir.as_deref(), device, dtype) {
                Ok(m) => m,
                Err(why) => {
                    let _ = ready_tx.send(Err(why));
                    return;
                }
            };
            let llm = match m.llm(1) {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
            };
            let limits = ChatLimits {
                model_id,
                default_max_tokens: 512,
                context: m.cfg.llm.max_position_embeddings,
                max_images: 4,
                max_image_bytes: 10 << 20,
                max_num: openuni_models::internvl_preprocess::DEFAULT_MAX_NUM,
                max_text_chars: 32_000,
            };
            let _ = ready_tx.send(Ok(limits));
            serve_jobs(&m, llm, rx, &metrics);
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start the chat worker: {e}"));
    }
    match ready_rx.recv() {
        Ok(Ok(limits)) => Ok(ChatService { queue: tx, limits }),
        Ok(Err(why)) => Err(why),
        Err(_) => Err("the chat worker stopped while loading the model".into()),
    }
}

/// The understanding model, if `dir` has what chat needs (a config with `vision_config` and the
/// vision tower's weights); else why not.
fn open_chat_model(
    dir: Option<&Path>,
    device: crate::exec::Device,
    dtype: openuni_tensor::DType,
) -> std::result::Result<ChatModel, String> {
    let name = dir.map_or("the built-in tiny chat model".to_string(), |d| {
        d.display().to_string()
    });
    let m = ChatModel::open(dir, device, dtype)
        .map_err(|e| format!("{name} cannot be opened for chat: {e:#}"))?;
    m.cfg.vision().map_err(|e| format!("{name} has no vision tower ({e}); chat needs an InternVL3 folder with one (--chat-model DIR)"))?;
    openuni_models::internvit::VitLayout::detect(&m.weights)
        .ok_or_else(|| format!("{name} has no vision tower weights (`vision_model.*`); chat needs an InternVL3 folder with them (--chat-model DIR)"))?;
    Ok(m)
}

/// Answers jobs one at a time until every sender is gone.
fn serve_jobs(
    m: &ChatModel,
    mut llm: crate::chat::CachedQwen2<'_>,
    rx: Receiver<ChatJob>,
    metrics: &Metrics,
) {
    for job in rx {
        if job.events.is_closed() || Instant::now() >= job.deadline {
            continue;
        }
        let events = job.events.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            answer(m, &mut llm, &job, metrics)
        }));
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "generation_failed",
                "internal error: the chat answer panicked",
            ),
        };
        let _ = events.send(ChatEvent::Failed(failure));
    }
}

fn server_error(e: anyhow::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "generation_failed",
        format!("{e:#}"),
    )
}

/// One request: the prompt (template, images through the vision tower), then the decoding
/// streamed as text events; stops early when nobody reads any more or the deadline passed.
fn answer(
    m: &ChatModel,
    llm: &mut crate::chat::CachedQwen2<'_>,
    job: &ChatJob,
    metrics: &Metrics,
) -> std::result::Result<(), ApiError> {
    let r = &job.request;
    for (field, text) in &r.texts {
        m.check_text(&format!("`{field}`"), text)
            .map_err(|e| bad(field.clone(), format!("{e:#}")))?;
    }
    let pixels = if r.images.is_empty() {
        None
    } else {
        let tiles: Vec<usize> = r.images.iter().map(|t| t.shape.dims()[0]).collect();
        let values: Vec<f32> = r.images.iter().flat_map(|t| t.to_f32_vec()).collect();
        let px = HostTensor::from_f32([tiles.iter().sum::<usize>(), 3, TILE, TILE], values)
            .map_err(|e| server_error(e.into()))?;
        Some((px, tiles))
    };
    llm.reset();
    let system = r.system.as_deref().unwrap_or(INTERNVL2_5_SYSTEM);
    let embeds = m
        .prompt_embeds_with_system(
            &llm.embeddings(),
            system,
            &r.history,
            &r.question,
            pixels.as_ref().map(|(p, t)| (p, t.as_slice())),
            "the request's images",
        )
        .map_err(server_error)?;
    let prompt_tokens = embeds.len() / llm.hidden_size();
    let context = m.cfg.llm.max_position_embeddings;
    if prompt_tokens + r.max_tokens > context {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..bad("messages", format!("the prompt is {prompt_tokens} tokens (images included) and `max_tokens` {}: more than the model's context of {context}", r.max_tokens))
        });
    }
    let mut picker = Picker::new(r.sampling).map_err(|e| bad("temperature", format!("{e}")))?;
    if job
        .events
        .send(ChatEvent::Started { prompt_tokens })
        .is_err()
    {
        return Ok(());
    }
    let mut text = TextStream::default();
    let mut failed = None;
    generate_until(
        llm,
        &embeds,
        r.max_tokens,
        Some(m.eos),
        &mut picker,
        |id| match text.push(&m.tok, id) {
            Ok(t) => {
                (t.is_empty() || job.events.send(ChatEvent::Text(t)).is_ok())
                    && !job.events.is_closed()
                    && Instant::now() < job.deadline
            }
            Err(e) => {
                failed = Some(e);
                false
            }
        },
    )
    .map_err(|e| server_error(e.into()))?;
    if let Some(e) = failed {
        return Err(server_error(e));
    }
    let (rest, _) = text.finish(&m.tok).map_err(server_error)?;
    if !rest.is_empty() {
        let _ = job.events.send(ChatEvent::Text(rest));
    }
    let n = text.ids.len();
    metrics.chat_tokens.inc_by(n as u64);
    let finish_reason = if text.ids.last() == Some(&(m.eos as u32)) {
        "stop"
    } else {
        "length"
    };
    let _ = job.events.send(ChatEvent::Done {
        finish_reason,
        completion_tokens: n,
    });
    Ok(())
}

/// `POST /v1/chat/completions`.
pub(super) async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> std::result::Result<Response, ApiError> {
    let arrived = Instant::now();
    state.metrics.chat_requests.inc();
    let counted = |e: ApiError| {
        state.metrics.error(e.metric_kind());
        e
    };
    authorize(&state, &headers)?;
    let chat = match &state.chat {
        Ok(c) => c,
        Err(why) => {
            return Err(counted(ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "invalid_request_error",
                "chat_unavailable",
                format!("chat is not available on this server: {why}"),
            )));
        }
    };
    let body = body.map_err(|e| {
        counted(ApiError {
            status: e.status(),
            code: Some(if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "invalid_body"
            }),
            param: None,
            ..bad(
                "",
                format!("cannot read the request body: {}", e.body_text()),
            )
        })
    })?;
    // Image decoding is CPU work: off the async threads.
    let limits = chat.limits.clone();
    let request = tokio::task::spawn_blocking(move || parse_chat_request(&body, &limits))
        .await
        .map_err(|e| {
            counted(server_error(anyhow::anyhow!(
                "parsing the request failed: {e}"
            )))
        })?
        .map_err(counted)?;
    let (stream, stream_usage) = (request.stream, request.stream_usage);
    let (tx, mut rx) = unbounded_channel();
    let job = ChatJob {
        request,
        deadline: arrived + state.deadline,
        events: tx,
    };
    if let Err(e) = chat.queue.try_send(job) {
        let e = match e {
            TrySendError::Full(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "queue_full",
                    "the chat queue is full; retry later",
                )
            },
            TrySendError::Disconnected(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                "the chat worker stopped",
            ),
        };
        return Err(counted(e));
    }
    let deadline = tokio::time::Instant::from_std(arrived + state.deadline);
    let deadline_error = || counted(super::deadline_error(&state));
    // The first event says whether the request could start: errors found by the worker (a
    // special token in the text, a prompt over the context) are still a plain 4xx.
    let prompt_tokens = match tokio::time::timeout_at(deadline, rx.recv()).await {
        Err(_) => return Err(deadline_error()),
        Ok(None) => {
            return Err(counted(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                "the chat worker stopped before this request ran",
            )))
        }
        Ok(Some(ChatEvent::Failed(e))) => return Err(counted(e)),
        Ok(Some(ChatEvent::Started { prompt_tokens })) => prompt_tokens,
        Ok(Some(other)) => {
            return Err(counted(server_error(anyhow::anyhow!(
                "internal error: unexpected first chat event {other:?}"
            ))))
        }
    };
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let model = chat.limits.model_id.clone();
    if stream {
        let chunk = Chunk {
            id,
            created,
            model,
            prompt_tokens,
            stream_usage,
        };
        return Ok(Sse::new(sse_events(chunk, rx, deadline, state.clone())).into_response());
    }
    let mut content = String::new();
    let (finish_reason, completion_tokens) = loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Err(deadline_error()),
            Ok(Some(ChatEvent::Text(t))) => content.push_str(&t),
            Ok(Some(ChatEvent::Done {
                finish_reason,
                completion_tokens,
            })) => break (finish_reason, completion_tokens),
            Ok(Some(ChatEvent::Failed(e))) => return Err(counted(e)),
            Ok(Some(ChatEvent::Started { .. })) => {}
            // Stopped by its deadline on the worker's side.
            Ok(None) => return Err(deadline_error()),
        }
    };
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }))
    .into_response())
}

/// What every chunk of one streamed answer shares.
struct Chunk {
    id: String,
    created: u64,
    model: String,
    prompt_tokens: usize,
    stream_usage: bool,
}

impl Chunk {
    fn event(&self, delta: Value, finish_reason: Option<&str>) -> Event {
        self.data(json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}))
    }

    fn data(&self, v: Value) -> Event {
        Event::default().data(v.to_string())
    }
}

/// The server-sent events of a streamed answer: a first chunk with the role, one per text
/// piece, a last one with `finish_reason` (and, if asked, one with `usage`), then `[DONE]`. A
/// failure or the deadline mid-answer ends the stream with an `error` object instead.
fn sse_events(
    c: Chunk,
    rx: UnboundedReceiver<ChatEvent>,
    deadline: tokio::time::Instant,
    state: Arc<AppState>,
) -> impl futures_util::Stream<Item = std::result::Result<Event, Infallible>> {
    enum At {
        First,
        Body,
        Done,
    }
    futures_util::stream::unfold((c, rx, At::First), move |(c, mut rx, at)| {
        let state = state.clone();
        async move {
            let mut events = vec![];
            let next = match at {
                At::Done => return None,
                At::First => {
                    events.push(c.event(json!({"role": "assistant", "content": ""}), None));
                    At::Body
                }
                At::Body => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(ChatEvent::Text(t))) => {
                        events.push(c.event(json!({"content": t}), None));
                        At::Body
                    }
                    Ok(Some(ChatEvent::Started { .. })) => At::Body,
                    Ok(Some(ChatEvent::Done { finish_reason, completion_tokens })) => {
                        events.push(c.event(json!({}), Some(finish_reason)));
                        if c.stream_usage {
                            let usage = json!({"prompt_tokens": c.prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": c.prompt_tokens + completion_tokens});
                            events.push(c.data(json!({"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model, "choices": [], "usage": usage})));
                        }
                        events.push(Event::default().data("[DONE]"));
                        At::Done
                    }
                    Ok(Some(ChatEvent::Failed(e))) => {
                        state.metrics.error(e.metric_kind());
                        events.push(c.data(e.body()));
                        At::Done
                    }
                    Err(_) | Ok(None) => {
                        let e = super::deadline_error(&state);
                        state.metrics.error(e.metric_kind());
                        events.push(c.data(e.body()));
                        At::Done
                    }
                },
            };
            Some((futures_util::stream::iter(events.into_iter().map(Ok)), (c, rx, next)))
        }
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ChatLimits {
        ChatLimits {
            model_id: "m".into(),
            default_max_tokens: 16,
            context: 100,
            max_images: 1,
            max_image_bytes: 1000,
            max_num: 12,
            max_text_chars: 50,
        }
    }

    #[test]
    fn messages_become_system_history_and_question() {
        let body = json!({"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"}],
            "temperature": 0.5, "seed": 3, "top_k": 4, "stream": true});
        let r = parse_chat_request(body.to_string().as_bytes(), &limits()).unwrap();
        assert_eq!(r.system.as_deref(), Some("be brief"));
        assert_eq!(r.history, vec![("a\nb".to_string(), "c".to_string())]);
        assert_eq!(
            (r.question.as_str(), r.images.len(), r.max_tokens, r.stream),
            ("d", 0, 16, true)
        );
        assert_eq!(
            r.sampling,
            Some(Sampling {
                temperature: 0.5,
                top_k: 4,
                top_p: 1.0,
                seed: 3
            })
        );
        assert_eq!(r.texts.len(), 4);
        let greedy = parse_chat_request(
            br#"{"messages":[{"role":"user","content":"q"}],"temperature":0,"max_tokens":7}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!((greedy.sampling, greedy.max_tokens), (None, 7));
    }

    #[test]
    fn limits_name_the_field() {
        let err = |b: Value| parse_chat_request(b.to_string().as_bytes(), &limits()).unwrap_err();
        let e = err(json!({"messages": [{"role": "user", "content": "x".repeat(51)}]}));
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = err(json!({"messages": [{"role": "user", "content": "q"}], "max_tokens": 101}));
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let big = format!("data:image/png;base64,{}", "A".repeat(2000));
        let two = json!([{"type": "image_url", "image_url": {"url": big}}]);
        let e = err(json!({"messages": [{"role": "user", "content": two}]}));
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content[0].image_url.url")
        );
        assert!(
            e.message.contains("larger than 1000 bytes"),
            "{}",
            e.message
        );
        let png = crate::serve::batcher::encode_png(&[9; 12], 2, 2).unwrap();
        let tiny = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
        let one = json!({"type": "image_url", "image_url": {"url": tiny}});
        let r = parse_chat_request(
            json!({"messages": [{"role": "user", "content": [one.clone()]}]})
                .to_string()
                .as_bytes(),
            &limits(),
        )
        .unwrap();
        assert_eq!(r.images[0].shape.dims(), &[1, 3, TILE, TILE]);
        let e = err(json!({"messages": [{"role": "user", "content": [one.clone(), one]}]}));
        assert_eq!(e.param.as_deref(), Some("messages[0].content[1]"));
        assert!(e.message.contains("at most 1 images"), "{}", e.message);
    }
}
