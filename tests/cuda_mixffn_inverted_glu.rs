//! kernels/mixffn_inverted_glu.cu (`mixffn_inverted_glu_bf16`: GLUMBConv's conv_inverted + SiLU +
//! depthwise 3×3 + GLU in one kernel) against its CPU twin `openuni_cpu::ops::mixffn_inverted_glu`
//! (Linear, then silu_depthwise_conv_glu) on random inputs, through the CUDA executor on one-node
//! graphs; and the launcher's selection and refusals.
//!
//! Shapes: C 8, 16, 24 and 40 (a k tail after the 32-wide stage), hidden 5 to 70 (not multiples
//! of the 64-channel slice; 70: two slices), 1 to 3 images, 4×4, 16×16 (256 tokens: one block per
//! image), 5×7 (non-square) through the executor on every path `select` can take: `auto` (the
//! emulated GPU is sm_90a: the wgmma kernel where it applies), `OPENUNI_MIXFFN=two-op`, and
//! `OPENUNI_MIXFFN=fused` with `OPENUNI_KERNELS=mma` (the mma.sync kernel); f32 storage, C = 12 and
//! 12×32 (384 tokens) run the two-op path (cuBLASLt GEMM into a workspace, then the depthwise GLU).
//! The mma.sync kernel's halo bands (12×32, 7×80) and the wgmma kernel at more k stages than its
//! ring (C up to 328: 6 stages, a k tail) are launched directly. Tolerances
//! (openuni_cuda::testing::check): f32 relative L2 <= 1e-5; bf16 <= 2x the error of a plain bf16
//! run of the same computation (the twin on inputs rounded to bf16, its GEMM output rounded to
//! bf16 as a bf16 GEMM stores it). Without a CUDA device every test prints `skipped: no CUDA device`.

use std::collections::HashMap;

use openuni_cpu::ops as cpu;
use openuni_cuda::families::conv::depthwise_conv3_glu;
use openuni_cuda::families::mixffn_inverted_glu::{
    self, MixFfnArgs, Path, MF90_THREADS, MF_HC, MF_M,
};
use openuni_cuda::families::{enqueue, Launch, Step};
use openuni_cuda::gemm::{Epilogue, LinearArgs, LinearGemm};
use openuni_cuda::gemm_cache::AlgoCache;
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor};
use openuni_graph::GraphBuilder;
use openuni_tensor::{DType, HostTensor};

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), v).unwrap()
}

/// One random MixFFN problem: `b` images of `h`×`w` tokens, `c` channels in, `hidden` out
/// (conv_inverted makes 2·hidden), with or without the two biases.
struct Case {
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    hidden: usize,
    biases: bool,
    x: Vec<f32>,
    wi: Vec<f32>,
    bi: Vec<f32>,
    wd: Vec<f32>,
    bd: Vec<f32>,
}

impl Case {
    fn new(
        rng: &mut Rng,
        (b, h, w, c, hidden): (usize, usize, usize, usize, usize),
        biases: bool,
    ) -> Case {
        let (rows, c2) = (b * h * w, 2 * hidden);
        Case {
            b,
            h,
            w,
            c,
            hidden,
            biases,
            x: rng.normals(rows * c, 0.0, 1.0),
            wi: rng.normals(c2 * c, 0.0, 1.0 / (c as f32).sqrt()),
            bi: rng.normals(c2, 0.0, 0.3),
            wd: rng.normals(c2 * 9, 0.0, 0.4),
            bd: rng.normals(c2, 0.0, 0.3),
        }
    }

    fn rows(&self) -> usize {
        self.b * self.h * self.w
    }

    fn name(&self) -> String {
        let Case {
            b,
            h,
            w,
            c,
            hidden,
            biases,
            ..
        } = self;
        format!("[{b}, {h}x{w}, {c}] -> {hidden} biases={biases}")
    }

