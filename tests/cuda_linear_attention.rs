//! kernels/linear_attention.cu against its CPU twins (openuni_cpu::ops::{linear_attention,
//! packed_linear_attention}) on random inputs, through the CUDA executor on one-node graphs, in
//! f32 storage (CUDA-core FMA kernels) and bf16 storage (tensor-core kernels at head dim 32, FMA
//! below). Token counts 1, 7, 129, 300, 1025 cover one tile, partial tiles, one chunk per head and
//! several chunks per head (the last-CTA reduction of the state kernel); B = 2 throughout.
//!
//! Tolerances (openuni_cuda::testing::check), against the CPU twin (f64 state) on the f32 inputs:
//! f32 storage, relative L2 <= 1e-5; bf16 storage, <= 2x the relative L2 error of a plain bf16 run
//! (the CPU twin on the inputs rounded to bf16, its output rounded to bf16).
//! bf16 storage is also held to a stricter, internal bound: against the same computation on the
//! bf16-rounded inputs with its output rounded to bf16, relative L2 <= 5e-4 (only rare one-ulp
//! rounding flips), which a state kept in bf16 instead of f32 would fail.
//! Without a CUDA device (real or emulated) every test prints `skipped: no CUDA device`.

use std::collections::HashMap;
use std::sync::Arc;

use openuni_cpu::ops as cpu;
use openuni_cuda::families::linear_attention::{chunking, Dims};
use openuni_cuda::testing::{check, device_or_skip, rel_l2, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor};
use openuni_graph::{Graph, GraphBuilder};
use openuni_tensor::{DType, HostTensor};

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// The stricter bf16 bound of the module comment.
fn check_exact_bf16(what: &str, dtype: DType, got: &[f32], base: &[f32]) {
    if dtype != DType::BF16 {
        return;
    }
    let e = rel_l2(got, &round_to(dtype, base));
    println!("{what}: vs the rounded bf16-input computation: rel L2 {e:.3e} (bound 5e-4)");
    assert!(
        e <= 5e-4,
        "{what}: {e:.3e} from the bf16-input computation: the f32 state lost precision"
    );
}

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(shape.to_vec(), v).unwrap()
}

fn run(
    dev: &Arc<CudaDevice>,
    g: &Graph,
    inputs: &HashMap<String, HostTensor>,
    dtype: DType,
) -> HashMap<String, Vec<f32>> {
    let w: HashMap<String, HostTensor> = HashMap::new();
    let mut ex = CudaExecutor::new(dev, g, &w, dtype, false).unwrap();
    ex.run(inputs)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_f32_vec()))
        .collect()
}

/// q, k, v with a positive bias so that ReLU keeps about 60% of the values.
fn qkv(rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        rng.normals(n, 0.25, 1.0),
        rng.normals(n, 0.25, 1.0),
        rng.normals(n, 0.0, 1.0),
    )
}

fn separate_graph(b: usize, n: usize, heads: usize, hd: usize) -> Graph {
    let mut gb = GraphBuilder::new();
    let c = heads * hd;
    let q = gb.input("q", [b, n, c]).unwrap();
    let k = gb.input("k", [b, n, c]).unwrap();
    let v = gb.input("v", [b, n, c]).unwrap();
    let y = gb
        .linear_attention("attn1.linear_attention", q, k, v, heads, hd)
        .unwrap();
    gb.output("y", y).unwrap();
    gb.finish()
}

fn packed_graph(b: usize, n: usize, groups: usize, hd: usize) -> Graph {
    let mut gb = GraphBuilder::new();
    let x = gb.input("qkv", [b, n, groups * 3 * hd]).unwrap();
    let y = gb
        .packed_linear_attention("attn.linear_attention", x, groups, hd)
        .unwrap();
    gb.output("y", y).unwrap();
    gb.finish()
}

