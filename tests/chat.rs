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
use openuni::exec::Device;
use openuni_models::qwen2::Qwen2Config;
use openuni_tensor::{write_safetensors, DType, HostData, HostTensor, Weights};

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_tiny")
}

fn verify(dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("verify")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn copy_case(dir: &Path) {
    std::fs::create_dir_all(dir.join("model")).unwrap();
    for f in [
        "case.json",
        "io.safetensors",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ] {
        std::fs::copy(case().join(f), dir.join(f)).unwrap();
    }
}

fn llm_config() -> Qwen2Config {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case().join("model/config.json")).unwrap())
            .unwrap();
    serde_json::from_value(v["llm_config"].clone()).unwrap()
}

#[test]
fn committed_chat_case_passes_on_cpu() {
    let (code, out) = verify(&case());
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("prefill_logits") && out.contains("generated_ids") && !out.contains("FAIL")
    );
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
    let max = step
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!("max |cached - recomputed| = {max:e}");
    assert!(max < 1e-5, "cached decode differs from recompute by {max}");
    assert_eq!(argmax(&step), argmax(&full));
    // A perturbed cache must change the result (the cache is really read).
    let mut broken = CachedQwen2::load(&w, &cfg, p, h, origin).unwrap();
    broken
        .forward(&broken.embed(&[3, 17, 40, 5, 98]).unwrap())
        .unwrap();
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
    all.insert(
        "input_ids".into(),
        HostTensor::new([1, cut.len()], HostData::I64(cut)).unwrap(),
    );
    std::fs::remove_file(&io).unwrap();
    write_safetensors(&io, all.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
    let (code, out) = verify(tmp.path());
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("255 image context tokens") && out.contains("256 embeddings"),
        "{out}"
    );
}

#[test]
fn tokenizer_without_image_context_token_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path());
    let t = tmp.path().join("model/tokenizer.json");
    let text = std::fs::read_to_string(&t)
        .unwrap()
        .replace("<IMG_CONTEXT>", "<IMG_CTX_RENAMED>");
    std::fs::write(&t, text).unwrap();
    let (code, out) = verify(tmp.path());
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("tokenizer.json") && out.contains("no added token `<IMG_CONTEXT>`"),
        "{out}"
    );
}

fn chat(args: &[&str], cache: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("chat")
        .args(args)
        .env("OPENUNI_CACHE", cache)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The case's pixel values as a file for `--pixel-values`.
fn pixel_file(dir: &Path) -> PathBuf {
    let px = Weights::open(case().join("io.safetensors"))
        .unwrap()
        .get("pixel_values")
        .unwrap();
    let p = dir.join("px.safetensors");
    write_safetensors(&p, [("pixel_values", &px)], None).unwrap();
    p
}

#[test]
fn chat_cli_reproduces_the_reference_answer() {
    // The case was made from the prompt "What colour is the square?" with one tile through the
    // internvl2_5 template in Python: the CLI must build the same ids and decode the same answer.
    let tmp = tempfile::tempdir().unwrap();
    let px = pixel_file(tmp.path());
    let model = case().join("model");
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "What colour is the square?",
        "--pixel-values",
        px.to_str().unwrap(),
        "--max-new-tokens",
        "8",
    ];
    let (code, out, err) = chat(&args, tmp.path());
    println!("{out}{err}");
    assert_eq!(code, 0, "{err}");
    let tok = openuni_models::prompt::PromptTokenizer::from_dir(&model).unwrap();
    let want_ids: Vec<u32> = Weights::open(case().join("io.safetensors"))
        .unwrap()
        .get("generated_ids")
        .unwrap()
        .to_i64_vec()
        .iter()
        .map(|&i| i as u32)
        .collect();
    let want = tok.tokenizer().decode(&want_ids, true).unwrap();
    assert_eq!(out.trim_end_matches('\n'), want);
    assert!(err.contains("(8 tokens"), "{err}");
    // The prompt ids the CLI builds are the reference's.
    let text = openuni::chat::internvl2_5_prompt("What colour is the square?", Some(256));
    let ids: Vec<i64> = tok
        .encode_text(&text, "prompt")
        .unwrap()
        .iter()
        .map(|&i| i as i64)
        .collect();
    assert_eq!(
        ids,
        Weights::open(case().join("io.safetensors"))
            .unwrap()
            .get("input_ids")
            .unwrap()
            .to_i64_vec()
    );
}

