//! The resident executors: each stage's weights stay on the device once per (device, dtype), and
//! each graph keeps one executor for the last shape it ran, so repeated steps and batches upload
//! and allocate nothing.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_graph::Graph;
use openuni_tensor::DType;

use crate::exec::{executor_with, Device, GraphExecutor, WeightCache};

use super::{OpenUni, RunOptions, StopCheck};

/// What a graph reads its weights from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The LLM with the OpenUni checkpoint's meta-queries, connector and projector.
    Conditioning,
    Transformer,
    Vae,
}

impl Stage {
    /// The stage whose weights the resident graph `name` reads.
    fn of_graph(name: &str) -> Stage {
        match name {
            "conditioning" => Stage::Conditioning,
            "caption" | "step" => Stage::Transformer,
            _ => Stage::Vae,
        }
    }
}

/// An executor kept for reuse: which graph, at which input shape, on which device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ExecKey {
    graph: &'static str,
    dims: Vec<usize>,
    device: Device,
    dtype: DType,
}

/// What stays on the device between calls, so that the batches after the first of a shape
/// upload and allocate nothing: each stage's weights once per (device, dtype), and one executor
/// per graph for the last shape it ran (the step executor with its captured CUDA graph). The LLM
/// graph depends on the prompt lengths: its executor is kept for the last segment lengths
/// conditioned (its "dims"), so batches of the same lengths reuse it.
#[derive(Default)]
pub(super) struct Resident {
    weights: HashMap<(Stage, Device, DType), WeightCache>,
    execs: HashMap<ExecKey, Box<dyn GraphExecutor>>,
}

impl OpenUni {
    /// The resident weights of `stage` on `run`'s device.
    pub(super) fn weight_cache(&self, stage: Stage, run: RunOptions) -> Result<WeightCache> {
        let mut r = self.resident.borrow_mut();
        if let Some(c) = r.weights.get(&(stage, run.device, run.dtype)) {
            return Ok(c.clone());
        }
        if run.device == Device::Cpu && run.dtype != DType::F32 {
            bail!(
                "--device cpu runs the f32 reference only; --dtype {} needs --device cuda",
                run.dtype
            );
        }
        // The conditioning runs on the device's second lane, so that the next batch's can overlap
        // this batch's denoising.
        let c = match stage {
            Stage::Conditioning => WeightCache::on_second_lane(run.device, run.dtype)?,
            _ => WeightCache::new(run.device, run.dtype)?,
        };
        r.weights.insert((stage, run.device, run.dtype), c.clone());
        Ok(c)
    }

    /// Bytes of resident weights (host f32 on the CPU, device memory on a GPU).
    pub fn resident_weight_bytes(&self) -> usize {
        self.resident
            .borrow()
            .weights
            .values()
            .map(|c| c.bytes())
            .sum()
    }

    /// Bytes of the resident executors' activations (arenas, workspaces, staging).
    pub fn resident_activation_bytes(&self) -> usize {
        self.resident
            .borrow()
            .execs
            .values()
            .map(|e| e.activation_bytes())
            .sum()
    }

    /// Runs `f` on the resident executor of graph `name` ("caption", "step", "decoder",
    /// "decoder.global", "decoder.tile") for input dims `dims`; an error if no call has made it yet.
    pub fn resident_executor<R>(
        &self,
        name: &str,
        dims: &[usize],
        run: RunOptions,
        f: impl FnOnce(&mut dyn GraphExecutor) -> Result<R>,
    ) -> Result<R> {
        let mut r = self.resident.borrow_mut();
        let e = r
            .execs
            .iter_mut()
            .find(|(k, _)| {
                k.graph == name && k.dims == dims && k.device == run.device && k.dtype == run.dtype
            })
            .map(|(_, e)| e)
            .with_context(|| {
                format!(
                    "no resident `{name}` executor for {dims:?} on {} {}",
                    run.device, run.dtype
                )
            })?;
        f(e.as_mut())
    }

    /// Sets (or with `None` clears) the check asked before every denoising step: when it says
    /// `true`, `denoise` and `generate_batches` end with [`Stopped`].
    pub fn set_stop_check(&self, check: Option<StopCheck>) {
        *self.stop_check.borrow_mut() = check;
    }

    /// With `true`, [`generate_batches`](Self::generate_batches) releases each stage once the
    /// call no longer needs it ([`release_stage`](Self::release_stage)): it conditions all its
    /// batches first and releases the LLM before the transformer loads, and releases the
    /// transformer (weights and executors) before the last batch's decode, so the peak is the
    /// largest phase, not the sum; the next call loads them again. With `false` (the default,
    /// and what `serve` keeps) every stage stays resident and a batch's conditioning overlaps
    /// the previous denoising.
    pub fn set_release_stages(&self, release: bool) {
        self.release_stages.set(release);
    }

    pub fn releases_stages(&self) -> bool {
        self.release_stages.get()
    }

    /// Drops `stage`'s resident weights (host copies, device buffers), its resident executors
    /// and the mapped pages of its files from this process's memory; its next use loads them again.
    pub fn release_stage(&self, stage: Stage) {
        let mut r = self.resident.borrow_mut();
        r.weights.retain(|(s, _, _), _| *s != stage);
        r.execs.retain(|k, _| Stage::of_graph(k.graph) != stage);
        drop(r);
        self.source(stage).release_pages();
        // Freed host weights below glibc's mmap threshold stay in the heap until trimmed.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Drops every resident executor (their weights stay).
    pub fn release_executors(&self) {
        self.resident.borrow_mut().execs.clear();
    }

    /// A new executor of `graph` reading `stage`'s resident weights.
    pub(super) fn new_executor(
        &self,
        stage: Stage,
        graph: &Graph,
        run: RunOptions,
    ) -> Result<Box<dyn GraphExecutor>> {
        let cache = self.weight_cache(stage, run)?;
        executor_with(
            run.device,
            graph,
            self.source(stage).as_ref(),
            &cache,
            false,
        )
    }

    /// Runs `f` on the resident executor of graph `name` for input dims `dims`, building it with
    /// `build` the first time (and capturing it into a CUDA graph when `capture`).
    pub(super) fn with_executor<R>(
        &self,
        stage: Stage,
        name: &'static str,
        dims: &[usize],
        run: RunOptions,
        capture: bool,
        build: impl FnOnce() -> Result<Graph>,
        f: impl FnOnce(&mut dyn GraphExecutor) -> Result<R>,
    ) -> Result<R> {
        let key = ExecKey {
            graph: name,
            dims: dims.to_vec(),
            device: run.device,
            dtype: run.dtype,
        };
        if !self.resident.borrow().execs.contains_key(&key) {
            // One resident executor per graph: a new shape (a last, smaller batch) replaces the
            // old one, freeing its memory first, so that memory stays bounded by the largest batch.
            self.resident
                .borrow_mut()
                .execs
                .retain(|k, _| k.graph != name);
            let mut e = self.new_executor(stage, &build()?, run)?;
            if capture {
                e.capture()
                    .with_context(|| format!("capturing the {name} graph"))?;
            }
            self.resident.borrow_mut().execs.insert(key.clone(), e);
        }
        let mut r = self.resident.borrow_mut();
        f(r.execs.get_mut(&key).expect("inserted above").as_mut())
    }
}
