//! The benchmarks' own prompt files, and the work they make: which images, with which seeds, go
//! into which file of the layout its scorer reads.
//!
//! - GenEval (github.com/djghosh13/geneval, `generation/diffusers_generate.py`): reads
//!   `evaluation_metadata.jsonl`, one JSON object per line with `prompt`; writes
//!   `{index:05}/metadata.jsonl` (that line's object) and `{index:05}/samples/{k:05}.png`
//!   (`evaluation/evaluate_images.py` globs `samples/*.png`).
//! - DPG-Bench (github.com/TencentQQGYLab/ELLA, `dpg_bench/compute_dpg_bench.py`): prompts are
//!   `prompts/{name}.txt`; the scorer opens `{name}.png` (the key is the file name up to its
//!   first '.') and crops four `resolution`-sized tiles in the order top-left, top-right,
//!   bottom-left, bottom-right: one 2x2 grid of 4 samples per prompt.
//! - WISE (github.com/PKU-YuanGroup/WISE, `gpt_eval.py`): a JSON list of objects with an integer
//!   `prompt_id` and a string `Prompt` (plus `Explanation`, `Subcategory`); the scorer opens
//!   `{prompt_id}.png`, one image per prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::generate::limits;

/// Which benchmark's formats are read and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Benchmark {
    GenEval,
    Dpg,
    Wise,
}

/// DPG-Bench's grid: 2x2 samples of one prompt.
pub const DPG_SAMPLES: usize = 4;
/// GenEval's images per prompt when `--samples` is not given.
pub const GENEVAL_DEFAULT_SAMPLES: usize = 4;

impl Benchmark {
    pub fn parse(s: &str) -> Result<Benchmark> {
        match s {
            "geneval" => Ok(Benchmark::GenEval),
            "dpg" => Ok(Benchmark::Dpg),
            "wise" => Ok(Benchmark::Wise),
            _ => bail!("--eval `{s}` is not one of geneval, dpg, wise"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Benchmark::GenEval => "geneval",
            Benchmark::Dpg => "dpg",
            Benchmark::Wise => "wise",
        }
    }

    /// Images per prompt: `--samples` for GenEval (default 4); fixed for the others.
    pub fn samples(self, flag: Option<usize>) -> Result<usize> {
        match (self, flag) {
            (Benchmark::GenEval, n) => Ok(n.unwrap_or(GENEVAL_DEFAULT_SAMPLES)),
            (Benchmark::Dpg, None | Some(DPG_SAMPLES)) => Ok(DPG_SAMPLES),
            (Benchmark::Wise, None | Some(1)) => Ok(1),
            (b, Some(n)) => bail!(
                "--samples {n}: --eval {} makes {} per prompt (its scorer reads {})",
                b.name(),
                if b == Benchmark::Dpg {
                    "4 samples"
                } else {
                    "1 image"
                },
                if b == Benchmark::Dpg {
                    "a 2x2 grid"
                } else {
                    "one image per prompt id"
                }
            ),
        }
    }
}

/// One prompt of a benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPrompt {
    pub text: String,
    /// The name its files take: DPG's file stem, WISE's prompt_id (GenEval names by index).
    pub key: String,
    /// GenEval: the line's JSON object as written in the file, saved back as metadata.jsonl.
    pub metadata: Option<String>,
}

