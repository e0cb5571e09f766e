//! End to end through cudarc: the emulated libcuda.so.1 is found by cudarc's dlopen (LD_LIBRARY_PATH, set
//! by re-running each test in a child process), kernels are compiled by the real NVRTC from the same source
//! the build compiled for the CPU, loaded, launched, and copied back.
mod common;
use common::*;
use cudarc::driver::{CudaContext, DriverError, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::path::Path;
use std::sync::Arc;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

fn skip() -> bool {
    if !openuni_emu::kernels_compiled() || cuda_lib_dir().is_none() {
        eprintln!(
            "skipped: the emulated GPU needs the CUDA headers and NVRTC: {}",
            openuni_emu::NO_KERNELS_MSG
        );
        return true;
    }
    false
}

fn nvrtc(path: &Path) -> Ptx {
    let src = std::fs::read_to_string(path).unwrap();
    let mut include_paths = cuda_include_dirs();
    include_paths.push(format!("{MANIFEST}/../../kernels/include"));
    let opts = CompileOptions {
        include_paths,
        arch: Some("sm_90"),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts)
        .unwrap_or_else(|e| panic!("NVRTC failed on {}: {e:?}", path.display()))
}

fn ctx() -> Arc<CudaContext> {
    assert!(
        unsafe { cudarc::driver::sys::is_culib_present() },
        "libcuda.so.1 not found on LD_LIBRARY_PATH"
    );
    CudaContext::new(0).expect("CudaContext::new on the emulated driver")
}

#[test]
fn cudarc_runs_an_nvrtc_compiled_kernel() {
    if skip() || !run_in_emulated_process("cudarc_runs_an_nvrtc_compiled_kernel", &[]) {
        return;
    }
    let ctx = ctx();
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(nvrtc(&Path::new(MANIFEST).join("tests/kernels/basic.cu")))
        .unwrap();
    let saxpy = module.load_function("emu_test_saxpy").unwrap();
    let n = 1000usize;
    let xs: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let x = stream.clone_htod(&xs).unwrap();
    let mut y = stream.alloc_zeros::<f32>(n).unwrap();
    let (a, nn) = (3.0f32, n as i32);
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        stream
            .launch_builder(&saxpy)
            .arg(&mut y)
            .arg(&x)
            .arg(&a)
            .arg(&nn)
            .launch(cfg)
    }
    .unwrap();
    let ys = stream.clone_dtoh(&y).unwrap();
    assert!(ys.iter().enumerate().all(|(i, &v)| v == 3.0 * i as f32));

    // __constant__ memory through cuModuleGetGlobal.
    let mut sym = module.get_global("emu_test_coeffs", &stream).unwrap();
    let coeffs = [1f32, 2.0, 3.0, 4.0];
    let bytes: Vec<u8> = coeffs.iter().flat_map(|v| v.to_le_bytes()).collect();
    stream.memcpy_htod(&bytes, &mut sym).unwrap();
    let cst = module.load_function("emu_test_constant").unwrap();
    let mut out = stream.alloc_zeros::<f32>(8).unwrap();
    let cfg8 = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (8, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { stream.launch_builder(&cst).arg(&mut out).launch(cfg8) }.unwrap();
    assert_eq!(
        stream.clone_dtoh(&out).unwrap(),
        vec![2.0, 4.0, 6.0, 8.0, 2.0, 4.0, 6.0, 8.0]
    );

    // Too many threads: the real error code.
    let bad = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (2048, 1, 1),
        shared_mem_bytes: 0,
    };
    let e = unsafe {
        stream
            .launch_builder(&saxpy)
            .arg(&mut y)
            .arg(&x)
            .arg(&a)
            .arg(&nn)
            .launch(bad)
    }
    .unwrap_err();
    assert_eq!(
        e,
        DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE)
    );

    // Events with timing.
    let t0 = stream
        .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    unsafe {
        stream
            .launch_builder(&saxpy)
            .arg(&mut y)
            .arg(&x)
            .arg(&a)
            .arg(&nn)
            .launch(cfg)
    }
    .unwrap();
    let t1 = stream
        .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    let ms = t0.elapsed_ms(&t1).unwrap();
    println!("saxpy of {n} on the emulated GPU: {ms:.3} ms");
    assert!(ms >= 0.0);
    let (free, total) = ctx.mem_get_info().unwrap();
    assert!(free < total);
}

