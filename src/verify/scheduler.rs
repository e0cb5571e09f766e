//! Case component `scheduler`: case.json {num_steps, flow_shift}; io: sigmas [N+1], timesteps [N]
//! (exact), and the loop `x = step(velocities[i], x)` from x_init -> x_final, mid.samples.

use anyhow::{bail, Context, Result};
use openuni_models::config::MAX_FLOW_SHIFT;
use openuni_models::scheduler::{Sampler, SamplerKind, MAX_STEPS};
use openuni_tensor::{HostData, HostTensor};

use super::{Case, Kind, Options, Produced};

pub fn run(case: &Case, opts: &Options) -> Result<Vec<Produced>> {
    if opts.device != crate::exec::Device::Cpu {
        // The solver is host f32 math on every device (latents stay f32 between steps).
        eprintln!("note: the scheduler runs on the host in f32 whatever --device says");
    }
    let steps = case.int_field("num_steps", 1..=MAX_STEPS as u64)?;
    let shift = case.positive_field("flow_shift", MAX_FLOW_SHIFT)?;
    let kind = match case.json.get("sampler").and_then(|s| s.as_str()) {
        None => SamplerKind::DpmSolver,
        Some(s) => SamplerKind::parse(s).with_context(|| {
            format!(
                "{}: unknown sampler `{s}` (dpmsolver++, flow_euler)",
                case.dir.display()
            )
        })?,
    };
    let mut solver = Sampler::with_kind(kind, steps, shift)
        .map_err(|e| anyhow::anyhow!("{}: {e}", case.dir.display()))?;
    let n = solver.num_steps();
    let x_init = case.tensor("x_init")?;
    let velocities = case.tensor("velocities")?;
    let per = x_init.numel();
    if Some(velocities.numel()) != n.checked_mul(per) {
        bail!(
            "{}: `velocities` has shape {}, expected [{n}, {}]",
            case.dir.display(),
            velocities.shape,
            x_init.shape
        );
    }
    let v = velocities.to_f32_vec();
    let mut x = x_init.to_f32_vec();
    let mut samples = Vec::with_capacity(n * per);
    for i in 0..n {
        solver
            .step(&v[i * per..(i + 1) * per], &mut x)
            .map_err(anyhow::Error::msg)?;
        samples.extend_from_slice(&x);
    }
    // DPM-Solver++ timesteps are integers and must be equal; Euler's are floats.
    let timesteps = match kind {
        SamplerKind::DpmSolver => {
            let ts = solver.timesteps.iter().map(|&t| t as i64).collect();
            Produced {
                reference: "timesteps".into(),
                tensor: HostTensor::new([n], HostData::I64(ts))?,
                decisive: true,
                kind: Kind::Exact,
            }
        }
        SamplerKind::FlowEuler => Produced {
            reference: "timesteps".into(),
            tensor: HostTensor::from_f32([n], solver.timesteps.clone())?,
            decisive: true,
            kind: Kind::Float,
        },
    };
    let mut out = vec![
        timesteps,
        Produced {
            reference: "sigmas".into(),
            tensor: HostTensor::from_f32([n + 1], solver.sigmas.clone())?,
            decisive: true,
            kind: Kind::Float,
        },
        Produced {
            reference: "x_final".into(),
            tensor: HostTensor::from_f32(x_init.shape.clone(), x)?,
            decisive: true,
            kind: Kind::Float,
        },
    ];
    if case.io.contains("mid.samples") {
        let mut shape = vec![n];
        shape.extend_from_slice(x_init.shape.dims());
        out.push(Produced {
            reference: "mid.samples".into(),
            tensor: HostTensor::from_f32(shape, samples)?,
            decisive: false,
            kind: Kind::Float,
        });
    }
    Ok(out)
}