#[test]
fn chat_cli_runs_the_tiny_model_and_says_it_is_not_meaningful() {
    let tmp = tempfile::tempdir().unwrap();
    let px = pixel_file(tmp.path());
    for args in [
        vec!["--prompt", "What is this?"],
        vec![
            "--prompt",
            "What is this?",
            "--pixel-values",
            px.to_str().unwrap(),
        ],
    ] {
        let (code, out, err) = chat(&args, tmp.path());
        println!("{out}{err}");
        assert_eq!(code, 0, "{err}");
        assert!(err.contains("not meaningful"), "{err}");
        assert!(err.contains("tokens, stopped at"), "{err}");
    }
}

#[test]
fn chat_cli_bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let px = pixel_file(tmp.path());
    // Special-token text in the question.
    let (code, _, err) = chat(&["--prompt", "hi <IMG_CONTEXT>"], tmp.path());
    assert_eq!(code, 2);
    assert!(err.contains("special token `<IMG_CONTEXT>`"), "{err}");
    // An image for a model without a vision tower; an unknown template.
    let m = tmp.path().join("case");
    copy_case(&m);
    let cfg_path = m.join("model/config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let mut no_vit = cfg.clone();
    no_vit.as_object_mut().unwrap().remove("vision_config");
    std::fs::write(&cfg_path, no_vit.to_string()).unwrap();
    let model = m.join("model");
    let (code, _, err) = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--pixel-values",
            px.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("an image was given") && err.contains("no vision tower"),
        "{err}"
    );
    // The same model answers a text-only question.
    let (code, _, err) = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--max-new-tokens",
            "3",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    let mut other = cfg.clone();
    other["template"] = serde_json::json!("chatml");
    std::fs::write(&cfg_path, other.to_string()).unwrap();
    let (code, _, err) = chat(
        &["--model", model.to_str().unwrap(), "--prompt", "x"],
        tmp.path(),
    );
    assert_eq!(code, 2);
    assert!(err.contains("template `chatml` is not supported"), "{err}");
}

#[test]
fn sampling_filters_follow_transformers() {
    use openuni::chat::Sampling;
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let kept = |s: Sampling| -> Vec<usize> {
        s.filter(&logits)
            .iter()
            .enumerate()
            .filter(|(_, x)| x.is_finite())
            .map(|(i, _)| i)
            .collect()
    };
    let s = Sampling {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    assert_eq!(kept(s), vec![0, 1, 2, 3]);
    // Ascending cumulative probabilities 0.05, 0.2, 0.5, 1.0: top_p 0.75 drops those <= 0.25,
    // top_p 0.45 those <= 0.55, and the most likely token always stays.
    assert_eq!(kept(Sampling { top_p: 0.75, ..s }), vec![0, 1]);
    assert_eq!(kept(Sampling { top_p: 0.45, ..s }), vec![0]);
    assert_eq!(kept(Sampling { top_p: 0.01, ..s }), vec![0]);
    assert_eq!(kept(Sampling { top_k: 3, ..s }), vec![0, 1, 2]);
    // Temperature divides the logits before the filters.
    let t = Sampling {
        temperature: 2.0,
        ..s
    }
    .filter(&logits);
    assert!((t[0] - logits[0] / 2.0).abs() < 1e-7);
    assert!(Sampling {
        temperature: 0.0,
        ..s
    }
    .validate()
    .is_err());
    assert!(Sampling { top_p: 1.5, ..s }.validate().is_err());
}

#[test]
fn seeded_sampling_is_reproducible_and_top_k_1_is_greedy() {
    use openuni::chat::{generate, Picker, Sampling};
    let cfg = llm_config();
    let w = Weights::open(case().join("model")).unwrap();
    let (p, h) = ("language_model.model.", "language_model.lm_head.weight");
    let run = |picker: &mut Picker| {
        let mut llm = CachedQwen2::load(&w, &cfg, p, h, "chat_tiny").unwrap();
        let e = llm.embed(&[3, 17, 40, 5]).unwrap();
        generate(&mut llm, &e, 12, None, picker, |_| {}).unwrap().1
    };
    let greedy = run(&mut Picker::Greedy);
    let s = Sampling {
        temperature: 1.5,
        top_k: 0,
        top_p: 1.0,
        seed: 7,
    };
    let a = run(&mut Picker::new(Some(s)).unwrap());
    assert_eq!(
        a,
        run(&mut Picker::new(Some(s)).unwrap()),
        "same seed, same ids"
    );
    let others: Vec<Vec<usize>> = (8..12)
        .map(|seed| run(&mut Picker::new(Some(Sampling { seed, ..s })).unwrap()))
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds never differ"
    );
    assert!(
        a != greedy || others.iter().any(|o| *o != greedy),
        "sampling at temperature 1.5 always equals greedy"
    );
    let k1 = run(&mut Picker::new(Some(Sampling { top_k: 1, ..s })).unwrap());
    assert_eq!(k1, greedy);
}