/// Reads `path` in `bench`'s format. Every malformed entry is an error naming the file and the
/// line, entry or field: a benchmark's set is scored whole, so nothing is skipped.
pub fn read(bench: Benchmark, path: &Path) -> Result<Vec<EvalPrompt>> {
    let prompts = match bench {
        Benchmark::GenEval => read_geneval(path)?,
        Benchmark::Dpg => read_dpg(path)?,
        Benchmark::Wise => read_wise(path)?,
    };
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

fn read_text(path: &Path, what: &str) -> Result<String> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("{}: cannot read the {what}", path.display()))?
        .len();
    if size > limits::PROMPTS_FILE_BYTES {
        bail!(
            "{}: the {what} is {size} bytes, above the limit of {} bytes",
            path.display(),
            limits::PROMPTS_FILE_BYTES
        );
    }
    let bytes = std::fs::read(path)
        .with_context(|| format!("{}: cannot read the {what}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: the {what} is not UTF-8 (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn check_length(text: &str, at: impl FnOnce() -> String) -> Result<()> {
    limits::check_prompt("prompt", text).map_err(|e| anyhow::anyhow!("{}: {e}", at()))
}

/// GenEval's `evaluation_metadata.jsonl`: the prompt index is the line number - 1 (its generator
/// enumerates the lines), so an empty line is an error rather than a silent shift of every index.
fn read_geneval(path: &Path) -> Result<Vec<EvalPrompt>> {
    let text = read_text(path, "GenEval metadata file")?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), i + 1);
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            bail!("{}: empty line (GenEval numbers prompts by line: every line must be a JSON object with `prompt`)", at());
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", at()))?;
        let Some(obj) = v.as_object() else {
            bail!("{}: expected a JSON object, found {}", at(), kind(&v))
        };
        let prompt = match obj.get("prompt") {
            Some(serde_json::Value::String(p)) => p.clone(),
            Some(other) => bail!(
                "{}: field `prompt`: expected a string, found {}",
                at(),
                kind(other)
            ),
            None => bail!("{}: no field `prompt`", at()),
        };
        check_length(&prompt, at)?;
        out.push(EvalPrompt {
            key: format!("{:05}", out.len()),
            text: prompt,
            metadata: Some(line.trim().to_string()),
        });
    }
    Ok(out)
}

