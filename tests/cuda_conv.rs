//! kernels/conv.cu against its CPU twins (openuni_cpu::ops::{conv2d, upsample_conv2d,
//! depthwise_conv2d, depthwise_conv_glu, grouped_linear, repeat_channels}) on random inputs:
//! one-node graphs through the CUDA executor (f32 and bf16 storage), and the conv2d kernels
//! launched directly for what no graph op reaches (the fused SiLU + residual epilogue, the CUDA-core kernel on 3×3 bf16,
//! misaligned pointers: element-wise paths on the CUDA cores, a clear launcher error on the tensor
//! cores, whose vector loads need the alignment).
//!
//! Shapes: odd channel counts (3, 5, 7, 9, 70), channel counts that are not a multiple of the
//! 16-channel chunk (24), non-square grids, 1×1 and 3×4 grids, grids that cross the 8×16 tile
//! (9×17, 17×33), more than one 64-channel output tile, the 128-channel tile of the tensor-core
//! kernels (Cout 128, 256; also with Cin % 8 != 0), more input chunks than cp.async stages, B = 2.
//! The tensor-core kernels also run with the emulator's ldmatrix bank-conflict check
//! (OU_LDMATRIX_BANK_CHECK in conv.cu): a conflicting shared-memory layout fails their launches.
//!
//! Tolerances (openuni_cuda::testing::check), against the CPU twin on the f32 inputs: f32 storage,
//! relative L2 <= 1e-5; bf16 storage, <= 2x the relative L2 error of a plain bf16 run (the CPU twin
//! on the inputs rounded to bf16, its output rounded to bf16). The data-movement kernels are exact
//! in both storage types (their bf16 error equals the plain run's).
//! Without a CUDA device (real or emulated) every test prints `skipped: no CUDA device`.

use std::collections::HashMap;
use std::sync::Arc;

use openuni_cpu::ops as cpu;
use openuni_cuda::families::conv::{
    self, Conv2dArgs, ConvAct, ConvKernel, ConvWeightLayout, UpsampleConv2dArgs,
};
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor, DeviceBuffer};
use openuni_graph::{Graph, GraphBuilder};
use openuni_tensor::{DType, HostTensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), v).unwrap()
}

fn run(
    dev: &Arc<CudaDevice>,
    g: &Graph,
    w: &HashMap<String, HostTensor>,
    inputs: &HashMap<String, HostTensor>,
    dtype: DType,
) -> Vec<f32> {
    let mut ex = CudaExecutor::new(dev, g, w, dtype, false).unwrap();
    let out = ex.run(inputs).unwrap();
    out["y"].to_f32_vec()
}

/// Runs a one-input graph in both storage types and checks it against `twin` (called on the f32
/// inputs and on the inputs rounded to each storage type).
fn check_graph(
    dev: &Arc<CudaDevice>,
    what: &str,
    g: &Graph,
    inputs: &[(&str, &[usize], &[f32])],
    weights: &[(&str, &[usize], &[f32])],
    twin: &dyn Fn(&[Vec<f32>], &[Vec<f32>]) -> Vec<f32>,
) {
    let iv: Vec<Vec<f32>> = inputs.iter().map(|(_, _, v)| v.to_vec()).collect();
    let wv: Vec<Vec<f32>> = weights.iter().map(|(_, _, v)| v.to_vec()).collect();
    let want = twin(&iv, &wv);
    let ins: HashMap<String, HostTensor> = inputs
        .iter()
        .map(|(n, s, v)| (n.to_string(), tensor(s, v.to_vec())))
        .collect();
    let ws: HashMap<String, HostTensor> = weights
        .iter()
        .map(|(n, s, v)| (n.to_string(), tensor(s, v.to_vec())))
        .collect();
    for dtype in DTYPES {
        let got = run(dev, g, &ws, &ins, dtype);
        let r =
            |v: &[Vec<f32>]| -> Vec<Vec<f32>> { v.iter().map(|x| round_to(dtype, x)).collect() };
        let base = twin(&r(&iv), &r(&wv));
        check(&format!("{what} {dtype}"), dtype, &got, &want, &base);
    }
}

