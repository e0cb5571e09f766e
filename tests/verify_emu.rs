//! Every committed reference case through the CUDA backend (NVRTC kernels, cuBLASLt, the arena)
//! with `--device emu`: the emulated GPU in CI, in f32 (1e-4) and bf16 (2x PyTorch's bf16 error)
//! storage; and a perturbed weight must fail at the bf16 tolerance too. Without the emulated GPU
//! (tools/build_emu.sh not run) the tests print `skipped: no CUDA device`.

use std::path::{Path, PathBuf};
use std::process::Command;

use openuni_tensor::{write_safetensors, HostTensor, Weights};

fn cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("case.json").is_file())
            .collect();
    v.sort();
    v
}

use openuni::exec::emulator_or_skip;

fn verify(case: &Path, dtype: &str) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .args([
            "verify",
            case.to_str().unwrap(),
            "--device",
            "emu",
            "--dtype",
            dtype,
        ])
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

#[test]
fn every_case_passes_on_the_emulated_gpu_in_f32_and_bf16() {
    if !emulator_or_skip() {
        return;
    }
    for case in cases() {
        for dtype in ["f32", "bf16"] {
            let (code, out) = verify(&case, dtype);
            println!("{out}");
            assert_eq!(code, 0, "{} --dtype {dtype}", case.display());
        }
    }
}

#[test]
fn perturbed_weight_fails_on_the_emulated_gpu_in_bf16() {
    if !emulator_or_skip() {
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/connector_b2");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["case.json", "io.safetensors", "model/config.json"] {
        std::fs::create_dir_all(tmp.path().join(f).parent().unwrap()).unwrap();
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    // A 5% change of one weight tensor: larger than bf16 noise, far below a broken model.
    let mut w = Weights::open(src.join("model/model.safetensors"))
        .unwrap()
        .all()
        .unwrap();
    let t = w.get_mut("layers.0.mlp.fc1.weight").unwrap();
    *t = HostTensor::from_f32(
        t.shape.clone(),
        t.to_f32_vec().iter().map(|x| x * 1.05).collect(),
    )
    .unwrap();
    write_safetensors(
        &tmp.path().join("model/model.safetensors"),
        w.iter().map(|(k, v)| (k.as_str(), v)),
        None,
    )
    .unwrap();
    let (code, out) = verify(tmp.path(), "bf16");
    println!("{out}");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL"));
}
