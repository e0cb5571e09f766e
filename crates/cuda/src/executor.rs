//! `CudaExecutor`: runs a [`Graph`] on a CUDA device, the twin of `openuni_cpu::CpuExecutor`.
//!
//! At construction the graph is planned (one arena, one device allocation), weights are uploaded
//! once in the storage dtype, every node is resolved to a kernel launch (or a cuBLASLt GEMM) with
//! fixed pointers, and every kernel module the graph needs is loaded, so `run` allocates nothing
//! and a run can be captured into a CUDA graph and replayed.
//!
//! Storage is f32 or bf16; host values are always handed in and out as f32. With bf16 storage, f32
//! inputs go to an f32 staging buffer and are cast into the arena on the device
//! (`cast_f32_to_bf16`) when they are set, and outputs are cast back (`cast_bf16_to_f32`) into
//! staging when they are read. The casts sit at the host boundary, not in a pass (nor in a captured
//! graph): an input set once (a batch's cross-attention K/V) is cast once, not on every replay,
//! and an output that is never read is never cast. The f32 staging copy of an input stays valid
//! until it is set again, and a kernel family may read it instead of the bf16 arena copy
//! (`families::Ctx::f32_ptr`): the timestep embedding does, so that a timestep such as 999, which
//! bf16 rounds to 1000, reaches the sinusoid exactly.
//!
//! A graph output can stay on the device: [`CudaExecutor::output_tensor`] hands out a
//! [`DeviceTensor`] (the value in the arena, in the storage dtype) and
//! [`CudaExecutor::set_input_tensor`] copies it on the device into another executor's input, with
//! no host round trip and no cast.
//!
//! Besides the arena, the weights and the staging buffer, the executor owns the workspaces and
//! constant tables that kernel families request once at resolve time (`families::Resources`).

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use std::sync::atomic::{AtomicU64, Ordering};

use half::bf16;
use openuni_graph::{plan, Graph, Plan, ValueId, ValueKind};
use openuni_tensor::{DType, HostTensor, Shape, TensorSource};

use crate::device::{CudaDevice, DeviceBuffer};
use crate::error::{CudaError, DriverContext, Result};
use crate::families::{self, elementwise, Launch, Step};
use crate::weights::WeightCache;

/// One node's per-node timing from [`CudaExecutor::profile`].
#[derive(Clone, Debug)]
pub struct NodeTiming {
    pub node: usize,
    pub name: String,
    pub op: &'static str,
    pub median_ms: f64,
    pub min_ms: f64,
}

/// A graph value left on the device by [`CudaExecutor::output_tensor`]: the producer's arena
/// memory (kept alive by the handle), its shape and storage dtype. It holds the value of the
/// producer's last run; [`CudaExecutor::set_input_tensor`] refuses it once the producer has run again.
#[derive(Clone)]
pub struct DeviceTensor {
    name: String,
    ptr: u64,
    shape: Shape,
    dtype: DType,
    /// The producer's device handle (its stream: a lane of the device may differ from the consumer's).
    dev: Arc<CudaDevice>,
    _arena: Arc<DeviceBuffer>,
    /// The producer's run counter, and its value when the handle was made.
    runs: Arc<AtomicU64>,
    made_at: u64,
}

