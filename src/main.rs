//! `openuni`: OpenUni text-to-image inference with hand-written CUDA kernels and an f32 CPU
//! reference.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use openuni::exec::{parse_dtype, Device};
use openuni::generate::limits::{self, f32_in, usize_in};
use openuni::verify::{run_case, Options};
use openuni_models::variant::DEFAULT_STEPS;

#[derive(Parser)]
#[command(
    name = "openuni",
    version,
    about = "OpenUni inference engine: CUDA kernels with an f32 CPU reference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from text prompts (PNG files with the parameters in their metadata).
    Generate(GenerateArgs),
    /// Run reference case(s) and compare every output with PyTorch's (PASS/FAIL, exit 1 on FAIL).
    Verify {
        /// Case folders (case.json, io.safetensors, model/).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
        /// cpu, cuda, cuda:N, or emu (the emulated GPU: the CUDA backend run on the CPU).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Storage type on the device: f32 or bf16 (the CPU runs f32 only).
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Also compare every node's output with the CPU reference (localises a divergence).
        #[arg(long)]
        diff_nodes: bool,
    },
    /// Benchmark a variant with random weights (no download): per-stage times, images/s, memory,
    /// and with --profile a per-op profile against measured ceilings. Table on stdout, JSON with --json.
    Bench {
        /// b-512, l-512, l-1024, or tiny (the built-in tiny model's sizes).
        #[arg(long, default_value = "b-512")]
        variant: String,
        /// Comma-separated batch sizes [default: 1,8,32; on --device emu 1].
        #[arg(long, value_delimiter = ',', value_parser = usize_in(limits::BATCH.0, limits::BATCH.1))]
        batch: Option<Vec<usize>>,
        /// cpu, cuda, cuda:N, or emu (the emulated GPU: correctness only, its times are not speed).
        #[arg(long, default_value = "cuda")]
        device: String,
        /// bf16 or f32 (the CPU runs f32).
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Denoising steps of the end-to-end batch time [default: 20 (OpenUni's); on --device emu 2].
        #[arg(long, value_parser = usize_in(limits::STEPS.0, limits::STEPS.1))]
        steps: Option<usize>,
        /// Timed runs per measurement (after a warm-up); the median is reported [default: 10; on
        /// --device emu 1].
        #[arg(long, value_parser = usize_in(limits::ITERS.0, limits::ITERS.1))]
        iters: Option<usize>,
        /// Also profile every op of the conditioning, step and decode graphs (with --plan: each
        /// stage's counted launches, FLOPs and bytes by op).
        #[arg(long)]
        profile: bool,
        /// Write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Image side in pixels (a multiple of 32); default: the variant's size (on --device emu 64).
        #[arg(long, value_parser = usize_in(limits::SIDE.0, limits::SIDE.1))]
        size: Option<usize>,
        /// Only write the variant's model configs as JSON into DIR (for tools/bench_torch.py) and exit.
        #[arg(long, value_name = "DIR")]
        write_configs: Option<PathBuf>,
        /// Only write the variant's model at its real size with this benchmark's seeded random
        /// weights (stored as --dtype: f32 or bf16) into DIR, in the layouts `generate` reads
        /// (--mllm DIR/llm --checkpoint DIR/openuni.safetensors --transformer DIR/transformer
        /// --vae DIR/vae), and exit: for measuring generate's memory without the published
        /// weights. Its pictures are not meaningful.
        #[arg(long, value_name = "DIR")]
        write_random_model: Option<PathBuf>,
        /// Print the counted plan instead of timing: launches, FLOPs, bytes, host traffic and a
        /// roofline model per stage, from the graphs at real size (no weights, no device, seconds).
        #[arg(long)]
        plan: bool,
        /// Benchmark the chat decoder instead (the variant's LLM): prefill time and per-step decode
        /// time at each --batch (slots), tokens/s (tools/bench_torch_chat.py is the baseline).
        #[arg(long)]
        chat: bool,
        /// With --chat: prompt tokens per sequence.
        #[arg(long, default_value_t = 128, value_parser = usize_in(1, 32768))]
        chat_prompt: usize,
        /// With --chat: also time InternVL3's vision tower (InternViT-300M + mlp1, random weights) on
        /// this many 448² tiles as one batch (0: not).
        #[arg(long, default_value_t = 0, value_parser = usize_in(0, 64))]
        vit_tiles: usize,
    },
    /// Ask InternVL3 a question, optionally about images; the answer streams to stdout. With
    /// --questions, answer a JSONL file of questions with continuous batching. Without --model, the
    /// built-in tiny random model answers (not meaningfully).
    Chat {
        /// The question.
        #[arg(long, required_unless_present = "questions")]
        prompt: Option<String>,
        /// An image file (JPEG, PNG, WebP) the question is about; repeat for several images.
        #[arg(long, value_name = "FILE", conflicts_with = "pixel_values")]
        image: Vec<PathBuf>,
        /// The most tiles per image (the model card's max_num; a thumbnail is added when > 1 tile).
        #[arg(long, default_value_t = 12, value_parser = usize_in(1, openuni_models::internvl_preprocess::MAX_MAX_NUM))]
        max_num: usize,
        /// A JSONL file of questions ({"id", "question", "image": path | [paths]} per line) to answer
        /// in batches; answers are appended to --answers.
        #[arg(long, value_name = "FILE", requires = "answers", conflicts_with_all = ["prompt", "image", "pixel_values", "history"])]
        questions: Option<PathBuf>,
        /// With --questions: the JSONL file answers are appended to (answered ids are skipped on a re-run).
        #[arg(long, value_name = "FILE", requires = "questions")]
        answers: Option<PathBuf>,
        /// With --questions: how many questions decode together.
        #[arg(long, default_value_t = 8, value_parser = usize_in(1, 4096))]
        max_batch: usize,
        /// Earlier turns: a JSON file with a list of [question, answer] pairs.
        #[arg(long, value_name = "FILE")]
        history: Option<PathBuf>,
        /// A safetensors file holding `pixel_values` [T, 3, 448, 448] (the model card's load_image).
        #[arg(long, value_name = "FILE")]
        pixel_values: Option<PathBuf>,
        /// An InternVL3 folder (config.json, model.safetensors, tokenizer.json) or a repository id
        /// (OpenGVLab/InternVL3-1B) in the Hugging Face cache.
        #[arg(long, value_name = "DIR|REPO")]
        model: Option<PathBuf>,
        /// Stop after this many new tokens (or at <|im_end|>).
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Sample instead of greedy decoding, at this temperature (transformers' do_sample order:
        /// temperature, then --top-k, then --top-p).
        #[arg(long)]
        temperature: Option<f32>,
        /// With --temperature: keep the K most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// With --temperature: keep the smallest set of tokens reaching this probability.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// With --temperature: the seed of the draws (the same seed gives the same answer).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where the vision tower and the LLM (prefill, KV-cached decode) run: cpu, cuda, cuda:N or emu.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Storage type of weights, activations and the KV cache on the device: f32 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Serve images over HTTP with OpenAI's API shape (POST /v1/images/generations), batching
    /// concurrent requests.
    Serve(openuni::serve::cli::ServeArgs),
    /// Convert a PyTorch .pth checkpoint (read without running any pickled code) or safetensors
    /// file(s) to one safetensors file with the same tensor names and dtypes.
    Convert {
        /// Input: a torch.save .pth/.pt file, a .safetensors file, index or folder.
        input: PathBuf,
        /// Output .safetensors file.
        output: PathBuf,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// The prompt (or use --prompts).
    #[arg(long, conflicts_with = "prompts")]
    prompt: Option<String>,
    /// A file of prompts: one per line, or JSONL with `prompt`, `seed`, `negative_prompt`.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// b-512, l-512 or l-1024.
    #[arg(long, default_value = "b-512")]
    variant: String,
    /// OpenUni checkpoint (.pth or .safetensors); default: the Hugging Face cache.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// InternVL3 (or Qwen2) folder; default: the Hugging Face cache.
    #[arg(long)]
    mllm: Option<PathBuf>,
    /// SANA transformer folder (diffusers); default: the Hugging Face cache.
    #[arg(long)]
    transformer: Option<PathBuf>,
    /// DC-AE folder (diffusers); default: the Hugging Face cache.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Denoising steps (1..=1000).
    #[arg(long, default_value_t = DEFAULT_STEPS, value_parser = usize_in(limits::STEPS.0, limits::STEPS.1))]
    steps: usize,
    /// Classifier-free guidance scale, a finite number in 0..=100.
    #[arg(long, default_value_t = 4.5, value_parser = f32_in(limits::GUIDANCE.0, limits::GUIDANCE.1))]
    guidance: f32,
    /// dpm-solver (OpenUni's DPM-Solver++ 2M with flow sigmas) or euler (flow-matching Euler).
    #[arg(long, default_value = "dpm-solver")]
    sampler: String,
    /// Seed of the first image (0..=2^64-1); image i of a prompts file gets seed + i unless its
    /// line sets one (a seed past 2^64-1 is refused, never wrapped).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Image height in pixels (a multiple of 32 in 32..=8192); default: the variant's size.
    #[arg(long, value_parser = usize_in(limits::SIDE.0, limits::SIDE.1))]
    height: Option<usize>,
    /// Image width in pixels (a multiple of 32 in 32..=8192); default: the variant's size.
    #[arg(long, value_parser = usize_in(limits::SIDE.0, limits::SIDE.1))]
    width: Option<usize>,
    /// cpu, cuda, cuda:N, or emu (the emulated GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// bf16 or f32 (the CPU runs f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Output folder.
    #[arg(long, default_value = "outputs")]
    out: PathBuf,
    /// Images generated together: one batched conditioning, one transformer run of 2N rows
    /// (uncond and cond) per step, one batched decode. On a GPU larger batches give more images/s
    /// until memory runs out (the error then says what batch fits).
    #[arg(long, default_value_t = 1, value_parser = usize_in(limits::BATCH.0, limits::BATCH.1))]
    batch: usize,
    /// Decode the high-resolution stages in overlapping tiles of PX×PX pixels (a multiple of
    /// 32, above 112 for the SANA VAEs), bounding the VAE's memory; the result is the one-piece
    /// decode's. Default: 512-px tiles when a side exceeds 1024 px, else one piece.
    #[arg(long, value_name = "PX", value_parser = usize_in(0, limits::SIDE.1))]
    decode_tile: Option<usize>,
    /// Release each stage once the run is done with it: the LLM once the batches are conditioned
    /// (before the transformer loads), the transformer before the last decode, so the peak is the
    /// largest phase, not the sum: auto (on the CPU, for one batch, or when keeping every stage
    /// would not fit), yes or no. `serve` keeps every stage.
    #[arg(long, default_value = "auto", value_name = "auto|yes|no")]
    release_stages: String,
    /// Run even when the memory plan (printed before the run) says it will not fit.
    #[arg(long)]
    skip_memory_check: bool,
    /// A benchmark's prompt set: geneval (--prompts evaluation_metadata.jsonl), dpg (--prompts a
    /// folder of .txt prompts) or wise (--prompts its JSON); writes the layout its scorer reads into
    /// --out. --device may then name several devices: cuda:all, cuda:0,2,3, emu:all, emu:0,1.
    #[arg(long, value_name = "BENCH", requires = "prompts")]
    eval: Option<String>,
    /// With --eval geneval: images per prompt (default 4).
    #[arg(long, requires = "eval", value_parser = usize_in(1, 1000))]
    samples: Option<usize>,
    /// With --eval: make shard K of N (batch b of the set, --batch images, goes to shard b % N;
    /// every shard must use the same --batch); default: from
    /// SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT or JOB_COMPLETION_INDEX/JOB_COMPLETION_COUNT.
    #[arg(long, value_name = "K/N", requires = "eval")]
    shard: Option<String>,
    /// With --eval: report what of the set is missing or duplicated in DIR (all shards); exit 1 if
    /// anything is. Generates nothing.
    #[arg(long, value_name = "DIR", requires = "eval")]
    check: Option<PathBuf>,
    /// With --eval: a line per device and batch.
    #[arg(long, requires = "eval")]
    verbose: bool,
}

/// `generate --eval`: a benchmark's prompt set on one or several devices, or `--check`.
fn generate_eval(a: GenerateArgs, bench: &str) -> anyhow::Result<bool> {
    use openuni::eval::{self, Benchmark};
    use openuni::generate::{resolve, variant, ModelFlags, Settings};
    let bench = Benchmark::parse(bench)?;
    // Evaluation workers keep every stage resident (they check the memory themselves).
    let memory = openuni::generate::MemoryPolicy::default();
    let prompts = a.prompts.clone().ok_or_else(|| {
        anyhow::anyhow!("--eval needs --prompts FILE (the benchmark's prompt file or folder)")
    })?;
    if let Some(dir) = &a.check {
        return eval::check(bench, &prompts, a.samples, dir);
    }
    if a.prompt.is_some() {
        anyhow::bail!("--eval reads --prompts, not --prompt");
    }
    let v = variant(&a.variant)?;
    let devices = eval::parse_devices(&a.device)?;
    let dtype = parse_dtype(&a.dtype)?;
    for d in &devices {
        openuni::generate::check_device(*d, dtype)?;
    }
    let sampler = openuni_models::scheduler::SamplerKind::parse(&a.sampler).ok_or_else(|| {
        anyhow::anyhow!("--sampler `{}` is not one of dpm-solver, euler", a.sampler)
    })?;
    for (flag, v) in [
        ("--height", a.height),
        ("--width", a.width),
        ("--decode-tile", a.decode_tile),
    ] {
        if let Some(v) = v.filter(|v| v % 32 != 0 || *v == 0) {
            anyhow::bail!(
                "{flag} {v} is not a positive multiple of 32 (the VAE upscales latents 32x)"
            );
        }
    }
    let models = resolve(
        v,
        &ModelFlags {
            checkpoint: a.checkpoint,
            mllm: a.mllm,
            transformer: a.transformer,
            vae: a.vae,
        },
    )?;
    if models.builtin {
        eprintln!("note: no OpenUni weights configured or cached; using the built-in tiny random model. Its pictures are not meaningful.");
    }
    let settings = Settings {
        steps: a.steps,
        sampler,
        guidance: a.guidance,
        height: a.height,
        width: a.width,
        device: devices[0],
        dtype,
        out: a.out,
        variant: v,
        decode_tile: a.decode_tile,
        batch: a.batch,
        memory,
    };
    let opts = eval::EvalOptions {
        bench,
        prompts,
        samples: a.samples,
        shard: a.shard,
        devices,
        verbose: a.verbose,
        seed: a.seed,
        negative_prompt: a.negative_prompt,
    };
    let report = eval::run(&opts, &models, &settings)?;
    Ok(report.failed.is_empty())
}

fn generate(a: GenerateArgs) -> anyhow::Result<bool> {
    use openuni::generate::{
        check_device, read_prompts, resolve, run, variant, Item, ModelFlags, Settings,
    };
    if let Some(bench) = a.eval.clone() {
        return generate_eval(a, &bench);
    }
    let memory = openuni::generate::MemoryPolicy {
        release_stages: openuni::generate::ReleaseStages::parse(&a.release_stages)?,
        skip_check: a.skip_memory_check,
    };
    // Every flag is checked (and the device opened) before prompts are read or models loaded.
    let v = variant(&a.variant)?;
    let (device, dtype) = (Device::parse(&a.device)?, parse_dtype(&a.dtype)?);
    check_device(device, dtype)?;
    let sampler = openuni_models::scheduler::SamplerKind::parse(&a.sampler).ok_or_else(|| {
        anyhow::anyhow!("--sampler `{}` is not one of dpm-solver, euler", a.sampler)
    })?;
    for (flag, v) in [
        ("--height", a.height),
        ("--width", a.width),
        ("--decode-tile", a.decode_tile),
    ] {
        if let Some(v) = v.filter(|v| v % 32 != 0 || *v == 0) {
            anyhow::bail!(
                "{flag} {v} is not a positive multiple of 32 (the VAE upscales latents 32x)"
            );
        }
    }
    let (items, problems) = match (&a.prompt, &a.prompts) {
        (Some(p), None) => (
            vec![Item {
                prompt: p.clone(),
                negative_prompt: a.negative_prompt.clone(),
                seed: a.seed,
            }],
            vec![],
        ),
        (None, Some(f)) => read_prompts(f, a.seed, a.negative_prompt.as_deref())?,
        _ => anyhow::bail!("give --prompt TEXT or --prompts FILE"),
    };
    for p in &problems {
        eprintln!("{p}");
    }
    if items.is_empty() {
        anyhow::bail!(
            "no prompt left to generate: every line of the prompts file was refused (see above)"
        );
    }
    let models = resolve(
        v,
        &ModelFlags {
            checkpoint: a.checkpoint,
            mllm: a.mllm,
            transformer: a.transformer,
            vae: a.vae,
        },
    )?;
    let settings = Settings {
        steps: a.steps,
        sampler,
        guidance: a.guidance,
        height: a.height,
        width: a.width,
        device,
        dtype,
        out: a.out,
        variant: v,
        decode_tile: a.decode_tile,
        batch: a.batch,
        memory,
    };
    let report = run(&items, &models, &settings)?;
    for p in &report.written {
        println!("{}", p.display());
    }
    Ok(problems.is_empty() && report.failed.is_empty())
}

/// Kernels compiled by nvcc at build time when it was present (else empty: NVRTC at run time).
mod prebuilt_kernels {
    include!(concat!(env!("OUT_DIR"), "/prebuilt_kernels.rs"));
}

fn main() -> ExitCode {
    openuni_cuda::KernelSet::set_prebuilt(prebuilt_kernels::PREBUILT_KERNELS);
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Verify {
            cases,
            device,
            dtype,
            diff_nodes,
        } => {
            let opts = Options {
                device: Device::parse(&device)?,
                dtype: parse_dtype(&dtype)?,
                diff_nodes,
            };
            let mut all_passed = true;
            for case in &cases {
                let report = run_case(case, &opts)?;
                print!("{}", report.render());
                all_passed &= report.passed();
            }
            Ok(all_passed)
        }
        Command::Bench {
            variant,
            batch,
            device,
            dtype,
            steps,
            iters,
            profile,
            json,
            size,
            write_configs,
            write_random_model,
            plan,
            chat,
            chat_prompt,
            vit_tiles,
        } => {
            if let Some(dir) = write_random_model {
                let v = openuni_models::variant::any(&variant).map_err(anyhow::Error::msg)?;
                let bytes = openuni::tiny_model::write_random_model(v, &dir, parse_dtype(&dtype)?)?;
                eprintln!("wrote {:.2} GiB of random {variant} weights ({dtype}; not meaningful pictures)", bytes as f64 / (1u64 << 30) as f64);
                println!("{}", dir.display());
                return Ok(true);
            }
            if let Some(dir) = write_configs {
                openuni::bench::write_configs(&variant, &dir)?;
                println!("{}", dir.display());
                return Ok(true);
            }
            // The emulator's times are CPU times, not speed: its defaults only exercise every stage
            // once (a minute for the tiny model, not the GPU defaults' many minutes).
            let emu = !plan && Device::parse(&device)?.is_emulated();
            let batch = batch.unwrap_or_else(|| if emu { vec![1] } else { vec![1, 8, 32] });
            let size = size.or(emu.then_some(64));
            let steps = steps.unwrap_or(if emu { 2 } else { DEFAULT_STEPS });
            let iters = iters.unwrap_or(if emu { 1 } else { 10 });
            if plan {
                let opts = openuni::bench::plan::PlanOptions {
                    variant,
                    batches: batch,
                    steps,
                    size,
                    json,
                    command: std::env::args().collect::<Vec<_>>().join(" "),
                };
                print!(
                    "{}",
                    openuni::bench::plan::render(&openuni::bench::plan::run(&opts)?, profile)
                );
                return Ok(true);
            }
            let device = Device::parse(&device)?;
            let dtype = parse_dtype(&dtype)?;
            let dtype = if device == Device::Cpu && dtype == openuni_tensor::DType::BF16 {
                eprintln!("note: --device cpu runs f32; benchmarking f32");
                openuni_tensor::DType::F32
            } else {
                dtype
            };
            if chat {
                let opts = openuni::bench::chat::ChatBenchOptions {
                    variant,
                    device,
                    dtype,
                    batches: batch,
                    prompt: chat_prompt,
                    iters,
                    vit_tiles,
                    json,
                    command: std::env::args().collect::<Vec<_>>().join(" "),
                };
                print!(
                    "{}",
                    openuni::bench::chat::render(&openuni::bench::chat::run(&opts)?)
                );
                return Ok(true);
            }
            let opts = openuni::bench::BenchOptions {
                variant,
                batches: batch,
                run: openuni::pipeline::RunOptions { device, dtype },
                steps,
                iters,
                profile,
                json,
                size,
                command: std::env::args().collect::<Vec<_>>().join(" "),
            };
            let report = openuni::bench::run(&opts)?;
            print!("{}", openuni::bench::render(&report));
            Ok(true)
        }
        Command::Chat {
            prompt,
            image,
            max_num,
            questions,
            answers,
            max_batch,
            history,
            pixel_values,
            model,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
            dtype,
        } => {
            if temperature.is_none() && (top_k != 0 || top_p != 1.0) {
                anyhow::bail!(
                    "--top-k and --top-p need --temperature (without it decoding is greedy)"
                );
            }
            let sampling = temperature.map(|temperature| openuni::chat::Sampling {
                temperature,
                top_k,
                top_p,
                seed,
            });
            let opts = openuni::chat::ChatOptions {
                model,
                prompt: prompt.unwrap_or_default(),
                history: match history {
                    Some(h) => openuni::chat::read_history(&h)?,
                    None => vec![],
                },
                pixel_values,
                images: image,
                max_num,
                max_new_tokens,
                sampling,
                device: Device::parse(&device)?,
                dtype: parse_dtype(&dtype)?,
            };
            match (questions, answers) {
                (Some(q), Some(a)) => {
                    openuni::chat::questions::run(&opts, &q, &a, max_batch)?;
                }
                _ => {
                    openuni::chat::run_cli(&opts)?;
                }
            }
            Ok(true)
        }
        Command::Serve(a) => openuni::serve::cli::run(a).map(|()| true),
        Command::Convert { input, output } => {
            println!("{}", openuni::convert::convert(&input, &output)?);
            Ok(true)
        }
    }
}
