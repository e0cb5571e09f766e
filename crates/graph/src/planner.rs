//! Liveness planner: every input and activation gets an offset in one arena; values whose
//! lifetimes do not overlap share memory. The plan is made once per graph, so the step loop
//! allocates nothing.

use crate::{Graph, ValueId, ValueKind};

/// Offsets are multiples of this many elements (256 bytes for f32), enough for vector loads and
/// for cuBLASLt's alignment preferences in any dtype.
pub const ARENA_ALIGN_ELEMS: usize = 64;

#[derive(Clone, Debug)]
pub struct Plan {
    /// Element offset of each value in the arena; `None` for weights.
    pub offsets: Vec<Option<usize>>,
    /// Arena size in elements.
    pub arena_elems: usize,
    /// Sum of all slotted value sizes, i.e. what the arena would be without reuse.
    pub unshared_elems: usize,
    /// The most elements alive at one node: no arena can be smaller.
    pub live_peak_elems: usize,
}

impl Plan {
    pub fn offset(&self, id: ValueId) -> Option<usize> {
        self.offsets[id.0]
    }
}

fn round_up(n: usize) -> usize {
    n.div_ceil(ARENA_ALIGN_ELEMS) * ARENA_ALIGN_ELEMS
}

/// Plans the arena. With `keep_all`, no two values share memory, so every node's output can be
/// read after the run (node-by-node diffs between backends).
pub fn plan(graph: &Graph, keep_all: bool) -> Plan {
    let n_nodes = graph.nodes.len();
    let n = graph.values.len();
    // Lifetime of each slotted value as [first node, last node], inclusive. A node's output is
    // live at its own node together with its inputs, so an output never aliases an input.
    let mut life: Vec<Option<(usize, usize)>> = graph
        .values
        .iter()
        .enumerate()
        .map(|(i, v)| match v.kind {
            // Inputs live for the whole run and are never overwritten, so that an input set once
            // (a batch's cross-attention K/V) serves every later run of the graph. All inputs are
            // live at node 0 anyway, so this keeps alive only inputs whose last use came early.
            ValueKind::Input(_) => Some((0, n_nodes)),
            // States persist across runs: live for the whole run, never shared.
            ValueKind::State(_) => Some((0, n_nodes)),
            // An in-place append to a state is the state's own memory (placed at the end).
            ValueKind::Activation { .. } if graph.state_of(ValueId(i)).is_some() => None,
            ValueKind::Activation { node } => Some((node, node)),
            ValueKind::Weight(_) => None,
        })
        .collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        for inp in node.op.inputs() {
            if let Some((_, end)) = &mut life[inp.0] {
                *end = (*end).max(i);
            }
        }
    }
    for (_, id) in &graph.outputs {
        if let Some((_, end)) = &mut life[id.0] {
            *end = n_nodes;
        }
    }
    if keep_all {
        for l in life.iter_mut().flatten() {
            l.1 = n_nodes;
        }
    }

    let sizes: Vec<usize> = graph
        .values
        .iter()
        .map(|v| round_up(v.shape.numel().max(1)))
        .collect();
    let slotted: Vec<usize> = (0..n).filter(|&i| life[i].is_some()).collect();
    let unshared = slotted.iter().map(|&i| sizes[i]).sum();
    // Two orders of the same first-fit placement; the smaller arena wins. In order of creation
    // a long-lived value can land above a gap that later large values cannot use; largest first
    // (TFLite's "greedy by size") packs the big activations tightly, which decides the peak of
    // the high-resolution decoder stages.
    let mut by_start = slotted.clone();
    by_start.sort_by_key(|&i| (life[i].unwrap().0, i));
    let mut by_size = slotted;
    by_size.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), life[i].unwrap().0, i));
    let (offsets, arena) = [by_start, by_size]
        .iter()
        .map(|order| place(order, &life, &sizes))
        .min_by_key(|(_, arena)| *arena)
        .expect("two orders");
    let mut offsets = offsets;
    for i in 0..n {
        if matches!(graph.values[i].kind, ValueKind::Activation { .. }) {
            if let Some(state) = graph.state_of(ValueId(i)) {
                offsets[i] = offsets[state.0];
            }
        }
    }
    let mut live_at = vec![0usize; n_nodes + 1];
    for (i, l) in life.iter().enumerate() {
        if let Some((start, end)) = *l {
            live_at[start..=end].iter_mut().for_each(|x| *x += sizes[i]);
        }
    }
    let live_peak = live_at.into_iter().max().unwrap_or(0);
    Plan {
        offsets,
        arena_elems: arena,
        unshared_elems: unshared,
        live_peak_elems: live_peak,
    }
}

