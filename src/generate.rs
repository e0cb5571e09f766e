//! `openuni generate`: prompts in, PNG files out.
//!
//! Models are found offline: explicit flags first, then the Hugging Face cache layout that
//! `huggingface-cli download` creates; with nothing configured and nothing cached, the built-in
//! tiny model runs (and says its pictures are not meaningful).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use openuni_models::connector::ConnectorConfig;
use openuni_models::prompt::PromptTokenizer;
use openuni_models::variant::{self, Published, Variant, CHECKPOINT_REPO};
use openuni_tensor::{DType, HostTensor};

use crate::exec::Device;
use crate::image::{write_png, Existing};
use crate::pipeline::{
    to_uint8_nhwc, DecodeOptions, GenerationBatch, LatentNoise, MemoryPlan, ModelPaths, OpenUni,
    RunOptions, SamplingParams,
};
use crate::tiny_model;

/// A published variant by name (the tiny model is `generate`'s fallback, not a choice).
pub fn variant(name: &str) -> Result<&'static Variant> {
    variant::published(name).map_err(anyhow::Error::msg)
}

/// Bounds of the flags, checked when the command line is parsed (before anything is built), so
/// that an absurd value is an error naming the flag, the value and the bound rather than a
/// wrapped size, an allocation abort or a grey picture.
pub mod limits {
    pub const STEPS: (usize, usize) = (1, 1000);
    /// Image side in pixels (the largest SANA model makes 4096²).
    pub const SIDE: (usize, usize) = (32, 8192);
    pub const BATCH: (usize, usize) = (1, 256);
    pub const ITERS: (usize, usize) = (1, 10_000);
    /// Classifier-free guidance scale (OpenUni uses 4.5; 1 is the conditional model alone).
    pub const GUIDANCE: (f32, f32) = (0.0, 100.0);
    /// Bytes of one prompt, checked before it is tokenized.
    pub const PROMPT_BYTES: usize = 64 << 10;
    /// Bytes of a prompts file.
    pub const PROMPTS_FILE_BYTES: u64 = 256 << 20;

    /// A clap value parser for an integer in `lo..=hi`.
    pub fn usize_in(
        lo: usize,
        hi: usize,
    ) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
        move |s: &str| {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("not a non-negative integer (allowed: {lo}..={hi})"));
            }
            match s.parse::<usize>() {
                Ok(v) if (lo..=hi).contains(&v) => Ok(v),
                _ => Err(format!("out of range: allowed {lo}..={hi}")),
            }
        }
    }

    /// A clap value parser for a finite number in `lo..=hi` (NaN and infinities refused).
    pub fn f32_in(
        lo: f32,
        hi: f32,
    ) -> impl Fn(&str) -> Result<f32, String> + Clone + Send + Sync + 'static {
        move |s: &str| {
            let v: f64 = s
                .trim()
                .parse()
                .map_err(|_| format!("not a number (allowed: {lo}..={hi})"))?;
            if !v.is_finite() {
                return Err(format!("not a finite number (allowed: {lo}..={hi})"));
            }
            if v < lo as f64 || v > hi as f64 {
                return Err(format!("out of range: allowed {lo}..={hi}"));
            }
            Ok(v as f32)
        }
    }

    /// An error unless `text` (what: "prompt", "negative prompt") is at most `PROMPT_BYTES`.
    pub fn check_prompt(what: &str, text: &str) -> Result<(), String> {
        if text.len() > PROMPT_BYTES {
            return Err(format!("the {what} is {} bytes, above the limit of {PROMPT_BYTES} bytes (checked before tokenizing)", text.len()));
        }
        Ok(())
    }
}

/// Checks that `device` can run `dtype` and opens it (a GPU, real or emulated), so that a wrong
/// `--device` is reported before anything else happens, even when every image already exists.
pub fn check_device(device: Device, dtype: DType) -> Result<()> {
    match device {
        Device::Cpu if dtype != DType::F32 => bail!(
            "--device cpu runs the f32 reference only; --dtype {dtype} needs --device cuda or emu"
        ),
        Device::Cpu => Ok(()),
        _ => crate::exec::open_device(device).map(|_| ()),
    }
}

