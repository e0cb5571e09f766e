//! The wgmma/TMA conv mainloop of kernels/conv_sm90.cu (kernels/include/conv_sm90.cuh), correct and
//! mutated (tests/kernels/conv_sm90.cu): the correct version must equal a plain CPU 3×3 conv bit for
//! bit (inputs with few mantissa bits, so every partial sum is exact in f32), in both thread
//! orders; each mutant (A descriptors with the wrong swizzle, a stage released before its wgmma
//! completes, no wgmma.wait_group in the mainloop, the wrong full-barrier parity) must fail the
//! launch or give a wrong result in some order. The shape makes the ring wrap (18 stages through 4
//! slots) and crosses both tile edges and the 64-channel stage (72 input channels).
mod common;
use common::*;
use half::bf16;
use openuni_emu::driver::{cuTensorMapEncodeTiled, TensorMapBlob};

const VARIANTS: [(i32, &str); 5] = [
    (0, "correct"),
    (
        1,
        "A descriptors with 64B swizzle over a 128B-swizzled TMA tile",
    ),
    (2, "stage released before its wgmma.wait_group"),
    (3, "no wgmma.wait_group in the mainloop"),
    (4, "wrong parity on the full barrier"),
];
// Geometry (kernels/include/conv_sm90_geometry.cuh).
const THREADS: u32 = 384;
const SMEM: u32 = 197760;
const TILE: usize = 16;
const TILE_N: usize = 128;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    /// Multiples of 1/4 in [-1, 1]: products and their sums stay exact in f32.
    fn small(&mut self) -> f32 {
        (self.next() % 9) as f32 / 4.0 - 1.0
    }
}

fn encode(base: *const u8, dims: &[u64], strides: &[u64], boxd: &[u32]) -> TensorMapBlob {
    let mut m = TensorMapBlob::default();
    let es = vec![1u32; dims.len()];
    // SAFETY: arrays of the rank's length; the map is written into `m`.
    let r = unsafe {
        cuTensorMapEncodeTiled(
            &mut m as *mut TensorMapBlob as *mut std::ffi::c_void,
            9, // bf16
            dims.len() as u32,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            es.as_ptr(),
            0,
            3, // 128B swizzle
            0,
            0,
        )
    };
    assert_eq!(r, 0, "cuTensorMapEncodeTiled");
    m
}

#[test]
fn conv_sm90_mainloop_and_its_mutants() {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return;
    }
    // Short hang detection: the wrong-parity mutant may wait forever.
    std::env::set_var("OPENUNI_EMU_HANG_MS", "1000");
    let (h, w, cin, cout) = (5usize, 18usize, 72usize, 20usize);
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..h * w * cin).map(|_| rng.small()).collect();
    let wt: Vec<f32> = (0..cout * cin * 9).map(|_| rng.small()).collect(); // [cout][cin][3][3]
                                                                           // The kernels' weight layout [tap][cout][cin] (what conv3x3_weights_sm90 makes).
    let mut wp = vec![0f32; 9 * cout * cin];
    for t in 0..9 {
        for n in 0..cout {
            for c in 0..cin {
                wp[(t * cout + n) * cin + c] = wt[(n * cin + c) * 9 + t];
            }
        }
    }
    let mut want = vec![0f32; h * w * cout];
    for oy in 0..h {
        for ox in 0..w {
            for n in 0..cout {
                let mut s = 0f32;
                for t in 0..9 {
                    let (iy, ix) = (
                        oy as isize + (t / 3) as isize - 1,
                        ox as isize + (t % 3) as isize - 1,
                    );
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                        continue;
                    }
                    for c in 0..cin {
                        s += x[(iy as usize * w + ix as usize) * cin + c]
                            * wt[(n * cin + c) * 9 + t];
                    }
                }
                want[(oy * w + ox) * cout + n] = bf16::from_f32(s).to_f32();
            }
        }
    }
    // 16-byte aligned device (= host) buffers.
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
    let (xd, wd) = (to_dev(&x), to_dev(&wp));
    let c = cin as u64;
    let map_x = encode(
        xd.as_ptr() as *const u8,
        &[c, w as u64, h as u64, 1],
        &[2 * c, 2 * c * w as u64, 2 * c * (w * h) as u64],
        &[64, 16, 8, 1],
    );
    let map_w = encode(
        wd.as_ptr() as *const u8,
        &[c, cout as u64, 9],
        &[2 * c, 2 * c * cout as u64],
        &[64, 128, 1],
    );
    let grid = [
        (w.div_ceil(TILE) * h.div_ceil(TILE)) as u32,
        cout.div_ceil(TILE_N) as u32,
        1,
    ];

    for (variant, what) in VARIANTS {
        let mut caught = false;
        for order in ORDERS {
            let mut y = vec![0xFFFFu16; h * w * cout];
            let (mut mx, mut mw) = (map_x, map_w);
            let (mut py, mut hh, mut ww, mut ci, mut co, mut v) = (
                y.as_mut_ptr(),
                h as i32,
                w as i32,
                cin as i32,
                cout as i32,
                variant,
            );
            let r = launch(
                "emu_test_conv_sm90",
                grid,
                [THREADS, 1, 1],
                SMEM,
                order,
                &mut [
                    arg(&mut mx),
                    arg(&mut mw),
                    arg(&mut py),
                    arg(&mut hh),
                    arg(&mut ww),
                    arg(&mut ci),
                    arg(&mut co),
                    arg(&mut v),
                ],
            );
            let got: Vec<f32> = y.iter().map(|b| bf16::from_bits(*b).to_f32()).collect();
            let wrong = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            if variant == 0 {
                r.unwrap_or_else(|e| panic!("correct kernel ({order:?}): {e}"));
                assert_eq!(
                    wrong,
                    0,
                    "correct kernel ({order:?}): {wrong}/{} outputs differ from the CPU conv",
                    want.len()
                );
                continue;
            }
            match r {
                Err(e) => {
                    println!("mutant `{what}` ({order:?}): launch failed: {e}");
                    caught = true;
                }
                Ok(()) => {
                    println!(
                        "mutant `{what}` ({order:?}): {wrong}/{} outputs wrong",
                        want.len()
                    );
                    caught |= wrong > 0;
                }
            }
        }
        assert!(
            variant == 0 || caught,
            "mutant `{what}` was caught in neither thread order"
        );
    }
}