#[test]
fn conv2d_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(11);
    // (batch, h, w, cin, cout, kernel, bias, fused SiLU)
    let cases: &[(usize, usize, usize, usize, usize, usize, bool, bool)] = &[
        (2, 3, 4, 4, 8, 3, true, false),
        (1, 1, 1, 8, 4, 3, true, false),
        (2, 9, 17, 16, 32, 3, false, true),
        (1, 5, 7, 3, 5, 3, true, false),
        (2, 4, 3, 64, 16, 3, true, false),
        (1, 17, 33, 24, 70, 3, true, true),
        (1, 11, 20, 32, 64, 3, true, false),
        (1, 6, 5, 7, 9, 1, true, false),
        (2, 7, 9, 8, 8, 5, false, true),
        (1, 3, 4, 5, 3, 7, true, false),
        (1, 9, 17, 80, 128, 3, true, true),
        (2, 3, 5, 20, 256, 3, false, false),
    ];
    for &(b, h, w, cin, cout, k, with_bias, silu) in cases {
        let x = rng.normals(b * h * w * cin, 0.1, 1.0);
        let wt = rng.normals(cout * cin * k * k, 0.0, 1.0 / ((cin * k * k) as f32).sqrt());
        let bias = rng.normals(cout, 0.0, 0.5);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, h * w, cin]).unwrap();
        let wi = gb.weight("w", [cout, cin, k, k]).unwrap();
        let bi = with_bias.then(|| gb.weight("b", [cout]).unwrap());
        let y = gb.conv2d("conv", xi, wi, bi, h, w, k, silu).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let (ws, bs) = ([cout, cin, k, k], [cout]);
        let mut weights: Vec<(&str, &[usize], &[f32])> = vec![("w", &ws, &wt)];
        if with_bias {
            weights.push(("b", &bs, &bias));
        }
        check_graph(
            &dev,
            &format!("conv2d {k}x{k} [{b}, {h}x{w}, {cin}] -> {cout} bias={with_bias} silu={silu}"),
            &g,
            &[("x", &[b, h * w, cin], &x)],
            &weights,
            &|i, wv| {
                let mut o = vec![0.0; b * h * w * cout];
                cpu::conv2d(
                    &i[0],
                    &wv[0],
                    wv.get(1).map(|v| &v[..]),
                    b,
                    h,
                    w,
                    cin,
                    cout,
                    k,
                    &mut o,
                );
                if silu {
                    o.iter_mut().for_each(|v| *v = cpu::silu(*v));
                }
                o
            },
        );
    }
}

fn upload(dev: &CudaDevice, dtype: DType, v: &[f32], offset_elems: usize) -> (DeviceBuffer, u64) {
    let es = dtype.size_in_bytes();
    let buf = dev.alloc((v.len() + offset_elems) * es).unwrap();
    let p = buf.ptr() + (offset_elems * es) as u64;
    match dtype {
        DType::F32 => dev.copy_to_device(v, p).unwrap(),
        _ => {
            let h: Vec<u16> = v
                .iter()
                .map(|&f| half::bf16::from_f32(f).to_bits())
                .collect();
            dev.copy_to_device(&h, p).unwrap()
        }
    }
    (buf, p)
}

fn download(dev: &CudaDevice, dtype: DType, p: u64, n: usize) -> Vec<f32> {
    match dtype {
        DType::F32 => {
            let mut o = vec![0f32; n];
            dev.copy_to_host(p, &mut o).unwrap();
            o
        }
        _ => {
            let mut o = vec![0u16; n];
            dev.copy_to_host(p, &mut o).unwrap();
            o.into_iter()
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect()
        }
    }
}

/// The weight as the kernel of `launch` reads it: prepared for the tensor-core kernels, upstream otherwise.
fn kernel_weight(
    kernel: &str,
    layout: ConvWeightLayout,
    wt: &[f32],
    cout: usize,
    cin: usize,
) -> Vec<f32> {
    if kernel.contains("_tc") {
        conv::prepare_conv_weight(layout, wt, cout, cin)
    } else {
        wt.to_vec()
    }
}