impl DeviceTensor {
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        self.shape.numel() * self.dtype.size_in_bytes()
    }
    /// The same value viewed as `shape` (as many elements): a flat view for an elementwise consumer.
    pub fn reshaped(&self, shape: impl Into<Shape>) -> Result<DeviceTensor> {
        let shape = shape.into();
        if shape.numel() != self.shape.numel() {
            return Err(CudaError::Input {
                name: self.name.clone(),
                msg: format!("of shape {} cannot be viewed as {shape}", self.shape),
            });
        }
        Ok(DeviceTensor {
            shape,
            ..self.clone()
        })
    }
    /// The value on the host in its storage dtype (for a consumer that must rearrange it there).
    pub fn to_host(&self) -> Result<HostTensor> {
        if self.runs.load(Ordering::Relaxed) != self.made_at {
            return Err(CudaError::Input {
                name: self.name.clone(),
                msg: "its producer has run again since the handle was made: the value is gone"
                    .into(),
            });
        }
        let mut bytes = vec![0u8; self.bytes()];
        // On the producer's stream: ordered after the kernels that wrote it.
        self.dev.copy_to_host(self.ptr, &mut bytes)?;
        Ok(HostTensor::new(
            self.shape.clone(),
            openuni_tensor::HostData::from_le_bytes(self.dtype, &bytes),
        )?)
    }

    /// The value as bytes: integer-valued pixel values 0..=255 (an `Op::QuantizeU8` output) cast
    /// to uint8 on the device and read back at one byte a value (values outside are saturated).
    pub fn to_host_u8(&self) -> Result<HostTensor> {
        if self.runs.load(Ordering::Relaxed) != self.made_at {
            return Err(CudaError::Input {
                name: self.name.clone(),
                msg: "its producer has run again since the handle was made: the value is gone"
                    .into(),
            });
        }
        let n = self.shape.numel();
        let mut bytes = vec![0u8; n];
        if n > 0 {
            let buf = self.dev.alloc(n)?;
            let cast =
                elementwise::cast_to_u8(self.dtype, self.dev.sm_count(), self.ptr, buf.ptr(), n)?;
            // SAFETY: the value (n elements of the storage dtype, alive with the arena) into `buf` (n bytes).
            unsafe { families::enqueue(&self.dev, &cast) }?;
            self.dev.copy_to_host(buf.ptr(), &mut bytes)?;
        }
        Ok(HostTensor::new(
            self.shape.clone(),
            openuni_tensor::HostData::U8(bytes),
        )?)
    }
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceTensor({} {} {} on device {})",
            self.name,
            self.shape,
            self.dtype,
            self.dev.ordinal()
        )
    }
}

/// An f32 staging slot of a bf16 executor: (value, device address of its f32 copy, elements).
struct Staged {
    id: ValueId,
    ptr: u64,
    n: usize,
}

pub struct CudaExecutor {
    dev: Arc<CudaDevice>,
    graph: Graph,
    plan: Plan,
    dtype: DType,
    keep_all: bool,
    arena: Arc<DeviceBuffer>,
    /// Keeps the shared device weights alive as long as this executor points into them.
    _weights: Arc<WeightCache>,
    weight_ptr: HashMap<ValueId, u64>,
    /// Weights held only in a kernel's prepared layout (`families::conv::ConvWeightLayout`).
    prepared_weights: Vec<ValueId>,
    /// Graph inputs given at least once (inputs persist across runs; see `set_inputs`).
    inputs_set: Vec<ValueId>,
    _staging: Option<DeviceBuffer>,
    staged_inputs: Vec<Staged>,
    staged_outputs: Vec<Staged>,
    /// Workspaces and constant tables the kernel families asked for at resolve time; the resolved
    /// launches point into them.
    resources: families::Resources,
    /// One step per node, in order (`families::resolve`).
    steps: Vec<Step>,
    /// bf16 storage: the cast of each input's f32 staging into the arena (enqueued when the input
    /// is set), and of the outputs back (enqueued when they are read), in `staged_*` order.
    input_casts: Vec<Vec<Launch>>,
    output_casts: Vec<Launch>,
    /// Inputs whose f32 staging copy a kernel family reads (`families::Ctx::f32_ptr`): they can
    /// only be set from the host.
    f32_read: Vec<ValueId>,
    /// Runs enqueued so far (shared with the [`DeviceTensor`]s handed out, to detect stale ones).
    runs: Arc<AtomicU64>,
    captured: Option<CudaGraph>,
    /// An eager pass (every node launched outside a capture) has been enqueued: the warm-up a
    /// capture needs (see `capture`).
    warmed: bool,
    /// `capture` was called before any eager pass: the next `execute` runs eagerly (the warm-up)
    /// and captures right after it.
    capture_armed: bool,
    /// Bytes copied host -> device and device -> host by this executor (inputs, states, outputs,
    /// values): what a decode step costs the bus.
    traffic: [std::sync::atomic::AtomicU64; 2],
}

const STAGING_ALIGN: usize = 256;

fn align_up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

fn node_err(node: &str, op: &'static str, msg: impl Into<String>) -> CudaError {
    CudaError::Node {
        node: node.into(),
        op,
        msg: msg.into(),
    }
}