/// DPG-Bench's prompt folder: one `.txt` per prompt, in file-name order.
fn read_dpg(path: &Path) -> Result<Vec<EvalPrompt>> {
    if !path.is_dir() {
        bail!("{}: --eval dpg reads a folder of prompt files (DPG-Bench's `prompts/`, one .txt per prompt), not a file", path.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list the prompt folder", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "txt") && p.is_file())
        .collect();
    files.sort();
    let mut seen: HashMap<String, PathBuf> = HashMap::new();
    let mut out = vec![];
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The scorer's key: the image's base name up to its first '.'.
        let key = name.split('.').next().unwrap_or_default().to_string();
        if key.is_empty() || key.contains(|c: char| c == '/' || c == '\\') {
            bail!("{}: the file name gives no image name (the scorer keys images by the name before the first '.')", f.display());
        }
        if let Some(other) = seen.insert(key.clone(), f.clone()) {
            bail!("{} and {}: both name the image {key}.png (the scorer keys by the name before the first '.')", other.display(), f.display());
        }
        let text = read_text(&f, "DPG-Bench prompt file")?.trim().to_string();
        if text.is_empty() {
            bail!("{}: empty prompt", f.display());
        }
        check_length(&text, || f.display().to_string())?;
        out.push(EvalPrompt {
            text,
            key,
            metadata: None,
        });
    }
    Ok(out)
}

/// WISE's JSON: a list of objects with an integer `prompt_id` and a string `Prompt`.
fn read_wise(path: &Path) -> Result<Vec<EvalPrompt>> {
    let text = read_text(path, "WISE prompt file")?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
    let Some(list) = v.as_array() else {
        bail!(
            "{}: expected a JSON list of prompt objects, found {}",
            path.display(),
            kind(&v)
        )
    };
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut out = vec![];
    for (i, e) in list.iter().enumerate() {
        let at = || format!("{}: entry {i}", path.display());
        let Some(obj) = e.as_object() else {
            bail!("{}: expected an object, found {}", at(), kind(e))
        };
        let id = match obj.get("prompt_id") {
            Some(serde_json::Value::Number(n)) if n.as_u64().is_some() => {
                n.as_u64().expect("checked")
            }
            Some(other) => bail!(
                "{}: field `prompt_id`: expected a non-negative integer, found {other}",
                at()
            ),
            None => bail!("{}: no field `prompt_id`", at()),
        };
        let prompt = match obj.get("Prompt") {
            Some(serde_json::Value::String(p)) => p.clone(),
            Some(other) => bail!("{} (prompt_id {id}): field `Prompt`: expected a string, found {}", at(), kind(other)),
            None => bail!("{} (prompt_id {id}): no field `Prompt` (WISE's prompt text; the field name is capitalised)", at()),
        };
        if let Some(first) = seen.insert(id, i) {
            bail!(
                "{}: prompt_id {id} again (first at entry {first}): both would be {id}.png",
                at()
            );
        }
        check_length(&prompt, at)?;
        out.push(EvalPrompt {
            text: prompt,
            key: id.to_string(),
            metadata: None,
        });
    }
    Ok(out)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One output file: a work item of the queue and of the shards.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkItem {
    /// Position in the whole set's list of files.
    pub id: usize,
    /// Index of the prompt in the file.
    pub prompt: usize,
    /// The sample indices the file holds (GenEval and WISE: one; DPG: 0..4, as a 2x2 grid).
    pub samples: Vec<usize>,
    /// The file, relative to the output folder.
    pub file: PathBuf,
}

/// Every file of the set, in a fixed order: prompt by prompt, sample by sample.
pub fn work_items(bench: Benchmark, prompts: &[EvalPrompt], samples: usize) -> Vec<WorkItem> {
    let mut out = vec![];
    for (p, prompt) in prompts.iter().enumerate() {
        match bench {
            Benchmark::GenEval => {
                for k in 0..samples {
                    let file = PathBuf::from(format!("{p:05}"))
                        .join("samples")
                        .join(format!("{k:05}.png"));
                    out.push(WorkItem {
                        id: out.len(),
                        prompt: p,
                        samples: vec![k],
                        file,
                    });
                }
            }
            Benchmark::Dpg => out.push(WorkItem {
                id: out.len(),
                prompt: p,
                samples: (0..DPG_SAMPLES).collect(),
                file: format!("{}.png", prompt.key).into(),
            }),
            Benchmark::Wise => out.push(WorkItem {
                id: out.len(),
                prompt: p,
                samples: vec![0],
                file: format!("{}.png", prompt.key).into(),
            }),
        }
    }
    out
}

/// The batches of the whole set: consecutive files packed up to `batch` images (at least one
/// file each), as indices into `items`. The pipeline's batched images agree with single ones only
/// to float rounding (GEMM blocking follows the batch size), so a file is bit-identical across
/// shards, devices and re-runs because every batch is this fixed one, whoever makes it.
pub fn batches(items: &[WorkItem], batch: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut n = 0;
    for (i, w) in items.iter().enumerate() {
        let k = w.samples.len();
        match out.last_mut() {
            Some(last) if n + k <= batch.max(1) => last.push(i),
            _ => {
                out.push(vec![i]);
                n = 0;
            }
        }
        n += k;
    }
    out
}

/// The seed of sample `sample` of prompt `prompt`: a pure function of (base seed, prompt index,
/// sample index), so that any subset (a shard, a re-run, another batch size or device count)
/// makes the same noise. splitmix64 (Steele, Lea, Flood 2014) of each part in turn:
/// `mix(mix(mix(base) ^ prompt) ^ sample)`.
pub fn image_seed(base: u64, prompt: usize, sample: usize) -> u64 {
    fn mix(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    mix(mix(mix(base) ^ prompt as u64) ^ sample as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_pack_whole_files_up_to_the_batch_size() {
        let p = |n: usize| {
            (0..n)
                .map(|i| EvalPrompt {
                    text: format!("p{i}"),
                    key: i.to_string(),
                    metadata: None,
                })
                .collect::<Vec<_>>()
        };
        let g = work_items(Benchmark::GenEval, &p(3), 2);
        assert_eq!(g.len(), 6);
        assert_eq!(g[3].file, PathBuf::from("00001/samples/00001.png"));
        assert_eq!(batches(&g, 4), vec![vec![0, 1, 2, 3], vec![4, 5]]);
        assert_eq!(batches(&g, 1), (0..6).map(|i| vec![i]).collect::<Vec<_>>());
        // A DPG grid is 4 images: one per batch below 5, never split.
        let d = work_items(Benchmark::Dpg, &p(3), DPG_SAMPLES);
        assert_eq!(batches(&d, 2), vec![vec![0], vec![1], vec![2]]);
        assert_eq!(batches(&d, 8), vec![vec![0, 1], vec![2]]);
    }

    #[test]
    fn seeds_differ_by_prompt_and_sample_and_are_stable() {
        let s = image_seed(42, 0, 0);
        assert_ne!(s, image_seed(42, 0, 1));
        assert_ne!(s, image_seed(42, 1, 0));
        assert_ne!(image_seed(42, 1, 0), image_seed(42, 0, 1));
        assert_ne!(s, image_seed(43, 0, 0));
        // splitmix64's first output for seed 0 is 0xE220A8397B1DCDAF (its published test value).
        let mix0 = {
            let mut z = 0x9E37_79B9_7F4A_7C15u64;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        assert_eq!(mix0, 0xE220_A839_7B1D_CDAF);
    }
}