    /// The CPU twin of the fused op (f32).
    fn want(&self) -> Vec<f32> {
        let mut y = vec![0.0; self.rows() * self.hidden];
        let (bi, bd) = (
            self.biases.then_some(&self.bi[..]),
            self.biases.then_some(&self.bd[..]),
        );
        let Case {
            b, h, w, c, hidden, ..
        } = *self;
        cpu::mixffn_inverted_glu(
            &self.x,
            &self.wi,
            bi,
            &self.wd,
            bd,
            b,
            h,
            w,
            c,
            2 * hidden,
            &mut y,
        );
        y
    }

    /// The two ops it fuses, Linear then silu_depthwise_conv_glu, on inputs rounded to `dtype`;
    /// with `round_inverted` the GEMM output is rounded to bf16 as a bf16 GEMM stores it (the plain
    /// bf16 run that sets the bf16 tolerance).
    fn two_op(&self, dtype: DType, round_inverted: bool) -> Vec<f32> {
        let Case {
            b,
            h,
            w,
            c,
            hidden,
            biases,
            ..
        } = *self;
        let (rows, c2) = (self.rows(), 2 * hidden);
        let r = |v: &[f32]| round_to(dtype, v);
        let mut inv = vec![0.0; rows * c2];
        let bi = biases.then(|| r(&self.bi));
        cpu::linear(
            &r(&self.x),
            &r(&self.wi),
            bi.as_deref(),
            rows,
            c,
            c2,
            &mut inv,
        );
        if round_inverted {
            inv = round_to(DType::BF16, &inv);
        }
        let mut y = vec![0.0; rows * hidden];
        let bd = biases.then(|| r(&self.bd));
        cpu::silu_depthwise_conv_glu(&inv, &r(&self.wd), bd.as_deref(), b, h, w, c2, 3, &mut y);
        y
    }

    /// A bf16 kernel's output against the twin, at 2x the plain bf16 run's error.
    fn check_bf16(&self, kernel: &str, got: &[f32]) {
        let base = self.two_op(DType::BF16, true);
        check(
            &format!("{kernel} {}", self.name()),
            DType::BF16,
            got,
            &self.want(),
            &base,
        );
    }

    /// Launches one of the family's kernels directly on bf16 buffers (absent biases passed as null)
    /// and returns its launch geometry and output.
    fn launch(
        &self,
        dev: &CudaDevice,
        launcher: fn(&MixFfnArgs) -> openuni_cuda::Result<Launch>,
    ) -> (Launch, Vec<f32>) {
        let bits = |v: &[f32]| {
            v.iter()
                .map(|&f| half::bf16::from_f32(f).to_bits())
                .collect::<Vec<u16>>()
        };
        let up = |v: &[f32]| dev.upload(&bits(v)).unwrap();
        let (xd, wid, bid, wdd, bdd) = (
            up(&self.x),
            up(&self.wi),
            up(&self.bi),
            up(&self.wd),
            up(&self.bd),
        );
        let n = self.rows() * self.hidden;
        let y = dev.alloc(n * 2).unwrap();
        let bias = |p: u64| if self.biases { p } else { 0 };
        let a = MixFfnArgs {
            x: xd.ptr(),
            wi: wid.ptr(),
            bi: bias(bid.ptr()),
            wd: wdd.ptr(),
            bd: bias(bdd.ptr()),
            y: y.ptr(),
            batch: self.b,
            h: self.h,
            w: self.w,
            c: self.c,
            hidden: self.hidden,
        };
        let l = launcher(&a).unwrap();
        // SAFETY: every buffer holds the shapes launched.
        unsafe { enqueue(dev, std::slice::from_ref(&l)).unwrap() };
        dev.synchronize().unwrap();
        let mut out = vec![0u16; n];
        dev.copy_to_host(y.ptr(), &mut out).unwrap();
        (
            l,
            out.iter()
                .map(|&u| half::bf16::from_bits(u).to_f32())
                .collect(),
        )
    }
}

