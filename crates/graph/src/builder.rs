use std::collections::HashMap;

use openuni_tensor::Shape;

use crate::{expect_shape, shape_err, GraphError, KeyNorm, Modulation, Op, Result, UnaryFn};

/// The options of one attention node ([`GraphBuilder::attention_ext`]; meanings in `Op::Attention`).
#[derive(Clone, Debug, PartialEq)]
pub struct AttentionParams {
    pub key_mask: Option<ValueId>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
    /// Packed sequence lengths along the token axis (batch 1).
    pub segments: Option<Vec<usize>>,
    /// Fused RoPE base (theta).
    pub rope: Option<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub usize);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// Fed by the caller on every run, by name.
    Input(String),
    /// A model parameter, by its upstream key name; uploaded once.
    Weight(String),
    /// Produced by node `node`.
    Activation { node: usize },
    /// Executor state, by name: memory that persists across runs (zeroed when the executor is
    /// made, written by the caller with `write_state`), never an input to give on each run. A
    /// `KvCacheAppend` on a state updates it in place: the append's output is the state's own
    /// memory (the planner aliases them), so a decode step moves no cache (docs/decode.md).
    State(String),
}

#[derive(Clone, Debug)]
pub struct Value {
    pub shape: Shape,
    pub kind: ValueKind,
}

#[derive(Clone, Debug)]
pub struct Node {
    /// A readable label (usually the upstream module path), shown in profiles and node diffs.
    pub name: String,
    pub op: Op,
    pub output: ValueId,
}

/// The name of a graph output, declared once as a `const` next to the code that builds the graph
/// and used both to mark the output ([`GraphBuilder::mark`]) and to read it back
/// ([`take`](Self::take)): renaming it changes both sides, so they cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutputName(pub &'static str);

impl OutputName {
    /// Removes this output from a run's outputs, or an error naming it when the run has none.
    pub fn take<T>(self, outputs: &mut HashMap<String, T>) -> Result<T> {
        outputs.remove(self.0).ok_or(GraphError::MissingOutput {
            name: self.0.to_string(),
        })
    }
}

/// A built graph: values, nodes in execution order, and named outputs.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<(String, ValueId)>,
    /// Every image of the batch (the leading dimension of the activations) gets the same
    /// arithmetic whatever the batch size: an executor that would pick kernels by row count runs
    /// each image's rows on their own (the CPU executor's GEMMs). Set by the DiT's step and caption
    /// graphs, so that an image staying in a batch others leave keeps its bits (`openuni serve`).
    pub batch_invariant: bool,
}

impl Graph {
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.0]
    }

    pub fn shape(&self, id: ValueId) -> &Shape {
        &self.values[id.0].shape
    }

    pub fn inputs(&self) -> impl Iterator<Item = (ValueId, &str)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.kind {
                ValueKind::Input(n) => Some((ValueId(i), n.as_str())),
                _ => None,
            })
    }

    /// The graph input called `name`.
    pub fn input_id(&self, name: &str) -> Option<ValueId> {
        self.inputs().find(|(_, n)| *n == name).map(|(id, _)| id)
    }

    /// The persistent state values ([`ValueKind::State`]).
    pub fn states(&self) -> impl Iterator<Item = (ValueId, &str)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.kind {
                ValueKind::State(n) => Some((ValueId(i), n.as_str())),
                _ => None,
            })
    }

    /// The state called `name`.
    pub fn state_id(&self, name: &str) -> Option<ValueId> {
        self.states().find(|(_, n)| *n == name).map(|(id, _)| id)
    }

    /// The state whose memory `id` occupies: the state itself, or a `KvCacheAppend` of it (which
    /// writes the state in place).
    pub fn state_of(&self, id: ValueId) -> Option<ValueId> {
        match &self.value(id).kind {
            ValueKind::State(_) => Some(id),
            ValueKind::Activation { node } => match &self.nodes[*node].op {
                Op::KvCacheAppend { cache, .. } => self.state_of(*cache),
                _ => None,
            },
            _ => None,
        }
    }

    pub fn weights(&self) -> impl Iterator<Item = (ValueId, &str)> {
        self.values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.kind {
                ValueKind::Weight(n) => Some((ValueId(i), n.as_str())),
                _ => None,
            })
    }
}

/// Builds a [`Graph`], checking every shape as nodes are added.
#[derive(Default)]
pub struct GraphBuilder {
    g: Graph,
    names: HashMap<String, ValueId>,
}

impl GraphBuilder {
    pub fn new() -> GraphBuilder {
        GraphBuilder::default()
    }

