//! sm_90a on the emulated GPU (kernels/include/wgmma.cuh, mbarrier.cuh, sm90.cuh; kernels in
//! tests/kernels/hopper.cu): every result is checked against a plain CPU computation, with the shared-memory
//! images, register fragments and expected accumulators built here from the PTX ISA's layouts. Layouts are
//! chosen so that a wrong swizzle, a transposed fragment, swapped LBO/SBO or a wrong phase shows; the
//! mutants (a missing wgmma.wait_group or wgmma.fence, a mis-encoded descriptor, a wrong mbarrier parity) must
//! be reported or give a wrong result.
mod common;
use common::*;
use half::bf16;
use openuni_emu::{LaunchError, Order};

fn need_kernels() -> bool {
    if !openuni_emu::kernels_compiled() {
        eprintln!("skipped: {}", openuni_emu::NO_KERNELS_MSG);
        return false;
    }
    // Hang detection in spin-waits: short, so that a mutant that hangs is reported quickly.
    std::env::set_var("OPENUNI_EMU_HANG_MS", "1000");
    true
}

/// Small deterministic generator: bf16 values in [-2, 2) with few mantissa bits (exact products).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn bf16(&mut self) -> bf16 {
        bf16::from_f32((self.next() % 64) as f32 / 16.0 - 2.0)
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Sw {
    None,
    B32,
    B64,
    B128,
}
impl Sw {
    /// The descriptor's encoding (bits 62-63).
    fn code(self) -> i32 {
        match self {
            Sw::None => 0,
            Sw::B128 => 1,
            Sw::B64 => 2,
            Sw::B32 => 3,
        }
    }
    fn line_bytes(self) -> usize {
        match self {
            Sw::None => 16,
            Sw::B32 => 32,
            Sw::B64 => 64,
            Sw::B128 => 128,
        }
    }
    /// The swizzle as TMA and wgmma apply it to a shared address: the 16-byte chunk index within a
    /// 128-byte line is XORed with the line index modulo the pattern's lines (2, 4 or 8).
    fn apply(self, addr: usize) -> usize {
        let lines = self.line_bytes() / 16;
        let chunk = (addr >> 4) & 7;
        let line = (addr >> 7) % lines;
        (addr & !0x70) | ((chunk ^ line) << 4)
    }
}

/// An operand tile (rows = M or N, K columns) placed in a shared-memory image at `base`.
struct Placed {
    lbo: u32,
    sbo: u32,
    /// Byte offset of the tile for each 16-wide k step (what the descriptor's start address points at).
    step_off: Vec<u32>,
}

