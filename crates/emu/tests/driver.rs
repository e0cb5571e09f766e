//! The emulated driver API called directly (in this process): memory checks, module matching, launch
//! limits, out-of-bounds writes, graphs, events. tests/cudarc_e2e.rs goes through cudarc and NVRTC.
mod common;
use common::*;
use openuni_emu::driver::*;
use std::ffi::{c_void, CString};
use std::ptr::null_mut;
use std::sync::Mutex;

/// Driver state is per process and launch errors are sticky: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    unsafe { assert_eq!(cuInit(0), 0) };
    reset_sticky_error();
    g
}

fn need_kernels() -> bool {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return false;
    }
    true
}

/// Hand-written PTX declaring test kernels, as NVRTC would (the emulator reads the entries and params).
const PTX: &str = r#"
.version 9.0
.target sm_90
.address_size 64
.const .align 4 .b8 emu_test_coeffs[16];
.visible .entry emu_test_oob_write(
	.param .u64 emu_test_oob_write_param_0,
	.param .u32 emu_test_oob_write_param_1
)
{
	ret;
}
.visible .entry emu_test_saxpy(
	.param .u64 emu_test_saxpy_param_0,
	.param .u64 emu_test_saxpy_param_1,
	.param .f32 emu_test_saxpy_param_2,
	.param .u32 emu_test_saxpy_param_3
)
{
	.shared .align 4 .b8 _ZZ4fakeE3buf[1024];
	ret;
}
.visible .entry emu_test_dyn_reverse(
	.param .u64 emu_test_dyn_reverse_param_0,
	.param .u64 emu_test_dyn_reverse_param_1
)
{
	ret;
}
.visible .entry emu_test_partial_barrier(
	.param .u64 emu_test_partial_barrier_param_0
)
{
	ret;
}
.visible .entry emu_test_constant(
	.param .u64 emu_test_constant_param_0
)
{
	ret;
}
"#;

unsafe fn load(ptx: &str) -> Result<Handle, CUresult> {
    let src = CString::new(ptx).unwrap();
    let mut m = null_mut();
    match cuModuleLoadData(&mut m, src.as_ptr() as *const c_void) {
        0 => Ok(m),
        e => Err(e),
    }
}

unsafe fn func(m: Handle, name: &str) -> Handle {
    let mut f = null_mut();
    let n = CString::new(name).unwrap();
    assert_eq!(cuModuleGetFunction(&mut f, m, n.as_ptr()), 0, "{name}");
    f
}

unsafe fn alloc(n: usize) -> u64 {
    let mut p = 0u64;
    assert_eq!(cuMemAlloc_v2(&mut p, n), 0);
    p
}

#[test]
fn device_properties_are_an_h100s() {
    let _g = lock();
    unsafe {
        let mut v = 0;
        for (attr, want) in [
            (75, 9),
            (76, 0),
            (16, 132),
            (10, 32),
            (1, 1024),
            (97, 232448),
            (115, 1),
        ] {
            assert_eq!(cuDeviceGetAttribute(&mut v, attr, 0), 0);
            assert_eq!(v, want, "attribute {attr}");
        }
        let (mut free, mut total) = (0usize, 0usize);
        assert_eq!(cuMemGetInfo_v2(&mut free, &mut total), 0);
        assert!(free <= total && total > 0);
        let mut t2 = 0usize;
        assert_eq!(cuDeviceTotalMem_v2(&mut t2, 0), 0);
        assert_eq!(t2, total);
        let mut table = std::ptr::null();
        assert_eq!(cuGetExportTable(&mut table, std::ptr::null()), 801);
    }
}

