//! Bounded mutation fuzzing of the loaders on stable Rust (no cargo-fuzz, no nightly): the
//! safetensors header parser (`Weights::open` + reading every tensor), the `.pth` pickle reader
//! (`read_pth_bytes`) and the config readers (`read_mllm_config`, `read_config` for SANA, DC-AE,
//! connector and scheduler configs, then building each accepted model's graph).
//!
//! Seeds: `tests/fixtures/fuzz/` (made by tools/make_fuzz_seeds.py with torch and safetensors) and
//! the committed fixture configs. Each target mutates its seeds with a seeded RNG for a bounded
//! time, `OPENUNI_FUZZ_SECS` seconds (default 8, so the three targets stay near 30 s per `cargo
//! test` run; CI runs the tests twice), or `OPENUNI_FUZZ_ITERS` rounds; `OPENUNI_FUZZ_SEED` picks
//! another RNG seed for a longer local hunt. The process runs under a 4 GiB address-space limit
//! (setrlimit), so an unbounded allocation aborts this test instead of passing. Any input that
//! panics is written to `target/fuzz-findings/` and reported; it then becomes a regression test
//! below (`regression_*`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openuni_graph::GraphBuilder;
use openuni_models::config::{read_config, read_mllm_config, ModelConfig, SchedulerConfig};
use openuni_models::connector::{self, ConnectorConfig};
use openuni_models::dcae::{self, DcaeConfig};
use openuni_models::nn::Scope;
use openuni_models::qwen2;
use openuni_models::sana::{self, SanaConfig};
use openuni_tensor::{read_pth_bytes, PthOptions, Weights};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn seed_file(rel: &str) -> Vec<u8> {
    std::fs::read(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Caps this process's address space, so that an allocation a loader should have refused fails
/// (and aborts the test) instead of succeeding on a large machine.
fn cap_memory() {
    const CAP: u64 = 4 << 30;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct; only lowers this process's soft limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_AS, &mut lim) == 0
            && (lim.rlim_cur == libc::RLIM_INFINITY || lim.rlim_cur > CAP)
        {
            lim.rlim_cur = CAP;
            libc::setrlimit(libc::RLIMIT_AS, &lim);
        }
    }
}

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Integers that break size arithmetic.
const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    3,
    7,
    255,
    65535,
    65536,
    1 << 31,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
];

/// Byte-level mutations: bit flips, random bytes, insertions, deletions, chunk copies, and
/// little-endian interesting integers written over the data.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                data.insert(i, rng.next() as u8);
            }
            3 if len > 1 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(16));
                data.drain(i..i + n);
            }
            4 if len > 1 => {
                let (a, b) = (rng.below(len), rng.below(len));
                let n = 1 + rng.below((len - a.max(b)).min(32));
                let chunk = data[a..a + n].to_vec();
                data.splice(b..b, chunk);
            }
            5 if len >= 8 => {
                let i = rng.below(len - 7);
                let v = *rng.pick(&INTERESTING);
                let w = [1usize, 2, 4, 8][rng.below(4)];
                data[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            _ if len > 0 => {
                // ASCII digits: numbers in JSON headers and pickle text opcodes.
                let i = rng.below(len);
                data[i] = b'0' + rng.below(10) as u8;
            }
            _ => data.push(rng.next() as u8),
        }
    }
}

/// A JSON value to put where a number was: extremes, wrong signs, wrong types.
fn interesting_json(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    match rng.below(14) {
        0 => json!(*rng.pick(&INTERESTING)),
        12 | 13 => json!(0),
        1 => json!(-1),
        2 => json!(-(rng.below(1000) as i64)),
        3 => json!(1_000_000),
        4 => json!(0.0),
        5 => json!(-1.5),
        6 => json!(1e308),
        7 => json!(5e-324),
        8 => serde_json::Value::Null,
        9 => json!("7"),
        10 => json!([1, 2]),
        _ => json!(rng.below(300)),
    }
}

