//! Reading upstream config.json files. Every model config goes through [`read_config`] (or, for
//! the multimodal LLM folder, [`read_mllm_config`]): parsed with errors that name the file and the
//! field, then checked against sane bounds ([`ModelConfig::validate`]) before anything is built or
//! allocated. The bounds sit in one `validate` per config, well above every published model, so
//! that an absurd value (2^62 layers, a zero head dim, a NaN eps) is an error naming the file, the
//! field, the value and the bound instead of an overflow, a division by zero or an allocation abort.

use std::ops::RangeInclusive;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::qwen2::Qwen2Config;
use crate::{ModelError, Result};

/// Generous bounds shared by the configs (the largest published models are far inside them).
pub mod bounds {
    /// Transformer / decoder layers of one model or stage.
    pub const LAYERS: usize = 1024;
    /// A hidden width (d_model, channels of a stage).
    pub const WIDTH: usize = 65536;
    /// An MLP's inner width.
    pub const MLP_WIDTH: usize = 4 * WIDTH;
    /// Attention heads.
    pub const HEADS: usize = 1024;
    /// One head's width.
    pub const HEAD_DIM: usize = 1024;
    /// Vocabulary entries (Qwen2 has 151,936; the largest published ~256K).
    pub const VOCAB: usize = 1 << 22;
    /// Positions of a model's context.
    pub const POSITIONS: usize = 1 << 24;
    /// Latent / image channels.
    pub const CHANNELS: usize = 4096;
}

/// A model config that can check itself. `validate` refuses out-of-bound values naming the field;
/// callers never see an unchecked config from [`read_config`].
pub trait ModelConfig: DeserializeOwned {
    fn validate(&self, origin: &str) -> Result<()>;
}

/// Reads and validates a model config (`config.json` of a transformer, VAE, connector, ...).
pub fn read_config<T: ModelConfig>(path: &Path) -> Result<T> {
    let origin = path.display().to_string();
    let cfg: T = read_json(path)?;
    cfg.validate(&origin)?;
    Ok(cfg)
}

/// Parses and validates a model config held as JSON (a `case.json` field, a built-in variant);
/// `origin` names it in errors.
pub fn parse_config<T: ModelConfig>(value: serde_json::Value, origin: &str) -> Result<T> {
    let cfg: T = from_value(value, origin)?;
    cfg.validate(origin)?;
    Ok(cfg)
}

/// The config of a multimodal LLM folder: an InternVL3 folder nests its Qwen2 decoder under
/// `llm_config` (transformers' native InternVL layout: `text_config`) and its vision tower under
/// `vision_config`; a plain Qwen2 folder is the decoder config itself. Every entry point
/// (generate, chat, verify, bench, tests) reads an LLM folder through [`read_mllm_config`] /
/// [`MllmConfig::from_value`], so the nesting is handled in one place. The vision settings are
/// parsed only when asked for ([`MllmConfig::vision`]): text-to-image never reads them, so a
/// vision setting this port does not implement does not stop it.
#[derive(Clone, Debug, PartialEq)]
pub struct MllmConfig {
    /// The Qwen2 decoder.
    pub llm: Qwen2Config,
    /// The chat template named by the config (`template`; InternVL3: `internvl2_5`), if any.
    pub template: Option<String>,
    /// The whole config.json, for the vision settings.
    raw: serde_json::Value,
    origin: String,
}

impl MllmConfig {
    /// From a parsed config.json (`origin` names the file in errors).
    pub fn from_value(raw: serde_json::Value, origin: &str) -> Result<MllmConfig> {
        let nested = ["llm_config", "text_config"]
            .into_iter()
            .find_map(|k| Some((k, raw.get(k)?)));
        let llm = match nested {
            Some((key, nested)) => parse_config(nested.clone(), &format!("{origin}: {key}"))?,
            None => parse_config(raw.clone(), origin)?,
        };
        let template = match raw.get("template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) => Some(t.clone()),
            Some(other) => {
                return Err(ModelError::Config {
                    path: origin.into(),
                    msg: format!("field `template`: {other} is not a template name"),
                })
            }
        };
        Ok(MllmConfig {
            llm,
            template,
            raw,
            origin: origin.into(),
        })
    }