/// The conv2d kernels launched directly: the fused epilogue `silu(conv + bias) + residual`, both
/// kernels on bf16 3×3, and pointers one element off a 16-byte boundary: element-wise loads and
/// stores on the CUDA cores; on the tensor cores, whose cp.async needs 16-byte x and weight, a
/// launcher error naming the tensor and the alignment (never a silent fallback).
#[test]
fn conv2d_kernels_with_fused_epilogue_and_misaligned_pointers() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(12);
    // (batch, h, w, cin, cout)
    for &(b, h, w, cin, cout) in &[
        (2usize, 5usize, 18usize, 16usize, 24usize),
        (1, 9, 4, 9, 7),
        (1, 3, 4, 32, 66),
        (1, 2, 9, 16, 128),
    ] {
        let k = 3;
        let x = rng.normals(b * h * w * cin, 0.0, 1.0);
        let wt = rng.normals(cout * cin * k * k, 0.0, 1.0 / ((cin * k * k) as f32).sqrt());
        let bias = rng.normals(cout, 0.0, 0.5);
        let res = rng.normals(b * h * w * cout, 0.0, 1.0);
        let n = b * h * w * cout;
        let twin = |x: &[f32], wt: &[f32], bias: &[f32], res: &[f32]| -> Vec<f32> {
            let mut o = vec![0.0; n];
            cpu::conv2d(x, wt, Some(bias), b, h, w, cin, cout, k, &mut o);
            o.iter().zip(res).map(|(&v, &r)| cpu::silu(v) + r).collect()
        };
        let want = twin(&x, &wt, &bias, &res);
        for dtype in DTYPES {
            let r = |v: &[f32]| round_to(dtype, v);
            let base = twin(&r(&x), &r(&wt), &r(&bias), &r(&res));
            let kernels: &[ConvKernel] = if dtype == DType::BF16 {
                &[ConvKernel::Auto, ConvKernel::Direct]
            } else {
                &[ConvKernel::Auto]
            };
            for &choice in kernels {
                for misalign in [0usize, 1] {
                    // The kernel this choice launches (the launch builder decides from the shape alone).
                    let probe = Conv2dArgs {
                        dtype,
                        x: 0,
                        weight: 0,
                        bias: 0,
                        residual: 0,
                        y: 0,
                        batch: b,
                        h,
                        w,
                        cin,
                        cout,
                        kernel: k,
                        act: ConvAct::Silu,
                    };
                    let kernel = conv::conv2d(&probe, choice).unwrap().kernel;
                    let (_xb, xp) = upload(&dev, dtype, &x, misalign);
                    let (_wb, wp) = upload(
                        &dev,
                        dtype,
                        &kernel_weight(&kernel, ConvWeightLayout::Taps3x3, &wt, cout, cin),
                        misalign,
                    );
                    let (_bb, bp) = upload(&dev, dtype, &bias, misalign);
                    let (_rb, rp) = upload(&dev, dtype, &res, misalign);
                    let (yb, yp) = upload(&dev, dtype, &vec![f32::NAN; n], misalign);
                    let a = Conv2dArgs {
                        dtype,
                        x: xp,
                        weight: wp,
                        bias: bp,
                        residual: rp,
                        y: yp,
                        batch: b,
                        h,
                        w,
                        cin,
                        cout,
                        kernel: k,
                        act: ConvAct::Silu,
                    };
                    if misalign == 1 && kernel.contains("_tc") {
                        let e = conv::conv2d(&a, choice)
                            .err()
                            .expect("a misaligned tensor-core conv must be refused")
                            .to_string();
                        let tensor = if cin % 8 == 0 { "x at" } else { "weight at" };
                        assert!(
                            e.contains(tensor) && e.contains("16-byte aligned"),
                            "{kernel}: {e}"
                        );
                        println!("{kernel} misaligned: {e}");
                        continue;
                    }
                    let l = conv::conv2d(&a, choice).unwrap();
                    if misalign == 0 && dtype == DType::BF16 {
                        println!(
                            "{}: {} bytes of dynamic shared memory, grid {:?}",
                            l.kernel, l.smem, l.grid
                        );
                    }
                    // SAFETY: every buffer holds the shapes launched.
                    unsafe { l.enqueue(&dev).unwrap() };
                    let got = download(&dev, dtype, yp, n);
                    check(
                        &format!("{} silu+residual [{b}, {h}x{w}, {cin}] -> {cout} misaligned={misalign}", l.kernel),
                        dtype,
                        &got,
                        &want,
                        &base,
                    );
                    drop(yb);
                }
            }
        }
    }
}

