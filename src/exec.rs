//! Running a graph on a chosen device: the one place where `--device` and `--dtype` are turned
//! into an executor, and where two backends are diffed node by node.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_cpu::CpuExecutor;
use openuni_graph::{Graph, ValueId};
use openuni_tensor::{DType, HostTensor, TensorSource};

use crate::compare::{diff, Diff};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => bail!("--device `{s}` is not one of cpu, cuda, cuda:N"),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
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
        Device::Cuda(n) => cuda_executor(n, graph, weights, dtype, keep_all),
    }
}

fn cuda_executor(_n: usize, _g: &Graph, _w: &dyn TensorSource, _d: DType, _k: bool) -> Result<Box<dyn GraphExecutor>> {
    bail!("the CUDA backend is not built into this binary yet")
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