    /// Whether the config has a vision tower section.
    pub fn has_vision(&self) -> bool {
        self.raw.get("vision_config").is_some_and(|v| v.is_object())
    }

    /// The vision tower and projector settings (an error naming the file when there is no
    /// `vision_config` or a setting is not supported).
    pub fn vision(&self) -> Result<crate::internvit::InternVlVisionConfig> {
        crate::internvit::InternVlVisionConfig::from_json(&self.raw, &self.origin)
    }
}

/// Reads the config.json of a Qwen2 or InternVL3 folder (see [`MllmConfig`]).
pub fn read_mllm_config(path: &Path) -> Result<MllmConfig> {
    MllmConfig::from_value(read_json(path)?, &path.display().to_string())
}

/// The diffusers scheduler config next to a SANA transformer (`scheduler/scheduler_config.json`);
/// only `flow_shift` is read.
#[derive(Clone, Debug, serde::Deserialize, PartialEq)]
pub struct SchedulerConfig {
    pub flow_shift: f64,
}

/// The largest flow shift accepted (SANA uses 3.0 at 512 px, up to ~6 at 4K).
pub const MAX_FLOW_SHIFT: f64 = 1000.0;

impl ModelConfig for SchedulerConfig {
    fn validate(&self, origin: &str) -> Result<()> {
        Bounds(origin).positive("flow_shift", self.flow_shift, MAX_FLOW_SHIFT)
    }
}

/// Parses a JSON config file. Upstream configs may hold `Infinity`/`-Infinity` (diffusers'
/// scheduler configs do), which strict JSON rejects; they are read as null. A type error names
/// the field (`llm_config.num_hidden_layers: invalid value ...`).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let err = |msg: String| ModelError::Config {
        path: path.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| err(describe(e)))
}

/// [`read_json`] for JSON already parsed.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value, origin: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| ModelError::Config {
        path: origin.into(),
        msg: describe(e),
    })
}

fn describe(e: serde_path_to_error::Error<serde_json::Error>) -> String {
    let path = e.path().to_string();
    let inner = e.inner().to_string();
    // NaN and Infinity are read as null: say so, since the file says NaN.
    let hint = if inner.contains("invalid type: null") {
        " (NaN, Infinity and null are not accepted here)"
    } else {
        ""
    };
    if path == "." || path.is_empty() {
        format!("invalid config: {inner}{hint}")
    } else {
        format!("invalid config: field `{path}`: {inner}{hint}")
    }
}

/// Bound checks that name the file, the field, the value and the bound.
pub(crate) struct Bounds<'a>(pub &'a str);

impl Bounds<'_> {
    fn fail<T>(&self, field: &str, msg: String) -> Result<T> {
        Err(ModelError::Config {
            path: self.0.into(),
            msg: format!("field `{field}`: {msg}"),
        })
    }

    /// An integer in `range`.
    pub fn int(&self, field: &str, value: usize, range: RangeInclusive<usize>) -> Result<()> {
        if !range.contains(&value) {
            return self.fail(
                field,
                format!(
                    "{value} is out of bounds (expected {} to {})",
                    range.start(),
                    range.end()
                ),
            );
        }
        Ok(())
    }

    /// Every entry of a list in `range`, and the list's length in `len`.
    pub fn ints(
        &self,
        field: &str,
        values: &[usize],
        len: RangeInclusive<usize>,
        range: RangeInclusive<usize>,
    ) -> Result<()> {
        if !len.contains(&values.len()) {
            return self.fail(
                field,
                format!(
                    "has {} entries (expected {} to {})",
                    values.len(),
                    len.start(),
                    len.end()
                ),
            );
        }
        for (i, &v) in values.iter().enumerate() {
            self.int(&format!("{field}[{i}]"), v, range.clone())?;
        }
        Ok(())
    }

    /// A finite number in (0, max].
    pub fn positive(&self, field: &str, value: f64, max: f64) -> Result<()> {
        if !(value.is_finite() && value > 0.0 && value <= max) {
            return self.fail(
                field,
                format!("{value} is out of bounds (expected a finite number in (0, {max}])"),
            );
        }
        Ok(())
    }

    /// `a * b` (a derived size) in `range`, computed without overflow.
    pub fn product(
        &self,
        what: &str,
        a: usize,
        b: usize,
        range: RangeInclusive<usize>,
    ) -> Result<usize> {
        match a.checked_mul(b) {
            Some(p) if range.contains(&p) => Ok(p),
            Some(p) => self.fail(
                what,
                format!(
                    "{a} x {b} = {p} is out of bounds (expected {} to {})",
                    range.start(),
                    range.end()
                ),
            ),
            None => self.fail(what, format!("{a} x {b} overflows")),
        }
    }

    /// `value` divisible by `by` (`by` already checked non-zero).
    pub fn divisible(&self, field: &str, value: usize, by_field: &str, by: usize) -> Result<()> {
        if by == 0 || value % by != 0 {
            return self.fail(
                field,
                format!("{value} is not a multiple of `{by_field}` {by}"),
            );
        }
        Ok(())
    }
}

