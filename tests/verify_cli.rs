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
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("verify")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
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
    assert!(
        !cases.is_empty(),
        "no {component} case under tests/fixtures"
    );
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
    assert!(
        err.contains("layers.1.self_attn.out_proj.bias") && err.contains("model"),
        "{err}"
    );
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
    assert!(
        err.contains("layers.0.mlp.fc2.bias") && err.contains("expected"),
        "{err}"
    );
}

#[test]
fn unknown_component_and_missing_case_are_errors() {
    let case = &cases_of("connector")[0];
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(case, tmp.path());
    std::fs::write(
        tmp.path().join("case.json"),
        r#"{"component": "teleporter"}"#,
    )
    .unwrap();
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
        *x = HostTensor::from_f32([d[0], 16, d[2], d[3]], vec![0.5; d[0] * 16 * d[2] * d[3]])
            .unwrap();
    });
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("hidden_states") && err.contains("expected [B, 32, h, w]"),
        "{err}"
    );
    // A mask of the wrong length.
    let case = cases_of("dit")
        .into_iter()
        .find(|c| {
            c.join("io.safetensors").exists()
                && Weights::open(c.join("io.safetensors"))
                    .unwrap()
                    .contains("encoder_attention_mask")
        })
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&case, tmp.path());
    edit_safetensors(&tmp.path().join("io.safetensors"), |io| {
        let m = io.get_mut("encoder_attention_mask").unwrap();
        *m =
            HostTensor::from_f32([m.shape.dims()[0], 3], vec![1.0; m.shape.dims()[0] * 3]).unwrap();
    });
    let (code, _, err) = verify(&[tmp.path().to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("encoder_attention_mask"), "{err}");
}

// ------------------------------------------------------------------------------------------------
// issue 18: one config reader, bounded configs and case fields, a verify that can fail
// ------------------------------------------------------------------------------------------------

/// A copy of the first `component` case, to be edited.
fn copy_of(component: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&cases_of(component)[0], tmp.path());
    tmp
}

/// Applies `edit` to the JSON file `rel` of a case copy.
fn edit_json(dir: &Path, rel: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(rel);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn assert_error(dir: &Path, want: &[&str]) -> String {
    let (code, out, err) = verify(&[dir.to_str().unwrap()]);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    for w in want {
        assert!(err.contains(w), "want `{w}` in: {err}");
    }
    assert!(!out.contains("PASS"), "{out}");
    err
}

#[test]
fn llm_case_with_internvl3_nested_config_passes() {
    // An InternVL3 folder: the Qwen2 config under `llm_config` (next to a vision config the
    // text-to-image path ignores) and the weights under `language_model.`. verify reads it through
    // the same reader as generate (before the fix: "missing field `intermediate_size`").
    let tmp = copy_of("llm");
    edit_json(tmp.path(), "model/config.json", |v| {
        let llm = v.clone();
        *v = serde_json::json!({
            "architectures": ["InternVLChatModel"],
            "model_type": "internvl_chat",
            "llm_config": llm,
            "vision_config": {"hidden_size": 32, "num_hidden_layers": 1, "model_type": "intern_vit_6b"},
            "template": "internvl2_5",
        });
    });
    edit_safetensors(&tmp.path().join("model/model.safetensors"), |w| {
        let old: Vec<String> = w.keys().cloned().collect();
        for k in old {
            let t = w.remove(&k).unwrap();
            w.insert(format!("language_model.{k}"), t);
        }
    });
    let (code, out, err) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}{err}");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("hidden_states") && out.contains("result: PASS"),
        "{out}"
    );
    // An out-of-bounds value inside the nesting is named with its path.
    edit_json(tmp.path(), "model/config.json", |v| {
        v["llm_config"]["num_hidden_layers"] = serde_json::json!(1_000_000)
    });
    assert_error(
        tmp.path(),
        &[
            "config.json",
            "llm_config",
            "num_hidden_layers",
            "1000000",
            "1024",
        ],
    );
}

