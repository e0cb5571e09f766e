//! Bad input, driven through the built `openuni` binary: absurd or non-finite flags, hostile
//! prompts files, poisoned (NaN/Inf) weights and config values, failed writes. Every case must
//! end in a clear error (exit code 1..=100: not a panic, which exits 101, nor a signal such as an
//! allocation abort), name the flag, file, field or stage, leave no output file behind, and stay
//! within a 4 GiB address space.
//!
//! Add a case by adding a row to a table: `Case::generate(name, args, needles)` (or
//! `Case::new` for another subcommand), with `.setup(fn)` to prepare files in the case's folder
//! (a poisoned copy of the built-in tiny model under `cache/` is used when present) and `.any(..)`
//! when one of several messages is acceptable. In arguments `{dir}` is the case's folder and
//! `{out}` its output folder.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use openuni_tensor::{write_safetensors, HostTensor, Weights};

/// The address-space cap of every child.
const MEMORY_CAP: u64 = 4 << 30;
/// A child still running after this is a hang (generous: a fresh clone compiles every kernel with NVRTC on
/// the first emulated-GPU case, which took about a minute on a loaded 2-core machine).
const TIME_LIMIT: Duration = Duration::from_secs(600);

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Every needle must appear in stderr.
    want: Vec<&'static str>,
    /// When non-empty, at least one of these must appear too.
    any: Vec<&'static str>,
    setup: Option<fn(&Path)>,
    env: Vec<(&'static str, String)>,
}

impl Case {
    fn new(name: &'static str, args: &[&str], want: &[&'static str]) -> Case {
        Case {
            name,
            args: args.iter().map(|s| s.to_string()).collect(),
            want: want.to_vec(),
            any: vec![],
            setup: None,
            env: vec![],
        }
    }

    /// `openuni generate` of one small image (1 step, 64×64) with `extra` flags, which override.
    fn generate(name: &'static str, extra: &[&str], want: &[&'static str]) -> Case {
        let mut args = vec!["generate"];
        for (flag, default) in [
            ("--steps", "1"),
            ("--height", "64"),
            ("--width", "64"),
            ("--out", "{out}"),
        ] {
            if !extra
                .iter()
                .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
            {
                args.extend([flag, default]);
            }
        }
        if !extra.contains(&"--prompts") && !extra.contains(&"--prompt") {
            args.extend(["--prompt", "a red bicycle"]);
        }
        args.extend_from_slice(extra);
        Case::new(name, &args, want)
    }

    fn setup(mut self, f: fn(&Path)) -> Case {
        self.setup = Some(f);
        self
    }

    fn any(mut self, needles: &[&'static str]) -> Case {
        self.any = needles.to_vec();
        self
    }

    fn env(mut self, k: &'static str, v: &str) -> Case {
        self.env.push((k, v.to_string()));
        self
    }
}

/// The built-in tiny model, written once per test process.
fn base_cache() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        openuni::tiny_model::ensure(&tiny_dir(d.path())).unwrap();
        d
    })
    .path()
}

fn tiny_dir(cache: &Path) -> PathBuf {
    let name = openuni::tiny_model::default_dir()
        .file_name()
        .unwrap()
        .to_owned();
    cache.join(name)
}

/// Copies the tiny model into `case/cache` and returns its folder, for poisoning.
fn own_model(case: &Path) -> PathBuf {
    let (from, to) = (tiny_dir(base_cache()), tiny_dir(&case.join("cache")));
    for e in walk(&from) {
        let dst = to.join(e.strip_prefix(&from).unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&e, &dst).unwrap();
    }
    to
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Rewrites the safetensors file `file` with `f` applied to tensor `name` (as f32).
fn poison(file: &Path, name: &str, f: impl Fn(&mut [f32])) {
    let w = Weights::open(file).unwrap();
    let mut tensors: Vec<(String, HostTensor)> = w
        .keys()
        .map(|k| (k.to_string(), w.get(k).unwrap()))
        .collect();
    drop(w);
    let t = &mut tensors
        .iter_mut()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("{}: no tensor {name}", file.display()))
        .1;
    let mut v = t.to_f32_vec();
    f(&mut v);
    *t = HostTensor::from_f32(t.shape.clone(), v).unwrap();
    write_safetensors(file, tensors.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
}

/// Sets `key` of the JSON file `file` to `value`.
fn edit_json(file: &Path, key: &str, value: serde_json::Value) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(file, v.to_string()).unwrap();
}

