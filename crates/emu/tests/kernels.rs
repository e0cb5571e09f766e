//! The emulated GPU's built-ins, on test kernels (tests/kernels/basic.cu), in both thread orders.
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

#[test]
fn descriptors_come_from_the_cpp_signature() {
    if !need_kernels() {
        return;
    }
    let k = openuni_emu::find("emu_test_saxpy").unwrap();
    assert_eq!(k.param_sizes, &[8, 8, 4, 4]);
    assert_eq!(k.param_aligns, &[8, 8, 4, 4]);
    assert!(k.file.ends_with("tests/kernels/basic.cu"));
}

#[test]
fn saxpy() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let n = 1000i32;
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut y: Vec<f32> = (0..n).map(|i| 1.0 + i as f32).collect();
        let (mut py, mut px, mut a, mut nn) = (y.as_mut_ptr(), x.as_ptr(), 2.0f32, n);
        launch(
            "emu_test_saxpy",
            [4, 1, 1],
            [256, 1, 1],
            0,
            order,
            &mut [arg(&mut py), arg(&mut px), arg(&mut a), arg(&mut nn)],
        )
        .unwrap();
        for i in 0..n as usize {
            assert_eq!(y[i], 2.0 * i as f32 + 1.0 + i as f32);
        }
    }
}

#[test]
fn block_sum_with_static_shared_memory() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let n = 1000i32;
        let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        let mut out = vec![0f32; 4];
        let (mut px, mut po, mut nn) = (x.as_ptr(), out.as_mut_ptr(), n);
        launch(
            "emu_test_block_sum",
            [4, 1, 1],
            [256, 1, 1],
            0,
            order,
            &mut [arg(&mut px), arg(&mut po), arg(&mut nn)],
        )
        .unwrap();
        for b in 0..4 {
            let want: f32 = x.iter().skip(b * 256).take(256).sum();
            assert_eq!(out[b], want, "block {b} {order:?}");
        }
    }
}

#[test]
fn warp_intrinsics() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let n = 128usize;
        let x: Vec<f32> = (0..n)
            .map(|i| if i % 5 == 0 { -(i as f32) } else { i as f32 })
            .collect();
        let mut sums = vec![0f32; 4];
        let mut votes = vec![0u32; 12];
        let (mut bcast, mut up, mut down) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let mut p = [
            x.as_ptr() as usize,
            sums.as_mut_ptr() as usize,
            votes.as_mut_ptr() as usize,
            bcast.as_mut_ptr() as usize,
            up.as_mut_ptr() as usize,
            down.as_mut_ptr() as usize,
        ];
        let mut args: Vec<_> = p.iter_mut().map(arg).collect();
        launch("emu_test_warp", [2, 1, 1], [64, 1, 1], 0, order, &mut args).unwrap();
        for w in 0..4 {
            let s: f32 = x[w * 32..w * 32 + 32].iter().sum();
            assert_eq!(sums[w], s);
            let mut ballot = 0u32;
            for l in 0..32 {
                if x[w * 32 + l] > 0.0 {
                    ballot |= 1 << l;
                }
            }
            assert_eq!(votes[w * 3], ballot);
            assert_eq!(
                votes[w * 3 + 1],
                x[w * 32..w * 32 + 32].iter().any(|&v| v > 100.0) as u32
            );
            assert_eq!(votes[w * 3 + 2], 1);
        }
        for i in 0..n {
            let (w, l) = (i / 32, i % 32);
            assert_eq!(bcast[i], x[w * 32 + 3]);
            assert_eq!(up[i], if l == 0 { x[i] } else { x[i - 1] });
            // width 16: lanes beyond their 16-lane segment keep their own value
            assert_eq!(down[i], if l % 16 + 2 < 16 { x[i + 2] } else { x[i] });
        }
    }
}