/// Structural mutation of a JSON document: a random leaf (or list entry) gets an interesting
/// value, or a key is removed, or a list is shortened or grown.
fn mutate_json(rng: &mut Rng, v: &mut serde_json::Value) {
    fn leaves(v: &serde_json::Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    path.push(k.clone());
                    out.push(path.clone());
                    leaves(x, path, out);
                    path.pop();
                }
            }
            serde_json::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    path.push(format!("#{i}"));
                    out.push(path.clone());
                    leaves(x, path, out);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    fn at<'a>(v: &'a mut serde_json::Value, path: &[String]) -> Option<&'a mut serde_json::Value> {
        let mut cur = v;
        for p in path {
            cur = match p.strip_prefix('#') {
                Some(i) => cur.get_mut(i.parse::<usize>().ok()?)?,
                None => cur.get_mut(p.as_str())?,
            };
        }
        Some(cur)
    }
    let mut all = vec![];
    leaves(v, &mut vec![], &mut all);
    if all.is_empty() {
        return;
    }
    // Numbers are where configs go wrong: three mutations in four hit a numeric leaf.
    let numeric: Vec<Vec<String>> = all
        .iter()
        .filter(|p| at(v, p).is_some_and(|x| x.is_number()))
        .cloned()
        .collect();
    for _ in 0..1 + rng.below(3) {
        let path = if !numeric.is_empty() && rng.below(4) != 0 {
            rng.pick(&numeric).clone()
        } else {
            rng.pick(&all).clone()
        };
        let choice = rng.below(10);
        if choice == 0 {
            let (last, parent) = path.split_last().unwrap();
            if let Some(serde_json::Value::Object(m)) = at(v, parent) {
                m.remove(last);
            }
        } else if let Some(x) = at(v, &path) {
            match x {
                serde_json::Value::Array(a) if choice == 1 => a.truncate(rng.below(a.len() + 1)),
                serde_json::Value::Array(a) if choice == 2 => {
                    let e = interesting_json(rng);
                    a.push(e)
                }
                _ => *x = interesting_json(rng),
            }
        }
    }
}

/// Runs `one` on mutated inputs until the time or round budget is spent; a panic is saved and
/// reported with its round. Returns (rounds, accepted inputs).
fn fuzz(
    target: &str,
    seeds: &[Vec<u8>],
    mutate: impl Fn(&mut Rng, &[u8]) -> Vec<u8>,
    one: impl Fn(&[u8]) -> bool,
) -> (u64, u64) {
    cap_memory();
    let secs = env_num("OPENUNI_FUZZ_SECS", 8);
    let iters = env_num("OPENUNI_FUZZ_ITERS", u64::MAX);
    let mut rng = Rng(env_num("OPENUNI_FUZZ_SEED", 0x0018_f022) ^ (target.len() as u64) << 32 | 1);
    let start = Instant::now();
    let (mut rounds, mut accepted) = (0u64, 0u64);
    // Every seed must load as is: a fuzzer whose seeds fail exercises only the first check.
    for (i, s) in seeds.iter().enumerate() {
        assert!(one(s), "{target}: seed {i} is not accepted");
    }
    while rounds < iters && start.elapsed() < Duration::from_secs(secs) {
        let seed = rng.pick(seeds).clone();
        let input = mutate(&mut rng, &seed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| one(&input)));
        match r {
            Ok(ok) => accepted += ok as u64,
            Err(_) => {
                let dir = root().join("target/fuzz-findings");
                std::fs::create_dir_all(&dir).unwrap();
                let f = dir.join(format!("{target}-{rounds}"));
                std::fs::write(&f, &input).unwrap();
                panic!(
                    "{target}: round {rounds} panicked; input saved to {}",
                    f.display()
                );
            }
        }
        rounds += 1;
    }
    println!(
        "{target}: {rounds} rounds in {:.1} s, {accepted} accepted",
        start.elapsed().as_secs_f64()
    );
    (rounds, accepted)
}

// ------------------------------------------------------------------------------------------------
// targets
// ------------------------------------------------------------------------------------------------

/// Opens a safetensors file and reads every tensor (raw and as f32); true when all of it loads.
fn load_safetensors(bytes: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let Ok(w) = Weights::open(&p) else {
        return false;
    };
    let keys: Vec<String> = w.keys().map(str::to_string).collect();
    let mut ok = true;
    for k in &keys {
        let shape = w.shape(k).unwrap();
        ok &= w.get(k).is_ok_and(|t| t.shape == shape);
        // integer tensors are refused as f32 weights (an error, not a panic)
        let _ = w.get_f32(k, None);
        // the held-once path (in place or converted) agrees with the copy
        if let (Ok(held), Ok(copy)) = (w.weight_f32(k, &shape), w.get_f32(k, None)) {
            ok &= held
                .iter()
                .zip(copy.to_f32_vec())
                .all(|(a, b)| a.to_bits() == b.to_bits())
                && held.len() == shape.numel();
        }
    }
    ok
}