/// The fused DCUpBlock2d op (`Op::UpsampleConv2d`): bf16 through the four 2×2 phase convolutions
/// on the tensor cores, f32 on the CUDA cores.
#[test]
fn upsample_conv2d_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(21);
    // (batch, h, w, cin, cout, bias, shortcut): R = 4 cout / cin = 4 and 2 as in the decoder, an
    // odd channel count, no shortcut where 4 cout is not a multiple of cin, a low-resolution grid
    // crossing the 8x16 tile, more than one 64-channel output tile.
    let cases: &[(usize, usize, usize, usize, usize, bool, bool)] = &[
        (2, 3, 4, 8, 8, true, true),
        (1, 1, 1, 16, 8, true, true),
        (1, 5, 9, 24, 12, false, true),
        (1, 9, 17, 16, 16, true, true),
        (1, 3, 2, 6, 3, true, true),
        (2, 2, 3, 3, 5, true, false),
        (1, 4, 4, 32, 70, true, false),
        (1, 3, 9, 64, 128, true, true),
        (1, 2, 3, 12, 128, true, false),
    ];
    for &(b, h, w, cin, cout, with_bias, shortcut) in cases {
        let x = rng.normals(b * h * w * cin, 0.1, 1.0);
        let wt = rng.normals(cout * cin * 9, 0.0, 1.0 / ((cin * 9) as f32).sqrt());
        let bias = rng.normals(cout, 0.0, 0.5);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, h * w, cin]).unwrap();
        let wi = gb.weight("w", [cout, cin, 3, 3]).unwrap();
        let bi = with_bias.then(|| gb.weight("b", [cout]).unwrap());
        let y = gb
            .upsample_conv2d("up", xi, wi, bi, h, w, shortcut)
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let (ws, bs) = ([cout, cin, 3, 3], [cout]);
        let mut weights: Vec<(&str, &[usize], &[f32])> = vec![("w", &ws, &wt)];
        if with_bias {
            weights.push(("b", &bs, &bias));
        }
        check_graph(
            &dev,
            &format!("upsample_conv2d [{b}, {h}x{w}, {cin}] -> [{b}, {}x{}, {cout}] bias={with_bias} shortcut={shortcut}", 2 * h, 2 * w),
            &g,
            &[("x", &[b, h * w, cin], &x)],
            &weights,
            &|i, wv| {
                let mut o = vec![0.0; 4 * b * h * w * cout];
                cpu::upsample_conv2d(&i[0], &wv[0], wv.get(1).map(|v| &v[..]), b, h, w, cin, cout, shortcut, &mut o);
                o
            },
        );
    }
}

/// Both upsample-conv kernels on bf16, with pointers one element off a 16-byte boundary: the
/// CUDA-core kernel computes, the tensor-core launcher refuses with the tensor and the alignment.
#[test]
fn upsample_conv2d_kernels_on_misaligned_pointers() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(22);
    let (b, h, w, cin, cout) = (2usize, 3usize, 5usize, 16usize, 8usize);
    let x = rng.normals(b * h * w * cin, 0.0, 1.0);
    let wt = rng.normals(cout * cin * 9, 0.0, 1.0 / ((cin * 9) as f32).sqrt());
    let bias = rng.normals(cout, 0.0, 0.5);
    let n = 4 * b * h * w * cout;
    let twin = |x: &[f32], wt: &[f32], bias: &[f32]| {
        let mut o = vec![0.0; n];
        cpu::upsample_conv2d(x, wt, Some(bias), b, h, w, cin, cout, true, &mut o);
        o
    };
    let want = twin(&x, &wt, &bias);
    for dtype in DTYPES {
        let r = |v: &[f32]| round_to(dtype, v);
        let base = twin(&r(&x), &r(&wt), &r(&bias));
        for choice in [ConvKernel::Auto, ConvKernel::Direct] {
            for misalign in [0usize, 1] {
                let probe = UpsampleConv2dArgs {
                    dtype,
                    x: 0,
                    weight: 0,
                    bias: 0,
                    y: 0,
                    batch: b,
                    h,
                    w,
                    cin,
                    cout,
                    shortcut: true,
                };
                let kernel = conv::upsample_conv2d(&probe, choice).unwrap().kernel;
                let (_xb, xp) = upload(&dev, dtype, &x, misalign);
                let (_wb, wp) = upload(
                    &dev,
                    dtype,
                    &kernel_weight(&kernel, ConvWeightLayout::UpsamplePhases, &wt, cout, cin),
                    misalign,
                );
                let (_bb, bp) = upload(&dev, dtype, &bias, misalign);
                let (_yb, yp) = upload(&dev, dtype, &vec![f32::NAN; n], misalign);
                let a = UpsampleConv2dArgs {
                    dtype,
                    x: xp,
                    weight: wp,
                    bias: bp,
                    y: yp,
                    batch: b,
                    h,
                    w,
                    cin,
                    cout,
                    shortcut: true,
                };
                if misalign == 1 && kernel.contains("_tc") {
                    let e = conv::upsample_conv2d(&a, choice)
                        .err()
                        .expect("a misaligned tensor-core upsample conv must be refused")
                        .to_string();
                    assert!(
                        e.contains("x at") && e.contains("16-byte aligned"),
                        "{kernel}: {e}"
                    );
                    println!("{kernel} misaligned: {e}");
                    continue;
                }
                let l = conv::upsample_conv2d(&a, choice).unwrap();
                // SAFETY: every buffer holds the shapes launched.
                unsafe { l.enqueue(&dev).unwrap() };
                check(
                    &format!("{} misaligned={misalign}", l.kernel),
                    dtype,
                    &download(&dev, dtype, yp, n),
                    &want,
                    &base,
                );
            }
        }
    }
}

