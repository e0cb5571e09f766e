//! Helpers shared by the GPU tests and benchmarks (tests/cuda_*.rs, benches/*.rs,
//! crates/cuda/tests): device-or-skip, a small deterministic RNG, error measures and bf16 rounding.
//! Dependency-free on purpose, so that nothing here changes what the library links.

use std::sync::Arc;

use half::bf16;
use openuni_tensor::DType;

use crate::device::{device_available, CudaDevice};

/// The line every GPU test prints, to stdout, when it cannot run.
pub const SKIP_LINE: &str = "skipped: no CUDA device";

/// Device 0, or `None` after printing [`SKIP_LINE`] when there is no CUDA device (real or
/// emulated). A device that is present but cannot be opened fails the test.
pub fn device_or_skip() -> Option<Arc<CudaDevice>> {
    if !device_available() {
        println!("{SKIP_LINE}");
        return None;
    }
    match CudaDevice::open(0) {
        Ok(d) => {
            println!(
                "device: {} (sm_{}{}), kernels: {}",
                d.name(),
                d.compute_capability().0,
                d.compute_capability().1,
                d.kernels().target().image_name()
            );
            Some(d)
        }
        Err(e) => panic!("a CUDA device is present but cannot be opened: {e}"),
    }
}

/// xorshift64* with Box-Muller normals: deterministic across platforms and runs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    /// `n` normals with standard deviation `std` around `mean`.
    pub fn normals(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        (0..n).map(|_| mean + std * self.normal()).collect()
    }
}

/// Relative L2 error ‖got − want‖ / ‖want‖ (NaN when `got` has a non-finite value).
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::NAN;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .fold(0.0, f64::max)
}

/// Values rounded to bf16 (nearest even) and back.
pub fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// Rounds to the storage dtype (identity for f32).
pub fn round_to(dtype: DType, v: &[f32]) -> Vec<f32> {
    match dtype {
        DType::BF16 => round_bf16(v),
        _ => v.to_vec(),
    }
}

/// The tolerance rule of the GPU tests. `want` is the CPU twin on the f32 inputs; `baseline` is
/// the CPU twin on the inputs rounded to the storage dtype, and is rounded here to the storage
/// dtype too: a plain bf16 run of the same computation (bf16 in, f32 math, bf16 out), whose
/// error a bf16 kernel cannot avoid.
/// f32 storage: relative L2 <= 1e-5. bf16 storage: relative L2 <= 2x the baseline's (the
/// flash-attention rule, docs/architecture.md "Numerics and toolchain"), plus 1e-7 for exactly representable cases.
/// Returns (error, tolerance); prints one line.
pub fn check(what: &str, dtype: DType, got: &[f32], want: &[f32], baseline: &[f32]) -> (f64, f64) {
    let e = rel_l2(got, want);
    let tol = match dtype {
        DType::F32 => 1e-5,
        _ => 2.0 * rel_l2(&round_to(dtype, baseline), want) + 1e-7,
    };
    let bad = got.iter().filter(|v| !v.is_finite()).count();
    println!(
        "{what}: rel L2 {e:.3e} (tolerance {tol:.3e}), max abs {:.3e}",
        max_abs_diff(got, want)
    );
    assert!(
        bad == 0,
        "{what}: {bad} non-finite outputs (unwritten or overflowing elements)"
    );
    assert!(
        e <= tol,
        "{what}: relative L2 error {e:.3e} above {tol:.3e}"
    );
    (e, tol)
}

// ---- benchmarks ----

