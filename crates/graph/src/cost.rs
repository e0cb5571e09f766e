//! What a node costs: floating-point operations and the elements it must move at least once
//! (every input, weights included, and its output). Profiles divide these by measured times to
//! report achieved FLOP/s and bytes/s against the machine's measured ceilings.

use crate::{Graph, Node, Op};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    /// Multiply-adds count 2.
    pub flops: f64,
    /// Elements read plus written (times the storage size gives bytes).
    pub elems: f64,
}

/// The cost of `node` in `graph`, as the op is defined (not as a backend may compute it: the
/// up-block conv counts the 3×3 conv on the upsampled grid it stands for).
pub fn node_cost(graph: &Graph, node: &Node) -> Cost {
    let numel = |id| graph.shape(id).numel() as f64;
    let out = graph.shape(node.output);
    let elems = match &node.op {
        // Only the rows the ids name are read, not the whole table.
        Op::EmbeddingGather { ids, .. } => numel(*ids) + 2.0 * out.numel() as f64,
        // The key norm needs every token's RMS over all groups before any group's state: the
        // CUDA backend reads the k columns once more for it (a pre-pass writing one f32 per
        // token, read back by the state kernel: 2 storage elements each way in bf16, counted
        // as 4 per token, an upper bound for f32 storage).
        Op::PackedLinearAttention {
            key_norm: Some(_),
            groups,
            head_dim,
            ..
        } => {
            let tokens = out.rows() as f64;
            node.op.inputs().iter().map(|&i| numel(i)).sum::<f64>()
                + out.numel() as f64
                + tokens * (*groups * *head_dim) as f64
                + 4.0 * tokens
        }
        _ => node.op.inputs().iter().map(|&i| numel(i)).sum::<f64>() + out.numel() as f64,
    };
    let rows = out.rows() as f64;
    let flops = match &node.op {
        Op::Linear { x, w, .. } | Op::LinearResidual { x, w, .. } => {
            2.0 * rows * graph.shape(*x).last() as f64 * graph.shape(*w).dims()[0] as f64
        }
        Op::Attention {
            q,
            k,
            heads,
            head_dim,
            causal,
            segments,
            ..
        } => {
            let (qs, ks) = (graph.shape(*q).dims(), graph.shape(*k).dims());
            // Packed sequences: only the (query, key) pairs inside each segment are work.
            let pairs = segments.as_ref().map_or(qs[1] as f64 * ks[1] as f64, |s| {
                s.iter().map(|&l| (l * l) as f64).sum()
            });
            let full = 4.0 * (qs[0] * heads * head_dim) as f64 * pairs;
            if *causal {
                full / 2.0
            } else {
                full
            }
        }
        // Per head: the k·vᵀ state and its product with q, hd² multiply-adds each per token.
        Op::LinearAttention {
            q, heads, head_dim, ..
        } => {
            let d = graph.shape(*q).dims();
            4.0 * (d[0] * d[1] * heads * head_dim * head_dim) as f64
        }
        Op::PackedLinearAttention {
            qkv,
            groups,
            head_dim,
            ..
        } => {
            let d = graph.shape(*qkv).dims();
            4.0 * (d[0] * d[1] * groups * head_dim * head_dim) as f64
        }
        Op::MultiscaleLinearAttention { head_dim, .. } => {
            let d = out.dims();
            4.0 * (d[0] * d[1] * d[2] * head_dim) as f64
        }
        Op::Conv2d { x, kernel, .. } => {
            2.0 * rows * out.last() as f64 * (graph.shape(*x).last() * kernel * kernel) as f64
        }
        Op::RmsNormReluConv2d { x, kernel, .. } => {
            2.0 * rows * out.last() as f64 * (graph.shape(*x).last() * kernel * kernel) as f64
        }
        Op::UpsampleConv2d { x, .. } => {
            2.0 * rows * out.last() as f64 * (graph.shape(*x).last() * 9) as f64
        }
        Op::DepthwiseConv2d { kernel, .. } => 2.0 * out.numel() as f64 * (kernel * kernel) as f64,
        Op::DepthwiseConvGlu { kernel, .. } => 4.0 * out.numel() as f64 * (kernel * kernel) as f64,
        // The 1×1 conv C -> 2H, then the 3×3 depthwise conv of both GLU halves.
        Op::MixFfnInvertedGlu { x, weight, .. } => {
            2.0 * rows * graph.shape(*x).last() as f64 * graph.shape(*weight).dims()[0] as f64
                + 4.0 * out.numel() as f64 * 9.0
        }
        Op::GroupedLinear { x, groups, .. } => {
            2.0 * rows * out.last() as f64 * (graph.shape(*x).last() / groups) as f64
        }
        // Per element: guidance 3 (sub, mul, add) and the estimate 2; the update 3 (first order) to 6.
        Op::GuidedX0 { .. } => 5.0 * out.numel() as f64,
        Op::DpmSolverUpdate { .. } => 6.0 * out.numel() as f64,
        Op::DivScalar { .. } => out.numel() as f64,
        _ => 0.0,
    };
    Cost { flops, elems }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GraphBuilder;

    #[test]
    fn linear_and_conv_costs() {
        let mut b = GraphBuilder::new();
        let x = b.input("x", [2, 6, 8]).unwrap();
        let w = b.weight("w", [5, 8]).unwrap();
        let y = b.linear("lin", x, w, None).unwrap();
        b.output("y", y).unwrap();
        let g = b.finish();
        let c = node_cost(&g, &g.nodes[0]);
        assert_eq!(c.flops, 2.0 * 12.0 * 8.0 * 5.0);
        assert_eq!(c.elems, 96.0 + 40.0 + 60.0);
    }

    #[test]
    fn key_norm_counts_the_pre_pass_and_a_bad_weight_is_refused() {
        // B = 2, N = 5, 3 groups of hd 4: qkv [2, 5, 36], out [2, 5, 12], weight [12].
        let mut b = GraphBuilder::new();
        let x = b.input("qkv", [2, 5, 36]).unwrap();
        let w = b.weight("attn.norm_k.weight", [12]).unwrap();
        let plain = b.packed_linear_attention("plain", x, 3, 4).unwrap();
        let normed = b
            .packed_linear_attention_key_norm("normed", x, 3, 4, w, 1e-5)
            .unwrap();
        let bad = b.weight("bad", [11]).unwrap();
        let e = b
            .packed_linear_attention_key_norm("attn1.linear_attention", x, 3, 4, bad, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attn1.linear_attention") && e.contains("[11]") && e.contains("[12]"),
            "{e}"
        );
        b.output("a", plain).unwrap();
        b.output("b", normed).unwrap();
        let g = b.finish();
        let (p, n) = (node_cost(&g, &g.nodes[0]), node_cost(&g, &g.nodes[1]));
        assert_eq!(p.elems, 360.0 + 120.0);
        // + the weight, k read again by the 1/rms pre-pass (10 tokens x 12), 4 per token for the f32.
        assert_eq!(n.elems, p.elems + 12.0 + 120.0 + 40.0);
        assert_eq!(n.flops, p.flops);
    }
}
