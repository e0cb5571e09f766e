//! The FA3-style attention of kernels/attention_sm90.cu (kernels/include/attention_sm90.cuh), correct and
//! mutated (tests/kernels/attention_sm90.cu), one head, head dim 64: the correct version must match a plain
//! CPU attention (f64 softmax) to bf16 accuracy in both thread orders; each mutant (V read K-major, no
//! rescale of O when the running maximum grows, the K/V stage released before the P V wgmma completes)
//! must fail the launch or be far off in some order. 200 queries x 200 keys, causal: 2 query blocks, 4 key
//! tiles through a 2-stage ring, a last tile of 8 keys.
mod common;
use common::*;
use half::bf16;
use openuni_emu::driver::{cuTensorMapEncodeTiled, TensorMapBlob};

const VARIANTS: [(i32, &str); 4] = [
    (0, "correct"),
    (1, "V read K-major"),
    (2, "O not rescaled when the maximum grows"),
    (3, "K/V stage released before the P V wgmma completes"),
];
const THREADS: u32 = 384;
const SMEM: u32 = 1024 + 6 * 8192 + 128; // attention_sm90::smem_bytes(64)

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as u32 % 2001) as f32 / 1000.0 - 1.0
    }
}

fn encode(base: *const u8, len: u64, hd: u64) -> TensorMapBlob {
    let mut m = TensorMapBlob::default();
    let (dims, strides, boxd, es) = (
        [hd, 1, len, 1],
        [2 * hd, 2 * hd, 2 * hd * len],
        [64u32, 1, 64, 1],
        [1u32; 4],
    );
    // SAFETY: arrays of rank 4 (strides 3); the map is written into `m`.
    let r = unsafe {
        cuTensorMapEncodeTiled(
            &mut m as *mut TensorMapBlob as *mut std::ffi::c_void,
            9,
            4,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            es.as_ptr(),
            0,
            3,
            0,
            0,
        )
    };
    assert_eq!(r, 0, "cuTensorMapEncodeTiled");
    m
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((*x - *y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    if num.is_nan() {
        f64::INFINITY
    } else {
        (num / den).sqrt()
    }
}

#[test]
fn attention_sm90_and_its_mutants() {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return;
    }
    std::env::set_var("OPENUNI_EMU_HANG_MS", "1000");
    let (n, hd) = (200usize, 64usize);
    let mut rng = Rng(9);
    // Scores with a large spread (keys scaled up), so that the running maximum grows along the tiles.
    let round = |v: f32| bf16::from_f32(v).to_f32();
    let q: Vec<f32> = (0..n * hd).map(|_| round(rng.next())).collect();
    let k: Vec<f32> = (0..n * hd)
        .map(|i| round(rng.next() * (1.0 + (i / hd) as f32 / 40.0)))
        .collect();
    let v: Vec<f32> = (0..n * hd).map(|_| round(rng.next())).collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![0f32; n * hd];
    for i in 0..n {
        let s: Vec<f64> = (0..=i)
            .map(|j| {
                (0..hd)
                    .map(|c| (q[i * hd + c] * k[j * hd + c]) as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let l: f64 = p.iter().sum();
        for c in 0..hd {
            want[i * hd + c] = (p
                .iter()
                .enumerate()
                .map(|(j, pj)| pj * v[j * hd + c] as f64)
                .sum::<f64>()
                / l) as f32;
        }
    }
    let to_dev = |v: &[f32]| -> Vec<u128> {
        let mut b = vec![0u128; (v.len() * 2).div_ceil(16)];
        let bytes: Vec<u8> = v
            .iter()
            .flat_map(|f| bf16::from_f32(*f).to_bits().to_le_bytes())
            .collect();
        // SAFETY: b holds at least bytes.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.as_mut_ptr() as *mut u8, bytes.len())
        };
        b
    };
    let (qd, kd, vd) = (to_dev(&q), to_dev(&k), to_dev(&v));
    let maps = [qd.as_ptr(), kd.as_ptr(), vd.as_ptr()]
        .map(|p| encode(p as *const u8, n as u64, hd as u64));
    let mut correct_err = 0f64;
    for (variant, what) in VARIANTS {
        let mut caught = false;
        for order in ORDERS {
            let mut out = vec![0xFFFFu16; n * hd];
            let [mut mq, mut mk, mut mv] = maps;
            let (mut po, mut nn, mut mm, mut h, mut c, mut sl, mut va) = (
                out.as_mut_ptr(),
                n as i32,
                n as i32,
                hd as i32,
                1i32,
                scale * std::f32::consts::LOG2_E,
                variant,
            );
            let r = launch(
                "emu_test_attention_sm90",
                [n.div_ceil(128) as u32, 1, 1],
                [THREADS, 1, 1],
                SMEM,
                order,
                &mut [
                    arg(&mut mq),
                    arg(&mut mk),
                    arg(&mut mv),
                    arg(&mut po),
                    arg(&mut nn),
                    arg(&mut mm),
                    arg(&mut h),
                    arg(&mut c),
                    arg(&mut sl),
                    arg(&mut va),
                ],
            );
            let got: Vec<f32> = out.iter().map(|b| bf16::from_bits(*b).to_f32()).collect();
            if variant == 0 {
                r.unwrap_or_else(|e| panic!("correct kernel ({order:?}): {e}"));
                correct_err = rel_l2(&got, &want);
                println!("correct ({order:?}): relative L2 {correct_err:.3e}");
                assert!(
                    correct_err < 1e-2,
                    "correct kernel ({order:?}): relative L2 {correct_err:.3e}"
                );
                continue;
            }
            match r {
                Err(e) => {
                    println!("mutant `{what}` ({order:?}): launch failed: {e}");
                    caught = true;
                }
                Ok(()) => {
                    let e = rel_l2(&got, &want);
                    println!("mutant `{what}` ({order:?}): relative L2 {e:.3e}");
                    caught |= e > 10.0 * correct_err.max(1e-3);
                }
            }
        }
        assert!(
            variant == 0 || caught,
            "mutant `{what}` was caught in neither thread order"
        );
    }
}