#[test]
fn fresh_memory_is_nan_and_copies_are_bounds_checked() {
    let _g = lock();
    unsafe {
        let p = alloc(1000);
        let mut host = vec![0f32; 250];
        assert_eq!(
            cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut c_void, p, 1000),
            0
        );
        assert!(
            host.iter().all(|v| v.is_nan()),
            "fresh device memory reads as NaN"
        );
        // One byte too many, or starting outside: CUDA_ERROR_INVALID_VALUE.
        let big = vec![0u8; 1001];
        assert_eq!(cuMemcpyHtoD_v2(p, big.as_ptr() as *const c_void, 1001), 1);
        assert_eq!(
            cuMemcpyHtoD_v2(p + 4, big.as_ptr() as *const c_void, 1000),
            1
        );
        assert_eq!(
            cuMemcpyHtoD_v2(p + 4, big.as_ptr() as *const c_void, 996),
            0
        );
        assert_eq!(cuMemsetD32Async(p, 0, 251, null_mut()), 1);
        assert_eq!(cuMemsetD32Async(p, 0x3f800000, 250, null_mut()), 0);
        assert_eq!(
            cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut c_void, p, 1000),
            0
        );
        assert!(host.iter().all(|&v| v == 1.0));
        assert_eq!(
            cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut c_void, 0x1000, 4),
            1,
            "not device memory"
        );
        assert_eq!(cuMemFree_v2(p), 0);
        assert_eq!(cuMemFree_v2(p), 1, "double free");
        let mut q = 0u64;
        assert_eq!(cuMemAlloc_v2(&mut q, 0), 1, "zero-byte cuMemAlloc");
    }
}

#[test]
fn modules_are_matched_against_the_cpu_build() {
    if !need_kernels() {
        return;
    }
    let _g = lock();
    unsafe {
        let m = load(PTX).expect("the test PTX matches the CPU build");
        func(m, "emu_test_saxpy");
        let mut f = null_mut();
        let n = CString::new("emu_test_nope").unwrap();
        assert_eq!(cuModuleGetFunction(&mut f, m, n.as_ptr()), 500);
        // __constant__ globals.
        let (mut dptr, mut bytes) = (0u64, 0usize);
        let g = CString::new("emu_test_coeffs").unwrap();
        assert_eq!(
            cuModuleGetGlobal_v2(&mut dptr, &mut bytes, m, g.as_ptr()),
            0
        );
        assert_eq!(bytes, 16);
        let c = [1f32, 2.0, 3.0, 4.0];
        assert_eq!(cuMemcpyHtoD_v2(dptr, c.as_ptr() as *const c_void, 16), 0);
        assert_eq!(cuModuleUnload(m), 0);

        let unknown = PTX.replace("emu_test_saxpy", "emu_test_not_built");
        assert_eq!(
            load(&unknown).unwrap_err(),
            500,
            "CUDA_ERROR_NOT_FOUND for a kernel the CPU build lacks"
        );
        let fewer = PTX.replace(",\n\t.param .u32 emu_test_oob_write_param_1", "");
        assert_eq!(
            load(&fewer).unwrap_err(),
            200,
            "CUDA_ERROR_INVALID_IMAGE for a parameter-count mismatch"
        );
        let wider = PTX.replace(
            ".param .u32 emu_test_oob_write_param_1",
            ".param .u64 emu_test_oob_write_param_1",
        );
        assert_eq!(
            load(&wider).unwrap_err(),
            200,
            "CUDA_ERROR_INVALID_IMAGE for a parameter-size mismatch"
        );
        assert!(last_error_message().contains("parameter sizes"));
    }
}