/// The bounds on the host memory this process can still allocate, in bytes, each with where it
/// comes from: the system's available memory (/proc/meminfo MemAvailable), the cgroup's limit
/// less its usage (cgroup v2 memory.max, v1 memory.limit_in_bytes; page cache counted as free),
/// and what the address-space limit (`ulimit -v`) leaves.
pub fn host_memory_limits() -> Vec<(&'static str, u64)> {
    let field = |text: &str, key: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(key))?;
        Some(
            line.split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()?
                .saturating_mul(1024),
        )
    };
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let number = |p: &str| read(p).and_then(|t| t.trim().parse::<u64>().ok());
    let mut limits = vec![];
    if let Some(a) = read("/proc/meminfo").and_then(|t| field(&t, "MemAvailable:")) {
        limits.push(("MemAvailable", a));
    }
    // The cgroup's page cache is reclaimable, so it is not counted as used.
    let cache = |stat: &str, key: &str| {
        read(stat)
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    if let (Some(max), Some(cur)) = (
        number("/sys/fs/cgroup/memory.max"),
        number("/sys/fs/cgroup/memory.current"),
    ) {
        limits.push((
            "cgroup memory.max",
            max.saturating_sub(cur.saturating_sub(cache("/sys/fs/cgroup/memory.stat", "file "))),
        ));
    } else if let (Some(max), Some(cur)) = (
        number("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
        number("/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ) {
        // v1 reports "no limit" as a huge number.
        if max < 1 << 60 {
            limits.push((
                "cgroup memory.limit_in_bytes",
                max.saturating_sub(
                    cur.saturating_sub(cache("/sys/fs/cgroup/memory/memory.stat", "cache ")),
                ),
            ));
        }
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
    {
        let used = read("/proc/self/status")
            .and_then(|t| field(&t, "VmSize:"))
            .unwrap_or(0);
        limits.push(("address-space limit", lim.rlim_cur.saturating_sub(used)));
    }
    limits
}

/// Bytes of host memory this process can still allocate: the smallest of [`host_memory_limits`];
/// `None` when none is known.
pub fn host_memory_left() -> Option<u64> {
    host_memory_limits().into_iter().map(|(_, b)| b).min()
}

/// The hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.
pub fn hf_hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot folder of `repo` in the cache: the revision `refs/main` names, else the only
/// (or newest) snapshot.
pub fn hf_snapshot(cache: &Path, repo: &str) -> Option<PathBuf> {
    let dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    if let Ok(rev) = std::fs::read_to_string(dir.join("refs/main")) {
        let p = dir.join("snapshots").join(rev.trim());
        if p.is_dir() {
            return Some(p);
        }
    }
    let mut snaps: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir.join("snapshots"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    snaps.sort();
    snaps.pop().map(|(_, p)| p)
}

/// Where each model of a run comes from.
pub struct Resolved {
    pub llm: PathBuf,
    pub openuni: PathBuf,
    pub transformer: PathBuf,
    pub vae: PathBuf,
    pub connector: ConnectorConfig,
    pub builtin: bool,
    pub default_size: usize,
}

/// The user's explicit model locations.
pub struct ModelFlags {
    pub checkpoint: Option<PathBuf>,
    pub mllm: Option<PathBuf>,
    pub transformer: Option<PathBuf>,
    pub vae: Option<PathBuf>,
}

pub fn resolve(v: &Variant, flags: &ModelFlags) -> Result<Resolved> {
    let Some(published) = &v.published else {
        bail!("variant {} has no published weights to find", v.name)
    };
    let Published {
        mllm_repo,
        transformer_repo,
        vae_repo,
        checkpoint_stem,
    } = published;
    let cache = hf_hub_cache();
    let snap = |repo: &str| cache.as_deref().and_then(|c| hf_snapshot(c, repo));
    let found_checkpoint = || -> Option<PathBuf> {
        let s = snap(CHECKPOINT_REPO)?;
        // The fine-tuned (stage 2) file first: it is the one the paper's numbers come from.
        ["blip3o60k", "text2image23m"]
            .iter()
            .map(|k| s.join(format!("{}_{k}.pth", checkpoint_stem)))
            .find(|p| p.is_file())
    };
    let mllm = flags.mllm.clone().or_else(|| snap(mllm_repo));
    let transformer = flags
        .transformer
        .clone()
        .or_else(|| snap(transformer_repo).map(|p| p.join("transformer")));
    let vae = flags
        .vae
        .clone()
        .or_else(|| snap(vae_repo))
        .or_else(|| snap(transformer_repo).map(|p| p.join("vae")));
    let checkpoint = flags.checkpoint.clone().or_else(found_checkpoint);
    let any_flag = flags.checkpoint.is_some()
        || flags.mllm.is_some()
        || flags.transformer.is_some()
        || flags.vae.is_some();
    match (&mllm, &transformer, &vae, &checkpoint) {
        (Some(m), Some(t), Some(va), Some(c)) => Ok(Resolved {
            llm: m.clone(),
            openuni: c.clone(),
            transformer: t.clone(),
            vae: va.clone(),
            connector: (v.connector)(),
            builtin: false,
            default_size: v.size,
        }),
        (None, None, None, None) if !any_flag => {
            let p = tiny_model::ensure(&tiny_model::default_dir())?;
            Ok(Resolved {
                llm: p.0,
                openuni: p.1,
                transformer: p.2,
                vae: p.3,
                connector: (variant::TINY.connector)(),
                builtin: true,
                default_size: variant::TINY.size,
            })
        }
        _ => {
            let cache = cache
                .map(|c| c.display().to_string())
                .unwrap_or_else(|| "(no HOME)".into());
            let mut missing = vec![];
            if mllm.is_none() {
                missing.push(format!("the MLLM ({}; --mllm DIR)", mllm_repo));
            }
            if transformer.is_none() {
                missing.push(format!(
                    "the transformer ({}, transformer/; --transformer DIR)",
                    transformer_repo
                ));
            }
            if vae.is_none() {
                missing.push(format!("the VAE ({}; --vae DIR)", vae_repo));
            }
            if checkpoint.is_none() {
                missing.push(format!(
                    "the OpenUni checkpoint ({CHECKPOINT_REPO}: {}_blip3o60k.pth or _text2image23m.pth; --checkpoint FILE)",
                    checkpoint_stem
                ));
            }
            bail!(
                "variant {}: not found in the Hugging Face cache {cache} nor given by flags: {}",
                v.name,
                missing.join("; ")
            )
        }
    }
}

/// The sampler's `flow_shift` from the scheduler config next to the transformer (a diffusers
/// pipeline folder has `scheduler/scheduler_config.json`), else SANA's 3.0.
pub fn flow_shift(transformer: &Path) -> Result<f64> {
    let cfg = transformer
        .parent()
        .map(|p| p.join("scheduler/scheduler_config.json"));
    match cfg.filter(|p| p.is_file()) {
        Some(p) => Ok(openuni_models::config::read_config::<
            openuni_models::config::SchedulerConfig,
        >(&p)?
        .flow_shift),
        None => Ok(3.0),
    }
}

/// One image to make.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
}

/// Reads a prompts file: one prompt per line, or JSONL objects with `prompt` and optional `seed`
/// and `negative_prompt`. Empty lines and `#` comments are skipped; a bad line is reported by
/// number and skipped, the rest go on.
pub fn read_prompts(
    path: &Path,
    base_seed: u64,
    default_negative: Option<&str>,
) -> Result<(Vec<Item>, Vec<String>)> {
    let cannot = || format!("{}: cannot read the prompts file", path.display());
    let size = std::fs::metadata(path).with_context(cannot)?.len();
    if size > limits::PROMPTS_FILE_BYTES {
        bail!(
            "{}: the prompts file is {size} bytes, above the limit of {} bytes",
            path.display(),
            limits::PROMPTS_FILE_BYTES
        );
    }
    let text = std::fs::read_to_string(path).with_context(cannot)?;
    let (mut items, mut problems) = (vec![], vec![]);
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        // Refused by length before JSON parsing or tokenizing (a JSON line may carry a prompt and
        // a negative prompt of the limit each).
        if line.len() > 2 * limits::PROMPT_BYTES + 1024 {
            problems.push(format!(
                "{}:{}: the line is {} bytes, above the limit of {} bytes for a prompt; skipped",
                path.display(),
                i + 1,
                line.len(),
                limits::PROMPT_BYTES
            ));
            continue;
        }
        // Seeds count up from --seed; one past u64::MAX is refused rather than wrapped to 0.
        let seed = base_seed.checked_add(items.len() as u64);
        if t.starts_with('{') {
            let parsed: Result<Item, String> = (|| {
                let v: serde_json::Value =
                    serde_json::from_str(t).map_err(|e| format!("invalid JSON: {e}"))?;
                let prompt = v
                    .get("prompt")
                    .and_then(|p| p.as_str())
                    .ok_or("no string `prompt`")?
                    .to_string();
                let seed = match v.get("seed") {
                    None | Some(serde_json::Value::Null) => seed.ok_or(SEED_OVERFLOW)?,
                    Some(s) => s
                        .as_u64()
                        .ok_or("`seed` is not a non-negative integer below 2^64")?,
                };
                let negative_prompt = match v.get("negative_prompt") {
                    None | Some(serde_json::Value::Null) => default_negative.map(str::to_string),
                    Some(n) => Some(
                        n.as_str()
                            .ok_or("`negative_prompt` is not a string")?
                            .to_string(),
                    ),
                };
                Ok(Item {
                    prompt,
                    negative_prompt,
                    seed,
                })
            })();
            match parsed {
                Ok(it) => items.push(it),
                // Not one bad line: every later line would overflow too, so the run is refused.
                Err(e) if e == SEED_OVERFLOW => bail!(
                    "{}:{}: {}",
                    path.display(),
                    i + 1,
                    seed_overflow(base_seed, items.len())
                ),
                Err(e) => problems.push(format!("{}:{}: {e}; skipped", path.display(), i + 1)),
            }
        } else {
            let Some(seed) = seed else {
                bail!(
                    "{}:{}: {}",
                    path.display(),
                    i + 1,
                    seed_overflow(base_seed, items.len())
                )
            };
            items.push(Item {
                prompt: line.to_string(),
                negative_prompt: default_negative.map(str::to_string),
                seed,
            });
        }
    }
    if items.is_empty() && problems.is_empty() {
        bail!(
            "{}: no prompts (the file is empty or has only blank lines and # comments)",
            path.display()
        );
    }
    Ok((items, problems))
}

const SEED_OVERFLOW: &str = "seed overflow";

fn seed_overflow(base: u64, k: usize) -> String {
    format!("its seed would be --seed {base} + {k}, past the largest seed {} (seeds are not wrapped to 0): give a smaller --seed, or a `seed` on every line", u64::MAX)
}

/// A file-name-safe slug of a prompt: lowercase ASCII words joined by '-', at most 48 chars.
pub fn slug(prompt: &str) -> String {
    let mut s = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if s.len() + word.len() + 1 > 48 {
            break;
        }
        if !s.is_empty() {
            s.push('-');
        }
        s.push_str(&word.to_ascii_lowercase());
    }
    if s.is_empty() {
        s.push_str("prompt");
    }
    s
}

/// Standard-normal latent noise [1, 32, h, w] from `seed` (our own generator: not PyTorch's):
/// what `generate` draws for that seed on any device ([`crate::pipeline::seeded_noise`]).
pub fn noise(seed: u64, channels: usize, h: usize, w: usize) -> HostTensor {
    crate::pipeline::LatentNoise::seeded(vec![seed], channels, h, w)
        .to_host()
        .expect("sized")
}

pub struct Settings {
    pub steps: usize,
    pub sampler: openuni_models::scheduler::SamplerKind,
    pub guidance: f32,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub device: Device,
    pub dtype: DType,
    pub out: PathBuf,
    pub variant: &'static Variant,
    /// `--decode-tile` in pixels (see `DecodeOptions::from_flags`).
    pub decode_tile: Option<usize>,
    /// Images per batch (`--batch`): conditioned, denoised and decoded together.
    pub batch: usize,
    /// `--release-stages`, `--skip-memory-check`.
    pub memory: MemoryPolicy,
}

/// What a run did.
pub struct Report {
    pub written: Vec<PathBuf>,
    /// Items that could not be made (bad prompt), with the reason.
    pub failed: Vec<String>,
}

/// Generates every item. A finished image (a complete PNG made with the same settings) is kept
/// and skipped; a truncated or unreadable file, or one made with other settings, is made again
/// (with a note saying why); an item whose prompt is refused is reported and the rest go on.
pub fn run(items: &[Item], models: &Resolved, s: &Settings) -> Result<Report> {
    let (height, width) = (
        s.height.unwrap_or(models.default_size),
        s.width.unwrap_or(models.default_size),
    );
    for (flag, v) in [("--height", height), ("--width", width)] {
        if v == 0 || v % 32 != 0 || v > limits::SIDE.1 {
            bail!("{flag} {v} is not a positive multiple of 32 up to {} (the VAE upscales latents 32x)", limits::SIDE.1);
        }
    }
    if !(limits::STEPS.0..=limits::STEPS.1).contains(&s.steps) {
        bail!(
            "--steps {} is outside {}..={}",
            s.steps,
            limits::STEPS.0,
            limits::STEPS.1
        );
    }
    if !(limits::BATCH.0..=limits::BATCH.1).contains(&s.batch) {
        bail!(
            "--batch {} is outside {}..={}",
            s.batch,
            limits::BATCH.0,
            limits::BATCH.1
        );
    }
    if !s.guidance.is_finite() || !(limits::GUIDANCE.0..=limits::GUIDANCE.1).contains(&s.guidance) {
        bail!(
            "--guidance {} is not a finite number in {}..={}",
            s.guidance,
            limits::GUIDANCE.0,
            limits::GUIDANCE.1
        );
    }
    check_device(s.device, s.dtype)?;
    if models.builtin {
        eprintln!(
            "note: no OpenUni weights configured or cached; using the built-in tiny random model ({}). \
             It exercises every stage, but its pictures are not meaningful. See README for the real weights.",
            tiny_model::default_dir().display()
        );
    }
    let model = OpenUni::load(
        &ModelPaths {
            llm: &models.llm,
            openuni: &models.openuni,
            transformer: &models.transformer,
            vae: &models.vae,
        },
        models.connector.clone(),
    )?;
    let tok = PromptTokenizer::from_dir(&models.llm)?;
    let max_tokens = model
        .llm_cfg
        .max_position_embeddings
        .saturating_sub(model.num_queries);
    let run = RunOptions {
        device: s.device,
        dtype: s.dtype,
    };
    let up = model.vae_cfg.upscale();
    if up == 0 || height % up != 0 || width % up != 0 {
        bail!("--height/--width {height}x{width} are not multiples of the VAE's {up}x upscaling");
    }
    let (lh, lw) = (height / up, width / up);
    let decode_opts = DecodeOptions::from_flags(s.decode_tile, height, width, &model.vae_cfg)?;
    let shift = flow_shift(&models.transformer)?;
    let n = s.batch.min(items.len()).max(1);
    let release = plan_memory(
        &model,
        n,
        items.len().div_ceil(n),
        height,
        width,
        run,
        decode_opts,
        s.memory,
    )?;
    model.set_release_stages(release);
    std::fs::create_dir_all(&s.out)
        .with_context(|| format!("{}: cannot create the output folder", s.out.display()))?;

    let model_name = if models.builtin {
        "built-in tiny random model (not meaningful)".to_string()
    } else {
        s.variant.name.to_string()
    };
    // The settings an image is made with, kept in its PNG text chunks and compared on a re-run.
    let text_of = |it: &Item| -> Vec<(String, String)> {
        vec![
            (
                "Software".to_string(),
                format!("openuni {}", env!("CARGO_PKG_VERSION")),
            ),
            ("prompt".into(), it.prompt.clone()),
            (
                "negative_prompt".into(),
                it.negative_prompt.clone().unwrap_or_default(),
            ),
            ("seed".into(), it.seed.to_string()),
            ("noise".into(), crate::pipeline::NOISE_GENERATOR.into()),
            ("steps".into(), s.steps.to_string()),
            ("guidance".into(), s.guidance.to_string()),
            ("sampler".into(), format!("{:?}", s.sampler)),
            ("flow_shift".into(), shift.to_string()),
            ("size".into(), format!("{width}x{height}")),
            ("model".into(), model_name.clone()),
            ("device".into(), format!("{} {}", s.device, s.dtype)),
        ]
    };
    let mut todo: Vec<(usize, &Item, PathBuf)> = vec![];
    for (i, it) in items.iter().enumerate() {
        let path = s
            .out
            .join(format!("{i:05}-{}-{}.png", it.seed, slug(&it.prompt)));
        match crate::image::existing(&path, width, height, &text_of(it)) {
            Existing::Missing => todo.push((i, it, path)),
            Existing::Finished => {
                eprintln!("{}: exists with the same settings, skipped", path.display())
            }
            Existing::Redo(why) => {
                eprintln!("note: {why}; making it again");
                todo.push((i, it, path));
            }
        }
    }
    // Tokenize first: a refused prompt is reported and the rest go on in full batches.
    let mut ready = vec![];
    let mut failed = vec![];
    for (i, it, path) in todo {
        let checked = limits::check_prompt("prompt", &it.prompt)
            .and_then(|_| {
                it.negative_prompt
                    .as_deref()
                    .map_or(Ok(()), |n| limits::check_prompt("negative prompt", n))
            })
            .map_err(anyhow::Error::msg);
        match checked
            .and_then(|_| Ok(tok.encode(&it.prompt, it.negative_prompt.as_deref(), max_tokens)?))
        {
            Ok(ids) => ready.push((i, it, path, ids)),
            Err(e) => {
                let msg = format!("item {i}: {e}; skipped");
                eprintln!("{msg}");
                failed.push(msg);
            }
        }
    }
    let bar = ProgressBar::new((ready.len() * s.steps) as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} image-steps  {msg}")
            .expect("valid template"),
    );
    let start = Instant::now();
    let mut written = vec![];
    let c = model.transformer_cfg.in_channels;
    let chunks: Vec<_> = ready.chunks(s.batch.max(1)).collect();
    let batches = chunks
        .iter()
        .map(|chunk| {
            // Each image's noise is drawn from its seed where the sampler runs (only the seeds cross).
            Ok(GenerationBatch {
                prompts: chunk
                    .iter()
                    .map(|(_, _, _, ids)| (ids.cond.clone(), ids.uncond.clone()))
                    .collect(),
                noise: LatentNoise::seeded(
                    chunk.iter().map(|(_, it, _, _)| it.seed).collect(),
                    c,
                    lh,
                    lw,
                ),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = SamplingParams {
        steps: s.steps,
        guidance: s.guidance,
        sampler: s.sampler,
        flow_shift: shift,
        decode: decode_opts,
    };
    let per = height * width * 3;
    let made = model.generate_batches(
        &batches,
        &params,
        run,
        |n| bar.inc(n as u64),
        |i, decoded| {
            let (pixels, _) = to_uint8_nhwc(&decoded)?;
            for (k, (_, it, path, _)) in chunks[i].iter().enumerate() {
                write_png(
                    path,
                    &pixels[k * per..(k + 1) * per],
                    width,
                    height,
                    &text_of(it),
                )?;
                written.push(path.clone());
            }
            let rate = written.len() as f64 / start.elapsed().as_secs_f64();
            bar.set_message(format!(
                "{}/{} images, {rate:.2} images/s",
                written.len(),
                ready.len()
            ));
            Ok(())
        },
    );
    if let Err(e) = made {
        bar.finish_and_clear();
        return Err(if is_out_of_memory(&e) {
            let n = s.batch.min(ready.len());
            e.context(out_of_memory_advice(&model, n, lh, lw, run, decode_opts))
        } else {
            e
        });
    }
    bar.finish_and_clear();
    Ok(Report { written, failed })
}

/// Whether `generate` releases each stage once it is done with it (`--release-stages`; see
/// [`OpenUni::set_release_stages`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReleaseStages {
    /// Release on the CPU (nothing overlaps there), for a single batch (nothing needs a stage
    /// again), or when keeping every stage resident would not fit.
    #[default]
    Auto,
    Yes,
    No,
}

impl ReleaseStages {
    pub fn parse(s: &str) -> Result<ReleaseStages> {
        match s {
            "auto" => Ok(ReleaseStages::Auto),
            "yes" => Ok(ReleaseStages::Yes),
            "no" => Ok(ReleaseStages::No),
            _ => bail!("--release-stages `{s}` is not one of auto, yes, no"),
        }
    }
}

/// How `generate` plans its memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryPolicy {
    pub release_stages: ReleaseStages,
    /// `--skip-memory-check`: run even when the plan says it will not fit.
    pub skip_check: bool,
}

/// What the CPU ops hold outside the planned arenas, per thread of the pool: the sgemm
/// library's per-thread buffers (OpenBLAS maps its own), the fast ops' per-call scratch, allocator
/// slack. Not derived: measured, the L-1024 run on 2 threads held 163 MiB above a plan without it
/// (docs/memory.md); 128 MiB a thread covers that with room.
pub const CPU_SCRATCH_PER_THREAD: usize = 128 << 20;

/// A run's planned memory: the model's [`MemoryPlan`] in the run's storage type plus the host
/// tensors around it.
pub struct RunMemory {
    pub plan: MemoryPlan,
    /// Noise, latents and decoded images (f32, with the copies the finiteness check and the
    /// uint8 conversion make, and the bytes), and with the LLM released the batches' kept
    /// conditionings.
    pub host_tensors: usize,
    /// On the CPU, [`CPU_SCRATCH_PER_THREAD`] per thread of the pool.
    pub scratch: usize,
    /// This process's resident memory when the plan was made (code, tokenizer, configs; no
    /// weight read yet), from /proc/self/status VmRSS (0 where unknown).
    pub process_now: usize,
    /// Planned peak of the process's host memory: `process_now` + host tensors + on the CPU the
    /// plan's peak phase (weights and activations).
    pub host_peak: usize,
    /// Planned peak of device memory (weights and activations), on a GPU.
    pub device_peak: Option<usize>,
}

impl RunMemory {
    /// `n` images per batch in `batches` batches of `height`×`width`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &OpenUni,
        n: usize,
        batches: usize,
        height: usize,
        width: usize,
        run: RunOptions,
        decode: DecodeOptions,
        release_stages: bool,
    ) -> Result<RunMemory> {
        let up = model.vae_cfg.upscale().max(1);
        let (lh, lw) = (height / up, width / up);
        let too_large = || {
            anyhow::anyhow!("--batch {n} of {width}x{height} images: the memory needed does not fit a 64-bit count")
        };
        let mul = |a: usize, b: usize| a.checked_mul(b).ok_or_else(too_large);
        let pixels = mul(mul(mul(n, 3)?, height)?, width)?;
        let latents = mul(mul(mul(n, model.transformer_cfg.in_channels)?, lh)?, lw)?;
        let images = mul(pixels, 3 * 4 + 1)?;
        let mut host_tensors = mul(latents, 6 * 4)?
            .checked_add(images)
            .ok_or_else(too_large)?;
        if release_stages {
            // Per batch: prompt embeddings (and their host copy), connector output, query states.
            let (q, d, cc) = (
                model.num_queries,
                model.llm_cfg.hidden_size,
                model.transformer_cfg.caption_channels,
            );
            let per_batch = mul(mul(mul(2 * n, q)?, 2 * cc + 2 * d)?, 4)?;
            host_tensors = host_tensors
                .checked_add(mul(per_batch, batches)?)
                .ok_or_else(too_large)?;
        }
        let plan = model.memory_plan(n, lh, lw, run.dtype, decode, release_stages, batches)?;
        let on_cpu = run.device == Device::Cpu;
        let process_now = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("VmRSS:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<usize>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024);
        let scratch = if on_cpu {
            CPU_SCRATCH_PER_THREAD * rayon::current_num_threads()
        } else {
            0
        };
        let host_peak = process_now + host_tensors + scratch + if on_cpu { plan.peak() } else { 0 };
        Ok(RunMemory {
            plan,
            host_tensors,
            scratch,
            process_now,
            host_peak,
            device_peak: (!on_cpu).then(|| plan.peak()),
        })
    }

    /// Host bytes the run will add to what the process holds now (compared with the memory left).
    pub fn host_growth(&self) -> usize {
        self.host_peak - self.process_now
    }

    /// One line: the peak and what it is made of.
    pub fn describe(&self) -> String {
        let p = &self.plan;
        let (phase, w, a) = p.peak_phase();
        let stages = format!(
            "LLM {}, transformer {}, VAE {}",
            human(p.conditioning_weights),
            human(p.transformer_weights),
            human(p.vae_weights)
        );
        let held = if p.release_stages {
            let phases: Vec<String> = p
                .phases()
                .iter()
                .map(|(n, w, a)| format!("{n} {}", human(w + a)))
                .collect();
            format!(
                "in the {phase} phase; stages released when done, phases: {}",
                phases.join(", ")
            )
        } else {
            "every stage resident".to_string()
        };
        let weights = format!("weights {} at once ({held}; {stages})", human(w));
        match self.device_peak {
            None => format!(
                "host peak {} = {weights} + activations {} + host tensors {} + scratch {} + the process now {}",
                human(self.host_peak),
                human(a),
                human(self.host_tensors),
                human(self.scratch),
                human(self.process_now)
            ),
            Some(d) => format!("device peak {} = {weights} + activations {}; host {} of tensors", human(d), human(a), human(self.host_peak)),
        }
    }
}

/// Whether a run releases its stages under `policy`: see [`ReleaseStages::Auto`].
#[allow(clippy::too_many_arguments)]
pub fn decide_release(
    model: &OpenUni,
    n: usize,
    batches: usize,
    height: usize,
    width: usize,
    run: RunOptions,
    decode: DecodeOptions,
    policy: ReleaseStages,
) -> Result<bool> {
    Ok(match policy {
        ReleaseStages::Yes => true,
        ReleaseStages::No => false,
        ReleaseStages::Auto if run.device == Device::Cpu || batches <= 1 => true,
        ReleaseStages::Auto => {
            let keep = RunMemory::new(model, n, batches, height, width, run, decode, false)?;
            let free = device_free(run).unwrap_or(u64::MAX);
            keep.device_peak.unwrap_or(0) as u64 > free
                || keep.host_growth() as u64 > host_memory_left().unwrap_or(u64::MAX)
        }
    })
}

fn device_free(run: RunOptions) -> Option<u64> {
    crate::exec::open_device(run.device)
        .and_then(|d| Ok(d.memory_info()?))
        .ok()
        .map(|(f, _)| f as u64)
}

/// Plans a run's memory, prints the plan (stderr) and refuses with advice when it would not fit
/// the host memory left ([`host_memory_limits`]) or, on a GPU, the device's free memory, unless
/// `policy.skip_check`. Returns whether stages are released when done.
#[allow(clippy::too_many_arguments)]
pub fn plan_memory(
    model: &OpenUni,
    n: usize,
    batches: usize,
    height: usize,
    width: usize,
    run: RunOptions,
    decode: DecodeOptions,
    policy: MemoryPolicy,
) -> Result<bool> {
    let release = decide_release(
        model,
        n,
        batches,
        height,
        width,
        run,
        decode,
        policy.release_stages,
    )?;
    let m = RunMemory::new(model, n, batches, height, width, run, decode, release)?;
    let limits = host_memory_limits();
    let left = limits.iter().map(|l| l.1).min();
    let bounds: Vec<String> = limits
        .iter()
        .map(|(what, b)| format!("{what} {}", human(*b as usize)))
        .collect();
    eprintln!(
        "memory plan: {}; host memory left: {}",
        m.describe(),
        if bounds.is_empty() {
            "unknown".into()
        } else {
            bounds.join(", ")
        }
    );
    let mut advice = vec![];
    if n > 1 {
        advice.push("a smaller --batch".to_string());
    }
    if !release {
        advice.push(format!(
            "--release-stages yes (the peak would be {})",
            human(
                MemoryPlan {
                    release_stages: true,
                    ..m.plan
                }
                .peak()
            )
        ));
    }
    if decode.tile.is_none() && height.max(width) > 512 {
        advice.push("--decode-tile 512".into());
    }
    advice.push("a smaller --height/--width".into());
    let fail = |what: &str, need: usize, have: u64, advice: &[String]| -> Result<bool> {
        if policy.skip_check {
            eprintln!("warning: the plan needs {} of {what} but {} are left; running anyway (--skip-memory-check)", human(need), human(have as usize));
            return Ok(release);
        }
        bail!(
            "--batch {n} of {width}x{height} images needs about {} of {what} ({}), but only {} are left: use {}, or --skip-memory-check to run anyway",
            human(need),
            m.describe(),
            human(have as usize),
            advice.join(", ")
        )
    };
    if let Some(left) = left.filter(|&l| m.host_growth() as u64 > l) {
        return fail("host memory", m.host_growth(), left, &advice);
    }
    if let Some(d) = m.device_peak {
        if let Some(free) = device_free(run).filter(|&f| d as u64 > f) {
            if policy.skip_check {
                return fail("device memory", d, free, &advice);
            }
            // The same words as an out-of-memory error met while running: the batch that fits.
            let up = model.vae_cfg.upscale().max(1);
            bail!(
                "{} (by the memory plan, before running: device peak {}{}; --skip-memory-check runs anyway)",
                out_of_memory_advice(model, n, height / up, width / up, run, decode),
                human(d),
                if run.dtype == DType::F32 { "; --dtype bf16 halves the weights" } else { "" }
            );
        }
    }
    Ok(release)
}

/// Refuses a run whose planned host memory exceeds what this process can still allocate (see
/// [`host_memory_left`]), every stage kept resident, so that a large size or batch is an error
/// instead of an allocation abort (see [`RunMemory`]).
pub fn check_memory(
    model: &OpenUni,
    n: usize,
    height: usize,
    width: usize,
    run: RunOptions,
    decode: DecodeOptions,
) -> Result<()> {
    let m = RunMemory::new(model, n, 1, height, width, run, decode, false)?;
    match host_memory_left() {
        Some(left) if m.host_growth() as u64 > left => bail!(
            "--batch {n} of {width}x{height} images needs about {} of host memory ({}), but only {} are left \
             (available memory, the cgroup limit and the address-space limit): use a smaller --height/--width or --batch{}",
            human(m.host_growth()),
            m.describe(),
            human(left as usize),
            if decode.tile.is_none() { ", or --decode-tile 512" } else { "" }
        ),
        _ => Ok(()),
    }
}

fn human(b: usize) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Whether an error comes from the device running out of memory.
pub fn is_out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<openuni_cuda::CudaError>()
            .is_some_and(|c| c.is_out_of_memory())
    })
}