#[test]
fn depthwise_conv2d_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(13);
    // (batch, h, w, c, kernel, bias)
    let cases: &[(usize, usize, usize, usize, usize, bool)] = &[
        (2, 3, 4, 8, 3, true),
        (1, 1, 1, 4, 5, false),
        (2, 9, 7, 12, 5, false),
        (1, 6, 10, 7, 3, true),
        (1, 5, 6, 6, 7, true),
        (2, 4, 3, 3, 1, true),
        (1, 13, 5, 96, 3, true),
        (1, 6, 3, 260, 5, true),
        (2, 3, 5, 133, 3, false),
    ];
    for &(b, h, w, c, k, with_bias) in cases {
        let x = rng.normals(b * h * w * c, 0.1, 1.0);
        let wt = rng.normals(c * k * k, 0.0, 1.0 / k as f32);
        let bias = rng.normals(c, 0.0, 0.5);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, h * w, c]).unwrap();
        let wi = gb.weight("w", [c, 1, k, k]).unwrap();
        let bi = with_bias.then(|| gb.weight("b", [c]).unwrap());
        let y = gb.depthwise_conv2d("dw", xi, wi, bi, h, w, k).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let (ws, bs) = ([c, 1, k, k], [c]);
        let mut weights: Vec<(&str, &[usize], &[f32])> = vec![("w", &ws, &wt)];
        if with_bias {
            weights.push(("b", &bs, &bias));
        }
        check_graph(
            &dev,
            &format!("depthwise_conv2d {k}x{k} [{b}, {h}x{w}, {c}] bias={with_bias}"),
            &g,
            &[("x", &[b, h * w, c], &x)],
            &weights,
            &|i, wv| {
                let mut o = vec![0.0; b * h * w * c];
                cpu::depthwise_conv2d(
                    &i[0],
                    &wv[0],
                    wv.get(1).map(|v| &v[..]),
                    b,
                    h,
                    w,
                    c,
                    k,
                    &mut o,
                );
                o
            },
        );
    }
}

#[test]
fn grouped_linear_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(14);
    // (batch, tokens, cin, cout, groups): DC-AE's 32 -> 32 groups, uneven groups, more than one
    // 128-row block, more than one 32-output tile.
    for &(b, n, cin, cout, groups) in &[
        (2usize, 12usize, 96usize, 96usize, 3usize),
        (1, 7, 12, 18, 3),
        (1, 130, 64, 128, 2),
        (2, 5, 9, 3, 3),
        (1, 3, 5, 7, 1),
    ] {
        let x = rng.normals(b * n * cin, 0.0, 1.0);
        let ci = cin / groups;
        let wt = rng.normals(cout * ci, 0.0, 1.0 / (ci as f32).sqrt());
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, cin]).unwrap();
        let wi = gb.weight("w", [cout, ci, 1, 1]).unwrap();
        let y = gb.grouped_linear("gl", xi, wi, groups).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        check_graph(
            &dev,
            &format!("grouped_linear [{b}, {n}, {cin}] -> {cout} in {groups} groups"),
            &g,
            &[("x", &[b, n, cin], &x)],
            &[("w", &[cout, ci, 1, 1], &wt)],
            &|i, wv| {
                let mut o = vec![0.0; b * n * cout];
                cpu::grouped_linear(&i[0], &wv[0], cin, cout, groups, &mut o);
                o
            },
        );
    }
}

#[test]
fn repeat_channels_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(17);
    for &(b, n, cin, rep) in &[
        (2usize, 12usize, 4usize, 32usize),
        (1, 5, 3, 5),
        (1, 7, 8, 2),
        (2, 1, 1, 3),
    ] {
        let x = rng.normals(b * n * cin, 0.0, 1.0);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, n, cin]).unwrap();
        let y = gb.repeat_channels("rep", xi, rep).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        check_graph(
            &dev,
            &format!("repeat_channels [{b}, {n}, {cin}] x{rep}"),
            &g,
            &[("x", &[b, n, cin], &x)],
            &[],
            &|i, _| {
                let mut o = vec![0.0; b * n * cin * rep];
                cpu::repeat_channels(&i[0], cin, rep, &mut o);
                o
            },
        );
    }
}