#[test]
fn launch_limits_are_an_h100s() {
    if !need_kernels() {
        return;
    }
    let _g = lock();
    unsafe {
        let m = load(PTX).unwrap();
        let f = func(m, "emu_test_dyn_reverse");
        let (x, y) = (alloc(4 * 1024), alloc(4 * 1024));
        let (mut px, mut py) = (x, y);
        let mut args = [arg(&mut px), arg(&mut py)];
        let launch = |block: u32, smem: u32, args: &mut [*mut c_void]| {
            cuLaunchKernel(
                f,
                1,
                1,
                1,
                block,
                1,
                1,
                smem,
                null_mut(),
                args.as_mut_ptr(),
                null_mut(),
            )
        };
        assert_eq!(launch(1025, 0, &mut args), 1, "1025 threads per block");
        assert_eq!(
            cuLaunchKernel(
                f,
                1,
                1,
                1,
                32,
                32,
                2,
                0,
                null_mut(),
                args.as_mut_ptr(),
                null_mut()
            ),
            1,
            "32x32x2 threads"
        );
        assert_eq!(
            cuLaunchKernel(
                f,
                1,
                70000,
                1,
                32,
                1,
                1,
                0,
                null_mut(),
                args.as_mut_ptr(),
                null_mut()
            ),
            1,
            "grid y > 65535"
        );
        assert_eq!(
            launch(256, 48 * 1024, &mut args),
            0,
            "48 KiB of dynamic shared memory needs no attribute"
        );
        assert_eq!(
            launch(256, 64 * 1024, &mut args),
            1,
            "64 KiB needs MAX_DYNAMIC_SHARED_SIZE_BYTES"
        );
        assert_eq!(cuFuncSetAttribute(f, 8, 64 * 1024), 0);
        assert_eq!(launch(256, 64 * 1024, &mut args), 0);
        assert_eq!(cuFuncSetAttribute(f, 8, 228 * 1024), 1, "more than 227 KiB");
        // The function's static shared memory comes from the PTX.
        let mut v = 0;
        assert_eq!(cuFuncGetAttribute(&mut v, 1, func(m, "emu_test_saxpy")), 0);
        assert_eq!(v, 1024);
        cuMemFree_v2(x);
        cuMemFree_v2(y);
        cuModuleUnload(m);
    }
}

#[test]
fn out_of_bounds_write_is_an_illegal_address() {
    if !need_kernels() {
        return;
    }
    let _g = lock();
    unsafe {
        let m = load(PTX).unwrap();
        let f = func(m, "emu_test_oob_write");
        let n = 1000usize;
        let y = alloc(n * 4);
        let (mut py, mut nn) = (y, n as i32);
        let mut args = [arg(&mut py), arg(&mut nn)];
        // The kernel writes y[0..=n]: one float past the end.
        let r = cuLaunchKernel(
            f,
            4,
            1,
            1,
            256,
            1,
            1,
            0,
            null_mut(),
            args.as_mut_ptr(),
            null_mut(),
        );
        let msg = last_error_message();
        println!("{msg}");
        assert_eq!(r, 700, "CUDA_ERROR_ILLEGAL_ADDRESS");
        assert!(
            msg.contains("emu_test_oob_write")
                && msg.contains("argument 0")
                && msg.contains("(4000 bytes): bytes 0..4 after its end"),
            "{msg}"
        );
        // Sticky, as on a GPU.
        let mut p = 0u64;
        assert_eq!(cuMemAlloc_v2(&mut p, 16), 700);
        reset_sticky_error();
        // In bounds it is fine.
        let y2 = alloc((n + 1) * 4);
        let mut py2 = y2;
        let mut args = [arg(&mut py2), arg(&mut nn)];
        assert_eq!(
            cuLaunchKernel(
                f,
                4,
                1,
                1,
                256,
                1,
                1,
                0,
                null_mut(),
                args.as_mut_ptr(),
                null_mut()
            ),
            0
        );
        cuMemFree_v2(y2);
        cuModuleUnload(m);
    }
}

#[test]
fn deadlock_is_a_launch_failure() {
    if !need_kernels() {
        return;
    }
    let _g = lock();
    let r = with_timeout(60, || unsafe {
        let m = load(PTX).unwrap();
        let f = func(m, "emu_test_partial_barrier");
        let mut y = alloc(256 * 4);
        let mut args = [arg(&mut y)];
        let r = cuLaunchKernel(
            f,
            1,
            1,
            1,
            256,
            1,
            1,
            0,
            null_mut(),
            args.as_mut_ptr(),
            null_mut(),
        );
        reset_sticky_error();
        cuMemFree_v2(y);
        cuModuleUnload(m);
        r
    });
    assert_eq!(r, 719);
    assert!(last_error_message().contains("threads 128-255: exited"));
}