/// Lays out element (mn, k) of a bf16 operand the way the ISA's figures draw each mode: K-major swizzled
/// tiles are rows of `line` bytes along K (one row per mn, K split into line-wide blocks); MN-major swizzled
/// tiles are rows of `line` bytes along MN (one row per k); unswizzled tiles are 8x8 core matrices of 128
/// contiguous bytes (K-major: 8 rows of 8 k; MN-major: 8 k of 8 mn).
fn place(
    image: &mut [u8],
    base: usize,
    mn_major: bool,
    sw: Sw,
    rows: usize,
    k: usize,
    at: impl Fn(usize, usize) -> bf16,
) -> Placed {
    let w = sw.line_bytes();
    let logical = |mn: usize, kk: usize| -> usize {
        match (mn_major, sw) {
            // k groups far apart (LBO), 8-row groups adjacent (SBO = 128).
            (false, Sw::None) => {
                (kk / 8) * (rows / 8) * 128 + (mn / 8) * 128 + (mn % 8) * 16 + (kk % 8) * 2
            }
            (false, _) => (kk / (w / 2)) * rows * w + mn * w + (kk % (w / 2)) * 2,
            // mn groups adjacent (SBO = 128), k groups far apart (LBO).
            (true, Sw::None) => {
                (kk / 8) * (rows / 8) * 128 + (mn / 8) * 128 + (kk % 8) * 16 + (mn % 8) * 2
            }
            (true, _) => (mn / (w / 2)) * k * w + kk * w + (mn % (w / 2)) * 2,
        }
    };
    for mn in 0..rows {
        for kk in 0..k {
            let a = sw.apply(base + logical(mn, kk));
            image[a..a + 2].copy_from_slice(&at(mn, kk).to_bits().to_le_bytes());
        }
    }
    let (lbo, sbo) = match (mn_major, sw) {
        (false, Sw::None) => ((rows / 8) * 128, 128),
        (false, _) => (16, 8 * w),
        (true, Sw::None) => ((rows / 8) * 128, 128),
        (true, _) => (k * w, 8 * w),
    };
    let step_off = (0..k / 16)
        .map(|s| (base + logical(0, 16 * s)) as u32)
        .collect();
    Placed {
        lbo: lbo as u32,
        sbo: sbo as u32,
        step_off,
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct WgmmaArgs {
    n: i32,
    ta: i32,
    tb: i32,
    a_regs: i32,
    scale_d: i32,
    k_steps: i32,
    sw: i32,
    variant: i32,
    a_lbo: u32,
    a_sbo: u32,
    b_lbo: u32,
    b_sbo: u32,
    a_off: [u32; 8],
    b_off: [u32; 8],
}

const MISSING_WAIT: i32 = 1;
const MISSING_FENCE: i32 = 2;
const WRONG_PARITY: i32 = 3;
const CLOBBER_BEFORE_WAIT: i32 = 5;

/// (row, col) of accumulator register r of warpgroup thread t (ISA: "WGMMA .m64nNk16 register fragment
/// layout for accumulator matrix D").
fn d_coord(t: usize, r: usize) -> (usize, usize) {
    let (w, g, tq) = (t / 32, (t % 32) / 4, t % 4);
    (16 * w + g + 8 * ((r % 4) / 2), 8 * (r / 4) + 2 * tq + r % 2)
}

struct Case {
    n: usize,
    ta: bool,
    tb: bool,
    sw: Sw,
    a_regs: bool,
    scale_d: bool,
}

struct Setup {
    image: Vec<u8>,
    frags: Vec<u32>,
    d0: Vec<f32>,
    want: Vec<f32>,
    args: WgmmaArgs,
}

const K: usize = 64;

fn setup(c: &Case, seed: u64) -> Setup {
    let mut rng = Rng(seed);
    let a: Vec<bf16> = (0..64 * K).map(|_| rng.bf16()).collect(); // A[m][k]
    let b: Vec<bf16> = (0..K * c.n).map(|_| rng.bf16()).collect(); // B[k][n]
    let d0: Vec<f32> = (0..128 * c.n / 2).map(|_| rng.bf16().to_f32()).collect();
    // An MN-major swizzled tile narrower than a line still takes a line per k.
    let span = |rows: usize| (rows * K * 2).max(K * c.sw.line_bytes());
    let b_base = span(64) + 1024; // a gap, and 1024-byte aligned
    let mut image = vec![0u8; b_base + span(c.n) + 1024];
    let pa = place(&mut image, 0, c.ta, c.sw, 64, K, |m, k| a[m * K + k]);
    let pb = place(&mut image, b_base, c.tb, c.sw, c.n, K, |n, k| {
        b[k * c.n + n]
    });
    // A fragments per k step and thread (ISA: "WGMMA .m64nNk16 register fragment layout for matrix A").
    let mut frags = vec![0u32; (K / 16) * 128 * 4];
    for s in 0..K / 16 {
        for t in 0..128 {
            let (w, g, tq) = (t / 32, (t % 32) / 4, t % 4);
            for j in 0..4 {
                let (row, col) = (16 * w + g + 8 * (j % 2), 16 * s + 2 * tq + 8 * (j / 2));
                frags[(s * 128 + t) * 4 + j] = a[row * K + col].to_bits() as u32
                    | (a[row * K + col + 1].to_bits() as u32) << 16;
            }
        }
    }
    let mut want = vec![0f32; 128 * c.n / 2];
    for t in 0..128 {
        for r in 0..c.n / 2 {
            let (row, col) = d_coord(t, r);
            let mut acc = if c.scale_d { d0[t * c.n / 2 + r] } else { 0.0 };
            for k in 0..K {
                acc += a[row * K + k].to_f32() * b[k * c.n + col].to_f32();
            }
            want[t * c.n / 2 + r] = acc;
        }
    }
    let mut args = WgmmaArgs {
        n: c.n as i32,
        ta: c.ta as i32,
        tb: c.tb as i32,
        a_regs: c.a_regs as i32,
        scale_d: c.scale_d as i32,
        k_steps: (K / 16) as i32,
        sw: c.sw.code(),
        variant: 0,
        a_lbo: pa.lbo,
        a_sbo: pa.sbo,
        b_lbo: pb.lbo,
        b_sbo: pb.sbo,
        ..Default::default()
    };
    args.a_off[..K / 16].copy_from_slice(&pa.step_off);
    args.b_off[..K / 16].copy_from_slice(&pb.step_off);
    Setup {
        image,
        frags,
        d0,
        want,
        args,
    }
}

fn run_wgmma(s: &Setup, args: WgmmaArgs, order: Order) -> Result<Vec<f32>, LaunchError> {
    let mut d = s.d0.clone();
    let (mut pi, mut nb, mut pf, mut pd, mut a) = (
        s.image.as_ptr(),
        s.image.len() as u32,
        s.frags.as_ptr(),
        d.as_mut_ptr(),
        args,
    );
    launch(
        "emu_test_wgmma",
        [1, 1, 1],
        [128, 1, 1],
        s.image.len() as u32,
        order,
        &mut [
            arg(&mut pi),
            arg(&mut nb),
            arg(&mut pf),
            arg(&mut pd),
            arg(&mut a),
        ],
    )?;
    Ok(d)
}

fn mismatches(got: &[f32], want: &[f32]) -> usize {
    got.iter()
        .zip(want)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
}

#[test]
fn wgmma_from_shared_memory_every_n_swizzle_and_major() {
    if !need_kernels() {
        return;
    }
    let mut seed = 1;
    for n in [8, 16, 32, 64, 128, 256] {
        for sw in [Sw::None, Sw::B32, Sw::B64, Sw::B128] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                seed += 1;
                let c = Case {
                    n,
                    ta,
                    tb,
                    sw,
                    a_regs: false,
                    scale_d: seed % 2 == 0,
                };
                let s = setup(&c, seed);
                for order in ORDERS {
                    let d = run_wgmma(&s, s.args, order)
                        .unwrap_or_else(|e| panic!("N={n} {sw:?} trans {ta}/{tb}: {e}"));
                    assert_eq!(
                        mismatches(&d, &s.want),
                        0,
                        "N={n} {sw:?} trans-a {ta} trans-b {tb} scale-d {} {order:?}",
                        c.scale_d
                    );
                }
            }
        }
    }
}

