//! InternViT + pixel shuffle v2 + mlp1 (component `vit`, crates/models/src/internvit.rs).
//!
//! - The committed case tests/fixtures/vit_tiny (transformers' InternVL on a small random model at
//!   the real 448/14 geometry, saved in the original InternVL3 layout) passes on the CPU; the same
//!   model as transformers saves it (`native_model/`, its own names and config) passes too; so does
//!   vit_rmsnorm_qknorm (InternViT-6B's RMSNorm and q/k norm, select_layer -2, two small tiles).
//!   tests/verify_emu.rs runs the case on the emulated GPU in f32 and bf16.
//! - A perturbed layer scale fails; a model without a vision tower, ps_version v1, a position
//!   table for another grid, and pixel values of the wrong size are clear errors.
//! - The two ops the ViT added (ClassPosEmbed; GatedAdd with a [1, C] layer-scale gate) against
//!   their CPU twins through the CUDA executor, f32 and bf16, odd and vector-friendly widths.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use openuni_cpu::ops as cpu;
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::CudaExecutor;
use openuni_graph::GraphBuilder;
use openuni_tensor::{write_safetensors, DType, HostTensor, Weights};

fn case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit_tiny")
}

fn verify(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("verify")
        .args(args)
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

/// A copy of the case with `model/` taken from `model_from` (a folder of the case).
fn copy_case(dir: &Path, model_from: &str) {
    std::fs::create_dir_all(dir.join("model")).unwrap();
    for f in ["case.json", "io.safetensors"] {
        std::fs::copy(case().join(f), dir.join(f)).unwrap();
    }
    for e in std::fs::read_dir(case().join(model_from)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join("model").join(p.file_name().unwrap())).unwrap();
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("model/config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn edit_tensors(file: &Path, edit: impl FnOnce(&mut HashMap<String, HostTensor>)) {
    let mut all = Weights::open(file).unwrap().all().unwrap();
    edit(&mut all);
    std::fs::remove_file(file).unwrap();
    write_safetensors(file, all.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
}

#[test]
fn committed_vit_case_passes_on_cpu() {
    let (code, out) = verify(&[case().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("vit_embeds") && out.contains("PASS") && !out.contains("FAIL"));
    assert!(
        out.contains("mid.vision_model.encoder.layers.1"),
        "the per-layer intermediates are compared"
    );
}

#[test]
fn internvit_6b_variants_pass_on_cpu() {
    // tests/fixtures/vit_rmsnorm_qknorm: norm_type rms_norm, qk_normalization, select_layer -2,
    // two 56-px tiles (4 image tokens each).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vit_rmsnorm_qknorm");
    let (code, out) = verify(&[dir.to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("vit_embeds") && !out.contains("FAIL"));
    // select_layer -2 of 3 layers: the last layer is not built, so its intermediate is not compared.
    assert!(
        out.contains("mid.vision_model.encoder.layers.1")
            && !out.contains("mid.vision_model.encoder.layers.2")
    );
}

#[test]
fn transformers_native_layout_passes_on_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path(), "native_model");
    // transformers 5 saves the legacy names (`vision_tower.*`, `multi_modal_projector.*`).
    let keys: Vec<String> = Weights::open(tmp.path().join("model"))
        .unwrap()
        .keys()
        .map(String::from)
        .collect();
    assert!(
        keys.iter()
            .any(|k| k.starts_with("vision_tower.encoder.layer.0.attention.q_proj")),
        "native_model holds transformers' names"
    );
    let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");

    // Its in-memory names (`model.vision_tower.*`, as transformers 5's state_dict and the -hf
    // repos converted by it have them) load too.
    edit_tensors(&tmp.path().join("model/model.safetensors"), |w| {
        let moved: Vec<String> = w
            .keys()
            .filter(|k| !k.starts_with("language_model."))
            .cloned()
            .collect();
        for k in moved {
            let t = w.remove(&k).unwrap();
            w.insert(format!("model.{k}"), t);
        }
    });
    let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn perturbed_layer_scale_fails() {
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path(), "model");
    edit_tensors(&tmp.path().join("model/model.safetensors"), |w| {
        let t = w.get_mut("vision_model.encoder.layers.1.ls2").unwrap();
        *t = HostTensor::from_f32(
            t.shape.clone(),
            t.to_f32_vec().iter().map(|x| x * 1.05).collect(),
        )
        .unwrap();
    });
    let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL"));
}

#[test]
fn model_without_vision_tower_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path(), "model");
    edit_config(tmp.path(), |v| {
        v.as_object_mut().unwrap().remove("vision_config");
    });
    let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("config.json") && out.contains("no vision tower"),
        "{out}"
    );

    // The config is right but the weights have no vision tower (an LLM-only checkpoint).
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path(), "model");
    edit_tensors(&tmp.path().join("model/model.safetensors"), |w| {
        w.retain(|k, _| k.starts_with("language_model."))
    });
    let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("no vision tower"), "{out}");
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    for (field, value, expect) in [
        ("ps_version", serde_json::json!("v1"), "ps_version `v1`"),
        (
            "downsample_ratio",
            serde_json::json!(0.25),
            "downsample_ratio 0.25",
        ),
        ("select_layer", serde_json::json!(-5), "select_layer -5"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        copy_case(tmp.path(), "model");
        edit_config(tmp.path(), |v| v[field] = value);
        let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
        println!("{out}");
        assert_eq!(code, 2, "{field}: {out}");
        assert!(out.contains(expect), "{field}: {out}");
    }
    // A 336-px config: the 1025-row position table is for 448 (interpolation is not implemented).
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path(), "model");
    edit_config(tmp.path(), |v| {
        v["force_image_size"] = serde_json::json!(336)
    });
    let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("position embedding") && out.contains("[1, 577, 128]"),
        "{out}"
    );
}