/// A safetensors file with its JSON header mutated structurally (shapes, offsets, dtypes).
fn mutate_safetensors(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut out = seed.to_vec();
    if rng.below(2) == 0 {
        mutate_bytes(rng, &mut out);
        return out;
    }
    let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&seed[8..8 + n]).unwrap();
    mutate_json(rng, &mut header);
    if rng.below(4) == 0 {
        // a dtype outside the supported set, or a bogus one
        if let Some(m) = header.as_object_mut() {
            if let Some(t) = m
                .iter_mut()
                .find(|(k, _)| *k != "__metadata__")
                .and_then(|(_, t)| t.as_object_mut())
            {
                t.insert(
                    "dtype".into(),
                    serde_json::json!(*rng.pick(&["F64", "BOOL", "I8", "F8_E4M3", "X"])),
                );
            }
        }
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut v = (h.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(&h);
    v.extend_from_slice(&seed[8 + n..]);
    v
}

fn load_pth(bytes: &[u8]) -> bool {
    read_pth_bytes(Path::new("fuzz.pth"), bytes, &PthOptions::default()).is_ok()
}

/// Which config reader a seed goes through.
#[derive(Clone, Copy, Debug)]
enum ConfigKind {
    Mllm,
    Sana,
    Dcae,
    Connector,
    Scheduler,
}

const CONFIG_SEEDS: [(ConfigKind, &str); 8] = [
    (
        ConfigKind::Mllm,
        "tests/fixtures/fuzz/internvl3_config.json",
    ),
    (
        ConfigKind::Mllm,
        "tests/fixtures/llm_gqa_untied/model/config.json",
    ),
    (
        ConfigKind::Sana,
        "tests/fixtures/dit_sana15_qknorm/model/config.json",
    ),
    (
        ConfigKind::Sana,
        "tests/fixtures/dit_sana10_mask/model/config.json",
    ),
    (
        ConfigKind::Dcae,
        "tests/fixtures/vae_quadratic_small/model/config.json",
    ),
    (
        ConfigKind::Dcae,
        "tests/fixtures/vae_linear_nonsquare/model/config.json",
    ),
    (
        ConfigKind::Connector,
        "tests/fixtures/connector_b2/model/config.json",
    ),
    (
        ConfigKind::Scheduler,
        "tests/fixtures/pipeline_tiny/model/scheduler/scheduler_config.json",
    ),
];

fn read_kind<T: ModelConfig>(p: &Path) -> Option<T> {
    read_config::<T>(p).ok()
}

/// Reads a config of `kind` and, when accepted, builds the model's graph on a small input (shapes
/// only, no weights): an accepted config must never panic or overflow in the builders.
fn load_config(kind: ConfigKind, text: &[u8]) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    std::fs::write(&p, text).unwrap();
    let mut b = GraphBuilder::new();
    match kind {
        ConfigKind::Mllm => {
            let Ok(c) = read_mllm_config(&p) else {
                return false;
            };
            let x = b.input("x", [1, 3, c.llm.hidden_size]).unwrap();
            let _ = qwen2::build(&mut b, &c.llm, &Scope::new("model"), x, "fuzz");
        }
        ConfigKind::Sana => {
            let Some(c) = read_kind::<SanaConfig>(&p) else {
                return false;
            };
            let enc = b.input("enc", [1, 2, c.caption_channels]).unwrap();
            let x = b.input("x", [1, c.in_channels, 2, 2]).unwrap();
            let t = b.input("t", [1]).unwrap();
            if let Ok((_, kv)) = sana::caption_path(&mut b, &c, enc) {
                let _ = sana::denoise(&mut b, &c, x, t, &kv, None, 2, 2);
            }
        }
        ConfigKind::Dcae => {
            let Some(c) = read_kind::<DcaeConfig>(&p) else {
                return false;
            };
            let z = b.input("z", [1, c.latent_channels, 1, 2]).unwrap();
            let _ = dcae::decoder(&mut b, &c, z, "fuzz");
            let _ = c.local_split();
        }
        ConfigKind::Connector => {
            let Some(c) = read_kind::<ConnectorConfig>(&p) else {
                return false;
            };
            let x = b.input("x", [1, 2, c.hidden_size]).unwrap();
            let _ = connector::build(&mut b, &c, &Scope::default(), x, "fuzz");
        }
        ConfigKind::Scheduler => {
            let Some(c) = read_kind::<SchedulerConfig>(&p) else {
                return false;
            };
            let _ = openuni_models::scheduler::Sampler::new(20, c.flow_shift);
        }
    }
    true
}