#[test]
fn cudarc_graph_capture_and_replay() {
    if skip() || !run_in_emulated_process("cudarc_graph_capture_and_replay", &[]) {
        return;
    }
    let ctx = ctx();
    let stream = ctx.new_stream().unwrap();
    let module = ctx
        .load_module(nvrtc(&Path::new(MANIFEST).join("tests/kernels/basic.cu")))
        .unwrap();
    let saxpy = module.load_function("emu_test_saxpy").unwrap();
    let n = 512usize;
    let x = stream.clone_htod(&vec![1f32; n]).unwrap();
    let mut y = stream.alloc_zeros::<f32>(n).unwrap();
    let (a, nn) = (0.5f32, n as i32);
    let cfg = LaunchConfig {
        grid_dim: (2, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    stream
        .begin_capture(
            cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        )
        .unwrap();
    unsafe {
        stream
            .launch_builder(&saxpy)
            .arg(&mut y)
            .arg(&x)
            .arg(&a)
            .arg(&nn)
            .launch(cfg)
    }
    .unwrap();
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).unwrap().expect("a graph");
    assert!(
        stream.clone_dtoh(&y).unwrap().iter().all(|&v| v == 0.0),
        "capture does not run the kernel"
    );
    graph.upload().unwrap();
    for i in 1..=3 {
        graph.launch().unwrap();
        let ys = stream.clone_dtoh(&y).unwrap();
        assert!(
            ys.iter().all(|&v| v == 0.5 * i as f32),
            "replay {i}: {}",
            ys[0]
        );
    }
}

#[test]
fn cudarc_loads_every_engine_kernel() {
    if skip() || !run_in_emulated_process("cudarc_loads_every_engine_kernel", &[]) {
        return;
    }
    // Every kernels/*.cu, compiled by NVRTC: its entry points and parameter sizes must match the CPU build.
    let ctx = ctx();
    let dir = Path::new(MANIFEST).join("../../kernels");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().map(|x| x == "cu").unwrap_or(false) {
            let module = ctx.load_module(nvrtc(&p)).unwrap_or_else(|e| {
                panic!(
                    "{}: {e:?} ({})",
                    p.display(),
                    openuni_emu::driver::last_error_message()
                )
            });
            drop(module);
            n += 1;
        }
    }
    println!("{n} kernel files load on the emulated GPU");
}

#[test]
fn cudarc_cubin_images_load_by_name() {
    if skip() || !run_in_emulated_process("cudarc_cubin_images_load_by_name", &[]) {
        return;
    }
    use cudarc::nvrtc::result as nr;
    let src = std::fs::read_to_string(Path::new(MANIFEST).join("tests/kernels/basic.cu")).unwrap();
    let prog = nr::create_program(&std::ffi::CString::new(src).unwrap(), None).unwrap();
    let mut opts: Vec<String> = cuda_include_dirs()
        .iter()
        .map(|d| format!("--include-path={d}"))
        .collect();
    opts.push("--gpu-architecture=sm_90".into());
    let cubin = unsafe {
        nr::compile_program(prog, &opts).unwrap();
        let mut n = 0usize;
        cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut n)
            .result()
            .unwrap();
        let mut buf = vec![0u8; n];
        cudarc::nvrtc::sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
            .result()
            .unwrap();
        nr::destroy_program(prog).unwrap();
        buf
    };
    let ctx = ctx();
    let stream = ctx.default_stream();
    let module = ctx.load_module(Ptx::from_binary(cubin)).unwrap();
    let f = module.load_function("emu_test_saxpy").unwrap();
    let x = stream.clone_htod(&[1f32, 2.0, 3.0]).unwrap();
    let mut y = stream.clone_htod(&[1f32, 1.0, 1.0]).unwrap();
    let (a, n) = (2f32, 3i32);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&mut y)
            .arg(&x)
            .arg(&a)
            .arg(&n)
            .launch(cfg)
    }
    .unwrap();
    assert_eq!(stream.clone_dtoh(&y).unwrap(), vec![3.0, 5.0, 7.0]);
}

