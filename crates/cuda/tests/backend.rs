//! Tests of the CUDA backend that need no GPU: ptxas report parsing, the kernel registry, launch
//! layouts, error paths without a driver, and (when NVRTC is present) PTX compilation and the
//! disk cache. Device tests live in the workspace's tests/cuda_*.rs.

use openuni_cuda::nvrtc::{self, parse_ptxas_log, CompileOptions};
use openuni_cuda::{
    file_of_kernel, kernel_headers, kernel_sources, source_fingerprint, KernelFormat, KernelTarget,
};
use openuni_tensor::DType;

const LOG: &str = "ptxas info    : 12 bytes gmem
ptxas info    : Compiling entry function 'layernorm_bf16' for 'sm_90a'
ptxas info    : Function properties for layernorm_bf16
ptxas         .     0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 63 registers, used 1 barriers, 128 bytes smem
ptxas info    : Compile time = 232.025 ms
ptxas info    : Function properties for _Z6helperv
ptxas         .     16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'add_f32' for 'sm_90a'
ptxas info    : Function properties for add_f32
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 380 bytes cmem[0]
";

#[test]
fn ptxas_report_is_parsed_per_entry() {
    let r = parse_ptxas_log(LOG);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].name, "layernorm_bf16");
    assert_eq!(
        (
            r[0].registers,
            r[0].spill_stores,
            r[0].spill_loads,
            r[0].smem,
            r[0].barriers
        ),
        (63, 8, 4, 128, 1)
    );
    assert_eq!(r[1].name, "add_f32");
    assert_eq!(
        (
            r[1].registers,
            r[1].spill_stores,
            r[1].smem,
            r[1].stack_frame
        ),
        (32, 0, 0, 0)
    );
    assert_eq!(
        r[0].to_string(),
        "kernel layernorm_bf16: 63 registers, 8 bytes spill stores, 4 bytes spill loads, 128 bytes smem"
    );
}

#[test]
fn every_kernel_is_found_in_its_file() {
    let names: Vec<&str> = kernel_sources().iter().map(|(f, _)| *f).collect();
    assert!(
        names.contains(&"norm.cu") && names.contains(&"elementwise.cu"),
        "{names:?}"
    );
    assert!(kernel_headers().iter().any(|(n, _)| *n == "common.cuh"));
    for k in [
        "rmsnorm_f32",
        "rmsnorm_bf16",
        "layernorm_f32",
        "layernorm_bf16",
    ] {
        assert_eq!(file_of_kernel(k), Some("norm.cu"), "{k}");
    }
    for op in ["silu", "gelu_tanh", "gelu_erf", "relu", "add", "gated_add"] {
        for t in ["f32", "bf16"] {
            assert_eq!(
                file_of_kernel(&format!("{op}_{t}")),
                Some("elementwise.cu"),
                "{op}_{t}"
            );
        }
    }
    assert_eq!(file_of_kernel("cast_f32_to_bf16"), Some("elementwise.cu"));
    assert_eq!(file_of_kernel("cast_bf16_to_f32"), Some("elementwise.cu"));
    assert_eq!(file_of_kernel("rmsnorm_f16"), None);
}

#[test]
fn entry_point_scan_ignores_comments_and_macros() {
    let src =
        "// extern \"C\" __global__ void in_comment(int)\nextern \"C\" __global__ void a_f32(const float* x) {}\n\
               #define K(n) extern \"C\" __global__ void n##_x(int)\nextern \"C\" __global__ void\nb_bf16 (int) {}\n\
               extern \"C\" __global__ void __launch_bounds__(256, 2) c_tc(int) {}\n";
    assert_eq!(nvrtc::entry_points(src), vec!["a_f32", "b_bf16", "c_tc"]);
    let ptx = ".version 9.0\n.visible .entry rmsnorm_f32(\n.param .u64 a\n)\n.entry other (\n";
    assert_eq!(nvrtc::ptx_entries(ptx), vec!["rmsnorm_f32", "other"]);
}

