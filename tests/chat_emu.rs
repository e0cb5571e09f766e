//! The chat decoder (src/chat.rs: prefill graph + decode-step graph with the KV cache as executor
//! state, docs/decode.md) on the emulated GPU, against the same decoder on the CPU in f32:
//!
//! - teacher-forced logits (prefill, then decode steps, the cache grown mid-sequence past 256
//!   positions) within 1e-5 in f32 storage and within the bf16 default tolerance in bf16;
//! - continuous batching over device batch slots gives the CPU's greedy answers (f32);
//! - a decode step, captured and replayed, moves only the new tokens' embeddings and positions in
//!   and the logits out, whatever the cache holds (the executor's own byte counters);
//! - a whole chat turn (ViT, prefill, decode) moves exactly the pixels, the prompt and the answer's
//!   logits over the bus, and no K/V (the emulated driver's counters).
//!
//! The committed chat case on emu (f32 and bf16) runs in tests/verify_emu.rs. Without the emulated
//! GPU (tools/build_emu.sh not run) the tests print `skipped: no CUDA device`.

use std::path::{Path, PathBuf};

use openuni::chat::{generate_continuous, generate_greedy, BatchRequest, CachedQwen2};
use openuni::exec::{emulator_or_skip, Device};
use openuni_models::qwen2::Qwen2Config;
use openuni_tensor::{DType, Weights};

const P: &str = "language_model.model.";
const H: &str = "language_model.lm_head.weight";

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_tiny")
}

fn llm_config() -> Qwen2Config {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case().join("model/config.json")).unwrap())
            .unwrap();
    serde_json::from_value(v["llm_config"].clone()).unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Logits of the prefill of `ids[..prompt]` and of each later id fed as the next token.
fn teacher_forced(llm: &mut CachedQwen2, ids: &[usize], prompt: usize) -> Vec<Vec<f32>> {
    let mut out = vec![llm.forward(&llm.embed(&ids[..prompt]).unwrap()).unwrap()];
    for &id in &ids[prompt..] {
        out.push(llm.forward(&llm.embed(&[id]).unwrap()).unwrap());
    }
    out
}

/// These tests share the process's emulated device and its stream: a CUDA-graph capture by one
/// would catch the other's calls, so they run one at a time.
static EMU: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn emulated_decoder_matches_the_cpu_logits_across_a_cache_growth() {
    let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
    if !emulator_or_skip() {
        return;
    }
    let (cfg, w) = (llm_config(), Weights::open(case().join("model")).unwrap());
    // 250 prompt tokens and 12 steps: the cache is built for 256 positions, then grown to 512
    // with the cached rows copied over (the CPU reference reserves 512 up front: no growth).
    let ids: Vec<usize> = (0..262).map(|i| (i * 37 + 11) % 280).collect();
    let mut cpu = CachedQwen2::load(&w, &cfg, P, H, "chat_tiny").unwrap();
    cpu.reserve(512);
    let want = teacher_forced(&mut cpu, &ids, 250);
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2)] {
        let mut emu =
            CachedQwen2::load_on(&w, &cfg, P, H, "chat_tiny", Device::Emu, dtype, 1).unwrap();
        let got = teacher_forced(&mut emu, &ids, 250);
        let errs: Vec<f64> = got.iter().zip(&want).map(|(g, w)| rel_l2(g, w)).collect();
        let worst = errs.iter().copied().fold(0f64, f64::max);
        println!(
            "emu {dtype}: worst rel L2 over {} positions {worst:.1e}",
            errs.len()
        );
        assert!(
            errs.iter().all(|&e| e <= tol),
            "emu {dtype}: {errs:?} above {tol}"
        );
        assert_eq!(emu.cached_len(), 262);
    }
    // A wrong cache changes the result (the comparison above can fail): a different prompt.
    let mut other = CachedQwen2::load(&w, &cfg, P, H, "chat_tiny").unwrap();
    let mut changed = ids.clone();
    changed[3] = (changed[3] + 1) % 280;
    let diff = teacher_forced(&mut other, &changed, 250);
    assert!(rel_l2(&diff[12], &want[12]) > 1e-3);
}

#[test]
fn continuous_batching_on_the_emulated_gpu_gives_the_cpu_answers() {
    let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
    if !emulator_or_skip() {
        return;
    }
    let (cfg, w) = (llm_config(), Weights::open(case().join("model")).unwrap());
    let prompts: Vec<(Vec<usize>, usize)> = vec![
        (vec![3, 17, 40], 7),
        (vec![5, 99, 12, 7, 8, 1], 3),
        (vec![42], 5),
        (vec![7, 7, 7, 7], 6),
    ];
    let mut alone = vec![];
    for (ids, n) in &prompts {
        let mut one = CachedQwen2::load(&w, &cfg, P, H, "chat_tiny").unwrap();
        let e = one.embed(ids).unwrap();
        alone.push(generate_greedy(&mut one, &e, *n, None, |_| {}).unwrap().1);
    }
    let mut llm =
        CachedQwen2::load_on(&w, &cfg, P, H, "chat_tiny", Device::Emu, DType::F32, 2).unwrap();
    let table = llm.embeddings();
    let reqs = prompts.iter().enumerate().map(|(i, (ids, n))| {
        Ok(BatchRequest {
            key: i,
            prompt_embeds: table.embed(ids).unwrap(),
            max_new_tokens: *n,
        })
    });
    let mut got = vec![vec![]; prompts.len()];
    generate_continuous(&mut llm, reqs, None, None, |k, ids| {
        got[k] = ids;
        Ok(())
    })
    .unwrap();
    assert_eq!(got, alone);
}

