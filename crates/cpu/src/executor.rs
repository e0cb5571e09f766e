use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use openuni_graph::{plan, Graph, Op, Plan, ValueId, ValueKind};
use openuni_tensor::{F32Data, HostTensor, Shape, TensorSource};

use crate::fast;
use crate::ops::{self, AttentionDims, ModulationRef};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Weights(#[from] openuni_tensor::Error),
    #[error("input `{name}`: {msg}")]
    Input { name: String, msg: String },
    #[error("no value {0:?} in the arena (it was overwritten; build the executor with keep_all to read every node)")]
    NotKept(ValueId),
}

/// f32 weights shared by every executor built with the same cache, so that the many graphs of
/// one model (per batch size, per stage) hold each tensor once: read in place from a mapped f32
/// file, or converted once ([`TensorSource::weight_f32`]). Executors borrow them (`Arc`) and
/// never copy them.
#[derive(Default)]
pub struct WeightCache {
    tensors: Mutex<HashMap<(String, Shape), Arc<F32Data>>>,
}

impl WeightCache {
    pub fn new() -> Arc<WeightCache> {
        Arc::new(WeightCache::default())
    }

    /// The weight `name` with `shape`, converted from `source` on first use.
    pub fn get(
        &self,
        source: &dyn TensorSource,
        name: &str,
        shape: &Shape,
    ) -> Result<Arc<F32Data>, ExecError> {
        let key = (name.to_string(), shape.clone());
        if let Some(t) = self.tensors.lock().expect("weight cache").get(&key) {
            return Ok(t.clone());
        }
        let t = Arc::new(openuni_tensor::derived::weight_f32(source, name, shape)?);
        self.tensors
            .lock()
            .expect("weight cache")
            .insert(key, t.clone());
        Ok(t)
    }

    /// Bytes of the weights held (in place or owned).
    pub fn bytes(&self) -> usize {
        self.tensors
            .lock()
            .expect("weight cache")
            .values()
            .map(|t| t.bytes())
            .sum()
    }

    /// Bytes of the weights read in place from mapped files (the rest are owned copies).
    pub fn mapped_bytes(&self) -> usize {
        self.tensors
            .lock()
            .expect("weight cache")
            .values()
            .filter(|t| t.is_mapped())
            .map(|t| t.bytes())
            .sum()
    }
}

/// Which implementation of each op the executor runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    /// The fast ops (`fast`): blocked, threaded on rayon's pool. The default.
    #[default]
    Fast,
    /// The plain reference twins (`ops`): the oracle for `verify --diff-nodes` and the tests.
    Reference,
}

/// One node's time from [`CpuExecutor::profile`].
#[derive(Clone, Debug)]
pub struct CpuNodeTiming {
    pub node: usize,
    pub median_ms: f64,
    pub min_ms: f64,
}

/// Runs a graph on the CPU in f32. Weights are converted once (and shared through a
/// [`WeightCache`]); activations live in one arena allocated at construction, so `run` allocates
/// only its returned outputs. Graph inputs are never overwritten (the planner keeps them for the
/// whole run), so an input set once serves every later `execute` until it is set again.
pub struct CpuExecutor {
    graph: Graph,
    plan: Plan,
    arena: Vec<f32>,
    weights: HashMap<ValueId, Arc<F32Data>>,
    keep_all: bool,
    kernels: Kernels,
    /// Which graph inputs (by value id) have been given at least once.
    inputs_set: Vec<ValueId>,
}

impl CpuExecutor {
    /// `keep_all` gives every value its own memory so `value()` can read any node after a run.
    pub fn new(
        graph: &Graph,
        source: &dyn TensorSource,
        keep_all: bool,
    ) -> Result<CpuExecutor, ExecError> {
        Self::with_cache(graph, source, &WeightCache::default(), keep_all)
    }

    /// As [`CpuExecutor::new`] with the plain reference ops ([`Kernels::Reference`]).
    pub fn reference(
        graph: &Graph,
        source: &dyn TensorSource,
        keep_all: bool,
    ) -> Result<CpuExecutor, ExecError> {
        Self::with_kernels(
            graph,
            source,
            &WeightCache::default(),
            keep_all,
            Kernels::Reference,
        )
    }