#[allow(clippy::too_many_arguments)]
fn check_separate(
    dev: &Arc<CudaDevice>,
    rng: &mut Rng,
    b: usize,
    n: usize,
    heads: usize,
    hd: usize,
) {
    let c = heads * hd;
    let (q, k, v) = qkv(rng, b * n * c);
    let mut want = vec![0.0; b * n * c];
    cpu::linear_attention(&q, &k, &v, b, n, heads, hd, &mut want);
    let g = separate_graph(b, n, heads, hd);
    let inputs = HashMap::from([
        ("q".to_string(), tensor(&[b, n, c], q.clone())),
        ("k".to_string(), tensor(&[b, n, c], k.clone())),
        ("v".to_string(), tensor(&[b, n, c], v.clone())),
    ]);
    let (chunks, len) = chunking(dev.sm_count(), &Dims::separate(b, n, heads, hd));
    for dtype in DTYPES {
        let got = &run(dev, &g, &inputs, dtype)["y"];
        let mut base = vec![0.0; b * n * c];
        cpu::linear_attention(
            &round_to(dtype, &q),
            &round_to(dtype, &k),
            &round_to(dtype, &v),
            b,
            n,
            heads,
            hd,
            &mut base,
        );
        let what = format!(
            "linear_attention {dtype} B={b} N={n} heads={heads} hd={hd} ({chunks} chunks of {len})"
        );
        check(&what, dtype, got, &want, &base);
        check_exact_bf16(&what, dtype, got, &base);
    }
}

#[test]
fn linear_attention_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(11);
    // (B, N, heads) at SANA's head dim 32.
    for &(b, n, heads) in &[
        (2, 1, 1),
        (2, 7, 3),
        (2, 129, 70),
        (2, 300, 2),
        (2, 1025, 3),
        (1, 64, 5),
    ] {
        check_separate(&dev, &mut rng, b, n, heads, 32);
    }
}

#[test]
fn linear_attention_small_head_dims_match_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(12);
    for hd in [2, 8, 16] {
        for &(b, n, heads) in &[(2, 7, 3), (2, 300, 2)] {
            check_separate(&dev, &mut rng, b, n, heads, hd);
        }
    }
}

#[test]
fn packed_linear_attention_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(13);
    for hd in [2, 8, 16, 32] {
        for &(b, n, groups) in &[(2, 1, 2), (2, 7, 3), (2, 300, 2), (2, 1025, 1)] {
            let w = groups * 3 * hd;
            let x = rng.normals(b * n * w, 0.2, 1.0);
            let mut want = vec![0.0; b * n * groups * hd];
            cpu::packed_linear_attention(&x, b, n, groups, hd, &mut want);
            let g = packed_graph(b, n, groups, hd);
            let inputs = HashMap::from([("qkv".to_string(), tensor(&[b, n, w], x.clone()))]);
            let (chunks, len) = chunking(dev.sm_count(), &Dims::packed(b, n, groups, hd));
            for dtype in DTYPES {
                let got = &run(&dev, &g, &inputs, dtype)["y"];
                let mut base = vec![0.0; b * n * groups * hd];
                cpu::packed_linear_attention(&round_to(dtype, &x), b, n, groups, hd, &mut base);
                let what = format!("packed_linear_attention {dtype} B={b} N={n} groups={groups} hd={hd} ({chunks} chunks of {len})");
                check(&what, dtype, got, &want, &base);
                check_exact_bf16(&what, dtype, got, &base);
            }
        }
    }
}

fn packed_key_norm_graph(b: usize, n: usize, groups: usize, hd: usize, eps: f32) -> Graph {
    let mut gb = GraphBuilder::new();
    let x = gb.input("qkv", [b, n, groups * 3 * hd]).unwrap();
    let w = gb.weight("attn.norm_k.weight", [groups * hd]).unwrap();
    let y = gb
        .packed_linear_attention_key_norm("attn.linear_attention", x, groups, hd, w, eps)
        .unwrap();
    gb.output("y", y).unwrap();
    gb.finish()
}

