//! Embeds every `kernels/*.cu` and `kernels/include/*.cuh` of the workspace into the crate, so the
//! program compiles its kernels with NVRTC on first use without any file next to the binary.
//! A new `.cu` file is picked up without touching this crate's code.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn list(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernels = manifest
        .join("../../kernels")
        .canonicalize()
        .expect("the workspace's kernels/ folder");
    let include = kernels.join("include");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", include.display());
    let mut out = String::new();
    for (name, dir, ext) in [("SOURCES", &kernels, "cu"), ("HEADERS", &include, "cuh")] {
        writeln!(out, "pub(crate) static {name}: &[(&str, &str)] = &[").unwrap();
        for p in list(dir, ext) {
            println!("cargo:rerun-if-changed={}", p.display());
            let file = p.file_name().unwrap().to_str().expect("kernel file names are UTF-8");
            writeln!(out, "    ({file:?}, include_str!({:?})),", p.display().to_string()).unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dst = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("embedded_kernels.rs");
    std::fs::write(dst, out).unwrap();
}
