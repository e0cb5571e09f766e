//! The CUDA executor against the CPU executor on a small multi-node graph (adaLN LayerNorm,
//! biased and unbiased linears through cuBLASLt, tanh-GELU, gated residual, RMSNorm): outputs,
//! node-by-node values with keep_all, CUDA-graph capture and replay, per-node profiling, and
//! the error paths. Without a CUDA device (real or emulated) each test prints
//! `skipped: no CUDA device`.

use std::collections::HashMap;

use openuni_cpu::CpuExecutor;
use openuni_cuda::testing::{device_or_skip, rel_l2, Rng};
use openuni_cuda::{CudaError, CudaExecutor};
use openuni_graph::{Graph, GraphBuilder, Modulation, UnaryFn};
use openuni_tensor::{DType, HostTensor};

const B: usize = 2;
const N: usize = 5;
const C: usize = 48;
const H: usize = 96;

fn graph() -> Graph {
    let mut g = GraphBuilder::new();
    let x = g.input("x", [B, N, C]).unwrap();
    let scale = g.input("scale", [B, C]).unwrap();
    let shift = g.input("shift", [B, C]).unwrap();
    let gate = g.input("gate", [B, C]).unwrap();
    let w1 = g.weight("fc1.weight", [H, C]).unwrap();
    let b1 = g.weight("fc1.bias", [H]).unwrap();
    let w2 = g.weight("fc2.weight", [C, H]).unwrap();
    let wn = g.weight("norm.weight", [C]).unwrap();
    let h = g
        .layernorm(
            "norm1",
            x,
            None,
            None,
            1e-6,
            Some(Modulation { scale, shift }),
        )
        .unwrap();
    let a = g.linear("fc1", h, w1, Some(b1)).unwrap();
    let a = g.unary("act", a, UnaryFn::GeluTanh).unwrap();
    let o = g.linear("fc2", a, w2, None).unwrap();
    let r = g.gated_add("residual", x, gate, o).unwrap();
    let y = g.rmsnorm("norm", r, wn, None, 1e-6).unwrap();
    g.output("y", y).unwrap();
    g.output("mlp", o).unwrap();
    g.finish()
}

fn weights(rng: &mut Rng) -> HashMap<String, HostTensor> {
    let t = |shape: &[usize], v: Vec<f32>| HostTensor::from_f32(shape.to_vec(), v).unwrap();
    HashMap::from([
        (
            "fc1.weight".to_string(),
            t(&[H, C], rng.normals(H * C, 0.0, 0.15)),
        ),
        ("fc1.bias".to_string(), t(&[H], rng.normals(H, 0.0, 0.5))),
        (
            "fc2.weight".to_string(),
            t(&[C, H], rng.normals(C * H, 0.0, 0.1)),
        ),
        ("norm.weight".to_string(), t(&[C], rng.normals(C, 1.0, 0.2))),
    ])
}

fn inputs(rng: &mut Rng) -> HashMap<String, HostTensor> {
    let t = |shape: &[usize], v: Vec<f32>| HostTensor::from_f32(shape.to_vec(), v).unwrap();
    HashMap::from([
        (
            "x".to_string(),
            t(&[B, N, C], rng.normals(B * N * C, 0.0, 1.0)),
        ),
        (
            "scale".to_string(),
            t(&[B, C], rng.normals(B * C, 0.0, 0.3)),
        ),
        (
            "shift".to_string(),
            t(&[B, C], rng.normals(B * C, 0.0, 0.3)),
        ),
        ("gate".to_string(), t(&[B, C], rng.normals(B * C, 0.0, 1.0))),
    ])
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        2e-2
    }
}

