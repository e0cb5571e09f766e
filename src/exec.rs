//! Running a graph on a chosen device: the one place where `--device` and `--dtype` are turned
//! into an executor, and where two backends are diffed node by node.

use std::collections::HashMap;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use openuni_cpu::CpuExecutor;
use openuni_cuda::{CudaDevice, CudaExecutor, DeviceTensor};
use openuni_graph::{Graph, ValueId};
use openuni_tensor::{DType, HostData, HostTensor, Shape, TensorSource};

use crate::compare::{diff, Diff};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// The emulated GPU (crates/emu): the real CUDA backend and kernels, run on the CPU. It checks
    /// correctness (numerics, launch configurations, barriers, memory bounds), never speed.
    Emu,
    /// Emulated device N >= 1 (`emu:N`, with `OPENUNI_EMU_DEVICES` > N); `emu` and `emu:0` are
    /// [`Device::Emu`], kept a unit variant so that code naming the emulated GPU stays as it is.
    EmuAt(usize),
}

impl Device {
    /// Parses `cpu`, `cuda`, `cuda:N`, `emu` or `emu:N`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "emu" => Ok(Device::Emu),
            _ => match (
                s.strip_prefix("cuda:").map(str::parse::<usize>),
                s.strip_prefix("emu:").map(str::parse::<usize>),
            ) {
                (Some(Ok(n)), _) => Ok(Device::Cuda(n)),
                (_, Some(Ok(n))) => Ok(Device::emulated(n)),
                _ => bail!("--device `{s}` is not one of cpu, cuda, cuda:N, emu, emu:N"),
            },
        }
    }

    /// Emulated device `n`.
    pub fn emulated(n: usize) -> Device {
        if n == 0 {
            Device::Emu
        } else {
            Device::EmuAt(n)
        }
    }

    /// Whether this is an emulated GPU.
    pub fn is_emulated(self) -> bool {
        matches!(self, Device::Emu | Device::EmuAt(_))
    }

    /// The CUDA ordinal (real or emulated); `None` for the CPU.
    pub fn ordinal(self) -> Option<usize> {
        match self {
            Device::Cpu => None,
            Device::Cuda(n) | Device::EmuAt(n) => Some(n),
            Device::Emu => Some(0),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Emu => write!(f, "emu"),
            Device::EmuAt(n) => write!(f, "emu:{n}"),
        }
    }
}

/// The folder of the emulated driver: $OPENUNI_EMU_LIB, else `target/emu/lib` next to the
/// program's own `target/<profile>/` folder, else `./target/emu/lib`.
fn emu_lib_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("OPENUNI_EMU_LIB") {
        return Some(PathBuf::from(d));
    }
    let near_exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(|t| t.join("emu/lib")));
    [near_exe, Some(PathBuf::from("target/emu/lib"))]
        .into_iter()
        .flatten()
        .find(|d| d.join("libcuda.so.1").is_file())
}

/// Whether the emulated GPU is built (for tests: when it is not, this prints the skip line
/// that a test needing a device must show, and the test returns).
pub fn emulator_or_skip() -> bool {
    let ok = emu_lib_dir().is_some();
    if !ok {
        println!("skipped: no CUDA device (the emulated GPU is not built: run tools/build_emu.sh)");
    }
    ok
}

/// Loads the emulated driver and cuBLASLt by absolute path before cudarc's first call, so that
/// cudarc's own dlopen("libcuda.so.1") finds them.
fn load_emulator() -> Result<()> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let dir = emu_lib_dir().ok_or_else(|| {
                "--device emu: the emulated GPU is not built. Run `eval \"$(bash tools/build_emu.sh)\"` \
                 (it installs the CUDA headers it needs with tools/setup_cuda.sh), or set OPENUNI_EMU_LIB"
                    .to_string()
            })?;
            for lib in ["libcuda.so.1", "libcublasLt.so.13"] {
                openuni_cuda::preload_library(&dir.join(lib)).map_err(|e| format!("--device emu: {e}"))?;
            }
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Parses `--dtype`: the storage type of weights and activations on the device.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match DType::parse(s) {
        Some(d @ (DType::F32 | DType::BF16)) => Ok(d),
        _ => bail!("--dtype `{s}` is not one of f32, bf16"),
    }
}

