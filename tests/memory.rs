//! Memory (issue 19 item 3): weights held once by the CPU executors (counted heap allocations),
//! the LLM and transformer released when done without changing an image, and the planned peak: above
//! what a run allocates, and within 1.25x of the weights resident at once at real size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use openuni::exec::Device;
use openuni::generate::RunMemory;
use openuni::pipeline::{
    DecodeOptions, GenerationBatch, LatentNoise, OpenUni, RunOptions, SamplingParams,
};
use openuni::tiny_model;
use openuni_cpu::{CpuExecutor, WeightCache};
use openuni_graph::{Graph, GraphBuilder};
use openuni_models::scheduler::SamplerKind;
use openuni_tensor::{write_safetensors, DType, HostTensor, TensorSource, Weights};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::SeqCst) + n;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::SeqCst);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The measuring tests run one at a time (the counters are process-wide).
static SERIAL: Mutex<()> = Mutex::new(());

/// `f`'s result and the peak of live heap bytes above those live when it started.
fn peak_heap<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.load(Ordering::SeqCst);
    PEAK.store(start, Ordering::SeqCst);
    let r = f();
    (r, PEAK.load(Ordering::SeqCst).saturating_sub(start))
}

const D: usize = 1024;

/// Two chained linears reading `l0.weight` and `l1.weight` ([D, D] each) on `m` rows.
fn two_linears(m: usize) -> Graph {
    let mut b = GraphBuilder::new();
    let x = b.input("x", [m, D]).unwrap();
    let w0 = b.weight("l0.weight", [D, D]).unwrap();
    let w1 = b.weight("l1.weight", [D, D]).unwrap();
    let h = b.linear("l0", x, w0, None).unwrap();
    let y = b.linear("l1", h, w1, None).unwrap();
    b.output("y", y).unwrap();
    b.finish()
}

fn weights() -> HashMap<String, HostTensor> {
    let draw = |seed: usize| {
        (0..D * D)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) / 32768.0)
            .collect::<Vec<f32>>()
    };
    HashMap::from([
        (
            "l0.weight".to_string(),
            HostTensor::from_f32([D, D], draw(1)).unwrap(),
        ),
        (
            "l1.weight".to_string(),
            HostTensor::from_f32([D, D], draw(2)).unwrap(),
        ),
    ])
}

/// Executors of the graph at two batch sizes on one cache.
fn build_two(src: &dyn TensorSource, cache: &WeightCache) -> Vec<CpuExecutor> {
    [1, 3]
        .into_iter()
        .map(|m| CpuExecutor::with_cache(&two_linears(m), src, cache, false).unwrap())
        .collect()
}

fn run_all(execs: Vec<CpuExecutor>) -> Vec<Vec<f32>> {
    execs
        .into_iter()
        .map(|mut e| {
            let m = e.graph().shape(e.graph().input_id("x").unwrap()).dims()[0];
            let x =
                HostTensor::from_f32([m, D], (0..m * D).map(|i| (i % 13) as f32 / 13.0).collect())
                    .unwrap();
            e.run(&HashMap::from([("x".to_string(), x)]))
                .unwrap()
                .remove("y")
                .unwrap()
                .into_f32_vec()
        })
        .collect()
}

#[test]
fn cpu_executors_hold_weights_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let plain = weights();
    let f32_bytes = 2 * D * D * 4;
    let expected = run_all(build_two(&plain, &WeightCache::default()));

    // An f32 file: both executors read the mapped file in place; no weight is copied to the heap.
    let f = dir.path().join("f32.safetensors");
    write_safetensors(&f, plain.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
    let w = Weights::open(&f).unwrap();
    let cache = WeightCache::default();
    let (execs, heap) = peak_heap(|| build_two(&w, &cache));
    assert_eq!(
        run_all(execs),
        expected,
        "in-place weights give the owned weights' outputs"
    );
    assert_eq!(
        cache.mapped_bytes(),
        f32_bytes,
        "every weight is read in place"
    );
    assert!(heap < f32_bytes / 4, "in-place f32 weights: two executors allocated {heap} bytes for {f32_bytes} bytes of weights");

    // A bf16 file: each tensor converted once into the cache, shared by both executors, with no
    // transient second copy.
    let f = dir.path().join("bf16.safetensors");
    let bf: HashMap<String, HostTensor> = plain
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::BF16).unwrap()))
        .collect();
    write_safetensors(&f, bf.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
    let w = Weights::open(&f).unwrap();
    let cache = WeightCache::default();
    let (execs, heap) = peak_heap(|| build_two(&w, &cache));
    assert_eq!(
        run_all(execs),
        run_all(build_two(&bf, &WeightCache::default())),
        "converted weights give the owned bf16 weights' outputs"
    );
    assert_eq!((cache.bytes(), cache.mapped_bytes()), (f32_bytes, 0));
    assert!(heap >= f32_bytes && heap * 4 <= f32_bytes * 5, "bf16 weights: two executors allocated {heap} bytes, expected one f32 copy ({f32_bytes} bytes) and at most 1.25x");
}