impl CudaExecutor {
    /// Plans the arena, uploads the weights from `weights` in `dtype` (F32 or BF16), resolves every
    /// node and loads its kernels. `keep_all` gives every value its own memory so that
    /// [`CudaExecutor::value`] can read any node after a run.
    pub fn new(
        dev: &Arc<CudaDevice>,
        graph: &Graph,
        weights: &dyn TensorSource,
        dtype: DType,
        keep_all: bool,
    ) -> Result<CudaExecutor> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(CudaError::DType(dtype));
        }
        Self::with_cache(graph, weights, &WeightCache::new(dev, dtype), keep_all)
    }

    /// As [`CudaExecutor::new`], with the device weights taken from (and added to) `cache`, whose
    /// device and storage dtype the executor uses: the graphs of one model (each stage, each
    /// batch size) then hold one copy of each weight.
    pub fn with_cache(
        graph: &Graph,
        weights: &dyn TensorSource,
        cache: &Arc<WeightCache>,
        keep_all: bool,
    ) -> Result<CudaExecutor> {
        let (dev, dtype) = (&cache.dev, cache.dtype);
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(CudaError::DType(dtype));
        }
        let esize = dtype.size_in_bytes();
        let plan = plan(graph, keep_all);

        let arena = Arc::new(dev.alloc(plan.arena_elems * esize)?);
        // Poison the arena (NaN in f32 and bf16) so that a read of an unwritten value shows;
        // states start zeroed (a KV cache's unwritten rows are masked, and 0 · NaN is NaN).
        dev.fill_bytes(arena.ptr(), 0xFF, arena.bytes())?;
        for (id, _) in graph.states() {
            let off = plan.offset(id).expect("states are planned") * esize;
            dev.fill_bytes(arena.ptr() + off as u64, 0, graph.shape(id).numel() * esize)?;
        }

        let mut weight_ptr = HashMap::new();
        let mut prepared = vec![];
        for (id, name) in graph.weights() {
            let layout = families::conv::weight_layout(dev, graph, id, dtype)?;
            if layout.is_some() {
                prepared.push(id);
            }
            weight_ptr.insert(id, cache.get_in(weights, name, graph.shape(id), layout)?);
        }

        // f32 staging for bf16 storage: one slot per input and per output.
        let mut staged_inputs = vec![];
        let mut staged_outputs = vec![];
        let mut staging = None;
        if dtype == DType::BF16 {
            let mut slots: Vec<(bool, ValueId, usize)> =
                graph.inputs().map(|(id, _)| (true, id, 0)).collect();
            let mut seen = std::collections::HashSet::new();
            for (_, id) in &graph.outputs {
                if seen.insert(*id) {
                    slots.push((false, *id, 0));
                }
            }
            let mut total = 0usize;
            for s in slots.iter_mut() {
                s.2 = total;
                total = align_up(total + graph.shape(s.1).numel() * 4, STAGING_ALIGN);
            }
            if total > 0 {
                let sb = dev.alloc(total)?;
                for (is_in, id, off) in slots {
                    let st = Staged {
                        id,
                        ptr: sb.ptr() + off as u64,
                        n: graph.shape(id).numel(),
                    };
                    if is_in {
                        staged_inputs.push(st)
                    } else {
                        staged_outputs.push(st)
                    }
                }
                staging = Some(sb);
            }
        }

        let mut ex = CudaExecutor {
            dev: dev.clone(),
            graph: graph.clone(),
            plan,
            dtype,
            keep_all,
            arena,
            _weights: cache.clone(),
            weight_ptr,
            prepared_weights: prepared,
            inputs_set: vec![],
            _staging: staging,
            staged_inputs,
            staged_outputs,
            resources: families::Resources::default(),
            steps: vec![],
            input_casts: vec![],
            output_casts: vec![],
            f32_read: vec![],
            runs: Arc::new(AtomicU64::new(0)),
            captured: None,
            warmed: false,
            capture_armed: false,
            traffic: Default::default(),
        };
        ex.resolve()?;
        dev.synchronize()?;
        Ok(ex)
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device bytes of the activation arena.
    pub fn arena_bytes(&self) -> usize {
        self.arena.bytes()
    }

    /// Device bytes of the f32 staging slots of a bf16 executor's inputs and outputs.
    pub fn staging_bytes(&self) -> usize {
        self._staging.as_ref().map_or(0, |b| b.bytes())
    }

    /// Device bytes of the families' workspaces and constant tables.
    pub fn resource_bytes(&self) -> usize {
        self.resources.bytes()
    }

    /// The device address of a value.
    pub fn ptr(&self, id: ValueId) -> u64 {
        match self.plan.offset(id) {
            Some(off) => self.arena.ptr() + (off * self.dtype.size_in_bytes()) as u64,
            None => self.weight_ptr[&id],
        }
    }

    fn resolve(&mut self) -> Result<()> {
        let mut steps = Vec::with_capacity(self.graph.nodes.len());
        let resources = std::cell::RefCell::new(std::mem::take(&mut self.resources));
        let f32_read = std::cell::RefCell::new(vec![]);
        let g = &self.graph;
        let p = |id: ValueId| self.ptr(id);
        // An f32 copy of a value: the value itself with f32 storage, an input's staging slot with bf16.
        let p32 = |id: ValueId| -> Option<u64> {
            match self.dtype {
                DType::F32 => Some(self.ptr(id)),
                _ => {
                    let s = self.staged_inputs.iter().find(|s| s.id == id)?;
                    f32_read.borrow_mut().push(id);
                    Some(s.ptr)
                }
            }
        };
        let gelu_fusions: HashMap<ValueId, ValueId> = g
            .nodes
            .iter()
            .filter_map(|n| {
                families::gelu_fused_into_linear(g, n, self.keep_all).map(|lin| (lin, n.output))
            })
            .collect();
        let fctx = families::Ctx {
            dev: &self.dev,
            graph: g,
            dtype: self.dtype,
            ptr: &p,
            f32_ptr: &p32,
            resources: &resources,
            gelu_fusions: &gelu_fusions,
        };
        for node in &g.nodes {
            let step = families::resolve(&fctx, node).map_err(|e| match e {
                CudaError::NoCublasLt { .. } => CudaError::NoCublasLt {
                    node: node.name.clone(),
                },
                e => node_err(&node.name, node.op.name(), e.to_string()),
            })?;
            // Load every kernel now, so that a run compiles nothing and a missing kernel names its node.
            for l in step.launches() {
                self.dev.kernels().function(&l.kernel).map_err(|e| {
                    node_err(
                        &node.name,
                        node.op.name(),
                        format!("kernel `{}`: {e}", l.kernel),
                    )
                })?;
            }
            steps.push(step);
        }
        let sms = self.dev.sm_count();
        let mut input_casts = vec![];
        for s in &self.staged_inputs {
            input_casts.push(elementwise::cast(
                DType::BF16,
                sms,
                s.ptr,
                self.ptr(s.id),
                s.n,
            )?);
        }
        let mut output_casts = vec![];
        for s in &self.staged_outputs {
            output_casts.extend(elementwise::cast(
                DType::F32,
                sms,
                self.ptr(s.id),
                s.ptr,
                s.n,
            )?);
        }
        if self.dtype == DType::BF16 {
            for k in ["cast_f32_to_bf16", "cast_bf16_to_f32"] {
                self.dev.kernels().function(k)?;
            }
        }
        self.steps = steps;
        self.input_casts = input_casts;
        self.output_casts = output_casts;
        self.f32_read = f32_read.into_inner();
        self.resources = resources.into_inner();
        Ok(())
    }

    /// Enqueues node `i`.
    fn enqueue_step(&self, i: usize) -> Result<()> {
        // SAFETY: every pointer was resolved from the plan, the weights and the families'
        // resources for exactly these shapes, and those buffers live as long as `self`.
        let r = unsafe { self.steps[i].enqueue(&self.dev) };
        let node = &self.graph.nodes[i];
        r.map_err(|e| node_err(&node.name, node.op.name(), e.to_string()))
    }

    fn enqueue_output_casts(&self) -> Result<()> {
        // SAFETY: staging slots and arena values of the sizes resolved.
        unsafe { families::enqueue(&self.dev, &self.output_casts) }
    }

    /// Every node, eagerly (not into a capture): the pass that warms the executor up for `capture`.
    fn enqueue_eager(&mut self) -> Result<()> {
        self.enqueue_all()?;
        self.warmed = true;
        Ok(())
    }

    /// Every node (one pass; the staging casts are not part of it).
    fn enqueue_all(&self) -> Result<()> {
        for i in 0..self.steps.len() {
            self.enqueue_step(i)?;
        }
        self.runs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copies `inputs` (any subset of the graph's inputs) to the device: into the arena (f32) or
    /// the staging slots, cast into the arena at once (bf16). Inputs are never overwritten by a
    /// run (the planner keeps them), so an input given once serves every later run until it is
    /// given again.
    pub fn set_inputs(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<()> {
        for (name, t) in inputs {
            let id = self.graph.input_id(name).ok_or_else(|| CudaError::Input {
                name: name.clone(),
                msg: "is not an input of this graph".into(),
            })?;
            let shape = self.graph.shape(id);
            if &t.shape != shape {
                return Err(CudaError::Input {
                    name: name.clone(),
                    msg: format!("has shape {}, expected {shape}", t.shape),
                });
            }
            let v = t.to_f32_vec();
            match self.dtype {
                DType::F32 => self.dev.copy_to_device(&v, self.ptr(id))?,
                _ => {
                    let i = self
                        .staged_inputs
                        .iter()
                        .position(|s| s.id == id)
                        .expect("a staging slot per input");
                    self.dev.copy_to_device(&v, self.staged_inputs[i].ptr)?;
                    // SAFETY: the input's staging slot and arena value, of the sizes resolved.
                    unsafe { families::enqueue(&self.dev, &self.input_casts[i]) }?;
                }
            }
            self.count(v.len() * 4, 0);
            if !self.inputs_set.contains(&id) {
                self.inputs_set.push(id);
            }
        }
        Ok(())
    }

    /// Writes `data` (f32, converted to the storage dtype on the host) into the state `name` from
    /// element `offset` on: a sequence's prompt keys and values into its rows of a KV cache.
    /// States start zeroed and keep their values across runs and replays.
    pub fn write_state(&mut self, name: &str, offset: usize, data: &[f32]) -> Result<()> {
        let dst = self.state_ptr(name, offset, data.len())?;
        match self.dtype {
            DType::F32 => self.dev.copy_to_device(data, dst)?,
            _ => {
                let h: Vec<u16> = data.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
                self.dev.copy_to_device(&h, dst)?
            }
        }
        self.count(data.len() * self.dtype.size_in_bytes(), 0);
        Ok(())
    }

    /// Copies elements [`src_offset`, `src_offset + len`) of `src` (another executor's output on
    /// this device, in this executor's storage dtype) into the state `name` from element `offset`
    /// on, on the device (no host copy, no cast): a prefill's key/value rows into a sequence's
    /// rows of the decode step's KV cache.
    pub fn copy_to_state(
        &mut self,
        name: &str,
        offset: usize,
        src: &DeviceTensor,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        let err = |msg: String| CudaError::Input {
            name: name.into(),
            msg,
        };
        let dst = self.state_ptr(name, offset, len)?;
        if src_offset
            .checked_add(len)
            .is_none_or(|end| end > src.shape.numel())
        {
            return Err(err(format!(
                "elements {src_offset}..{} of {src:?} are outside its {}",
                src_offset.saturating_add(len),
                src.shape.numel()
            )));
        }
        if src.dtype != self.dtype {
            return Err(err(format!(
                "is given {src:?} stored as {}, this executor stores {}",
                src.dtype, self.dtype
            )));
        }
        if src.dev.ordinal() != self.dev.ordinal() {
            return Err(err(format!(
                "is given {src:?}, this executor runs on device {}",
                self.dev.ordinal()
            )));
        }
        if src.runs.load(Ordering::Relaxed) != src.made_at {
            return Err(err(format!(
                "is given {src:?}, whose producer has run again since: the value is gone"
            )));
        }
        let es = self.dtype.size_in_bytes();
        self.dev
            .copy_on_device(src.ptr + (src_offset * es) as u64, dst, len * es)?;
        if !Arc::ptr_eq(&src.dev, &self.dev) {
            // As in `set_input_tensor`: the producer's stream may reuse its memory once the handle goes.
            self.dev.synchronize()?;
        }
        Ok(())
    }

    /// Reads `len` elements of the state `name` from element `offset` on, as f32.
    pub fn read_state(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>> {
        let src = self.state_ptr(name, offset, len)?;
        self.dev.synchronize()?;
        self.count(0, len * self.dtype.size_in_bytes());
        Ok(match self.dtype {
            DType::F32 => {
                let mut v = vec![0f32; len];
                self.dev.copy_to_host(src, &mut v)?;
                v
            }
            _ => {
                let mut h = vec![0u16; len];
                self.dev.copy_to_host(src, &mut h)?;
                h.into_iter().map(|b| bf16::from_bits(b).to_f32()).collect()
            }
        })
    }

    /// The device address of element `offset` of state `name`, checking [offset, offset + len).
    fn state_ptr(&self, name: &str, offset: usize, len: usize) -> Result<u64> {
        let id = self.graph.state_id(name).ok_or_else(|| CudaError::Input {
            name: name.into(),
            msg: "is not a state of this graph".into(),
        })?;
        let n = self.graph.shape(id).numel();
        if offset.checked_add(len).is_none_or(|end| end > n) {
            return Err(CudaError::Input {
                name: name.into(),
                msg: format!(
                    "elements {offset}..{} are outside the state's {n}",
                    offset.saturating_add(len)
                ),
            });
        }
        Ok(self.ptr(id) + (offset * self.dtype.size_in_bytes()) as u64)
    }

    fn count(&self, up: usize, down: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.traffic[0].fetch_add(up as u64, Relaxed);
        self.traffic[1].fetch_add(down as u64, Relaxed);
    }

    /// Bytes this executor has copied (host -> device, device -> host) since it was made.
    pub fn host_traffic(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.traffic[0].load(Relaxed), self.traffic[1].load(Relaxed))
    }

    fn check_inputs_set(&self) -> Result<()> {
        match self
            .graph
            .inputs()
            .find(|(id, _)| !self.inputs_set.contains(id))
        {
            Some((_, name)) => Err(CudaError::Input {
                name: name.into(),
                msg: "missing".into(),
            }),
            None => Ok(()),
        }
    }

    /// Enqueues one run on the inputs set so far: the captured CUDA graph when there is one
    /// (`capture`), else every node (and, when a capture is armed, captures right after this
    /// eager pass). Returns without waiting; `outputs` synchronizes.
    pub fn execute(&mut self) -> Result<()> {
        self.check_inputs_set()?;
        match &self.captured {
            Some(g) => {
                g.launch().ctx(|| "launching the CUDA graph".into())?;
                self.runs.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => {
                self.enqueue_eager()?;
                if self.capture_armed {
                    self.capture_now()?;
                }
                Ok(())
            }
        }
    }

    /// Graph output `name` of the last run, left on the device in the storage dtype (waits for
    /// the device, so that a consumer on another stream reads it complete).
    pub fn output_tensor(&self, name: &str) -> Result<DeviceTensor> {
        let id = self
            .graph
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
            .ok_or_else(|| CudaError::Invalid {
                what: "output".into(),
                msg: format!("`{name}` is not an output of this graph"),
            })?;
        self.dev.synchronize()?;
        Ok(DeviceTensor {
            name: name.into(),
            ptr: self.ptr(id),
            shape: self.graph.shape(id).clone(),
            dtype: self.dtype,
            dev: self.dev.clone(),
            _arena: self.arena.clone(),
            runs: self.runs.clone(),
            made_at: self.runs.load(Ordering::Relaxed),
        })
    }

    /// Sets input `name` from another executor's output on the same device, copied on the device
    /// into this executor's arena (no host copy). Shapes must match; an f32 value into bf16
    /// storage goes through the input's f32 staging slot and its cast (as from the host), a bf16
    /// value into f32 storage is cast exactly on the device. The producer must not have run since
    /// the handle was made.
    pub fn set_input_tensor(&mut self, name: &str, t: &DeviceTensor) -> Result<()> {
        let err = |msg: String| CudaError::Input {
            name: name.into(),
            msg,
        };
        let id = self
            .graph
            .input_id(name)
            .ok_or_else(|| err("is not an input of this graph".into()))?;
        let shape = self.graph.shape(id);
        if &t.shape != shape {
            return Err(err(format!(
                "is given {t:?} of shape {}, expected {shape}",
                t.shape
            )));
        }
        if t.dtype != self.dtype
            && !matches!(
                (t.dtype, self.dtype),
                (DType::F32, DType::BF16) | (DType::BF16, DType::F32)
            )
        {
            return Err(err(format!(
                "is given {t:?} stored as {}, this executor stores {}",
                t.dtype, self.dtype
            )));
        }
        if t.dev.ordinal() != self.dev.ordinal() {
            return Err(err(format!(
                "is given {t:?}, this executor runs on device {}",
                self.dev.ordinal()
            )));
        }
        if t.runs.load(Ordering::Relaxed) != t.made_at {
            return Err(err(format!(
                "is given {t:?}, whose producer has run again since: the value is gone"
            )));
        }
        match (t.dtype, self.dtype) {
            // An f32 value into bf16 storage (the sampler's f32 latents into the step): into the
            // input's f32 staging slot, then its cast, exactly as `set_inputs` from the host.
            (DType::F32, DType::BF16) => {
                let i = self
                    .staged_inputs
                    .iter()
                    .position(|s| s.id == id)
                    .expect("a staging slot per input");
                self.dev
                    .copy_on_device(t.ptr, self.staged_inputs[i].ptr, t.bytes())?;
                // SAFETY: the input's staging slot and arena value, of the sizes resolved.
                unsafe { families::enqueue(&self.dev, &self.input_casts[i]) }?;
            }
            // A bf16 value into f32 storage (the step's velocity into the f32 sampler): the exact cast.
            (DType::BF16, DType::F32) => {
                let cast = elementwise::cast(
                    DType::F32,
                    self.dev.sm_count(),
                    t.ptr,
                    self.ptr(id),
                    shape.numel(),
                )?;
                // SAFETY: the producer's bf16 value (alive with its arena) into this arena's f32 input, n elements each.
                unsafe { families::enqueue(&self.dev, &cast) }?;
            }
            _ => {
                if self.f32_read.contains(&id) {
                    return Err(err("is read in f32 by a kernel (its staging copy), so it must be set from the host".into()));
                }
                self.dev.copy_on_device(t.ptr, self.ptr(id), t.bytes())?;
            }
        }
        if !Arc::ptr_eq(&t.dev, &self.dev) {
            // The producer's memory belongs to another stream (a lane), which may free or rewrite
            // it in its own order once the handle is dropped: the copy must be done before.
            self.dev.synchronize()?;
        }
        if !self.inputs_set.contains(&id) {
            self.inputs_set.push(id);
        }
        Ok(())
    }

    /// Whether runs replay a captured CUDA graph.
    pub fn is_captured(&self) -> bool {
        self.captured.is_some()
    }

    /// Whether `capture` was asked for before any eager pass: the next `execute` is that pass
    /// and captures after it.
    pub fn is_capture_armed(&self) -> bool {
        self.capture_armed
    }

    /// The graph's outputs (f32) after `execute`; waits for the device.
    pub fn outputs(&self) -> Result<HashMap<String, HostTensor>> {
        self.download_outputs()
    }

    /// Times `iters` runs (after one warm-up run) with CUDA events around each, in ms.
    pub fn time_runs(&mut self, iters: usize) -> Result<Vec<f64>> {
        self.execute()?;
        self.dev.synchronize()?;
        let (start, end) = (self.dev.timing_event()?, self.dev.timing_event()?);
        let mut out = Vec::with_capacity(iters);
        for _ in 0..iters {
            self.dev.record(&start)?;
            self.execute()?;
            self.dev.record(&end)?;
            self.dev.synchronize()?;
            out.push(
                start
                    .elapsed_ms(&end)
                    .ctx(|| "reading event times".into())? as f64,
            );
        }
        Ok(out)
    }

    fn download_outputs(&self) -> Result<HashMap<String, HostTensor>> {
        self.enqueue_output_casts()?;
        self.dev.synchronize()?;
        let mut out = HashMap::new();
        for (name, id) in &self.graph.outputs {
            let shape = self.graph.shape(*id).clone();
            let src = match self.dtype {
                DType::F32 => self.ptr(*id),
                _ => {
                    self.staged_outputs
                        .iter()
                        .find(|s| s.id == *id)
                        .expect("a staging slot per output")
                        .ptr
                }
            };
            let mut v = vec![0f32; shape.numel()];
            self.dev.copy_to_host(src, &mut v)?;
            self.count(0, v.len() * 4);
            out.insert(name.clone(), HostTensor::from_f32(shape, v)?);
        }
        Ok(out)
    }

    /// Runs the graph; `inputs` must hold every graph input by name with its exact shape (any
    /// numeric dtype; converted to f32). Outputs are f32.
    pub fn run(
        &mut self,
        inputs: &HashMap<String, HostTensor>,
    ) -> Result<HashMap<String, HostTensor>> {
        self.set_inputs(inputs)?;
        self.check_inputs_set()?;
        self.enqueue_eager()?;
        self.download_outputs()
    }

    /// An f32 copy of a value after `run`. Weights are always readable; activations only while
    /// their memory has not been reused (always, with `keep_all`), as `CpuExecutor::value`.
    pub fn value(&self, id: ValueId) -> Result<HostTensor> {
        if id.0 >= self.graph.values.len() {
            return Err(CudaError::Invalid {
                what: "value".into(),
                msg: format!("no value {} in the graph", id.0),
            });
        }
        if self.prepared_weights.contains(&id) {
            return Err(CudaError::Invalid {
                what: "value".into(),
                msg: format!(
                    "weight `{}` is held on the device only in its conv kernel's prepared layout (families::conv::ConvWeightLayout), not as [cout, cin, 3, 3]",
                    self.graph.weights().find(|(w, _)| *w == id).map_or("?", |(_, n)| n)
                ),
            });
        }
        let live_at_end = self.graph.outputs.iter().any(|(_, o)| *o == id);
        let readable = matches!(
            self.graph.value(id).kind,
            ValueKind::Weight(_) | ValueKind::State(_)
        ) || self.keep_all
            || live_at_end;
        if !readable {
            return Err(CudaError::NotKept { id: id.0 });
        }
        self.dev.synchronize()?;
        let shape = self.graph.shape(id).clone();
        let n = shape.numel();
        let v = match self.dtype {
            DType::F32 => {
                let mut v = vec![0f32; n];
                self.dev.copy_to_host(self.ptr(id), &mut v)?;
                v
            }
            _ => {
                let mut h = vec![0u16; n];
                self.dev.copy_to_host(self.ptr(id), &mut h)?;
                h.into_iter().map(|b| bf16::from_bits(b).to_f32()).collect()
            }
        };
        Ok(HostTensor::from_f32(shape, v)?)
    }

    /// Captures one run (every node) into a CUDA graph, replacing any earlier capture; later
    /// `execute`s replay it. Inputs and their casts are not part of it: [`CudaExecutor::replay`]
    /// sets them first.
    ///
    /// A capture only follows an eager pass: on a GPU the first launch of a kernel may still load
    /// its module (lazy loading) and cuBLASLt may initialise state on its first matmul, neither of
    /// which may happen inside a capture. So on an executor that has not run yet, `capture` only
    /// arms the capture: the next `execute` runs every node eagerly (that run's results are
    /// real, nothing is computed twice) and captures right after it.
    pub fn capture(&mut self) -> Result<()> {
        self.captured = None;
        if self.warmed {
            self.capture_now()
        } else {
            self.capture_armed = true;
            Ok(())
        }
    }

    fn capture_now(&mut self) -> Result<()> {
        debug_assert!(self.warmed, "a capture follows an eager pass");
        self.capture_armed = false;
        self.captured = None;
        let stream = self.dev.stream().clone();
        self.dev.synchronize()?;
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .ctx(|| "beginning CUDA-graph capture".into())?;
        let enqueued = self.enqueue_all();
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        enqueued?;
        let graph = ended.ctx(|| "ending CUDA-graph capture / instantiating the graph".into())?;
        let graph = graph.ok_or_else(|| CudaError::Invalid {
            what: "capture".into(),
            msg: "the captured graph is empty".into(),
        })?;
        graph.upload().ctx(|| "uploading the CUDA graph".into())?;
        self.captured = Some(graph);
        Ok(())
    }

    /// Copies `inputs` to the device and launches the captured graph (see `capture`).
    pub fn replay(
        &mut self,
        inputs: &HashMap<String, HostTensor>,
    ) -> Result<HashMap<String, HostTensor>> {
        if self.captured.is_none() && !self.capture_armed {
            return Err(CudaError::Invalid {
                what: "replay".into(),
                msg: "nothing captured: call capture() first".into(),
            });
        }
        self.set_inputs(inputs)?;
        self.execute()?;
        self.download_outputs()
    }

    /// Runs the graph `iters` times (after one warm-up run) with a pair of CUDA events around each
    /// node, and returns each node's median and minimum time.
    pub fn profile(
        &mut self,
        inputs: &HashMap<String, HostTensor>,
        iters: usize,
    ) -> Result<Vec<NodeTiming>> {
        let iters = iters.max(1);
        self.set_inputs(inputs)?;
        self.check_inputs_set()?;
        self.enqueue_eager()?;
        self.dev.synchronize()?;
        let n = self.steps.len();
        let mut starts = Vec::with_capacity(n);
        let mut ends = Vec::with_capacity(n);
        for _ in 0..n {
            starts.push(self.dev.timing_event()?);
            ends.push(self.dev.timing_event()?);
        }
        let mut times = vec![Vec::with_capacity(iters); n];
        for _ in 0..iters {
            for i in 0..n {
                self.dev.record(&starts[i])?;
                self.enqueue_step(i)?;
                self.dev.record(&ends[i])?;
            }
            self.dev.synchronize()?;
            for i in 0..n {
                let ms = starts[i]
                    .elapsed_ms(&ends[i])
                    .ctx(|| "reading event times".into())?;
                times[i].push(ms as f64);
            }
        }
        Ok(self
            .graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let t = &mut times[i];
                t.sort_by(|a, b| a.total_cmp(b));
                NodeTiming {
                    node: i,
                    name: node.name.clone(),
                    op: node.op.name(),
                    median_ms: t[t.len() / 2],
                    min_ms: t[0],
                }
            })
            .collect())
    }
}