/// Median of a list (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times `f`: `warmup` calls, then `runs` samples of `batch` consecutive calls between two CUDA
/// events; `f` gets the call index (to rotate through input sets bigger than L2). Returns the
/// median milliseconds per call.
pub fn time_ms(
    dev: &CudaDevice,
    warmup: usize,
    runs: usize,
    batch: usize,
    mut f: impl FnMut(usize) -> crate::Result<()>,
) -> crate::Result<f64> {
    let batch = batch.max(1);
    for i in 0..warmup {
        f(i)?;
    }
    dev.synchronize()?;
    let (start, end) = (dev.timing_event()?, dev.timing_event()?);
    let mut samples = Vec::with_capacity(runs);
    let mut call = 0;
    for _ in 0..runs.max(1) {
        dev.record(&start)?;
        for _ in 0..batch {
            f(call)?;
            call += 1;
        }
        dev.record(&end)?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|err| crate::CudaError::Driver {
                what: "reading event times".into(),
                err,
            })?;
        samples.push(ms as f64 / batch as f64);
    }
    Ok(median(&mut samples))
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written, 1 GB = 1e9 bytes) for a
/// copy of `bytes`, median of `runs`.
pub fn copy_bandwidth_gbs(dev: &CudaDevice, bytes: usize, runs: usize) -> crate::Result<f64> {
    let a = dev.alloc(bytes)?;
    let b = dev.alloc(bytes)?;
    dev.fill_bytes(a.ptr(), 0x3C, bytes)?;
    let ms = time_ms(dev, 3, runs, 4, |i| {
        if i % 2 == 0 {
            dev.copy_on_device(a.ptr(), b.ptr(), bytes)
        } else {
            dev.copy_on_device(b.ptr(), a.ptr(), bytes)
        }
    })?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

/// The device's L2 size in bytes (50 MiB assumed when the attribute cannot be read).
pub fn l2_bytes(dev: &CudaDevice) -> usize {
    dev.context()
        .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
        .map(|v| v.max(1) as usize)
        .unwrap_or(50 << 20)
}

/// How many input sets of `bytes_per_set` to rotate through so the working set is at least 3x
/// the L2 (each call then reads from DRAM), at most 64.
pub fn rotation(dev: &CudaDevice, bytes_per_set: usize) -> usize {
    (3 * l2_bytes(dev))
        .div_ceil(bytes_per_set.max(1))
        .clamp(1, 64)
}

/// UTC time now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// One benchmark binary's run: the device, the measured copy-bandwidth ceiling, one line per
/// kernel (GB/s and fraction of the copy bandwidth), and a JSON record at the end (printed, and
/// appended to `$OPENUNI_BENCH_JSON` when set).
pub struct BenchReport {
    pub dev: Arc<CudaDevice>,
    bench: String,
    commit: String,
    pub copy_gbs: f64,
    results: Vec<String>,
}

impl BenchReport {
    /// Opens the device (or prints [`SKIP_LINE`] and returns `None`) and measures the
    /// device-to-device copy bandwidth on 1 GiB (16 MiB on the emulated GPU). `commit` is the
    /// build's git commit (`$OPENUNI_GIT_COMMIT` at run time overrides it).
    pub fn start(bench: &str, commit: &str) -> Option<BenchReport> {
        let dev = device_or_skip()?;
        let bytes = if dev.is_emulated() { 16 << 20 } else { 1 << 30 };
        let copy_gbs = copy_bandwidth_gbs(&dev, bytes, if dev.is_emulated() { 3 } else { 50 })
            .expect("copy bandwidth");
        if dev.is_emulated() {
            println!(
                "emulated GPU: small shapes, and the times are CPU times (a smoke run of the benchmark code only)"
            );
        }
        println!(
            "device-to-device copy: {copy_gbs:.1} GB/s (read + write, {} MiB)",
            bytes >> 20
        );
        let commit = std::env::var("OPENUNI_GIT_COMMIT")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| commit.to_string());
        Some(BenchReport {
            dev,
            bench: bench.into(),
            commit,
            copy_gbs,
            results: vec![],
        })
    }

    /// Rows to use for a realistic row count (cut to at most 8 on the emulated GPU).
    pub fn rows(&self, rows: usize) -> usize {
        if self.dev.is_emulated() {
            rows.min(8)
        } else {
            rows
        }
    }

    /// (warm-up calls, timed samples): (5, 50) on a GPU, (1, 3) on the emulated GPU.
    pub fn runs(&self) -> (usize, usize) {
        if self.dev.is_emulated() {
            (1, 3)
        } else {
            (5, 50)
        }
    }

    /// Records one kernel call: `label` says where the shape comes from, `bytes` is what one
    /// call reads plus writes, `ms` the time per call.
    pub fn add(&mut self, kernel: &str, label: &str, shape: &[usize], bytes: usize, ms: f64) {
        let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
        let frac = gbs / self.copy_gbs;
        println!(
            "{kernel:<22} {:<16} {:>9.4} ms {:>8.1} GB/s {:>6.1}% of copy  {label}",
            format!("{shape:?}"),
            ms,
            gbs,
            100.0 * frac
        );
        self.results.push(format!(
            "{{\"kernel\":{},\"label\":{},\"shape\":{shape:?},\"bytes\":{bytes},\"ms\":{ms:.6},\"gbs\":{gbs:.2},\"frac_copy\":{frac:.4}}}",
            json_str(kernel),
            json_str(label)
        ));
    }

    /// Records one call of a compute-bound kernel: `flops` per call (counted as 2 per
    /// multiply-add), `bytes` read plus written, `ms` per call. Prints TFLOP/s and GB/s.
    pub fn add_flops(
        &mut self,
        kernel: &str,
        label: &str,
        shape: &[usize],
        flops: f64,
        bytes: usize,
        ms: f64,
    ) {
        let tflops = flops / (ms * 1e-3) / 1e12;
        let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
        println!(
            "{kernel:<22} {:<24} {:>9.4} ms {:>8.2} TFLOP/s {:>8.1} GB/s  {label}",
            format!("{shape:?}"),
            ms,
            tflops,
            gbs
        );
        self.results.push(format!(
            "{{\"kernel\":{},\"label\":{},\"shape\":{shape:?},\"flops\":{flops:.0},\"bytes\":{bytes},\"ms\":{ms:.6},\"tflops\":{tflops:.3},\"gbs\":{gbs:.2}}}",
            json_str(kernel),
            json_str(label)
        ));
    }

    /// Prints the JSON record (device, date, commit, copy bandwidth, results) and appends it to
    /// `$OPENUNI_BENCH_JSON` when set.
    pub fn finish(self) {
        let (major, minor) = self.dev.compute_capability();
        let line = format!(
            "{{\"bench\":{},\"device\":{},\"sm\":\"{major}.{minor}\",\"emulated\":{},\"date\":{},\"commit\":{},\"copy_gbs\":{:.2},\"results\":[{}]}}",
            json_str(&self.bench),
            json_str(self.dev.name()),
            self.dev.is_emulated(),
            json_str(&utc_now()),
            json_str(&self.commit),
            self.copy_gbs,
            self.results.join(",")
        );
        println!("json: {line}");
        if let Some(p) = std::env::var_os("OPENUNI_BENCH_JSON").filter(|p| !p.is_empty()) {
            use std::io::Write;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p);
            match f.and_then(|mut f| writeln!(f, "{line}")) {
                Ok(()) => println!("appended to {}", std::path::Path::new(&p).display()),
                Err(e) => eprintln!(
                    "cannot append to {}: {e}",
                    std::path::Path::new(&p).display()
                ),
            }
        }
    }
}

/// Host data of `n` normal values in the storage dtype, as bytes (for uploads).
pub fn random_bytes(rng: &mut Rng, dtype: DType, n: usize, mean: f32, std: f32) -> Vec<u8> {
    let v = rng.normals(n, mean, std);
    match dtype {
        DType::BF16 => v
            .iter()
            .flat_map(|&f| bf16::from_f32(f).to_bits().to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|f| f.to_le_bytes()).collect(),
    }
}