#[test]
fn cudarc_out_of_memory_beyond_the_cap() {
    if skip()
        || !run_in_emulated_process(
            "cudarc_out_of_memory_beyond_the_cap",
            &[("OPENUNI_EMU_MEMORY", "64MiB")],
        )
    {
        return;
    }
    let ctx = ctx();
    let stream = ctx.default_stream();
    let (free, total) = ctx.mem_get_info().unwrap();
    assert_eq!(total, 64 << 20);
    assert!(free <= total);
    let a = stream.alloc_zeros::<u8>(40 << 20).unwrap();
    let e = stream.alloc_zeros::<u8>(40 << 20).unwrap_err();
    assert_eq!(
        e,
        DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)
    );
    drop(a);
    let _b = stream
        .alloc_zeros::<u8>(40 << 20)
        .expect("memory is given back on free");
}

#[test]
fn cudarc_sees_an_out_of_bounds_write_as_illegal_address() {
    if skip()
        || !run_in_emulated_process("cudarc_sees_an_out_of_bounds_write_as_illegal_address", &[])
    {
        return;
    }
    let ctx = ctx();
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(nvrtc(&Path::new(MANIFEST).join("tests/kernels/broken.cu")))
        .unwrap();
    let f = module.load_function("emu_test_oob_write").unwrap();
    let mut y = stream.alloc_zeros::<f32>(1000).unwrap();
    let n = 1000i32;
    let cfg = LaunchConfig {
        grid_dim: (4, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let e = unsafe { stream.launch_builder(&f).arg(&mut y).arg(&n).launch(cfg) }.unwrap_err();
    assert_eq!(
        e,
        DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS)
    );
    println!("out-of-bounds write reported as {e:?}");
    std::mem::forget(y); // the context is broken now (sticky error), as on a GPU
    std::mem::forget(stream);
    std::mem::forget(ctx);
}

#[test]
fn cudarc_nvrtc_compiles_the_tensor_core_helpers() {
    if skip() || !run_in_emulated_process("cudarc_nvrtc_compiles_the_tensor_core_helpers", &[]) {
        return;
    }
    // NVRTC (ptxas included, via a CUBIN) accepts the inline PTX of mma.cuh; the PTX runs on the CPU twin.
    use cudarc::nvrtc::result as nr;
    let path = Path::new(MANIFEST).join("tests/kernels/mma.cu");
    let src = std::fs::read_to_string(&path).unwrap();
    let prog = nr::create_program(&std::ffi::CString::new(src).unwrap(), None).unwrap();
    let mut opts: Vec<String> = cuda_include_dirs()
        .iter()
        .map(|d| format!("--include-path={d}"))
        .collect();
    opts.push(format!("--include-path={MANIFEST}/../../kernels/include"));
    opts.push("--gpu-architecture=sm_90".into());
    unsafe {
        if let Err(e) = nr::compile_program(prog, &opts) {
            let log = nr::get_program_log(prog).unwrap();
            panic!(
                "{e:?}: {}",
                String::from_utf8_lossy(&log.iter().map(|&c| c as u8).collect::<Vec<u8>>())
            );
        }
        nr::destroy_program(prog).unwrap();
    }
    let ctx = ctx();
    let stream = ctx.default_stream();
    let module = ctx.load_module(nvrtc(&path)).unwrap();
    let f = module.load_function("emu_test_mma_gemm").unwrap();
    let k = 32usize;
    let a: Vec<half::bf16> = (0..16 * k)
        .map(|i| half::bf16::from_f32((i % 7) as f32 - 3.0))
        .collect();
    let b: Vec<half::bf16> = (0..k * 8)
        .map(|i| half::bf16::from_f32((i % 5) as f32 - 2.0))
        .collect();
    let bt: Vec<half::bf16> = (0..8 * k).map(|i| b[(i % k) * 8 + i / k]).collect();
    let (da, db, dbt) = (
        stream.clone_htod(&a).unwrap(),
        stream.clone_htod(&b).unwrap(),
        stream.clone_htod(&bt).unwrap(),
    );
    let (mut d, mut d2) = (
        stream.alloc_zeros::<f32>(128).unwrap(),
        stream.alloc_zeros::<f32>(128).unwrap(),
    );
    let kk = k as i32;
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        stream
            .launch_builder(&f)
            .arg(&da)
            .arg(&db)
            .arg(&dbt)
            .arg(&mut d)
            .arg(&mut d2)
            .arg(&kk)
            .launch(cfg)
    }
    .unwrap();
    let d = stream.clone_dtoh(&d).unwrap();
    for r in 0..16 {
        for c in 0..8 {
            let want: f32 = (0..k)
                .map(|p| a[r * k + p].to_f32() * b[p * 8 + c].to_f32())
                .sum();
            assert_eq!(d[r * 8 + c], want);
        }
    }
}

