//! Where the CPU conditioning's wall time goes: `openuni bench --device cpu` times
//! `condition_batch` as a whole; this splits it into building the per-call executor (graph,
//! plan, arena, weight look-ups), running its nodes, and the rest (reading the outputs back).
//! b-512 with random weights of the real size, batch 1, the bench's prompt lengths, f32.
//! Run: `cargo bench --bench cpu_conditioning` (`OPENUNI_BENCH_ITERS`, default 5; prints the
//! load average next to the times, the machine is often shared).

use std::time::Instant;

use openuni::bench::random_model;
use openuni::exec::Device;
use openuni::pipeline::RunOptions;
use openuni_tensor::DType;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::var("OPENUNI_BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (model, _) = random_model("b-512")?;
    let run = RunOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    // `openuni bench`'s prompt lengths: a 30-token prompt and a 16-token unconditional one.
    let cond: Vec<u32> = (0..30).map(|j| (j * 7 + 11) as u32).collect();
    let uncond: Vec<u32> = (0..16).map(|j| (j * 13 + 5) as u32).collect();
    let pairs = [(&cond[..], &uncond[..])];
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    model.condition_batch(&pairs, run)?; // warm-up: loads the weights
    let (mut whole, mut setup, mut nodes) = (vec![], vec![], vec![]);
    for _ in 0..iters {
        let t = Instant::now();
        model.condition_batch(&pairs, run)?;
        whole.push(ms(t));
        let t = Instant::now();
        model.with_conditioning_executor(&pairs, run, |_| Ok(()))?;
        setup.push(ms(t));
        nodes.push(model.with_conditioning_executor(&pairs, run, |e| {
            let t = Instant::now();
            e.execute()?;
            Ok(ms(t))
        })?);
    }
    println!(
        "cpu_conditioning b-512 batch 1, median of {iters}: condition_batch {:.1} ms, of which executor setup {:.1} ms, execute {:.1} ms (load average {})",
        median(whole),
        median(setup),
        median(nodes),
        loadavg()
    );
    Ok(())
}