#[test]
fn graph_matches_the_cpu_executor_node_by_node() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(7);
    let g = graph();
    let w = weights(&mut rng);
    let inp = inputs(&mut rng);
    let mut cpu = CpuExecutor::new(&g, &w, true).unwrap();
    let want = cpu.run(&inp).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let mut ex = CudaExecutor::new(&dev, &g, &w, dtype, true).unwrap();
        let got = ex.run(&inp).unwrap();
        for name in ["y", "mlp"] {
            let e = rel_l2(&got[name].to_f32_vec(), &want[name].to_f32_vec());
            println!("{dtype} output {name}: rel L2 {e:.3e}");
            assert!(e <= tol(dtype), "{dtype} output {name}: rel L2 {e:.3e}");
        }
        // Node-by-node diff, as `openuni verify --diff-nodes` does.
        for node in &g.nodes {
            let a = ex.value(node.output).unwrap().to_f32_vec();
            let b = cpu.value(node.output).unwrap().to_f32_vec();
            let e = rel_l2(&a, &b);
            println!(
                "{dtype} node {:10} ({}): rel L2 {e:.3e}",
                node.name,
                node.op.name()
            );
            assert!(
                e <= tol(dtype),
                "{dtype} node {}: rel L2 {e:.3e}",
                node.name
            );
        }
        // Weights read back as uploaded (rounded to the storage dtype).
        let (id, _) = g.weights().next().unwrap();
        let e = rel_l2(
            &ex.value(id).unwrap().to_f32_vec(),
            &cpu.value(id).unwrap().to_f32_vec(),
        );
        assert!(
            e <= if dtype == DType::F32 { 0.0 } else { 4e-3 },
            "weight read back: {e:.3e}"
        );
    }
}

/// The executor's Linear + tanh-GELU peephole (families::gelu_fused_into_linear): the GEMM's
/// (bias +) GELU epilogue computes the pair, matching the CPU executor (Linear, then GeluTanh); the
/// erf GELU, a Linear whose input dies at it, and keep_all are not fused.
#[test]
fn linear_then_tanh_gelu_runs_as_one_gemm() {
    let mut g = GraphBuilder::new();
    let x = g.input("x", [B, N, C]).unwrap();
    let w1 = g.weight("fc1.weight", [H, C]).unwrap();
    let b1 = g.weight("fc1.bias", [H]).unwrap();
    let w2 = g.weight("fc2.weight", [C, H]).unwrap();
    let a = g.linear("fc1", x, w1, Some(b1)).unwrap();
    let a = g.unary("act", a, UnaryFn::GeluTanh).unwrap();
    let o = g.linear("fc2", a, w2, None).unwrap();
    let e = g.unary("act_erf", o, UnaryFn::GeluErf).unwrap();
    let r = g.unary("relu", e, UnaryFn::Relu).unwrap(); // read only by fc3: dies there
    let n = g.linear("fc3", r, w1, None).unwrap();
    let t = g
        .unary("act_after_dying_input", n, UnaryFn::GeluTanh)
        .unwrap();
    g.output("y", e).unwrap();
    g.output("z", t).unwrap();
    let g = g.finish();
    let fused: Vec<&str> = g
        .nodes
        .iter()
        .filter(|n| openuni_cuda::families::gelu_fused_into_linear(&g, n, false).is_some())
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(
        fused,
        ["act"],
        "only the tanh GELU after a Linear whose input outlives it"
    );
    assert!(
        g.nodes
            .iter()
            .all(|n| openuni_cuda::families::gelu_fused_into_linear(&g, n, true).is_none()),
        "keep_all fuses nothing"
    );
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(10);
    let w = weights(&mut rng);
    let inp = HashMap::from([(
        "x".to_string(),
        HostTensor::from_f32(vec![B, N, C], rng.normals(B * N * C, 0.0, 1.0)).unwrap(),
    )]);
    let want = CpuExecutor::new(&g, &w, false).unwrap().run(&inp).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let got = CudaExecutor::new(&dev, &g, &w, dtype, false)
            .unwrap()
            .run(&inp)
            .unwrap();
        for name in ["y", "z"] {
            let e = rel_l2(&got[name].to_f32_vec(), &want[name].to_f32_vec());
            println!("{dtype} {name} with the GELU in fc1's epilogue: rel L2 {e:.3e}");
            assert!(e <= tol(dtype), "{dtype} {name}: rel L2 {e:.3e}");
        }
    }
}