#[test]
fn wgmma_with_a_from_registers() {
    if !need_kernels() {
        return;
    }
    for (i, n) in [8, 64, 256].into_iter().enumerate() {
        for sw in [Sw::None, Sw::B32, Sw::B64, Sw::B128] {
            for tb in [false, true] {
                for order in ORDERS {
                    let c = Case {
                        n,
                        ta: false,
                        tb,
                        sw,
                        a_regs: true,
                        scale_d: i % 2 == 1,
                    };
                    let s = setup(&c, 100 + i as u64);
                    let d = run_wgmma(&s, s.args, order).unwrap();
                    assert_eq!(
                        mismatches(&d, &s.want),
                        0,
                        "N={n} {sw:?} trans-b {tb} {order:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn wgmma_mutants_are_caught() {
    if !need_kernels() {
        return;
    }
    let c = Case {
        n: 64,
        ta: false,
        tb: true,
        sw: Sw::B128,
        a_regs: false,
        scale_d: true,
    };
    let s = setup(&c, 7);
    for order in ORDERS {
        // A missing wgmma.wait_group: the accumulators are never written.
        let mut a = s.args;
        a.variant = MISSING_WAIT;
        let d = run_wgmma(&s, a, order).unwrap();
        let wrong = mismatches(&d, &s.want);
        println!(
            "missing wgmma.wait_group ({order:?}): {wrong}/{} accumulators wrong",
            d.len()
        );
        assert_eq!(
            d, s.d0,
            "without the wait, the accumulators keep their old values"
        );
        assert!(wrong > d.len() / 2);

        // Shared-memory operands overwritten before the wait: the emulator reads them at the wait.
        let mut a = s.args;
        a.variant = CLOBBER_BEFORE_WAIT;
        let d = run_wgmma(&s, a, order).unwrap();
        let wrong = mismatches(&d, &s.want);
        println!(
            "B overwritten before wgmma.wait_group ({order:?}): {wrong}/{} wrong",
            d.len()
        );
        assert!(wrong > d.len() / 4);

        // A missing wgmma.fence before the first mma_async: reported.
        let mut a = s.args;
        a.variant = MISSING_FENCE;
        let e = run_wgmma(&s, a, order).unwrap_err();
        assert!(e.message.contains("wgmma.fence"), "{e}");

        // Mis-encoded descriptors: swizzle 64B instead of 128B (data in the wrong chunks), and LBO/SBO of the
        // unswizzled layout swapped.
        let mut a = s.args;
        a.sw = Sw::B64.code();
        match run_wgmma(&s, a, order) {
            Ok(d) => {
                let wrong = mismatches(&d, &s.want);
                println!(
                    "64B descriptor on a 128B tile ({order:?}): {wrong}/{} wrong",
                    d.len()
                );
                assert!(wrong > d.len() / 2);
            }
            Err(e) => println!(
                "64B descriptor on a 128B tile ({order:?}): reported: {}",
                e.message
            ),
        }
        let c3 = Case {
            n: 64,
            ta: false,
            tb: false,
            sw: Sw::B128,
            a_regs: false,
            scale_d: true,
        };
        let s3 = setup(&c3, 8);
        let mut a = s3.args;
        a.sw = Sw::B32.code();
        a.b_sbo = 256; // consistent with 32B lines: the data is still in the wrong places
        a.a_sbo = 256;
        let d = run_wgmma(&s3, a, order).unwrap();
        let wrong = mismatches(&d, &s3.want);
        println!(
            "32B descriptor on a 128B tile ({order:?}): {wrong}/{} wrong",
            d.len()
        );
        assert!(wrong > d.len() / 2);

        let c2 = Case {
            n: 32,
            ta: true,
            tb: false,
            sw: Sw::None,
            a_regs: false,
            scale_d: false,
        };
        let s2 = setup(&c2, 9);
        let mut a = s2.args;
        std::mem::swap(&mut a.a_lbo, &mut a.a_sbo);
        std::mem::swap(&mut a.b_lbo, &mut a.b_sbo);
        let d = run_wgmma(&s2, a, order).unwrap();
        let wrong = mismatches(&d, &s2.want);
        println!("LBO and SBO swapped ({order:?}): {wrong}/{} wrong", d.len());
        assert!(wrong > d.len() / 2);

        // A 128B-swizzled operand that does not start on the pattern's 1024-byte boundary: reported.
        let mut a = s.args;
        for o in a.b_off.iter_mut().take(4) {
            *o += 128;
        }
        let e = run_wgmma(&s, a, order).unwrap_err();
        assert!(
            e.message.contains("line 1 of a 128B swizzle pattern"),
            "{e}"
        );

        // A descriptor pointing past the block's dynamic shared memory: reported.
        let mut a = s.args;
        a.b_off[0] = s.image.len() as u32 - 1024;
        let e = run_wgmma(&s, a, order).unwrap_err();
        assert!(e.message.contains("outside the block's"), "{e}");
    }
}

#[test]
fn wgmma_warpgroups_rendezvous_separately_and_setmaxnreg_is_checked() {
    if !need_kernels() {
        return;
    }
    let mut rng = Rng(42);
    let a: Vec<bf16> = (0..128 * 16).map(|_| rng.bf16()).collect(); // 128x16
    let b: Vec<bf16> = (0..16 * 8).map(|_| rng.bf16()).collect(); // 16x8
    let mut image = vec![0u8; 4096 + 256];
    // K-major, no swizzle: core matrix (m/8, k/8) at (k/8)*2048 + (m/8)*128.
    for m in 0..128 {
        for k in 0..16 {
            let o = (k / 8) * 2048 + (m / 8) * 128 + (m % 8) * 16 + (k % 8) * 2;
            image[o..o + 2].copy_from_slice(&a[m * 16 + k].to_bits().to_le_bytes());
        }
    }
    for n in 0..8 {
        for k in 0..16 {
            let o = 4096 + (k / 8) * 128 + (n % 8) * 16 + (k % 8) * 2;
            image[o..o + 2].copy_from_slice(&b[k * 8 + n].to_bits().to_le_bytes());
        }
    }
    for order in ORDERS {
        for bad in [0i32, 1] {
            let mut out = vec![0f32; 256 * 4];
            let (mut pi, mut nb, mut po, mut pb) =
                (image.as_ptr(), image.len() as u32, out.as_mut_ptr(), bad);
            let r = launch(
                "emu_test_wgmma_two_groups",
                [1, 1, 1],
                [256, 1, 1],
                image.len() as u32,
                order,
                &mut [arg(&mut pi), arg(&mut nb), arg(&mut po), arg(&mut pb)],
            );
            if bad == 1 {
                let e = r.unwrap_err();
                assert!(e.message.contains("setmaxnreg"), "{e}");
                continue;
            }
            r.unwrap();
            for t in 0..256 {
                for r in 0..4 {
                    let (row, col) = d_coord(t % 128, r);
                    let row = row + 64 * (t / 128);
                    let want: f32 = (0..16)
                        .map(|k| a[row * 16 + k].to_f32() * b[k * 8 + col].to_f32())
                        .sum();
                    assert_eq!(out[t * 4 + r], want, "thread {t} reg {r} {order:?}");
                }
            }
        }
    }
}

#[test]
fn mbarrier_phases_and_transaction_counts() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let mut out = vec![0i32; 15];
        let mut po = out.as_mut_ptr();
        launch(
            "emu_test_mbarrier_script",
            [1, 1, 1],
            [32, 1, 1],
            0,
            order,
            &mut [arg(&mut po)],
        )
        .unwrap();
        // (try_wait.parity 0, try_wait.parity 1) after each step.
        assert_eq!(
            out,
            [0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, -1],
            "{order:?}"
        );
    }
}

fn run_ring(variant: i32, order: Order) -> (Result<(), LaunchError>, Vec<f32>, Vec<f32>) {
    let rounds = 6;
    let src: Vec<f32> = (0..rounds * 32).map(|i| (i % 17) as f32).collect();
    let mut want = vec![0f32; 4];
    for w in 1..4 {
        want[w] = src.iter().sum();
    }
    let mut out = vec![0f32; 4];
    let (mut ps, mut nr, mut po, mut v) = (src.as_ptr(), rounds as i32, out.as_mut_ptr(), variant);
    let r = launch(
        "emu_test_mbarrier_ring",
        [1, 1, 1],
        [128, 1, 1],
        64 + 2 * 32 * 4,
        order,
        &mut [arg(&mut ps), arg(&mut nr), arg(&mut po), arg(&mut v)],
    );
    (r, out, want)
}

#[test]
fn mbarrier_producer_consumer_ring() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let (r, out, want) = run_ring(0, order);
        r.unwrap();
        assert_eq!(out[1..], want[1..], "{order:?}");
    }
}

#[test]
fn mbarrier_wrong_parity_is_caught() {
    if !need_kernels() {
        return;
    }
    for order in ORDERS {
        let (r, out, want) = with_timeout(60, move || run_ring(WRONG_PARITY, order));
        match r {
            Err(e) => println!("wrong parity ({order:?}): reported: {e}"),
            Ok(()) => {
                println!(
                    "wrong parity ({order:?}): sums {:?}, want {:?}",
                    &out[1..],
                    &want[1..]
                );
                assert_ne!(out[1..], want[1..], "a wrong parity must not pass");
            }
        }
    }
}

// ---- TMA ----------------------------------------------------------------------------------------------

use openuni_emu::driver::{cuTensorMapEncodeTiled, TensorMapBlob};

/// A 16-byte aligned host buffer (the emulated device memory is host memory).
fn aligned(bytes: usize) -> Vec<u128> {
    vec![0u128; bytes.div_ceil(16)]
}

#[allow(clippy::too_many_arguments)]
fn encode(
    dtype: u32,
    base: *const u8,
    dims: &[u64],
    strides: &[u64],
    boxd: &[u32],
    swizzle: u32,
    oob_nan: bool,
) -> Result<TensorMapBlob, i32> {
    let mut m = TensorMapBlob::default();
    let es = vec![1u32; dims.len()];
    let r = unsafe {
        cuTensorMapEncodeTiled(
            &mut m as *mut TensorMapBlob as *mut std::ffi::c_void,
            dtype,
            dims.len() as u32,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxd.as_ptr(),
            es.as_ptr(),
            0,
            swizzle,
            0,
            oob_nan as u32,
        )
    };
    if r == 0 {
        Ok(m)
    } else {
        Err(r as i32)
    }
}

/// CUtensorMapSwizzle (0 none, 1 32B, 2 64B, 3 128B) as an address swizzle.
fn tma_sw(code: u32) -> Sw {
    [Sw::None, Sw::B32, Sw::B64, Sw::B128][code as usize]
}

struct TmaCase {
    dtype: u32,
    es: usize,
    dims: Vec<u64>,
    strides: Vec<u64>, // bytes, dims 1..
    boxd: Vec<u32>,
    coords: Vec<i32>,
    swizzle: u32,
    oob_nan: bool,
}

/// The shared-memory bytes the box must produce: dense rows of boxDim[0] elements, innermost first, each
/// byte at its swizzled address (relative to the 1024-aligned destination); out-of-bounds elements 0 or NaN.
fn tma_expected(c: &TmaCase, global: &[u8]) -> Vec<u8> {
    let row_bytes = c.boxd[0] as usize * c.es;
    let rows: usize = c.boxd[1..].iter().map(|&b| b as usize).product();
    let mut img = vec![0u8; row_bytes * rows];
    let nan: Vec<u8> = match c.es {
        2 => 0x7FFFu16.to_le_bytes().to_vec(),
        4 => 0x7FFF_FFFFu32.to_le_bytes().to_vec(),
        _ => unreachable!(),
    };
    for r in 0..rows {
        let mut rr = r;
        let mut off = 0usize;
        let mut inside = true;
        for d in 1..c.dims.len() {
            let b = c.boxd[d] as usize;
            let x = c.coords[d] as i64 + (rr % b) as i64;
            rr /= b;
            inside &= x >= 0 && (x as u64) < c.dims[d];
            off += x.max(0) as usize * c.strides[d - 1] as usize;
        }
        for i in 0..c.boxd[0] as usize {
            let x = c.coords[0] as i64 + i as i64;
            let dst = tma_sw(c.swizzle).apply(1024 + r * row_bytes + i * c.es) - 1024;
            if inside && x >= 0 && (x as u64) < c.dims[0] {
                let g = off + x as usize * c.es;
                img[dst..dst + c.es].copy_from_slice(&global[g..g + c.es]);
            } else if c.oob_nan {
                img[dst..dst + c.es].copy_from_slice(&nan);
            }
        }
    }
    img
}

fn run_tma(c: &TmaCase, variant: i32, order: Order) -> (Vec<u8>, Vec<u8>) {
    let mut strides_all = vec![c.es as u64];
    strides_all.extend(&c.strides);
    let total = (c.dims.last().unwrap() * strides_all.last().unwrap()) as usize;
    let mut buf = aligned(total);
    let global = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, total) };
    let mut rng = Rng(c.dims.iter().sum::<u64>() + c.swizzle as u64);
    for b in global.iter_mut() {
        *b = (rng.next() % 251) as u8 & 0x7F; // no NaN patterns in the data
    }
    let want = tma_expected(c, global);
    let mut map = encode(
        c.dtype,
        global.as_ptr(),
        &c.dims,
        &c.strides,
        &c.boxd,
        c.swizzle,
        c.oob_nan,
    )
    .expect("cuTensorMapEncodeTiled");
    let mut out = vec![0u8; want.len()];
    let mut co = [0i32; 4];
    co[..c.coords.len()].copy_from_slice(&c.coords);
    let (mut rank, mut c0, mut c1, mut c2, mut c3) =
        (c.dims.len() as i32, co[0], co[1], co[2], co[3]);
    let (mut nb, mut po, mut v) = (want.len() as u32, out.as_mut_ptr(), variant);
    launch(
        "emu_test_tma_load",
        [1, 1, 1],
        [64, 1, 1],
        1024 + want.len() as u32,
        order,
        &mut [
            arg(&mut map),
            arg(&mut rank),
            arg(&mut c0),
            arg(&mut c1),
            arg(&mut c2),
            arg(&mut c3),
            arg(&mut nb),
            arg(&mut po),
            arg(&mut v),
        ],
    )
    .unwrap();
    (out, want)
}