fn tiny(dir: &std::path::Path) -> OpenUni {
    OpenUni::load(
        &tiny_model::paths(&tiny_model::ensure(dir).unwrap()),
        tiny_model::connector_config(),
    )
    .unwrap()
}

/// Two batches (two images, then one) of the tiny model, 2 steps; the decoded images.
fn generate(m: &OpenUni) -> Vec<Vec<f32>> {
    let run = RunOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    let c = m.transformer_cfg.in_channels;
    let (h, w) = (4, 6);
    let batch = |seeds: &[u64], prompts: Vec<(Vec<u32>, Vec<u32>)>| GenerationBatch {
        prompts,
        noise: LatentNoise::seeded(seeds.to_vec(), c, h, w),
    };
    let batches = [
        batch(
            &[1, 2],
            vec![
                ((10..27).collect(), (3..9).collect()),
                ((40..44).collect(), (3..9).collect()),
            ],
        ),
        batch(&[3], vec![((5..36).collect(), (50..52).collect())]),
    ];
    let p = SamplingParams {
        steps: 2,
        guidance: 4.5,
        sampler: SamplerKind::DpmSolver,
        flow_shift: 3.0,
        decode: DecodeOptions::default(),
    };
    let mut images = vec![];
    m.generate_batches(
        &batches,
        &p,
        run,
        |_| {},
        |_, d| {
            images.push(d.into_f32_vec());
            Ok(())
        },
    )
    .unwrap();
    images
}

#[test]
fn releasing_stages_frees_their_weights_keeps_the_images_and_stays_within_the_plan() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let run = RunOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    let kept = tiny(dir.path());
    let expected = generate(&kept);

    let m = tiny(dir.path());
    m.set_release_stages(true);
    let up = m.vae_cfg.upscale();
    let plan = RunMemory::new(
        &m,
        2,
        2,
        4 * up,
        6 * up,
        run,
        DecodeOptions::default(),
        true,
    )
    .unwrap();
    let keep_all = RunMemory::new(
        &m,
        2,
        2,
        4 * up,
        6 * up,
        run,
        DecodeOptions::default(),
        false,
    )
    .unwrap();
    let (images, heap) = peak_heap(|| generate(&m));
    assert_eq!(images, expected, "releasing the LLM changes no image");
    let p = plan.plan;
    assert!(p.conditioning_weights > 0 && p.transformer_weights > 0 && p.vae_weights > 0);
    assert_eq!(
        kept.resident_weight_bytes(),
        p.conditioning_weights + p.transformer_weights + p.vae_weights,
        "kept: every stage resident"
    );
    assert_eq!(
        m.resident_weight_bytes(),
        p.vae_weights,
        "released: the LLM's and the transformer's weights are gone"
    );
    assert!(
        m.resident_activation_bytes() < kept.resident_activation_bytes(),
        "released: the transformer's executors are gone"
    );
    // The weights are read in place from the mapped files (not heap); what the run allocates on
    // the heap (activations, host tensors) stays below what the plan counts for them with every
    // stage kept (two batches: the first batch's decode still holds the transformer).
    let (_, planned_acts) = keep_all.plan.peak_parts();
    eprintln!(
        "heap peak {heap} bytes; planned activations {planned_acts} + host tensors {} bytes",
        plan.host_tensors
    );
    assert!(
        heap <= planned_acts + plan.host_tensors,
        "heap peak {heap} above the planned {} + {}",
        planned_acts,
        plan.host_tensors
    );
}

#[test]
fn real_size_plans_peak_within_1_25x_of_the_weights_resident_at_once() {
    let run = RunOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    for variant in ["b-512", "l-1024"] {
        let (m, size) = openuni::bench::random_model(variant).unwrap();
        let decode = DecodeOptions::from_flags(None, size, size, &m.vae_cfg).unwrap();
        let plan = RunMemory::new(&m, 1, 1, size, size, run, decode, true).unwrap();
        let weights = plan.plan.weights_at_peak();
        eprintln!("{variant}: {}", plan.describe());
        // The model's part of the plan (the process and the per-thread scratch allowance, which
        // depends on the machine's thread count, are added on top; docs/memory.md).
        let model_part = plan.host_peak - plan.process_now - plan.scratch;
        assert!(model_part * 4 <= weights * 5, "{variant}: planned peak {model_part} above 1.25x the {weights} bytes of weights resident at once");
        assert!(
            plan.host_peak < plan.plan.resident_all(),
            "{variant}: releasing the LLM lowers the peak"
        );
    }
}
