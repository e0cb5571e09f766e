//! Image chat on the CPU (src/chat.rs, component `chat`).
//!
//! - The committed case tests/fixtures/chat_tiny (transformers' InternVL `generate`, greedy with a
//!   KV cache, on a small random model in the original layout) passes on the CPU: prefill logits
//!   at the f32 tolerance, generated ids exactly. tests/verify_emu.rs runs it with the ViT on the
//!   emulated GPU (f32 and bf16).
//! - The KV cache gives what a full recompute gives: decoding a token against the cache equals
//!   running the whole sequence again.
//! - A prompt whose image slots do not match the tiles, and a tokenizer without `<IMG_CONTEXT>`,
//!   are clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

use openuni::chat::{argmax, CachedQwen2};
use openuni_models::qwen2::Qwen2Config;
use openuni_tensor::{write_safetensors, HostData, HostTensor, Weights};

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_tiny")
}

fn verify(dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni")).arg("verify").arg(dir).output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn copy_case(dir: &Path) {
    std::fs::create_dir_all(dir.join("model")).unwrap();
    for f in ["case.json", "io.safetensors", "model/config.json", "model/model.safetensors", "model/tokenizer.json"] {
        std::fs::copy(case().join(f), dir.join(f)).unwrap();
    }
}

fn llm_config() -> Qwen2Config {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(case().join("model/config.json")).unwrap()).unwrap();
    serde_json::from_value(v["llm_config"].clone()).unwrap()
}

#[test]
fn committed_chat_case_passes_on_cpu() {
    let (code, out) = verify(&case());
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("prefill_logits") && out.contains("generated_ids") && !out.contains("FAIL"));
}

#[test]
fn kv_cached_decoding_equals_a_full_recompute() {
    let cfg = llm_config();
    let w = Weights::open(case().join("model")).unwrap();
    let origin = "chat_tiny";
    let ids: Vec<usize> = vec![3, 17, 40, 5, 99, 12, 7];
    let (p, h) = ("language_model.model.", "language_model.lm_head.weight");
    // Cached: prefill 5 tokens, then two single-token steps.
    let mut cached = CachedQwen2::load(&w, &cfg, p, h, origin).unwrap();
    cached.forward(&cached.embed(&ids[..5]).unwrap()).unwrap();
    cached.forward(&cached.embed(&ids[5..6]).unwrap()).unwrap();
    let step = cached.forward(&cached.embed(&ids[6..7]).unwrap()).unwrap();
    assert_eq!(cached.cached_len(), 7);
    // Recomputed: all 7 tokens at once on a fresh cache.
    let mut fresh = CachedQwen2::load(&w, &cfg, p, h, origin).unwrap();
    let full = fresh.forward(&fresh.embed(&ids).unwrap()).unwrap();
    let max = step.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("max |cached - recomputed| = {max:e}");
    assert!(max < 1e-5, "cached decode differs from recompute by {max}");
    assert_eq!(argmax(&step), argmax(&full));
    // A perturbed cache must change the result (the cache is really read).
    let mut broken = CachedQwen2::load(&w, &cfg, p, h, origin).unwrap();
    broken.forward(&broken.embed(&[3, 17, 40, 5, 98]).unwrap()).unwrap();
    broken.forward(&broken.embed(&ids[5..6]).unwrap()).unwrap();
    let other = broken.forward(&broken.embed(&ids[6..7]).unwrap()).unwrap();
    assert!(other.iter().zip(&full).any(|(a, b)| (a - b).abs() > 1e-4));
}

#[test]
fn image_slot_mismatch_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path());
    let io = tmp.path().join("io.safetensors");
    let mut all = Weights::open(&io).unwrap().all().unwrap();
    let ids = all["input_ids"].to_i64_vec();
    let ctx = *ids.iter().max().unwrap(); // <IMG_CONTEXT> is the last id of this vocabulary
    let pos = ids.iter().position(|&i| i == ctx).unwrap();
    let mut cut = ids.clone();
    cut.remove(pos);
    all.insert("input_ids".into(), HostTensor::new([1, cut.len()], HostData::I64(cut)).unwrap());
    std::fs::remove_file(&io).unwrap();
    write_safetensors(&io, all.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
    let (code, out) = verify(tmp.path());
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("255 image context tokens") && out.contains("256 embeddings"), "{out}");
}

#[test]
fn tokenizer_without_image_context_token_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path());
    let t = tmp.path().join("model/tokenizer.json");
    let text = std::fs::read_to_string(&t).unwrap().replace("<IMG_CONTEXT>", "<IMG_CTX_RENAMED>");
    std::fs::write(&t, text).unwrap();
    let (code, out) = verify(tmp.path());
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("tokenizer.json") && out.contains("no added token `<IMG_CONTEXT>`"), "{out}");
}