/// The 3x3 depthwise conv fused with GLUMBConv's gate: [.., 2c] -> [.., c] against the two CPU ops
/// in a row; channel counts around the 32-channel block, images over several 4 x 16 tiles (halos
/// that cross tile edges) and tiles that overhang the image (the 4-column strips cut at the
/// image's right edge). Channel counts that are multiples of the 16-byte vector (8, 40, 72, 80;
/// f32 also 4) stage by vectors, the others (3, 33, 130, 133) by elements.
#[test]
fn depthwise_conv_glu_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(19);
    // (batch, h, w, c (output channels), bias)
    let cases: &[(usize, usize, usize, usize, bool)] = &[
        (2, 3, 4, 8, true),
        (1, 1, 1, 4, false),
        (2, 6, 4, 80, true),
        (1, 5, 7, 133, true),
        (2, 4, 3, 3, false),
        (1, 2, 2, 130, true),
        (2, 9, 35, 40, true),
        (1, 7, 19, 72, false),
    ];
    for &(b, h, w, c, with_bias) in cases {
        let c2 = 2 * c;
        let x = rng.normals(b * h * w * c2, 0.1, 1.0);
        let wt = rng.normals(c2 * 9, 0.0, 1.0 / 3.0);
        let bias = rng.normals(c2, 0.0, 0.5);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, h * w, c2]).unwrap();
        let wi = gb.weight("w", [c2, 1, 3, 3]).unwrap();
        let bi = with_bias.then(|| gb.weight("b", [c2]).unwrap());
        let y = gb.depthwise_conv_glu("dwglu", xi, wi, bi, h, w, 3).unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let (ws, bs) = ([c2, 1, 3, 3], [c2]);
        let mut weights: Vec<(&str, &[usize], &[f32])> = vec![("w", &ws, &wt)];
        if with_bias {
            weights.push(("b", &bs, &bias));
        }
        check_graph(
            &dev,
            &format!("depthwise_conv_glu 3x3 [{b}, {h}x{w}, {c2} -> {c}] bias={with_bias}"),
            &g,
            &[("x", &[b, h * w, c2], &x)],
            &weights,
            &|i, wv| {
                let mut o = vec![0.0; b * h * w * c];
                cpu::depthwise_conv_glu(
                    &i[0],
                    &wv[0],
                    wv.get(1).map(|v| &v[..]),
                    b,
                    h,
                    w,
                    c2,
                    3,
                    &mut o,
                );
                o
            },
        );
    }
}

/// GLUMBConv from its `conv_inverted` output on: SiLU applied as the depthwise-GLU kernel loads
/// its input, against the twin `silu_depthwise_conv_glu` (silu, then depthwise_conv_glu).
#[test]
fn silu_depthwise_conv_glu_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(23);
    // (batch, h, w, c (output channels), bias)
    let cases: &[(usize, usize, usize, usize, bool)] = &[
        (2, 3, 4, 8, true),
        (1, 1, 1, 4, false),
        (1, 5, 7, 133, true),
        (2, 4, 3, 3, false),
        (1, 2, 2, 130, true),
        (3, 17, 18, 33, false),
        (2, 9, 35, 40, true),
        (1, 6, 20, 96, false),
    ];
    for &(b, h, w, c, with_bias) in cases {
        let c2 = 2 * c;
        let x = rng.normals(b * h * w * c2, 0.1, 2.0);
        let wt = rng.normals(c2 * 9, 0.0, 1.0 / 3.0);
        let bias = rng.normals(c2, 0.0, 0.5);
        let mut gb = GraphBuilder::new();
        let xi = gb.input("x", [b, h * w, c2]).unwrap();
        let wi = gb.weight("w", [c2, 1, 3, 3]).unwrap();
        let bi = with_bias.then(|| gb.weight("b", [c2]).unwrap());
        let y = gb
            .silu_depthwise_conv_glu("dwglu", xi, wi, bi, h, w, 3)
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let (ws, bs) = ([c2, 1, 3, 3], [c2]);
        let mut weights: Vec<(&str, &[usize], &[f32])> = vec![("w", &ws, &wt)];
        if with_bias {
            weights.push(("b", &bs, &bias));
        }
        check_graph(
            &dev,
            &format!("silu_depthwise_conv_glu 3x3 [{b}, {h}x{w}, {c2} -> {c}] bias={with_bias}"),
            &g,
            &[("x", &[b, h * w, c2], &x)],
            &weights,
            &|i, wv| {
                let mut o = vec![0.0; b * h * w * c];
                cpu::silu_depthwise_conv_glu(
                    &i[0],
                    &wv[0],
                    wv.get(1).map(|v| &v[..]),
                    b,
                    h,
                    w,
                    c2,
                    3,
                    &mut o,
                );
                o
            },
        );
    }
}