mod blaslt {
    use super::*;
    use cudarc::cublaslt::{Activation, CudaBlasLT, Matmul, MatmulConfig};
    use half::bf16;

    fn tf32(x: f32) -> f32 {
        f32::from_bits((x.to_bits() + 0x1000) & 0xFFFF_E000)
    }

    struct Case {
        ta: bool,
        tb: bool,
        bias: bool,
        act: Option<Activation>,
        batch: usize,
    }

    /// D = act(alpha * op(A) op(B) + beta * C + bias), column-major, f64 reference.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        c: &Case,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        b: &[f32],
        cm: &[f32],
        bias: &[f32],
        lda: usize,
        ldb: usize,
        ldc: usize,
        sa: usize,
        sb: usize,
        sc: usize,
        alpha: f32,
        beta: f32,
    ) -> Vec<f64> {
        let mut d = cm.iter().map(|&v| v as f64).collect::<Vec<_>>();
        for bi in 0..c.batch {
            for j in 0..n {
                for i in 0..m {
                    let mut s = 0f64;
                    for p in 0..k {
                        let av = if c.ta {
                            a[bi * sa + p + i * lda]
                        } else {
                            a[bi * sa + i + p * lda]
                        };
                        let bv = if c.tb {
                            b[bi * sb + j + p * ldb]
                        } else {
                            b[bi * sb + p + j * ldb]
                        };
                        s += av as f64 * bv as f64;
                    }
                    let idx = bi * sc + i + j * ldc;
                    let mut v = alpha as f64 * s + beta as f64 * cm[idx] as f64;
                    if c.bias {
                        v += bias[bi * m + i] as f64;
                    }
                    v = match c.act {
                        Some(Activation::Relu) => v.max(0.0),
                        Some(Activation::Gelu) => {
                            0.5 * v
                                * (1.0 + (0.7978845608028654 * (v + 0.044715 * v * v * v)).tanh())
                        }
                        None => v,
                    };
                    d[idx] = v;
                }
            }
        }
        d
    }

    fn cases() -> Vec<Case> {
        let mut v = Vec::new();
        for ta in [false, true] {
            for tb in [false, true] {
                for (bias, act) in [
                    (false, None),
                    (true, None),
                    (false, Some(Activation::Relu)),
                    (true, Some(Activation::Relu)),
                    (false, Some(Activation::Gelu)),
                    (true, Some(Activation::Gelu)),
                ] {
                    for batch in [1, 3] {
                        v.push(Case {
                            ta,
                            tb,
                            bias,
                            act: act.clone(),
                            batch,
                        });
                    }
                }
            }
        }
        v
    }

    #[test]
    fn cublaslt_matmul_every_layout_and_epilogue() {
        if skip()
            || !run_in_emulated_process("blaslt::cublaslt_matmul_every_layout_and_epilogue", &[])
        {
            return;
        }
        let ctx = ctx();
        let stream = ctx.default_stream();
        let blas = CudaBlasLT::new(stream.clone()).unwrap();
        let (m, n, k) = (5usize, 7usize, 9usize);
        let (alpha, beta) = (1.5f32, 0.5f32);
        let mut checked = 0;
        for c in cases() {
            let (ar, ac) = if c.ta { (k, m) } else { (m, k) };
            let (br, bc) = if c.tb { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (ar + 2, br + 1, m + 3);
            let (sa, sb, sc) = (lda * ac + 5, ldb * bc + 3, ldc * n + 1);
            let fill = |len: usize, seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| (((i * 37 + seed * 11) % 19) as f32 - 9.0) * 0.173)
                    .collect()
            };
            let a = fill(sa * c.batch, 1);
            let b = fill(sb * c.batch, 2);
            let cm = fill(sc * c.batch, 3);
            let bias = fill(m * c.batch, 4);
            let cfg = MatmulConfig {
                transa: c.ta,
                transb: c.tb,
                transc: false,
                m: m as u64,
                n: n as u64,
                k: k as u64,
                alpha,
                lda: lda as i64,
                ldb: ldb as i64,
                beta,
                ldc: ldc as i64,
                stride_a: (c.batch > 1).then_some(sa as i64),
                stride_b: (c.batch > 1).then_some(sb as i64),
                stride_c: (c.batch > 1).then_some(sc as i64),
                stride_bias: (c.batch > 1 && c.bias).then_some(m as i64),
                batch_size: (c.batch > 1).then_some(c.batch as i32),
            };
            // f32: cudarc asks for 32F_FAST_TF32, so the inputs are rounded to TF32 as on the tensor cores.
            {
                let (da, db, dbias) = (
                    stream.clone_htod(&a).unwrap(),
                    stream.clone_htod(&b).unwrap(),
                    stream.clone_htod(&bias).unwrap(),
                );
                let mut dc = stream.clone_htod(&cm).unwrap();
                unsafe {
                    blas.matmul(
                        cfg,
                        &da,
                        &db,
                        &mut dc,
                        c.bias.then_some(&dbias),
                        c.act.as_ref(),
                    )
                }
                .unwrap();
                let got = stream.clone_dtoh(&dc).unwrap();
                let at: Vec<f32> = a.iter().map(|&x| tf32(x)).collect();
                let bt: Vec<f32> = b.iter().map(|&x| tf32(x)).collect();
                let want = reference(
                    &c, m, n, k, &at, &bt, &cm, &bias, lda, ldb, ldc, sa, sb, sc, alpha, beta,
                );
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "f32 ta={} tb={} bias={} act={:?} batch={} [{i}]: {g} vs {w}",
                        c.ta,
                        c.tb,
                        c.bias,
                        c.act.is_some(),
                        c.batch
                    );
                }
            }
            // bf16 in and out, f32 accumulation, one rounding at the end.
            {
                let to = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
                let back = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
                let (a16, b16, c16, bias16) = (to(&a), to(&b), to(&cm), to(&bias));
                let (da, db, dbias) = (
                    stream.clone_htod(&a16).unwrap(),
                    stream.clone_htod(&b16).unwrap(),
                    stream.clone_htod(&bias16).unwrap(),
                );
                let mut dc = stream.clone_htod(&c16).unwrap();
                unsafe {
                    blas.matmul(
                        cfg,
                        &da,
                        &db,
                        &mut dc,
                        c.bias.then_some(&dbias),
                        c.act.as_ref(),
                    )
                }
                .unwrap();
                let got = stream.clone_dtoh(&dc).unwrap();
                let want = reference(
                    &c,
                    m,
                    n,
                    k,
                    &back(&a16),
                    &back(&b16),
                    &back(&c16),
                    &back(&bias16),
                    lda,
                    ldb,
                    ldc,
                    sa,
                    sb,
                    sc,
                    alpha,
                    beta,
                );
                for (i, (g, &w)) in got.iter().zip(&want).enumerate() {
                    let g = g.to_f32() as f64;
                    assert!(
                        (g - w).abs() <= (w.abs() / 256.0).max(1e-6),
                        "bf16 ta={} tb={} bias={} act={:?} batch={} [{i}]: {g} vs {w}",
                        c.ta,
                        c.tb,
                        c.bias,
                        c.act.is_some(),
                        c.batch
                    );
                }
            }
            checked += 1;
        }
        println!("cuBLASLt: {checked} layout/epilogue/batch cases match the naive reference (f32 TF32 and bf16)");
    }

    #[test]
    fn cublaslt_matmul_in_a_captured_graph() {
        if skip() || !run_in_emulated_process("blaslt::cublaslt_matmul_in_a_captured_graph", &[]) {
            return;
        }
        let ctx = ctx();
        let stream = ctx.new_stream().unwrap();
        let blas = CudaBlasLT::new(stream.clone()).unwrap();
        let a = stream.clone_htod(&[1f32, 2.0, 3.0, 4.0]).unwrap(); // 2x2 column-major
        let b = stream.clone_htod(&[1f32, 0.0, 0.0, 1.0]).unwrap();
        let mut c = stream.alloc_zeros::<f32>(4).unwrap();
        let cfg = MatmulConfig {
            transa: false,
            transb: false,
            transc: false,
            m: 2,
            n: 2,
            k: 2,
            alpha: 1.0,
            lda: 2,
            ldb: 2,
            beta: 1.0,
            ldc: 2,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .unwrap();
        unsafe { blas.matmul(cfg, &a, &b, &mut c, None, None) }.unwrap();
        let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH).unwrap().unwrap();
        assert_eq!(stream.clone_dtoh(&c).unwrap(), vec![0.0; 4]);
        graph.launch().unwrap();
        graph.launch().unwrap();
        assert_eq!(
            stream.clone_dtoh(&c).unwrap(),
            vec![2.0, 4.0, 6.0, 8.0],
            "C += A*I twice"
        );
    }
}

