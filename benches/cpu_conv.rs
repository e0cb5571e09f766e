//! The CPU backend's 3×3 convolutions on the DC-AE f32c32 decoder's shapes at a 512×512 output
//! (b-512's `decoder_block_out_channels` [128, 256, 512, 512, 1024, 1024], a 16×16 latent): the
//! ResBlock convs (`fast::conv2d`) and the up-blocks' upsampling convs (`fast::upsample_conv2d`),
//! each on the GEMM path and as Winograd F(2×2, 3×3) (`fast::ConvPath`). Batch 1, single
//! process, the median of `OPENUNI_BENCH_ITERS` (default 5) runs after one warm-up. GFLOP/s
//! counts direct convolution's 2·P·9·Cin·Cout for both paths, so the rates compare.
//! Run: `cargo bench --bench cpu_conv` (prints the load average: the machine is often shared);
//! `OPENUNI_CONV_CASE='128->128'` runs only the cases whose cin->cout contains it, and
//! `OPENUNI_CONV_PATH=winograd` (or `gemm`) only that path (for a profiler).

use std::time::Instant;

use openuni_cpu::fast::{self, ConvPath};
use rand::{Rng, SeedableRng};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() {
    let iters: usize = std::env::var("OPENUNI_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut r = rand::rngs::StdRng::seed_from_u64(1);
    // (name, upsampling, input side, cin, cout): the output side is 2x the input's when upsampling.
    let cases = [
        ("conv2d", false, 512, 128, 128),
        ("conv2d", false, 256, 256, 256),
        ("conv2d", false, 128, 512, 512),
        ("upsample_conv2d", true, 256, 256, 128),
        ("upsample_conv2d", true, 128, 512, 256),
        ("upsample_conv2d", true, 64, 512, 512),
        ("upsample_conv2d", true, 32, 1024, 512),
        ("upsample_conv2d", true, 16, 1024, 1024),
    ];
    println!(
        "cpu_conv: median of {iters} after a warm-up, batch 1, f32, {} threads (load average {})",
        rayon::current_num_threads(),
        loadavg()
    );
    println!(
        "{:<16} {:>9} {:>11} {:>10} {:>10} {:>9} {:>9} {:>8}",
        "op", "output", "cin->cout", "gemm ms", "wino ms", "gemm GF/s", "wino GF/s", "speedup"
    );
    let only_case = std::env::var("OPENUNI_CONV_CASE").ok();
    let only_path = std::env::var("OPENUNI_CONV_PATH").ok();
    for (name, up, side, cin, cout) in cases {
        if only_case
            .as_ref()
            .is_some_and(|c| !format!("{cin}->{cout}").contains(c.as_str()))
        {
            continue;
        }
        let out_side = if up { 2 * side } else { side };
        let x: Vec<f32> = (0..side * side * cin)
            .map(|_| r.random_range(-1.0..1.0))
            .collect();
        let s = (1.0 / (9.0 * cin as f32)).sqrt();
        let w: Vec<f32> = (0..cout * cin * 9).map(|_| r.random_range(-s..s)).collect();
        let bias = vec![0.1f32; cout];
        let mut out = vec![0f32; out_side * out_side * cout];
        let mut time = |path: ConvPath, label: &str| {
            if only_path.as_ref().is_some_and(|p| p != label) {
                return f64::NAN;
            }
            let mut run = || {
                let t = Instant::now();
                if up {
                    fast::upsample_conv2d_on(
                        path,
                        &x,
                        &w,
                        Some(&bias),
                        1,
                        side,
                        side,
                        cin,
                        cout,
                        true,
                        &mut out,
                    );
                } else {
                    fast::conv2d_on(
                        path,
                        &x,
                        &w,
                        Some(&bias),
                        1,
                        side,
                        side,
                        cin,
                        cout,
                        3,
                        true,
                        &mut out,
                    );
                }
                t.elapsed().as_secs_f64() * 1e3
            };
            run();
            median((0..iters).map(|_| run()).collect())
        };
        let (g, wi) = (
            time(ConvPath::Gemm, "gemm"),
            time(ConvPath::Winograd, "winograd"),
        );
        let gflop = 2.0 * (out_side * out_side * 9 * cin * cout) as f64 / 1e9;
        println!(
            "{name:<16} {:>9} {:>11} {g:>10.1} {wi:>10.1} {:>9.1} {:>9.1} {:>7.2}x",
            format!("{out_side}x{out_side}"),
            format!("{cin}->{cout}"),
            gflop / g * 1e3,
            gflop / wi * 1e3,
            g / wi
        );
    }
    println!("load average after: {}", loadavg());
}