#[test]
fn dynamic_shared_memory() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let x: Vec<f32> = (0..512).map(|i| i as f32).collect();
        let mut y = vec![0f32; 512];
        let (mut px, mut py) = (x.as_ptr(), y.as_mut_ptr());
        launch(
            "emu_test_dyn_reverse",
            [2, 1, 1],
            [256, 1, 1],
            1024,
            order,
            &mut [arg(&mut px), arg(&mut py)],
        )
        .unwrap();
        for i in 0..512 {
            assert_eq!(y[i], x[(i / 256) * 256 + 255 - i % 256]);
        }
    }
}

#[test]
fn atomics_across_workers() {
    if !need_kernels() {
        return;
    }
    let k = openuni_emu::find("emu_test_atomics").unwrap();
    let (mut counter, mut fsum, mut maxv) = (0i32, 0f32, 0u32);
    let (mut a, mut b, mut c) = (
        &mut counter as *mut i32,
        &mut fsum as *mut f32,
        &mut maxv as *mut u32,
    );
    let mut args = [arg(&mut a), arg(&mut b), arg(&mut c)];
    let cfg = openuni_emu::LaunchConfig {
        grid: [16, 1, 1],
        block: [128, 1, 1],
        dyn_smem: 0,
    };
    unsafe {
        openuni_emu::launch(
            k,
            &cfg,
            args.as_mut_ptr(),
            &openuni_emu::LaunchOptions {
                order: None,
                threads: Some(3),
            },
        )
    }
    .unwrap();
    assert_eq!(counter, 2048);
    assert_eq!(fsum, 2048.0);
    assert_eq!(maxv, 2047);
}

