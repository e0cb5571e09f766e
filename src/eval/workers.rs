//! One worker per device, pulling groups of files from one shared queue. Each worker loads its own
//! model, so each device keeps its own resident weights and executors. A worker whose device fails
//! puts the unfinished files of its group back at the front of the queue, reports the error and
//! stops; the others take the group. The run fails only when no device is left to finish it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use openuni_models::prompt::{PromptIds, PromptTokenizer};

use crate::exec::{device_count, Device};
use crate::generate::{flow_shift, Resolved, Settings};
use crate::pipeline::{
    to_uint8_nhwc, DecodeOptions, GenerationBatch, LatentNoise, ModelPaths, OpenUni, RunOptions,
    SamplingParams,
};

use super::{Benchmark, EvalPrompt, Manifest, Shard, WorkItem};

/// Parses `--device` for `--eval`: `cpu`, one device (`cuda`, `cuda:N`, `emu`, `emu:N`), every
/// device of a kind (`cuda:all`, `emu:all`), or a list (`cuda:0,2,3`, `emu:0,1`).
pub fn parse_devices(s: &str) -> Result<Vec<Device>> {
    let Some((kind, rest)) = s.split_once(':') else {
        return Ok(vec![Device::parse(s)?]);
    };
    let make: fn(usize) -> Device = match kind {
        "cuda" => Device::Cuda,
        "emu" => Device::emulated,
        _ => {
            bail!("--device `{s}` is not one of cpu, cuda[:N|:all|:N,M,...], emu[:N|:all|:N,M,...]")
        }
    };
    let count = || {
        device_count(make(0))
            .map_err(|e| anyhow::anyhow!("--device {s}: cannot count the {kind} devices: {e:#}"))
    };
    let ordinals: Vec<usize> = if rest == "all" {
        let n = count()?;
        if n == 0 {
            bail!("--device {s}: no {kind} device found");
        }
        (0..n).collect()
    } else {
        let mut v = vec![];
        for part in rest.split(',') {
            let p = part.trim();
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                bail!("--device `{s}`: `{part}` is not a device number");
            }
            let n: usize = p
                .parse()
                .map_err(|_| anyhow::anyhow!("--device `{s}`: `{part}` is too large"))?;
            if v.contains(&n) {
                bail!("--device `{s}`: device {n} is listed twice");
            }
            v.push(n);
        }
        if v.len() > 1 {
            let n = count()?;
            if let Some(bad) = v.iter().find(|&&o| o >= n) {
                bail!("--device `{s}`: there is no {kind}:{bad} ({n} {kind} device(s): 0..{n})");
            }
        }
        v
    };
    Ok(ordinals.into_iter().map(make).collect())
}

/// What every worker shares: the image size, the sampling parameters, the tokenized prompts.
pub struct Plan {
    pub height: usize,
    pub width: usize,
    pub latent: (usize, usize),
    pub channels: usize,
    pub shift: f64,
    pub params: SamplingParams,
    tokenizer: PromptTokenizer,
    max_tokens: usize,
}

impl Plan {
    pub fn new(models: &Resolved, s: &Settings) -> Result<Plan> {
        let (height, width) = (
            s.height.unwrap_or(models.default_size),
            s.width.unwrap_or(models.default_size),
        );
        // Configs only: the workers load their own weights.
        let model = load(models)?;
        let up = model.vae_cfg.upscale();
        if up == 0 || height % up != 0 || width % up != 0 {
            bail!(
                "--height/--width {height}x{width} are not multiples of the VAE's {up}x upscaling"
            );
        }
        let decode = DecodeOptions::from_flags(s.decode_tile, height, width, &model.vae_cfg)?;
        let shift = flow_shift(&models.transformer)?;
        crate::generate::check_memory(
            &model,
            s.batch,
            height,
            width,
            RunOptions {
                device: s.device,
                dtype: s.dtype,
            },
            decode,
        )?;
        Ok(Plan {
            height,
            width,
            latent: (height / up, width / up),
            channels: model.transformer_cfg.in_channels,
            shift,
            params: SamplingParams {
                steps: s.steps,
                guidance: s.guidance,
                sampler: s.sampler,
                flow_shift: shift,
                decode,
            },
            tokenizer: PromptTokenizer::from_dir(&models.llm)?,
            max_tokens: model
                .llm_cfg
                .max_position_embeddings
                .saturating_sub(model.num_queries),
        })
    }

