//! kernels/conv_sm90.cu (the wgmma/TMA 3×3 conv and phase-upsample conv, issue 16 item 2) against
//! the CPU twins (openuni_cpu::ops::{conv2d, upsample_conv2d}) on random inputs, launched directly
//! (weights prepared by `conv3x3_weights_sm90`, then the conv), and through the executor, where
//! `conv::resolve` must pick them on an sm_90a device.
//!
//! Shapes chosen to hit every edge: grids that are not multiples of the 16×16 tile (5×7, 17×18),
//! input channels that are not a multiple of the 64-channel stage (8, 24, 72: the TMA's
//! out-of-bounds zero fill), output channels below, above and not a multiple of the 128-channel
//! tile (5, 36, 130, odd 5 for the scalar store path), B = 2; the fused epilogues (bias, SiLU,
//! residual; bias + pixel-shuffle shortcut).
//!
//! Tolerance (openuni_cuda::testing::check): relative L2 <= 2x that of a plain bf16 run (the CPU
//! twin on bf16-rounded inputs, its output rounded to bf16). The mutants of the same kernel
//! (wrong swizzle, early release, missing wait, wrong parity) are in crates/emu/tests/conv_sm90.rs.
//! Without a CUDA device: `skipped: no CUDA device`; on a device that is not sm_90a:
//! `skipped: not an sm_90a device`.

use std::collections::HashMap;
use std::sync::Arc;

use openuni_cpu::ops as cpu;
use openuni_cuda::families::conv::{Conv2dArgs, ConvAct, UpsampleConv2dArgs};
use openuni_cuda::families::conv_sm90::{self, geometry};
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor, DeviceBuffer, KArg};
use openuni_graph::GraphBuilder;
use openuni_tensor::{DType, HostTensor};

const BF: DType = DType::BF16;

fn sm90_device() -> Option<Arc<CudaDevice>> {
    let dev = device_or_skip()?;
    if !conv_sm90::device_supports(&dev) {
        println!(
            "skipped: not an sm_90a device ({:?}, kernels for {})",
            dev.compute_capability(),
            dev.kernels().target().arch
        );
        return None;
    }
    Some(dev)
}

fn upload(dev: &CudaDevice, v: &[f32]) -> (DeviceBuffer, u64) {
    let h: Vec<u16> = v
        .iter()
        .map(|&f| half::bf16::from_f32(f).to_bits())
        .collect();
    let buf = dev.alloc(h.len().max(1) * 2).unwrap();
    dev.copy_to_device(&h, buf.ptr()).unwrap();
    let p = buf.ptr();
    (buf, p)
}

fn download(dev: &CudaDevice, p: u64, n: usize) -> Vec<f32> {
    let mut o = vec![0u16; n];
    dev.copy_to_host(p, &mut o).unwrap();
    o.into_iter()
        .map(|b| half::bf16::from_bits(b).to_f32())
        .collect()
}

/// The weights in the kernels' layout, made on the device.
fn prepare(dev: &CudaDevice, w: u64, cin: usize, cout: usize, upsample: bool) -> DeviceBuffer {
    let out = dev
        .alloc(conv_sm90::prepared_weight_bytes(cin, cout, upsample))
        .unwrap();
    let l = conv_sm90::prepare_weights(dev.sm_count(), w, out.ptr(), cin, cout, upsample).unwrap();
    // SAFETY: w holds [cout, cin, 3, 3] bf16, out prepared_weight_bytes.
    unsafe { l.enqueue(dev).unwrap() };
    out
}

#[test]
fn conv_sm90_geometry_matches_the_launcher() {
    let Some(dev) = sm90_device() else { return };
    let out = dev.alloc(8 * 4).unwrap();
    // SAFETY: the kernel writes 8 ints.
    unsafe {
        dev.launch(
            "conv_sm90_geometry",
            (1, 1, 1),
            (32, 1, 1),
            0,
            &[KArg::Ptr(out.ptr())],
        )
        .unwrap()
    };
    let mut got = vec![0i32; 8];
    dev.copy_to_host(out.ptr(), &mut got).unwrap();
    let want = [
        geometry::C90_BOX_H,
        geometry::C90_TILE_W,
        geometry::C90_CONSUMERS,
        geometry::C90_TILE_N,
        geometry::C90_CHUNK,
        geometry::C90_STAGES,
        geometry::C90_THREADS,
        geometry::C90_SMEM,
    ];
    assert_eq!(got, want.map(|v| v as i32));
}

