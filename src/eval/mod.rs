//! `openuni generate --eval geneval|dpg|wise`: a benchmark's prompt set in its own format, its
//! scorer's folder layout out, split into shards across machines and over every device of one
//! machine, resumable, with a manifest per shard and a `--check` of the whole set.
//!
//! Every file is one work item (a GenEval sample, a DPG 2x2 grid, a WISE image); each image's seed
//! is [`image_seed`] of (base seed, prompt index, sample index). The set is cut into fixed batches
//! ([`batches`]) that shards, devices and re-runs all make whole, so with the same `--batch`
//! neither the shard count, the device count nor an interruption changes a file (docs/eval.md).

mod prompts;
mod shard;
mod workers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

use crate::exec::Device;
use crate::generate::{Resolved, Settings};

pub use prompts::{
    batches, image_seed, read, work_items, Benchmark, EvalPrompt, WorkItem, DPG_SAMPLES,
};
pub use shard::Shard;
pub use workers::parse_devices;

/// What `--eval` was asked to do.
pub struct EvalOptions {
    pub bench: Benchmark,
    pub prompts: PathBuf,
    /// `--samples` (GenEval; fixed for the others).
    pub samples: Option<usize>,
    /// `--shard K/N`; `None`: from the scheduler's environment, else the whole set.
    pub shard: Option<String>,
    /// The devices: one worker each.
    pub devices: Vec<Device>,
    pub verbose: bool,
    pub seed: u64,
    pub negative_prompt: Option<String>,
}

/// The shard of this process: `--shard`, else the scheduler's environment (and says which).
pub fn choose_shard(flag: Option<&str>) -> Result<Shard> {
    if let Some(s) = flag {
        return Shard::parse(s);
    }
    match Shard::from_env(|k| std::env::var(k).ok())? {
        Some((s, from)) => {
            eprintln!("shard {s} (from {from})");
            Ok(s)
        }
        None => Ok(Shard::WHOLE),
    }
}

/// The PNG text chunks of a file: what made it. A re-run keeps a file only when these match; the
/// device is named by kind and dtype (not ordinal), so any device of a machine can finish a set.
#[allow(clippy::too_many_arguments)]
fn settings_text(
    bench: Benchmark,
    prompt: &EvalPrompt,
    negative: Option<&str>,
    seeds: &[u64],
    s: &Settings,
    shift: f64,
    model_name: &str,
    size: (usize, usize),
) -> Vec<(String, String)> {
    let kind = match s.device {
        Device::Cpu => "cpu",
        Device::Cuda(_) => "cuda",
        Device::Emu | Device::EmuAt(_) => "emu",
    };
    vec![
        (
            "Software".to_string(),
            format!("openuni {}", env!("CARGO_PKG_VERSION")),
        ),
        ("benchmark".into(), bench.name().into()),
        ("prompt".into(), prompt.text.clone()),
        (
            "negative_prompt".into(),
            negative.unwrap_or_default().to_string(),
        ),
        (
            "seed".into(),
            seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("noise".into(), crate::pipeline::NOISE_GENERATOR.into()),
        ("steps".into(), s.steps.to_string()),
        // The set's batches follow from it, and a batched image equals a single one only to rounding.
        ("batch".into(), s.batch.to_string()),
        ("guidance".into(), s.guidance.to_string()),
        ("sampler".into(), format!("{:?}", s.sampler)),
        ("flow_shift".into(), shift.to_string()),
        ("size".into(), format!("{}x{}", size.1, size.0)),
        ("model".into(), model_name.to_string()),
        ("device".into(), format!("{kind} {}", s.dtype)),
    ]
}

/// The shard's manifest: one JSON line per file written (prompt, seeds, parameters, device, time).
pub struct Manifest {
    file: Mutex<std::fs::File>,
    path: PathBuf,
}

impl Manifest {
    fn open(path: PathBuf) -> Result<Manifest> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open the manifest", path.display()))?;
        // A line cut short by a kill is ended, so the next record starts on a line of its own.
        let len = file.metadata()?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
            }
        }
        Ok(Manifest {
            file: Mutex::new(file),
            path,
        })
    }

    /// Appends one record as a single write.
    fn append(&self, record: &serde_json::Value) -> Result<()> {
        let mut line = record.to_string();
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        f.write_all(line.as_bytes())
            .and_then(|_| f.flush())
            .with_context(|| format!("{}: cannot append", self.path.display()))
    }
}