/// Places the values in `order`, each at the lowest offset where it overlaps no value placed
/// before it whose lifetime overlaps its own; returns the offsets and the arena size.
fn place(
    order: &[usize],
    life: &[Option<(usize, usize)>],
    sizes: &[usize],
) -> (Vec<Option<usize>>, usize) {
    let mut offsets = vec![None; life.len()];
    let mut placed: Vec<(usize, usize, usize, usize)> = vec![]; // (offset, size, start, end)
    let mut arena = 0;
    for &i in order {
        let (start, end) = life[i].expect("slotted");
        let size = sizes[i];
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|p| p.2 <= end && start <= p.3)
            .map(|p| (p.0, p.1))
            .collect();
        busy.sort_unstable();
        let mut at = 0;
        for (off, sz) in busy {
            if off >= at + size {
                break;
            }
            at = at.max(off + sz);
        }
        placed.push((at, size, start, end));
        offsets[i] = Some(at);
        arena = arena.max(at + size);
    }
    (offsets, arena)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GraphBuilder, UnaryFn};

    /// Checks the planner's one promise: two values alive at the same node never overlap.
    fn assert_no_overlap(g: &Graph, p: &Plan) {
        let n_nodes = g.nodes.len();
        let mut life = vec![(usize::MAX, 0usize); g.values.len()];
        for (i, v) in g.values.iter().enumerate() {
            match v.kind {
                ValueKind::Input(_) | ValueKind::State(_) => life[i] = (0, n_nodes),
                ValueKind::Activation { .. } if g.state_of(ValueId(i)).is_some() => {}
                ValueKind::Activation { node } => life[i] = (node, node),
                ValueKind::Weight(_) => {}
            }
        }
        for (ni, node) in g.nodes.iter().enumerate() {
            for inp in node.op.inputs() {
                life[inp.0].1 = life[inp.0].1.max(ni);
            }
        }
        for (_, id) in &g.outputs {
            life[id.0].1 = n_nodes;
        }
        for a in 0..g.values.len() {
            for b in a + 1..g.values.len() {
                let (Some(oa), Some(ob)) = (p.offsets[a], p.offsets[b]) else {
                    continue;
                };
                let overlap_time = life[a].0 <= life[b].1 && life[b].0 <= life[a].1;
                let (sa, sb) = (g.values[a].shape.numel(), g.values[b].shape.numel());
                let overlap_mem = oa < ob + sb && ob < oa + sa;
                assert!(!(overlap_time && overlap_mem), "values {a} and {b} overlap");
            }
        }
    }

    fn chain(len: usize) -> Graph {
        let mut b = GraphBuilder::new();
        let mut x = b.input("x", [4, 100]).unwrap();
        let first = x;
        for i in 0..len {
            let y = b.unary(&format!("act{i}"), x, UnaryFn::Silu).unwrap();
            x = b.add(&format!("res{i}"), y, first).unwrap();
        }
        b.output("y", x).unwrap();
        b.finish()
    }

    #[test]
    fn chain_reuses_memory_and_never_overlaps_live_values() {
        let g = chain(10);
        let p = plan(&g, false);
        assert_no_overlap(&g, &p);
        // The input stays alive throughout; two more buffers suffice for the chain.
        assert_eq!(p.arena_elems, 3 * round_up(400));
        assert!(p.unshared_elems > 6 * p.arena_elems);
    }

    #[test]
    fn largest_first_avoids_the_gap_creation_order_leaves() {
        // `s` (small, alive to the end) is made while `a` is alive, so in creation order it lands
        // above `a`; `big`, twice `a`'s size, then cannot use the gap `a` leaves below `s`.
        let mut b = GraphBuilder::new();
        let x = b.input("x", [1, 1, 64]).unwrap();
        let a = b.repeat_channels("a", x, 16).unwrap();
        let s = b.unary("s", x, UnaryFn::Silu).unwrap();
        let w1 = b.weight("w1", vec![64, 1024]).unwrap();
        let d = b.linear("d", a, w1, None).unwrap();
        let big = b.repeat_channels("big", d, 32).unwrap();
        let w2 = b.weight("w2", vec![64, 2048]).unwrap();
        let small = b.linear("small", big, w2, None).unwrap();
        let out = b.add("out", small, s).unwrap();
        b.output("out", out).unwrap();
        let g = b.finish();
        let p = plan(&g, false);
        assert_no_overlap(&g, &p);
        assert_eq!(p.live_peak_elems, 64 + 64 + 64 + 2048);
        assert_eq!(p.arena_elems, p.live_peak_elems);
        // Creation order alone would need 1024 more.
        let (n_nodes, mut order) = (g.nodes.len(), (0..g.values.len()).collect::<Vec<_>>());
        let mut life: Vec<Option<(usize, usize)>> = vec![None; g.values.len()];
        for (i, v) in g.values.iter().enumerate() {
            life[i] = match v.kind {
                ValueKind::Input(_) | ValueKind::State(_) => Some((0, n_nodes)),
                ValueKind::Activation { node } => Some((node, node)),
                ValueKind::Weight(_) => None,
            };
        }
        for (ni, node) in g.nodes.iter().enumerate() {
            for inp in node.op.inputs() {
                if let Some(l) = &mut life[inp.0] {
                    l.1 = l.1.max(ni);
                }
            }
        }
        life[out.0] = Some((life[out.0].unwrap().0, n_nodes));
        order.retain(|&i| life[i].is_some());
        let sizes: Vec<usize> = g.values.iter().map(|v| round_up(v.shape.numel())).collect();
        assert_eq!(place(&order, &life, &sizes).1, p.arena_elems + 1024);
    }

    #[test]
    fn inputs_are_never_overwritten() {
        // `x` is last read by the first node; without the rule its memory would be reused.
        let mut b = GraphBuilder::new();
        let x = b.input("x", [4, 100]).unwrap();
        let mut y = b.unary("a0", x, UnaryFn::Silu).unwrap();
        for i in 1..4 {
            y = b.unary(&format!("a{i}"), y, UnaryFn::Silu).unwrap();
        }
        b.output("y", y).unwrap();
        let g = b.finish();
        let p = plan(&g, false);
        assert_no_overlap(&g, &p);
        let xo = p.offset(x).unwrap();
        for v in 1..g.values.len() {
            if let Some(o) = p.offsets[v] {
                assert!(
                    o + 400 <= xo || o >= xo + round_up(400),
                    "value {v} reuses the input's memory"
                );
            }
        }
    }

    #[test]
    fn keep_all_gives_every_value_its_own_memory() {
        let g = chain(5);
        let p = plan(&g, true);
        assert_no_overlap(&g, &p);
        assert_eq!(p.arena_elems, p.unshared_elems);
    }

    #[test]
    fn offsets_are_aligned() {
        let mut b = GraphBuilder::new();
        let x = b.input("x", [3, 7]).unwrap();
        let y = b.unary("a", x, UnaryFn::Relu).unwrap();
        let z = b.add("b", y, x).unwrap();
        b.output("z", z).unwrap();
        let g = b.finish();
        let p = plan(&g, false);
        assert!(p
            .offsets
            .iter()
            .flatten()
            .all(|o| o % ARENA_ALIGN_ELEMS == 0));
        assert_no_overlap(&g, &p);
    }

    #[test]
    fn an_append_to_a_state_is_the_states_memory() {
        let mut b = GraphBuilder::new();
        let cache = b.state("k_cache", [2, 1, 8, 4]).unwrap();
        let x = b.input("x", [2, 4]).unwrap();
        let pos = b.input("pos", [2]).unwrap();
        let c2 = b
            .kv_cache_append("append", cache, x, pos, 1, 4, None)
            .unwrap();
        let q = b.unary("q", x, UnaryFn::Relu).unwrap();
        let o = b
            .decode_attention("attn", q, c2, c2, pos, 1, 1, 4, 0.5, None)
            .unwrap();
        b.output("o", o).unwrap();
        // A second in-place append to the same state is refused.
        assert!(b.kv_cache_append("again", c2, x, pos, 1, 4, None).is_err());
        let g = b.finish();
        for keep_all in [false, true] {
            let p = plan(&g, keep_all);
            assert_eq!(p.offset(c2), p.offset(cache));
            // Nothing else overlaps the state.
            let (so, sn) = (p.offset(cache).unwrap(), 64);
            for v in [x, pos, q, o] {
                let (vo, vn) = (p.offset(v).unwrap(), g.shape(v).numel());
                assert!(
                    vo + vn <= so || vo >= so + sn,
                    "value {v:?} overlaps the state"
                );
            }
        }
    }
}