    /// (height, width) of one image.
    pub fn image_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }
}

fn load(models: &Resolved) -> Result<OpenUni> {
    OpenUni::load(
        &ModelPaths {
            llm: &models.llm,
            openuni: &models.openuni,
            transformer: &models.transformer,
            vae: &models.vae,
        },
        models.connector.clone(),
    )
}

/// One file to make.
pub struct Job {
    pub item: WorkItem,
    pub seeds: Vec<u64>,
    /// Its PNG text chunks.
    pub text: Vec<(String, String)>,
    pub path: PathBuf,
    /// Already complete: made again with its batch, but not written.
    pub complete: bool,
}

/// A file with its tokenized prompt, ready for the queue.
struct Ready {
    job: Job,
    ids: PromptIds,
}

pub struct Context<'a> {
    pub bench: Benchmark,
    pub prompts: &'a [EvalPrompt],
    pub models: &'a Resolved,
    pub settings: &'a Settings,
    pub plan: &'a Plan,
    pub manifest: &'a Manifest,
    pub shard: Shard,
    pub verbose: bool,
    pub negative_prompt: Option<&'a str>,
}

/// The shared queue: groups of files, and how many groups workers hold now (a worker waits while
/// others are busy, because a failing one may hand its group back).
struct Queue {
    groups: VecDeque<Vec<Unit>>,
    busy: usize,
    /// Workers still able to work.
    alive: usize,
}

/// Per-device tallies for the summary.
#[derive(Default, Clone)]
struct DeviceStats {
    images: usize,
    seconds: f64,
    error: Option<String>,
}

/// A batch of the set (see [`super::batches`]) ready for the queue.
type Unit = Vec<Ready>;

/// Makes every batch of jobs on `devices`; returns (files written, files refused with why).
pub fn run(
    ctx: &Context,
    units: Vec<Vec<Job>>,
    devices: &[Device],
) -> Result<(usize, Vec<String>)> {
    // Tokenize first: a refused prompt is reported and the rest go on.
    let mut ready: Vec<Unit> = vec![];
    let mut failed = vec![];
    for jobs in units {
        let mut unit = vec![];
        for job in jobs {
            let text = &ctx.prompts[job.item.prompt].text;
            match ctx
                .plan
                .tokenizer
                .encode(text, ctx.negative_prompt, ctx.plan.max_tokens)
            {
                Ok(ids) => unit.push(Ready { job, ids }),
                Err(e) => {
                    let msg = format!(
                        "{}: prompt {}: {e}; not made",
                        job.item.file.display(),
                        job.item.prompt
                    );
                    eprintln!("{msg}");
                    failed.push(msg);
                }
            }
        }
        if unit.iter().any(|r| !r.job.complete) {
            ready.push(unit);
        }
    }
    let total_images: usize = ready
        .iter()
        .flatten()
        .filter(|r| !r.job.complete)
        .map(|r| r.job.item.samples.len())
        .sum();
    // Groups of two batches: the conditioning of a group's second batch overlaps the denoising
    // of its first, and a failed device hands back little work.
    let mut groups: VecDeque<Vec<Unit>> = VecDeque::new();
    let mut it = ready.into_iter();
    while let Some(a) = it.next() {
        groups.push_back(std::iter::once(a).chain(it.next()).collect());
    }
    if groups.is_empty() {
        return Ok((0, failed));
    }
    let queue = Mutex::new(Queue {
        groups,
        busy: 0,
        alive: devices.len(),
    });
    let wake = Condvar::new();
    let bar = ProgressBar::new(total_images as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images  {per_sec}  ETA {eta}  {msg}")
            .expect("valid template"),
    );
    let stats: Vec<Mutex<DeviceStats>> = devices
        .iter()
        .map(|_| Mutex::new(DeviceStats::default()))
        .collect();
    let written = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (w, &device) in devices.iter().enumerate() {
            let (queue, wake, bar, stats, written) = (&queue, &wake, &bar, &stats[w], &written);
            scope.spawn(move || {
                let result = worker(ctx, device, queue, wake, bar, stats, written);
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                q.alive -= 1;
                if let Err(e) = result {
                    let msg = format!("{e:#}");
                    say(
                        bar,
                        format!(
                            "{device}: failed, its unfinished work goes back to the queue: {msg}"
                        ),
                    );
                    stats.lock().unwrap_or_else(|e| e.into_inner()).error = Some(msg);
                }
                wake.notify_all();
            });
        }
    });
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();
    let written = written.into_inner();
    let left: usize = queue
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .groups
        .iter()
        .flatten()
        .flatten()
        .filter(|r| !r.job.complete)
        .map(|r| r.job.item.samples.len())
        .sum();
    // The summary: images, failures, images/s per device.
    let stats: Vec<DeviceStats> = stats
        .iter()
        .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    let failures = stats.iter().filter(|d| d.error.is_some()).count();
    let made: usize = stats.iter().map(|d| d.images).sum();
    eprintln!(
        "done: {written} files ({made} images) in {elapsed:.1} s, {:.2} images/s; {failures} device failure(s); {} prompt(s) refused",
        made as f64 / elapsed.max(1e-9),
        failed.len()
    );
    for (d, st) in devices.iter().zip(&stats) {
        let rate = if st.seconds > 0.0 {
            st.images as f64 / st.seconds
        } else {
            0.0
        };
        match &st.error {
            None => eprintln!("  {d}: {} images, {rate:.2} images/s", st.images),
            Some(e) => eprintln!(
                "  {d}: {} images, {rate:.2} images/s, then failed: {e}",
                st.images
            ),
        }
    }
    if left > 0 {
        let errors: Vec<String> = devices
            .iter()
            .zip(&stats)
            .filter_map(|(d, s)| s.error.as_ref().map(|e| format!("{d}: {e}")))
            .collect();
        bail!(
            "{left} image(s) not made: no device could make them ({})",
            errors.join("; ")
        );
    }
    Ok((written, failed))
}

