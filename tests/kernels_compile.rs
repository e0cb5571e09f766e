//! Compiles every kernels/*.cu with NVRTC for sm_90a (CUBIN, `--ptxas-options=-v`) and prints
//! one line per kernel: registers, spill stores/loads, static shared memory and SASS instructions
//! (the code size, from the CUBIN's sections). Any compile error
//! fails. Without NVRTC: fails when $CI is set (CI must run `tools/setup_cuda.sh`), else prints
//! `skipped: NVRTC not found`.
//! `OPENUNI_DUMP_CUBIN=DIR` also writes each CUBIN there (`nvdisasm -c` reads its SASS).
//!
//! Also checks that the sources embedded in openuni-cuda are the ones on disk, that the source
//! scan finds exactly the kernels ptxas compiled, and that the prebuilt images of build.rs (when
//! nvcc was present) were built from these sources.

use std::path::Path;

use openuni_cuda::nvrtc::{self, CompileOptions};
use openuni_cuda::{
    kernel_headers, kernel_sources, source_fingerprint, KernelFormat, KernelTarget,
};

mod prebuilt {
    include!(concat!(env!("OUT_DIR"), "/prebuilt_kernels.rs"));
}

fn on_disk(dir: &Path, ext: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == ext))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn nvrtc_or_skip() -> bool {
    if nvrtc::nvrtc_available() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("NVRTC not found and CI is set: install it with `eval \"$(bash tools/setup_cuda.sh)\"` before running the tests");
    }
    println!("skipped: NVRTC not found");
    false
}

#[test]
fn embedded_kernels_are_the_ones_on_disk() {
    // The working directory is the repository root under cargo and under tools/gpu_run.sh (where
    // the build machine's CARGO_MANIFEST_DIR does not exist).
    let root = [
        std::env::current_dir().unwrap().join("kernels"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels"),
    ]
    .into_iter()
    .find(|p| p.is_dir())
    .expect("the kernels/ folder (run from the repository root)");
    let embedded = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        embedded(kernel_sources()),
        on_disk(&root, "cu"),
        "kernels/*.cu changed since openuni-cuda was built"
    );
    assert_eq!(
        embedded(kernel_headers()),
        on_disk(&root.join("include"), "cuh"),
        "kernels/include/*.cuh changed since openuni-cuda was built"
    );
}

/// Bytes of SASS of each kernel of a CUBIN: the size of its `.text.<kernel>` section (an sm_90
/// instruction is 16 bytes).
fn code_bytes(cubin: &[u8]) -> std::collections::HashMap<String, u64> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(cubin).expect("NVRTC's CUBIN is an ELF file");
    file.sections()
        .filter_map(|s| Some((s.name().ok()?.strip_prefix(".text.")?.to_string(), s.size())))
        .collect()
}

/// The most SASS instructions a kernel may have where code size decides speed. The sm_90a convs
/// run their epilogue once per tile from a cold instruction cache with one CTA per SM: an epilogue
/// unrolled over the accumulators (12,128 instructions in all) made "no instruction" their top stall
/// (docs/gpu-results.md run 6); staged through shared memory they are about 1,000.
fn code_budget(kernel: &str) -> Option<u64> {
    [
        "conv2d_bf16_wgmma",
        "upsample_conv2d_bf16_wgmma",
        "mixffn_inverted_glu_bf16_wgmma",
    ]
    .contains(&kernel)
    .then_some(2048)
}

/// 32-bit registers of an sm_90 SM (and the most one block may use).
const REGISTERS_PER_SM: usize = 65536;

/// The largest block a kernel's launcher may use, for the kernels launched with more than 256
/// threads (up to 256, any register count ptxas allows fits). A block whose registers do not fit
/// fails to launch on hardware, which the emulated GPU cannot show (docs/gpu-results.md run 4).
fn largest_block(kernel: &str) -> Option<usize> {
    let norm = [
        "rmsnorm_f32",
        "rmsnorm_bf16",
        "rmsnorm_residual_",
        "layernorm_",
        "ada_layernorm_",
        "pixel_shuffle_layernorm_",
    ];
    norm.iter()
        .any(|p| kernel.starts_with(p))
        .then_some(openuni_cuda::families::norm::NORM_MAX_THREADS)
}

