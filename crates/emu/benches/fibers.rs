//! `cargo bench -p openuni-emu`: the emulator's launch speed, 64 blocks x 256 threads with 8 barriers and
//! 5 shuffle rounds per thread (tests/kernels/bench.cu). Target: <= 10 ms per launch on one worker.
use openuni_emu::{LaunchConfig, LaunchOptions, Order};
use std::ffi::c_void;

fn main() {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return;
    }
    let k = openuni_emu::find("emu_test_bench").expect("emu_test_bench");
    let mut out = vec![0f32; 64 * 256];
    let mut p = out.as_mut_ptr();
    let mut args = [&mut p as *mut *mut f32 as *mut c_void];
    let cfg = LaunchConfig {
        grid: [64, 1, 1],
        block: [256, 1, 1],
        dyn_smem: 0,
    };
    for threads in [1usize, 2] {
        for order in [Order::Forward, Order::Reverse] {
            let opts = LaunchOptions {
                order: Some(order),
                threads: Some(threads),
            };
            let mut times = Vec::new();
            for _ in 0..30 {
                let t = std::time::Instant::now();
                unsafe { openuni_emu::launch(k, &cfg, args.as_mut_ptr(), &opts) }.unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "64 blocks x 256 threads, 8 barriers + 5 shuffles: {:.2} ms median, {:.2} ms best ({threads} worker(s), {order:?} order)",
                times[times.len() / 2],
                times[0]
            );
        }
    }
}