/// One device's loop: take a group, make it, write its files; on an error hand back what is
/// unfinished and return the error.
fn worker(
    ctx: &Context,
    device: Device,
    queue: &Mutex<Queue>,
    wake: &Condvar,
    bar: &ProgressBar,
    stats: &Mutex<DeviceStats>,
    written: &std::sync::atomic::AtomicUsize,
) -> Result<()> {
    let model = load(ctx.models)?;
    let run = RunOptions {
        device,
        dtype: ctx.settings.dtype,
    };
    loop {
        let group = {
            let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(g) = q.groups.pop_front() {
                    q.busy += 1;
                    break Some(g);
                }
                if q.busy == 0 {
                    break None;
                }
                q = wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(group) = group else { return Ok(()) };
        let t = Instant::now();
        let mut done: Vec<Vec<bool>> = group.iter().map(|u| vec![false; u.len()]).collect();
        let result = make_group(ctx, &model, run, &group, &mut done, bar, written);
        let images: usize = group
            .iter()
            .flatten()
            .zip(done.iter().flatten())
            .filter(|(r, d)| **d && !r.job.complete)
            .map(|(r, _)| r.job.item.samples.len())
            .sum();
        let secs = t.elapsed().as_secs_f64();
        {
            let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
            st.images += images;
            st.seconds += secs;
            if ctx.verbose {
                say(
                    bar,
                    format!(
                        "{device}: {images} images in {secs:.2} s ({:.2} images/s); {} in all",
                        images as f64 / secs.max(1e-9),
                        st.images
                    ),
                );
            }
        }
        let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
        q.busy -= 1;
        if let Err(e) = result {
            // Batches with a file left go back whole (their finished files marked complete).
            let back: Vec<Unit> = group
                .into_iter()
                .zip(done)
                .map(|(u, d)| {
                    u.into_iter()
                        .zip(d)
                        .map(|(mut r, d)| {
                            r.job.complete |= d;
                            r
                        })
                        .collect::<Unit>()
                })
                .filter(|u| u.iter().any(|r| !r.job.complete))
                .collect();
            if !back.is_empty() {
                q.groups.push_front(back);
            }
            wake.notify_all();
            return Err(e);
        }
        wake.notify_all();
    }
}

/// Makes a group's batches (a DPG grid over `--batch` in chunks of it) and writes each missing
/// file when its images are done.
fn make_group(
    ctx: &Context,
    model: &OpenUni,
    run: RunOptions,
    units: &[Unit],
    done: &mut [Vec<bool>],
    bar: &ProgressBar,
    written: &std::sync::atomic::AtomicUsize,
) -> Result<()> {
    let plan = ctx.plan;
    let (c, (lh, lw)) = (plan.channels, plan.latent);
    // The group's files in one list; done[u][f] for each.
    let group: Vec<&Ready> = units.iter().flatten().collect();
    let place: Vec<(usize, usize)> = units
        .iter()
        .enumerate()
        .flat_map(|(u, unit)| (0..unit.len()).map(move |f| (u, f)))
        .collect();
    // Every image: (file in group, position in file), chunked within each batch of the set.
    let mut chunks: Vec<Vec<(usize, usize)>> = vec![];
    let mut first = 0;
    for unit in units {
        let images: Vec<(usize, usize)> = (first..first + unit.len())
            .flat_map(|f| (0..group[f].job.item.samples.len()).map(move |k| (f, k)))
            .collect();
        chunks.extend(images.chunks(ctx.settings.batch.max(1)).map(<[_]>::to_vec));
        first += unit.len();
    }
    let batches = chunks
        .iter()
        .map(|chunk| {
            let seeds = chunk.iter().map(|&(f, k)| group[f].job.seeds[k]).collect();
            Ok(GenerationBatch {
                prompts: chunk
                    .iter()
                    .map(|&(f, _)| (group[f].ids.cond.clone(), group[f].ids.uncond.clone()))
                    .collect(),
                noise: LatentNoise::seeded(seeds, c, lh, lw),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let per = plan.height * plan.width * 3;
    let mut pixels: Vec<Vec<Option<Vec<u8>>>> = group
        .iter()
        .map(|r| vec![None; r.job.item.samples.len()])
        .collect();
    // Time per image: each batch's time since the previous one ended, over its images.
    let mut last = Instant::now();
    model.generate_batches(
        &batches,
        &plan.params,
        run,
        |_| {},
        |i, decoded| {
            let (rgb, _) = to_uint8_nhwc(&decoded)?;
            let seconds_per_image = last.elapsed().as_secs_f64() / chunks[i].len() as f64;
            for (j, &(f, k)) in chunks[i].iter().enumerate() {
                pixels[f][k] = Some(rgb[j * per..(j + 1) * per].to_vec());
                if pixels[f].iter().all(Option::is_some) {
                    let imgs: Vec<Vec<u8>> = pixels[f]
                        .iter_mut()
                        .map(|p| p.take().expect("checked"))
                        .collect();
                    if !group[f].job.complete {
                        write_file(ctx, &group[f].job, &imgs, run.device, seconds_per_image)?;
                        written.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        bar.inc(imgs.len() as u64);
                    }
                    let (u, j) = place[f];
                    done[u][j] = true;
                }
            }
            last = Instant::now();
            Ok(())
        },
    )
}

/// Writes one file (an image, or DPG's 2x2 grid: samples 0 1 on top, 2 3 below) and its
/// manifest record.
fn write_file(
    ctx: &Context,
    job: &Job,
    imgs: &[Vec<u8>],
    device: Device,
    seconds_per_image: f64,
) -> Result<()> {
    let (h, w) = (ctx.plan.height, ctx.plan.width);
    if let Some(dir) = job.path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    }
    match ctx.bench {
        Benchmark::Dpg => {
            let mut grid = vec![0u8; 4 * h * w * 3];
            for (k, img) in imgs.iter().enumerate() {
                let (gy, gx) = (k / 2, k % 2);
                for y in 0..h {
                    let dst = ((gy * h + y) * 2 * w + gx * w) * 3;
                    grid[dst..dst + w * 3].copy_from_slice(&img[y * w * 3..(y + 1) * w * 3]);
                }
            }
            crate::image::write_png(&job.path, &grid, 2 * w, 2 * h, &job.text)?;
        }
        _ => crate::image::write_png(&job.path, &imgs[0], w, h, &job.text)?,
    }
    let s = ctx.settings;
    let record = serde_json::json!({
        "file": job.item.file.to_string_lossy(),
        "benchmark": ctx.bench.name(),
        "prompt_index": job.item.prompt,
        "prompt": ctx.prompts[job.item.prompt].text,
        "samples": job.item.samples,
        "seeds": job.seeds,
        "steps": s.steps,
        "batch": s.batch,
        "guidance": s.guidance,
        "sampler": format!("{:?}", s.sampler),
        "flow_shift": ctx.plan.shift,
        "size": format!("{w}x{h}"),
        "dtype": s.dtype.to_string(),
        "device": device.to_string(),
        "shard": ctx.shard.to_string(),
        "seconds_per_image": seconds_per_image,
    });
    ctx.manifest.append(&record)
}

/// A line above the progress bar (or on stderr when the bar is hidden: not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}