/// What to say when a batch of `n` did not fit: the planned activation memory of the batch's
/// resident graphs against the device's free memory, and the largest batch that would fit.
pub fn out_of_memory_advice(
    model: &OpenUni,
    n: usize,
    lh: usize,
    lw: usize,
    run: RunOptions,
    decode: DecodeOptions,
) -> String {
    model.release_executors();
    let free = crate::exec::open_device(run.device)
        .and_then(|d| Ok(d.memory_info()?))
        .map(|(f, _)| f)
        .unwrap_or(0);
    let size = |b: usize| {
        if b >= 1 << 30 {
            format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
        } else {
            format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
        }
    };
    let need = |k: usize| {
        model
            .planned_batch_bytes(k, lh, lw, run.dtype, decode)
            .unwrap_or(usize::MAX)
    };
    // Weights not uploaded yet when memory ran out will need room too.
    let resident = model.resident_weight_bytes();
    let missing = model
        .planned_weight_bytes(lh, lw, run.dtype)
        .unwrap_or(0)
        .saturating_sub(resident);
    // Leave a quarter of the plan for the kernels' workspaces and allocation rounding.
    let fits = (1..n)
        .rev()
        .find(|&k| need(k).saturating_add(need(k) / 4).saturating_add(missing) <= free);
    let head = format!(
        "out of GPU memory at --batch {n}: its graphs plan {} of activations; {} are free besides {} of resident weights ({} more to upload)",
        size(need(n)),
        size(free),
        size(resident),
        size(missing)
    );
    match fits {
        Some(k) => format!("{head}; --batch {k} plans {}, which fits", size(need(k))),
        None => format!("{head}; even --batch 1 plans {}: use --decode-tile, a smaller --height/--width, or a larger GPU", size(need(1))),
    }
}
