//! The emulator catches deliberately broken kernels (tests/kernels/broken.cu, tests/kernels/mma.cu).
//! Driver-level checks (out-of-bounds writes) are in tests/driver.rs.
mod common;
use common::*;
use openuni_emu::Order;

fn need_kernels() -> bool {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return false;
    }
    true
}

/// Runs emu_test_missing_sync / emu_test_with_sync and counts wrong elements.
fn wrong_elements(kernel: &str, order: Order) -> usize {
    let x: Vec<f32> = (0..256).map(|i| i as f32 + 0.5).collect();
    let mut y = vec![0f32; 256];
    let (mut px, mut py) = (x.as_ptr(), y.as_mut_ptr());
    launch(
        kernel,
        [1, 1, 1],
        [256, 1, 1],
        0,
        order,
        &mut [arg(&mut px), arg(&mut py)],
    )
    .unwrap();
    (1..256).filter(|&t| y[t] != x[t - 1]).count()
}

#[test]
fn missing_syncthreads_is_caught_in_reverse_order() {
    if !need_kernels() {
        return;
    }
    let fwd = wrong_elements("emu_test_missing_sync", Order::Forward);
    let rev = wrong_elements("emu_test_missing_sync", Order::Reverse);
    println!("missing __syncthreads: {fwd}/255 wrong in forward order, {rev}/255 in reverse order");
    // Forward order hides this race (why CI runs both orders); reverse order reads the 0xFF poison.
    assert_eq!(fwd, 0);
    assert_eq!(rev, 255);
    // With the barrier both orders are right.
    assert_eq!(wrong_elements("emu_test_with_sync", Order::Forward), 0);
    assert_eq!(wrong_elements("emu_test_with_sync", Order::Reverse), 0);
}

fn expect_deadlock(kernel: &'static str, block: u32, args_n: Option<i32>) -> String {
    with_timeout(60, move || {
        let mut y = vec![0f32; 256];
        let x = vec![1f32; 256];
        let (mut px, mut py) = (x.as_ptr(), y.as_mut_ptr());
        let mut n = args_n.unwrap_or(0);
        let mut args = match args_n {
            Some(_) => vec![arg(&mut px), arg(&mut py), arg(&mut n)],
            None => vec![arg(&mut py)],
        };
        let mut msgs = Vec::new();
        for order in ORDERS {
            let e = launch(kernel, [1, 1, 1], [block, 1, 1], 0, order, &mut args)
                .expect_err("a broken barrier must fail the launch");
            assert_eq!(e.code, 719, "CUDA_ERROR_LAUNCH_FAILED");
            msgs.push(e.message);
        }
        msgs.join("\n")
    })
}

#[test]
fn barrier_not_reached_by_all_threads_is_reported() {
    if !need_kernels() {
        return;
    }
    let m = expect_deadlock("emu_test_partial_barrier", 256, None);
    println!("{m}");
    assert!(m.contains("barrier deadlock"));
    assert!(
        m.contains("threads 0-127: waiting at __syncthreads()") && m.contains("broken.cu:30"),
        "{m}"
    );
    assert!(m.contains("threads 128-255: exited"), "{m}");
}

#[test]
fn threads_at_different_barriers_are_reported() {
    if !need_kernels() {
        return;
    }
    let m = expect_deadlock("emu_test_divergent_barriers", 128, None);
    println!("{m}");
    assert!(m.contains("different barriers"), "{m}");
    assert!(
        m.contains("threads 0-63: waiting at __syncthreads()"),
        "{m}"
    );
    assert!(
        m.contains("threads 64-127: waiting at __syncthreads()"),
        "{m}"
    );
}

#[test]
fn shuffle_naming_exited_lanes_is_reported() {
    if !need_kernels() {
        return;
    }
    let m = expect_deadlock("emu_test_shfl_after_exit", 64, Some(40));
    println!("{m}");
    assert!(m.contains("exited"), "{m}");
}

#[test]
fn device_assert_fails_the_launch_with_710() {
    if !need_kernels() {
        return;
    }
    let x: Vec<i32> = (0..64).map(|i| if i == 37 { -1 } else { i }).collect();
    let mut px = x.as_ptr();
    let e = launch(
        "emu_test_assert",
        [1, 1, 1],
        [64, 1, 1],
        0,
        Order::Forward,
        &mut [arg(&mut px)],
    )
    .unwrap_err();
    assert_eq!(e.code, 710);
    assert!(
        e.message.contains("thread (37,0,0)") && e.message.contains("x[threadIdx.x] >= 0"),
        "{}",
        e.message
    );
}