#[test]
fn capture_follows_one_eager_warm_up_pass() {
    // On a GPU a kernel's first launch may load its module and cuBLASLt may set up state on its
    // first matmul: neither may happen inside a stream capture. So an executor that has not run
    // eagerly yet only arms the capture, and captures right after its first (eager) execute.
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(9);
    let g = graph();
    let w = weights(&mut rng);
    for dtype in [DType::F32, DType::BF16] {
        let mut ex = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
        ex.capture().unwrap();
        assert!(
            !ex.is_captured() && ex.is_capture_armed(),
            "{dtype}: captured before any eager pass"
        );
        let inp = inputs(&mut rng);
        let warm = ex.replay(&inp).unwrap();
        assert!(
            ex.is_captured() && !ex.is_capture_armed(),
            "{dtype}: the eager warm-up pass did not capture"
        );
        let replayed = ex.replay(&inp).unwrap();
        let mut fresh = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
        let ran = fresh.run(&inp).unwrap();
        for name in ["y", "mlp"] {
            assert!(
                warm[name].to_f32_vec() == ran[name].to_f32_vec(),
                "{dtype} {name}: the warm-up pass differs from run"
            );
            assert!(
                replayed[name].to_f32_vec() == ran[name].to_f32_vec(),
                "{dtype} {name}: the replay differs from run"
            );
        }
        // An executor that has run eagerly captures at once.
        fresh.capture().unwrap();
        assert!(
            fresh.is_captured() && !fresh.is_capture_armed(),
            "{dtype}: a warmed-up executor must capture at once"
        );
        println!("{dtype}: capture armed on a fresh executor, taken after its eager pass; replays identical to run");
    }
}

#[test]
fn capture_and_replay_give_the_same_results_as_run() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(8);
    let g = graph();
    let w = weights(&mut rng);
    for dtype in [DType::F32, DType::BF16] {
        let mut ex = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
        assert!(
            ex.replay(&inputs(&mut rng)).is_err(),
            "replay before capture must fail"
        );
        ex.capture().unwrap();
        for round in 0..3 {
            let inp = inputs(&mut rng);
            let replayed = ex.replay(&inp).unwrap();
            let ran = ex.run(&inp).unwrap();
            for name in ["y", "mlp"] {
                let e = rel_l2(&replayed[name].to_f32_vec(), &ran[name].to_f32_vec());
                println!("{dtype} replay {round} {name}: rel L2 vs run {e:.3e}");
                assert!(e <= 1e-6, "{dtype} replay {round} {name}: {e:.3e}");
            }
        }
    }
}

#[test]
fn profile_times_every_node() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(9);
    let g = graph();
    let mut ex = CudaExecutor::new(&dev, &g, &weights(&mut rng), DType::BF16, false).unwrap();
    let t = ex.profile(&inputs(&mut rng), 3).unwrap();
    assert_eq!(t.len(), g.nodes.len());
    for (n, node) in t.iter().zip(&g.nodes) {
        println!(
            "{:10} {:10} median {:.4} ms, min {:.4} ms",
            n.name, n.op, n.median_ms, n.min_ms
        );
        assert_eq!(n.name, node.name);
        assert!(n.median_ms >= 0.0 && n.min_ms <= n.median_ms && n.median_ms.is_finite());
    }
}

#[test]
fn errors_name_the_node_or_input() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(10);
    let g = graph();
    let w = weights(&mut rng);
    // Missing input.
    let mut ex = CudaExecutor::new(&dev, &g, &w, DType::F32, false).unwrap();
    let mut inp = inputs(&mut rng);
    inp.remove("gate");
    let e = ex.run(&inp).unwrap_err();
    assert!(
        matches!(e, CudaError::Input { ref name, .. } if name == "gate"),
        "{e}"
    );
    // Wrong input shape.
    let mut inp = inputs(&mut rng);
    inp.insert("x".into(), HostTensor::zeros_f32([B, N + 1, C]));
    let e = ex.run(&inp).unwrap_err().to_string();
    assert!(e.contains("`x`") && e.contains("expected"), "{e}");
    // A value whose memory was reused is not readable without keep_all.
    let act = g.nodes.iter().find(|n| n.name == "act").unwrap().output;
    assert!(matches!(ex.value(act), Err(CudaError::NotKept { .. })));
    // Missing weight: the tensor source's error names the key.
    let mut w2 = w.clone();
    w2.remove("fc2.weight");
    let e = CudaExecutor::new(&dev, &g, &w2, DType::F32, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fc2.weight"), "{e}");
    // f16 storage is not offered.
    assert!(matches!(
        CudaExecutor::new(&dev, &g, &w, DType::F16, false),
        Err(CudaError::DType(DType::F16))
    ));
    // Softmax attention with a head dim above the largest kernel capacity (264 > 256): the error
    // names the node and the supported range.
    let mut gb = GraphBuilder::new();
    let q = gb.input("q", [1, 4, 2 * 264]).unwrap();
    let o = gb
        .attention("blocks.0.attn", q, q, q, None, 2, 2, 264, false, 0.35)
        .unwrap();
    gb.output("o", o).unwrap();
    let e = CudaExecutor::new(&dev, &gb.finish(), &w, DType::BF16, false)
        .err()
        .unwrap()
        .to_string();
    println!("{e}");
    assert!(
        e.contains("blocks.0.attn") && e.contains("attention"),
        "{e}"
    );
    assert!(e.contains("head dim 264") && e.contains("1 to 256"), "{e}");
}

