//! The OpenAI request and error shapes of `openuni serve`: `POST /v1/images/generations` parsed
//! and validated field by field, so every 4xx names the field that is wrong.
//!
//! Shapes follow the OpenAI API reference ("Images: create", "Error codes"): the body fields
//! `prompt`, `n`, `size`, `response_format`, `model`; errors as
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use openuni_models::scheduler::SamplerKind;
use serde_json::{json, Map, Value};
use std::borrow::Cow;

/// An error answered in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: invalid_request_error, server_error, ...
    pub kind: &'static str,
    /// The request field at fault, if one is (e.g. `prompt`, `messages[1].content[0].image_url.url`).
    pub param: Option<Cow<'static, str>>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (503 when the queue is full).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::invalid_at(param, message)
    }

    /// [`invalid`](Self::invalid) for a field whose name is made at run time.
    pub fn invalid_at(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: Some("invalid_value"),
            retry_after: None,
        }
    }

    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    /// The metrics label of this error (`openuni_errors_total{kind}`).
    pub fn metric_kind(&self) -> &'static str {
        self.code.unwrap_or(self.kind)
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// What the server accepts, fixed at start-up.
#[derive(Clone, Debug)]
pub struct Limits {
    /// The model id of `GET /v1/models`; a request's `model`, when given, must be it.
    pub model_id: String,
    pub default_size: usize,
    /// Width and height must be multiples of this (the VAE's upscale).
    pub size_multiple: usize,
    pub max_side: usize,
    /// Images per request (OpenAI allows 1 to 10; never more than a batch holds).
    pub max_n: usize,
    pub max_steps: usize,
    pub max_prompt_chars: usize,
    pub default_steps: usize,
    pub default_guidance: f32,
    pub default_sampler: SamplerKind,
}

/// A validated image request.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub n: usize,
    pub width: usize,
    pub height: usize,
    /// The seed of the first image; image i gets seed + i (as `openuni generate --prompts`).
    pub seed: Option<u64>,
    pub steps: usize,
    pub guidance: f32,
    pub sampler: SamplerKind,
}

/// Fields OpenAI clients may send that do not change what this server makes.
const IGNORED: [&str; 3] = ["user", "quality", "style"];
const KNOWN: [&str; 10] = [
    "prompt",
    "negative_prompt",
    "n",
    "size",
    "response_format",
    "model",
    "seed",
    "steps",
    "guidance_scale",
    "sampler",
];

/// Parses and validates a `/v1/images/generations` body.
pub fn parse_image_request(body: &[u8], l: &Limits) -> Result<ImageRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError {
        param: None,
        code: Some("invalid_json"),
        ..ApiError::invalid("", format!("the request body is not valid JSON: {e}"))
    })?;
    let Value::Object(o) = v else {
        return Err(ApiError {
            param: None,
            code: Some("invalid_json"),
            ..ApiError::invalid("", "the request body must be a JSON object")
        });
    };
    if let Some(k) = o
        .keys()
        .find(|k| !KNOWN.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()))
    {
        // `param` is 'static, so the message names the unknown field.
        return Err(ApiError {
            param: None,
            code: Some("unknown_parameter"),
            ..ApiError::invalid(
                "",
                format!("unknown field `{k}`; known fields: {}", KNOWN.join(", ")),
            )
        });
    }
    let prompt = match o.get("prompt") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(ApiError::invalid("prompt", "`prompt` is empty")),
        Some(_) => return Err(ApiError::invalid("prompt", "`prompt` must be a string")),
        None => {
            return Err(ApiError {
                code: Some("missing_required_parameter"),
                ..ApiError::invalid("prompt", "`prompt` is required")
            })
        }
    };
    if prompt.chars().count() > l.max_prompt_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "`prompt` has {} characters, at most {} are accepted",
                prompt.chars().count(),
                l.max_prompt_chars
            ),
        ));
    }
    let negative_prompt = match o.get("negative_prompt") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= l.max_prompt_chars => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(
                "negative_prompt",
                format!(
                    "`negative_prompt` is longer than {} characters",
                    l.max_prompt_chars
                ),
            ))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "negative_prompt",
                "`negative_prompt` must be a string",
            ))
        }
    };
    if let Some(m) = o.get("model").filter(|m| !m.is_null()) {
        if m.as_str() != Some(l.model_id.as_str()) {
            return Err(ApiError {
                code: Some("model_not_found"),
                ..ApiError::invalid(
                    "model",
                    format!("`model` is {m}; this server serves `{}`", l.model_id),
                )
            });
        }
    }
    match o.get("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "b64_json" => {}
        Some(Value::String(s)) if s == "url" => {
            return Err(ApiError::invalid("response_format", "`response_format` `url` is not supported (this server keeps no files to link to); use `b64_json`"))
        }
        Some(f) => return Err(ApiError::invalid("response_format", format!("`response_format` is {f}, expected \"b64_json\""))),
    }
    let n = uint(&o, "n", 1, 1, l.max_n as u64)? as usize;
    let (width, height) = match o.get("size") {
        None | Some(Value::Null) => (l.default_size, l.default_size),
        Some(Value::String(s)) => parse_size(s, l)?,
        Some(f) => {
            return Err(ApiError::invalid(
                "size",
                format!("`size` is {f}, expected a string \"WIDTHxHEIGHT\""),
            ))
        }
    };
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(s) => Some(s.as_u64().ok_or_else(|| {
            ApiError::invalid(
                "seed",
                format!("`seed` is {s}, expected an integer from 0 to {}", u64::MAX),
            )
        })?),
    };
    if let Some(s) = seed {
        if s.checked_add(n as u64 - 1).is_none() {
            return Err(ApiError::invalid(
                "seed",
                format!("`seed` {s} + n - 1 overflows (image i gets seed + i)"),
            ));
        }
    }
    let steps = uint(&o, "steps", l.default_steps as u64, 1, l.max_steps as u64)? as usize;
    let guidance = match o.get("guidance_scale") {
        None | Some(Value::Null) => l.default_guidance,
        Some(g) => match g.as_f64() {
            Some(x) if (0.0..=100.0).contains(&x) => x as f32,
            _ => {
                return Err(ApiError::invalid(
                    "guidance_scale",
                    format!("`guidance_scale` is {g}, expected a number from 0 to 100"),
                ))
            }
        },
    };
    let sampler = match o.get("sampler") {
        None | Some(Value::Null) => l.default_sampler,
        Some(s) => s.as_str().and_then(SamplerKind::parse).ok_or_else(|| {
            ApiError::invalid(
                "sampler",
                format!("`sampler` is {s}, expected \"dpm-solver\" or \"euler\""),
            )
        })?,
    };
    Ok(ImageRequest {
        prompt,
        negative_prompt,
        n,
        width,
        height,
        seed,
        steps,
        guidance,
        sampler,
    })
}