#[test]
fn wrong_pixel_values_shape_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_case(tmp.path(), "model");
    edit_tensors(&tmp.path().join("io.safetensors"), |w| {
        w.insert(
            "pixel_values".into(),
            HostTensor::zeros_f32([1, 3, 224, 224]),
        );
    });
    let (code, out) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("pixel_values") && out.contains("[1, 3, 224, 224]") && out.contains("448"),
        "{out}"
    );
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

#[test]
fn class_pos_embed_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(71);
    for &(b, n, c) in &[(2, 16, 64), (3, 5, 7), (1, 1024, 128)] {
        let x = rng.normals(b * n * c, 0.0, 1.0);
        let cls = rng.normals(c, 0.0, 1.0);
        let pos = rng.normals((n + 1) * c, 0.0, 0.5);
        let mut want = vec![0.0; b * (n + 1) * c];
        cpu::class_pos_embed(&x, &cls, &pos, b, n, c, &mut want);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, c]).unwrap();
        let ci = gb.weight("cls", [c]).unwrap();
        let pi = gb.weight("pos", [n + 1, c]).unwrap();
        let y = gb.class_pos_embed("embed", xi, ci, pi).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let w = HashMap::from([
            (
                "cls".to_string(),
                HostTensor::from_f32([c], cls.clone()).unwrap(),
            ),
            (
                "pos".to_string(),
                HostTensor::from_f32([n + 1, c], pos.clone()).unwrap(),
            ),
        ]);
        for dtype in DTYPES {
            let inputs = HashMap::from([(
                "x".to_string(),
                HostTensor::from_f32([b, n, c], x.clone()).unwrap(),
            )]);
            let mut ex = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
            let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
            let mut base = vec![0.0; want.len()];
            cpu::class_pos_embed(
                &round_to(dtype, &x),
                &round_to(dtype, &cls),
                &round_to(dtype, &pos),
                b,
                n,
                c,
                &mut base,
            );
            check(
                &format!("class_pos_embed {dtype} B={b} N={n} C={c}"),
                dtype,
                &got,
                &want,
                &round_to(dtype, &base),
            );
        }
    }
}

#[test]
fn gated_add_with_layer_scale_gate_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(72);
    for &(b, n, c) in &[(3, 5, 7), (2, 9, 64)] {
        let x = rng.normals(b * n * c, 0.0, 1.0);
        let y = rng.normals(b * n * c, 0.0, 1.0);
        let ls = rng.normals(c, 0.5, 0.2);
        let mut want = vec![0.0; b * n * c];
        // One gate row for all b·n rows.
        cpu::gated_add(&x, &ls, &y, b * n, c, &mut want);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, c]).unwrap();
        let yi = gb.input("y_in", [b, n, c]).unwrap();
        let li = gb.weight("ls", [1, c]).unwrap();
        let o = gb.gated_add("residual", xi, li, yi).unwrap();
        gb.output("y", o).unwrap();
        let g = gb.finish();
        let w = HashMap::from([(
            "ls".to_string(),
            HostTensor::from_f32([1, c], ls.clone()).unwrap(),
        )]);
        // The CPU executor broadcasts the [1, C] gate the same way.
        let inputs = HashMap::from([
            (
                "x".to_string(),
                HostTensor::from_f32([b, n, c], x.clone()).unwrap(),
            ),
            (
                "y_in".to_string(),
                HostTensor::from_f32([b, n, c], y.clone()).unwrap(),
            ),
        ]);
        let mut cpu_ex = openuni_cpu::CpuExecutor::new(&g, &w, false).unwrap();
        assert_eq!(cpu_ex.run(&inputs).unwrap()["y"].to_f32_vec(), want);
        for dtype in DTYPES {
            let mut ex = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
            let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
            let mut base = vec![0.0; want.len()];
            cpu::gated_add(
                &round_to(dtype, &x),
                &round_to(dtype, &ls),
                &round_to(dtype, &y),
                b * n,
                c,
                &mut base,
            );
            check(
                &format!("gated_add [1, C] gate {dtype} B={b} N={n} C={c}"),
                dtype,
                &got,
                &want,
                &round_to(dtype, &base),
            );
        }
    }
}