fn tma_cases() -> Vec<TmaCase> {
    vec![
        // 2D bf16, padded rows, 128B swizzle, the box hangs over the left and bottom edges.
        TmaCase {
            dtype: 9,
            es: 2,
            dims: vec![100, 37],
            strides: vec![224],
            boxd: vec![64, 8],
            coords: vec![-8, 33],
            swizzle: 3,
            oob_nan: false,
        },
        // 3D f32, 64B swizzle, over the right, far and near edges.
        TmaCase {
            dtype: 7,
            es: 4,
            dims: vec![20, 6, 5],
            strides: vec![96, 640],
            boxd: vec![16, 4, 3],
            coords: vec![8, 4, -1],
            swizzle: 2,
            oob_nan: false,
        },
        // 4D bf16, 32B swizzle.
        TmaCase {
            dtype: 9,
            es: 2,
            dims: vec![16, 3, 4, 2],
            strides: vec![32, 96, 384],
            boxd: vec![16, 2, 2, 2],
            coords: vec![0, 2, 3, 1],
            swizzle: 1,
            oob_nan: false,
        },
        // 2D f32, no swizzle, NaN fill.
        TmaCase {
            dtype: 7,
            es: 4,
            dims: vec![8, 8],
            strides: vec![32],
            boxd: vec![8, 4],
            coords: vec![4, 6],
            swizzle: 0,
            oob_nan: true,
        },
    ]
}