#[test]
fn multi_turn_history_is_rendered_as_internvl_does() {
    // docs/internvl3-vision.md "Chat", the internvl2_5 template: system + sep, then role + message + sep per turn, the open
    // assistant role last; the image goes with the current question.
    let h = vec![("Hi?".to_string(), "Hello.".to_string())];
    let got = openuni::chat::internvl2_5_conversation(&h, "And now?", Some(2));
    let want = format!(
        "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n\
         <|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nAnd now?<|im_end|>\n<|im_start|>assistant\n",
        openuni::chat::INTERNVL2_5_SYSTEM
    );
    assert_eq!(got, want);

    let tmp = tempfile::tempdir().unwrap();
    let hist = tmp.path().join("history.json");
    std::fs::write(&hist, r#"[["What is this?", "A square."]]"#).unwrap();
    let (code, _, err) = chat(
        &[
            "--prompt",
            "Which colour?",
            "--history",
            hist.to_str().unwrap(),
            "--max-new-tokens",
            "3",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    std::fs::write(&hist, r#"[["What is this?", "A <|im_end|> square."]]"#).unwrap();
    let (code, _, err) = chat(
        &[
            "--prompt",
            "Which colour?",
            "--history",
            hist.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("history contains the special token `<|im_end|>`"),
        "{err}"
    );
    std::fs::write(&hist, r#"{"q": 1}"#).unwrap();
    let (code, _, err) = chat(
        &[
            "--prompt",
            "Which colour?",
            "--history",
            hist.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("history.json") && err.contains("[question, answer] pairs"),
        "{err}"
    );
}

#[test]
fn chat_model_is_found_in_the_hugging_face_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let snap = tmp
        .path()
        .join("hub/models--Org--Tiny-InternVL/snapshots/abc123");
    copy_case(&tmp.path().join("c"));
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(tmp.path().join("c/model").join(f), snap.join(f)).unwrap();
    }
    std::fs::create_dir_all(tmp.path().join("hub/models--Org--Tiny-InternVL/refs")).unwrap();
    std::fs::write(
        tmp.path().join("hub/models--Org--Tiny-InternVL/refs/main"),
        "abc123",
    )
    .unwrap();
    let run = |repo: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
            .args([
                "chat",
                "--model",
                repo,
                "--prompt",
                "x",
                "--max-new-tokens",
                "2",
            ])
            .env("HF_HUB_CACHE", tmp.path().join("hub"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run("Org/Tiny-InternVL");
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("not meaningful"),
        "a real folder is not the built-in model: {err}"
    );
    let (code, err) = run("Org/Missing");
    assert_eq!(code, 2);
    assert!(
        err.contains("--model Org/Missing") && err.contains("nothing is downloaded"),
        "{err}"
    );
}

#[test]
fn different_generated_ids_fail() {
    // The reference continues past our stop, or differs in one id: both are a FAIL (exit 1).
    for edit in [0usize, 1] {
        let tmp = tempfile::tempdir().unwrap();
        copy_case(tmp.path());
        let io = tmp.path().join("io.safetensors");
        let mut all = Weights::open(&io).unwrap().all().unwrap();
        let mut ids = all["generated_ids"].to_i64_vec();
        if edit == 0 {
            ids.push(ids[0]);
        } else {
            ids[3] = (ids[3] + 1) % 10;
        }
        all.insert(
            "generated_ids".into(),
            HostTensor::new([1, ids.len()], HostData::I64(ids)).unwrap(),
        );
        std::fs::remove_file(&io).unwrap();
        write_safetensors(&io, all.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
        let (code, out) = verify(tmp.path());
        println!("{out}");
        assert_eq!(code, 1, "{out}");
        assert!(
            out.contains("generated_ids") && out.contains("FAIL"),
            "{out}"
        );
    }
}

#[test]
fn continuous_batching_gives_the_one_at_a_time_greedy_answers() {
    use openuni::chat::{generate_continuous, generate_greedy, BatchRequest};
    let cfg = llm_config();
    let w = Weights::open(case().join("model")).unwrap();
    let (p, h) = ("language_model.model.", "language_model.lm_head.weight");
    // Prompts of different lengths and budgets, so sequences leave and join mid-run.
    let prompts: Vec<(Vec<usize>, usize)> = vec![
        (vec![3, 17, 40], 9),
        (vec![5, 99, 12, 7, 8, 1], 3),
        (vec![42], 6),
        (vec![11, 12, 13, 14], 1),
        (vec![7, 7, 7, 7, 7, 7, 7, 7], 7),
    ];
    let mut alone = vec![];
    for (ids, n) in &prompts {
        let mut one = CachedQwen2::load(&w, &cfg, p, h, "chat_tiny").unwrap();
        let e = one.embed(ids).unwrap();
        alone.push(generate_greedy(&mut one, &e, *n, None, |_| {}).unwrap().1);
    }
    for max_batch in [1, 2, 5] {
        let mut llm = CachedQwen2::load_on(
            &w,
            &cfg,
            p,
            h,
            "chat_tiny",
            Device::Cpu,
            DType::F32,
            max_batch,
        )
        .unwrap();
        let table = llm.embeddings();
        let reqs = prompts.iter().enumerate().map(|(i, (ids, n))| {
            Ok(BatchRequest {
                key: i,
                prompt_embeds: table.embed(ids).unwrap(),
                max_new_tokens: *n,
            })
        });
        let mut got = vec![vec![]; prompts.len()];
        let mut order = vec![];
        generate_continuous(&mut llm, reqs, None, None, |k, ids| {
            order.push(k);
            got[k] = ids;
            Ok(())
        })
        .unwrap();
        assert_eq!(got, alone, "batch {max_batch}");
        if max_batch == 2 {
            // The short ones finish first: sequences really left and joined between steps.
            assert_ne!(order, (0..prompts.len()).collect::<Vec<_>>(), "{order:?}");
        }
    }
    // A different prompt gives a different answer (the comparison above can fail).
    let mut other = CachedQwen2::load(&w, &cfg, p, h, "chat_tiny").unwrap();
    let e = other.embed(&[3, 17, 41]).unwrap();
    assert_ne!(
        generate_greedy(&mut other, &e, 9, None, |_| {}).unwrap().1,
        alone[0]
    );
}

/// A small RGB PNG written at test time.
fn png(path: &Path, w: usize, h: usize, seed: usize) {
    let rgb: Vec<u8> = (0..w * h * 3)
        .map(|i| ((i * 37 + seed * 101) % 251) as u8)
        .collect();
    openuni::image::write_png(path, &rgb, w, h, &[]).unwrap();
}

#[test]
fn multi_image_prompt_is_the_model_cards_form() {
    let ctx = |n: usize| "<IMG_CONTEXT>".repeat(n);
    let sys = openuni::chat::INTERNVL2_5_SYSTEM;
    // Model card: question = 'Image-1: <image>\nImage-2: <image>\n' + q, each <image> replaced by
    // <img> + 256·T_i context tokens + </img> (num_patches_list = [1, 3]).
    let want = format!("<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\nImage-1: <img>{}</img>\nImage-2: <img>{}</img>\nq?<|im_end|>\n<|im_start|>assistant\n", ctx(256), ctx(768));
    assert_eq!(
        openuni::chat::internvl2_5_with_images(&[], "q?", &[256, 768]),
        want
    );
    // One image: chat()'s '<image>\n' + question.
    assert_eq!(
        openuni::chat::internvl2_5_with_images(&[], "q?", &[256]),
        openuni::chat::internvl2_5_prompt("q?", Some(256))
    );
    assert!(openuni::chat::internvl2_5_prompt("q?", Some(256))
        .contains(&format!("user\n<img>{}</img>\nq?", ctx(256))));
}

#[test]
fn chat_cli_answers_about_image_files_with_the_tiny_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a.png"), tmp.path().join("b.png"));
    png(&a, 32, 32, 1);
    png(&b, 40, 20, 2);
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    let (code, out1, err) = chat(
        &[
            "--image",
            sa,
            "--prompt",
            "What is this?",
            "--max-new-tokens",
            "4",
        ],
        tmp.path(),
    );
    println!("{out1}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("not meaningful") && err.contains("(4 tokens"),
        "{err}"
    );
    // --image is the model card's load_image: the same answer as its pixel values given directly.
    let px = openuni_models::internvl_preprocess::load_image(&a, 448, 12).unwrap();
    let pf = tmp.path().join("px.safetensors");
    write_safetensors(&pf, [("pixel_values", &px)], None).unwrap();
    let (code, out2, err) = chat(
        &[
            "--pixel-values",
            pf.to_str().unwrap(),
            "--prompt",
            "What is this?",
            "--max-new-tokens",
            "4",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out1, out2);
    // Two images (1 tile, and 2 tiles + thumbnail with --max-num 2) in one ViT batch.
    let (code, out, err) = chat(
        &[
            "--image",
            sa,
            "--image",
            sb,
            "--max-num",
            "2",
            "--prompt",
            "Compare them.",
            "--max-new-tokens",
            "3",
        ],
        tmp.path(),
    );
    println!("{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("not meaningful"), "{err}");
}

#[test]
fn chat_cli_image_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good.png");
    png(&good, 16, 16, 0);
    // Unreadable images: missing, corrupt.
    let missing = tmp.path().join("missing.png");
    let (code, _, err) = chat(
        &["--image", missing.to_str().unwrap(), "--prompt", "x"],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("missing.png") && err.contains("cannot read"),
        "{err}"
    );
    let corrupt = tmp.path().join("corrupt.png");
    std::fs::write(&corrupt, &std::fs::read(&good).unwrap()[..40]).unwrap();
    let (code, _, err) = chat(
        &["--image", corrupt.to_str().unwrap(), "--prompt", "x"],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("corrupt.png"), "{err}");
    // --image and --pixel-values together.
    let (code, _, err) = chat(
        &[
            "--image",
            good.to_str().unwrap(),
            "--pixel-values",
            good.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--pixel-values") && err.contains("--image"),
        "{err}"
    );
    // A config with a vision tower but weights without one (missing vision tower).
    let m = tmp.path().join("case");
    copy_case(&m);
    let wpath = m.join("model/model.safetensors");
    let w = Weights::open(&wpath).unwrap();
    let kept: Vec<(String, HostTensor)> = w
        .keys()
        .filter(|k| k.starts_with("language_model."))
        .map(|k| (k.to_string(), w.get(k).unwrap()))
        .collect();
    drop(w);
    write_safetensors(&wpath, kept.iter().map(|(k, t)| (k.as_str(), t)), None).unwrap();
    let model = m.join("model");
    let (code, _, err) = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--image",
            good.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("an image was given")
            && err.contains("no vision tower weights")
            && err.contains(model.to_str().unwrap()),
        "{err}"
    );
    // Text-only questions still work on it.
    let (code, _, err) = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--max-new-tokens",
            "2",
        ],
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    // An image file for a model whose config has no vision tower.
    let cfg_path = model.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("vision_config");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let (code, _, err) = chat(
        &[
            "--model",
            model.to_str().unwrap(),
            "--image",
            good.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("an image was given")
            && err.contains("no vision tower")
            && err.contains("config.json"),
        "{err}"
    );
}

fn answer_lines(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn questions_file_is_answered_in_batches_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let qdir = tmp.path().join("qs");
    std::fs::create_dir_all(qdir.join("img")).unwrap();
    png(&qdir.join("img/a.png"), 32, 32, 1);
    png(&qdir.join("img/b.png"), 24, 24, 2);
    let q = qdir.join("questions.jsonl");
    let lines = [
        r#"{"id": "q1", "question": "What is this?", "image": "img/a.png"}"#,
        r#"{"id": 2, "question": "Compare them.", "image": ["img/a.png", "img/b.png"], "answer": "A"}"#,
        r#"{"id": "q3", "question": "Say hello."}"#,
        "",
        r#"{"id": "q4", "question": "And this?", "image": "img/b.png"}"#,
    ];
    std::fs::write(&q, lines.join("\n")).unwrap();
    let ans = tmp.path().join("answers.jsonl");
    let run = |cache: &Path| {
        chat(
            &[
                "--questions",
                q.to_str().unwrap(),
                "--answers",
                ans.to_str().unwrap(),
                "--max-batch",
                "2",
                "--max-new-tokens",
                "5",
            ],
            cache,
        )
    };
    let (code, out, err) = run(tmp.path());
    println!("{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("answered 4 question(s)") && err.contains("not meaningful"),
        "{out}{err}"
    );
    let got = answer_lines(&ans);
    let mut ids: Vec<String> = got.iter().map(|v| v["id"].to_string()).collect();
    ids.sort();
    assert_eq!(ids, ["\"q1\"", "\"q3\"", "\"q4\"", "2"]);
    // Each batched answer is the one-question CLI's greedy answer.
    let single = |args: &[&str]| {
        let (code, out, err) = chat(&[args, &["--max-new-tokens", "5"]].concat(), tmp.path());
        assert_eq!(code, 0, "{err}");
        // The CLI prints the answer and one newline.
        out.strip_suffix('\n').unwrap().to_string()
    };
    let (a, b) = (qdir.join("img/a.png"), qdir.join("img/b.png"));
    let answer = |id: serde_json::Value| {
        got.iter().find(|v| v["id"] == id).unwrap()["answer"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        answer("q1".into()),
        single(&["--image", a.to_str().unwrap(), "--prompt", "What is this?"])
    );
    assert_eq!(
        answer(2.into()),
        single(&[
            "--image",
            a.to_str().unwrap(),
            "--image",
            b.to_str().unwrap(),
            "--prompt",
            "Compare them."
        ])
    );
    assert_eq!(answer("q3".into()), single(&["--prompt", "Say hello."]));
    // A re-run answers nothing new.
    let before = std::fs::read_to_string(&ans).unwrap();
    let (code, out, err) = run(tmp.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("answered 0 question(s)") && out.contains("4 already answered"),
        "{out}"
    );
    assert_eq!(std::fs::read_to_string(&ans).unwrap(), before);
    // An interrupted write (a partial last line) is cut and its question redone.
    let keep = before.trim_end_matches('\n').rfind('\n').unwrap() + 1;
    let last: serde_json::Value = serde_json::from_str(before[keep..].trim_end()).unwrap();
    std::fs::write(
        &ans,
        format!("{}{}", &before[..keep], &before[keep..keep + 10]),
    )
    .unwrap();
    let (code, out, err) = run(tmp.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("line 4 is incomplete") && out.contains("answered 1 question(s)"),
        "{out}{err}"
    );
    let again = answer_lines(&ans);
    assert_eq!(again.len(), 4);
    assert_eq!(again[3], last);
}

#[test]
fn questions_file_bad_lines_are_reported_with_line_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let q = tmp.path().join("q.jsonl");
    let lines = [
        r#"{"id": "a", "question": "fine"}"#,
        r#"{"id": "b", "question": "#,
        r#"{"id": "c"}"#,
        r#"{"id": "a", "question": "again"}"#,
        r#"{"id": [1], "question": "x", "image": 5}"#,
    ];
    std::fs::write(&q, lines.join("\n")).unwrap();
    let ans = tmp.path().join("a.jsonl");
    let (code, _, err) = chat(
        &[
            "--questions",
            q.to_str().unwrap(),
            "--answers",
            ans.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    for want in [
        "q.jsonl",
        "4 bad line(s)",
        "line 2: not JSON",
        "line 3: no `question`",
        "line 4: id \"a\" was already used on line 1",
        "line 5: `id` is [1]",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(!ans.exists(), "nothing is written for a bad questions file");
    // A missing image is named with its line.
    std::fs::write(
        &q,
        r#"{"id": "a", "question": "fine", "image": "nope.png"}"#,
    )
    .unwrap();
    let (code, _, err) = chat(
        &[
            "--questions",
            q.to_str().unwrap(),
            "--answers",
            ans.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("q.jsonl: line 1") && err.contains("nope.png"),
        "{err}"
    );
    // A complete answers line that is not an answer is an error, not skipped.
    std::fs::write(&ans, "not json\n").unwrap();
    let (code, _, err) = chat(
        &[
            "--questions",
            q.to_str().unwrap(),
            "--answers",
            ans.to_str().unwrap(),
        ],
        tmp.path(),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a.jsonl: line 1 is not an answer"), "{err}");
}
