//! OpenUni's text-to-image prompt strings and their tokenization.
//!
//! Upstream (`prepare_text_conditions` in `internvl3_sana_hf.py`, templates in the dataset
//! `processors.py`) builds, with no system prompt:
//!
//! - cond: `<|im_start|>user\nGenerate an image: {prompt.strip()}<|im_end|>\n<|im_start|>assistant\n<img>`
//! - uncond: `<|im_start|>user\nGenerate an image.<|im_end|>\n<|im_start|>assistant\n<img>`
//! - uncond with a negative prompt X: the cond form with `X.strip()`
//!
//! and encodes each with the HF tokenizer and `add_special_tokens=True` (Qwen2 adds no BOS/EOS).
//! The prompt is only stripped, with Python's `str.strip()` (see [`py_strip`]).
//!
//! Upstream would tokenize special-token text inside a prompt (`<|im_end|>`, `<img>`) as the
//! special token itself, letting a prompt close the user turn and break the template. Here that
//! is an error naming the token.

use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const IMG_START: &str = "<img>";

/// `INSTRUCTION.format(input=...) + '<img>'`.
fn template(input: &str) -> String {
    format!("{IM_START}user\n{input}{IM_END}\n{IM_START}assistant\n{IMG_START}")
}

/// Python's `str.isspace()`: Unicode White_Space plus the separators U+001C..U+001F.
pub fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` with no argument.
pub fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// The exact conditional string upstream builds (no validation).
pub fn cond_text(prompt: &str) -> String {
    template(&format!("Generate an image: {}", py_strip(prompt)))
}

/// The exact unconditional string: the `CFG` instruction, or a negative prompt in the cond form.
pub fn uncond_text(negative_prompt: Option<&str>) -> String {
    match negative_prompt {
        None => template("Generate an image."),
        Some(x) => template(&format!("Generate an image: {}", py_strip(x))),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{path}: cannot load the tokenizer: {msg}")]
    Load { path: PathBuf, msg: String },
    #[error("{path}: the tokenizer has no special token `{token}`, which OpenUni's prompt template needs")]
    MissingToken { path: PathBuf, token: String },
    #[error("the {which} is empty (after stripping whitespace){hint}")]
    Empty {
        which: &'static str,
        hint: &'static str,
    },
    #[error(
        "the {which} contains the special token `{token}`; it would be read as that token and break \
         OpenUni's chat template, so it is refused"
    )]
    SpecialToken { which: &'static str, token: String },
    #[error(
        "the {which} is {len} tokens after templating, longer than the maximum of {max} tokens"
    )]
    TooLong {
        which: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{path}: cannot tokenize the {which}: {msg}")]
    Encode {
        path: PathBuf,
        which: &'static str,
        msg: String,
    },
}

pub type PromptResult<T> = std::result::Result<T, PromptError>;

/// Token ids of the two rows OpenUni runs through the LLM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptIds {
    pub cond: Vec<u32>,
    pub uncond: Vec<u32>,
}

/// The HF tokenizer of an InternVL3 / Qwen2 model folder with OpenUni's prompt template.
pub struct PromptTokenizer {
    tok: Tokenizer,
    path: PathBuf,
    /// Contents of the special added tokens, longest first.
    specials: Vec<String>,
    special_ids: Vec<u32>,
    /// How many special ids a correctly templated row holds (the template's four plus whatever the
    /// post-processor adds).
    template_specials: usize,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("path", &self.path)
            .field("specials", &self.specials)
            .finish()
    }
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> PromptResult<PromptTokenizer> {
        PromptTokenizer::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a `tokenizer.json` and checks it has the template's special tokens.
    pub fn from_file(path: &Path) -> PromptResult<PromptTokenizer> {
        let load = |msg: String| PromptError::Load {
            path: path.into(),
            msg,
        };
        if !path.is_file() {
            return Err(load(if path.exists() {
                "not a file".into()
            } else {
                "file not found".into()
            }));
        }
        let tok =
            Tokenizer::from_file(path).map_err(|e| load(format!("invalid tokenizer.json: {e}")))?;
        let mut added: Vec<(u32, String)> = tok
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        added.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        for t in [IM_START, IM_END, IMG_START] {
            if !added.iter().any(|(_, c)| c == t) {
                return Err(PromptError::MissingToken {
                    path: path.into(),
                    token: t.into(),
                });
            }
        }
        let mut me = PromptTokenizer {
            tok,
            path: path.into(),
            special_ids: added.iter().map(|(id, _)| *id).collect(),
            specials: added.into_iter().map(|(_, c)| c).collect(),
            template_specials: 0,
        };
        let plain = me.encode_text(&uncond_text(None), "unconditional prompt")?;
        me.template_specials = me.count_specials(&plain);
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// The id of a token (added or in the BPE vocabulary).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Encodes any text as upstream's `tokenizer.encode(text, add_special_tokens=True)`.
    pub fn encode_text(&self, text: &str, which: &'static str) -> PromptResult<Vec<u32>> {
        let enc = self
            .tok
            .encode(text, true)
            .map_err(|e| PromptError::Encode {
                path: self.path.clone(),
                which,
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    fn count_specials(&self, ids: &[u32]) -> usize {
        ids.iter()
            .filter(|id| self.special_ids.contains(id))
            .count()
    }

    /// Checks a user text: not empty after stripping, and free of special-token text.
    fn check_user_text(&self, text: &str, which: &'static str) -> PromptResult<()> {
        let s = py_strip(text);
        if s.is_empty() {
            let hint = if which == "negative prompt" {
                "; leave it out for the default unconditional prompt"
            } else {
                ""
            };
            return Err(PromptError::Empty { which, hint });
        }
        // The earliest special token in the text (longest first at equal positions).
        let found = self
            .specials
            .iter()
            .filter_map(|t| s.find(t.as_str()).map(|p| (p, t)))
            .min_by_key(|(p, _)| *p);
        if let Some((_, t)) = found {
            return Err(PromptError::SpecialToken {
                which,
                token: t.clone(),
            });
        }
        Ok(())
    }

    fn encode_row(
        &self,
        text: &str,
        which: &'static str,
        max_tokens: usize,
    ) -> PromptResult<Vec<u32>> {
        let ids = self.encode_text(text, which)?;
        // A prompt whose edge merges with the template into a special token would change the count.
        if self.count_specials(&ids) != self.template_specials {
            return Err(PromptError::SpecialToken {
                which,
                token: "(formed together with the template text)".into(),
            });
        }
        if ids.len() > max_tokens {
            return Err(PromptError::TooLong {
                which,
                len: ids.len(),
                max: max_tokens,
            });
        }
        Ok(ids)
    }

    /// Ids of the conditional row; `max_tokens` bounds the templated length (the model's context
    /// minus the meta-queries).
    pub fn cond_ids(&self, prompt: &str, max_tokens: usize) -> PromptResult<Vec<u32>> {
        self.check_user_text(prompt, "prompt")?;
        self.encode_row(&cond_text(prompt), "prompt", max_tokens)
    }

    /// Ids of the unconditional row: `Generate an image.`, or the negative prompt.
    pub fn uncond_ids(
        &self,
        negative_prompt: Option<&str>,
        max_tokens: usize,
    ) -> PromptResult<Vec<u32>> {
        if let Some(x) = negative_prompt {
            self.check_user_text(x, "negative prompt")?;
        }
        let which = if negative_prompt.is_some() {
            "negative prompt"
        } else {
            "unconditional prompt"
        };
        self.encode_row(&uncond_text(negative_prompt), which, max_tokens)
    }

    /// Both rows.
    pub fn encode(
        &self,
        prompt: &str,
        negative_prompt: Option<&str>,
        max_tokens: usize,
    ) -> PromptResult<PromptIds> {
        Ok(PromptIds {
            cond: self.cond_ids(prompt, max_tokens)?,
            uncond: self.uncond_ids(negative_prompt, max_tokens)?,
        })
    }
}
