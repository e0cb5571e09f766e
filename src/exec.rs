//! Running a graph on a chosen device: the one place where `--device` and `--dtype` are turned
//! into an executor, and where two backends are diffed node by node.

use std::collections::HashMap;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use openuni_cuda::{CudaDevice, CudaExecutor};
use openuni_cpu::CpuExecutor;
use openuni_graph::{Graph, ValueId};
use openuni_tensor::{DType, HostTensor, TensorSource};

use crate::compare::{diff, Diff};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// The emulated GPU (crates/emu): the real CUDA backend and kernels, run on the CPU. It checks
    /// correctness (numerics, launch configurations, barriers, memory bounds), never speed.
    Emu,
}

impl Device {
    /// Parses `cpu`, `cuda`, `cuda:N` or `emu`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            "emu" => Ok(Device::Emu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => bail!("--device `{s}` is not one of cpu, cuda, cuda:N, emu"),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::Emu => write!(f, "emu"),
        }
    }
}

/// The folder of the emulated driver: $OPENUNI_EMU_LIB, else `target/emu/lib` next to the
/// program's own `target/<profile>/` folder, else `./target/emu/lib`.
fn emu_lib_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("OPENUNI_EMU_LIB") {
        return Some(PathBuf::from(d));
    }
    let near_exe = std::env::current_exe().ok().and_then(|e| e.parent()?.parent().map(|t| t.join("emu/lib")));
    [near_exe, Some(PathBuf::from("target/emu/lib"))].into_iter().flatten().find(|d| d.join("libcuda.so.1").is_file())
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

/// What both backends offer: run a graph, and read any value afterwards.
pub trait GraphExecutor {
    fn run(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<HashMap<String, HostTensor>>;
    fn value(&self, id: ValueId) -> Result<HostTensor>;
}

impl GraphExecutor for CudaExecutor {
    fn run(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<HashMap<String, HostTensor>> {
        Ok(CudaExecutor::run(self, inputs)?)
    }
    fn value(&self, id: ValueId) -> Result<HostTensor> {
        Ok(CudaExecutor::value(self, id)?)
    }
}

impl GraphExecutor for CpuExecutor {
    fn run(&mut self, inputs: &HashMap<String, HostTensor>) -> Result<HashMap<String, HostTensor>> {
        Ok(CpuExecutor::run(self, inputs)?)
    }
    fn value(&self, id: ValueId) -> Result<HostTensor> {
        Ok(CpuExecutor::value(self, id)?)
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
    match device {
        Device::Cpu => {
            if dtype != DType::F32 {
                bail!("--device cpu runs the f32 reference only; --dtype {dtype} needs --device cuda");
            }
            Ok(Box::new(CpuExecutor::new(graph, weights, keep_all)?))
        }
        Device::Cuda(_) | Device::Emu => {
            let dev = open_device(device)?;
            Ok(Box::new(CudaExecutor::new(&dev, graph, weights, dtype, keep_all)?))
        }
    }
}

/// Opens a CUDA device (real or emulated), once per process and device.
pub fn open_device(device: Device) -> Result<Arc<CudaDevice>> {
    static OPEN: OnceLock<std::sync::Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let ordinal = match device {
        Device::Cpu => bail!("the CPU is not a CUDA device"),
        Device::Cuda(n) => n,
        Device::Emu => {
            load_emulator()?;
            0
        }
    };
    let mut open = OPEN.get_or_init(Default::default).lock().expect("device table");
    if let Some(d) = open.get(&ordinal) {
        return Ok(d.clone());
    }
    let dev = CudaDevice::open(ordinal).with_context(|| format!("--device {device}"))?;
    if device == Device::Emu && !dev.is_emulated() {
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
    let mut cpu = CpuExecutor::new(graph, weights, true)?;
    cpu.run(inputs)?;
    let mut dev = executor(device, graph, weights, dtype, true)?;
    dev.run(inputs).with_context(|| format!("running the graph on {device}"))?;
    let mut out = vec![];
    for node in &graph.nodes {
        let reference = GraphExecutor::value(&cpu, node.output)?;
        let got = dev.value(node.output)?;
        out.push(NodeDiff { node: node.name.clone(), op: node.op.name(), diff: diff(&got, &reference) });
    }
    Ok(out)
}