/// The prepared weights, exactly: taps transposed; phase taps summed in f32 (rows, then columns)
/// and rounded once.
#[test]
fn prepared_weights_are_the_upstream_weights_rearranged() {
    let Some(dev) = sm90_device() else { return };
    let (cin, cout) = (8usize, 3usize);
    let mut rng = Rng::new(5);
    let w = round_to(BF, &rng.normals(cout * cin * 9, 0.0, 1.0));
    let (_wb, wp) = upload(&dev, &w);
    let at = |n: usize, c: usize, dy: usize, dx: usize| w[(n * cin + c) * 9 + 3 * dy + dx];
    let taps = prepare(&dev, wp, cin, cout, false);
    let got = download(&dev, taps.ptr(), 9 * cout * cin);
    for t in 0..9 {
        for n in 0..cout {
            for c in 0..cin {
                assert_eq!(
                    got[(t * cout + n) * cin + c],
                    at(n, c, t / 3, t % 3),
                    "tap {t}, n {n}, c {c}"
                );
            }
        }
    }
    let phases = prepare(&dev, wp, cin, cout, true);
    let got = download(&dev, phases.ptr(), 16 * cout * cin);
    // Row group r of parity p: the 3x3 rows it sums (p = 0: {0}, {1, 2}; p = 1: {0, 1}, {2}).
    let group = |p: usize, r: usize| -> &'static [usize] {
        match (p, r) {
            (0, 0) => &[0],
            (0, _) => &[1, 2],
            (_, 0) => &[0, 1],
            _ => &[2],
        }
    };
    for (pi, pj, r, s) in (0..16).map(|z| (z >> 3, (z >> 2) & 1, (z >> 1) & 1, z & 1)) {
        let z = 8 * pi + 4 * pj + 2 * r + s;
        for n in 0..cout {
            for c in 0..cin {
                let rows: Vec<f32> = (0..3)
                    .map(|dx| group(pi, r).iter().map(|&dy| at(n, c, dy, dx)).sum())
                    .collect();
                let v: f32 = group(pj, s).iter().map(|&dx| rows[dx]).sum();
                assert_eq!(
                    got[(z * cout + n) * cin + c],
                    round_to(BF, &[v])[0],
                    "phase ({pi},{pj}) tap ({r},{s})"
                );
            }
        }
    }
}

#[test]
fn conv2d_sm90_matches_cpu() {
    let Some(dev) = sm90_device() else { return };
    let mut rng = Rng::new(31);
    // (batch, h, w, cin, cout, bias, silu, residual)
    let cases: &[(usize, usize, usize, usize, usize, bool, bool, bool)] = &[
        (1, 5, 7, 8, 5, true, false, false),
        (2, 3, 17, 24, 36, false, true, true),
        (1, 17, 9, 72, 130, true, true, true),
        (1, 16, 16, 64, 128, true, false, false),
        (1, 4, 6, 16, 7, true, true, true), // odd cout: the epilogue's element-wise path with SiLU and residual
    ];
    for &(b, h, w, cin, cout, with_bias, silu, with_res) in cases {
        let n = b * h * w * cout;
        let x = rng.normals(b * h * w * cin, 0.1, 1.0);
        let wt = rng.normals(cout * cin * 9, 0.0, 1.0 / ((cin * 9) as f32).sqrt());
        let bias = rng.normals(cout, 0.0, 0.5);
        let res = rng.normals(n, 0.0, 1.0);
        let twin = |x: &[f32], wt: &[f32], bias: &[f32], res: &[f32]| -> Vec<f32> {
            let mut o = vec![0.0; n];
            cpu::conv2d(
                x,
                wt,
                with_bias.then_some(bias),
                b,
                h,
                w,
                cin,
                cout,
                3,
                &mut o,
            );
            o.iter()
                .zip(res)
                .map(|(&v, &r)| {
                    (if silu { cpu::silu(v) } else { v }) + if with_res { r } else { 0.0 }
                })
                .collect()
        };
        let want = twin(&x, &wt, &bias, &res);
        let base = twin(
            &round_to(BF, &x),
            &round_to(BF, &wt),
            &round_to(BF, &bias),
            &round_to(BF, &res),
        );
        let (_xb, xp) = upload(&dev, &x);
        let (_wb, wp) = upload(&dev, &wt);
        let (_bb, bp) = upload(&dev, &bias);
        let (_rb, rp) = upload(&dev, &res);
        let (_yb, yp) = upload(&dev, &vec![f32::NAN; n]);
        let a = Conv2dArgs {
            dtype: BF,
            x: xp,
            weight: wp,
            bias: if with_bias { bp } else { 0 },
            residual: if with_res { rp } else { 0 },
            y: yp,
            batch: b,
            h,
            w,
            cin,
            cout,
            kernel: 3,
            act: if silu { ConvAct::Silu } else { ConvAct::None },
        };
        let prepared = prepare(&dev, wp, cin, cout, false);
        let l = conv_sm90::conv2d(&a, prepared.ptr()).unwrap();
        // SAFETY: every buffer holds the shapes launched.
        unsafe { l.enqueue(&dev).unwrap() };
        let got = download(&dev, yp, n);
        check(
            &format!("{} [{b}, {h}x{w}, {cin}] -> {cout} bias={with_bias} silu={silu} residual={with_res}", l.kernel),
            BF,
            &got,
            &want,
            &base,
        );
    }
}

