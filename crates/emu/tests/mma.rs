//! Tensor-core helpers (kernels/include/mma.cuh) against a naive matmul: zero error on exact inputs, and a
//! kernel with a wrong fragment index is caught.
mod common;
use common::*;
use half::bf16;

fn need_kernels() -> bool {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return false;
    }
    true
}

fn pack(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

#[test]
fn ldmatrix_layouts() {
    if !need_kernels() {
        return;
    }
    // M: 32 rows x 8 columns, distinct small integers.
    let m: Vec<bf16> = (0..256).map(|i| bf16::from_f32(i as f32)).collect();
    let at = |r: usize, c: usize| m[r * 8 + c];
    for order in ORDERS {
        let mut out = vec![0u32; 32 * 14];
        let (mut pm, mut po) = (m.as_ptr(), out.as_mut_ptr());
        launch(
            "emu_test_ldmatrix",
            [1, 1, 1],
            [32, 1, 1],
            0,
            order,
            &mut [arg(&mut pm), arg(&mut po)],
        )
        .unwrap();
        for l in 0..32 {
            let plain = |i: usize| {
                pack(
                    at(8 * i + l / 4, 2 * (l % 4)),
                    at(8 * i + l / 4, 2 * (l % 4) + 1),
                )
            };
            let trans = |i: usize| {
                pack(
                    at(8 * i + 2 * (l % 4), l / 4),
                    at(8 * i + 2 * (l % 4) + 1, l / 4),
                )
            };
            let o = &out[l * 14..l * 14 + 14];
            let want = [
                plain(0),
                plain(0),
                plain(1),
                plain(0),
                plain(1),
                plain(2),
                plain(3),
                trans(0),
                trans(0),
                trans(1),
                trans(0),
                trans(1),
                trans(2),
                trans(3),
            ];
            assert_eq!(o, &want, "lane {l} {order:?}");
        }
    }
}

fn run_gemm(kernel: &str, k: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // Small integers: every product and sum is exact in f32, so any correct order gives the same bits.
    let a: Vec<bf16> = (0..16 * k)
        .map(|i| bf16::from_f32(((i * 7) % 11) as f32 - 5.0))
        .collect();
    let b: Vec<bf16> = (0..k * 8)
        .map(|i| bf16::from_f32(((i * 5) % 13) as f32 - 6.0))
        .collect();
    let bt: Vec<bf16> = (0..8 * k).map(|i| b[(i % k) * 8 + i / k]).collect();
    let mut naive = vec![0f32; 16 * 8];
    for r in 0..16 {
        for c in 0..8 {
            naive[r * 8 + c] = (0..k)
                .map(|p| a[r * k + p].to_f32() * b[p * 8 + c].to_f32())
                .sum();
        }
    }
    let (mut d, mut d2) = (vec![0f32; 128], vec![0f32; 128]);
    let (mut pa, mut pb, mut pbt, mut pd, mut pd2, mut kk) = (
        a.as_ptr(),
        b.as_ptr(),
        bt.as_ptr(),
        d.as_mut_ptr(),
        d2.as_mut_ptr(),
        k as i32,
    );
    launch(
        kernel,
        [1, 1, 1],
        [32, 1, 1],
        0,
        openuni_emu::Order::Reverse,
        &mut [
            arg(&mut pa),
            arg(&mut pb),
            arg(&mut pbt),
            arg(&mut pd),
            arg(&mut pd2),
            arg(&mut kk),
        ],
    )
    .unwrap();
    (naive, d, d2)
}

#[test]
fn mma_matches_a_naive_matmul_exactly() {
    if !need_kernels() {
        return;
    }
    for k in [16, 64] {
        let (naive, d, d2) = run_gemm("emu_test_mma_gemm", k);
        assert_eq!(d, naive, "ldmatrix.trans B path, K={k}");
        assert_eq!(d2, naive, "plain ldmatrix B path, K={k}");
    }
}

#[test]
fn wrong_fragment_index_is_caught() {
    if !need_kernels() {
        return;
    }
    let (naive, d, _) = run_gemm("emu_test_mma_wrong_fragment", 32);
    let wrong = d.iter().zip(&naive).filter(|(x, y)| x != y).count();
    println!("mma with a[1]/a[2] swapped: {wrong}/128 elements differ from the naive matmul");
    assert!(wrong > 64, "{wrong}");
}

/// The bank check conv.cu relies on: rows 16, 48 or 80 bytes apart fall in 8 distinct 16-byte bank
/// groups (no conflict), rows 32 or 128 bytes apart do not (2-way, 8-way): the launch fails.
#[test]
fn ldmatrix_bank_conflicts_fail_the_launch_where_checked() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        for (stride, conflict) in [
            (16i32, false),
            (48, false),
            (80, false),
            (32, true),
            (128, true),
        ] {
            let mut out = vec![0u32; 32 * 4];
            let (mut s, mut po) = (stride, out.as_mut_ptr());
            let r = launch(
                "emu_test_ldmatrix_banks",
                [1, 1, 1],
                [32, 1, 1],
                32 * stride as u32,
                order,
                &mut [arg(&mut s), arg(&mut po)],
            );
            match (conflict, r) {
                (false, Ok(())) => {}
                (true, Err(e)) => {
                    assert_eq!(e.code, 719, "stride {stride}: {}", e.message);
                    assert!(e.message.contains("bank"), "stride {stride}: {}", e.message);
                }
                (c, r) => panic!(
                    "stride {stride}: conflict expected {c}, launch gave {:?}",
                    r.map_err(|e| e.message)
                ),
            }
        }
    }
}