/// The grid-stride kernels (depthwise conv, channel repeat)
/// launched with a single block along the strided dimension, so each thread loops over many items.
#[test]
fn grid_stride_kernels_cover_every_item_from_one_block() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(19);
    let (b, h, w) = (2usize, 9usize, 13usize);
    for dtype in DTYPES {
        let r = |v: &[f32]| round_to(dtype, v);
        let one_block = |mut l: openuni_cuda::families::Launch| {
            l.grid.0 = 1;
            // SAFETY: every buffer below holds the shapes launched.
            unsafe { l.enqueue(&dev).unwrap() };
        };

        // Depthwise 5x5 over 136 channels (two channel blocks).
        let c = 136;
        let x = rng.normals(b * h * w * c, 0.0, 1.0);
        let wt = rng.normals(c * 25, 0.0, 0.2);
        let bias = rng.normals(c, 0.0, 0.5);
        let n = b * h * w * c;
        let (_xb, xp) = upload(&dev, dtype, &x, 0);
        let (_wb, wp) = upload(&dev, dtype, &wt, 0);
        let (_bb, bp) = upload(&dev, dtype, &bias, 0);
        let (_yb, yp) = upload(&dev, dtype, &vec![f32::NAN; n], 0);
        one_block(
            conv::depthwise_conv2d(dtype, dev.sm_count(), xp, wp, bp, yp, b, h, w, c, 5).unwrap(),
        );
        let (mut want, mut base) = (vec![0.0; n], vec![0.0; n]);
        cpu::depthwise_conv2d(&x, &wt, Some(&bias), b, h, w, c, 5, &mut want);
        cpu::depthwise_conv2d(&r(&x), &r(&wt), Some(&r(&bias)), b, h, w, c, 5, &mut base);
        check(
            &format!("depthwise_conv2d 5x5 one block {dtype}"),
            dtype,
            &download(&dev, dtype, yp, n),
            &want,
            &base,
        );

        // Repeat over 24 channels.
        let c = 24;
        let x = rng.normals(b * h * w * c, 0.0, 1.0);
        let (_xb, xp) = upload(&dev, dtype, &x, 0);
        let (_yb, yp) = upload(&dev, dtype, &vec![f32::NAN; b * h * w * c * 3], 0);
        let n = b * h * w * c * 3;
        one_block(conv::repeat_channels(dtype, dev.sm_count(), xp, yp, b * h * w, c, 3).unwrap());
        let mut want = vec![0.0; n];
        cpu::repeat_channels(&x, c, 3, &mut want);
        check(
            &format!("repeat_channels one block {dtype}"),
            dtype,
            &download(&dev, dtype, yp, n),
            &want,
            &r(&want),
        );
    }
}