#[test]
fn a_decode_step_moves_only_the_new_tokens_and_the_logits() {
    let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
    if !emulator_or_skip() {
        return;
    }
    let (cfg, w) = (llm_config(), Weights::open(case().join("model")).unwrap());
    let slots = 3;
    let mut llm =
        CachedQwen2::load_on(&w, &cfg, P, H, "chat_tiny", Device::Emu, DType::BF16, slots).unwrap();
    llm.reserve(1024);
    llm.prefill(
        0,
        &llm.embed(&(0..200).map(|i| i % 280).collect::<Vec<_>>())
            .unwrap(),
    )
    .unwrap();
    llm.prefill(2, &llm.embed(&[5, 6, 7]).unwrap()).unwrap();
    let e = llm.embed(&[9]).unwrap();
    // The first step runs eagerly and is captured; the next ones replay the capture.
    llm.step(&[(0, &e), (2, &e)]).unwrap();
    let before = llm.step_executor().unwrap().host_traffic();
    let steps = 4;
    for _ in 0..steps {
        llm.step(&[(0, &e), (2, &e)]).unwrap();
    }
    let after = llm.step_executor().unwrap().host_traffic();
    let (up, down) = ((after.0 - before.0) / steps, (after.1 - before.1) / steps);
    let (d, v) = (cfg.hidden_size as u64, cfg.vocab_size as u64);
    let s = slots as u64;
    // f32 embeddings [slots, D] and positions [slots] in, f32 logits [slots, V] out: nothing else.
    assert_eq!(up, s * d * 4 + s * 4);
    assert_eq!(down, s * v * 4);
    let cache_bytes =
        (cfg.num_hidden_layers * 2 * slots * cfg.num_key_value_heads * 1024 * cfg.head_dim() * 2)
            as u64;
    println!("per decode step: {up} B up, {down} B down; the bf16 KV cache holds {cache_bytes} B");
    assert!(up + down < cache_bytes / 100);
}

/// One whole chat turn on the emulated GPU (bf16), counted by the emulated driver itself
/// (`openuni_cuda::emu_traffic`: every host<->device copy of the process): the pixel values in,
/// the image embeddings out (scattered into the prompt on the host), the prompt embeddings in,
/// the prefill logits out; then per decode step the new token's embedding and position in and
/// the logits out. The prefill's keys and values go into the decode step's cache on the device
/// (`copy_to_state`): they cross the bus neither way. The first turn (weights uploaded, cache
/// built, step captured) is not counted; the second, the same question again, is.
#[test]
fn a_chat_turn_moves_pixels_prompt_and_answer_but_no_kv() {
    let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
    if !emulator_or_skip() {
        return;
    }
    let m = openuni::chat::ChatModel::open(Some(&case().join("model")), Device::Emu, DType::BF16)
        .unwrap();
    let px = Weights::open(case().join("io.safetensors"))
        .unwrap()
        .get("pixel_values")
        .unwrap();
    let tiles = px.shape.dims()[0];
    let mut llm = m.llm(1).unwrap();
    let new_tokens = 6;
    let turn = |llm: &mut CachedQwen2| {
        llm.reset();
        let e = m
            .prompt_embeds(
                &llm.embeddings(),
                &[],
                "What colour is the square?",
                Some((&px, &[tiles])),
                "io.safetensors",
            )
            .unwrap();
        // No end token: exactly `new_tokens` ids, so the step count is known.
        let (_, ids) = generate_greedy(llm, &e, new_tokens, None, |_| {}).unwrap();
        assert_eq!(ids.len(), new_tokens);
        e.len() / llm.hidden_size()
    };
    turn(&mut llm);
    assert!(
        openuni_cuda::reset_emu_traffic(),
        "the emulated driver counts traffic"
    );
    let prompt = turn(&mut llm);
    let (up, down) = openuni_cuda::emu_traffic().unwrap();

    let cfg = llm_config();
    let (d, v, hd) = (cfg.hidden_size, cfg.vocab_size, cfg.head_dim());
    let (steps, image_tokens) = (new_tokens - 1, tiles * 256);
    let want_up = tiles * 3 * 448 * 448 * 4 // pixel values, f32
        + prompt * d * 4 // prompt embeddings, f32
        + prompt * hd * 4 // the prefill executor's RoPE table (cos, sin per position and pair)
        + steps * (d * 4 + 4); // per step: the embedding and the position, f32
    let want_down = image_tokens * d * 4 // image embeddings, f32
        + v * 2 // prefill logits, bf16 as stored
        + steps * v * 4; // per step: the logits, f32
    let kv = cfg.num_hidden_layers * 2 * prompt * cfg.num_key_value_heads * hd;
    println!("one chat turn ({tiles} tile, {prompt} prompt tokens, {new_tokens} new): {up} B up, {down} B down; the prompt's K/V are {} B in bf16", kv * 2);
    assert_eq!(
        (up as usize, down as usize),
        (want_up, want_down),
        "host->device, device->host bytes of one chat turn"
    );
}