#[test]
fn mixffn_inverted_glu_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(13);
    for &(shape, biases) in &[
        ((1, 4, 4, 8, 5), true),
        ((3, 16, 16, 40, 20), true),
        ((1, 5, 7, 24, 17), false),
        ((2, 12, 32, 16, 18), true),
        ((1, 4, 4, 12, 6), true),
        ((1, 3, 5, 16, 70), true),
    ] {
        let case = Case::new(&mut rng, shape, biases);
        let Case {
            b, h, w, c, hidden, ..
        } = case;
        let c2 = 2 * hidden;
        let want = case.want();
        assert_eq!(
            want,
            case.two_op(DType::F32, false),
            "the CPU twin is the composition of the two ops"
        );

        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, h * w, c]).unwrap();
        let wii = gb.weight("wi", [c2, c]).unwrap();
        let bii = biases.then(|| gb.weight("bi", [c2]).unwrap());
        let wdi = gb.weight("wd", [c2, 1, 3, 3]).unwrap();
        let bdi = biases.then(|| gb.weight("bd", [c2]).unwrap());
        let y = gb
            .mixffn_inverted_glu("mixffn", xi, wii, bii, wdi, bdi, h, w)
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let mut weights = HashMap::from([
            ("wi".to_string(), tensor(&[c2, c], case.wi.clone())),
            ("wd".to_string(), tensor(&[c2, 1, 3, 3], case.wd.clone())),
        ]);
        if biases {
            weights.insert("bi".into(), tensor(&[c2], case.bi.clone()));
            weights.insert("bd".into(), tensor(&[c2], case.bd.clone()));
        }
        let inputs = HashMap::from([("x".to_string(), tensor(&[b, h * w, c], case.x.clone()))]);
        // Every selection (this is the only test of this binary that reads or sets OPENUNI_MIXFFN
        // or OPENUNI_KERNELS; the others launch directly).
        for (dtype, request, kernels) in [
            (DType::F32, "auto", ""),
            (DType::BF16, "two-op", ""),
            (DType::BF16, "auto", ""),
            (DType::BF16, "fused", "mma"),
        ] {
            std::env::set_var("OPENUNI_MIXFFN", request);
            std::env::set_var("OPENUNI_KERNELS", kernels);
            let path = mixffn_inverted_glu::select(
                mixffn_inverted_glu::request().unwrap(),
                mixffn_inverted_glu::sm90(&dev),
                dtype,
                c,
                h,
                w,
            );
            let applies = mixffn_inverted_glu::fused_band_applies(dtype, c, h, w).is_some();
            let expected = match (applies, request, kernels) {
                (false, _, _) | (_, "two-op", _) => Path::TwoOp,
                (true, "fused", "mma") => Path::Fused(h),
                _ => Path::Wgmma,
            };
            assert_eq!(path, expected, "the emulated GPU is sm_90a");
            let mut ex = CudaExecutor::new(&dev, &g, &weights, dtype, false).unwrap();
            let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
            let base = case.two_op(dtype, dtype == DType::BF16);
            check(
                &format!("mixffn_inverted_glu {dtype} {} {path:?}", case.name()),
                dtype,
                &got,
                &want,
                &base,
            );
        }
        std::env::remove_var("OPENUNI_KERNELS");
        std::env::remove_var("OPENUNI_MIXFFN");
    }
}

/// Bands with recomputed halo rows (latents wider than one block: the launcher supports them, the
/// executor does not pick them, see `fused_band`), launched directly on bf16 buffers: 12×32 (bands of
/// 6 rows, 8 GEMM rows), 7×80 (bands of 1 row between two halo rows), 2 images.
#[test]
fn mixffn_inverted_glu_bands_match_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(31);
    for &shape in &[(2, 12, 32, 16, 18), (1, 7, 80, 8, 70)] {
        let case = Case::new(&mut rng, shape, true);
        let (l, got) = case.launch(&dev, mixffn_inverted_glu::mixffn_inverted_glu);
        assert!(l.grid.1 > 1, "{} runs in bands", case.name());
        case.check_bf16("mixffn_inverted_glu bands", &got);
    }
}