/// Registers per thread a kernel that moves registers between warpgroups (`setmaxnreg`) must be
/// given at launch: its launch bound's whole share of the register file, in units of 8 (168 for one
/// block of 384 threads per SM). Its warpgroups' `setmaxnreg.dec`/`.inc` values are balanced
/// against that share (sm90.cuh's `WarpSpecializedRegs`: 40 and 232): with fewer
/// registers the consumers' inc would ask for more than the producer freed and, on hardware, wait
/// forever. The emulated GPU does not model the register file.
fn setmaxnreg_share(kernel: &str) -> Option<usize> {
    let one_block_per_sm = |threads: usize| REGISTERS_PER_SM / threads / 8 * 8;
    if kernel.starts_with("attention_bf16_wgmma_hd") {
        Some(one_block_per_sm(384))
    } else if ["conv2d_bf16_wgmma", "upsample_conv2d_bf16_wgmma"].contains(&kernel) {
        Some(one_block_per_sm(
            openuni_cuda::families::conv_sm90::geometry::C90_THREADS,
        ))
    } else if kernel == "mixffn_inverted_glu_bf16_wgmma" {
        Some(one_block_per_sm(
            openuni_cuda::families::mixffn_inverted_glu::MF90_THREADS,
        ))
    } else {
        None
    }
}