/// The unfused composition the key-normed op stands for: unpack q, k, v, `rmsnorm` of k across
/// all groups (its output rounded to the storage type when `round`, as a stored normalised k
/// is), then the separate-tensor linear attention.
#[allow(clippy::too_many_arguments)]
fn key_norm_then_attention(
    x: &[f32],
    w: &[f32],
    eps: f32,
    b: usize,
    n: usize,
    groups: usize,
    hd: usize,
    round: Option<DType>,
) -> Vec<f32> {
    let c = groups * hd;
    let (mut q, mut k, mut v) = (
        vec![0.0; b * n * c],
        vec![0.0; b * n * c],
        vec![0.0; b * n * c],
    );
    for row in 0..b * n {
        for g in 0..groups {
            let src = &x[row * 3 * c + g * 3 * hd..][..3 * hd];
            q[row * c + g * hd..][..hd].copy_from_slice(&src[..hd]);
            k[row * c + g * hd..][..hd].copy_from_slice(&src[hd..2 * hd]);
            v[row * c + g * hd..][..hd].copy_from_slice(&src[2 * hd..]);
        }
    }
    let mut kn = vec![0.0; b * n * c];
    cpu::rmsnorm(&k, w, None, eps, c, &mut kn);
    if let Some(dt) = round {
        kn = round_to(dt, &kn);
    }
    let mut out = vec![0.0; b * n * c];
    cpu::linear_attention(&q, &kn, &v, b, n, groups, hd, &mut out);
    out
}

/// `PackedLinearAttention` with `key_norm` (SANA1.5's attn1: the 1/rms pre-pass, then the norm
/// applied at the state kernel's k loads) against the unfused composition (RMSNorm of k, then
/// the attention): head dim 32 (tensor cores in bf16) and the FMA head dims, one chunk and
/// several chunks per head (N = 1025), a weight with both signs.
#[test]
fn packed_linear_attention_key_norm_matches_unfused() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(17);
    let eps = 1e-6;
    for hd in [2, 8, 32] {
        for &(b, n, groups) in &[(2, 7, 3), (2, 300, 2), (2, 1025, 3)] {
            if hd != 32 && n > 300 {
                continue;
            }
            let c = groups * hd;
            let x = rng.normals(b * n * 3 * c, 0.2, 1.0);
            let w = rng.normals(c, 0.5, 1.0);
            let want = key_norm_then_attention(&x, &w, eps, b, n, groups, hd, None);
            let g = packed_key_norm_graph(b, n, groups, hd, eps);
            let inputs = HashMap::from([("qkv".to_string(), tensor(&[b, n, 3 * c], x.clone()))]);
            let weights =
                HashMap::from([("attn.norm_k.weight".to_string(), tensor(&[c], w.clone()))]);
            let (chunks, len) = chunking(dev.sm_count(), &Dims::packed(b, n, groups, hd));
            for dtype in DTYPES {
                let mut ex = CudaExecutor::new(&dev, &g, &weights, dtype, false).unwrap();
                let got = ex.run(&inputs).unwrap()["y"].to_f32_vec();
                let base = key_norm_then_attention(
                    &round_to(dtype, &x),
                    &round_to(dtype, &w),
                    eps,
                    b,
                    n,
                    groups,
                    hd,
                    Some(dtype),
                );
                let what = format!("packed_linear_attention key_norm {dtype} B={b} N={n} groups={groups} hd={hd} ({chunks} chunks of {len})");
                check(&what, dtype, &got, &want, &base);
                check_exact_bf16(&what, dtype, &got, &base);
            }
        }
    }
}

