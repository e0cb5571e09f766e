//! The emulator's speed: 64 blocks x 256 threads, 8 barriers and 5 shuffle rounds per thread, on one
//! worker (target: <= 10 ms per launch in a release build). `cargo bench -p openuni-emu` runs the same in
//! release (benches/fibers.rs); this test prints the number of the current profile and checks the result.
mod common;
use common::*;
use openuni_emu::{LaunchConfig, LaunchOptions, Order};

pub fn bench_once(order: Order, threads: usize) -> (std::time::Duration, Vec<f32>) {
    let k = openuni_emu::find("emu_test_bench").unwrap();
    let mut out = vec![0f32; 64 * 256];
    let mut p = out.as_mut_ptr();
    let mut args = [arg(&mut p)];
    let cfg = LaunchConfig {
        grid: [64, 1, 1],
        block: [256, 1, 1],
        dyn_smem: 0,
    };
    let opts = LaunchOptions {
        order: Some(order),
        threads: Some(threads),
    };
    let t = std::time::Instant::now();
    unsafe { openuni_emu::launch(k, &cfg, args.as_mut_ptr(), &opts) }.unwrap();
    (t.elapsed(), out)
}

fn reference() -> Vec<f32> {
    let mut out = vec![0f32; 64 * 256];
    for b in 0..64 {
        let mut v: Vec<f32> = (0..256).map(|t| (b * 256 + t) as f32).collect();
        for r in 0..8 {
            let sm = v.clone();
            for t in 0..256 {
                v[t] += sm[(t + 1) % 256];
            }
            if r < 5 {
                let w = v.clone();
                for t in 0..256 {
                    v[t] += w[t ^ (1 << r)];
                }
            }
        }
        out[b * 256..b * 256 + 256].copy_from_slice(&v);
    }
    out
}

#[test]
fn fiber_benchmark() {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return;
    }
    let want = reference();
    for order in ORDERS {
        let (_, out) = bench_once(order, 1);
        let wrong = out.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(wrong, 0, "{order:?}: {wrong} wrong results");
    }
    let mut best = std::time::Duration::MAX;
    for _ in 0..10 {
        best = best.min(bench_once(Order::Forward, 1).0);
    }
    let mut best2 = std::time::Duration::MAX;
    for _ in 0..10 {
        best2 = best2.min(bench_once(Order::Forward, 2).0);
    }
    println!(
        "emulator benchmark (64 blocks x 256 threads, 8 barriers + 5 shuffles): {:.2} ms/launch on 1 worker, {:.2} ms on 2 ({})",
        best.as_secs_f64() * 1e3,
        best2.as_secs_f64() * 1e3,
        if cfg!(debug_assertions) { "debug build" } else { "release build" }
    );
}