    /// Goes on building a finished graph (e.g. a pipeline adding checks after a model's outputs).
    pub fn extend(g: Graph) -> GraphBuilder {
        let names = g
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| match &v.kind {
                ValueKind::Input(n) | ValueKind::Weight(n) | ValueKind::State(n) => {
                    Some((n.clone(), ValueId(i)))
                }
                ValueKind::Activation { .. } => None,
            })
            .collect();
        GraphBuilder { g, names }
    }

    /// The value marked as output `name`, if any.
    pub fn output_id(&self, name: &str) -> Option<ValueId> {
        self.g
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    pub fn shape(&self, id: ValueId) -> &Shape {
        self.g.shape(id)
    }

    fn add_value(&mut self, shape: Shape, kind: ValueKind) -> ValueId {
        self.g.values.push(Value { shape, kind });
        ValueId(self.g.values.len() - 1)
    }

    fn named(
        &mut self,
        what: &'static str,
        name: &str,
        shape: Shape,
        kind: ValueKind,
    ) -> Result<ValueId> {
        if let Some(&id) = self.names.get(name) {
            // The same weight may be used twice (tied embeddings), with the same shape.
            if what == "weight"
                && matches!(self.g.value(id).kind, ValueKind::Weight(_))
                && self.g.shape(id) == &shape
            {
                return Ok(id);
            }
            return Err(GraphError::Duplicate {
                what,
                name: name.into(),
            });
        }
        let id = self.add_value(shape, kind);
        self.names.insert(name.to_string(), id);
        Ok(id)
    }

    pub fn input(&mut self, name: &str, shape: impl Into<Shape>) -> Result<ValueId> {
        self.named("input", name, shape.into(), ValueKind::Input(name.into()))
    }

    /// A persistent state value ([`ValueKind::State`]): a KV cache.
    pub fn state(&mut self, name: &str, shape: impl Into<Shape>) -> Result<ValueId> {
        self.named("state", name, shape.into(), ValueKind::State(name.into()))
    }

    pub fn weight(&mut self, name: &str, shape: impl Into<Shape>) -> Result<ValueId> {
        self.named("weight", name, shape.into(), ValueKind::Weight(name.into()))
    }

    /// Marks `id` as the output `out` (see [`OutputName`]).
    pub fn mark(&mut self, out: OutputName, id: ValueId) -> Result<()> {
        self.output(out.0, id)
    }

    /// Marks `id` as an output named at run time (per-layer or per-check outputs); fixed outputs
    /// use [`mark`](Self::mark) with a declared [`OutputName`].
    pub fn output(&mut self, name: &str, id: ValueId) -> Result<()> {
        if self.g.outputs.iter().any(|(n, _)| n == name) {
            return Err(GraphError::Duplicate {
                what: "output",
                name: name.into(),
            });
        }
        self.g.outputs.push((name.into(), id));
        Ok(())
    }

    fn push(&mut self, name: &str, op: Op, shape: Shape) -> ValueId {
        let node = self.g.nodes.len();
        let output = self.add_value(shape, ValueKind::Activation { node });
        self.g.nodes.push(Node {
            name: name.into(),
            op,
            output,
        });
        output
    }

    pub fn finish(self) -> Graph {
        self.g
    }

    /// Marks the graph [`Graph::batch_invariant`].
    pub fn batch_invariant(&mut self) {
        self.g.batch_invariant = true;
    }

    // ---- ops ----

    pub fn linear(
        &mut self,
        name: &str,
        x: ValueId,
        w: ValueId,
        bias: Option<ValueId>,
    ) -> Result<ValueId> {
        let s = self.linear_shape("linear", name, x, w, bias)?;
        Ok(self.push(name, Op::Linear { x, w, bias }, s))
    }

    /// The output shape of `linear(x, w, bias)`, or an error naming `op` and the node.
    fn linear_shape(
        &self,
        op: &'static str,
        name: &str,
        x: ValueId,
        w: ValueId,
        bias: Option<ValueId>,
    ) -> Result<Shape> {
        let (xs, ws) = (self.shape(x).clone(), self.shape(w).clone());
        if ws.rank() != 2 || xs.last() != ws.dims()[1] {
            return Err(shape_err(
                op,
                format!("{name}: input {xs} does not fit weight {ws} ([out, in])"),
            ));
        }
        let out = ws.dims()[0];
        if let Some(b) = bias {
            expect_shape(
                op,
                &format!("{name}: bias"),
                self.shape(b),
                &Shape::new([out]),
            )?;
        }
        Ok(xs.with_last(out))
    }

    pub fn rmsnorm(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        eps: f32,
    ) -> Result<ValueId> {
        let c = Shape::new([self.shape(x).last()]);
        expect_shape(
            "rmsnorm",
            &format!("{name}: weight"),
            self.shape(weight),
            &c,
        )?;
        if let Some(b) = bias {
            expect_shape("rmsnorm", &format!("{name}: bias"), self.shape(b), &c)?;
        }
        let s = self.shape(x).clone();
        Ok(self.push(
            name,
            Op::RmsNorm {
                x,
                weight,
                bias,
                eps,
            },
            s,
        ))
    }

    pub fn layernorm(
        &mut self,
        name: &str,
        x: ValueId,
        weight: Option<ValueId>,
        bias: Option<ValueId>,
        eps: f32,
        modulation: Option<Modulation>,
    ) -> Result<ValueId> {
        let xs = self.shape(x).clone();
        let c = Shape::new([xs.last()]);
        for (what, v) in [("weight", weight), ("bias", bias)] {
            if let Some(v) = v {
                expect_shape("layernorm", &format!("{name}: {what}"), self.shape(v), &c)?;
            }
        }
        if let Some(m) = modulation {
            let bc = self.broadcast_shape("layernorm", name, &xs)?;
            expect_shape(
                "layernorm",
                &format!("{name}: modulation scale"),
                self.shape(m.scale),
                &bc,
            )?;
            expect_shape(
                "layernorm",
                &format!("{name}: modulation shift"),
                self.shape(m.shift),
                &bc,
            )?;
        }
        Ok(self.push(
            name,
            Op::LayerNorm {
                x,
                weight,
                bias,
                eps,
                modulation,
            },
            xs,
        ))
    }

    /// The [B, C] shape of a per-sample vector broadcast over the tokens of a [B, N, C] tensor.
    fn broadcast_shape(&self, op: &'static str, name: &str, xs: &Shape) -> Result<Shape> {
        if xs.rank() != 3 {
            return Err(shape_err(
                op,
                format!("{name}: per-sample broadcast needs a [B, N, C] input, found {xs}"),
            ));
        }
        Ok(Shape::new([xs.dims()[0], xs.dims()[2]]))
    }

    pub fn unary(&mut self, name: &str, x: ValueId, f: UnaryFn) -> Result<ValueId> {
        let s = self.shape(x).clone();
        Ok(self.push(name, Op::Unary { x, f }, s))
    }

    pub fn add(&mut self, name: &str, a: ValueId, b: ValueId) -> Result<ValueId> {
        let s = self.shape(a).clone();
        expect_shape("add", &format!("{name}: second operand"), self.shape(b), &s)?;
        Ok(self.push(name, Op::Add { a, b }, s))
    }

    pub fn gated_add(
        &mut self,
        name: &str,
        x: ValueId,
        gate: ValueId,
        y: ValueId,
    ) -> Result<ValueId> {
        let s = self.shape(x).clone();
        expect_shape("gated_add", &format!("{name}: y"), self.shape(y), &s)?;
        let bc = self.broadcast_shape("gated_add", name, &s)?;
        // [B, C] per sample, or [1, C] for every row (a layer scale).
        let all_rows = Shape::new([1, s.last()]);
        if self.shape(gate) != &all_rows {
            expect_shape("gated_add", &format!("{name}: gate"), self.shape(gate), &bc)?;
        }
        Ok(self.push(name, Op::GatedAdd { x, gate, y }, s))
    }

    /// Plain softmax attention (no packed segments, no fused RoPE); see [`attention_ext`](Self::attention_ext).
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &mut self,
        name: &str,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        key_mask: Option<ValueId>,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        causal: bool,
        scale: f32,
    ) -> Result<ValueId> {
        let p = AttentionParams {
            key_mask,
            heads,
            kv_heads,
            head_dim,
            causal,
            scale,
            segments: None,
            rope: None,
        };
        self.attention_ext(name, q, k, v, p)
    }

    /// Softmax attention with every option of `Op::Attention`: packed segments (B = 1, lengths
    /// summing to the token count, each > 0) and fused RoPE (q and k of the same length, even
    /// head dim). All shapes are checked here.
    pub fn attention_ext(
        &mut self,
        name: &str,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        p: AttentionParams,
    ) -> Result<ValueId> {
        let AttentionParams {
            key_mask,
            heads,
            kv_heads,
            head_dim,
            causal,
            scale,
            segments,
            rope,
        } = p;
        let (qs, ks, vs) = (
            self.shape(q).clone(),
            self.shape(k).clone(),
            self.shape(v).clone(),
        );
        let bad = |m: String| Err(shape_err("attention", format!("{name}: {m}")));
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return bad(format!(
                "{heads} query heads cannot share {kv_heads} key/value heads"
            ));
        }
        if qs.rank() != 3 || qs.last() != heads * head_dim {
            return bad(format!(
                "q has shape {qs}, expected [B, N, {}]",
                heads * head_dim
            ));
        }
        let (b, n) = (qs.dims()[0], qs.dims()[1]);
        if ks.rank() != 3 || ks.dims()[0] != b || ks.last() != kv_heads * head_dim {
            return bad(format!(
                "k has shape {ks}, expected [{b}, M, {}]",
                kv_heads * head_dim
            ));
        }
        expect_shape("attention", &format!("{name}: v"), &vs, &ks)?;
        let m = ks.dims()[1];
        if causal && m != n {
            return bad(format!(
                "causal attention needs as many keys as queries, found {m} and {n}"
            ));
        }
        if let Some(mk) = key_mask {
            expect_shape(
                "attention",
                &format!("{name}: key mask"),
                self.shape(mk),
                &Shape::new([b, m]),
            )?;
        }
        if let Some(segs) = &segments {
            let total: usize = segs.iter().sum();
            if b != 1 {
                return bad(format!("packed segments need batch 1 (all sequences along the token axis), found batch {b}"));
            }
            if m != n {
                return bad(format!(
                    "packed segments need as many keys as queries, found {m} and {n}"
                ));
            }
            if segs.is_empty() || segs.contains(&0) {
                return bad(format!(
                    "segment lengths {segs:?} must be non-empty and each > 0"
                ));
            }
            if total != n {
                return bad(format!(
                    "segment lengths {segs:?} sum to {total}, but there are {n} tokens"
                ));
            }
        }
        if rope.is_some() && (m != n || head_dim % 2 != 0) {
            return bad(format!("fused RoPE needs as many keys as queries ({m} and {n}) and an even head dim ({head_dim})"));
        }
        let op = Op::Attention {
            q,
            k,
            v,
            key_mask,
            heads,
            kv_heads,
            head_dim,
            causal,
            scale,
            segments,
            rope,
        };
        Ok(self.push(name, op, qs))
    }

    /// `Op::DecodeAttention`: q [B, heads·head_dim], caches [B, kv_heads, max_len, head_dim],
    /// positions [B]; output like q.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &mut self,
        name: &str,
        q: ValueId,
        k_cache: ValueId,
        v_cache: ValueId,
        positions: ValueId,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f32,
        rope: Option<f32>,
    ) -> Result<ValueId> {
        let (qs, ks) = (self.shape(q).clone(), self.shape(k_cache).clone());
        let bad = |m: String| Err(shape_err("decode_attention", format!("{name}: {m}")));
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || head_dim == 0 {
            return bad(format!(
                "{heads} query heads cannot share {kv_heads} key/value heads (head dim {head_dim})"
            ));
        }
        if qs.rank() != 2 || qs.last() != heads * head_dim {
            return bad(format!(
                "q has shape {qs}, expected [B, {}]",
                heads * head_dim
            ));
        }
        let b = qs.dims()[0];
        if ks.rank() != 4
            || ks.dims()[0] != b
            || ks.dims()[1] != kv_heads
            || ks.dims()[3] != head_dim
            || ks.dims()[2] == 0
        {
            return bad(format!(
                "k cache has shape {ks}, expected [{b}, {kv_heads}, max_len > 0, {head_dim}]"
            ));
        }
        expect_shape(
            "decode_attention",
            &format!("{name}: v cache"),
            self.shape(v_cache),
            &ks,
        )?;
        expect_shape(
            "decode_attention",
            &format!("{name}: positions"),
            self.shape(positions),
            &Shape::new([b]),
        )?;
        if rope.is_some() && !head_dim.is_multiple_of(2) {
            return bad(format!(
                "fused RoPE needs an even head dim, found {head_dim}"
            ));
        }
        let op = Op::DecodeAttention {
            q,
            k_cache,
            v_cache,
            positions,
            heads,
            kv_heads,
            head_dim,
            scale,
            rope,
        };
        Ok(self.push(name, op, qs))
    }

    /// `Op::KvCacheAppend`: cache [B, kv_heads, max_len, head_dim], x [B, kv_heads·head_dim],
    /// positions [B]; output like the cache.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_cache_append(
        &mut self,
        name: &str,
        cache: ValueId,
        x: ValueId,
        positions: ValueId,
        kv_heads: usize,
        head_dim: usize,
        rope: Option<f32>,
    ) -> Result<ValueId> {
        let (cs, xs) = (self.shape(cache).clone(), self.shape(x).clone());
        let bad = |m: String| Err(shape_err("kv_cache_append", format!("{name}: {m}")));
        if cs.rank() != 4
            || cs.dims()[1] != kv_heads
            || cs.dims()[3] != head_dim
            || cs.dims()[2] == 0
            || head_dim == 0
        {
            return bad(format!(
                "cache has shape {cs}, expected [B, {kv_heads}, max_len > 0, {head_dim}]"
            ));
        }
        let b = cs.dims()[0];
        expect_shape(
            "kv_cache_append",
            &format!("{name}: x"),
            &xs,
            &Shape::new([b, kv_heads * head_dim]),
        )?;
        expect_shape(
            "kv_cache_append",
            &format!("{name}: positions"),
            self.shape(positions),
            &Shape::new([b]),
        )?;
        if rope.is_some() && !head_dim.is_multiple_of(2) {
            return bad(format!(
                "fused RoPE needs an even head dim, found {head_dim}"
            ));
        }
        if let Some(state) = self.g.state_of(cache) {
            // In place: the state's memory is the output, so one append per state and run
            // (a second would also be in place, and readers of the first would see it).
            let taken = self.g.nodes.iter().any(|n| matches!(&n.op, Op::KvCacheAppend { cache: c, .. } if self.g.state_of(*c) == Some(state)));
            if taken {
                return bad("this state is already appended to in this graph (one in-place append per state)".into());
            }
        }
        let op = Op::KvCacheAppend {
            cache,
            x,
            positions,
            kv_heads,
            head_dim,
            rope,
        };
        Ok(self.push(name, op, cs))
    }

    /// `Op::KvCacheRows`: x [B, T, kv_heads·head_dim] -> [B, kv_heads, T, head_dim].
    pub fn kv_cache_rows(
        &mut self,
        name: &str,
        x: ValueId,
        kv_heads: usize,
        head_dim: usize,
        rope: Option<f32>,
    ) -> Result<ValueId> {
        let xs = self.shape(x).clone();
        let bad = |m: String| Err(shape_err("kv_cache_rows", format!("{name}: {m}")));
        if xs.rank() != 3 || kv_heads == 0 || head_dim == 0 || xs.last() != kv_heads * head_dim {
            return bad(format!(
                "x has shape {xs}, expected [B, T, {}] ({kv_heads} KV heads of {head_dim})",
                kv_heads * head_dim
            ));
        }
        if rope.is_some() && !head_dim.is_multiple_of(2) {
            return bad(format!(
                "fused RoPE needs an even head dim, found {head_dim}"
            ));
        }
        let (b, t) = (xs.dims()[0], xs.dims()[1]);
        Ok(self.push(
            name,
            Op::KvCacheRows {
                x,
                kv_heads,
                head_dim,
                rope,
            },
            Shape::new([b, kv_heads, t, head_dim]),
        ))
    }

    pub fn linear_attention(
        &mut self,
        name: &str,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        heads: usize,
        head_dim: usize,
    ) -> Result<ValueId> {
        let qs = self.shape(q).clone();
        if qs.rank() != 3 || qs.last() != heads * head_dim {
            return Err(shape_err(
                "linear_attention",
                format!(
                    "{name}: q has shape {qs}, expected [B, N, {}]",
                    heads * head_dim
                ),
            ));
        }
        expect_shape(
            "linear_attention",
            &format!("{name}: k"),
            self.shape(k),
            &qs,
        )?;
        expect_shape(
            "linear_attention",
            &format!("{name}: v"),
            self.shape(v),
            &qs,
        )?;
        Ok(self.push(
            name,
            Op::LinearAttention {
                q,
                k,
                v,
                heads,
                head_dim,
            },
            qs,
        ))
    }

    pub fn modulation_table(&mut self, name: &str, t: ValueId, table: ValueId) -> Result<ValueId> {
        let (ts, tab) = (self.shape(t).clone(), self.shape(table).clone());
        if tab.rank() != 2 || ts.rank() != 2 {
            return Err(shape_err(
                "modulation_table",
                format!("{name}: t {ts} and table {tab} must both be 2-D"),
            ));
        }
        let (k, c) = (tab.dims()[0], tab.dims()[1]);
        if ts.dims()[1] != k * c && ts.dims()[1] != c {
            return Err(shape_err(
                "modulation_table",
                format!(
                    "{name}: t has shape {ts}, expected [B, {}] or [B, {c}]",
                    k * c
                ),
            ));
        }
        Ok(self.push(
            name,
            Op::ModulationTable { t, table },
            Shape::new([ts.dims()[0], k, c]),
        ))
    }

    pub fn chunk(&mut self, name: &str, x: ValueId, index: usize) -> Result<ValueId> {
        let xs = self.shape(x).clone();
        if xs.rank() != 3 || index >= xs.dims()[1] {
            return Err(shape_err(
                "chunk",
                format!("{name}: cannot take row {index} of {xs} ([B, k, C])"),
            ));
        }
        Ok(self.push(
            name,
            Op::Chunk { x, index },
            Shape::new([xs.dims()[0], xs.dims()[2]]),
        ))
    }

    pub fn timestep_embedding(&mut self, name: &str, t: ValueId, dim: usize) -> Result<ValueId> {
        let ts = self.shape(t).clone();
        if ts.rank() != 1 || dim % 2 != 0 {
            return Err(shape_err(
                "timestep_embedding",
                format!("{name}: t has shape {ts} (expected [B]) and dim {dim} (expected even)"),
            ));
        }
        Ok(self.push(
            name,
            Op::TimestepEmbedding { t, dim },
            Shape::new([ts.dims()[0], dim]),
        ))
    }

    /// Views `x` as [batch, rows, cols] and transposes the last two; `out_shape` is how the result
    /// is viewed (e.g. [B, C, h, w] for unpatchify).
    pub fn transpose(
        &mut self,
        name: &str,
        x: ValueId,
        batch: usize,
        rows: usize,
        cols: usize,
        out_shape: impl Into<Shape>,
    ) -> Result<ValueId> {
        let out_shape = out_shape.into();
        let n = batch * rows * cols;
        if self.shape(x).numel() != n || out_shape.numel() != n {
            return Err(shape_err(
                "transpose",
                format!(
                    "{name}: {} -> {out_shape} does not hold [{batch}, {rows}, {cols}]",
                    self.shape(x)
                ),
            ));
        }
        Ok(self.push(
            name,
            Op::Transpose {
                x,
                batch,
                rows,
                cols,
            },
            out_shape,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn depthwise_conv2d(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
    ) -> Result<ValueId> {
        let xs = self.check_depthwise("depthwise_conv2d", name, x, weight, bias, h, w, kernel)?;
        Ok(self.push(
            name,
            Op::DepthwiseConv2d {
                x,
                weight,
                bias,
                h,
                w,
                kernel,
            },
            xs,
        ))
    }

    /// The checks both depthwise ops share: `x` [B, h·w, C], an odd kernel, weight [C, 1, k, k],
    /// bias [C]. Returns x's shape.
    #[allow(clippy::too_many_arguments)]
    fn check_depthwise(
        &self,
        op: &'static str,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
    ) -> Result<Shape> {
        let xs = self.shape(x).clone();
        if xs.rank() != 3 || xs.dims()[1] != h * w {
            return Err(shape_err(
                op,
                format!("{name}: input {xs} is not [B, {h}·{w}, C]"),
            ));
        }
        let c = xs.last();
        if kernel % 2 == 0 {
            return Err(shape_err(
                op,
                format!("{name}: kernel {kernel} must be odd"),
            ));
        }
        expect_shape(
            op,
            &format!("{name}: weight"),
            self.shape(weight),
            &Shape::new([c, 1, kernel, kernel]),
        )?;
        if let Some(b) = bias {
            expect_shape(
                op,
                &format!("{name}: bias"),
                self.shape(b),
                &Shape::new([c]),
            )?;
        }
        Ok(xs)
    }

    pub fn swiglu(&mut self, name: &str, gate: ValueId, up: ValueId) -> Result<ValueId> {
        let s = self.shape(gate).clone();
        expect_shape("swiglu", &format!("{name}: up"), self.shape(up), &s)?;
        Ok(self.push(name, Op::SwiGlu { gate, up }, s))
    }

    pub fn packed_linear_attention(
        &mut self,
        name: &str,
        qkv: ValueId,
        groups: usize,
        head_dim: usize,
    ) -> Result<ValueId> {
        self.packed_linear_attention_with(name, qkv, groups, head_dim, None)
    }

    /// [`Self::packed_linear_attention`] with the keys RMS-normalised across all groups first
    /// (`weight` [groups·head_dim]; [`crate::KeyNorm`]).
    pub fn packed_linear_attention_key_norm(
        &mut self,
        name: &str,
        qkv: ValueId,
        groups: usize,
        head_dim: usize,
        weight: ValueId,
        eps: f32,
    ) -> Result<ValueId> {
        expect_shape(
            "packed_linear_attention",
            &format!("{name}: key norm weight"),
            self.shape(weight),
            &Shape::new([groups * head_dim]),
        )?;
        self.packed_linear_attention_with(
            name,
            qkv,
            groups,
            head_dim,
            Some(KeyNorm { weight, eps }),
        )
    }

    fn packed_linear_attention_with(
        &mut self,
        name: &str,
        qkv: ValueId,
        groups: usize,
        head_dim: usize,
        key_norm: Option<KeyNorm>,
    ) -> Result<ValueId> {
        let s = self.shape(qkv).clone();
        if s.rank() != 3 || s.last() != groups * 3 * head_dim {
            return Err(shape_err(
                "packed_linear_attention",
                format!("{name}: input {s} is not [B, N, {groups}·3·{head_dim}]"),
            ));
        }
        Ok(self.push(
            name,
            Op::PackedLinearAttention {
                qkv,
                groups,
                head_dim,
                key_norm,
            },
            s.with_last(groups * head_dim),
        ))
    }

    /// `packed_linear_attention(concat(scales))` without the concat (`Op::MultiscaleLinearAttention`):
    /// every scale [B, N, gᵢ·3·head_dim] with the same B and N -> [B, N, (Σ gᵢ)·head_dim].
    pub fn multiscale_linear_attention(
        &mut self,
        name: &str,
        scales: &[ValueId],
        head_dim: usize,
    ) -> Result<ValueId> {
        let op = "multiscale_linear_attention";
        let Some(&first) = scales.first() else {
            return Err(shape_err(op, format!("{name}: no scales")));
        };
        let s0 = self.shape(first).clone();
        let mut groups = 0;
        for &x in scales {
            let s = self.shape(x);
            if head_dim == 0
                || s.rank() != 3
                || s.dims()[..2] != s0.dims()[..2]
                || !s.last().is_multiple_of(3 * head_dim)
            {
                return Err(shape_err(
                    op,
                    format!(
                        "{name}: scale {s} is not [{}, {}, g·3·{head_dim}]",
                        s0.dims()[0],
                        s0.dims().get(1).copied().unwrap_or(0)
                    ),
                ));
            }
            groups += s.last() / (3 * head_dim);
        }
        Ok(self.push(
            name,
            Op::MultiscaleLinearAttention {
                scales: scales.to_vec(),
                head_dim,
            },
            s0.with_last(groups * head_dim),
        ))
    }

    /// Checks that `x` is [B, h·w, C] and returns (B, C).
    fn grid(
        &self,
        op: &'static str,
        name: &str,
        x: ValueId,
        h: usize,
        w: usize,
    ) -> Result<(usize, usize)> {
        let s = self.shape(x);
        if s.rank() != 3 || s.dims()[1] != h * w {
            return Err(shape_err(
                op,
                format!("{name}: input {s} is not [B, {h}·{w}, C]"),
            ));
        }
        Ok((s.dims()[0], s.last()))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn conv2d(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
        silu: bool,
    ) -> Result<ValueId> {
        let (b, cin) = self.grid("conv2d", name, x, h, w)?;
        let ws = self.shape(weight).clone();
        if kernel % 2 == 0 || ws.rank() != 4 || ws.dims()[1..] != [cin, kernel, kernel] {
            return Err(shape_err(
                "conv2d",
                format!(
                    "{name}: weight {ws} is not [Cout, {cin}, {kernel}, {kernel}] (odd kernel)"
                ),
            ));
        }
        let cout = ws.dims()[0];
        if let Some(bb) = bias {
            expect_shape(
                "conv2d",
                &format!("{name}: bias"),
                self.shape(bb),
                &Shape::new([cout]),
            )?;
        }
        Ok(self.push(
            name,
            Op::Conv2d {
                x,
                weight,
                bias,
                h,
                w,
                kernel,
                silu,
            },
            Shape::new([b, h * w, cout]),
        ))
    }

    /// `residual + rmsnorm(x)` in one node (`Op::RmsNormResidual`).
    pub fn rmsnorm_residual(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        eps: f32,
        residual: ValueId,
    ) -> Result<ValueId> {
        let c = Shape::new([self.shape(x).last()]);
        expect_shape(
            "rmsnorm_residual",
            &format!("{name}: weight"),
            self.shape(weight),
            &c,
        )?;
        if let Some(b) = bias {
            expect_shape(
                "rmsnorm_residual",
                &format!("{name}: bias"),
                self.shape(b),
                &c,
            )?;
        }
        let s = self.shape(x).clone();
        expect_shape(
            "rmsnorm_residual",
            &format!("{name}: residual"),
            self.shape(residual),
            &s,
        )?;
        Ok(self.push(
            name,
            Op::RmsNormResidual {
                x,
                weight,
                bias,
                eps,
                residual,
            },
            s,
        ))
    }

    /// `conv2d(relu(rmsnorm(x)))` in one node (`Op::RmsNormReluConv2d`) -> [B, h·w, Cout].
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_relu_conv2d(
        &mut self,
        name: &str,
        x: ValueId,
        norm_weight: ValueId,
        norm_bias: Option<ValueId>,
        eps: f32,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
    ) -> Result<ValueId> {
        let op = "rmsnorm_relu_conv2d";
        let (b, cin) = self.grid(op, name, x, h, w)?;
        let c = Shape::new([cin]);
        expect_shape(
            op,
            &format!("{name}: norm weight"),
            self.shape(norm_weight),
            &c,
        )?;
        if let Some(nb) = norm_bias {
            expect_shape(op, &format!("{name}: norm bias"), self.shape(nb), &c)?;
        }
        let ws = self.shape(weight).clone();
        if kernel.is_multiple_of(2) || ws.rank() != 4 || ws.dims()[1..] != [cin, kernel, kernel] {
            return Err(shape_err(
                op,
                format!(
                    "{name}: weight {ws} is not [Cout, {cin}, {kernel}, {kernel}] (odd kernel)"
                ),
            ));
        }
        let cout = ws.dims()[0];
        if let Some(bb) = bias {
            expect_shape(
                op,
                &format!("{name}: bias"),
                self.shape(bb),
                &Shape::new([cout]),
            )?;
        }
        Ok(self.push(
            name,
            Op::RmsNormReluConv2d {
                x,
                norm_weight,
                norm_bias,
                eps,
                weight,
                bias,
                h,
                w,
                kernel,
            },
            Shape::new([b, h * w, cout]),
        ))
    }

    /// DCUpBlock2d (interpolate) in one node: `conv3x3(upsample2x(x)) (+ bias)
    /// (+ pixel_shuffle_shortcut(x))` -> [B, 2h·2w, Cout]. See `Op::UpsampleConv2d`.
    #[allow(clippy::too_many_arguments)]
    pub fn upsample_conv2d(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        shortcut: bool,
    ) -> Result<ValueId> {
        let (b, cin) = self.grid("upsample_conv2d", name, x, h, w)?;
        let ws = self.shape(weight).clone();
        if ws.rank() != 4 || ws.dims()[1..] != [cin, 3, 3] {
            return Err(shape_err(
                "upsample_conv2d",
                format!("{name}: weight {ws} is not [Cout, {cin}, 3, 3]"),
            ));
        }
        let cout = ws.dims()[0];
        if let Some(bb) = bias {
            expect_shape(
                "upsample_conv2d",
                &format!("{name}: bias"),
                self.shape(bb),
                &Shape::new([cout]),
            )?;
        }
        if shortcut && (4 * cout) % cin != 0 {
            return Err(shape_err(
                "upsample_conv2d",
                format!("{name}: 4·{cout} output channels are not a multiple of {cin} (shortcut)"),
            ));
        }
        Ok(self.push(
            name,
            Op::UpsampleConv2d {
                x,
                weight,
                bias,
                h,
                w,
                shortcut,
            },
            Shape::new([b, 4 * h * w, cout]),
        ))
    }

    pub fn repeat_channels(&mut self, name: &str, x: ValueId, repeats: usize) -> Result<ValueId> {
        let s = self.shape(x).clone();
        Ok(self.push(
            name,
            Op::RepeatChannels { x, repeats },
            s.with_last(s.last() * repeats),
        ))
    }

    /// A ViT's class token and position embedding over patch tokens `x` [B, N, C] (see
    /// `Op::ClassPosEmbed`): `cls` [C], `pos` [N + 1, C] -> [B, N + 1, C].
    pub fn class_pos_embed(
        &mut self,
        name: &str,
        x: ValueId,
        cls: ValueId,
        pos: ValueId,
    ) -> Result<ValueId> {
        let s = self.shape(x).clone();
        if s.rank() != 3 {
            return Err(shape_err(
                "class_pos_embed",
                format!("{name}: input {s} is not [B, N, C]"),
            ));
        }
        let (b, n, c) = (s.dims()[0], s.dims()[1], s.dims()[2]);
        expect_shape(
            "class_pos_embed",
            &format!("{name}: class token"),
            self.shape(cls),
            &Shape::new([c]),
        )?;
        expect_shape(
            "class_pos_embed",
            &format!("{name}: position table"),
            self.shape(pos),
            &Shape::new([n + 1, c]),
        )?;
        Ok(self.push(
            name,
            Op::ClassPosEmbed { x, cls, pos },
            Shape::new([b, n + 1, c]),
        ))
    }

    /// `Op::PixelShuffleLayerNorm`: `x` [B, skip + grid², C] -> [B, (grid/2)², 4C].
    #[allow(clippy::too_many_arguments)]
    pub fn pixel_shuffle_layernorm(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: ValueId,
        eps: f32,
        grid: usize,
        skip: usize,
    ) -> Result<ValueId> {
        let s = self.shape(x).clone();
        if grid == 0
            || !grid.is_multiple_of(2)
            || s.rank() != 3
            || s.dims()[1] != skip + grid * grid
        {
            return Err(shape_err(
                "pixel_shuffle_layernorm",
                format!("{name}: input {s} is not [B, {skip} + {grid}², C] with an even grid (pixel shuffle merges 2×2 tokens)"),
            ));
        }
        let c4 = 4 * s.last();
        expect_shape(
            "pixel_shuffle_layernorm",
            &format!("{name}: weight"),
            self.shape(weight),
            &Shape::new([c4]),
        )?;
        expect_shape(
            "pixel_shuffle_layernorm",
            &format!("{name}: bias"),
            self.shape(bias),
            &Shape::new([c4]),
        )?;
        let h = grid / 2;
        Ok(self.push(
            name,
            Op::PixelShuffleLayerNorm {
                x,
                weight,
                bias,
                eps,
                grid,
                skip,
            },
            Shape::new([s.dims()[0], h * h, c4]),
        ))
    }

    pub fn slice_tokens(
        &mut self,
        name: &str,
        x: ValueId,
        start: usize,
        len: usize,
    ) -> Result<ValueId> {
        let s = self.shape(x).clone();
        if s.rank() != 3 || start + len > s.dims()[1] {
            return Err(shape_err(
                "slice_tokens",
                format!(
                    "{name}: tokens {start}..{} are not inside {s} ([B, T, C])",
                    start + len
                ),
            ));
        }
        Ok(self.push(
            name,
            Op::SliceTokens { x, start, len },
            Shape::new([s.dims()[0], len, s.last()]),
        ))
    }

    /// `len` tokens from each of `starts` of a [1, T, C] tensor, stacked: [starts.len(), len, C].
    pub fn gather_tokens(
        &mut self,
        name: &str,
        x: ValueId,
        starts: &[usize],
        len: usize,
    ) -> Result<ValueId> {
        let s = self.shape(x).clone();
        if s.rank() != 3 || s.dims()[0] != 1 || starts.is_empty() {
            return Err(shape_err(
                "gather_tokens",
                format!(
                    "{name}: needs a [1, T, C] input and at least one start, got {s} and {} starts",
                    starts.len()
                ),
            ));
        }
        if let Some(&bad) = starts.iter().find(|&&st| st + len > s.dims()[1]) {
            return Err(shape_err(
                "gather_tokens",
                format!("{name}: tokens {bad}..{} are not inside {s}", bad + len),
            ));
        }
        Ok(self.push(
            name,
            Op::GatherTokens {
                x,
                starts: starts.to_vec(),
                len,
            },
            Shape::new([starts.len(), len, s.last()]),
        ))
    }

    /// Rows of `table` [V, D] (then of `extra` [E, D]) by the ids in `ids` [..] -> [.., D]
    /// ([`Op::EmbeddingGather`]).
    pub fn embedding_gather(
        &mut self,
        name: &str,
        ids: ValueId,
        table: ValueId,
        extra: Option<ValueId>,
    ) -> Result<ValueId> {
        let (is, ts) = (self.shape(ids).clone(), self.shape(table).clone());
        if ts.rank() != 2 || is.rank() == 0 {
            return Err(shape_err("embedding_gather", format!("{name}: needs ids of rank >= 1 and a [V, D] table, got ids {is} and table {ts}")));
        }
        if let Some(e) = extra {
            let es = self.shape(e);
            if es.rank() != 2 || es.last() != ts.last() {
                return Err(shape_err(
                    "embedding_gather",
                    format!(
                        "{name}: the extra rows {es} are not [E, {}] like the table {ts}",
                        ts.last()
                    ),
                ));
            }
        }
        let mut dims = is.dims().to_vec();
        dims.push(ts.last());
        Ok(self.push(
            name,
            Op::EmbeddingGather { ids, table, extra },
            Shape::new(dims),
        ))
    }

    /// uint8 pixel values [B, H, W, 3] of a decoded image [B, 3, H, W] ([`Op::QuantizeU8`]).
    pub fn quantize_u8(&mut self, name: &str, x: ValueId) -> Result<ValueId> {
        let s = self.shape(x).clone();
        if s.rank() != 4 || s.dims()[1] != 3 {
            return Err(shape_err(
                "quantize_u8",
                format!("{name}: needs an image [B, 3, H, W], got {s}"),
            ));
        }
        let d = s.dims();
        Ok(self.push(
            name,
            Op::QuantizeU8 { x },
            Shape::new([d[0], d[2], d[3], 3]),
        ))
    }

    /// [1]: whether `x` holds a NaN or an infinity ([`Op::AnyNonFinite`]).
    pub fn any_nonfinite(&mut self, name: &str, x: ValueId) -> Result<ValueId> {
        Ok(self.push(name, Op::AnyNonFinite { x }, Shape::new([1])))
    }

    /// `x / divisor` elementwise, one correctly rounded f32 division each ([`Op::DivScalar`]).
    pub fn div_scalar(&mut self, name: &str, x: ValueId, divisor: f32) -> Result<ValueId> {
        let s = self.shape(x).clone();
        Ok(self.push(name, Op::DivScalar { x, divisor }, s))
    }

    /// Standard-normal noise [1, N·per_seed] from `seeds` [N, seed::LIMBS] ([`Op::GaussianNoise`]).
    pub fn gaussian_noise(
        &mut self,
        name: &str,
        seeds: ValueId,
        per_seed: usize,
    ) -> Result<ValueId> {
        let ss = self.shape(seeds).clone();
        let d = ss.dims();
        if d.len() != 2 || d[1] != crate::seed::LIMBS {
            return Err(shape_err(
                "gaussian_noise",
                format!(
                    "{name}: seeds have shape {ss}, expected [N, {}]",
                    crate::seed::LIMBS
                ),
            ));
        }
        let n = d[0].checked_mul(per_seed).ok_or_else(|| {
            shape_err(
                "gaussian_noise",
                format!("{name}: {} seeds x {per_seed} values overflow", d[0]),
            )
        })?;
        Ok(self.push(
            name,
            Op::GaussianNoise { seeds, per_seed },
            Shape::new([1, n]),
        ))
    }

    /// The guided clean estimate ([`Op::GuidedX0`]): `velocity` holds twice `sample`'s elements
    /// (uncond rows, then cond rows); `coeffs` is [SAMPLER_COEFFS]; the result has `sample`'s shape.
    pub fn guided_x0(
        &mut self,
        name: &str,
        velocity: ValueId,
        sample: ValueId,
        coeffs: ValueId,
    ) -> Result<ValueId> {
        let (v, x, k) = (
            self.shape(velocity).clone(),
            self.shape(sample).clone(),
            self.shape(coeffs).clone(),
        );
        if v.numel() != 2 * x.numel() || k.dims() != [crate::op::SAMPLER_COEFFS] {
            return Err(shape_err(
                "guided_x0",
                format!("{name}: velocity {v} must hold twice the sample {x}'s elements (uncond and cond rows), coeffs {k} must be [{}]", crate::op::SAMPLER_COEFFS),
            ));
        }
        Ok(self.push(
            name,
            Op::GuidedX0 {
                velocity,
                sample,
                coeffs,
            },
            x,
        ))
    }

    /// The DPM-Solver++ update ([`Op::DpmSolverUpdate`]): `sample`, `x0` and `prev_x0` of one shape.
    pub fn dpm_solver_update(
        &mut self,
        name: &str,
        sample: ValueId,
        x0: ValueId,
        prev_x0: ValueId,
        coeffs: ValueId,
    ) -> Result<ValueId> {
        let (x, d0, p, k) = (
            self.shape(sample).clone(),
            self.shape(x0).clone(),
            self.shape(prev_x0).clone(),
            self.shape(coeffs).clone(),
        );
        if x != d0 || x != p || k.dims() != [crate::op::SAMPLER_COEFFS] {
            return Err(shape_err(
                "dpm_solver_update",
                format!("{name}: sample {x}, x0 {d0} and prev_x0 {p} must have one shape, coeffs {k} must be [{}]", crate::op::SAMPLER_COEFFS),
            ));
        }
        Ok(self.push(
            name,
            Op::DpmSolverUpdate {
                sample,
                x0,
                prev_x0,
                coeffs,
            },
            x,
        ))
    }

    pub fn concat(&mut self, name: &str, xs: &[ValueId]) -> Result<ValueId> {
        let first = self
            .shape(
                *xs.first().ok_or_else(|| {
                    shape_err("concat", format!("{name}: nothing to concatenate"))
                })?,
            )
            .clone();
        let mut last = 0;
        for &x in xs {
            let s = self.shape(x);
            if s.rank() != first.rank()
                || s.dims()[..s.rank() - 1] != first.dims()[..first.rank() - 1]
            {
                return Err(shape_err(
                    "concat",
                    format!("{name}: {s} does not match {first} outside the last dim"),
                ));
            }
            last += s.last();
        }
        Ok(self.push(name, Op::Concat { xs: xs.to_vec() }, first.with_last(last)))
    }

    pub fn grouped_linear(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        groups: usize,
    ) -> Result<ValueId> {
        let (xs, ws) = (self.shape(x).clone(), self.shape(weight).clone());
        let cin = xs.last();
        if groups == 0
            || cin % groups != 0
            || ws.rank() != 4
            || ws.dims()[1..] != [cin / groups, 1, 1]
            || ws.dims()[0] % groups != 0
        {
            return Err(shape_err(
                "grouped_linear",
                format!("{name}: weight {ws} does not fit {cin} channels in {groups} groups"),
            ));
        }
        Ok(self.push(
            name,
            Op::GroupedLinear { x, weight, groups },
            xs.with_last(ws.dims()[0]),
        ))
    }

    /// `glu_silu(depthwise_conv2d(x))` as one node.
    #[allow(clippy::too_many_arguments)]
    pub fn depthwise_conv_glu(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
    ) -> Result<ValueId> {
        let xs = self.check_depthwise("depthwise_conv_glu", name, x, weight, bias, h, w, kernel)?;
        if xs.last() % 2 != 0 {
            return Err(shape_err(
                "depthwise_conv_glu",
                format!("{name}: input {xs} has an odd channel count (expected [u | gate])"),
            ));
        }
        Ok(self.push(
            name,
            Op::DepthwiseConvGlu {
                x,
                weight,
                bias,
                h,
                w,
                kernel,
                silu_input: false,
            },
            xs.with_last(xs.last() / 2),
        ))
    }

    /// `glu_silu(depthwise_conv2d(silu(x)))` as one node: GLUMBConv from its `conv_inverted`
    /// output on (the SiLU applied as the conv loads x).
    #[allow(clippy::too_many_arguments)]
    pub fn silu_depthwise_conv_glu(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        h: usize,
        w: usize,
        kernel: usize,
    ) -> Result<ValueId> {
        let y = self.depthwise_conv_glu(name, x, weight, bias, h, w, kernel)?;
        if let Some(Op::DepthwiseConvGlu { silu_input, .. }) =
            self.g.nodes.last_mut().map(|n| &mut n.op)
        {
            *silu_input = true;
        }
        Ok(y)
    }

    /// `silu_depthwise_conv_glu(linear(x, weight, bias), dw_weight, dw_bias, h, w, 3)` as one node
    /// ([`Op::MixFfnInvertedGlu`]): GLUMBConv from its input to the GLU.
    #[allow(clippy::too_many_arguments)]
    pub fn mixffn_inverted_glu(
        &mut self,
        name: &str,
        x: ValueId,
        weight: ValueId,
        bias: Option<ValueId>,
        dw_weight: ValueId,
        dw_bias: Option<ValueId>,
        h: usize,
        w: usize,
    ) -> Result<ValueId> {
        let op = "mixffn_inverted_glu";
        let inverted = self.linear_shape(op, name, x, weight, bias)?;
        if inverted.rank() != 3 || inverted.dims()[1] != h * w {
            return Err(shape_err(
                op,
                format!("{name}: input {} is not [B, {h}·{w}, C]", self.shape(x)),
            ));
        }
        let c2 = inverted.last();
        if !c2.is_multiple_of(2) {
            return Err(shape_err(
                op,
                format!(
                    "{name}: weight {} has an odd output count (expected [u | gate])",
                    self.shape(weight)
                ),
            ));
        }
        expect_shape(
            op,
            &format!("{name}: dw_weight"),
            self.shape(dw_weight),
            &Shape::new([c2, 1, 3, 3]),
        )?;
        if let Some(b) = dw_bias {
            expect_shape(
                op,
                &format!("{name}: dw_bias"),
                self.shape(b),
                &Shape::new([c2]),
            )?;
        }
        Ok(self.push(
            name,
            Op::MixFfnInvertedGlu {
                x,
                weight,
                bias,
                dw_weight,
                dw_bias,
                h,
                w,
            },
            inverted.with_last(c2 / 2),
        ))
    }

    /// `residual + linear(x, w, bias)` as one node (the GEMM adds the residual as its C input).
    pub fn linear_residual(
        &mut self,
        name: &str,
        x: ValueId,
        w: ValueId,
        bias: Option<ValueId>,
        residual: ValueId,
    ) -> Result<ValueId> {
        let s = self.linear_shape("linear_residual", name, x, w, bias)?;
        expect_shape(
            "linear_residual",
            &format!("{name}: residual"),
            self.shape(residual),
            &s,
        )?;
        Ok(self.push(
            name,
            Op::LinearResidual {
                x,
                w,
                bias,
                residual,
            },
            s,
        ))
    }

    /// The adaLN row `row` of a modulation table `table` [k, C] with `t` [B, k·C] or [B, C] (see
    /// [`Op::AdaLayerNorm`]), checked against a [B, N, C] input.
    fn check_table_row(
        &self,
        op: &'static str,
        name: &str,
        xs: &Shape,
        t: ValueId,
        table: ValueId,
        rows: &[usize],
    ) -> Result<()> {
        let bc = self.broadcast_shape(op, name, xs)?;
        let (ts, tab) = (self.shape(t), self.shape(table));
        let c = bc.dims()[1];
        if tab.rank() != 2 || tab.dims()[1] != c {
            return Err(shape_err(
                op,
                format!("{name}: table has shape {tab}, expected [k, {c}]"),
            ));
        }
        let k = tab.dims()[0];
        if ts.rank() != 2
            || ts.dims()[0] != bc.dims()[0]
            || (ts.dims()[1] != k * c && ts.dims()[1] != c)
        {
            return Err(shape_err(
                op,
                format!(
                    "{name}: t has shape {ts}, expected [{}, {}] or [{}, {c}]",
                    bc.dims()[0],
                    k * c,
                    bc.dims()[0]
                ),
            ));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= k) {
            return Err(shape_err(
                op,
                format!("{name}: table row {r} is not inside the {k} rows of {tab}"),
            ));
        }
        Ok(())
    }

    /// LayerNorm (no affine) of [B, N, C] `x` modulated by rows `scale` and `shift` of the adaLN
    /// table `table` + `t` (see [`Op::AdaLayerNorm`]).
    #[allow(clippy::too_many_arguments)]
    pub fn ada_layernorm(
        &mut self,
        name: &str,
        x: ValueId,
        t: ValueId,
        table: ValueId,
        scale: usize,
        shift: usize,
        eps: f32,
    ) -> Result<ValueId> {
        let xs = self.shape(x).clone();
        self.check_table_row("ada_layernorm", name, &xs, t, table, &[scale, shift])?;
        Ok(self.push(
            name,
            Op::AdaLayerNorm {
                x,
                t,
                table,
                scale,
                shift,
                eps,
            },
            xs,
        ))
    }

    /// `x + m[gate] · y` with the gate row `gate` of the adaLN table (see [`Op::AdaGatedAdd`]).
    pub fn ada_gated_add(
        &mut self,
        name: &str,
        x: ValueId,
        t: ValueId,
        table: ValueId,
        gate: usize,
        y: ValueId,
    ) -> Result<ValueId> {
        let xs = self.shape(x).clone();
        expect_shape("ada_gated_add", &format!("{name}: y"), self.shape(y), &xs)?;
        self.check_table_row("ada_gated_add", name, &xs, t, table, &[gate])?;
        Ok(self.push(
            name,
            Op::AdaGatedAdd {
                x,
                t,
                table,
                gate,
                y,
            },
            xs,
        ))
    }
}

#[cfg(test)]
mod decode_tests {
    use super::*;

    /// The decode ops accept InternVL3-1B's shapes and name the node and the tensor when refusing.
    #[test]
    fn decode_ops_check_shapes() {
        let mut b = GraphBuilder::new();
        let q = b.input("q", [3, 14 * 64]).unwrap();
        let k = b.input("k", [3, 2, 40, 64]).unwrap();
        let v = b.input("v", [3, 2, 40, 64]).unwrap();
        let p = b.input("p", [3]).unwrap();
        let x = b.input("x", [3, 2 * 64]).unwrap();
        let k2 = b
            .kv_cache_append("l0.k_append", k, x, p, 2, 64, Some(1e6))
            .unwrap();
        assert_eq!(b.shape(k2), b.shape(k));
        let y = b
            .decode_attention("l0.attn", q, k2, v, p, 14, 2, 64, 0.125, Some(1e6))
            .unwrap();
        assert_eq!(b.shape(y), &Shape::new([3, 14 * 64]));

        let e = b
            .decode_attention("l1.attn", q, k, v, p, 14, 7, 64, 0.125, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l1.attn") && e.contains("k cache"), "{e}");
        let short = b.input("short", [2]).unwrap();
        let e = b
            .decode_attention("l2.attn", q, k, v, short, 14, 2, 64, 0.125, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l2.attn") && e.contains("positions"), "{e}");
        let e = b
            .kv_cache_append("l3.append", k, q, p, 2, 64, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l3.append") && e.contains("x"), "{e}");
        let odd = b.input("odd", [3, 2, 40, 5]).unwrap();
        let xo = b.input("xo", [3, 10]).unwrap();
        let e = b
            .kv_cache_append("l4.append", odd, xo, p, 2, 5, Some(1e6))
            .unwrap_err()
            .to_string();
        assert!(e.contains("even head dim"), "{e}");

        let prompt = b.input("prompt", [1, 7, 2 * 64]).unwrap();
        let rows = b
            .kv_cache_rows("l0.k_rows", prompt, 2, 64, Some(1e6))
            .unwrap();
        assert_eq!(b.shape(rows), &Shape::new([1, 2, 7, 64]));
        let e = b
            .kv_cache_rows("l5.k_rows", prompt, 3, 64, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l5.k_rows") && e.contains("x has shape"), "{e}");
        let e = b
            .kv_cache_rows("l6.k_rows", xo, 2, 5, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("l6.k_rows"), "{e}");
    }
}

#[cfg(test)]
mod fused_dit_tests {
    use super::*;

    /// The fused DiT ops check their operands and name the node and the tensor when refusing.
    #[test]
    fn fused_dit_ops_check_shapes() {
        let mut b = GraphBuilder::new();
        let x = b.input("x", [2, 5, 8]).unwrap();
        let t6 = b.input("t6", [2, 48]).unwrap();
        let t1 = b.input("t1", [2, 8]).unwrap();
        let table = b.weight("table", [6, 8]).unwrap();
        let y = b
            .ada_layernorm("blk.norm1", x, t6, table, 1, 0, 1e-6)
            .unwrap();
        assert_eq!(b.shape(y), b.shape(x));
        b.ada_layernorm("head", x, t1, table, 1, 0, 1e-6).unwrap();
        let r = b.ada_gated_add("blk.res", x, t6, table, 5, y).unwrap();
        assert_eq!(b.shape(r), b.shape(x));
        let e = b
            .ada_layernorm("blk.norm2", x, t6, table, 6, 0, 1e-6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.norm2") && e.contains("row 6"), "{e}");
        let bad_t = b.input("bad_t", [2, 40]).unwrap();
        let e = b
            .ada_gated_add("blk.res2", x, bad_t, table, 2, y)
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.res2") && e.contains("t has shape"), "{e}");
        let w = b.weight("w", [8, 8]).unwrap();
        let o = b.linear_residual("to_out", x, w, None, y).unwrap();
        assert_eq!(b.shape(o), b.shape(x));
        let e = b
            .linear_residual("to_out2", x, w, None, t1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("to_out2") && e.contains("residual"), "{e}");
        let dw = b.weight("dw", [8, 1, 3, 3]).unwrap();
        let xs = b.input("xs", [1, 6, 8]).unwrap();
        let g = b
            .silu_depthwise_conv_glu("ff.conv_depth", xs, dw, None, 2, 3, 3)
            .unwrap();
        assert_eq!(b.shape(g), &Shape::new([1, 6, 4]));
        let n = b.g.nodes.len();
        assert!(matches!(
            b.g.nodes[n - 1].op,
            Op::DepthwiseConvGlu {
                silu_input: true,
                ..
            }
        ));
    }
}