/// The GEMM wrapper on its own, with each epilogue, against the CPU linear (+ tanh-GELU):
/// y = x · wᵀ (+ b) (then GELU), in f32 and bf16 storage.
#[test]
fn linear_gemm_epilogues_match_cpu() {
    use openuni_cpu::ops as cpu;
    use openuni_cuda::gemm::{Epilogue, LinearArgs, LinearGemm};
    use openuni_cuda::testing::round_to;
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(11);
    let (rows, k, n) = (7usize, 48usize, 96usize);
    let x = rng.normals(rows * k, 0.0, 1.0);
    let w = rng.normals(n * k, 0.0, 0.2);
    let b = rng.normals(n, 0.0, 0.5);
    let blas = dev.blas().unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let bytes = |v: &[f32]| -> Vec<u8> {
            match dtype {
                DType::F32 => v.iter().flat_map(|f| f.to_le_bytes()).collect(),
                _ => v
                    .iter()
                    .flat_map(|&f| half::bf16::from_f32(f).to_bits().to_le_bytes())
                    .collect(),
            }
        };
        let (xb, wb, bb) = (
            dev.upload(&bytes(&x)).unwrap(),
            dev.upload(&bytes(&w)).unwrap(),
            dev.upload(&bytes(&b)).unwrap(),
        );
        let yb = dev.alloc(rows * n * dtype.size_in_bytes()).unwrap();
        for epi in [
            Epilogue::None,
            Epilogue::Bias,
            Epilogue::Gelu,
            Epilogue::BiasGelu,
        ] {
            let with_bias = matches!(epi, Epilogue::Bias | Epilogue::BiasGelu);
            let args = LinearArgs {
                dtype,
                rows,
                in_features: k,
                out_features: n,
                epilogue: epi,
                x: xb.ptr(),
                w: wb.ptr(),
                bias: with_bias.then_some(bb.ptr()),
                y: yb.ptr(),
            };
            let g = LinearGemm::new(&dev, &blas, &args).unwrap();
            dev.fill_bytes(yb.ptr(), 0xFF, yb.bytes()).unwrap();
            unsafe { g.run(&dev, &blas).unwrap() };
            let got: Vec<f32> = match dtype {
                DType::F32 => {
                    let mut o = vec![0f32; rows * n];
                    dev.copy_to_host(yb.ptr(), &mut o).unwrap();
                    o
                }
                _ => {
                    let mut o = vec![0u16; rows * n];
                    dev.copy_to_host(yb.ptr(), &mut o).unwrap();
                    o.into_iter()
                        .map(|v| half::bf16::from_bits(v).to_f32())
                        .collect()
                }
            };
            let (xr, wr, br) = (
                round_to(dtype, &x),
                round_to(dtype, &w),
                round_to(dtype, &b),
            );
            let mut want = vec![0f32; rows * n];
            cpu::linear(
                &xr,
                &wr,
                with_bias.then_some(&br[..]),
                rows,
                k,
                n,
                &mut want,
            );
            if matches!(epi, Epilogue::Gelu | Epilogue::BiasGelu) {
                let pre = want.clone();
                cpu::unary(UnaryFn::GeluTanh, &pre, &mut want);
            }
            let e = rel_l2(&got, &want);
            let t = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            println!("linear {dtype} {epi:?}: rel L2 {e:.3e} (tolerance {t:.0e}, inputs rounded to the storage dtype)");
            assert!(e <= t, "linear {dtype} {epi:?}: rel L2 {e:.3e}");
        }
    }
}

