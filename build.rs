//! Prebuilt kernels for the `openuni` program.
//!
//! When `nvcc` is found ($OPENUNI_NVCC, then PATH, then $CUDA_HOME/bin, then
//! $OPENUNI_CUDA_DIR/nvidia/cu13/bin), every `kernels/*.cu` is compiled to CUBIN for each
//! architecture in $OPENUNI_PREBUILT_ARCHS (default `sm_90a`) and to PTX for the matching virtual
//! architecture, and `$OUT_DIR/prebuilt_kernels.rs` lists them as
//! `pub static PREBUILT_KERNELS: &[openuni_cuda::PrebuiltKernel]`. Without nvcc the table is
//! empty and the program compiles its kernels with NVRTC on first use (a `cargo:warning` says so
//! only when $OPENUNI_REQUIRE_NVCC is set). A file nvcc fails on is left out with a warning; the
//! NVRTC path then reports the same error at run time, and tests/kernels_compile.rs fails on it.
//!
//! Each entry carries a fingerprint of the sources it was built from (FNV-1a 64 over the `.cu`
//! bytes, then each header sorted by name: name, NUL, bytes, NUL), computed exactly as
//! `openuni_cuda::source_fingerprint`, so a stale image is never loaded.
//!
//! Also sets `OPENUNI_GIT_COMMIT` for the benchmarks' records.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fingerprint(source: &[u8], headers: &[(String, Vec<u8>)]) -> u64 {
    fn eat(mut h: u64, bytes: &[u8]) -> u64 {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
    let mut h = eat(0xcbf2_9ce4_8422_2325, source);
    let mut hs: Vec<&(String, Vec<u8>)> = headers.iter().collect();
    hs.sort();
    for (n, c) in hs {
        h = eat(h, n.as_bytes());
        h = eat(h, &[0]);
        h = eat(h, c);
        h = eat(h, &[0]);
    }
    h
}

fn list(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file() && p.extension().is_some_and(|x| x == ext));
    v.sort();
    v
}

fn find_nvcc() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = env("OPENUNI_NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = env("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join("nvcc");
            if c.is_file() {
                return Some(c);
            }
        }
    }
    let mut dirs = vec![];
    if let Some(h) = env("CUDA_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(d) = env("OPENUNI_CUDA_DIR") {
        dirs.push(PathBuf::from(d).join("nvidia/cu13/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("nvcc"))
        .find(|c| c.is_file())
}

fn git_commit(root: &Path) -> String {
    let git = root.join(".git");
    if git.is_dir() {
        println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
            if let Some(r) = head.trim().strip_prefix("ref: ") {
                let p = git.join(r);
                if p.exists() {
                    println!("cargo:rerun-if-changed={}", p.display());
                }
            }
        }
    }
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let kernels = root.join("kernels");
    let include = kernels.join("include");
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", include.display());
    for k in [
        "OPENUNI_NVCC",
        "CUDA_HOME",
        "OPENUNI_CUDA_DIR",
        "OPENUNI_REQUIRE_NVCC",
        "OPENUNI_PREBUILT_ARCHS",
    ] {
        println!("cargo:rerun-if-env-changed={k}");
    }
    println!("cargo:rustc-env=OPENUNI_GIT_COMMIT={}", git_commit(&root));

    let sources = list(&kernels, "cu");
    let headers: Vec<(String, Vec<u8>)> = list(&include, "cuh")
        .into_iter()
        .map(|p| {
            println!("cargo:rerun-if-changed={}", p.display());
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }

    let mut table = String::from(
        "/// Kernels compiled by nvcc in build.rs (empty when nvcc was not found at build time).\n\
         pub static PREBUILT_KERNELS: &[openuni_cuda::PrebuiltKernel] = &[\n",
    );
    match find_nvcc() {
        None => {
            if std::env::var_os("OPENUNI_REQUIRE_NVCC").is_some() {
                println!("cargo:warning=nvcc not found (OPENUNI_REQUIRE_NVCC is set): no prebuilt kernels, NVRTC compiles them at run time");
            }
        }
        Some(nvcc) => {
            let archs = std::env::var("OPENUNI_PREBUILT_ARCHS").unwrap_or_else(|_| "sm_90a".into());
            let dir = out.join("kernels");
            std::fs::create_dir_all(&dir).unwrap();
            for src in &sources {
                let file = src.file_name().unwrap().to_string_lossy().into_owned();
                let stem = file.trim_end_matches(".cu").to_string();
                let fp = fingerprint(&std::fs::read(src).unwrap(), &headers);
                for arch in archs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    let virt = arch.replacen("sm_", "compute_", 1);
                    for (kind, target, flag) in
                        [("cubin", arch.to_string(), "-cubin"), ("ptx", virt, "-ptx")]
                    {
                        let name = format!("{target}.{kind}");
                        let dst = dir.join(format!("{stem}.{name}"));
                        let res = Command::new(&nvcc)
                            .arg(flag)
                            .arg(format!("--gpu-architecture={target}"))
                            .args(["-std=c++17", "--generate-line-info", "-I"])
                            .arg(&include)
                            .arg("-o")
                            .arg(&dst)
                            .arg(src)
                            .output();
                        match res {
                            Ok(o) if o.status.success() => {
                                writeln!(
                                    table,
                                    "    openuni_cuda::PrebuiltKernel {{ file: {file:?}, target: {name:?}, fingerprint: {fp:#018x}, image: include_bytes!({:?}) }},",
                                    dst.display().to_string()
                                )
                                .unwrap();
                            }
                            Ok(o) => {
                                let err = String::from_utf8_lossy(&o.stderr);
                                for l in err.lines().take(8) {
                                    println!("cargo:warning=nvcc {file} ({name}): {l}");
                                }
                            }
                            Err(e) => println!("cargo:warning=running {}: {e}", nvcc.display()),
                        }
                    }
                }
            }
        }
    }
    table.push_str("];\n");
    std::fs::write(out.join("prebuilt_kernels.rs"), table).unwrap();
}