/// A whole DC-AE decoder built by openuni_models::dcae with ResBlock stages only (the ops of this
/// family plus the existing norms, elementwise ops and transposes; the EfficientViT stages need
/// the linear-attention family): conv_in + channel-repeat shortcut, two up blocks (pixel-shuffle
/// shortcut with R = 4 and R = 2), ResBlocks, norm_out, ReLU, conv_out, on a 3×4 latent with
/// B = 2. CUDA f32 against the CPU executor at 1e-5; bf16 at the spec's fallback 2e-2 (a plain
/// bf16 run of a whole decoder is not at hand here).
#[test]
fn resblock_decoder_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let cfg: openuni_models::dcae::DcaeConfig = serde_json::from_value(serde_json::json!({
        "latent_channels": 8,
        "attention_head_dim": 8,
        "decoder_block_out_channels": [8, 16, 16],
        "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock"],
        "decoder_layers_per_block": [1, 2, 1],
        "decoder_qkv_multiscales": [[], [], []],
        "upsample_block_type": "interpolate",
        "scaling_factor": 1.0
    }))
    .unwrap();
    let (b, h, w) = (2usize, 3usize, 4usize);
    let mut gb = GraphBuilder::new();
    let z = gb.input("latent", [b, 8, h, w]).unwrap();
    let o = openuni_models::dcae::decoder(&mut gb, &cfg, z, "test").unwrap();
    gb.output("y", o.sample).unwrap();
    let g = gb.finish();
    let mut rng = Rng::new(20);
    let mut weights = HashMap::new();
    for (id, name) in g.weights() {
        let s = g.shape(id);
        let n = s.numel();
        let v = if name.ends_with("norm.weight") || name.ends_with("norm_out.weight") {
            rng.normals(n, 1.0, 0.1)
        } else if name.ends_with(".bias") {
            rng.normals(n, 0.0, 0.1)
        } else {
            rng.normals(n, 0.0, 1.0 / ((n / s.dims()[0]) as f32).sqrt())
        };
        weights.insert(name.to_string(), tensor(s.dims(), v));
    }
    let latent = rng.normals(b * 8 * h * w, 0.0, 1.0);
    let inputs = HashMap::from([("latent".to_string(), tensor(&[b, 8, h, w], latent))]);
    let mut cpu_ex = openuni_cpu::CpuExecutor::new(&g, &weights, false).unwrap();
    let want = cpu_ex.run(&inputs).unwrap()["y"].to_f32_vec();
    assert_eq!(want.len(), b * 3 * 4 * h * 4 * w);
    for dtype in DTYPES {
        let got = run(&dev, &g, &weights, &inputs, dtype);
        let e = openuni_cuda::testing::rel_l2(&got, &want);
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        println!("ResBlock decoder [{b}, 8, {h}x{w}] -> [{b}, 3, {}x{}] {dtype}: rel L2 {e:.3e} (tolerance {tol:.0e})", 4 * h, 4 * w);
        assert!(
            e <= tol,
            "{dtype}: relative L2 error {e:.3e} above {tol:.0e}"
        );
    }
}

/// The geometry the compiled kernels use (conv.cu's `conv_geometry` kernel) is the launcher's
/// (`families::conv::geometry`, generated from the same header): a kernel constant redefined in
/// conv.cu, or a stale build, fails here.
#[test]
fn conv_geometry_matches_the_launcher() {
    let Some(dev) = device_or_skip() else { return };
    use openuni_cuda::families::conv::geometry as g;
    let buf = dev.alloc(14 * 4).unwrap();
    let l = openuni_cuda::families::Launch {
        kernel: "conv_geometry".into(),
        grid: (1, 1, 1),
        block: (32, 1, 1),
        smem: 0,
        args: vec![openuni_cuda::KArg::Ptr(buf.ptr())],
    };
    // SAFETY: the kernel writes 14 ints to its argument.
    unsafe { l.enqueue(&dev).unwrap() };
    let mut got = vec![0i32; 14];
    dev.copy_to_host(buf.ptr(), &mut got).unwrap();
    let want = [
        g::CONV_TILE_H,
        g::CONV_TILE_W,
        g::CONV_TILE_N,
        g::CONV_TILE_H,
        g::CONV_TILE_W,
        g::CONV_TC_STAGES,
        g::CONV_KMAX,
        g::CONV_KMAX,
        g::DW_ROWS,
        g::DW_CHANNELS,
        g::GL_ROWS,
        g::GL_COLS,
        g::CONV_TC_NPAD,
        g::CONV_TC_CHUNK,
    ];
    let want: Vec<i32> = want.iter().map(|&v| v as i32).collect();
    assert_eq!(
        got, want,
        "kernels/conv.cu compiles with tile h/w/n (CUDA cores), h/w/stages (tensor cores), kmax (conv, depthwise), depthwise rows/channels, grouped rows/cols, tensor-core weight padding/chunk {got:?}, the launcher uses {want:?}"
    );
}

/// The depthwise GLU kernel indexes an image's pixels in 32 bits: its launcher refuses a larger image
/// with the sizes in the message (no device needed: it only builds the launch).
#[test]
fn depthwise_glu_launcher_refuses_images_past_32_bit_pixel_offsets() {
    let err = conv::depthwise_conv3_glu(DType::BF16, 0, 0, 0, 0, 1, 50_000, 50_000, 64, 3, true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("50000x50000") && err.contains("32 bits"),
        "{err}"
    );
    assert!(
        conv::depthwise_conv3_glu(DType::BF16, 0, 0, 0, 0, 1, 46_340, 46_340, 64, 3, true).is_ok()
    );
}