#[test]
fn tma_loads_2d_3d_4d_with_swizzle_and_out_of_bounds_fill() {
    if !need_kernels() {
        return;
    }
    for (i, c) in tma_cases().iter().enumerate() {
        for order in ORDERS {
            let (out, want) = run_tma(c, 0, order);
            assert_eq!(out, want, "case {i} {order:?}");
        }
    }
}

#[test]
fn tma_read_before_the_mbarrier_wait_sees_poison() {
    if !need_kernels() {
        return;
    }
    let c = &tma_cases()[0];
    for order in ORDERS {
        let (out, _) = run_tma(c, 4, order);
        assert!(
            out.iter().all(|&b| b == 0xFF),
            "{order:?}: the box must not land before the wait"
        );
    }
}

#[test]
fn tma_wrong_swizzle_in_the_box_is_caught() {
    // Also the TMA -> wgmma chain with 128B swizzle (the correct pairing) against a CPU matmul.
    if !need_kernels() {
        return;
    }
    let mut rng = Rng(77);
    let a: Vec<bf16> = (0..64 * 64).map(|_| rng.bf16()).collect(); // A[m][k]
    let bt: Vec<bf16> = (0..64 * 64).map(|_| rng.bf16()).collect(); // B^T[n][k]
    let (mut ba, mut bb) = (aligned(8192), aligned(8192));
    unsafe {
        std::ptr::copy_nonoverlapping(a.as_ptr() as *const u8, ba.as_mut_ptr() as *mut u8, 8192);
        std::ptr::copy_nonoverlapping(bt.as_ptr() as *const u8, bb.as_mut_ptr() as *mut u8, 8192);
    }
    let mut want = vec![0f32; 128 * 32];
    for t in 0..128 {
        for r in 0..32 {
            let (row, col) = d_coord(t, r);
            want[t * 32 + r] = (0..64)
                .map(|k| a[row * 64 + k].to_f32() * bt[col * 64 + k].to_f32())
                .sum();
        }
    }
    for order in ORDERS {
        for (map_sw, ok) in [(3u32, true), (0, false)] {
            let enc =
                |p: *const u8| encode(9, p, &[64, 64], &[128], &[64, 64], map_sw, false).unwrap();
            let (mut ma, mut mb) = (enc(ba.as_ptr() as *const u8), enc(bb.as_ptr() as *const u8));
            let mut out = vec![0f32; 128 * 32];
            let (mut po, mut sw) = (out.as_mut_ptr(), Sw::B128.code());
            launch(
                "emu_test_tma_wgmma",
                [1, 1, 1],
                [128, 1, 1],
                1024 + 2 * 8192,
                order,
                &mut [arg(&mut ma), arg(&mut mb), arg(&mut po), arg(&mut sw)],
            )
            .unwrap();
            let wrong = mismatches(&out, &want);
            if ok {
                assert_eq!(wrong, 0, "TMA 128B -> wgmma 128B {order:?}");
            } else {
                println!(
                    "TMA box without swizzle read as 128B by wgmma ({order:?}): {wrong}/4096 wrong"
                );
                assert!(wrong > 2048);
            }
        }
    }
}