#[test]
fn absurd_config_values_are_clear_errors() {
    use serde_json::json;
    // (component, config file, field, value, what the error must name)
    let cases: Vec<(&str, &str, &str, serde_json::Value, Vec<&str>)> = vec![
        (
            "llm",
            "model/config.json",
            "num_hidden_layers",
            json!(1u64 << 62),
            vec!["num_hidden_layers", "4611686018427387904", "1024"],
        ),
        (
            "llm",
            "model/config.json",
            "num_hidden_layers",
            json!(1_000_000),
            vec!["num_hidden_layers", "1000000"],
        ),
        (
            "llm",
            "model/config.json",
            "num_hidden_layers",
            json!(-1),
            vec!["num_hidden_layers", "-1"],
        ),
        (
            "llm",
            "model/config.json",
            "rms_norm_eps",
            json!(-1.0),
            vec!["rms_norm_eps", "-1"],
        ),
        (
            "llm",
            "model/config.json",
            "rms_norm_eps",
            json!(0.0),
            vec!["rms_norm_eps"],
        ),
        (
            "llm",
            "model/config.json",
            "vocab_size",
            json!(1u64 << 40),
            vec!["vocab_size", "1099511627776"],
        ),
        (
            "llm",
            "model/config.json",
            "num_attention_heads",
            json!(3),
            vec!["hidden_size", "num_attention_heads", "3"],
        ),
        (
            "dit",
            "model/config.json",
            "num_layers",
            json!(1u64 << 62),
            vec!["num_layers", "4611686018427387904"],
        ),
        (
            "dit",
            "model/config.json",
            "attention_head_dim",
            json!(0),
            vec!["attention_head_dim", "0"],
        ),
        (
            "dit",
            "model/config.json",
            "mlp_ratio",
            json!(-2.5),
            vec!["mlp_ratio", "-2.5"],
        ),
        (
            "vae",
            "model/config.json",
            "attention_head_dim",
            json!(0),
            vec!["attention_head_dim", "0"],
        ),
        (
            "vae",
            "model/config.json",
            "latent_channels",
            json!(0),
            vec!["latent_channels", "0"],
        ),
        (
            "vae",
            "model/config.json",
            "scaling_factor",
            json!(0.0),
            vec!["scaling_factor", "0"],
        ),
        (
            "vae",
            "model/config.json",
            "scaling_factor",
            json!("NaN"),
            vec!["scaling_factor"],
        ),
        (
            "connector",
            "model/config.json",
            "num_hidden_layers",
            json!(1u64 << 62),
            vec!["num_hidden_layers"],
        ),
        (
            "connector",
            "model/config.json",
            "layer_norm_eps",
            json!(-1.0),
            vec!["layer_norm_eps"],
        ),
        (
            "scheduler",
            "case.json",
            "num_steps",
            json!(1u64 << 62),
            vec!["case.json", "num_steps", "4611686018427387904", "10000"],
        ),
        (
            "scheduler",
            "case.json",
            "num_steps",
            json!(0),
            vec!["num_steps", "0"],
        ),
        (
            "scheduler",
            "case.json",
            "flow_shift",
            json!(-3.0),
            vec!["flow_shift", "-3"],
        ),
    ];
    for (component, file, field, value, want) in cases {
        let tmp = copy_of(component);
        let nan = value == json!("NaN");
        edit_json(tmp.path(), file, |v| {
            v[field] = if nan { json!(null) } else { value.clone() }
        });
        if nan {
            // Upstream writers emit a bare NaN, which is not JSON; the reader maps it to null.
            let p = tmp.path().join(file);
            let text = std::fs::read_to_string(&p)
                .unwrap()
                .replace(&format!("\"{field}\": null"), &format!("\"{field}\": NaN"));
            std::fs::write(&p, text).unwrap();
        }
        let mut want = want;
        if file != "case.json" {
            want.push("config.json");
        }
        let err = assert_error(tmp.path(), &want);
        println!("{component} {field}={value}: {err}");
    }
}

#[test]
fn absurd_vae_stage_lists_are_clear_errors() {
    use serde_json::json;
    for (field, edit, want) in [
        (
            "decoder_block_out_channels",
            json!(0),
            vec!["decoder_block_out_channels[1]", "0"],
        ),
        (
            "decoder_layers_per_block",
            json!(1_000_000),
            vec!["decoder_layers_per_block[1]", "1000000", "1024"],
        ),
    ] {
        let tmp = copy_of("vae");
        edit_json(tmp.path(), "model/config.json", |v| {
            v[field][1] = edit.clone()
        });
        assert_error(tmp.path(), &want);
    }
}

#[test]
fn non_finite_reference_is_an_error() {
    for bad in [f32::NAN, f32::INFINITY] {
        let tmp = copy_of("connector");
        edit_safetensors(&tmp.path().join("io.safetensors"), |io| {
            let t = io.get_mut("outputs").unwrap();
            let mut v = t.to_f32_vec();
            v[3] = bad;
            *t = HostTensor::from_f32(t.shape.clone(), v).unwrap();
        });
        assert_error(
            tmp.path(),
            &["io.safetensors", "`outputs`", "non-finite", "index 3"],
        );
    }
}

#[test]
fn nan_in_the_computed_output_fails() {
    let tmp = copy_of("connector");
    edit_safetensors(&tmp.path().join("model/model.safetensors"), |w| {
        let t = w.get_mut("layers.0.mlp.fc1.weight").unwrap();
        let mut v = t.to_f32_vec();
        v[0] = f32::NAN;
        *t = HostTensor::from_f32(t.shape.clone(), v).unwrap();
    });
    let (code, out, err) = verify(&[tmp.path().to_str().unwrap()]);
    println!("{out}{err}");
    assert_eq!(code, 1, "{err}");
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("outputs"))
        .unwrap();
    // The metrics carry the NaN (never dropped), and the verdict is FAIL.
    assert!(
        line.contains("NaN") && line.contains("FAIL") && line.contains("non-finite"),
        "{line}"
    );
    assert!(out.contains("result: FAIL"), "{out}");
}

#[test]
fn case_without_decisive_outputs_is_an_error() {
    // A pipeline case whose io file holds only the noise: nothing to decide a verdict on.
    let tmp = copy_of("pipeline");
    edit_safetensors(&tmp.path().join("io.safetensors"), |io| {
        io.retain(|k, _| k == "noise")
    });
    assert_error(tmp.path(), &["no decisive output"]);
}

#[test]
fn empty_io_tensor_with_huge_dims_is_an_error() {
    // [2^40, 0] is a valid zero-byte tensor; it must not drive a loop of 2^40 rows.
    let tmp = copy_of("llm");
    edit_safetensors(&tmp.path().join("io.safetensors"), |io| {
        io.insert(
            "input_ids".into(),
            HostTensor::new([1usize << 40, 0], openuni_tensor::HostData::I64(vec![])).unwrap(),
        );
    });
    assert_error(
        tmp.path(),
        &["`input_ids`", "1099511627776, 0", "no elements"],
    );
}