/// What a run did.
pub struct EvalReport {
    pub written: usize,
    pub skipped: usize,
    /// Files not made (a refused prompt), with why.
    pub failed: Vec<String>,
}

/// Generates this shard's files of the set into `s.out`.
pub fn run(o: &EvalOptions, models: &Resolved, s: &Settings) -> Result<EvalReport> {
    let prompts = read(o.bench, &o.prompts)?;
    let samples = o.bench.samples(o.samples)?;
    let shard = choose_shard(o.shard.as_deref())?;
    let all = work_items(o.bench, &prompts, samples);
    // Shards split the set's fixed batches (batch b goes to shard b % N).
    let units: Vec<Vec<usize>> = batches(&all, s.batch)
        .into_iter()
        .enumerate()
        .filter(|(b, _)| shard.owns(*b))
        .map(|(_, u)| u)
        .collect();
    let mine: Vec<&WorkItem> = units.iter().flatten().map(|&i| &all[i]).collect();
    for d in &o.devices {
        crate::generate::check_device(*d, s.dtype)?;
    }
    std::fs::create_dir_all(&s.out)
        .with_context(|| format!("{}: cannot create the output folder", s.out.display()))?;
    let plan = workers::Plan::new(models, s)?;
    let model_name = if models.builtin {
        "built-in tiny random model (not meaningful)".to_string()
    } else {
        s.variant.name.to_string()
    };
    eprintln!(
        "{}: {} prompts, {} files; shard {shard}: {} files; {} device(s): {}",
        o.bench.name(),
        prompts.len(),
        all.len(),
        mine.len(),
        o.devices.len(),
        o.devices
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // GenEval's metadata.jsonl goes with sample 0 of its prompt (so exactly one shard writes it).
    if o.bench == Benchmark::GenEval {
        for w in mine.iter().filter(|w| w.samples == [0]) {
            let dir = s.out.join(format!("{:05}", w.prompt));
            std::fs::create_dir_all(dir.join("samples"))
                .with_context(|| format!("{}: cannot create", dir.display()))?;
            let meta = dir.join("metadata.jsonl");
            let want = prompts[w.prompt].metadata.clone().unwrap_or_default();
            if std::fs::read_to_string(&meta).ok().as_deref() != Some(want.as_str()) {
                crate::atomic::write_bytes(&meta, want.as_bytes())?;
            }
        }
    }
    remove_stale_partials(&s.out, &mine);

    // What is left: a complete PNG made with the same settings is kept; anything else is made again.
    let size = plan.image_size();
    let mut todo: Vec<Vec<workers::Job>> = vec![];
    let mut skipped = 0;
    for unit in &units {
        let mut jobs = vec![];
        for w in unit.iter().map(|&i| &all[i]) {
            let seeds: Vec<u64> = w
                .samples
                .iter()
                .map(|&k| image_seed(o.seed, w.prompt, k))
                .collect();
            let text = settings_text(
                o.bench,
                &prompts[w.prompt],
                o.negative_prompt.as_deref(),
                &seeds,
                s,
                plan.shift,
                &model_name,
                size,
            );
            let (fh, fw) = file_size(o.bench, size);
            let path = s.out.join(&w.file);
            let complete = match crate::image::existing(&path, fw, fh, &text) {
                crate::image::Existing::Finished => true,
                crate::image::Existing::Missing => false,
                crate::image::Existing::Redo(why) => {
                    eprintln!("note: {why}; making it again");
                    false
                }
            };
            skipped += complete as usize;
            jobs.push(workers::Job {
                item: w.clone(),
                seeds,
                text,
                path,
                complete,
            });
        }
        // A batch with a file left is made whole (the same batch makes the same images); only its
        // missing files are written.
        if jobs.iter().any(|j| !j.complete) {
            todo.push(jobs);
        }
    }
    if skipped > 0 {
        eprintln!("{skipped} file(s) of this shard are complete already, skipped");
    }
    let manifest = Manifest::open(s.out.join(shard.manifest_name()))?;
    let ctx = workers::Context {
        bench: o.bench,
        prompts: &prompts,
        models,
        settings: s,
        plan: &plan,
        manifest: &manifest,
        shard,
        verbose: o.verbose,
        negative_prompt: o.negative_prompt.as_deref(),
    };
    let (written, failed) = workers::run(&ctx, todo, &o.devices)?;
    Ok(EvalReport {
        written,
        skipped,
        failed,
    })
}

/// A file's pixel size (height, width): one image, or DPG's 2x2 grid.
fn file_size(bench: Benchmark, (h, w): (usize, usize)) -> (usize, usize) {
    match bench {
        Benchmark::Dpg => (2 * h, 2 * w),
        _ => (h, w),
    }
}

/// Removes hidden temporary files that a SIGKILL left behind for this shard's files (only theirs:
/// another shard may be writing into the same folder now).
fn remove_stale_partials(out: &Path, mine: &[&WorkItem]) {
    let mut by_dir: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    for w in mine {
        let p = out.join(&w.file);
        if let (Some(d), Some(n)) = (p.parent(), p.file_name()) {
            by_dir
                .entry(d.to_path_buf())
                .or_default()
                .insert(n.to_string_lossy().into_owned());
        }
    }
    for (dir, names) in by_dir {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = n.strip_prefix('.').filter(|_| n.ends_with(".partial")) else {
                continue;
            };
            if names.iter().any(|t| rest.starts_with(&format!("{t}."))) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// `--check DIR`: every file of the set (all shards) is present and a complete PNG, and no file
/// was recorded by two shards' manifests. Prints what is missing or duplicated; `Ok(false)` when
/// anything is.
pub fn check(
    bench: Benchmark,
    prompts_path: &Path,
    samples: Option<usize>,
    dir: &Path,
) -> Result<bool> {
    let prompts = read(bench, prompts_path)?;
    let samples = bench.samples(samples)?;
    let all = work_items(bench, &prompts, samples);
    if !dir.is_dir() {
        bail!("--check {}: not a folder", dir.display());
    }
    let mut missing = vec![];
    for w in &all {
        let p = dir.join(&w.file);
        if !p.exists() {
            missing.push(format!("{}: missing", w.file.display()));
        } else if let Err(e) = crate::image::read_png(&p) {
            missing.push(format!("{}: not a complete PNG ({e:#})", w.file.display()));
        }
    }
    if bench == Benchmark::GenEval {
        for (i, p) in prompts.iter().enumerate() {
            let meta = PathBuf::from(format!("{i:05}")).join("metadata.jsonl");
            match std::fs::read_to_string(dir.join(&meta)) {
                Ok(t) if Some(t.as_str()) == p.metadata.as_deref() => {}
                Ok(_) => missing.push(format!(
                    "{}: not the prompt file's line {}",
                    meta.display(),
                    i + 1
                )),
                Err(_) => missing.push(format!("{}: missing", meta.display())),
            }
        }
    }
    // Which manifests recorded each file.
    let mut recorded: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut manifests = vec![];
    for e in std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .flatten()
    {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("manifest-") && n.ends_with(".jsonl") {
            manifests.push(n);
        }
    }
    manifests.sort();
    for m in &manifests {
        let text = std::fs::read_to_string(dir.join(m))
            .with_context(|| format!("{}: cannot read", dir.join(m).display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            // A line cut by a kill is not a record.
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if let Some(f) = v.get("file").and_then(|f| f.as_str()) {
                recorded.entry(f.to_string()).or_default().insert(m.clone());
            }
        }
    }
    let mut duplicated: Vec<String> = recorded
        .iter()
        .filter(|(_, ms)| ms.len() > 1)
        .map(|(f, ms)| {
            format!(
                "{f}: written by {} shards ({})",
                ms.len(),
                ms.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    duplicated.sort();
    let complete = all.len()
        - missing
            .iter()
            .filter(|m| m.ends_with(".png: missing") || m.contains(".png: not a complete"))
            .count();
    println!(
        "{}: {} of {} files complete; {} manifest(s)",
        dir.display(),
        complete,
        all.len(),
        manifests.len()
    );
    for m in &missing {
        println!("missing: {m}");
    }
    for d in &duplicated {
        println!("duplicated: {d}");
    }
    let ok = missing.is_empty() && duplicated.is_empty();
    println!(
        "{}",
        if ok {
            "complete: nothing missing or duplicated"
        } else {
            "INCOMPLETE"
        }
    );
    Ok(ok)
}