/// The first tensor of `file` whose name contains every part.
fn tensor_named(file: &Path, parts: &[&str]) -> String {
    let w = Weights::open(file).unwrap();
    let mut keys: Vec<String> = w.keys().map(str::to_string).collect();
    keys.sort();
    keys.into_iter()
        .find(|k| parts.iter().all(|p| k.contains(p)))
        .unwrap_or_else(|| panic!("{}: no tensor with {parts:?}", file.display()))
}

fn files_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    if !dir.exists() {
        return vec![];
    }
    let mut v: Vec<_> = walk(dir)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Runs one case; returns what went wrong, if anything.
fn run_case(c: &Case) -> Option<String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    if let Some(f) = c.setup {
        f(dir);
    }
    let cache = if dir.join("cache").exists() {
        dir.join("cache")
    } else {
        base_cache().to_path_buf()
    };
    let before = files_in(&out);
    let args: Vec<String> = c
        .args
        .iter()
        .map(|a| {
            a.replace("{dir}", dir.to_str().unwrap())
                .replace("{out}", out.to_str().unwrap())
        })
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_openuni"));
    cmd.args(&args)
        .env("OPENUNI_CACHE", &cache)
        .env("HF_HUB_CACHE", dir.join("no-hub"))
        .env("OPENUNI_EMU_MEMORY", "512MiB")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in &c.env {
        cmd.env(k, v);
    }
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: MEMORY_CAP as libc::rlim_t,
                rlim_max: MEMORY_CAP as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn().unwrap();
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut so, &mut s).ok();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut se, &mut s).ok();
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIME_LIMIT {
            child.kill().ok();
            child.wait().ok();
            return Some(format!(
                "{}: still running after {TIME_LIMIT:?} (a hang)",
                c.name
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (stdout, stderr) = (t_out.join().unwrap(), t_err.join().unwrap());
    let took = start.elapsed();
    eprintln!(
        "{:<40} exit {:?} in {:.2}s: {}",
        c.name,
        status.code(),
        took.as_secs_f64(),
        stderr.lines().last().unwrap_or("")
    );
    let mut problems = vec![];
    match status.code() {
        Some(code) if (1..101).contains(&code) => {}
        Some(code) => problems.push(format!("exit code {code} (want 1..=100; 101 is a panic)")),
        None => problems.push(format!(
            "killed by a signal ({status:?}): an abort or crash"
        )),
    }
    for n in &c.want {
        if !stderr.contains(n) {
            problems.push(format!("stderr lacks `{n}`"));
        }
    }
    if !c.any.is_empty() && !c.any.iter().any(|n| stderr.contains(n)) {
        problems.push(format!("stderr has none of {:?}", c.any));
    }
    if stderr.contains("panicked") {
        problems.push("a panic message".into());
    }
    let after = files_in(&out);
    if after != before {
        let names: Vec<String> = after
            .iter()
            .map(|(p, _)| p.strip_prefix(dir).unwrap().display().to_string())
            .collect();
        problems.push(format!("the output folder changed: now {names:?}"));
    }
    (!problems.is_empty()).then(|| {
        format!(
            "{} ({}): {}\n  stdout: {stdout}\n  stderr: {stderr}",
            c.name,
            args.join(" "),
            problems.join("; ")
        )
    })
}

/// Runs every case (two at a time) and fails listing every case that failed.
fn run_table(cases: Vec<Case>) {
    let cases = std::sync::Mutex::new(cases.into_iter());
    let failures = std::sync::Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let Some(c) = cases.lock().unwrap().next() else {
                    break;
                };
                if let Some(f) = run_case(&c) {
                    failures.lock().unwrap().push(f);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn absurd_flags_are_refused_before_anything_is_built() {
    run_table(vec![
        Case::generate(
            "guidance nan",
            &["--guidance", "nan"],
            &["--guidance", "'nan'", "not a finite number", "0..=100"],
        ),
        Case::generate(
            "guidance inf",
            &["--guidance", "inf"],
            &["--guidance", "'inf'", "not a finite number"],
        ),
        Case::generate(
            "guidance -inf",
            &["--guidance=-inf"],
            &["--guidance", "not a finite number"],
        ),
        Case::generate(
            "guidance 1e30",
            &["--guidance", "1e30"],
            &["--guidance", "'1e30'", "0..=100"],
        ),
        Case::generate(
            "steps 2^64",
            &["--steps", "18446744073709551616"],
            &["--steps", "18446744073709551616", "1..=1000"],
        ),
        Case::generate(
            "steps 0",
            &["--steps", "0"],
            &["--steps", "'0'", "1..=1000"],
        ),
        Case::generate(
            "steps 10^9",
            &["--steps", "1000000000"],
            &["--steps", "1..=1000"],
        ),
        Case::generate("steps nan", &["--steps", "nan"], &["--steps", "'nan'"]),
        Case::generate(
            "height and width 2^62",
            &[
                "--height",
                "4611686018427387904",
                "--width",
                "4611686018427387904",
            ],
            &["--height", "4611686018427387904", "32..=8192"],
        ),
        Case::generate(
            "height 100",
            &["--height", "100"],
            &["--height 100", "multiple of 32"],
        ),
        Case::generate("width 0", &["--width", "0"], &["--width", "32..=8192"]),
        Case::generate(
            "batch 10^9",
            &["--batch", "1000000000"],
            &["--batch", "1..=256"],
        ),
        Case::generate("batch 0", &["--batch", "0"], &["--batch", "1..=256"]),
        Case::generate(
            "decode-tile 2^40",
            &["--decode-tile", "1099511627776"],
            &["--decode-tile", "1099511627776", "0..=8192"],
        ),
        Case::generate(
            "decode-tile 100",
            &["--decode-tile", "100"],
            &["--decode-tile 100", "multiple of 32"],
        ),
        Case::generate("seed -1", &["--seed=-1"], &["--seed", "'-1'"]),
        Case::generate(
            "seed 2^64",
            &["--seed", "18446744073709551616"],
            &["--seed", "18446744073709551616"],
        ),
        Case::generate("device unknown", &["--device", "tpu"], &["--device `tpu`"]),
        Case::generate(
            "device cuda:7",
            &["--device", "cuda:7"],
            &["--device cuda:7"],
        ),
        Case::generate("dtype unknown", &["--dtype", "fp8"], &["--dtype `fp8`"]),
        Case::generate(
            "cpu with bf16",
            &["--device", "cpu", "--dtype", "bf16"],
            &["--device cpu", "--dtype bf16"],
        ),
        Case::generate(
            "sampler unknown",
            &["--sampler", "ddim"],
            &["--sampler `ddim`"],
        ),
        Case::new(
            "bench steps 2^64",
            &[
                "bench",
                "--variant",
                "tiny",
                "--steps",
                "18446744073709551616",
            ],
            &["--steps", "1..=1000"],
        ),
        Case::new(
            "bench batch 0",
            &["bench", "--variant", "tiny", "--batch", "1,0"],
            &["--batch", "'0'"],
        ),
        Case::new(
            "bench size 2^62",
            &[
                "bench",
                "--variant",
                "tiny",
                "--size",
                "4611686018427387904",
            ],
            &["--size", "32..=8192"],
        ),
        Case::new(
            "bench iters 0",
            &["bench", "--variant", "tiny", "--iters", "0"],
            &["--iters", "'0'"],
        ),
    ]);
}

/// A prompt over the length limit that still fits one command-line argument (128 KiB on Linux).
fn long_text() -> &'static str {
    static S: OnceLock<String> = OnceLock::new();
    S.get_or_init(|| "x".repeat(70_000))
}

fn two_prompts(dir: &Path) {
    std::fs::write(dir.join("p.txt"), "a cat\na dog\n").unwrap();
}

/// A finished image at the name the default case would write, made by an earlier run.
fn finished_image(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .args([
            "generate",
            "--prompt",
            "a red bicycle",
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
        ])
        .arg(dir.join("out"))
        .env("OPENUNI_CACHE", base_cache())
        .env("HF_HUB_CACHE", dir.join("no-hub"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_prompts_and_sizes_are_refused() {
    run_table(vec![
        Case::generate(
            "empty prompts file",
            &["--prompts", "{dir}/p.txt"],
            &["p.txt", "no prompts"],
        )
        .setup(|d| std::fs::write(d.join("p.txt"), "").unwrap()),
        Case::generate(
            "comment-only prompts file",
            &["--prompts", "{dir}/p.txt"],
            &["p.txt", "no prompts"],
        )
        .setup(|d| std::fs::write(d.join("p.txt"), "# one\n\n   \n# two\n").unwrap()),
        Case::generate(
            "missing prompts file",
            &["--prompts", "{dir}/none.txt"],
            &["none.txt", "cannot read"],
        ),
        Case::generate(
            "32 MB prompt line",
            &["--prompts", "{dir}/p.txt"],
            &["p.txt:1", "33554432 bytes", "limit of 65536 bytes"],
        )
        .setup(|d| std::fs::write(d.join("p.txt"), "a".repeat(32 << 20)).unwrap()),
        Case::generate(
            "32 MB JSON prompt line",
            &["--prompts", "{dir}/p.txt"],
            &["p.txt:1", "limit of 65536 bytes"],
        )
        .setup(|d| {
            std::fs::write(
                d.join("p.txt"),
                format!("{{\"prompt\": \"{}\"}}\n", "a ".repeat(16 << 20)),
            )
            .unwrap()
        }),
        Case::generate(
            "70 KB prompt",
            &["--prompt", long_text()],
            &["the prompt is 70000 bytes", "limit of 65536 bytes"],
        ),
        Case::generate(
            "70 KB negative prompt",
            &["--negative-prompt", long_text()],
            &["the negative prompt is 70000 bytes", "limit of 65536 bytes"],
        ),
        Case::generate(
            "seed 2^64-1 with two images",
            &["--prompts", "{dir}/p.txt", "--seed", "18446744073709551615"],
            &["p.txt:2", "--seed 18446744073709551615 + 1", "not wrapped"],
        )
        .setup(two_prompts),
        Case::generate(
            "two 8192x8192 images at once",
            &[
                "--prompts",
                "{dir}/p.txt",
                "--batch",
                "2",
                "--height",
                "8192",
                "--width",
                "8192",
            ],
            &["--batch 2 of 8192x8192 images needs about", "host memory"],
        )
        .setup(two_prompts),
        Case::generate(
            "bad device with every image done",
            &["--device", "cuda:7"],
            &["--device cuda:7"],
        )
        .setup(finished_image),
        Case::generate(
            "bf16 on the cpu with every image done",
            &["--dtype", "bf16"],
            &["--dtype bf16"],
        )
        .setup(finished_image),
    ]);
}

/// Poisons tensor(s) of the case's own copy of the tiny model.
macro_rules! poisoned {
    ($file:expr, [$($part:expr),*], $f:expr) => {
        |d: &Path| {
            let file = own_model(d).join($file);
            let name = tensor_named(&file, &[$($part),*]);
            poison(&file, &name, $f);
        }
    };
}

fn nan_all(v: &mut [f32]) {
    v.fill(f32::NAN);
}

fn one_inf(v: &mut [f32]) {
    v[v.len() / 2] = f32::INFINITY;
}

fn one_nan(v: &mut [f32]) {
    v[0] = f32::NAN;
}

fn poison_cases(device: &[&'static str]) -> Vec<Case> {
    let g = |name, want: &[&'static str]| Case::generate(name, device, want);
    vec![
        g(
            "Inf in transformer proj_out.weight",
            &[
                "non-finite",
                "denoise step 1 of 1",
                "the transformer output",
                "no image was written",
                "--diff-nodes",
            ],
        )
        .setup(poisoned!(
            "transformer/diffusion_pytorch_model.safetensors",
            ["proj_out.weight"],
            one_inf
        )),
        g(
            "NaN transformer block weight",
            &["non-finite", "denoise step 1 of 1"],
        )
        .setup(poisoned!(
            "transformer/diffusion_pytorch_model.safetensors",
            ["transformer_blocks.0", "ff", "weight"],
            nan_all
        )),
        g(
            "NaN caption projection",
            &["non-finite", "denoise step 1 of 1"],
        )
        .setup(poisoned!(
            "transformer/diffusion_pytorch_model.safetensors",
            ["caption_projection", "weight"],
            one_nan
        )),
        g("NaN VAE weight", &["non-finite", "decode: the VAE output"]).setup(poisoned!(
            "vae/diffusion_pytorch_model.safetensors",
            ["decoder.conv_out.weight"],
            one_nan
        )),
        g("NaN LLM weight", &["non-finite", "conditioning"]).setup(poisoned!(
            "llm/model.safetensors",
            ["layers.0", "mlp", "weight"],
            nan_all
        )),
        g("NaN meta_queries", &["non-finite", "conditioning"]).setup(poisoned!(
            "openuni.safetensors",
            ["meta_queries"],
            one_nan
        )),
        g(
            "NaN checkpoint connector",
            &["non-finite", "conditioning: the connector output"],
        )
        .setup(poisoned!(
            "openuni.safetensors",
            ["connector.", "weight"],
            nan_all
        )),
        g(
            "Inf checkpoint projector",
            &["non-finite", "conditioning: the projector output"],
        )
        .setup(poisoned!(
            "openuni.safetensors",
            ["projector.weight"],
            one_inf
        )),
        g("VAE scaling_factor 0", &["scaling_factor"]).setup(|d| {
            edit_json(
                &own_model(d).join("vae/config.json"),
                "scaling_factor",
                0.0.into(),
            )
        }),
        g("LLM rms_norm_eps -1", &[])
            .any(&["rms_norm_eps", "non-finite"])
            .setup(|d| {
                edit_json(
                    &own_model(d).join("llm/config.json"),
                    "rms_norm_eps",
                    (-1.0).into(),
                )
            }),
    ]
}

#[test]
fn non_finite_weights_never_make_an_image_on_the_cpu() {
    run_table(poison_cases(&[]));
}

#[test]
fn non_finite_weights_never_make_an_image_on_the_emulated_gpu() {
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    let emu = |c: Case| c.env("OPENUNI_EMU_MEMORY", "512MiB");
    run_table(
        poison_cases(&["--device", "emu", "--dtype", "bf16"])
            .into_iter()
            .map(emu)
            .collect(),
    );
}

#[test]
fn failed_writes_leave_no_partial_file() {
    let fixture = |name: &str| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/pth")
            .join(name)
            .display()
            .to_string()
    };
    let (good, hostile) = (fixture("openuni_flat_f32.pth"), fixture("hostile.pth"));
    run_table(vec![
        Case::new(
            "convert a hostile pickle",
            &["convert", &hostile, "{out}/x.safetensors"],
            &["hostile.pth", "os.system"],
        )
        .setup(|d| std::fs::create_dir(d.join("out")).unwrap()),
        // The finished file cannot be moved onto a folder: the temporary file must go too.
        Case::new(
            "convert onto a folder",
            &["convert", &good, "{out}/x.safetensors"],
            &["x.safetensors"],
        )
        .setup(|d| std::fs::create_dir_all(d.join("out/x.safetensors")).unwrap()),
        Case::new(
            "convert into a missing folder",
            &["convert", &good, "{out}/none/x.safetensors"],
            &["none"],
        )
        .setup(|d| std::fs::create_dir(d.join("out")).unwrap()),
        Case::new(
            "bench --write-configs onto a file",
            &["bench", "--variant", "tiny", "--write-configs", "{out}/f"],
            &["out/f"],
        )
        .setup(|d| {
            std::fs::create_dir(d.join("out")).unwrap();
            std::fs::write(d.join("out/f"), "").unwrap();
        }),
    ]);
}

/// Ctrl-C while `convert` writes its output: the signal is deferred until the write has stopped
/// and the temporary files are removed, so nothing is left, neither at the target name nor hidden
/// beside it (safetensors' own `.tmpXXXXXX` included), and the process still ends by SIGINT.
#[test]
fn interrupted_convert_leaves_no_partial_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("big.safetensors"), tmp.path().join("out"));
    std::fs::create_dir(&out).unwrap();
    // 256 MiB of zeros: long enough to write that the temporary file is seen before it is renamed.
    let t = HostTensor::from_f32([64, 1 << 20], vec![0.0; 64 << 20]).unwrap();
    write_safetensors(&input, [("w", &t)], None).unwrap();
    drop(t);
    let mut child = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("convert")
        .arg(&input)
        .arg(out.join("big.safetensors"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let seen = loop {
        let partial = std::fs::read_dir(&out).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".partial")
        });
        if partial
            || start.elapsed() > Duration::from_secs(60)
            || child.try_wait().unwrap().is_some()
        {
            break partial;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    assert!(
        seen,
        "the temporary file was never seen while convert ran: the test cannot tell anything"
    );
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    eprintln!("convert after SIGINT: {status:?}, left {left:?}");
    if status.success() {
        // The write finished before the signal came: a complete file is fine.
        assert_eq!(left.len(), 1, "{left:?}");
    } else {
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGINT),
            "{status:?}"
        );
        assert!(left.is_empty(), "interrupted convert left {left:?}");
    }
}