#[test]
fn targets_and_fingerprints() {
    assert_eq!(KernelTarget::arch_for((9, 0)), "sm_90a");
    assert_eq!(KernelTarget::arch_for((8, 6)), "sm_86");
    let t = KernelTarget::new("sm_90a", KernelFormat::Ptx);
    assert_eq!(t.nvrtc_arch(), "compute_90a");
    assert_eq!(t.image_name(), "compute_90a.ptx");
    assert_eq!(
        KernelTarget::new("sm_90a", KernelFormat::Cubin).image_name(),
        "sm_90a.cubin"
    );
    assert_eq!(KernelFormat::parse("PTX"), Some(KernelFormat::Ptx));
    assert_eq!(KernelFormat::parse("elf"), None);
    let h = [("common.cuh", "x")];
    assert_eq!(source_fingerprint("abc", &h), source_fingerprint("abc", &h));
    assert_ne!(source_fingerprint("abc", &h), source_fingerprint("abd", &h));
    assert_ne!(
        source_fingerprint("abc", &h),
        source_fingerprint("abc", &[("common.cuh", "y")])
    );
    // FNV-1a 64 of "a" (known value), so build.rs's copy of the function can be checked by hand.
    assert_eq!(source_fingerprint("a", &[]), 0xaf63dc4c8601ec8c);
}

#[test]
fn norm_launch_layouts_are_valid() {
    for dtype in [DType::F32, DType::BF16] {
        for cols in [
            1, 2, 3, 8, 32, 48, 96, 100, 128, 1152, 1536, 2240, 4097, 8960, 40000,
        ] {
            for rows in [1, 5, 2048] {
                let ((tx, ty, tz), (gx, _, _)) =
                    openuni_cuda::families::norm::norm_launch(rows, cols, dtype);
                assert_eq!(tz, 1);
                assert!(tx.is_power_of_two() && tx <= 32 || tx % 32 == 0, "tx {tx}");
                let max = openuni_cuda::families::norm::NORM_MAX_THREADS as u32;
                assert!(
                    tx * ty <= max && (tx * ty) % 32 == 0,
                    "block {tx}x{ty}, the kernels' launch bounds are {max}"
                );
                assert!(gx as usize * ty as usize >= rows);
            }
        }
    }
}

#[test]
fn no_driver_is_an_error_not_a_panic() {
    if openuni_cuda::driver_present() {
        println!("skipped: a CUDA driver is present");
        return;
    }
    assert!(!openuni_cuda::device_available());
    let e = openuni_cuda::CudaDevice::open(0).unwrap_err();
    assert!(e.to_string().contains("no CUDA driver"), "{e}");
}

#[test]
fn nvrtc_compiles_ptx_and_caches_it() {
    if !nvrtc::nvrtc_available() {
        println!("skipped: NVRTC not found");
        return;
    }
    let dir = std::env::temp_dir().join(format!("openuni-kcache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut o = CompileOptions::new(KernelTarget::new("sm_90a", KernelFormat::Ptx));
    o.cache_dir = Some(dir.clone());
    let (file, src) = kernel_sources()
        .iter()
        .find(|(f, _)| *f == "norm.cu")
        .unwrap();
    let a = nvrtc::compile(file, src, kernel_headers(), &o).unwrap();
    assert!(!a.from_cache);
    let ptx = String::from_utf8(a.image.clone()).unwrap();
    assert!(
        ptx.contains(".target sm_90a"),
        "{}",
        &ptx[..200.min(ptx.len())]
    );
    let mut entries = nvrtc::ptx_entries(&ptx);
    entries.sort();
    let mut scanned = nvrtc::entry_points(src);
    scanned.sort();
    assert_eq!(entries, scanned);
    let b = nvrtc::compile(file, src, kernel_headers(), &o).unwrap();
    assert!(b.from_cache);
    assert_eq!(a.image, b.image);
    // A compile error names the file and carries NVRTC's log.
    let e = nvrtc::compile(
        "bad.cu",
        "extern \"C\" __global__ void f() { undefined_thing(); }",
        &[],
        &o,
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("bad.cu") && msg.contains("undefined_thing"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