/// `MultiscaleLinearAttention` (DC-AE's [qkv | agg] without the concat): each scale's groups
/// written into their column range of the output, against the twin (concat, then the packed
/// attention). Uneven scales (2 + 1 groups), DC-AE's two equal scales at head dim 32 with several
/// chunks per head (N = 1025), one token.
#[test]
fn multiscale_linear_attention_matches_cpu() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(15);
    for (b, n, hd, groups) in [
        (2, 7, 8, vec![2, 1]),
        (2, 1025, 32, vec![2, 2]),
        (1, 1, 16, vec![1, 3]),
    ] {
        let xs: Vec<Vec<f32>> = groups
            .iter()
            .map(|g| rng.normals(b * n * g * 3 * hd, 0.2, 1.0))
            .collect();
        let widths: Vec<usize> = groups.iter().map(|g| g * 3 * hd).collect();
        let c = groups.iter().sum::<usize>() * hd;
        let twin = |xs: &[Vec<f32>]| {
            let parts: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
            let mut y = vec![0.0; b * n * c];
            cpu::multiscale_linear_attention(&parts, &widths, b, n, hd, &mut y);
            y
        };
        let want = twin(&xs);
        let mut gb = GraphBuilder::new();
        let ids: Vec<_> = widths
            .iter()
            .enumerate()
            .map(|(i, &w)| gb.input(&format!("s{i}"), [b, n, w]).unwrap())
            .collect();
        let y = gb
            .multiscale_linear_attention("attn.linear_attention", &ids, hd)
            .unwrap();
        gb.output("y", y).unwrap();
        let g = gb.finish();
        let inputs: HashMap<String, HostTensor> = xs
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (x, &w))| (format!("s{i}"), tensor(&[b, n, w], x.clone())))
            .collect();
        for dtype in DTYPES {
            let got = &run(&dev, &g, &inputs, dtype)["y"];
            let base = twin(&xs.iter().map(|x| round_to(dtype, x)).collect::<Vec<_>>());
            let what = format!(
                "multiscale_linear_attention {dtype} B={b} N={n} hd={hd} groups={groups:?}"
            );
            check(&what, dtype, got, &want, &base);
            check_exact_bf16(&what, dtype, got, &base);
        }
    }
}

/// Heads whose keys (or queries) are all negative have a zero state (or zero query after ReLU):
/// the output is exactly 0 (0 / 1e-15), never NaN.
#[test]
fn zero_state_gives_zero_output() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(14);
    let (b, n, heads, hd) = (2, 300, 2, 32);
    let c = heads * hd;
    let (mut q, mut k, v) = qkv(&mut rng, b * n * c);
    for r in 0..b * n {
        for i in 0..hd {
            k[r * c + i] = -k[r * c + i].abs() - 0.1; // head 0: every key negative
            q[r * c + hd + i] = -q[r * c + hd + i].abs(); // head 1: every query <= 0
        }
    }
    let g = separate_graph(b, n, heads, hd);
    let inputs = HashMap::from([
        ("q".to_string(), tensor(&[b, n, c], q)),
        ("k".to_string(), tensor(&[b, n, c], k)),
        ("v".to_string(), tensor(&[b, n, c], v)),
    ]);
    for dtype in DTYPES {
        let got = &run(&dev, &g, &inputs, dtype)["y"];
        assert!(
            got.iter().all(|&x| x == 0.0),
            "{dtype}: expected exact zeros"
        );
    }
}

