//! `openuni verify` end to end: committed cases pass, a perturbed weight fails, bad cases give
//! clear errors (exit 2) naming what is wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use openuni_tensor::{write_safetensors, HostTensor, Weights};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every committed case of a component, so a new fixture is picked up without editing tests.
fn cases_of(component: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            std::fs::read_to_string(p.join("case.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|j| j["component"] == component)
        })
        .collect();
    v.sort();
    v
}

fn verify(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni")).arg("verify").args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Rewrites `file` with `edit` applied to its tensors.
fn edit_safetensors(file: &Path, edit: impl FnOnce(&mut HashMap<String, HostTensor>)) {
    let mut all = Weights::open(file).unwrap().all().unwrap();
    edit(&mut all);
    std::fs::remove_file(file).unwrap();
    write_safetensors(file, all.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
}

fn assert_all_pass(component: &str) {
    let cases = cases_of(component);
    assert!(!cases.is_empty(), "no {component} case under tests/fixtures");
    for c in cases {
        let (code, out, err) = verify(&[c.to_str().unwrap()]);
        println!("{out}{err}");
        assert_eq!(code, 0, "{}", c.display());
        assert!(out.contains("PASS") && !out.contains("FAIL"));
    }
}

#[test]
fn committed_connector_cases_pass_on_cpu() {
    assert_all_pass("connector");
}

#[test]
fn committed_dit_cases_pass_on_cpu() {
    assert_all_pass("dit");
}

#[test]
fn committed_llm_cases_pass_on_cpu() {
    assert_all_pass("llm");
}

#[test]
fn committed_vae_cases_pass_on_cpu() {
    assert_all_pass("vae");
}

#[test]
fn committed_pipeline_cases_pass_on_cpu() {
    assert_all_pass("pipeline");
}

#[test]
fn committed_scheduler_cases_pass() {
    // DPM-Solver++ (two step counts and shifts) and flow Euler.
    assert!(cases_of("scheduler").len() >= 3);
    assert_all_pass("scheduler");
}

#[test]
fn perturbed_weight_fails() {
    let case = &cases_of("connector")[0];
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(case, tmp.path());
    // A 1% change of one weight tensor must be visible at the f32 tolerance.
    edit_safetensors(&tmp.path().join("model/model.safetensors"), |w| {
        let t = w.get_mut("layers.0.mlp.fc1.weight").unwrap();
        let v: Vec<f32> = t.to_f32_vec().iter().map(|x| x * 1.01).collect();
        *t = HostTensor::from_f32(t.shape.clone(), v).unwrap();
    });
    let (code, out, _) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 1);
    assert!(out.contains("FAIL"));
}

#[test]
fn missing_weight_is_a_clear_error() {
    let case = &cases_of("connector")[0];
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(case, tmp.path());
    edit_safetensors(&tmp.path().join("model/model.safetensors"), |w| {
        w.remove("layers.1.self_attn.out_proj.bias");
    });
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("layers.1.self_attn.out_proj.bias") && err.contains("model"), "{err}");
}

#[test]
fn wrong_weight_shape_is_a_clear_error() {
    let case = &cases_of("connector")[0];
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(case, tmp.path());
    edit_safetensors(&tmp.path().join("model/model.safetensors"), |w| {
        let t = w.get_mut("layers.0.mlp.fc2.bias").unwrap();
        let mut v = t.to_f32_vec();
        v.push(0.0);
        *t = HostTensor::from_f32([v.len()], v).unwrap();
    });
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("layers.0.mlp.fc2.bias") && err.contains("expected"), "{err}");
}

#[test]
fn unknown_component_and_missing_case_are_errors() {
    let case = &cases_of("connector")[0];
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(case, tmp.path());
    std::fs::write(tmp.path().join("case.json"), r#"{"component": "teleporter"}"#).unwrap();
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("unknown component `teleporter`"), "{err}");

    let (code, _, err) = verify(&["/nonexistent/case"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/case"), "{err}");
}

#[test]
fn bad_flags_are_errors() {
    let case = cases_of("connector")[0].to_str().unwrap().to_string();
    let (code, _, err) = verify(&[&case, "--device", "tpu"]);
    assert_eq!(code, 2);
    assert!(err.contains("--device `tpu`"), "{err}");
    let (code, _, err) = verify(&[&case, "--dtype", "bf16"]);
    assert_eq!(code, 2);
    assert!(err.contains("f32 reference only"), "{err}");
}

#[test]
fn dit_case_with_bad_inputs_is_a_clear_error() {
    let case = &cases_of("dit")[0];
    // Timestep out of range.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(case, tmp.path());
    edit_safetensors(&tmp.path().join("io.safetensors"), |io| {
        let t = io.get_mut("timestep").unwrap();
        *t = HostTensor::from_f32(t.shape.clone(), vec![1500.0; t.numel()]).unwrap();
    });
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("timestep 1500 is outside [0, 1000]"), "{err}");
    // Latent channels that do not fit the config.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(case, tmp.path());
    edit_safetensors(&tmp.path().join("io.safetensors"), |io| {
        let x = io.get_mut("hidden_states").unwrap();
        let d = x.shape.dims().to_vec();
        *x = HostTensor::from_f32([d[0], 16, d[2], d[3]], vec![0.5; d[0] * 16 * d[2] * d[3]]).unwrap();
    });
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("hidden_states") && err.contains("expected [B, 32, h, w]"), "{err}");
    // A mask of the wrong length.
    let case = cases_of("dit").into_iter().find(|c| c.join("io.safetensors").exists() && Weights::open(c.join("io.safetensors")).unwrap().contains("encoder_attention_mask")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&case, tmp.path());
    edit_safetensors(&tmp.path().join("io.safetensors"), |io| {
        let m = io.get_mut("encoder_attention_mask").unwrap();
        *m = HostTensor::from_f32([m.shape.dims()[0], 3], vec![1.0; m.shape.dims()[0] * 3]).unwrap();
    });
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("encoder_attention_mask"), "{err}");
}