// ------------------------------------------------------------------------------------------------
// fuzz runs (bounded)
// ------------------------------------------------------------------------------------------------

#[test]
fn fuzz_safetensors_headers() {
    let seeds = vec![
        seed_file("tests/fixtures/fuzz/seed.safetensors"),
        seed_file("tests/fixtures/pth/openuni_state_dict_bf16.expected.safetensors"),
    ];
    let (rounds, accepted) = fuzz("safetensors", &seeds, mutate_safetensors, load_safetensors);
    assert!(
        rounds == 0 || accepted < rounds,
        "every mutation was accepted: the mutator does nothing"
    );
}

#[test]
fn fuzz_pth_reader() {
    let seeds = vec![
        seed_file("tests/fixtures/fuzz/seed.pth"),
        seed_file("tests/fixtures/pth/openuni_state_dict_bf16.pth"),
    ];
    let mutate = |rng: &mut Rng, s: &[u8]| {
        let mut v = s.to_vec();
        mutate_bytes(rng, &mut v);
        v
    };
    let (rounds, accepted) = fuzz("pth", &seeds, mutate, load_pth);
    assert!(rounds == 0 || accepted < rounds);
}

#[test]
fn fuzz_config_readers() {
    // One fuzz run over every reader: the seed's index picks the reader.
    let seeds: Vec<Vec<u8>> = CONFIG_SEEDS
        .iter()
        .enumerate()
        .map(|(i, (_, p))| {
            let mut v = vec![i as u8];
            v.extend(seed_file(p));
            v
        })
        .collect();
    let mutate = |rng: &mut Rng, s: &[u8]| {
        let mut body = s[1..].to_vec();
        // Structural mutation where the text is JSON (upstream's Infinity/NaN read as null).
        let json = String::from_utf8(body.clone()).ok().and_then(|t| {
            serde_json::from_str::<serde_json::Value>(
                &t.replace("Infinity", "null").replace("NaN", "null"),
            )
            .ok()
        });
        match json {
            Some(mut v) if rng.below(3) != 0 => {
                mutate_json(rng, &mut v);
                body = serde_json::to_vec_pretty(&v).unwrap();
            }
            _ => mutate_bytes(rng, &mut body),
        }
        let mut out = vec![s[0]];
        out.extend(body);
        out
    };
    let one = |s: &[u8]| load_config(CONFIG_SEEDS[s[0] as usize % CONFIG_SEEDS.len()].0, &s[1..]);
    let (rounds, accepted) = fuzz("config", &seeds, mutate, one);
    assert!(rounds == 0 || accepted < rounds);
}

// ------------------------------------------------------------------------------------------------
// bounds do not refuse the published models
// ------------------------------------------------------------------------------------------------

#[test]
fn published_variant_configs_are_within_bounds() {
    // The bench variants are the published model sizes (InternVL3-1B/2B, SANA 600M/1.6B, DC-AE f32c32).
    for variant in ["b-512", "l-512", "l-1024", "tiny"] {
        let dir = tempfile::tempdir().unwrap();
        openuni::bench::write_configs(variant, dir.path()).unwrap();
        read_mllm_config(&dir.path().join("llm.json")).unwrap_or_else(|e| panic!("{variant}: {e}"));
        read_config::<SanaConfig>(&dir.path().join("transformer.json"))
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        read_config::<DcaeConfig>(&dir.path().join("vae.json"))
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        read_config::<ConnectorConfig>(&dir.path().join("connector.json"))
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        // The MLLM's vision tower (bench --chat --vit-tiles, bench_torch_chat.py): InternViT-300M.
        let vit: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("vit.json")).unwrap())
                .unwrap();
        let v = openuni_models::internvit::InternVlVisionConfig::from_json(&vit, "vit.json")
            .unwrap_or_else(|e| panic!("{variant}: {e}"));
        assert_eq!(
            (v.hidden_size, v.num_hidden_layers, v.tokens_per_tile()),
            (1024, 24, 256),
            "{variant}"
        );
    }
}