    /// As [`CpuExecutor::new`], taking weights from (and adding them to) `cache`.
    pub fn with_cache(
        graph: &Graph,
        source: &dyn TensorSource,
        cache: &WeightCache,
        keep_all: bool,
    ) -> Result<CpuExecutor, ExecError> {
        Self::with_kernels(graph, source, cache, keep_all, Kernels::Fast)
    }

    /// As [`CpuExecutor::with_cache`], running `kernels`.
    pub fn with_kernels(
        graph: &Graph,
        source: &dyn TensorSource,
        cache: &WeightCache,
        keep_all: bool,
        kernels: Kernels,
    ) -> Result<CpuExecutor, ExecError> {
        let plan = plan(graph, keep_all);
        let mut weights = HashMap::new();
        for (id, name) in graph.weights() {
            weights.insert(id, cache.get(source, name, graph.shape(id))?);
        }
        Ok(CpuExecutor {
            graph: graph.clone(),
            arena: vec![0.0; plan.arena_elems],
            plan,
            weights,
            keep_all,
            kernels,
            inputs_set: vec![],
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Runs the graph; `inputs` must hold every graph input not given by an earlier call, by
    /// name with its exact shape.
    pub fn run(
        &mut self,
        inputs: &HashMap<String, HostTensor>,
    ) -> Result<HashMap<String, HostTensor>, ExecError> {
        self.set_inputs(inputs)?;
        self.execute()?;
        Ok(self.outputs())
    }

    /// Copies `inputs` (any subset of the graph's inputs) into the arena.
    pub fn set_inputs(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<(), ExecError> {
        for (name, t) in inputs {
            let id = self.graph.input_id(name).ok_or_else(|| ExecError::Input {
                name: name.clone(),
                msg: "is not an input of this graph".into(),
            })?;
            let shape = self.graph.shape(id);
            if &t.shape != shape {
                return Err(ExecError::Input {
                    name: name.clone(),
                    msg: format!("has shape {}, expected {shape}", t.shape),
                });
            }
            let off = self.plan.offset(id).expect("inputs are planned");
            self.arena[off..off + shape.numel()].copy_from_slice(&t.to_f32_vec());
            if !self.inputs_set.contains(&id) {
                self.inputs_set.push(id);
            }
        }
        Ok(())
    }

    /// Writes `data` into the state `name` from element `offset` on (a sequence's prompt keys and
    /// values into its rows of a KV cache). States start zeroed and keep their values across runs.
    pub fn write_state(
        &mut self,
        name: &str,
        offset: usize,
        data: &[f32],
    ) -> Result<(), ExecError> {
        let off = self.state_range(name, offset, data.len())?;
        self.arena[off + offset..off + offset + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Reads `len` elements of the state `name` from element `offset` on.
    pub fn read_state(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>, ExecError> {
        let off = self.state_range(name, offset, len)?;
        Ok(self.arena[off + offset..off + offset + len].to_vec())
    }

    /// The arena offset of state `name`, checking that [offset, offset + len) is inside it.
    fn state_range(&self, name: &str, offset: usize, len: usize) -> Result<usize, ExecError> {
        let id = self.graph.state_id(name).ok_or_else(|| ExecError::Input {
            name: name.into(),
            msg: "is not a state of this graph".into(),
        })?;
        let n = self.graph.shape(id).numel();
        if offset.checked_add(len).is_none_or(|end| end > n) {
            return Err(ExecError::Input {
                name: name.into(),
                msg: format!(
                    "elements {offset}..{} are outside the state's {n}",
                    offset.saturating_add(len)
                ),
            });
        }
        Ok(self.plan.offset(id).expect("states are planned"))
    }

    fn check_inputs_set(&self) -> Result<(), ExecError> {
        match self
            .graph
            .inputs()
            .find(|(id, _)| !self.inputs_set.contains(id))
        {
            Some((_, name)) => Err(ExecError::Input {
                name: name.into(),
                msg: "missing".into(),
            }),
            None => Ok(()),
        }
    }

    /// Runs every node on the inputs set so far.
    pub fn execute(&mut self) -> Result<(), ExecError> {
        self.check_inputs_set()?;
        for i in 0..self.graph.nodes.len() {
            self.run_node(i);
        }
        Ok(())
    }

    /// The graph's outputs after `execute`.
    pub fn outputs(&self) -> HashMap<String, HostTensor> {
        self.graph
            .outputs
            .iter()
            .map(|(name, id)| (name.clone(), self.read(*id)))
            .collect()
    }

    /// Runs the graph `iters` times (after one warm-up run) timing every node, like
    /// `CudaExecutor::profile`.
    pub fn profile(&mut self, iters: usize) -> Result<Vec<CpuNodeTiming>, ExecError> {
        self.execute()?;
        let n = self.graph.nodes.len();
        let mut times = vec![Vec::with_capacity(iters.max(1)); n];
        for _ in 0..iters.max(1) {
            for (i, t) in times.iter_mut().enumerate() {
                let start = Instant::now();
                self.run_node(i);
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(times
            .into_iter()
            .enumerate()
            .map(|(node, mut t)| {
                t.sort_by(|a, b| a.total_cmp(b));
                CpuNodeTiming {
                    node,
                    median_ms: t[t.len() / 2],
                    min_ms: t[0],
                }
            })
            .collect())
    }

    /// An f32 copy of a value after `run`. Weights are always readable; activations only while
    /// their memory has not been reused (always, with `keep_all`).
    pub fn value(&self, id: ValueId) -> Result<HostTensor, ExecError> {
        let live_at_end = self.graph.outputs.iter().any(|(_, o)| *o == id);
        match self.graph.value(id).kind {
            ValueKind::Weight(_) | ValueKind::State(_) => Ok(self.read(id)),
            _ if self.keep_all || live_at_end => Ok(self.read(id)),
            _ => Err(ExecError::NotKept(id)),
        }
    }

    fn read(&self, id: ValueId) -> HostTensor {
        HostTensor::from_f32(self.graph.shape(id).clone(), self.slice(id).to_vec())
            .expect("planned size")
    }

    fn slice(&self, id: ValueId) -> &[f32] {
        match self.plan.offset(id) {
            Some(off) => &self.arena[off..off + self.graph.shape(id).numel()],
            None => &self.weights[&id],
        }
    }

    fn run_node(&mut self, i: usize) {
        let node = &self.graph.nodes[i];
        let out_id = node.output;
        let out_shape = self.graph.shape(out_id).clone();
        let cols = out_shape.last();
        // Temporarily take the output's memory out of the arena so inputs can be borrowed
        // alongside it; the planner guarantees they never overlap.
        let off = self.plan.offset(out_id).expect("activations are planned");
        let mut out = std::mem::take(&mut self.arena);
        let (before, rest) = out.split_at_mut(off);
        let (y, after) = rest.split_at_mut(out_shape.numel());
        let view = ArenaView {
            before,
            after,
            off,
            len: out_shape.numel(),
            exec: self,
        };
        let g = &self.graph;
        let fast = self.kernels == Kernels::Fast;
        match &node.op {
            Op::Linear { x, w, bias } => {
                let k = g.shape(*x).last();
                let b = bias.map(|b| view.get(b));
                let f = if fast { fast::linear } else { ops::linear };
                let wv = view.get(*w);
                for (xi, yi) in per_image(g, &out_shape, view.get(*x), k, y) {
                    f(xi, wv, b, yi.len() / cols, k, cols, yi);
                }
            }
            Op::RmsNorm {
                x,
                weight,
                bias,
                eps,
            } => {
                let f = if fast { fast::rmsnorm } else { ops::rmsnorm };
                f(
                    view.get(*x),
                    view.get(*weight),
                    bias.map(|b| view.get(b)),
                    *eps,
                    cols,
                    y,
                )
            }
            Op::RmsNormResidual {
                x,
                weight,
                bias,
                eps,
                residual,
            } => {
                let f = if fast {
                    fast::rmsnorm_residual
                } else {
                    ops::rmsnorm_residual
                };
                f(
                    view.get(*x),
                    view.get(*weight),
                    bias.map(|b| view.get(b)),
                    view.get(*residual),
                    *eps,
                    cols,
                    y,
                )
            }
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
            } => {
                let (b, cin) = (out_shape.dims()[0], g.shape(*x).last());
                let f = if fast {
                    fast::rmsnorm_relu_conv2d
                } else {
                    ops::rmsnorm_relu_conv2d
                };
                f(
                    view.get(*x),
                    view.get(*norm_weight),
                    norm_bias.map(|nb| view.get(nb)),
                    *eps,
                    view.get(*weight),
                    bias.map(|bb| view.get(bb)),
                    b,
                    *h,
                    *w,
                    cin,
                    cols,
                    *kernel,
                    y,
                )
            }
            Op::MultiscaleLinearAttention { scales, head_dim } => {
                let d = out_shape.dims();
                let parts: Vec<&[f32]> = scales.iter().map(|&x| view.get(x)).collect();
                let widths: Vec<usize> = scales.iter().map(|&x| g.shape(x).last()).collect();
                (if fast {
                    fast::multiscale_linear_attention
                } else {
                    ops::multiscale_linear_attention
                })(&parts, &widths, d[0], d[1], *head_dim, y)
            }
            Op::LayerNorm {
                x,
                weight,
                bias,
                eps,
                modulation,
            } => {
                let m = modulation.map(|m| ModulationRef {
                    scale: view.get(m.scale),
                    shift: view.get(m.shift),
                    tokens: out_shape.dims()[1],
                });
                let f = if fast {
                    fast::layernorm
                } else {
                    ops::layernorm
                };
                f(
                    view.get(*x),
                    weight.map(|w| view.get(w)),
                    bias.map(|b| view.get(b)),
                    *eps,
                    cols,
                    m,
                    y,
                )
            }
            Op::Unary { x, f } => {
                (if fast { fast::unary } else { ops::unary })(*f, view.get(*x), y)
            }
            Op::Add { a, b } => {
                (if fast { fast::add } else { ops::add })(view.get(*a), view.get(*b), y)
            }
            Op::GatedAdd { x, gate, y: yy } => {
                // Rows per gate row: the tokens of one sample ([B, C] gate) or every row ([1, C]).
                let tokens = out_shape.rows() / g.shape(*gate).rows();
                (if fast {
                    fast::gated_add
                } else {
                    ops::gated_add
                })(
                    view.get(*x),
                    view.get(*gate),
                    view.get(*yy),
                    tokens,
                    cols,
                    y,
                )
            }
            Op::Attention {
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
            } => {
                let qs = g.shape(*q).dims();
                let d = AttentionDims {
                    batch: qs[0],
                    q_len: qs[1],
                    kv_len: g.shape(*k).dims()[1],
                    heads: *heads,
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                    causal: *causal,
                    scale: *scale,
                };
                let (qv, kv, vv) = (view.get(*q), view.get(*k), view.get(*v));
                (if fast {
                    fast::attention_ext
                } else {
                    ops::attention_ext
                })(
                    qv,
                    kv,
                    vv,
                    key_mask.map(|m| view.get(m)),
                    d,
                    segments.as_deref(),
                    *rope,
                    y,
                )
            }
            Op::LinearAttention {
                q,
                k,
                v,
                heads,
                head_dim,
            } => {
                let (b, n) = (out_shape.dims()[0], out_shape.dims()[1]);
                (if fast {
                    fast::linear_attention
                } else {
                    ops::linear_attention
                })(
                    view.get(*q),
                    view.get(*k),
                    view.get(*v),
                    b,
                    n,
                    *heads,
                    *head_dim,
                    y,
                )
            }
            Op::ModulationTable { t, table } => {
                let d = out_shape.dims();
                ops::modulation_table(view.get(*t), view.get(*table), d[0], d[1], d[2], y)
            }
            Op::Chunk { x, index } => {
                let d = g.shape(*x).dims();
                (if fast { fast::chunk } else { ops::chunk })(
                    view.get(*x),
                    d[0],
                    d[1],
                    d[2],
                    *index,
                    y,
                )
            }
            Op::TimestepEmbedding { t, dim } => ops::timestep_embedding(view.get(*t), *dim, y),
            Op::Transpose {
                x,
                batch,
                rows,
                cols,
            } => (if fast {
                fast::transpose
            } else {
                ops::transpose
            })(view.get(*x), *batch, *rows, *cols, y),
            Op::DepthwiseConv2d {
                x,
                weight,
                bias,
                h,
                w,
                kernel,
            } => {
                let b = out_shape.dims()[0];
                (if fast {
                    fast::depthwise_conv2d
                } else {
                    ops::depthwise_conv2d
                })(
                    view.get(*x),
                    view.get(*weight),
                    bias.map(|bb| view.get(bb)),
                    b,
                    *h,
                    *w,
                    cols,
                    *kernel,
                    y,
                )
            }
            Op::DepthwiseConvGlu {
                x,
                weight,
                bias,
                h,
                w,
                kernel,
                silu_input,
            } => {
                let b = out_shape.dims()[0];
                let f = match (*silu_input, fast) {
                    (false, true) => fast::depthwise_conv_glu,
                    (false, false) => ops::depthwise_conv_glu,
                    (true, true) => fast::silu_depthwise_conv_glu,
                    (true, false) => ops::silu_depthwise_conv_glu,
                };
                f(
                    view.get(*x),
                    view.get(*weight),
                    bias.map(|bb| view.get(bb)),
                    b,
                    *h,
                    *w,
                    2 * cols,
                    *kernel,
                    y,
                )
            }
            Op::MixFfnInvertedGlu {
                x,
                weight,
                bias,
                dw_weight,
                dw_bias,
                h,
                w,
            } => {
                let k = g.shape(*x).last();
                let f = if fast {
                    fast::mixffn_inverted_glu
                } else {
                    ops::mixffn_inverted_glu
                };
                let (wv, bv, dw, dwb) = (
                    view.get(*weight),
                    bias.map(|bb| view.get(bb)),
                    view.get(*dw_weight),
                    dw_bias.map(|bb| view.get(bb)),
                );
                // Its GEMM per image like a `Linear`'s, so the node and its two-op form give the same bits.
                for (xi, yi) in per_image(g, &out_shape, view.get(*x), k, y) {
                    f(
                        xi,
                        wv,
                        bv,
                        dw,
                        dwb,
                        yi.len() / (h * w * cols).max(1),
                        *h,
                        *w,
                        k,
                        2 * cols,
                        yi,
                    );
                }
            }
            Op::LinearResidual {
                x,
                w,
                bias,
                residual,
            } => {
                let k = g.shape(*x).last();
                let f = if fast {
                    fast::linear_residual
                } else {
                    ops::linear_residual
                };
                let (wv, bv, rv) = (view.get(*w), bias.map(|b| view.get(b)), view.get(*residual));
                let per = out_shape.numel() / image_count(g, &out_shape);
                for (i, (xi, yi)) in per_image(g, &out_shape, view.get(*x), k, y).enumerate() {
                    f(
                        xi,
                        wv,
                        bv,
                        &rv[i * per..(i + 1) * per],
                        yi.len() / cols,
                        k,
                        cols,
                        yi,
                    );
                }
            }
            Op::AdaLayerNorm {
                x,
                t,
                table,
                scale,
                shift,
                eps,
            } => {
                let d = ada_dims(&out_shape, g.shape(*table));
                (if fast {
                    fast::ada_layernorm
                } else {
                    ops::ada_layernorm
                })(
                    view.get(*x),
                    view.get(*t),
                    view.get(*table),
                    d,
                    *scale,
                    *shift,
                    *eps,
                    y,
                )
            }
            Op::AdaGatedAdd {
                x,
                t,
                table,
                gate,
                y: yy,
            } => {
                let d = ada_dims(&out_shape, g.shape(*table));
                (if fast {
                    fast::ada_gated_add
                } else {
                    ops::ada_gated_add
                })(
                    view.get(*x),
                    view.get(*t),
                    view.get(*table),
                    d,
                    *gate,
                    view.get(*yy),
                    y,
                )
            }
            Op::SwiGlu { gate, up } => {
                (if fast { fast::swiglu } else { ops::swiglu })(view.get(*gate), view.get(*up), y)
            }
            Op::PackedLinearAttention {
                qkv,
                groups,
                head_dim,
                key_norm,
            } => {
                let d = out_shape.dims();
                match key_norm {
                    None => {
                        (if fast {
                            fast::packed_linear_attention
                        } else {
                            ops::packed_linear_attention
                        })(view.get(*qkv), d[0], d[1], *groups, *head_dim, y)
                    }
                    Some(n) => {
                        let f = if fast {
                            fast::packed_linear_attention_key_norm
                        } else {
                            ops::packed_linear_attention_key_norm
                        };
                        f(
                            view.get(*qkv),
                            view.get(n.weight),
                            n.eps,
                            d[0],
                            d[1],
                            *groups,
                            *head_dim,
                            y,
                        )
                    }
                }
            }
            Op::Conv2d {
                x,
                weight,
                bias,
                h,
                w,
                kernel,
                silu,
            } => {
                let (b, cin) = (out_shape.dims()[0], g.shape(*x).last());
                let bias = bias.map(|bb| view.get(bb));
                if fast {
                    fast::conv2d(
                        view.get(*x),
                        view.get(*weight),
                        bias,
                        b,
                        *h,
                        *w,
                        cin,
                        cols,
                        *kernel,
                        *silu,
                        y,
                    );
                } else {
                    ops::conv2d(
                        view.get(*x),
                        view.get(*weight),
                        bias,
                        b,
                        *h,
                        *w,
                        cin,
                        cols,
                        *kernel,
                        y,
                    );
                }
                if *silu && !fast {
                    y.iter_mut().for_each(|v| *v = ops::silu(*v));
                }
            }
            Op::UpsampleConv2d {
                x,
                weight,
                bias,
                h,
                w,
                shortcut,
            } => {
                let (b, cin) = (out_shape.dims()[0], g.shape(*x).last());
                (if fast {
                    fast::upsample_conv2d
                } else {
                    ops::upsample_conv2d
                })(
                    view.get(*x),
                    view.get(*weight),
                    bias.map(|bb| view.get(bb)),
                    b,
                    *h,
                    *w,
                    cin,
                    cols,
                    *shortcut,
                    y,
                )
            }
            Op::RepeatChannels { x, repeats } => {
                (if fast {
                    fast::repeat_channels
                } else {
                    ops::repeat_channels
                })(view.get(*x), g.shape(*x).last(), *repeats, y)
            }
            Op::GatherTokens { x, starts, len } => {
                let (t, c) = (g.shape(*x).dims()[1], g.shape(*x).last());
                for (i, &s) in starts.iter().enumerate() {
                    ops::slice_tokens(
                        view.get(*x),
                        1,
                        t,
                        c,
                        s,
                        *len,
                        &mut y[i * len * c..(i + 1) * len * c],
                    );
                }
            }
            Op::ClassPosEmbed { x, cls, pos } => {
                let d = out_shape.dims();
                ops::class_pos_embed(
                    view.get(*x),
                    view.get(*cls),
                    view.get(*pos),
                    d[0],
                    d[1] - 1,
                    d[2],
                    y,
                )
            }
            Op::SliceTokens { x, start, len } => {
                let d = g.shape(*x).dims();
                (if fast {
                    fast::slice_tokens
                } else {
                    ops::slice_tokens
                })(view.get(*x), d[0], d[1], d[2], *start, *len, y)
            }
            Op::Concat { xs } => {
                let parts: Vec<&[f32]> = xs.iter().map(|&x| view.get(x)).collect();
                let widths: Vec<usize> = xs.iter().map(|&x| g.shape(x).last()).collect();
                (if fast { fast::concat } else { ops::concat })(&parts, &widths, y)
            }
            Op::GroupedLinear { x, weight, groups } => {
                let (f, cin, wv) = (
                    if fast {
                        fast::grouped_linear
                    } else {
                        ops::grouped_linear
                    },
                    g.shape(*x).last(),
                    view.get(*weight),
                );
                for (xi, yi) in per_image(g, &out_shape, view.get(*x), cin, y) {
                    f(xi, wv, cin, cols, *groups, yi);
                }
            }
            Op::DecodeAttention {
                q,
                k_cache,
                v_cache,
                positions,
                heads,
                kv_heads,
                head_dim,
                scale,
                rope,
            } => {
                let c = g.shape(*k_cache).dims();
                let d = ops::DecodeDims {
                    batch: c[0],
                    heads: *heads,
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                    max_len: c[2],
                };
                let (qv, kv, vv, pv) = (
                    view.get(*q),
                    view.get(*k_cache),
                    view.get(*v_cache),
                    view.get(*positions),
                );
                ops::decode_attention(qv, kv, vv, pv, d, *scale, *rope, y)
            }
            Op::EmbeddingGather { ids, table, extra } => (if fast {
                fast::embedding_gather
            } else {
                ops::embedding_gather
            })(
                view.get(*ids),
                view.get(*table),
                extra.map(|e| view.get(e)),
                cols,
                y,
            ),
            Op::QuantizeU8 { x } => {
                let d = g.shape(*x).dims();
                ops::quantize_image_u8(view.get(*x), d[0], d[2] * d[3], y)
            }
            Op::AnyNonFinite { x } => y[0] = ops::any_nonfinite(view.get(*x)),
            Op::DivScalar { x, divisor } => ops::div_scalar(view.get(*x), *divisor, y),
            Op::GaussianNoise { seeds, per_seed } => {
                ops::gaussian_noise(view.get(*seeds), *per_seed, y)
            }
            Op::GuidedX0 {
                velocity,
                sample,
                coeffs,
            } => ops::guided_x0(view.get(*velocity), view.get(*sample), view.get(*coeffs), y),
            Op::DpmSolverUpdate {
                sample,
                x0,
                prev_x0,
                coeffs,
            } => ops::dpm_solver_update(
                view.get(*sample),
                view.get(*x0),
                view.get(*prev_x0),
                view.get(*coeffs),
                y,
            ),
            Op::KvCacheAppend {
                cache,
                x,
                positions,
                kv_heads,
                head_dim,
                rope,
            } => {
                let c = g.shape(*cache).dims();
                let d = ops::DecodeDims {
                    batch: c[0],
                    heads: *kv_heads,
                    kv_heads: *kv_heads,
                    head_dim: *head_dim,
                    max_len: c[2],
                };
                if self.plan.offset(*cache) == Some(off) {
                    // A state: `y` is the cache itself, updated in place.
                    ops::kv_cache_write(view.get(*x), view.get(*positions), d, *rope, y)
                } else {
                    ops::kv_cache_append(
                        view.get(*cache),
                        view.get(*x),
                        view.get(*positions),
                        d,
                        *rope,
                        y,
                    )
                }
            }
            Op::PixelShuffleLayerNorm {
                x,
                weight,
                bias,
                eps,
                grid,
                skip,
            } => {
                let xd = g.shape(*x).dims();
                let f = if fast {
                    fast::pixel_shuffle_layernorm
                } else {
                    ops::pixel_shuffle_layernorm
                };
                f(
                    view.get(*x),
                    view.get(*weight),
                    view.get(*bias),
                    *eps,
                    xd[0],
                    *grid,
                    *skip,
                    xd[2],
                    y,
                )
            }
            Op::KvCacheRows {
                x,
                kv_heads,
                head_dim,
                rope,
            } => {
                let xd = g.shape(*x).dims();
                ops::kv_cache_rows(view.get(*x), xd[0], xd[1], *kv_heads, *head_dim, *rope, y)
            }
        }
        self.arena = out;
    }
}

/// The shapes of a fused adaLN op on [B, N, C] with a [k, C] table.
/// How many pieces a row-wise GEMM op of output `shape` runs in: one per image (the leading
/// dimension) in a [`batch_invariant`](openuni_graph::Graph::batch_invariant) graph, else 1.
fn image_count(g: &openuni_graph::Graph, shape: &openuni_tensor::Shape) -> usize {
    match shape.dims() {
        [b, _, ..] if g.batch_invariant && *b > 0 => *b,
        _ => 1,
    }
}

/// A row-wise GEMM op's input (`k` values a row) and output cut into [`image_count`] pieces, each
/// its own sgemm call. sgemm libraries pick kernels and blocking by the row count (OpenBLAS's
/// small-matrix kernels, the gemm crate's blocking), so one call over the whole batch lets an
/// image's values depend on how many images share it; per image they do not. Each call is still
/// split across threads.
fn per_image<'a, 'b>(
    g: &openuni_graph::Graph,
    out: &openuni_tensor::Shape,
    x: &'a [f32],
    k: usize,
    y: &'b mut [f32],
) -> impl Iterator<Item = (&'a [f32], &'b mut [f32])> {
    let rows = out.rows() / image_count(g, out);
    x[..out.rows() * k]
        .chunks((rows * k).max(1))
        .zip(y.chunks_mut((rows * out.last()).max(1)))
}

fn ada_dims(out: &openuni_tensor::Shape, table: &openuni_tensor::Shape) -> ops::AdaDims {
    let d = out.dims();
    ops::AdaDims {
        batch: d[0],
        tokens: d[1],
        cols: d[2],
        k: table.dims()[0],
    }
}

/// Read access to every value except the output being written, which is split out of the arena.
struct ArenaView<'a> {
    before: &'a [f32],
    after: &'a [f32],
    off: usize,
    len: usize,
    exec: &'a CpuExecutor,
}

impl<'a> ArenaView<'a> {
    fn get(&self, id: ValueId) -> &'a [f32] {
        let Some(o) = self.exec.plan.offset(id) else {
            return &self.exec.weights[&id];
        };
        let n = self.exec.graph.shape(id).numel();
        if o + n <= self.off {
            &self.before[o..o + n]
        } else {
            assert!(
                o >= self.off + self.len,
                "planner placed an input over the node's output"
            );
            let s = o - self.off - self.len;
            &self.after[s..s + n]
        }
    }
}