/// What both backends offer: run a graph (inputs persist across runs until set again), time it,
/// and read any value afterwards.
pub trait GraphExecutor {
    /// Sets every input not set before (or any subset again), runs, returns the outputs.
    fn run(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<HashMap<String, HostTensor>> {
        self.set_inputs(inputs)?;
        self.execute()?;
        self.outputs()
    }
    fn set_inputs(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<()>;
    /// One run on the inputs set so far (on a GPU: enqueued, or a captured graph replayed).
    fn execute(&mut self) -> Result<()>;
    /// The outputs of the last run, as f32 (waits for the device).
    fn outputs(&mut self) -> Result<HashMap<String, HostTensor>>;
    fn value(&self, id: ValueId) -> Result<HostTensor>;
    /// Captures a run into a CUDA graph that later `execute`s replay, always after one eager
    /// warm-up pass (on an executor that has not run, the next `execute` is that pass); a no-op on the CPU.
    fn capture(&mut self) -> Result<()>;
    /// Wall times of `iters` runs after a warm-up, in ms (CUDA events on a GPU).
    fn time_runs(&mut self, iters: usize) -> Result<Vec<f64>>;
    /// Each node's median time over `iters` runs after a warm-up, in ms, in node order.
    fn profile(&mut self, iters: usize) -> Result<Vec<f64>>;
    fn graph(&self) -> &Graph;
    /// Device (or host) bytes of the activation arena, workspaces and staging of this graph.
    fn activation_bytes(&self) -> usize;
    /// Writes f32 `data` into the state (`ValueKind::State`, a KV cache) `name` from element
    /// `offset` on; states persist across runs and replays.
    fn write_state(&mut self, name: &str, offset: usize, data: &[f32]) -> Result<()>;
    /// Copies elements [`src_offset`, `src_offset + len`) of `src` (an output of another executor
    /// of the same backend) into the state `name` from element `offset` on: a device handle on the
    /// device in the storage dtype (no host copy), a host one as by `write_state`.
    fn copy_to_state(
        &mut self,
        name: &str,
        offset: usize,
        src: &TensorHandle,
        src_offset: usize,
        len: usize,
    ) -> Result<()>;
    /// Reads `len` elements of the state `name` from element `offset` on, as f32.
    fn read_state(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>>;
    /// Bytes this executor copied host -> device and device -> host so far (0 on the CPU, which
    /// has no bus).
    fn host_traffic(&self) -> (u64, u64);
    /// Every output of the last run where it lies: on a GPU left on the device in the storage
    /// dtype (no download, no cast), on the CPU the host tensor. For another executor's
    /// [`set_input_handles`](Self::set_input_handles) before this one runs again.
    fn output_handles(&mut self) -> Result<HashMap<String, TensorHandle>>;
    /// Sets inputs from [`TensorHandle`]s: a device handle is copied on the device (same device,
    /// storage dtype and shape, checked), a host one is set as by `set_inputs`.
    fn set_input_handles(&mut self, inputs: &HashMap<String, TensorHandle>) -> Result<()>;
}

/// [`GraphExecutor::copy_to_state`] from a host tensor: its elements [src_offset, src_offset + len).
fn write_state_from_host(
    ex: &mut dyn GraphExecutor,
    name: &str,
    offset: usize,
    src: &HostTensor,
    src_offset: usize,
    len: usize,
) -> Result<()> {
    let v = src.to_f32_vec();
    let Some(part) = src_offset
        .checked_add(len)
        .and_then(|end| v.get(src_offset..end))
    else {
        bail!(
            "state `{name}`: elements {src_offset}..{} of a {} tensor do not exist",
            src_offset.saturating_add(len),
            src.shape
        );
    };
    ex.write_state(name, offset, part)
}

/// A graph value passed from one executor to another: on a GPU it stays on the device.
#[derive(Clone, Debug)]
pub enum TensorHandle {
    Host(HostTensor),
    Device(DeviceTensor),
}

impl TensorHandle {
    pub fn shape(&self) -> &Shape {
        match self {
            TensorHandle::Host(t) => &t.shape,
            TensorHandle::Device(t) => t.shape(),
        }
    }
    /// The same value viewed as `shape` (as many elements; no copy on a device).
    pub fn reshaped(&self, shape: impl Into<Shape>) -> Result<TensorHandle> {
        let shape = shape.into();
        Ok(match self {
            TensorHandle::Host(t) => TensorHandle::Host(
                HostTensor::new(shape, t.data.clone())
                    .with_context(|| format!("viewing {} as another shape", t.shape))?,
            ),
            TensorHandle::Device(t) => TensorHandle::Device(t.reshaped(shape)?),
        })
    }
    /// The value on the host (a device value is downloaded in its storage dtype).
    pub fn to_host(&self) -> Result<HostTensor> {
        match self {
            TensorHandle::Host(t) => Ok(t.clone()),
            TensorHandle::Device(t) => Ok(t.to_host()?),
        }
    }
    /// Integer-valued pixel values (an `Op::QuantizeU8` output) as uint8 on the host: a device
    /// value is cast on the device and read back at one byte a value.
    pub fn to_host_u8(&self) -> Result<HostTensor> {
        match self {
            TensorHandle::Host(t) => Ok(HostTensor::new(
                t.shape.clone(),
                HostData::U8(
                    t.to_f32_vec()
                        .iter()
                        .map(|&v| v.clamp(0.0, 255.0) as u8)
                        .collect(),
                ),
            )?),
            TensorHandle::Device(t) => Ok(t.to_host_u8()?),
        }
    }
}

impl GraphExecutor for CudaExecutor {
    fn set_inputs(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<()> {
        Ok(CudaExecutor::set_inputs(self, inputs)?)
    }
    fn execute(&mut self) -> Result<()> {
        Ok(CudaExecutor::execute(self)?)
    }
    fn outputs(&mut self) -> Result<HashMap<String, HostTensor>> {
        Ok(CudaExecutor::outputs(self)?)
    }
    fn value(&self, id: ValueId) -> Result<HostTensor> {
        Ok(CudaExecutor::value(self, id)?)
    }
    fn capture(&mut self) -> Result<()> {
        Ok(CudaExecutor::capture(self)?)
    }
    fn time_runs(&mut self, iters: usize) -> Result<Vec<f64>> {
        Ok(CudaExecutor::time_runs(self, iters)?)
    }
    fn profile(&mut self, iters: usize) -> Result<Vec<f64>> {
        Ok(CudaExecutor::profile(self, &HashMap::new(), iters)?
            .into_iter()
            .map(|t| t.median_ms)
            .collect())
    }
    fn graph(&self) -> &Graph {
        CudaExecutor::graph(self)
    }
    fn activation_bytes(&self) -> usize {
        self.arena_bytes() + self.resource_bytes() + self.staging_bytes()
    }
    fn output_handles(&mut self) -> Result<HashMap<String, TensorHandle>> {
        let names: Vec<String> = CudaExecutor::graph(self)
            .outputs
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        names
            .into_iter()
            .map(|n| Ok((n.clone(), TensorHandle::Device(self.output_tensor(&n)?))))
            .collect()
    }
    fn set_input_handles(&mut self, inputs: &HashMap<String, TensorHandle>) -> Result<()> {
        for (name, t) in inputs {
            match t {
                TensorHandle::Device(d) => self.set_input_tensor(name, d)?,
                TensorHandle::Host(h) => {
                    CudaExecutor::set_inputs(self, &HashMap::from([(name.clone(), h.clone())]))?
                }
            }
        }
        Ok(())
    }
    fn write_state(&mut self, name: &str, offset: usize, data: &[f32]) -> Result<()> {
        Ok(CudaExecutor::write_state(self, name, offset, data)?)
    }
    fn copy_to_state(
        &mut self,
        name: &str,
        offset: usize,
        src: &TensorHandle,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        match src {
            TensorHandle::Device(d) => Ok(CudaExecutor::copy_to_state(
                self, name, offset, d, src_offset, len,
            )?),
            TensorHandle::Host(h) => write_state_from_host(self, name, offset, h, src_offset, len),
        }
    }
    fn read_state(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>> {
        Ok(CudaExecutor::read_state(self, name, offset, len)?)
    }
    fn host_traffic(&self) -> (u64, u64) {
        CudaExecutor::host_traffic(self)
    }
}

impl GraphExecutor for CpuExecutor {
    fn set_inputs(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<()> {
        Ok(CpuExecutor::set_inputs(self, inputs)?)
    }
    fn execute(&mut self) -> Result<()> {
        Ok(CpuExecutor::execute(self)?)
    }
    fn outputs(&mut self) -> Result<HashMap<String, HostTensor>> {
        Ok(CpuExecutor::outputs(self))
    }
    fn value(&self, id: ValueId) -> Result<HostTensor> {
        Ok(CpuExecutor::value(self, id)?)
    }
    fn capture(&mut self) -> Result<()> {
        Ok(())
    }
    fn time_runs(&mut self, iters: usize) -> Result<Vec<f64>> {
        self.execute()?;
        (0..iters)
            .map(|_| {
                let t = std::time::Instant::now();
                self.execute()?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            })
            .collect()
    }
    fn profile(&mut self, iters: usize) -> Result<Vec<f64>> {
        Ok(CpuExecutor::profile(self, iters)?
            .into_iter()
            .map(|t| t.median_ms)
            .collect())
    }
    fn graph(&self) -> &Graph {
        CpuExecutor::graph(self)
    }
    fn activation_bytes(&self) -> usize {
        self.plan().arena_elems * 4
    }
    fn output_handles(&mut self) -> Result<HashMap<String, TensorHandle>> {
        Ok(CpuExecutor::outputs(self)
            .into_iter()
            .map(|(n, t)| (n, TensorHandle::Host(t)))
            .collect())
    }
    fn set_input_handles(&mut self, inputs: &HashMap<String, TensorHandle>) -> Result<()> {
        for (name, t) in inputs {
            match t {
                TensorHandle::Host(h) => {
                    CpuExecutor::set_inputs(self, &HashMap::from([(name.clone(), h.clone())]))?
                }
                TensorHandle::Device(d) => {
                    bail!("input `{name}`: the CPU executor was handed {d:?}, a device tensor")
                }
            }
        }
        Ok(())
    }
    fn write_state(&mut self, name: &str, offset: usize, data: &[f32]) -> Result<()> {
        Ok(CpuExecutor::write_state(self, name, offset, data)?)
    }
    fn copy_to_state(
        &mut self,
        name: &str,
        offset: usize,
        src: &TensorHandle,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        match src {
            TensorHandle::Host(h) => write_state_from_host(self, name, offset, h, src_offset, len),
            TensorHandle::Device(d) => {
                bail!("state `{name}`: the CPU executor was handed {d:?}, a device tensor")
            }
        }
    }
    fn read_state(&self, name: &str, offset: usize, len: usize) -> Result<Vec<f32>> {
        Ok(CpuExecutor::read_state(self, name, offset, len)?)
    }
    fn host_traffic(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Weights converted (CPU) or uploaded (GPU) once and shared by every executor built with it.
#[derive(Clone)]
pub enum WeightCache {
    Cpu(Arc<openuni_cpu::WeightCache>),
    Cuda(Arc<openuni_cuda::WeightCache>),
}

impl WeightCache {
    pub fn new(device: Device, dtype: DType) -> Result<WeightCache> {
        Ok(match device {
            Device::Cpu => WeightCache::Cpu(openuni_cpu::WeightCache::new()),
            _ => WeightCache::Cuda(openuni_cuda::WeightCache::new(&open_device(device)?, dtype)),
        })
    }

    /// As `new`, with the executors built on it running on the device's second lane
    /// ([`open_device_lane`]); on the CPU the same as `new`.
    pub fn on_second_lane(device: Device, dtype: DType) -> Result<WeightCache> {
        Ok(match device {
            Device::Cpu => WeightCache::Cpu(openuni_cpu::WeightCache::new()),
            _ => WeightCache::Cuda(openuni_cuda::WeightCache::new(
                &open_device_lane(device)?,
                dtype,
            )),
        })
    }

    /// Bytes held (host f32 on the CPU, device memory on a GPU).
    pub fn bytes(&self) -> usize {
        match self {
            WeightCache::Cpu(c) => c.bytes(),
            WeightCache::Cuda(c) => c.bytes(),
        }
    }
}

/// Builds an executor for `graph` on `device` with `dtype` storage. `keep_all` keeps every
/// node's output readable (for node diffs).
pub fn executor(
    device: Device,
    graph: &Graph,
    weights: &dyn TensorSource,
    dtype: DType,
    keep_all: bool,
) -> Result<Box<dyn GraphExecutor>> {
    check_dtype(device, dtype)?;
    executor_with(
        device,
        graph,
        weights,
        &WeightCache::new(device, dtype)?,
        keep_all,
    )
}

fn check_dtype(device: Device, dtype: DType) -> Result<()> {
    if device == Device::Cpu && dtype != DType::F32 {
        bail!("--device cpu runs the f32 reference only; --dtype {dtype} needs --device cuda");
    }
    Ok(())
}

/// As [`executor`], sharing weights through `cache` (made by `WeightCache::new` for the same
/// device and dtype).
pub fn executor_with(
    device: Device,
    graph: &Graph,
    weights: &dyn TensorSource,
    cache: &WeightCache,
    keep_all: bool,
) -> Result<Box<dyn GraphExecutor>> {
    match (device, cache) {
        (Device::Cpu, WeightCache::Cpu(c)) => Ok(Box::new(CpuExecutor::with_cache(
            graph, weights, c, keep_all,
        )?)),
        (Device::Cuda(_) | Device::Emu | Device::EmuAt(_), WeightCache::Cuda(c)) => Ok(Box::new(
            CudaExecutor::with_cache(graph, weights, c, keep_all)?,
        )),
        _ => bail!("a weight cache for another device was passed for --device {device}"),
    }
}

/// The second lane (stream, cuBLASLt workspace) of a CUDA device, once per process and device:
/// the conditioning stages run there so that they can overlap the denoising on the first.
pub fn open_device_lane(device: Device) -> Result<Arc<CudaDevice>> {
    static LANES: OnceLock<std::sync::Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let dev = open_device(device)?;
    let mut lanes = LANES
        .get_or_init(Default::default)
        .lock()
        .expect("lane table");
    if let Some(d) = lanes.get(&dev.ordinal()) {
        return Ok(d.clone());
    }
    let lane = dev
        .lane()
        .with_context(|| format!("--device {device}: a second stream"))?;
    lanes.insert(dev.ordinal(), lane.clone());
    Ok(lane)
}

/// How many devices of `device`'s kind there are: CUDA GPUs, or emulated ones
/// (`OPENUNI_EMU_DEVICES`); 1 for the CPU.
pub fn device_count(device: Device) -> Result<usize> {
    match device {
        Device::Cpu => Ok(1),
        Device::Cuda(_) => Ok(openuni_cuda::device_count()?),
        Device::Emu | Device::EmuAt(_) => {
            load_emulator()?;
            Ok(openuni_cuda::device_count()?)
        }
    }
}

/// Opens a CUDA device (real or emulated), once per process and device.
pub fn open_device(device: Device) -> Result<Arc<CudaDevice>> {
    static OPEN: OnceLock<std::sync::Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let ordinal = match device {
        Device::Cpu => bail!("the CPU is not a CUDA device"),
        Device::Cuda(n) => n,
        Device::Emu | Device::EmuAt(_) => {
            load_emulator()?;
            device.ordinal().unwrap_or(0)
        }
    };
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .expect("device table");
    if let Some(d) = open.get(&ordinal) {
        return Ok(d.clone());
    }
    let dev = CudaDevice::open(ordinal).with_context(|| format!("--device {device}"))?;
    if device.is_emulated() && !dev.is_emulated() {
        bail!("--device emu: the loaded driver is a real GPU's ({}); the emulated one must be loaded before any other", dev.name());
    }
    open.insert(ordinal, dev.clone());
    Ok(dev)
}

/// One node's output on the device against the CPU reference.
pub struct NodeDiff {
    pub node: String,
    pub op: &'static str,
    pub diff: Diff,
}

/// Runs `graph` on the CPU reference and on `device`, keeping every value, and compares every
/// node's output: the first node whose error jumps is where the numerics diverge.
pub fn diff_nodes(
    graph: &Graph,
    weights: &dyn TensorSource,
    inputs: &HashMap<String, HostTensor>,
    device: Device,
    dtype: DType,
) -> Result<Vec<NodeDiff>> {
    // The plain reference ops: the oracle, not the fast CPU path.
    let mut cpu = CpuExecutor::reference(graph, weights, true)?;
    cpu.run(inputs)?;
    let mut dev = executor(device, graph, weights, dtype, true)?;
    dev.run(inputs)
        .with_context(|| format!("running the graph on {device}"))?;
    let mut out = vec![];
    for node in &graph.nodes {
        let reference = GraphExecutor::value(&cpu, node.output)?;
        let got = dev.value(node.output)?;
        out.push(NodeDiff {
            node: node.name.clone(),
            op: node.op.name(),
            diff: diff(&got, &reference),
        });
    }
    Ok(out)
}
