//! `openuni verify`: runs one reference case (spec: tests/fixtures/README.md and the shared case
//! format) on a device and compares every output against the PyTorch result.

mod chat;
mod connector;
mod dit;
mod llm;
mod pipeline;
mod preprocess;
mod scheduler;
mod vae;
mod vit;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use openuni_graph::{Graph, GraphBuilder, ValueId};
use openuni_tensor::{DType, HostTensor, TensorSource, Weights};

use crate::compare::{diff, first_non_finite, Diff};
use crate::exec::{diff_nodes, executor, Device};

/// The f32 rule: CPU f32 against PyTorch f32.
pub const F32_TOL: f64 = 1e-4;
/// The bf16 rule when the case has no PyTorch bf16 run to scale from.
pub const BF16_FALLBACK_TOL: f64 = 2e-2;

/// A reference case folder: `case.json`, `io.safetensors`, and `model/` in the upstream layout.
pub struct Case {
    pub dir: PathBuf,
    pub component: String,
    pub json: serde_json::Value,
    pub io: Weights,
}

impl Case {
    pub fn open(dir: &Path) -> Result<Case> {
        let cj = dir.join("case.json");
        let text = std::fs::read_to_string(&cj)
            .with_context(|| format!("{}: cannot read the case description", cj.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", cj.display()))?;
        let component = json
            .get("component")
            .and_then(|c| c.as_str())
            .with_context(|| format!("{}: no \"component\" string", cj.display()))?
            .to_string();
        let io = Weights::open(dir.join("io.safetensors"))?;
        Ok(Case {
            dir: dir.to_path_buf(),
            component,
            json,
            io,
        })
    }

    /// An io tensor that must be present, hold at least one element and only finite values (an
    /// empty tensor such as [2^40, 0] would drive loops by its dims; a NaN reference would make
    /// every comparison meaningless).
    pub fn tensor(&self, name: &str) -> Result<HostTensor> {
        let shape = self.io.shape(name)?;
        if shape.numel() == 0 {
            bail!("{}: io tensor `{name}` has shape {shape} and no elements; expected a non-empty tensor", self.io.origin().display());
        }
        let t = self.io.get(name)?;
        if let Some((i, v)) = first_non_finite(&t) {
            bail!(
                "{}: io tensor `{name}` holds the non-finite value {v} at flat index {i}; a reference case must be finite",
                self.io.origin().display()
            );
        }
        Ok(t)
    }

    /// An integer field of case.json within `range`, named in the error.
    pub fn int_field(&self, key: &str, range: std::ops::RangeInclusive<u64>) -> Result<usize> {
        let cj = self.dir.join("case.json");
        let v = self
            .json
            .get(key)
            .with_context(|| format!("{}: no `{key}`", cj.display()))?;
        let n = v.as_u64().with_context(|| {
            format!(
                "{}: `{key}` is {v}, expected a non-negative integer",
                cj.display()
            )
        })?;
        if !range.contains(&n) {
            bail!(
                "{}: `{key}` is {n}, expected {} to {}",
                cj.display(),
                range.start(),
                range.end()
            );
        }
        Ok(n as usize)
    }

    /// A finite number field of case.json within `range`, named in the error.
    pub fn num_field(&self, key: &str, range: std::ops::RangeInclusive<f64>) -> Result<f64> {
        let cj = self.dir.join("case.json");
        let v = self
            .json
            .get(key)
            .with_context(|| format!("{}: no `{key}`", cj.display()))?;
        let x = v
            .as_f64()
            .with_context(|| format!("{}: `{key}` is {v}, expected a number", cj.display()))?;
        if !(x.is_finite() && range.contains(&x)) {
            bail!(
                "{}: `{key}` is {x}, expected a finite number from {} to {}",
                cj.display(),
                range.start(),
                range.end()
            );
        }
        Ok(x)
    }

    /// A finite positive number field of case.json, at most `max`.
    pub fn positive_field(&self, key: &str, max: f64) -> Result<f64> {
        let x = self.num_field(key, f64::NEG_INFINITY..=f64::INFINITY)?;
        if !(x > 0.0 && x <= max) {
            bail!(
                "{}: `{key}` is {x}, expected a finite number in (0, {max}]",
                self.dir.join("case.json").display()
            );
        }
        Ok(x)
    }

    pub fn model_dir(&self) -> PathBuf {
        self.dir.join("model")
    }
}

/// A case turned into a graph: what to feed, which weights, and which graph outputs are checked
/// against which io tensors.
pub struct Prepared {
    pub graph: Graph,
    pub weights: Box<dyn TensorSource>,
    pub inputs: HashMap<String, HostTensor>,
    /// Which graph outputs are compared with which io tensors.
    pub checks: Vec<Check>,
}

pub struct Check {
    pub output: String,
    pub reference: String,
    /// Intermediates (`mid.*`) are reported to localise a mismatch but do not decide the verdict.
    pub decisive: bool,
}

impl Check {
    /// Marks `id` as the graph output `name` and checks it against the case's tensor of the same
    /// name: the one place a check's output is named, so the run finds what was marked.
    pub fn mark(b: &mut GraphBuilder, name: &str, id: ValueId, decisive: bool) -> Result<Check> {
        b.output(name, id)?;
        Ok(Check {
            output: name.into(),
            reference: name.into(),
            decisive,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub device: Device,
    pub dtype: DType,
    pub diff_nodes: bool,
}

/// How an output is judged.
#[derive(Clone, Debug)]
pub enum Rule {
    /// Relative L2 error at most `tol` (`source` says where the tolerance comes from).
    RelL2 { tol: f64, source: String },
    /// uint8 pixels: truncation puts values within float error of an integer on either side, so
    /// each may be off by one, and at most `budget` of them may be.
    Pixels { budget: f64 },
}

pub struct Line {
    pub name: String,
    pub diff: Diff,
    pub rule: Rule,
    pub decisive: bool,
}

impl Line {
    pub fn passes(&self) -> bool {
        match &self.rule {
            Rule::RelL2 { tol, .. } => self.diff.passes(*tol),
            Rule::Pixels { budget } => {
                self.diff.non_finite == 0
                    && self.diff.max_abs <= 1.0
                    && self.diff.frac_over_half <= *budget
            }
        }
    }

    fn describe_rule(&self) -> String {
        match &self.rule {
            Rule::RelL2 { tol, source } => format!("tol {tol:.1e} ({source})"),
            Rule::Pixels { budget } => format!(
                "off-by-one in {:.2}% <= {:.1}%",
                100.0 * self.diff.frac_over_half,
                100.0 * budget
            ),
        }
    }
}

pub struct Report {
    pub header: String,
    pub lines: Vec<Line>,
    pub node_diffs: Option<String>,
}

impl Report {
    /// At least one decisive output, and every decisive output passes.
    pub fn passed(&self) -> bool {
        self.lines.iter().any(|l| l.decisive)
            && self.lines.iter().filter(|l| l.decisive).all(|l| l.passes())
    }

    pub fn render(&self) -> String {
        let mut s = format!("{}\n", self.header);
        let w = self
            .lines
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(8)
            .max(8);
        for l in &self.lines {
            let verdict = match (l.decisive, l.passes()) {
                (true, true) => "PASS",
                (true, false) => "FAIL",
                (false, true) => "ok (intermediate)",
                (false, false) => "off (intermediate)",
            };
            let nf = if l.diff.non_finite > 0 {
                format!("  {} non-finite", l.diff.non_finite)
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "  {:w$}  max_abs {:.3e}  rel_l2 {:.3e}  {}  {verdict}{nf}",
                l.name,
                l.diff.max_abs,
                l.diff.rel_l2,
                l.describe_rule()
            );
        }
        if let Some(n) = &self.node_diffs {
            s.push_str(n);
        }
        let decisive = self.lines.iter().filter(|l| l.decisive).count();
        let failed = self
            .lines
            .iter()
            .filter(|l| l.decisive && !l.passes())
            .count();
        let _ = writeln!(
            s,
            "result: {} ({} of {decisive} outputs failed)",
            if self.passed() { "PASS" } else { "FAIL" },
            failed
        );
        s
    }
}

/// What a component produced for one io tensor of the case.
pub struct Produced {
    pub reference: String,
    pub tensor: HostTensor,
    /// Intermediates (`mid.*`) are reported to localise a mismatch but do not decide the verdict.
    pub decisive: bool,
    pub kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Floating-point values: the f32 or bf16 rule.
    Float,
    /// Integer results (token ids, timesteps): equal, not close.
    Exact,
    /// uint8 pixels from a truncating cast.
    Pixels,
}

/// The share of pixels allowed to be off by one in f32 (values within float error of an integer
/// before truncation; the cases show about 0.2 %).
pub const PIXEL_BUDGET: f64 = 0.01;

/// Runs the case's component; node diffs are returned when asked for and the component is a graph.
fn run_component(case: &Case, opts: &Options) -> Result<(Vec<Produced>, Option<String>)> {
    match case.component.as_str() {
        "connector" => run_graph(case, connector::prepare(case)?, opts),
        "scheduler" => Ok((scheduler::run(case, opts)?, None)),
        "dit" => run_graph(case, dit::prepare(case)?, opts),
        "llm" => run_graph(case, llm::prepare(case)?, opts),
        "vae" => run_graph(case, vae::prepare(case)?, opts),
        "pipeline" => Ok((pipeline::run(case, opts)?, None)),
        "preprocess" => Ok((preprocess::run(case, opts)?, None)),
        "vit" => run_graph(case, vit::prepare(case)?, opts),
        "chat" => Ok((chat::run(case, opts)?, None)),
        other => bail!(
            "{}: unknown component `{other}` (expected one of connector, llm, dit, vae, scheduler, pipeline, preprocess, vit, chat)",
            case.dir.display()
        ),
    }
}

/// Runs a graph-built component on the chosen device and collects its checked outputs.
fn run_graph(case: &Case, p: Prepared, opts: &Options) -> Result<(Vec<Produced>, Option<String>)> {
    if opts.device == Device::Cpu {
        // The io shapes decide the activations: refuse a case that cannot fit before the arena
        // is allocated (an error, not an allocation abort).
        let need = openuni_graph::plan(&p.graph, false)
            .arena_elems
            .saturating_mul(4) as u64;
        if let Some(avail) = openuni_tensor::mem_available().filter(|&a| need > a) {
            bail!(
                "{}: running {} needs {need} bytes of activations for the case's input shapes, more than the {avail} bytes available (MemAvailable)",
                case.dir.display(),
                case.component
            );
        }
    }
    let mut exec = executor(opts.device, &p.graph, p.weights.as_ref(), opts.dtype, false)?;
    let mut outputs = exec
        .run(&p.inputs)
        .with_context(|| format!("running {} on {}", case.component, opts.device))?;
    let produced = p
        .checks
        .iter()
        .map(|c| {
            let tensor = outputs.remove(&c.output).with_context(|| {
                format!(
                    "{}: the graph has no output `{}` to check",
                    case.dir.display(),
                    c.output
                )
            })?;
            Ok(Produced {
                reference: c.reference.clone(),
                tensor,
                decisive: c.decisive,
                kind: Kind::Float,
            })
        })
        .collect::<Result<_>>()?;
    let node_diffs = if opts.diff_nodes {
        let rows = diff_nodes(
            &p.graph,
            p.weights.as_ref(),
            &p.inputs,
            opts.device,
            opts.dtype,
        )?;
        let w = rows.iter().map(|r| r.node.len()).max().unwrap_or(4);
        let mut s = format!(
            "node diffs ({} against the cpu f32 reference):\n",
            opts.device
        );
        for r in rows {
            let _ = writeln!(
                s,
                "  {:w$}  {:10}  max_abs {:.3e}  rel_l2 {:.3e}",
                r.node, r.op, r.diff.max_abs, r.diff.rel_l2
            );
        }
        Some(s)
    } else {
        None
    };
    Ok((produced, node_diffs))
}

/// The tolerance for one output: f32 -> 1e-4; bf16 -> twice the error of PyTorch's own bf16 run
/// of the same computation (`bf16.<name>` in io.safetensors), or 2e-2 when the case has none.
fn tolerance(case: &Case, reference: &str, expected: &HostTensor, dtype: DType) -> Result<Rule> {
    if dtype == DType::F32 {
        return Ok(Rule::RelL2 {
            tol: F32_TOL,
            source: "f32".into(),
        });
    }
    let key = format!("bf16.{reference}");
    if case.io.contains(&key) {
        let torch_bf16 = case.tensor(&key)?;
        let e = diff(&torch_bf16, expected).rel_l2;
        if !e.is_finite() {
            bail!(
                "{}: `{key}` gives a non-finite bf16 tolerance ({e})",
                case.dir.display()
            );
        }
        Ok(Rule::RelL2 {
            tol: 2.0 * e,
            source: format!("2x torch bf16 {e:.1e}"),
        })
    } else {
        Ok(Rule::RelL2 {
            tol: BF16_FALLBACK_TOL,
            source: "bf16 default".into(),
        })
    }
}

pub fn run_case(dir: &Path, opts: &Options) -> Result<Report> {
    let case = Case::open(dir)?;
    let (produced, node_diffs) = run_component(&case, opts)?;
    let mut lines = vec![];
    for p in produced {
        let expected = case.tensor(&p.reference)?;
        if p.tensor.shape != expected.shape {
            bail!(
                "{}: output `{}` has shape {}, the reference has {}",
                dir.display(),
                p.reference,
                p.tensor.shape,
                expected.shape
            );
        }
        let rule = match p.kind {
            Kind::Exact => Rule::RelL2 {
                tol: 0.0,
                source: "exact".into(),
            },
            Kind::Pixels if opts.dtype == DType::F32 => Rule::Pixels {
                budget: PIXEL_BUDGET,
            },
            Kind::Float | Kind::Pixels => tolerance(&case, &p.reference, &expected, opts.dtype)?,
        };
        lines.push(Line {
            name: p.reference,
            diff: diff(&p.tensor, &expected),
            rule,
            decisive: p.decisive,
        });
    }
    if !lines.iter().any(|l| l.decisive) {
        // A case that checks nothing must not read as a PASS.
        bail!(
            "{}: the case has no decisive output to compare (io.safetensors holds none of the references this component checks)",
            dir.display()
        );
    }
    let header = format!(
        "case {}: component {}, device {}, dtype {}",
        dir.display(),
        case.component,
        opts.device,
        opts.dtype
    );
    Ok(Report {
        header,
        lines,
        node_diffs,
    })
}
