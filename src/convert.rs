//! `openuni convert IN OUT`: a PyTorch `.pth` checkpoint (read by our own pickle reader, which runs
//! no code) or a safetensors file / sharded set, written as one safetensors file with the same
//! tensor names (a `module.` prefix on every name is dropped) and dtypes.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use openuni_tensor::{read_pth_with, write_safetensors, HostTensor, PthOptions, Weights};

/// Converts `input` to a safetensors file at `output`; returns a one-line summary.
pub fn convert(input: &Path, output: &Path) -> anyhow::Result<String> {
    if let (Ok(a), Ok(b)) = (input.canonicalize(), output.canonicalize()) {
        if a == b {
            bail!("{}: the output would overwrite the input", output.display());
        }
    }
    let ext = input
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (tensors, how) = if is_zip(input)? || matches!(ext.as_str(), "pth" | "pt" | "bin" | "ckpt")
    {
        let ck = read_pth_with(input, &PthOptions::default())?;
        let mut how = vec!["torch.save archive".to_string()];
        if !ck.wrapper.is_empty() {
            how.push(format!("tensors under `{}`", ck.wrapper.join(".")));
        }
        if let Some(p) = &ck.stripped_prefix {
            how.push(format!("`{p}` prefix dropped"));
        }
        if !ck.ignored.is_empty() {
            how.push(format!("{} non-tensor entries skipped", ck.ignored.len()));
        }
        (ck.tensors, how.join(", "))
    } else {
        let w = Weights::open(input).with_context(|| {
            format!(
                "{}: neither a torch.save archive nor safetensors",
                input.display()
            )
        })?;
        let mut v = Vec::with_capacity(w.len());
        for k in w.keys() {
            v.push((k.to_string(), w.get(k)?));
        }
        (v, "safetensors".to_string())
    };
    if tensors.is_empty() {
        bail!("{}: no tensors to write", input.display());
    }

    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "source".to_string(),
            input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
    ]);
    let refs: Vec<(&str, &HostTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // Atomic: a failed or interrupted run leaves no partial file, at the output name or beside it.
    crate::atomic::write_via_path(output, |tmp| Ok(write_safetensors(tmp, refs, Some(meta))?))?;

    let bytes: usize = tensors.iter().map(|(_, t)| t.data.as_bytes().len()).sum();
    let params: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
    let mut by_dtype: BTreeMap<String, usize> = BTreeMap::new();
    for (_, t) in &tensors {
        *by_dtype.entry(t.dtype().to_string()).or_default() += 1;
    }
    let dtypes: Vec<String> = by_dtype.iter().map(|(d, n)| format!("{d} x{n}")).collect();
    Ok(format!(
        "{} -> {}: {} tensors, {} elements, {} ({}) [{}]",
        input.display(),
        output.display(),
        tensors.len(),
        params,
        human_bytes(bytes),
        dtypes.join(", "),
        how
    ))
}

fn is_zip(path: &Path) -> anyhow::Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(n == 4 && &magic == b"PK\x03\x04")
}

fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64;
    let mut u = "B";
    for unit in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        u = unit;
    }
    format!("{v:.1} {u}")
}
