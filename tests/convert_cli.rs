//! `openuni convert IN.pth OUT.safetensors` end to end against the torch-written fixtures.

use std::path::{Path, PathBuf};
use std::process::Command;

use openuni_tensor::{DType, Weights};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

fn convert(input: &Path, output: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("convert")
        .arg(input)
        .arg(output)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn convert_flat_f32_pth() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("OUT.safetensors");
    let (code, stdout, stderr) = convert(&fixture("openuni_flat_f32.pth"), &out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("8 tensors"), "{stdout}");
    let got = Weights::open(&out).unwrap();
    let exp = Weights::open(fixture("openuni_flat_f32.expected.safetensors")).unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        exp.keys().collect::<Vec<_>>()
    );
    for k in exp.keys() {
        let (g, e) = (got.get(k).unwrap(), exp.get(k).unwrap());
        assert_eq!(g.dtype(), DType::F32, "{k}");
        assert_eq!(g.shape, e.shape, "{k}");
        assert_eq!(g.data.as_bytes(), e.data.as_bytes(), "{k}");
    }
}

#[test]
fn convert_bf16_state_dict_keeps_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sd.safetensors");
    let (code, stdout, stderr) = convert(&fixture("openuni_state_dict_bf16.pth"), &out);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let got = Weights::open(&out).unwrap();
    let exp = Weights::open(fixture("openuni_state_dict_bf16.expected.safetensors")).unwrap();
    assert_eq!(got.len(), exp.len());
    for k in exp.keys() {
        let name = k.strip_prefix("module.").unwrap();
        assert_eq!(got.dtype(name).unwrap(), DType::BF16, "{name}");
        assert_eq!(
            got.get(name).unwrap().to_f32_vec(),
            exp.get(k).unwrap().to_f32_vec(),
            "{name}"
        );
    }
}

#[test]
fn convert_refuses_hostile_pickle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("h.safetensors");
    let (code, _, stderr) = convert(&fixture("hostile.pth"), &out);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("os.system") && stderr.contains("hostile.pth"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// Loader regressions of issue 18: torch-written files (tools/make_references.py) that must give a
/// clear error naming the file and the tensor, exit 2, and leave no output behind.
fn assert_refused(fixture_name: &str, want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let (code, _, stderr) = convert(&fixture(fixture_name), &out);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(fixture_name), "{stderr}");
    for w in want {
        assert!(stderr.contains(w), "want `{w}` in: {stderr}");
    }
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "something was left behind"
    );
}

#[test]
fn convert_refuses_amplifying_stride0_view() {
    // torch.zeros(1).expand(4096, 4096): 4 bytes of storage, 64 MiB if materialised.
    assert_refused(
        "amplified.pth",
        &[
            "`amplified`",
            "16777216 elements",
            "storage of only 1",
            "would amplify",
        ],
    );
}

#[test]
fn convert_refuses_tensor_named_metadata() {
    // safetensors reserves `__metadata__`: the converted file could not be read back.
    assert_refused("metadata_key.pth", &["`__metadata__`", "reserved"]);
}