#[test]
fn tensor_map_arguments_are_checked() {
    let buf = aligned(1 << 16);
    let p = buf.as_ptr() as *const u8;
    let ok = encode(9, p, &[64, 64], &[128], &[64, 64], 3, false);
    assert!(ok.is_ok());
    type Enc<'a> = Box<dyn Fn() -> Result<TensorMapBlob, i32> + 'a>;
    let cases: Vec<(Enc, &str)> = vec![
        (
            Box::new(|| {
                encode(
                    9,
                    p,
                    &[64; 6],
                    &[128, 256, 512, 1024, 2048],
                    &[8; 6],
                    0,
                    false,
                )
            }),
            "tensorRank",
        ),
        (
            Box::new(|| encode(9, p.wrapping_add(8), &[64, 64], &[128], &[64, 64], 3, false)),
            "globalAddress",
        ),
        (
            Box::new(|| encode(9, p, &[64, 64], &[120], &[64, 64], 3, false)),
            "globalStrides[0]",
        ),
        (
            Box::new(|| encode(9, p, &[64, 64], &[1u64 << 40], &[64, 64], 3, false)),
            "globalStrides[0]",
        ),
        (
            Box::new(|| encode(9, p, &[512, 64], &[1024], &[257, 1], 0, false)),
            "boxDim[0]",
        ),
        (
            Box::new(|| encode(9, p, &[512, 64], &[1024], &[128, 8], 3, false)),
            "swizzle span",
        ),
        (
            Box::new(|| encode(9, p, &[64, 64], &[128], &[4, 8], 0, false)),
            "multiple of 16",
        ),
        (
            Box::new(|| encode(3, p, &[64, 64], &[256], &[64, 8], 0, true)),
            "oobFill",
        ),
        (
            Box::new(|| encode(9, p, &[0, 64], &[128], &[64, 8], 0, false)),
            "globalDim[0]",
        ),
    ];
    for (f, what) in cases {
        // The driver's last message is per process: other tests' launches may replace it meanwhile, so
        // retry a few times for the message (the error code is checked every time).
        let mut msg = String::new();
        for _ in 0..20 {
            assert_eq!(f().unwrap_err(), 1, "{what}");
            msg = openuni_emu::driver::last_error_message();
            if msg.contains(what) {
                break;
            }
        }
        assert!(msg.contains(what), "{what}: {msg}");
    }
}

