//! Which sgemm the CPU backend should use: matrixmultiply (threaded), the `gemm` crate (rayon),
//! `openuni_cpu::sgemm` (what the fast ops run: single-threaded calls of the `gemm` crate or of the
//! system OpenBLAS, loaded at run time when `libopenblas.so.0` is installed, on column blocks split
//! across rayon's pool), and PyTorch's own sgemm (`torch.nn.functional.linear`, MKL in the x86 wheels) through a helper
//! process (`tools/bench_torch.py --sgemm-server`, started when `OPENUNI_BENCH_PYTHON` names a
//! Python with torch), all at the same thread count, on the GEMM shapes of the models.
//!
//! Every call has the CPU backend's layout: `out[M, N] = x[M, K] · w[N, K]ᵀ`. The candidates take
//! turns call by call (warm-up, then `OPENUNI_BENCH_REPS` rounds, default 7), so a load that comes
//! and goes on a shared machine hits them alike; the table gives the median ms, GFLOP/s (2·MNK)
//! and each time relative to matrixmultiply's and to PyTorch's in the same run.
//!
//!     OPENUNI_BENCH_PYTHON=/path/to/python cargo bench --bench gemm
//!
//! Threads: `OPENUNI_BENCH_THREADS` (default: all cores) for every candidate (rayon's global pool,
//! matrixmultiply's `MATMUL_NUM_THREADS`, `torch.set_num_threads`).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use openuni_cpu::sgemm::{self, Backend, Threads, View};

/// (where the shape comes from, M, K, N).
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("DiT linear, 4096 rows (brief)", 4096, 1152, 1152),
    ("DiT b-512 CFG qkv (512 rows)", 512, 1152, 3456),
    ("DiT b-512 CFG FFN in", 512, 1152, 5760),
    ("DiT b-512 CFG FFN out", 512, 2880, 1152),
    ("LLM 1B MLP up (brief)", 256, 896, 4864),
    ("LLM 1B MLP down", 256, 4864, 896),
    ("DC-AE conv 3x3 256ch im2col block", 1024, 2304, 256),
    ("DC-AE conv 3x3 128ch im2col block", 1024, 1152, 128),
    ("DC-AE up_blocks.4 conv 1024ch @512", 256, 9216, 1024),
    ("DC-AE conv_out im2col block", 1024, 1152, 3),
];

type Sgemm = fn(&[f32], &[f32], usize, usize, usize, &mut [f32], usize);

fn mm_matrixmultiply(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    _threads: usize,
) {
    // SAFETY: x is m·k, w is n·k, out is m·n (checked by the caller), strides match.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

fn mm_gemm(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32], threads: usize) {
    // SAFETY: as above; gemm's dst = alpha·dst + beta·lhs·rhs with read_dst false.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        );
    }
}

/// `openuni_cpu::sgemm` (what the fast CPU ops run) on one backend: single-threaded calls on
/// column blocks across rayon's pool.
fn mm_ours(be: Backend, x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    sgemm::gemm_with(
        be,
        m,
        n,
        k,
        out,
        0,
        n,
        false,
        View::new(x, 0, k, 1),
        View::new(w, 0, 1, k),
        Threads::All,
    );
}

fn mm_ours_openblas(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    _threads: usize,
) {
    mm_ours(Backend::OpenBlas, x, w, m, k, n, out)
}

fn mm_ours_gemm(
    x: &[f32],
    w: &[f32],
    m: usize,
    k: usize,
    n: usize,
    out: &mut [f32],
    _threads: usize,
) {
    mm_ours(Backend::GemmCrate, x, w, m, k, n, out)
}