#[test]
fn constant_memory() {
    if !need_kernels() {
        return;
    }
    let g = openuni_emu::registry()
        .global("emu_test_coeffs", None)
        .expect("__constant__ registered");
    assert_eq!(g.size, 16);
    let coeffs = [1.0f32, 2.0, 3.0, 4.0];
    unsafe { std::ptr::copy_nonoverlapping(coeffs.as_ptr() as *const u8, g.addr, 16) };
    let mut y = vec![0f32; 8];
    let mut py = y.as_mut_ptr();
    launch(
        "emu_test_constant",
        [1, 1, 1],
        [8, 1, 1],
        0,
        Order::Forward,
        &mut [arg(&mut py)],
    )
    .unwrap();
    assert_eq!(y, vec![2.0, 4.0, 6.0, 8.0, 2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn bf16_rounds_once() {
    if !need_kernels() {
        return;
    }
    let x: Vec<half::bf16> = (0..100)
        .map(|i| half::bf16::from_f32(i as f32 * 0.37 - 11.0))
        .collect();
    let mut y = vec![half::bf16::ZERO; 100];
    let (mut px, mut py, mut s, mut n) = (x.as_ptr(), y.as_mut_ptr(), 1.7f32, 100i32);
    launch(
        "emu_test_bf16_scale",
        [1, 1, 1],
        [128, 1, 1],
        0,
        Order::Forward,
        &mut [arg(&mut px), arg(&mut py), arg(&mut s), arg(&mut n)],
    )
    .unwrap();
    for i in 0..100 {
        assert_eq!(y[i], half::bf16::from_f32(x[i].to_f32() * 1.7));
    }
}

#[test]
fn syncthreads_count_in_a_3d_block() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let mut out = [0i32; 1];
        let mut p = out.as_mut_ptr();
        launch(
            "emu_test_sync_count",
            [1, 1, 1],
            [8, 4, 2],
            0,
            order,
            &mut [arg(&mut p)],
        )
        .unwrap();
        assert_eq!(out[0], (0..64).filter(|t| t % 3 == 0).count() as i32);
    }
}

#[test]
fn bad_configurations_are_rejected_like_on_a_gpu() {
    if !need_kernels() {
        return;
    }
    let mut y = vec![0f32; 4];
    let (mut py, mut px, mut a, mut n) = (y.as_mut_ptr(), y.as_ptr(), 1f32, 0i32);
    let mut args = [arg(&mut py), arg(&mut px), arg(&mut a), arg(&mut n)];
    let e = launch(
        "emu_test_saxpy",
        [1, 1, 1],
        [1025, 1, 1],
        0,
        Order::Forward,
        &mut args,
    )
    .unwrap_err();
    assert_eq!(e.code, 1);
    let e = launch(
        "emu_test_saxpy",
        [1, 1, 1],
        [32, 32, 2],
        0,
        Order::Forward,
        &mut args,
    )
    .unwrap_err();
    assert_eq!(e.code, 1);
    let e = launch(
        "emu_test_saxpy",
        [0, 1, 1],
        [32, 1, 1],
        0,
        Order::Forward,
        &mut args,
    )
    .unwrap_err();
    assert_eq!(e.code, 1);
}

#[test]
fn static_shared_memory_is_poisoned_between_blocks() {
    if !need_kernels() {
        return;
    }
    let k = openuni_emu::find("emu_test_stale_shared").unwrap();
    let mut out = vec![0f32; 4 * 32];
    let mut p = out.as_mut_ptr();
    let mut args = [arg(&mut p)];
    let cfg = openuni_emu::LaunchConfig {
        grid: [4, 1, 1],
        block: [32, 1, 1],
        dyn_smem: 0,
    };
    // One worker, so blocks 1-3 run right after block 0 in the same thread-local shared memory.
    unsafe {
        openuni_emu::launch(
            k,
            &cfg,
            args.as_mut_ptr(),
            &openuni_emu::LaunchOptions {
                order: Some(Order::Forward),
                threads: Some(1),
            },
        )
    }
    .unwrap();
    assert!(out[..32].iter().all(|&v| v == 1.0));
    assert!(
        out[32..].iter().all(|v| v.is_nan()),
        "stale shared memory from block 0 leaked into later blocks"
    );
}

/// Float -> integer intrinsics saturate like the GPU's cvt ("clamped to the destination range by
/// default", PTX ISA) and give 0 for NaN, where a C++ cast is undefined (x86 gives INT_MIN).
#[test]
fn float_to_int_saturates() {
    if !need_kernels() {
        return;
    }
    let x = [
        2.5f32,
        -2.5,
        3.7,
        -3.7,
        1e10,
        -1e10,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        2147483520.0,
        -2147483648.0,
        4294967040.0,
        1e20,
    ];
    let n = x.len();
    let (mut rn, mut rz, mut rd, mut urn, mut llrn) = (
        vec![7i32; n],
        vec![7i32; n],
        vec![7i32; n],
        vec![7u32; n],
        vec![7i64; n],
    );
    let (mut px, mut p1, mut p2, mut p3, mut p4, mut p5, mut nn) = (
        x.as_ptr(),
        rn.as_mut_ptr(),
        rz.as_mut_ptr(),
        rd.as_mut_ptr(),
        urn.as_mut_ptr(),
        llrn.as_mut_ptr(),
        n as i32,
    );
    launch(
        "emu_test_float2int",
        [1, 1, 1],
        [32, 1, 1],
        0,
        Order::Forward,
        &mut [
            arg(&mut px),
            arg(&mut p1),
            arg(&mut p2),
            arg(&mut p3),
            arg(&mut p4),
            arg(&mut p5),
            arg(&mut nn),
        ],
    )
    .unwrap();
    let (max, min) = (i32::MAX, i32::MIN);
    assert_eq!(
        rn,
        [2, -2, 4, -4, max, min, max, min, 0, 2147483520, min, max, max]
    );
    assert_eq!(
        rz,
        [2, -2, 3, -3, max, min, max, min, 0, 2147483520, min, max, max]
    );
    assert_eq!(
        rd,
        [2, -3, 3, -4, max, min, max, min, 0, 2147483520, min, max, max]
    );
    assert_eq!(
        urn,
        [
            2,
            0,
            4,
            0,
            u32::MAX,
            0,
            u32::MAX,
            0,
            0,
            2147483520,
            0,
            4294967040,
            u32::MAX
        ]
    );
    assert_eq!(
        llrn,
        [
            2,
            -2,
            4,
            -4,
            10_000_000_000,
            -10_000_000_000,
            i64::MAX,
            i64::MIN,
            0,
            2147483520,
            -2147483648,
            4294967040,
            i64::MAX
        ]
    );
}
