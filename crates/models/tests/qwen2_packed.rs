//! `qwen2::build_packed` (several sequences along the token axis, segmented causal attention with
//! fused RoPE) against `qwen2::build` on each sequence alone, on the f32 CPU backend with a small
//! random Qwen2 (GQA 4/2, head dim 8, two layers).

use std::collections::HashMap;

use openuni_cpu::CpuExecutor;
use openuni_graph::{Graph, GraphBuilder};
use openuni_models::nn::Scope;
use openuni_models::qwen2::{self, Qwen2Config};
use openuni_tensor::{HostTensor, TensorMap};

fn config() -> Qwen2Config {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 16,
        "rope_theta": 10000.0, "max_position_embeddings": 40
    }))
    .unwrap()
}

/// Deterministic values in (-1, 1) (an LCG: the test needs no RNG crate).
fn values(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Random weights for every weight of `g`: norms near 1, matrices and biases of scale 0.3.
fn weights(g: &Graph) -> TensorMap {
    let mut seed = 5;
    let mut tensors = HashMap::new();
    for (id, name) in g.weights() {
        let shape = g.shape(id).clone();
        let mut v = values(&mut seed, shape.numel());
        let norm = name.contains("norm");
        for x in v.iter_mut() {
            *x = if norm { 1.0 + 0.2 * *x } else { 0.3 * *x };
        }
        tensors.insert(name.to_string(), HostTensor::from_f32(shape, v).unwrap());
    }
    TensorMap {
        origin: "random qwen2".into(),
        tensors,
    }
}

fn run(g: &Graph, w: &TensorMap, x: Vec<f32>, shape: [usize; 3]) -> Vec<f32> {
    let mut ex = CpuExecutor::new(g, w, false).unwrap();
    let feeds = HashMap::from([(
        "x".to_string(),
        HostTensor::from_f32(shape.to_vec(), x).unwrap(),
    )]);
    ex.run(&feeds).unwrap()["h"].to_f32_vec()
}

#[test]
fn build_packed_equals_build_per_sequence() {
    let cfg = config();
    let d = cfg.hidden_size;
    let segs = [7usize, 1, 12];
    let t: usize = segs.iter().sum();
    let x = values(&mut 99, t * d);

    let mut b = GraphBuilder::new();
    let xi = b.input("x", [1, t, d]).unwrap();
    let out = qwen2::build_packed(&mut b, &cfg, &Scope::new("model"), xi, &segs, "test").unwrap();
    b.output("h", out.hidden_states).unwrap();
    let g = b.finish();
    let w = weights(&g);
    let packed = run(&g, &w, x.clone(), [1, t, d]);

    let mut start = 0;
    let mut worst = 0f32;
    for &len in &segs {
        let mut b = GraphBuilder::new();
        let xi = b.input("x", [1, len, d]).unwrap();
        let out = qwen2::build(&mut b, &cfg, &Scope::new("model"), xi, "test").unwrap();
        b.output("h", out.hidden_states).unwrap();
        let g1 = b.finish();
        let alone = run(
            &g1,
            &w,
            x[start * d..(start + len) * d].to_vec(),
            [1, len, d],
        );
        for (a, p) in alone.iter().zip(&packed[start * d..(start + len) * d]) {
            worst = worst.max((a - p).abs() / (1.0 + a.abs()));
        }
        start += len;
    }
    println!("build_packed vs build per sequence: max relative difference {worst:.3e}");
    assert!(worst <= 1e-5, "packed and separate differ by {worst:.3e}");

    // The packing matters: the whole token range as one sequence gives a different last segment.
    let mut b = GraphBuilder::new();
    let xi = b.input("x", [1, t, d]).unwrap();
    let out = qwen2::build(&mut b, &cfg, &Scope::new("model"), xi, "test").unwrap();
    b.output("h", out.hidden_states).unwrap();
    let whole = run(&b.finish(), &w, x, [1, t, d]);
    let diff = whole[(t - 1) * d..]
        .iter()
        .zip(&packed[(t - 1) * d..])
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        diff > 1e-2,
        "one long sequence and the packed ones agree ({diff:.3e})"
    );
}

#[test]
fn build_packed_refuses_bad_segments() {
    let cfg = config();
    let mut b = GraphBuilder::new();
    let x = b.input("x", [1, 50, cfg.hidden_size]).unwrap();
    let e = qwen2::build_packed(&mut b, &cfg, &Scope::new("model"), x, &[20, 20], "llm")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[20, 20]") && e.contains("sum 40"), "{e}");
    // 41 tokens exceed max_position_embeddings = 40 in one sequence, though the total is fine.
    let e = qwen2::build_packed(&mut b, &cfg, &Scope::new("model"), x, &[9, 41], "llm")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("packed sequence 1") && e.contains("41 tokens"),
        "{e}"
    );
    assert!(qwen2::build_packed(&mut b, &cfg, &Scope::new("model"), x, &[10, 40], "llm").is_ok());
}
