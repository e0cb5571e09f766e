//! Helpers shared by the emulator's tests.
#![allow(dead_code)]

use openuni_emu::{LaunchConfig, LaunchError, LaunchOptions, Order};
use std::ffi::c_void;

/// Launches a CPU-compiled kernel by name; `args` point at the argument values.
pub fn launch(name: &str, grid: [u32; 3], block: [u32; 3], dyn_smem: u32, order: Order, args: &mut [*mut c_void]) -> Result<(), LaunchError> {
    let k = openuni_emu::find(name).unwrap_or_else(|| panic!("kernel {name} is not in the registry"));
    assert_eq!(k.param_sizes.len(), args.len(), "argument count of {name}");
    let cfg = LaunchConfig { grid, block, dyn_smem };
    unsafe { openuni_emu::launch(k, &cfg, args.as_mut_ptr(), &LaunchOptions { order: Some(order), threads: None }) }
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
    rx.recv_timeout(std::time::Duration::from_secs(secs)).expect("timed out: the emulator hung")
}