#[test]
fn warp_specialised_tma_wgmma_pipeline() {
    if !need_kernels() {
        return;
    }
    let k = 256;
    let mut rng = Rng(5);
    let a: Vec<bf16> = (0..64 * k).map(|_| rng.bf16()).collect(); // A[m][k]
    let bt: Vec<bf16> = (0..64 * k).map(|_| rng.bf16()).collect(); // B^T[n][k]
    let (mut ba, mut bb) = (aligned(64 * k * 2), aligned(64 * k * 2));
    unsafe {
        std::ptr::copy_nonoverlapping(
            a.as_ptr() as *const u8,
            ba.as_mut_ptr() as *mut u8,
            64 * k * 2,
        );
        std::ptr::copy_nonoverlapping(
            bt.as_ptr() as *const u8,
            bb.as_mut_ptr() as *mut u8,
            64 * k * 2,
        );
    }
    let enc = |p: *const u8| {
        encode(
            9,
            p,
            &[k as u64, 64],
            &[(k * 2) as u64],
            &[64, 64],
            3,
            false,
        )
        .unwrap()
    };
    let mut want = vec![0f32; 128 * 32];
    for t in 0..128 {
        for r in 0..32 {
            let (row, col) = d_coord(t, r);
            want[t * 32 + r] = (0..k)
                .map(|kk| a[row * k + kk].to_f32() * bt[col * k + kk].to_f32())
                .sum();
        }
    }
    let mut wrong_early = 0;
    for order in ORDERS {
        for early in [0i32, 1] {
            let (mut ma, mut mb) = (enc(ba.as_ptr() as *const u8), enc(bb.as_ptr() as *const u8));
            let mut out = vec![0f32; 128 * 32];
            let (mut kt, mut po, mut e) = ((k / 64) as i32, out.as_mut_ptr(), early);
            launch(
                "emu_test_ws_gemm",
                [1, 1, 1],
                [256, 1, 1],
                1024 + 2 * 16384,
                order,
                &mut [
                    arg(&mut ma),
                    arg(&mut mb),
                    arg(&mut kt),
                    arg(&mut po),
                    arg(&mut e),
                ],
            )
            .unwrap();
            let wrong = mismatches(&out, &want);
            if early == 0 {
                assert_eq!(wrong, 0, "{order:?}");
            } else {
                println!("stage released before wgmma.wait_group ({order:?}): {wrong}/4096 wrong");
                wrong_early += wrong;
            }
        }
    }
    assert!(
        wrong_early > 0,
        "releasing a stage before the wgmma wait must show in some order"
    );
}