/// The sm_90a kernel launched directly (bf16 buffers; the emulated GPU runs wgmma, TMA and
/// mbarriers as specified, docs/hopper.md): more k stages than the 4-deep ring (C 264 and 328: 5 and
/// 6 stages, 328 with a k tail of 8 channels), fewer than one (C 8), hidden not a multiple of the
/// 64-channel slice (the last slice's u box then holds gate rows: computed, never written), no biases,
/// latents of 16 and 35 tokens (the second consumer's box all zero fill) and 16×16 (both full).
#[test]
fn mixffn_inverted_glu_wgmma_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(90);
    for &(shape, biases) in &[
        ((2, 4, 4, 264, 70), true),
        ((1, 16, 16, 328, 20), true),
        ((3, 5, 7, 8, 5), false),
        ((1, 11, 13, 40, 64), true),
    ] {
        let case = Case::new(&mut rng, shape, biases);
        let (l, got) = case.launch(&dev, mixffn_inverted_glu::mixffn_inverted_glu_wgmma);
        let grid = (case.hidden.div_ceil(MF_HC) as u32, 1, case.b as u32);
        assert_eq!((l.grid, l.block.0 as usize), (grid, MF90_THREADS));
        case.check_bf16("mixffn_inverted_glu_bf16_wgmma", &got);
    }
}

/// The executor's `auto` choice on a GPU (`timed_choice`, exercised here on the emulated GPU, whose
/// events time the CPU): with nothing cached both paths are timed and the choice is written to the
/// cache file; a cached choice is returned as it is, without timing, also from a new process's view
/// of the file.
#[test]
fn mixffn_inverted_glu_timed_choice_is_cached() {
    let Some(dev) = device_or_skip() else { return };
    let (b, h, w, c, hidden) = (1, 4, 4, 16, 8);
    let mut rng = Rng::new(7);
    let bits = |v: &[f32]| {
        v.iter()
            .map(|&f| half::bf16::from_f32(f).to_bits())
            .collect::<Vec<u16>>()
    };
    let mut up = |n: usize| dev.upload(&bits(&rng.normals(n, 0.0, 0.5))).unwrap();
    let (xd, wid, bid, wdd, bdd) = (
        up(b * h * w * c),
        up(2 * hidden * c),
        up(2 * hidden),
        up(2 * hidden * 9),
        up(2 * hidden),
    );
    let (y, inverted) = (
        dev.alloc(b * h * w * hidden * 2).unwrap(),
        dev.alloc(b * h * w * 2 * hidden * 2).unwrap(),
    );
    let a = MixFfnArgs {
        x: xd.ptr(),
        wi: wid.ptr(),
        bi: bid.ptr(),
        wd: wdd.ptr(),
        bd: bdd.ptr(),
        y: y.ptr(),
        batch: b,
        h,
        w,
        c,
        hidden,
    };
    let fused = Step::Launches(vec![
        mixffn_inverted_glu::mixffn_inverted_glu_wgmma(&a).unwrap()
    ]);
    let blas = dev.blas().unwrap();
    let args = LinearArgs {
        dtype: DType::BF16,
        rows: b * h * w,
        in_features: c,
        out_features: 2 * hidden,
        epilogue: Epilogue::Bias,
        x: a.x,
        w: a.wi,
        bias: Some(a.bi),
        y: inverted.ptr(),
    };
    let gemm = LinearGemm::new(&dev, &blas, &args).unwrap();
    let dw = depthwise_conv3_glu(
        DType::BF16,
        inverted.ptr(),
        a.wd,
        a.bd,
        a.y,
        b,
        h,
        w,
        hidden,
        3,
        true,
    )
    .unwrap();
    let two_op = Step::GemmThen(gemm, blas.clone(), vec![dw]);

    let path =
        std::env::temp_dir().join(format!("openuni-mixffn-choice-{}.tsv", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let key = "test device mixffn_inverted_glu b1 4x4 c16 h8";
    let cache = AlgoCache::at(Some(path.clone()));
    let chose = mixffn_inverted_glu::timed_choice(&dev, &cache, key, &fused, &two_op).unwrap();
    let text = std::fs::read_to_string(&path).expect("the choice was written");
    assert!(
        text.contains(&format!("{key}\t{}", chose as usize)),
        "{text}"
    );
    // A cached choice is kept as it is, here the opposite of what the timing chose.
    let reread = AlgoCache::at(Some(path.clone()));
    reread.insert(key, (!chose) as usize);
    assert_eq!(
        mixffn_inverted_glu::timed_choice(
            &dev,
            &AlgoCache::at(Some(path.clone())),
            key,
            &fused,
            &two_op
        )
        .unwrap(),
        !chose
    );
    let _ = std::fs::remove_file(&path);
}

/// The sm_90a launcher refuses what its kernel does not compute, naming it (no device needed).
#[test]
fn mixffn_inverted_glu_wgmma_launcher_refuses_what_it_does_not_compute() {
    let a = MixFfnArgs {
        x: 256,
        wi: 512,
        bi: 0,
        wd: 0,
        bd: 0,
        y: 0,
        batch: 2,
        h: 16,
        w: 16,
        c: 1152,
        hidden: 2880,
    };
    let e = mixffn_inverted_glu::mixffn_inverted_glu_wgmma(&MixFfnArgs { h: 32, w: 32, ..a })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("32x32 latent") && e.contains(&format!("at most {MF_M} tokens")),
        "{e}"
    );
    let e = mixffn_inverted_glu::mixffn_inverted_glu_wgmma(&MixFfnArgs { c: 12, ..a })
        .unwrap_err()
        .to_string();
    assert!(e.contains("12 channels") && e.contains("C % 8 == 0"), "{e}");
    let e = mixffn_inverted_glu::mixffn_inverted_glu_wgmma(&MixFfnArgs { wi: 520, ..a })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv_inverted weight at 0x208 is not 16-byte aligned"),
        "{e}"
    );
    // A launch it computes: its tensor maps are encoded by the driver.
    let Some(_dev) = device_or_skip() else { return };
    let l = mixffn_inverted_glu::mixffn_inverted_glu_wgmma(&a).unwrap();
    assert_eq!(
        l.grid,
        (2880usize.div_ceil(MF_HC) as u32, 1, 2),
        "one block per image and MF_HC hidden channels"
    );
}