/// The state kernel's counters must be back at zero after every call: runs and CUDA-graph replays
/// alternating two input sets of a node with several chunks per head each match the CPU, and
/// repeat bit for bit (the reduction order is fixed, whichever CTA finishes last). Two nodes of
/// different shapes share the workspaces.
#[test]
fn repeated_runs_and_replays_are_identical() {
    let Some(dev) = device_or_skip() else { return };
    let mut rng = Rng::new(15);
    let (b, n, heads, hd) = (2, 1025, 3, 32);
    let (n2, groups) = (300, 2);
    let c = heads * hd;
    let w2 = groups * 3 * hd;
    let mut gb = GraphBuilder::new();
    let qi = gb.input("q", [b, n, c]).unwrap();
    let ki = gb.input("k", [b, n, c]).unwrap();
    let vi = gb.input("v", [b, n, c]).unwrap();
    let xi = gb.input("qkv", [b, n2, w2]).unwrap();
    let y1 = gb
        .linear_attention("a.linear_attention", qi, ki, vi, heads, hd)
        .unwrap();
    let y2 = gb
        .packed_linear_attention("b.linear_attention", xi, groups, hd)
        .unwrap();
    gb.output("y1", y1).unwrap();
    gb.output("y2", y2).unwrap();
    let g = gb.finish();
    assert!(
        chunking(dev.sm_count(), &Dims::separate(b, n, heads, hd)).0 > 1,
        "the test needs several chunks"
    );
    // Two input sets, their CPU results (f32 inputs) and plain bf16 baselines.
    struct Set {
        inputs: HashMap<String, HostTensor>,
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        x: Vec<f32>,
    }
    let sets: Vec<Set> = (0..2)
        .map(|_| {
            let (q, k, v) = qkv(&mut rng, b * n * c);
            let x = rng.normals(b * n2 * w2, 0.2, 1.0);
            let inputs = HashMap::from([
                ("q".to_string(), tensor(&[b, n, c], q.clone())),
                ("k".to_string(), tensor(&[b, n, c], k.clone())),
                ("v".to_string(), tensor(&[b, n, c], v.clone())),
                ("qkv".to_string(), tensor(&[b, n2, w2], x.clone())),
            ]);
            Set { inputs, q, k, v, x }
        })
        .collect();
    let w: HashMap<String, HostTensor> = HashMap::new();
    for dtype in DTYPES {
        let mut ex = CudaExecutor::new(&dev, &g, &w, dtype, false).unwrap();
        let mut firsts = vec![];
        for (i, s) in sets.iter().enumerate() {
            let out = ex.run(&s.inputs).unwrap();
            let (a1, a2) = (out["y1"].to_f32_vec(), out["y2"].to_f32_vec());
            let (mut want1, mut base1) = (vec![0.0; b * n * c], vec![0.0; b * n * c]);
            cpu::linear_attention(&s.q, &s.k, &s.v, b, n, heads, hd, &mut want1);
            cpu::linear_attention(
                &round_to(dtype, &s.q),
                &round_to(dtype, &s.k),
                &round_to(dtype, &s.v),
                b,
                n,
                heads,
                hd,
                &mut base1,
            );
            let (mut want2, mut base2) = (
                vec![0.0; b * n2 * groups * hd],
                vec![0.0; b * n2 * groups * hd],
            );
            cpu::packed_linear_attention(&s.x, b, n2, groups, hd, &mut want2);
            cpu::packed_linear_attention(&round_to(dtype, &s.x), b, n2, groups, hd, &mut base2);
            check(
                &format!("{dtype} set {i} node 1"),
                dtype,
                &a1,
                &want1,
                &base1,
            );
            check(
                &format!("{dtype} set {i} node 2"),
                dtype,
                &a2,
                &want2,
                &base2,
            );
            firsts.push((a1, a2));
        }
        let same = |out: &HashMap<String, HostTensor>, i: usize, what: &str| {
            assert!(
                out["y1"].to_f32_vec() == firsts[i].0,
                "{dtype}: {what} of set {i} differs (node 1)"
            );
            assert!(
                out["y2"].to_f32_vec() == firsts[i].1,
                "{dtype}: {what} of set {i} differs (node 2)"
            );
        };
        same(&ex.run(&sets[0].inputs).unwrap(), 0, "second run");
        ex.capture().unwrap();
        for i in [1, 0, 1] {
            same(&ex.replay(&sets[i].inputs).unwrap(), i, "replay");
        }
        println!(
            "{dtype}: runs and replays identical; workspaces {} bytes",
            ex.resource_bytes()
        );
    }
}

#[test]
fn unsupported_head_dim_is_a_clear_error() {
    let Some(dev) = device_or_skip() else { return };
    let g = separate_graph(1, 4, 2, 64);
    let w: HashMap<String, HostTensor> = HashMap::new();
    let err = CudaExecutor::new(&dev, &g, &w, DType::BF16, false)
        .err()
        .expect("head dim 64 must be refused")
        .to_string();
    println!("{err}");
    assert!(
        err.contains("attn1.linear_attention")
            && err.contains("head_dim 64")
            && err.contains("linear_attention.cu"),
        "{err}"
    );
}