/// A graph output handed to another executor's input on the device (`output_tensor` /
/// `set_input_tensor`) gives what the host round trip gives, bit for bit (a bf16 value read as f32
/// and cast back is exact), also into a captured graph; a wrong shape, storage dtype or a stale
/// handle (its producer ran again) is refused with the input named.
#[test]
fn outputs_handed_over_on_the_device_match_the_host_round_trip() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(21);
    let g = graph();
    let w = weights(&mut rng);
    for dtype in [DType::F32, DType::BF16] {
        let mut producer = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
        let mut consumer = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
        consumer.capture().unwrap();
        let first = inputs(&mut rng);
        let y = producer.run(&first).unwrap().remove("y").unwrap();
        let mut rest = inputs(&mut rng);
        rest.remove("x");

        let handle = producer.output_tensor("y").unwrap();
        assert_eq!(handle.shape().dims(), [B, N, C]);
        consumer.set_input_tensor("x", &handle).unwrap();
        consumer.set_inputs(&rest).unwrap();
        consumer.execute().unwrap();
        let on_device = consumer.outputs().unwrap();

        rest.insert("x".into(), y);
        let via_host = consumer.replay(&rest).unwrap();
        for name in ["y", "mlp"] {
            assert_eq!(
                on_device[name].to_f32_vec(),
                via_host[name].to_f32_vec(),
                "{dtype} {name}: hand-over differs from the host round trip"
            );
        }

        let msg = |e: CudaError| e.to_string();
        let e = msg(consumer.set_input_tensor("gate", &handle).unwrap_err());
        assert!(e.contains("gate") && e.contains("expected"), "{e}");
        // Across storage dtypes the hand-over converts on the device exactly as the host path
        // does (f32 -> bf16 through the staging cast; bf16 -> f32 is exact).
        let other = if dtype == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        let mut other_ex = CudaExecutor::new(&dev, &g, &w, other, false).unwrap();
        rest.remove("x");
        other_ex.set_input_tensor("x", &handle).unwrap();
        other_ex.set_inputs(&rest).unwrap();
        other_ex.execute().unwrap();
        let across = other_ex.outputs().unwrap();
        rest.insert("x".into(), handle.to_host().unwrap());
        let across_host = other_ex.run(&rest).unwrap();
        for name in ["y", "mlp"] {
            assert_eq!(
                across[name].to_f32_vec(),
                across_host[name].to_f32_vec(),
                "{dtype} -> {other} {name}: hand-over differs from the host path"
            );
        }
        producer.execute().unwrap();
        let e = msg(consumer.set_input_tensor("x", &handle).unwrap_err());
        assert!(e.contains("has run again"), "{e}");
        let e = msg(producer.output_tensor("nope").unwrap_err());
        assert!(e.contains("nope"), "{e}");
    }
}