#[test]
fn cudarc_after_a_preload_by_absolute_path() {
    // What `openuni --device emu` does: no emulator folder on LD_LIBRARY_PATH, the driver is dlopen'ed by
    // absolute path first; cudarc's dlopen("libcuda.so.1") then finds it by its soname.
    if skip() {
        return;
    }
    if std::env::var("OPENUNI_EMU_CHILD").as_deref()
        != Ok("cudarc_after_a_preload_by_absolute_path")
    {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "cudarc_after_a_preload_by_absolute_path",
            "--exact",
            "--nocapture",
        ])
        .env(
            "OPENUNI_EMU_CHILD",
            "cudarc_after_a_preload_by_absolute_path",
        )
        .env("LD_LIBRARY_PATH", cuda_lib_dir().unwrap());
        let out = cmd.output().unwrap();
        echo_child("cudarc_after_a_preload_by_absolute_path", &out);
        assert!(out.status.success());
        return;
    }
    let so = std::fs::canonicalize(emu_lib_dir().join("libcuda.so.1")).unwrap();
    let so = std::ffi::CString::new(so.display().to_string()).unwrap();
    let h = unsafe { libc_dlopen(so.as_ptr(), 0x102) }; // RTLD_NOW | RTLD_GLOBAL
    assert!(!h.is_null(), "dlopen by absolute path failed");
    let ctx = ctx();
    let stream = ctx.default_stream();
    let x = stream.clone_htod(&[1f32, 2.0]).unwrap();
    assert_eq!(stream.clone_dtoh(&x).unwrap(), vec![1.0, 2.0]);
}