#[test]
fn every_kernel_compiles_for_sm_90a() {
    if !nvrtc_or_skip() {
        return;
    }
    let (maj, min) = nvrtc::nvrtc_version().unwrap();
    println!(
        "NVRTC {maj}.{min}; CUDA headers: {:?}",
        nvrtc::cuda_include_dirs()
    );
    let mut opts = CompileOptions::new(KernelTarget::new("sm_90a", KernelFormat::Cubin));
    opts.use_cache = false;
    let mut failures = vec![];
    let mut total = 0;
    for (file, src) in kernel_sources() {
        match nvrtc::compile(file, src, kernel_headers(), &opts) {
            Ok(m) => {
                println!("{file}: {} bytes of sm_90a CUBIN", m.image.len());
                let code = code_bytes(&m.image);
                // OPENUNI_DUMP_CUBIN=DIR keeps the CUBINs, to read their SASS with nvdisasm.
                if let Some(dir) = std::env::var_os("OPENUNI_DUMP_CUBIN") {
                    let path =
                        std::path::Path::new(&dir).join(file.replace(".cu", ".sm_90a.cubin"));
                    std::fs::write(&path, &m.image)
                        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
                }
                for k in &m.resources {
                    let Some(&bytes) = code.get(&k.name) else {
                        failures.push(format!(
                            "{file}: no .text section for kernel {} in the CUBIN",
                            k.name
                        ));
                        continue;
                    };
                    println!("{k}, {} SASS instructions", bytes / 16);
                    if let Some(budget) = code_budget(&k.name) {
                        if bytes / 16 > budget {
                            failures.push(format!(
                                "{}: {} SASS instructions, more than its budget of {budget} (see code_budget: code that runs \
                                 once per tile from a cold instruction cache)",
                                k.name,
                                bytes / 16
                            ));
                        }
                    }
                    if k.spill_stores > 0 || k.spill_loads > 0 {
                        println!("  warning: {} spills registers", k.name);
                    }
                    if let Some(share) = setmaxnreg_share(&k.name) {
                        if k.registers as usize != share {
                            failures.push(format!(
                                "{}: {} registers, but its setmaxnreg balance assumes {share} a thread (see setmaxnreg_share): \
                                 on hardware the consumers' setmaxnreg.inc would never return",
                                k.name, k.registers
                            ));
                        }
                    }
                    if let Some(threads) = largest_block(&k.name) {
                        if k.registers as usize * threads > REGISTERS_PER_SM {
                            failures.push(format!(
                                "{}: {} registers x {threads} threads (its launcher's largest block) exceed the {REGISTERS_PER_SM} \
                                 registers of an SM: such a launch fails on hardware (not on the emulated GPU)",
                                k.name, k.registers
                            ));
                        }
                    }
                }
                // C7519: ptxas had to insert warpgroup.arrive (wgmma registers it could not prove
                // fenced), which serialises the wgmma pipeline: production kernels must not need it.
                let injected = m.log.lines().filter(|l| l.contains("C7519")).count();
                if injected > 0 {
                    failures.push(format!(
                        "{file}: ptxas inserted {injected} warpgroup.arrive (C7519)"
                    ));
                }
                if file.ends_with("_sm90.cu") {
                    println!("{file}: {injected} warpgroup.arrive injected by ptxas (C7519)");
                }
                // C7512: wgmma serialized for lack of registers: the tensor cores wait on every
                // wgmma (attention built for two blocks per SM, at 80 registers, got it).
                for l in m.log.lines().filter(|l| l.contains("C7512")) {
                    failures.push(format!("{file}: {l}"));
                }
                total += m.resources.len();
                let mut compiled: Vec<&str> = m.resources.iter().map(|k| k.name.as_str()).collect();
                compiled.sort();
                let mut scanned = nvrtc::entry_points(src);
                scanned.sort();
                if compiled != scanned {
                    failures.push(format!(
                        "{file}: ptxas compiled kernels {compiled:?} but the source scan finds {scanned:?} (write each entry point \
                         as `extern \"C\" __global__ void name(` on one line, no macros)"
                    ));
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
    }
    // Dynamic shared memory is a launch parameter, not in the ptxas report.
    println!(
        "conv_sm90.cu: conv2d_bf16_wgmma / upsample_conv2d_bf16_wgmma use {} bytes of dynamic shared memory, {} threads",
        openuni_cuda::families::conv_sm90::geometry::C90_SMEM,
        openuni_cuda::families::conv_sm90::geometry::C90_THREADS
    );
    println!(
        "mixffn_inverted_glu.cu: mixffn_inverted_glu_bf16_wgmma uses {} bytes of dynamic shared memory, {} threads; mixffn_inverted_glu_bf16 {} bytes, 256 threads",
        openuni_cuda::families::mixffn_inverted_glu::MF90_SMEM,
        openuni_cuda::families::mixffn_inverted_glu::MF90_THREADS,
        openuni_cuda::families::mixffn_inverted_glu::MF_SMEM
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(total > 0, "no kernels compiled");
}

/// PTX is what the emulated GPU loads; NVRTC newer than 13.0 emits a PTX version that the R580
/// driver rejects, so the PTX must say `.version 9.0` or older.
#[test]
fn every_kernel_compiles_to_ptx_the_r580_driver_accepts() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut opts = CompileOptions::new(KernelTarget::new("sm_90a", KernelFormat::Ptx));
    opts.use_cache = false;
    for (file, src) in kernel_sources() {
        let m =
            nvrtc::compile(file, src, kernel_headers(), &opts).unwrap_or_else(|e| panic!("{e}"));
        let ptx = String::from_utf8(m.image).unwrap();
        let version = ptx
            .lines()
            .find_map(|l| l.trim().strip_prefix(".version "))
            .unwrap_or("?")
            .trim()
            .to_string();
        let (a, b) = version
            .split_once('.')
            .map(|(a, b)| {
                (
                    a.parse::<u32>().unwrap_or(99),
                    b.parse::<u32>().unwrap_or(99),
                )
            })
            .unwrap_or((99, 99));
        println!(
            "{file}: PTX .version {version}, {} entries",
            nvrtc::ptx_entries(&ptx).len()
        );
        assert!(
            (a, b) <= (9, 0),
            "{file}: PTX .version {version} is newer than 9.0: pin NVRTC to 13.0.x (tools/setup_cuda.sh)"
        );
    }
}

#[test]
fn prebuilt_kernels_match_the_sources() {
    let table = prebuilt::PREBUILT_KERNELS;
    if table.is_empty() {
        println!(
            "prebuilt kernels: none (nvcc was not found, or failed, at build time; NVRTC compiles them at run time)"
        );
        return;
    }
    for p in table {
        let src = kernel_sources()
            .iter()
            .find(|(f, _)| *f == p.file)
            .map(|(_, s)| *s);
        let src = src.unwrap_or_else(|| panic!("prebuilt {} has no source", p.file));
        assert_eq!(
            p.fingerprint,
            source_fingerprint(src, kernel_headers()),
            "prebuilt {} ({}) is stale",
            p.file,
            p.target
        );
        assert!(!p.image.is_empty());
        println!("prebuilt {} {}: {} bytes", p.file, p.target, p.image.len());
    }
    for (file, _) in kernel_sources() {
        for t in ["sm_90a.cubin", "compute_90a.ptx"] {
            assert!(
                table.iter().any(|p| p.file == *file && p.target == t),
                "no prebuilt {t} for {file}"
            );
        }
    }
}

/// With a device and a prebuilt table, modules come from the table (as `openuni` registers it),
/// not from NVRTC, whenever the device's target is one of the prebuilt ones.
#[test]
fn prebuilt_kernels_are_loaded_when_they_match_the_device() {
    let table = prebuilt::PREBUILT_KERNELS;
    if table.is_empty() {
        println!("prebuilt kernels: none (nvcc was not found, or failed, at build time)");
        return;
    }
    let Some(dev) = openuni_cuda::testing::device_or_skip() else {
        return;
    };
    openuni_cuda::KernelSet::set_prebuilt(table);
    let want = dev.kernels().target().image_name();
    dev.kernels().load_all().unwrap();
    let origins = dev.kernels().origins();
    println!("device target {want}: {origins:?}");
    if table.iter().any(|p| p.target == want) {
        assert!(origins.iter().all(|(_, o)| *o == "prebuilt"), "{origins:?}");
    }
}

/// Hazards only real hardware shows, pinned in the PTX: the linear attention's cross-CTA reduction
/// hands the partial states over with an acquire-release atomic (kernels/include/atomics.cuh), not a
/// relaxed atomicAdd between __threadfence()s.
#[test]
fn cross_cta_hand_offs_use_acquire_release_atomics() {
    if !nvrtc_or_skip() {
        return;
    }
    let mut opts = CompileOptions::new(KernelTarget::new("sm_90a", KernelFormat::Ptx));
    opts.use_cache = false;
    let (file, src) = kernel_sources()
        .iter()
        .find(|(f, _)| *f == "linear_attention.cu")
        .expect("linear_attention.cu");
    let m = nvrtc::compile(file, src, kernel_headers(), &opts).unwrap_or_else(|e| panic!("{e}"));
    let ptx = String::from_utf8(m.image).unwrap();
    let count = |pat: &str| ptx.lines().filter(|l| l.contains(pat)).count();
    let (acq_rel, relaxed, fences) = (
        count("atom.acq_rel.gpu.global.add.u32"),
        count("atom.global.add.u32"),
        count("membar.gl") + count("fence.sc.gpu"),
    );
    println!("{file}: {acq_rel} atom.acq_rel.gpu adds, {relaxed} relaxed atom.global.add, {fences} membar.gl / fence.sc.gpu");
    assert!(acq_rel > 0, "{file}: no acquire-release atomic in the PTX");
    assert_eq!(
        relaxed + fences,
        0,
        "{file}: a relaxed atomic or a bare fence is left in the cross-CTA reduction"
    );
}