/// The fused launcher refuses what the kernel does not compute, naming it (no device needed).
#[test]
fn mixffn_inverted_glu_launcher_refuses_what_it_does_not_compute() {
    let a = MixFfnArgs {
        x: 256,
        wi: 512,
        bi: 0,
        wd: 0,
        bd: 0,
        y: 0,
        batch: 2,
        h: 16,
        w: 16,
        c: 1152,
        hidden: 2880,
    };
    let l = mixffn_inverted_glu::mixffn_inverted_glu(&a).unwrap();
    assert_eq!(
        (l.grid, l.block),
        ((2880usize.div_ceil(MF_HC) as u32, 1, 2), (256, 1, 1)),
        "one block per image and MF_HC hidden channels"
    );
    let banded =
        mixffn_inverted_glu::mixffn_inverted_glu(&MixFfnArgs { h: 32, w: 32, ..a }).unwrap();
    assert_eq!(
        banded.grid,
        (
            2880usize.div_ceil(MF_HC) as u32,
            32usize.div_ceil(MF_M / 32 - 2) as u32,
            2
        ),
        "bands with halo rows at 32x32"
    );
    let e = mixffn_inverted_glu::mixffn_inverted_glu(&MixFfnArgs { c: 12, ..a })
        .unwrap_err()
        .to_string();
    assert!(e.contains("12 channels") && e.contains("C % 8 == 0"), "{e}");
    let e = mixffn_inverted_glu::mixffn_inverted_glu(&MixFfnArgs { w: MF_M, ..a })
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("16x{MF_M} latent")), "{e}");
    let e = mixffn_inverted_glu::mixffn_inverted_glu(&MixFfnArgs { x: 8, ..a })
        .unwrap_err()
        .to_string();
    assert!(e.contains("x at 0x8 is not 16-byte aligned"), "{e}");
}