/// An integer field in [lo, hi], `default` when absent.
fn uint(
    o: &Map<String, Value>,
    field: &'static str,
    default: u64,
    lo: u64,
    hi: u64,
) -> Result<u64, ApiError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_u64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(x),
            _ => Err(ApiError::invalid(
                field,
                format!("`{field}` is {v}, expected an integer from {lo} to {hi}"),
            )),
        },
    }
}

/// "WIDTHxHEIGHT", each side a multiple of the VAE's upscale and at most `max_side`.
fn parse_size(s: &str, l: &Limits) -> Result<(usize, usize), ApiError> {
    let bad = |why: String| ApiError::invalid("size", format!("`size` \"{s}\": {why}"));
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| bad("expected \"WIDTHxHEIGHT\", e.g. \"512x512\"".into()))?;
    let side = |t: &str| {
        t.parse::<usize>()
            .map_err(|_| bad(format!("`{t}` is not a whole number of pixels")))
    };
    let (w, h) = (side(w)?, side(h)?);
    let m = l.size_multiple;
    for v in [w, h] {
        if v == 0 || v % m != 0 || v > l.max_side {
            return Err(bad(format!(
                "each side must be a positive multiple of {m} and at most {}",
                l.max_side
            )));
        }
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            model_id: "openuni-tiny".into(),
            default_size: 256,
            size_multiple: 32,
            max_side: 1024,
            max_n: 4,
            max_steps: 100,
            max_prompt_chars: 100,
            default_steps: 20,
            default_guidance: 4.5,
            default_sampler: SamplerKind::DpmSolver,
        }
    }

    fn err(body: &str) -> ApiError {
        parse_image_request(body.as_bytes(), &limits()).unwrap_err()
    }

    #[test]
    fn defaults_and_fields() {
        let r = parse_image_request(br#"{"prompt":"a cat","size":"64x96","n":2,"seed":3,"steps":5,"guidance_scale":2.5,"model":"openuni-tiny","response_format":"b64_json","user":"u"}"#, &limits()).unwrap();
        assert_eq!(
            (r.width, r.height, r.n, r.seed, r.steps, r.guidance),
            (64, 96, 2, Some(3), 5, 2.5)
        );
        let r = parse_image_request(br#"{"prompt":"a cat"}"#, &limits()).unwrap();
        assert_eq!(
            (r.width, r.height, r.n, r.seed, r.steps),
            (256, 256, 1, None, 20)
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err("{").code, Some("invalid_json"));
        assert_eq!(err("[]").code, Some("invalid_json"));
        assert_eq!(err(r#"{"n":1}"#).param.as_deref(), Some("prompt"));
        assert_eq!(err(r#"{"prompt":""}"#).param.as_deref(), Some("prompt"));
        assert_eq!(err(r#"{"prompt":"a","n":0}"#).param.as_deref(), Some("n"));
        assert_eq!(err(r#"{"prompt":"a","n":5}"#).param.as_deref(), Some("n"));
        assert_eq!(
            err(r#"{"prompt":"a","size":"100x64"}"#).param.as_deref(),
            Some("size")
        );
        assert_eq!(
            err(r#"{"prompt":"a","size":"2048x64"}"#).param.as_deref(),
            Some("size")
        );
        assert_eq!(
            err(r#"{"prompt":"a","size":"big"}"#).param.as_deref(),
            Some("size")
        );
        assert_eq!(
            err(r#"{"prompt":"a","response_format":"url"}"#)
                .param
                .as_deref(),
            Some("response_format")
        );
        assert_eq!(
            err(r#"{"prompt":"a","steps":0}"#).param.as_deref(),
            Some("steps")
        );
        assert_eq!(
            err(r#"{"prompt":"a","seed":-1}"#).param.as_deref(),
            Some("seed")
        );
        assert_eq!(
            err(r#"{"prompt":"a","guidance_scale":"x"}"#)
                .param
                .as_deref(),
            Some("guidance_scale")
        );
        assert_eq!(
            err(r#"{"prompt":"a","model":"dall-e-3"}"#).param.as_deref(),
            Some("model")
        );
        assert_eq!(
            err(r#"{"prompt":"a","sampler":"ddim"}"#).param.as_deref(),
            Some("sampler")
        );
        let e = err(r#"{"prompt":"a","colour":1}"#);
        assert!(e.message.contains("`colour`"), "{}", e.message);
        let long = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(101));
        assert_eq!(err(&long).param.as_deref(), Some("prompt"));
        assert_eq!(
            err(&format!(r#"{{"prompt":"a","n":2,"seed":{}}}"#, u64::MAX))
                .param
                .as_deref(),
            Some("seed")
        );
    }
}