#[test]
fn graphs_replay_with_the_argument_values_of_capture_time() {
    if !need_kernels() {
        return;
    }
    let _g = lock();
    unsafe {
        let m = load(PTX).unwrap();
        let f = func(m, "emu_test_saxpy");
        let mut s = null_mut();
        assert_eq!(cuStreamCreate(&mut s, 1), 0);
        assert_eq!(
            cuStreamBeginCapture_v2(null_mut(), 0),
            900,
            "capture on the NULL stream"
        );
        let n = 256usize;
        let (x, y) = (alloc(n * 4), alloc(n * 4));
        let ones = vec![1f32; n];
        assert_eq!(cuMemcpyHtoD_v2(x, ones.as_ptr() as *const c_void, n * 4), 0);
        assert_eq!(cuStreamBeginCapture_v2(s, 0), 0);
        let mut status = 0;
        assert_eq!(cuStreamIsCapturing(s, &mut status), 0);
        assert_eq!(status, 1);
        // y = 0; y = a*x + y, with a = 2 at capture time.
        assert_eq!(cuMemsetD32Async(y, 0, n, s), 0);
        let (mut py, mut px, mut a, mut nn) = (y, x, 2.0f32, n as i32);
        let mut args = [arg(&mut py), arg(&mut px), arg(&mut a), arg(&mut nn)];
        assert_eq!(
            cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, s, args.as_mut_ptr(), null_mut()),
            0
        );
        a = 100.0; // must not change the graph
        let _ = a;
        let mut g = null_mut();
        assert_eq!(cuStreamEndCapture(s, &mut g), 0);
        let mut host = vec![0f32; n];
        assert_eq!(
            cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut c_void, y, n * 4),
            0
        );
        assert!(
            host.iter().all(|v| v.is_nan()),
            "nothing ran during capture"
        );
        let mut e = null_mut();
        assert_eq!(cuGraphInstantiateWithFlags(&mut e, g, 0), 0);
        assert_eq!(cuGraphUpload(e, s), 0);
        for _ in 0..2 {
            assert_eq!(cuGraphLaunch(e, s), 0);
            assert_eq!(
                cuMemcpyDtoH_v2(host.as_mut_ptr() as *mut c_void, y, n * 4),
                0
            );
            assert!(host.iter().all(|&v| v == 2.0), "{:?}", &host[..4]);
        }
        assert_eq!(cuGraphExecDestroy(e), 0);
        assert_eq!(cuGraphDestroy(g), 0);
        // Synchronizing a capturing stream invalidates the capture.
        assert_eq!(cuStreamBeginCapture_v2(s, 0), 0);
        assert_eq!(cuStreamSynchronize(s), 900);
        assert_eq!(cuStreamEndCapture(s, &mut g), 901);
        assert_eq!(cuStreamDestroy_v2(s), 0);
        cuMemFree_v2(x);
        cuMemFree_v2(y);
        cuModuleUnload(m);
    }
}

#[test]
fn events_time_with_the_host_clock() {
    let _g = lock();
    unsafe {
        let (mut a, mut b, mut c) = (null_mut(), null_mut(), null_mut());
        assert_eq!(cuEventCreate(&mut a, 0), 0);
        assert_eq!(cuEventCreate(&mut b, 0), 0);
        assert_eq!(cuEventCreate(&mut c, 2), 0); // CU_EVENT_DISABLE_TIMING
        let mut ms = 0f32;
        assert_eq!(
            cuEventElapsedTime_v2(&mut ms, a, b),
            400,
            "not recorded yet"
        );
        assert_eq!(cuEventRecord(a, null_mut()), 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(cuEventRecord(b, null_mut()), 0);
        assert_eq!(cuEventRecord(c, null_mut()), 0);
        assert_eq!(cuEventSynchronize(b), 0);
        assert_eq!(cuEventElapsedTime_v2(&mut ms, a, b), 0);
        assert!(ms >= 19.0 && ms < 1000.0, "{ms}");
        assert_eq!(
            cuEventElapsedTime_v2(&mut ms, a, c),
            400,
            "DISABLE_TIMING events have no timestamps"
        );
        for e in [a, b, c] {
            assert_eq!(cuEventDestroy_v2(e), 0);
        }
    }
}

#[test]
fn memory_sizes_parse() {
    assert_eq!(parse_size("2GiB"), Some(2 << 30));
    assert_eq!(parse_size("512MiB"), Some(512 << 20));
    assert_eq!(parse_size("1.5G"), Some(3 << 29));
    assert_eq!(parse_size("4096"), Some(4096));
    assert_eq!(parse_size("lots"), None);
}
