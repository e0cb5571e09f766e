//! Reading upstream config.json files with errors that name the file and the field.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::ModelError;

/// Parses a JSON config. Upstream configs may hold `Infinity`/`-Infinity` (diffusers'
/// scheduler configs do), which strict JSON rejects; they are read as null.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let err = |msg: String| ModelError::Config { path: path.display().to_string(), msg };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let text = text.replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null");
    serde_json::from_str(&text).map_err(|e| err(format!("invalid config: {e}")))
}

/// The vision tower and projector settings of an InternVL `config.json` (original nesting with
/// `vision_config`/`llm_config`, or transformers' `vision_config`/`text_config`).
pub fn read_internvl_vision(path: &Path) -> Result<crate::internvit::InternVlVisionConfig, ModelError> {
    let cfg: serde_json::Value = read_json(path)?;
    crate::internvit::InternVlVisionConfig::from_json(&cfg, &path.display().to_string())
}
