//! Helpers shared by the emulator's tests.
#![allow(dead_code)]

use openuni_emu::{LaunchConfig, LaunchError, LaunchOptions, Order};
use std::ffi::c_void;

/// Launches a CPU-compiled kernel by name; `args` point at the argument values.
pub fn launch(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u32,
    order: Order,
    args: &mut [*mut c_void],
) -> Result<(), LaunchError> {
    let k =
        openuni_emu::find(name).unwrap_or_else(|| panic!("kernel {name} is not in the registry"));
    assert_eq!(k.param_sizes.len(), args.len(), "argument count of {name}");
    let cfg = LaunchConfig {
        grid,
        block,
        dyn_smem,
    };
    unsafe {
        openuni_emu::launch(
            k,
            &cfg,
            args.as_mut_ptr(),
            &LaunchOptions {
                order: Some(order),
                threads: None,
            },
        )
    }
}

/// A pointer to a value, as kernelParams wants it.
pub fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

pub const ORDERS: [Order; 2] = [Order::Forward, Order::Reverse];

/// Runs `f` on another thread and fails the test if it takes longer than `secs` (a hang is a failure).
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .expect("timed out: the emulator hung")
}

/// The folder holding this test build's emulated driver as `libcuda.so.1` and `libcublasLt.so.13`
/// (symlinks to the crate's cdylib, which cargo builds next to the test binaries).
pub fn emu_lib_dir() -> std::path::PathBuf {
    // cargo builds the cdylib with the tests into deps/ (next to the test binaries); it copies it up to
    // the profile folder only for `cargo build`, so the one in deps/ is the current one.
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let so = deps.join("libopenuni_emu.so");
    assert!(
        so.is_file(),
        "{} is missing: cargo builds the cdylib with the tests",
        so.display()
    );
    let dir = deps.join("emu-test-lib");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["libcuda.so.1", "libcublasLt.so.13"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        // Several test binaries may race here: a link that exists afterwards is fine.
        let _ = std::os::unix::fs::symlink("../libopenuni_emu.so", &link);
    }
    dir
}

/// `<cu13>/lib` (NVRTC) from CUDA_INCLUDE_DIRS=`<cu13>/include:...`.
pub fn cuda_lib_dir() -> Option<std::path::PathBuf> {
    let inc = std::env::var("CUDA_INCLUDE_DIRS").ok()?;
    let first = std::path::PathBuf::from(inc.split(':').next()?);
    let lib = first.parent()?.join("lib");
    lib.join("libnvrtc.so.13").is_file().then_some(lib)
}

pub fn cuda_include_dirs() -> Vec<String> {
    std::env::var("CUDA_INCLUDE_DIRS")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// cudarc finds libcuda.so.1 with dlopen, so the loader's search path must hold the emulated driver
/// before the process starts: the test re-runs itself in a child process with LD_LIBRARY_PATH set.
/// Returns true in the child (run the test body there); in the parent it waits for the child, echoes its
/// output, fails if the child failed, and returns false.
pub fn run_in_emulated_process(test: &str, extra_env: &[(&str, &str)]) -> bool {
    if std::env::var("OPENUNI_EMU_CHILD").as_deref() == Ok(test) {
        return true;
    }
    let mut path = emu_lib_dir().display().to_string();
    if let Some(cu) = cuda_lib_dir() {
        path = format!("{path}:{}", cu.display());
    }
    if let Ok(old) = std::env::var("LD_LIBRARY_PATH") {
        path = format!("{path}:{old}");
    }
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("OPENUNI_EMU_CHILD", test)
        .env("LD_LIBRARY_PATH", &path);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > std::time::Duration::from_secs(300) {
            let _ = child.kill();
            panic!("{test}: the emulated-GPU child process hung (killed after 300 s)");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    echo_child(test, &out);

    assert!(
        status.success(),
        "{test} failed in the emulated-GPU child process ({status})"
    );
    false
}

/// Echoes what a child test printed, without the child's own harness lines (so that the log has one
/// result line per test binary), or everything when the child failed.
pub fn echo_child(test: &str, out: &std::process::Output) {
    let harness = |l: &str| {
        l.starts_with("running ")
            || l.starts_with("test result:")
            || l.trim().is_empty()
            || l.trim() == "ok"
            || (l.starts_with("test ") && (l.ends_with(" ... ") || l.ends_with(" ok")))
    };
    let prefix = format!("test {test} ... ");
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if !out.status.success() || !harness(l) {
            println!("{}", l.trim_start_matches(prefix.as_str()));
        }
    }
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}
