//! `openuni bench`: the real-size variants (or the tiny one) with seeded random weights, no
//! download needed. For each batch size: per-stage times (conditioning, caption path, one
//! denoising step, decode), the end-to-end time of a whole batch and images/s, planned activation
//! memory; with `--profile`, a per-op profile of the conditioning, step and decode graphs with achieved FLOP/s
//! and bytes/s against ceilings measured in the same run (a large GEMM, a large elementwise add).
//! Printed as a table and written as JSON.
//!
//! Times are CUDA events on a GPU (median of `--iters` after a warm-up) and wall clock on the
//! CPU; conditioning and the end-to-end batch are wall clock everywhere (they include the host
//! work a user waits for). On the emulated GPU the numbers are CPU times of the emulator, not speed.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use openuni_graph::{node_cost, Graph, GraphBuilder};
use openuni_models::config::{parse_config, MllmConfig};
use openuni_models::dcae::DcaeConfig;
use openuni_models::openuni as openuni_head;
use openuni_models::sana::SanaConfig;
use openuni_models::scheduler::SamplerKind;
use openuni_models::variant;
use openuni_tensor::{Error as TensorError, HostTensor, Shape, TensorSource};
use serde::Serialize;

use crate::exec::{executor, Device};
use crate::pipeline::{
    DecodeOptions, GenerationBatch, LatentNoise, OpenUni, RunOptions, SamplingParams,
};
use crate::tiny_model;

pub mod chat;
pub mod plan;

/// Seeded random weights of any requested name and shape, drawn by `tiny_model::init_rule`
/// from a per-tensor stream (so every run of a benchmark sees the same model). Values are
/// generated on request: nothing is stored.
pub struct RandomWeights {
    pub origin: String,
    /// Shapes of the tensors a caller asks for by name alone (embedding tables, meta-queries).
    pub tables: HashMap<String, Shape>,
}

/// splitmix64: a fast, well-mixed stream for benchmark weights (not for statistics).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn seed_of(name: &str, row: usize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (name, row).hash(&mut h);
    h.finish()
}

/// `n` values with mean `offset` and standard deviation `scale` (uniform, unit variance).
fn draw(seed: u64, n: usize, scale: f32, offset: f32) -> Vec<f32> {
    let mut s = seed;
    let k = scale * 3f32.sqrt() * 2.0;
    (0..n)
        .map(|_| offset + k * ((splitmix(&mut s) >> 40) as f32 / (1u64 << 24) as f32 - 0.5))
        .collect()
}