#[test]
fn upsample_conv2d_sm90_matches_cpu() {
    let Some(dev) = sm90_device() else { return };
    let mut rng = Rng::new(32);
    // (batch, h, w, cin, cout, bias, shortcut): shortcut repeats R = 4 cout / cin of 6 and 2.
    let cases: &[(usize, usize, usize, usize, usize, bool, bool)] = &[
        (2, 3, 5, 16, 24, true, true),
        (1, 9, 17, 72, 36, true, true),
        (1, 4, 3, 8, 130, false, false),
    ];
    for &(b, h, w, cin, cout, with_bias, shortcut) in cases {
        let n = 4 * b * h * w * cout;
        let x = rng.normals(b * h * w * cin, 0.1, 1.0);
        let wt = rng.normals(cout * cin * 9, 0.0, 1.0 / ((cin * 9) as f32).sqrt());
        let bias = rng.normals(cout, 0.0, 0.5);
        let twin = |x: &[f32], wt: &[f32], bias: &[f32]| -> Vec<f32> {
            let mut o = vec![0.0; n];
            cpu::upsample_conv2d(
                x,
                wt,
                with_bias.then_some(bias),
                b,
                h,
                w,
                cin,
                cout,
                shortcut,
                &mut o,
            );
            o
        };
        let want = twin(&x, &wt, &bias);
        let base = twin(&round_to(BF, &x), &round_to(BF, &wt), &round_to(BF, &bias));
        let (_xb, xp) = upload(&dev, &x);
        let (_wb, wp) = upload(&dev, &wt);
        let (_bb, bp) = upload(&dev, &bias);
        let (_yb, yp) = upload(&dev, &vec![f32::NAN; n]);
        let a = UpsampleConv2dArgs {
            dtype: BF,
            x: xp,
            weight: wp,
            bias: if with_bias { bp } else { 0 },
            y: yp,
            batch: b,
            h,
            w,
            cin,
            cout,
            shortcut,
        };
        let prepared = prepare(&dev, wp, cin, cout, true);
        let l = conv_sm90::upsample_conv2d(&a, prepared.ptr()).unwrap();
        // SAFETY: every buffer holds the shapes launched.
        unsafe { l.enqueue(&dev).unwrap() };
        let got = download(&dev, yp, n);
        check(
            &format!("{} [{b}, {h}x{w}, {cin}] -> [{b}, {}x{}, {cout}] bias={with_bias} shortcut={shortcut}", l.kernel, 2 * h, 2 * w),
            BF,
            &got,
            &want,
            &base,
        );
    }
}