/// `Op::LinearResidual` (the residual as cuBLASLt's C operand, beta = 1) against its CPU twin
/// `linear_residual`, through the executor with and without bias, and launched directly in place
/// (C = D, the residual overwritten by the sum).
#[test]
fn linear_residual_matches_cpu() {
    use openuni_cpu::ops as cpu;
    use openuni_cuda::gemm::{Epilogue, LinearArgs, LinearGemm};
    use openuni_cuda::testing::{check, round_to};
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(31);
    for &(rows, k, n) in &[(7usize, 48usize, 40usize), (37, 96, 64), (5, 33, 17)] {
        let x = rng.normals(rows * k, 0.0, 1.0);
        let w = rng.normals(n * k, 0.0, 0.2);
        let b = rng.normals(n, 0.0, 0.5);
        let r = rng.normals(rows * n, 1.0, 2.0);
        for with_bias in [false, true] {
            let bias = with_bias.then_some(&b[..]);
            let mut want = vec![0f32; rows * n];
            cpu::linear_residual(&x, &w, bias, &r, rows, k, n, &mut want);
            let mut g = GraphBuilder::new();
            let xi = g.input("x", [rows, k]).unwrap();
            let ri = g.input("r", [rows, n]).unwrap();
            let wi = g.weight("w", [n, k]).unwrap();
            let bi = with_bias.then(|| g.weight("b", [n]).unwrap());
            let y = g.linear_residual("to_out", xi, wi, bi, ri).unwrap();
            g.output("y", y).unwrap();
            let g = g.finish();
            let weights = HashMap::from([
                (
                    "w".to_string(),
                    HostTensor::from_f32([n, k], w.clone()).unwrap(),
                ),
                (
                    "b".to_string(),
                    HostTensor::from_f32([n], b.clone()).unwrap(),
                ),
            ]);
            let inputs = HashMap::from([
                (
                    "x".to_string(),
                    HostTensor::from_f32([rows, k], x.clone()).unwrap(),
                ),
                (
                    "r".to_string(),
                    HostTensor::from_f32([rows, n], r.clone()).unwrap(),
                ),
            ]);
            for dtype in [DType::F32, DType::BF16] {
                let mut ex = CudaExecutor::new(&dev, &g, &weights, dtype, false).unwrap();
                let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
                let rd = |v: &[f32]| round_to(dtype, v);
                let mut base = vec![0f32; rows * n];
                cpu::linear_residual(
                    &rd(&x),
                    &rd(&w),
                    with_bias.then(|| rd(&b)).as_deref(),
                    &rd(&r),
                    rows,
                    k,
                    n,
                    &mut base,
                );
                check(
                    &format!("linear_residual {dtype} [{rows}, {k}] -> {n} bias={with_bias}"),
                    dtype,
                    &got,
                    &want,
                    &base,
                );
            }
        }
        // In place: C = D = the residual's buffer (f32 storage).
        let blas = dev.blas().unwrap();
        let up = |v: &[f32]| dev.upload(v).unwrap();
        let (xb, wb, yb) = (up(&x), up(&w), up(&r));
        let args = LinearArgs {
            dtype: DType::F32,
            rows,
            in_features: k,
            out_features: n,
            epilogue: Epilogue::None,
            x: xb.ptr(),
            w: wb.ptr(),
            bias: None,
            y: yb.ptr(),
        };
        let gemm = LinearGemm::with_residual(&dev, &blas, &args, Some(yb.ptr())).unwrap();
        // Planning runs the candidates (timing), which write y: the residual goes in after it,
        // as in the executor (every GEMM is planned when the executor is built, before any run).
        dev.copy_to_device(&r, yb.ptr()).unwrap();
        unsafe { gemm.run(&dev, &blas).unwrap() };
        let mut got = vec![0f32; rows * n];
        dev.copy_to_host(yb.ptr(), &mut got).unwrap();
        let mut want = vec![0f32; rows * n];
        cpu::linear_residual(&x, &w, None, &r, rows, k, n, &mut want);
        check(
            &format!("linear_residual f32 [{rows}, {k}] -> {n} in place"),
            DType::F32,
            &got,
            &want,
            &want,
        );
    }
}

#[test]
fn weights_upload_from_mapped_files_as_from_memory() {
    // bf16 storage from a bf16 file uploads the stored bytes; f32 storage from an f32 file
    // uploads the mapping in place; the other pairs convert. Each must put on the device exactly
    // what the in-memory source of the same tensors gives.
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(11);
    let g = graph();
    let w = weights(&mut rng);
    let dir = std::env::temp_dir().join(format!(
        "openuni-cuda-mapped-weights-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    for file_dtype in [DType::F32, DType::BF16] {
        let stored: HashMap<String, HostTensor> = w
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(file_dtype).unwrap()))
            .collect();
        let path = dir.join(format!("{file_dtype}.safetensors"));
        openuni_tensor::write_safetensors(&path, stored.iter().map(|(k, v)| (k.as_str(), v)), None)
            .unwrap();
        let mapped = openuni_tensor::Weights::open(&path).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let from_file = CudaExecutor::new(&dev, &g, &mapped, dtype, false).unwrap();
            let from_memory = CudaExecutor::new(&dev, &g, &stored, dtype, false).unwrap();
            for (id, name) in g.weights() {
                assert_eq!(
                    from_file.value(id).unwrap().to_f32_vec(),
                    from_memory.value(id).unwrap().to_f32_vec(),
                    "{name}: {file_dtype} file uploaded as {dtype}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