/// The vision tower and projector settings of an InternVL `config.json` (original nesting with
/// `vision_config`/`llm_config`, or transformers' `vision_config`/`text_config`), through the one
/// reader [`read_mllm_config`].
pub fn read_internvl_vision(
    path: &Path,
) -> Result<crate::internvit::InternVlVisionConfig, ModelError> {
    read_mllm_config(path)?.vision()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_name_the_field_value_and_bound() {
        let b = Bounds("cfg.json");
        let e = b
            .int("num_layers", 1 << 62, 1..=1024)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cfg.json")
                && e.contains("num_layers")
                && e.contains(&(1usize << 62).to_string())
                && e.contains("1024"),
            "{e}"
        );
        assert!(b.positive("eps", f64::NAN, 1.0).is_err());
        assert!(b.positive("eps", 0.0, 1.0).is_err());
        assert!(b.positive("eps", f64::INFINITY, 1.0).is_err());
        assert!(b.positive("eps", 1e-6, 1.0).is_ok());
        assert!(b
            .product("dim", usize::MAX, 2, 1..=10)
            .unwrap_err()
            .to_string()
            .contains("overflows"));
        assert!(b.divisible("hidden_size", 10, "heads", 0).is_err());
    }

    fn qwen2() -> serde_json::Value {
        serde_json::json!({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 256, "rope_theta": 1e6})
    }

    #[test]
    fn mllm_reader_takes_nested_or_plain_configs() {
        let plain = MllmConfig::from_value(qwen2(), "plain.json").unwrap();
        let nested = serde_json::json!({"llm_config": qwen2(), "vision_config": {"hidden_size": 32}, "template": "internvl2_5"});
        assert_eq!(
            MllmConfig::from_value(nested, "nested.json").unwrap().llm,
            plain.llm
        );
        // transformers' native layout nests the decoder under `text_config`.
        let native =
            serde_json::json!({"text_config": qwen2(), "vision_config": {"hidden_size": 32}});
        let native = MllmConfig::from_value(native, "native.json").unwrap();
        assert_eq!(native.llm, plain.llm);
        assert!(native.has_vision() && !plain.has_vision());
        // The vision settings are parsed on request, with the file named.
        let e = native.vision().unwrap_err().to_string();
        assert!(
            e.contains("native.json") && e.contains("vision_config"),
            "{e}"
        );
        let e = plain.vision().unwrap_err().to_string();
        assert!(
            e.contains("plain.json") && e.contains("no vision tower"),
            "{e}"
        );
        let t = MllmConfig::from_value(
            serde_json::json!({"llm_config": qwen2(), "template": "internvl2_5"}),
            "t.json",
        )
        .unwrap();
        assert_eq!(t.template.as_deref(), Some("internvl2_5"));
        assert!(MllmConfig::from_value(
            serde_json::json!({"llm_config": qwen2(), "template": 3}),
            "t.json"
        )
        .is_err());
        // Errors inside the nesting say where.
        let mut bad = qwen2();
        bad["num_hidden_layers"] = serde_json::json!(1u64 << 62);
        let e = MllmConfig::from_value(serde_json::json!({"llm_config": bad}), "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cfg.json: llm_config")
                && e.contains("num_hidden_layers")
                && e.contains("1024"),
            "{e}"
        );
        let mut bad = qwen2();
        bad.as_object_mut().unwrap().remove("intermediate_size");
        let e = MllmConfig::from_value(serde_json::json!({"llm_config": bad}), "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("llm_config") && e.contains("intermediate_size"),
            "{e}"
        );
    }
}