/// The PyTorch helper process: one line "M K N" in, one line "ms" out (one timed call each).
struct Torch {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Torch {
    fn start(threads: usize) -> Option<Torch> {
        let python = std::env::var("OPENUNI_BENCH_PYTHON").ok()?;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench_torch.py");
        let mut child = Command::new(&python)
            .args([script, "--sgemm-server", "--threads", &threads.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| eprintln!("OPENUNI_BENCH_PYTHON={python}: {e}; PyTorch not measured"))
            .ok()?;
        let stdin = child.stdin.take()?;
        let stdout = BufReader::new(child.stdout.take()?);
        let mut t = Torch {
            child,
            stdin,
            stdout,
        };
        let ready = t.line();
        if ready.as_deref() != Some("ready") {
            eprintln!("the PyTorch helper did not start ({ready:?}); PyTorch not measured");
            return None;
        }
        Some(t)
    }

    fn line(&mut self) -> Option<String> {
        let mut s = String::new();
        self.stdout.read_line(&mut s).ok()?;
        Some(s.trim().to_string())
    }

    fn time_ms(&mut self, m: usize, k: usize, n: usize) -> f64 {
        writeln!(self.stdin, "{m} {k} {n}").expect("PyTorch helper stdin");
        self.stdin.flush().expect("PyTorch helper stdin");
        self.line()
            .and_then(|l| l.parse().ok())
            .expect("PyTorch helper answer")
    }
}

impl Drop for Torch {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let threads: usize = std::env::var("OPENUNI_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let reps: usize = std::env::var("OPENUNI_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    // matrixmultiply reads its thread count from the environment on first use.
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("rayon pool");
    let mut cands: Vec<(&str, Sgemm)> = vec![
        ("matrixmultiply", mm_matrixmultiply),
        ("gemm crate", mm_gemm),
        ("ours: gemm crate", mm_ours_gemm),
    ];
    if sgemm::backend() == Backend::OpenBlas {
        cands.push(("ours: OpenBLAS", mm_ours_openblas));
    } else {
        println!("(OpenBLAS not measured: libopenblas.so.0 did not load)");
    }
    let mut torch = Torch::start(threads);
    let commit = option_env!("OPENUNI_GIT_COMMIT").unwrap_or("unknown");
    println!("sgemm, out[M,N] = x[M,K]·w[N,K]ᵀ, {threads} threads, median of {reps} interleaved rounds, commit {commit}");
    if torch.is_none() {
        println!("(PyTorch not measured: set OPENUNI_BENCH_PYTHON to a Python with torch)");
    }
    let mut names: Vec<&str> = cands.iter().map(|c| c.0).collect();
    if torch.is_some() {
        names.push("PyTorch");
    }
    println!(
        "{:<38} {:>16} | {}",
        "shape",
        "M x K x N",
        names
            .iter()
            .map(|n| format!("{n:>24}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut seed = 1u32;
    let mut rnd = move || {
        seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
        (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    for &(label, m, k, n) in SHAPES {
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let mut out = vec![0f32; m * n];
        let mut reference = vec![0f32; m * n];
        mm_matrixmultiply(&x, &w, m, k, n, &mut reference, threads);
        let mut times = vec![vec![]; names.len()];
        for round in 0..=reps {
            for (i, (name, f)) in cands.iter().enumerate() {
                let t = Instant::now();
                f(&x, &w, m, k, n, &mut out, threads);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if round == 0 {
                    let err = out
                        .iter()
                        .zip(&reference)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err < 1e-3,
                        "{name} disagrees with matrixmultiply by {err} on {label}"
                    );
                } else {
                    times[i].push(ms);
                }
            }
            if let Some(t) = torch.as_mut() {
                let ms = t.time_ms(m, k, n);
                if round > 0 {
                    times[cands.len()].push(ms);
                }
            }
        }
        let med: Vec<f64> = times.into_iter().map(median).collect();
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        let torch_ms = torch.as_ref().map(|_| med[med.len() - 1]);
        let cells: Vec<String> = med
            .iter()
            .map(|&ms| {
                let vs = torch_ms.map_or(String::new(), |t| format!(" {:.2}x", t / ms));
                format!("{ms:>8.2}ms {:>5.0}GF/s{vs}", gflop / ms * 1e3)
            })
            .collect();
        println!(
            "{label:<38} {:>16} | {}",
            format!("{m}x{k}x{n}"),
            cells
                .iter()
                .map(|c| format!("{c:>24}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    println!("(x = PyTorch's time / this time in the same round: > 1 is faster than PyTorch)");
}