/// Through the executor: a 3×3 conv feeding an upsample conv (bf16), on the sm_90a kernels (the
/// emulated GPU and an H100 select them; `OPENUNI_KERNELS=mma` would force conv.cu's), against
/// the CPU twins; and the selection rule on shapes that do not qualify.
#[test]
fn executor_selects_the_sm90_kernels_and_matches_cpu() {
    let Some(dev) = sm90_device() else { return };
    if conv_sm90::forced_mma() {
        println!(
            "skipped: {}=mma forces the mma.sync kernels",
            conv_sm90::KERNELS_ENV
        );
        return;
    }
    assert!(conv_sm90::selected(&dev));
    let (b, h, w, cin, mid, cout) = (1usize, 6usize, 5usize, 72usize, 64usize, 128usize);
    let mut rng = Rng::new(33);
    let x = rng.normals(b * h * w * cin, 0.1, 1.0);
    let w1 = rng.normals(mid * cin * 9, 0.0, 1.0 / ((cin * 9) as f32).sqrt());
    let b1 = rng.normals(mid, 0.0, 0.5);
    let w2 = rng.normals(cout * mid * 9, 0.0, 1.0 / ((mid * 9) as f32).sqrt());
    let mut gb = GraphBuilder::new();
    let xi = gb.input("x", [b, h * w, cin]).unwrap();
    let w1i = gb.weight("w1", [mid, cin, 3, 3]).unwrap();
    let b1i = gb.weight("b1", [mid]).unwrap();
    let w2i = gb.weight("w2", [cout, mid, 3, 3]).unwrap();
    let c = gb
        .conv2d("conv", xi, w1i, Some(b1i), h, w, 3, true)
        .unwrap();
    let y = gb.upsample_conv2d("up", c, w2i, None, h, w, true).unwrap();
    gb.output("y", y).unwrap();
    let g = gb.finish();
    let twin = |x: &[f32], w1: &[f32], b1: &[f32], w2: &[f32], round: bool| -> Vec<f32> {
        let mut m = vec![0.0; b * h * w * mid];
        cpu::conv2d(x, w1, Some(b1), b, h, w, cin, mid, 3, &mut m);
        m.iter_mut().for_each(|v| *v = cpu::silu(*v));
        if round {
            m = round_to(BF, &m);
        }
        let mut o = vec![0.0; 4 * b * h * w * cout];
        cpu::upsample_conv2d(&m, w2, None, b, h, w, mid, cout, true, &mut o);
        o
    };
    let want = twin(&x, &w1, &b1, &w2, false);
    let r = |v: &[f32]| round_to(BF, v);
    let base = twin(&r(&x), &r(&w1), &r(&b1), &r(&w2), true);
    let t = |s: &[usize], v: &[f32]| HostTensor::from_f32(s.to_vec(), v.to_vec()).unwrap();
    let weights: HashMap<String, HostTensor> = [
        ("w1".to_string(), t(&[mid, cin, 3, 3], &w1)),
        ("b1".to_string(), t(&[mid], &b1)),
        ("w2".to_string(), t(&[cout, mid, 3, 3], &w2)),
    ]
    .into();
    let inputs: HashMap<String, HostTensor> = [("x".to_string(), t(&[b, h * w, cin], &x))].into();
    let mut ex = CudaExecutor::new(&dev, &g, &weights, BF, false).unwrap();
    let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
    check(
        "executor conv2d -> upsample_conv2d (sm_90a)",
        BF,
        &got,
        &want,
        &base,
    );
    // Both nodes took the sm_90a path: their prepared weights are the executor's resources.
    let prepared = conv_sm90::prepared_weight_bytes(cin, mid, false)
        + conv_sm90::prepared_weight_bytes(mid, cout, true);
    assert!(
        ex.resource_bytes() >= prepared,
        "{} bytes of resources, {prepared} prepared weight bytes expected",
        ex.resource_bytes()
    );

    // The rule: bf16, 3×3, cin % 8 == 0, x 16-byte aligned, at least 64 channels in and out.
    let a = Conv2dArgs {
        dtype: BF,
        x: 0x1000,
        weight: 0x2000,
        bias: 0,
        residual: 0,
        y: 0x3000,
        batch: 1,
        h: 4,
        w: 4,
        cin: 64,
        cout: 64,
        kernel: 3,
        act: ConvAct::None,
    };
    assert!(conv_sm90::conv2d_qualifies(&a));
    assert!(!conv_sm90::conv2d_qualifies(&Conv2dArgs { cin: 68, ..a }));
    assert!(!conv_sm90::conv2d_qualifies(&Conv2dArgs { cin: 32, ..a }));
    assert!(!conv_sm90::conv2d_qualifies(&Conv2dArgs { cout: 3, ..a }));
    assert!(!conv_sm90::conv2d_qualifies(&Conv2dArgs { x: 0x1002, ..a }));
    assert!(!conv_sm90::conv2d_qualifies(&Conv2dArgs { kernel: 5, ..a }));
    assert!(!conv_sm90::conv2d_qualifies(&Conv2dArgs {
        dtype: DType::F32,
        ..a
    }));
}