impl TensorSource for RandomWeights {
    fn origin(&self) -> String {
        self.origin.clone()
    }
    fn shape_of(&self, name: &str) -> openuni_tensor::Result<Shape> {
        self.tables
            .get(name)
            .cloned()
            .ok_or_else(|| TensorError::MissingKey {
                path: self.origin.clone().into(),
                key: name.into(),
                available: self.tables.len(),
                hint: "random weights know the shapes of their tables only".into(),
            })
    }
    fn contains(&self, _name: &str) -> bool {
        true
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> openuni_tensor::Result<HostTensor> {
        let (scale, offset) = tiny_model::init_rule(name, shape);
        HostTensor::from_f32(
            shape.clone(),
            draw(seed_of(name, usize::MAX), shape.numel(), scale, offset),
        )
    }
    fn rows_f32(&self, name: &str, rows: &[usize]) -> openuni_tensor::Result<HostTensor> {
        let shape = self.shape_of(name)?;
        let (n, cols) = (shape.rows(), shape.last());
        let (scale, offset) = tiny_model::init_rule(name, &shape);
        let mut out = Vec::with_capacity(rows.len() * cols);
        for &r in rows {
            if r >= n {
                return Err(TensorError::IndexOutOfRange {
                    path: self.origin.clone().into(),
                    key: name.into(),
                    index: r,
                    len: n,
                });
            }
            out.extend(draw(seed_of(name, r), cols, scale, offset));
        }
        HostTensor::from_f32([rows.len(), cols], out)
    }
}

/// Writes the variant's configs as JSON (llm.json, connector.json, transformer.json, vae.json,
/// openuni.json with the query count and image size), so that the PyTorch baseline
/// (tools/bench_torch.py) builds exactly the models this benchmark runs.
pub fn write_configs(variant: &str, dir: &std::path::Path) -> Result<()> {
    let v = variant::any(variant).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let files = [
        ("llm.json", (v.llm)()),
        ("connector.json", serde_json::to_value((v.connector)())?),
        ("transformer.json", (v.transformer)()),
        ("vae.json", (v.vae)()),
        (
            "openuni.json",
            serde_json::json!({"variant": variant, "num_queries": v.num_queries, "size": v.size}),
        ),
        // The MLLM's vision tower (tools/bench_torch_chat.py --vit-tiles).
        (
            "vit.json",
            variant::internvl3_vision(
                MllmConfig::from_value((v.llm)(), &format!("variant {variant} llm"))?
                    .llm
                    .hidden_size,
            ),
        ),
    ];
    for (name, value) in files {
        let p = dir.join(name);
        crate::atomic::write_bytes(&p, serde_json::to_string_pretty(&value)?.as_bytes())?;
    }
    Ok(())
}

/// A variant with random weights.
pub fn random_model(variant: &str) -> Result<(OpenUni, usize)> {
    let v = variant::any(variant).map_err(anyhow::Error::msg)?;
    let llm_cfg = MllmConfig::from_value((v.llm)(), &format!("variant {variant} llm"))?.llm;
    let tcfg: SanaConfig =
        parse_config((v.transformer)(), &format!("variant {variant} transformer"))?;
    let vcfg: DcaeConfig = parse_config((v.vae)(), &format!("variant {variant} vae"))?;
    let src = |what: &str, tables: Vec<(&str, Vec<usize>)>| -> Box<dyn TensorSource> {
        Box::new(RandomWeights {
            origin: format!("random {variant} {what} weights"),
            tables: tables
                .into_iter()
                .map(|(k, s)| (k.to_string(), Shape::new(s)))
                .collect(),
        })
    };
    let llm = src(
        "llm",
        vec![(
            "model.embed_tokens.weight",
            vec![llm_cfg.vocab_size, llm_cfg.hidden_size],
        )],
    );
    // The OpenUni checkpoint holds no `transformer.*` here: the base transformer's weights are used.
    let openuni = Box::new(NotFinetuned(RandomWeights {
        origin: format!("random {variant} openuni weights"),
        tables: HashMap::from([(
            openuni_head::META_QUERIES.to_string(),
            Shape::new(vec![v.num_queries, llm_cfg.hidden_size]),
        )]),
    }));
    let m = OpenUni::from_parts(
        llm_cfg,
        llm,
        "model.",
        openuni,
        (v.connector)(),
        v.num_queries,
        tcfg,
        src("transformer", vec![]),
        vcfg,
        src("vae", vec![]),
    );
    Ok((m, v.size))
}

/// Random OpenUni weights that, like a stage-1 checkpoint, carry no transformer.
struct NotFinetuned(RandomWeights);

impl TensorSource for NotFinetuned {
    fn origin(&self) -> String {
        self.0.origin()
    }
    fn shape_of(&self, name: &str) -> openuni_tensor::Result<Shape> {
        self.0.shape_of(name)
    }
    fn contains(&self, name: &str) -> bool {
        !name.starts_with(openuni_head::TRANSFORMER_PREFIX)
    }
    fn tensor_f32(&self, name: &str, shape: &Shape) -> openuni_tensor::Result<HostTensor> {
        self.0.tensor_f32(name, shape)
    }
    fn rows_f32(&self, name: &str, rows: &[usize]) -> openuni_tensor::Result<HostTensor> {
        self.0.rows_f32(name, rows)
    }
}

pub struct BenchOptions {
    pub variant: String,
    pub batches: Vec<usize>,
    pub run: RunOptions,
    pub steps: usize,
    pub iters: usize,
    pub profile: bool,
    pub json: Option<PathBuf>,
    pub command: String,
    /// Image side in pixels (a multiple of 32); None: the variant's own size.
    pub size: Option<usize>,
}

#[derive(Serialize)]
pub struct BatchResult {
    pub batch: usize,
    /// LLM + meta-queries + connector + projector for the batch's 2N rows, as `generate` runs it
    /// (resident executor, prompt embeddings left on the device; wall clock).
    pub conditioning_ms: f64,
    /// SANA caption projection and every block's cross-attention K/V (once per batch).
    pub caption_ms: f64,
    /// One transformer evaluation on 2N rows (a captured CUDA graph on a GPU).
    pub step_ms: f64,
    pub decode_ms: f64,
    /// conditioning + caption + steps · step + decode.
    pub stage_sum_ms: f64,
    /// A whole batch from prompt ids to uint8 images on the host through `generate`'s path, wall
    /// clock (median).
    pub batch_ms: f64,
    pub images_per_s: f64,
    /// Three batches in a row as `generate` runs them: the next batch's conditioning (on the
    /// device's second lane) overlapping this batch's denoising.
    pub pipelined_images_per_s: f64,
    /// Planned activation bytes of the resident graphs (connector, caption, step, decoder).
    pub planned_activation_bytes: usize,
    /// Bytes held by the executors once warm (arenas, workspaces, staging).
    pub resident_activation_bytes: usize,
    pub weight_bytes: usize,
}

#[derive(Serialize)]
pub struct OpProfile {
    pub graph: String,
    pub op: String,
    pub nodes: usize,
    pub ms: f64,
    /// Share of the graph's summed node time.
    pub share: f64,
    pub tflops: f64,
    pub gbytes_per_s: f64,
    /// The larger of achieved/peak FLOP/s and achieved/peak bytes/s.
    pub fraction_of_ceiling: f64,
}

#[derive(Serialize)]
pub struct Ceilings {
    /// From a large GEMM (Linear) in the storage dtype.
    pub tflops: f64,
    /// From a large elementwise add (2 reads, 1 write).
    pub gbytes_per_s: f64,
}

#[derive(Serialize)]
pub struct BenchReport {
    pub variant: String,
    pub device: String,
    pub dtype: String,
    pub steps: usize,
    pub iters: usize,
    pub height: usize,
    pub width: usize,
    pub date: String,
    pub commit: String,
    pub command: String,
    pub results: Vec<BatchResult>,
    pub ceilings: Option<Ceilings>,
    pub profile: Vec<OpProfile>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn wall_ms(f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => format!(
            "cpu ({} threads available)",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        _ => crate::exec::open_device(d)
            .map(|dev| format!("{d} ({})", dev.name()))
            .unwrap_or_else(|_| d.to_string()),
    }
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Fixed prompt ids of typical lengths: OpenUni's template around a ~12-word prompt (cond) and
/// the unconditional template.
fn prompt_ids(vocab: usize, n: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
    (0..n)
        .map(|i| {
            let cond = (0..30)
                .map(|j| ((i * 31 + j * 7 + 11) % vocab) as u32)
                .collect();
            let uncond = (0..16).map(|j| ((j * 13 + 5) % vocab) as u32).collect();
            (cond, uncond)
        })
        .collect()
}

/// Measured ceilings: a large GEMM and a large elementwise add in the storage dtype.
fn measure_ceilings(run: RunOptions, iters: usize) -> Result<Ceilings> {
    let (m, k) = if run.device == Device::Cpu || run.device.is_emulated() {
        (256, 512)
    } else {
        (8192, 8192)
    };
    let src = RandomWeights {
        origin: "ceiling".into(),
        tables: HashMap::new(),
    };
    let mut b = GraphBuilder::new();
    let x = b.input("x", [m, k])?;
    let w = b.weight("w", [k, k])?;
    let y = b.linear("gemm", x, w, None)?;
    b.output("y", y)?;
    let g = b.finish();
    let mut e = executor(run.device, &g, &src, run.dtype, false)?;
    e.set_inputs(&HashMap::from([(
        "x".to_string(),
        src.tensor_f32("x", &[m, k].into())?,
    )]))?;
    let gemm_ms = median(e.time_runs(iters)?);
    // Larger than the caches (the emulator's slowness keeps its array smaller).
    let n = match run.device {
        Device::Cpu => 1 << 24,
        Device::Emu | Device::EmuAt(_) => 1 << 20,
        Device::Cuda(_) => 1 << 28,
    };
    let mut b = GraphBuilder::new();
    let a = b.input("a", [n])?;
    let c = b.input("c", [n])?;
    let s = b.add("add", a, c)?;
    b.output("s", s)?;
    let g = b.finish();
    let mut e = executor(run.device, &g, &src, run.dtype, false)?;
    let t = src.tensor_f32("a", &[n].into())?;
    e.set_inputs(&HashMap::from([
        ("a".to_string(), t.clone()),
        ("c".to_string(), t),
    ]))?;
    let add_ms = median(e.time_runs(iters)?);
    Ok(Ceilings {
        tflops: 2.0 * (m * k * k) as f64 / (gemm_ms * 1e-3) / 1e12,
        gbytes_per_s: 3.0 * (n * run.dtype.size_in_bytes()) as f64 / (add_ms * 1e-3) / 1e9,
    })
}

/// Per-op profile of a resident graph.
fn profile_graph(
    label: &str,
    graph: &Graph,
    node_ms: &[f64],
    esize: usize,
    ceil: Option<&Ceilings>,
) -> Vec<OpProfile> {
    let total: f64 = node_ms.iter().sum();
    let mut by_op: BTreeMap<&str, (usize, f64, f64, f64)> = BTreeMap::new();
    for (node, &ms) in graph.nodes.iter().zip(node_ms) {
        let c = node_cost(graph, node);
        let e = by_op.entry(node.op.name()).or_default();
        *e = (
            e.0 + 1,
            e.1 + ms,
            e.2 + c.flops,
            e.3 + c.elems * esize as f64,
        );
    }
    let mut out: Vec<OpProfile> = by_op
        .into_iter()
        .map(|(op, (nodes, ms, flops, bytes))| {
            let s = ms * 1e-3;
            let (tflops, gbs) = (flops / s / 1e12, bytes / s / 1e9);
            let fraction = ceil.map_or(0.0, |c| (tflops / c.tflops).max(gbs / c.gbytes_per_s));
            OpProfile {
                graph: label.into(),
                op: op.into(),
                nodes,
                ms,
                share: ms / total,
                tflops,
                gbytes_per_s: gbs,
                fraction_of_ceiling: fraction,
            }
        })
        .collect();
    out.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    out
}

pub fn run(o: &BenchOptions) -> Result<BenchReport> {
    if o.batches.is_empty() || o.batches.contains(&0) {
        bail!("--batch takes a comma-separated list of positive batch sizes");
    }
    if o.iters == 0 || o.steps == 0 {
        bail!("--iters and --steps must be at least 1");
    }
    let (model, own_size) = random_model(&o.variant)?;
    let up = model.vae_cfg.upscale();
    let size = o.size.unwrap_or(own_size);
    if size == 0 || size % up != 0 {
        bail!("--size {size} is not a positive multiple of {up} (the VAE upscales latents {up}x)");
    }
    let (lh, lw) = (size / up, size / up);
    let c = model.transformer_cfg.in_channels;
    let (q, cc) = (model.num_queries, model.transformer_cfg.caption_channels);
    let run = o.run;
    let esize = run.dtype.size_in_bytes();
    let shift = 3.0;
    let mut results = vec![];
    let mut profile = vec![];
    let ceilings = if o.profile {
        Some(measure_ceilings(run, o.iters)?)
    } else {
        None
    };
    for &n in &o.batches {
        let ids = prompt_ids(model.llm_cfg.vocab_size, n);
        let pairs: Vec<(&[u32], &[u32])> = ids.iter().map(|(a, b)| (&a[..], &b[..])).collect();
        // Drawn on the device from the images' seeds, as `generate` does.
        let noise = LatentNoise::seeded((0..n as u64).map(|i| 7 + i).collect(), c, lh, lw);
        let params = SamplingParams {
            steps: o.steps,
            guidance: 4.5,
            sampler: SamplerKind::DpmSolver,
            flow_shift: shift,
            decode: DecodeOptions::default(),
        };
        // `generate`'s path for one batch: the prompt embeddings and the caption K/V stay on the
        // device, the latents go to the decoder there, and only the uint8 images come back.
        let one = [GenerationBatch {
            prompts: ids.clone(),
            noise: noise.clone(),
        }];
        let mut generate = || model.generate_batches(&one, &params, run, |_| {}, |_, _| Ok(()));
        // Progress on stderr: on the emulated GPU a stage takes seconds to minutes.
        let started = Instant::now();
        let progress = |what: &str| {
            eprintln!(
                "bench: batch {n}: {:6.1} s: {what}",
                started.elapsed().as_secs_f64()
            )
        };
        progress("warm-up (builds the executors, uploads the weights)");
        // Warm-up: builds and captures every resident executor and uploads the weights.
        generate().with_context(|| format!("batch {n}: warm-up"))?;
        progress(&format!(
            "{} whole batches of {} steps",
            o.iters.min(3),
            o.steps
        ));
        let batch_ms = median(
            (0..o.iters.min(3))
                .map(|_| wall_ms(&mut generate))
                .collect::<Result<_>>()?,
        );
        let three: Vec<GenerationBatch> = (0..3)
            .map(|_| GenerationBatch {
                prompts: ids.clone(),
                noise: noise.clone(),
            })
            .collect();
        progress("3 batches pipelined");
        let pipelined_ms =
            wall_ms(&mut || model.generate_batches(&three, &params, run, |_| {}, |_, _| Ok(())))?;
        progress(&format!(
            "conditioning, caption path, step and decode, {} runs each",
            o.iters
        ));
        let conditioning_ms = median(
            (0..o.iters)
                .map(|_| {
                    // As `generate` conditions a batch: the resident executor, the prompt
                    // embeddings left on the device (flags read back, not the tensors).
                    wall_ms(&mut || {
                        model.condition_batch_on_device(&pairs, run)?;
                        Ok(())
                    })
                })
                .collect::<Result<_>>()?,
        );
        let time = |graph: &str, dims: &[usize]| -> Result<f64> {
            model.resident_executor(graph, dims, run, |e| Ok(median(e.time_runs(o.iters)?)))
        };
        let caption_ms = time("caption", &[2 * n, q, cc])?;
        let step_ms = time("step", &[2 * n, c, lh, lw])?;
        let decode_ms = time("decoder", &[n, c, lh, lw])?;
        if o.profile {
            progress("profile of the conditioning, step and decode graphs");
            let p = model.with_conditioning_executor(&pairs, run, |e| {
                let ms = e.profile(o.iters)?;
                Ok(profile_graph(
                    &format!("conditioning batch {n}"),
                    e.graph(),
                    &ms,
                    esize,
                    ceilings.as_ref(),
                ))
            })?;
            profile.extend(p);
            for (label, dims) in [
                ("step", vec![2 * n, c, lh, lw]),
                ("decoder", vec![n, c, lh, lw]),
            ] {
                let p = model.resident_executor(label, &dims, run, |e| {
                    let ms = e.profile(o.iters)?;
                    Ok(profile_graph(
                        &format!("{label} batch {n}"),
                        e.graph(),
                        &ms,
                        esize,
                        ceilings.as_ref(),
                    ))
                })?;
                profile.extend(p);
            }
        }
        let stage_sum_ms = conditioning_ms + caption_ms + o.steps as f64 * step_ms + decode_ms;
        results.push(BatchResult {
            batch: n,
            conditioning_ms,
            caption_ms,
            step_ms,
            decode_ms,
            stage_sum_ms,
            batch_ms,
            images_per_s: n as f64 / (batch_ms * 1e-3),
            pipelined_images_per_s: 3.0 * n as f64 / (pipelined_ms * 1e-3),
            planned_activation_bytes: model.planned_batch_bytes(
                n,
                lh,
                lw,
                run.dtype,
                DecodeOptions::default(),
            )?,
            resident_activation_bytes: model.resident_activation_bytes(),
            weight_bytes: model.resident_weight_bytes(),
        });
        progress("done");
        // The next batch size gets its own executors; free these first.
        model.release_executors();
    }
    let report = BenchReport {
        variant: o.variant.clone(),
        device: device_name(run.device),
        dtype: run.dtype.to_string(),
        steps: o.steps,
        iters: o.iters,
        height: size,
        width: size,
        date: command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        commit: command_output("git", &["rev-parse", "--short", "HEAD"]),
        command: o.command.clone(),
        results,
        ceilings,
        profile,
    };
    if let Some(p) = &o.json {
        crate::atomic::write_bytes(p, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("{}: cannot write the JSON report", p.display()))?;
    }
    Ok(report)
}

/// The report as text tables.
pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "openuni bench: {} {}x{}, {} steps, {} on {}, median of {} runs",
        r.variant, r.width, r.height, r.steps, r.dtype, r.device, r.iters
    );
    let _ = writeln!(s, "commit {}, {}", r.commit, r.date);
    if r.device.starts_with("emu") {
        let _ = writeln!(
            s,
            "(emulated GPU: these are CPU times of the emulator, not GPU speed)"
        );
    }
    let _ = writeln!(
        s,
        "{:>5} {:>12} {:>10} {:>10} {:>10} {:>12} {:>10} {:>9} {:>10} {:>11} {:>10}",
        "batch",
        "condition ms",
        "caption ms",
        "step ms",
        "decode ms",
        "stage sum ms",
        "batch ms",
        "images/s",
        "pipelined",
        "act. MiB",
        "weight MiB"
    );
    for b in &r.results {
        let _ = writeln!(
            s,
            "{:>5} {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>12.1} {:>10.1} {:>9.3} {:>10.3} {:>11.1} {:>10.1}",
            b.batch,
            b.conditioning_ms,
            b.caption_ms,
            b.step_ms,
            b.decode_ms,
            b.stage_sum_ms,
            b.batch_ms,
            b.images_per_s,
            b.pipelined_images_per_s,
            b.resident_activation_bytes as f64 / 1048576.0,
            b.weight_bytes as f64 / 1048576.0
        );
    }
    if let Some(c) = &r.ceilings {
        let _ = writeln!(
            s,
            "\nmeasured ceilings: GEMM {:.3} TFLOP/s, elementwise {:.1} GB/s",
            c.tflops, c.gbytes_per_s
        );
    }
    if !r.profile.is_empty() {
        let _ = writeln!(
            s,
            "{:<18} {:<26} {:>5} {:>10} {:>7} {:>9} {:>9} {:>9}",
            "graph", "op", "nodes", "ms", "share", "TFLOP/s", "GB/s", "of ceil."
        );
        for p in &r.profile {
            let _ = writeln!(
                s,
                "{:<18} {:<26} {:>5} {:>10.3} {:>6.1}% {:>9.3} {:>9.1} {:>8.1}%",
                p.graph,
                p.op,
                p.nodes,
                p.ms,
                100.0 * p.share,
                p.tflops,
                p.gbytes_per_s,
                100.0 * p.fraction_of_ceiling
            );
        }
    }
    s
}