extern "C" {
    #[link_name = "dlopen"]
    fn libc_dlopen(path: *const std::ffi::c_char, flags: std::ffi::c_int) -> *mut std::ffi::c_void;
}

#[test]
fn cudarc_nvrtc_compiles_the_sm90a_helpers() {
    if skip() || !run_in_emulated_process("cudarc_nvrtc_compiles_the_sm90a_helpers", &[]) {
        return;
    }
    // The inline PTX of wgmma.cuh, mbarrier.cuh, tma.cuh and sm90.cuh (every instantiation the test kernels
    // make) through NVRTC and ptxas for sm_90a (a CUBIN), then as compute_90a PTX loaded on the emulated
    // driver (entry names and parameter sizes match the CPU build) and run on the CPU twins.
    use cudarc::nvrtc::result as nr;
    let path = Path::new(MANIFEST).join("tests/kernels/hopper.cu");
    let src = std::fs::read_to_string(&path).unwrap();
    let prog = nr::create_program(&std::ffi::CString::new(src.clone()).unwrap(), None).unwrap();
    let mut opts: Vec<String> = cuda_include_dirs()
        .iter()
        .map(|d| format!("--include-path={d}"))
        .collect();
    opts.push(format!("--include-path={MANIFEST}/../../kernels/include"));
    opts.push("--gpu-architecture=sm_90a".into());
    opts.push("--std=c++17".into());
    // The ptxas report (registers, spills, shared memory per test kernel) goes to the CI log.
    opts.push("--ptxas-options=-v".into());
    unsafe {
        let compiled = nr::compile_program(prog, &opts);
        let log = nr::get_program_log(prog).unwrap();
        let log = String::from_utf8_lossy(&log.iter().map(|&c| c as u8).collect::<Vec<u8>>())
            .into_owned();
        if let Err(e) = compiled {
            panic!("{e:?}: {log}");
        }
        for line in log
            .lines()
            .filter(|l| l.contains("Compiling entry") || l.contains("Used ") || l.contains("spill"))
        {
            println!("sm_90a ptxas: {}", line.trim());
        }
        // C7519: ptxas inserted a warpgroup.arrive where registers meet a wgmma; counted, not listed.
        let injected = log.lines().filter(|l| l.contains("C7519")).count();
        println!("sm_90a ptxas: {injected} warpgroup.arrive injected by ptxas (C7519)");
        let mut n = 0usize;
        cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut n)
            .result()
            .unwrap();
        assert!(n > 0, "no CUBIN for sm_90a");
        nr::destroy_program(prog).unwrap();
    }
    let mut include_paths = cuda_include_dirs();
    include_paths.push(format!("{MANIFEST}/../../kernels/include"));
    let ptx = compile_ptx_with_opts(
        src,
        CompileOptions {
            include_paths,
            arch: Some("compute_90a"),
            options: vec!["--std=c++17".into()],
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("NVRTC compute_90a: {e:?}"));
    let ctx = ctx();
    let stream = ctx.default_stream();
    let module = ctx
        .load_module(ptx)
        .unwrap_or_else(|e| panic!("{e:?} ({})", openuni_emu::driver::last_error_message()));
    let f = module.load_function("emu_test_mbarrier_script").unwrap();
    let mut out = stream.alloc_zeros::<i32>(15).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { stream.launch_builder(&f).arg(&mut out).launch(cfg) }.unwrap();
    assert_eq!(
        stream.clone_dtoh(&out).unwrap(),
        vec![0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, -1]
    );

    // A tensor map made through cudarc's sys binding of cuTensorMapEncodeTiled (what a Rust launcher
    // calls), passed by value to a TMA kernel: a 2D f32 tensor 32 x 8, box 32 x 4 at row 6 (rows 8, 9
    // out of bounds: zero), no swizzle.
    use cudarc::driver::{sys, DevicePtr, DeviceRepr};
    #[repr(transparent)]
    struct TensorMap(sys::CUtensorMap);
    unsafe impl DeviceRepr for TensorMap {}
    let src: Vec<f32> = (0..256).map(|i| i as f32).collect();
    let g = stream.clone_htod(&src).unwrap();
    let mut map = TensorMap(sys::CUtensorMap { opaque: [0; 16] });
    let (dims, strides, boxd, es) = ([32u64, 8], [128u64], [32u32, 4], [1u32, 1]);
    {
        let (gp, _sync) = g.device_ptr(&stream);
        let r = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map.0,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                2,
                gp as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxd.as_ptr(),
                es.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_NONE,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    }
    let tma = module.load_function("emu_test_tma_load").unwrap();
    let mut bytes = stream.alloc_zeros::<u8>(512).unwrap();
    let (rank, c0, c1, c2, c3, n, variant) = (2i32, 0i32, 6i32, 0i32, 0i32, 512u32, 0i32);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 1024 + 512,
    };
    unsafe {
        stream
            .launch_builder(&tma)
            .arg(&map)
            .arg(&rank)
            .arg(&c0)
            .arg(&c1)
            .arg(&c2)
            .arg(&c3)
            .arg(&n)
            .arg(&mut bytes)
            .arg(&variant)
            .launch(cfg)
    }
    .unwrap();
    let got: Vec<f32> = stream
        .clone_dtoh(&bytes)
        .unwrap()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let want: Vec<f32> = (0..128)
        .map(|i| if i < 64 { (192 + i) as f32 } else { 0.0 })
        .collect();
    assert_eq!(got, want);
}
