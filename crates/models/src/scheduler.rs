//! The samplers: OpenUni's default through diffusers' SanaPipeline, `DPMSolverMultistepScheduler`
//! with `algorithm_type dpmsolver++, solver_order 2, solver_type midpoint, prediction_type
//! flow_prediction, use_flow_sigmas, final_sigmas_type zero, lower_order_final` (docs/models.md,
//! "Sampling"), and flow Euler (`FlowMatchEulerDiscreteScheduler(shift)`). All solver math is f32,
//! as diffusers computes it (its coefficients are 0-d f32 tensors); schedules are made in f64
//! where diffusers uses numpy and stored as f32.

use openuni_graph::{coeff, Graph, GraphBuilder, OutputName, SAMPLER_COEFFS};

/// The device sampler's graphs (f32 storage on every device; `elems` = the latents' element
/// count N·C·h·w, viewed flat [1, elems] so that [`MODEL_INPUT`] is one concatenation):
/// [`sampler_graph`] takes one step from the transformer's output, [`sampler_prime_graph`] puts
/// the initial noise where the step reads it. Inputs:
pub const VELOCITY: &str = "velocity";
pub const SAMPLE: &str = "sample";
pub const PREV_X0: &str = "prev_x0";
pub const COEFFS: &str = "coeffs";
pub const NOISE: &str = "noise";
/// [N, seed::LIMBS]: each image's noise seed ([`sampler_seeded_prime_graph`]).
pub const SEEDS: &str = "seeds";
/// The latents after the step [1, elems] (the next step's [`SAMPLE`]).
pub const LATENTS: OutputName = OutputName("latents");
/// The step's clean estimate [1, elems] (the next step's [`PREV_X0`]).
pub const X0: OutputName = OutputName("x0");
/// The latents twice [1, 2·elems]: the transformer's [uncond; cond] input of the next step.
pub const MODEL_INPUT: OutputName = OutputName("model_input");
/// [1]: whether the transformer's output (the [`VELOCITY`] input) holds a NaN or an infinity.
pub const VELOCITY_NONFINITE: OutputName = OutputName("velocity.nonfinite");

/// One sampler step on the device: `Op::GuidedX0` (guidance and clean estimate), then
/// `Op::DpmSolverUpdate`, with the step's [`Sampler::coefficients`] as the [`COEFFS`] input.
pub fn sampler_graph(elems: usize) -> crate::Result<Graph> {
    let mut b = GraphBuilder::new();
    let v = b.input(VELOCITY, [1, 2 * elems])?;
    let x = b.input(SAMPLE, [1, elems])?;
    let p = b.input(PREV_X0, [1, elems])?;
    let k = b.input(COEFFS, [SAMPLER_COEFFS])?;
    let x0 = b.guided_x0("sampler.x0", v, x, k)?;
    let next = b.dpm_solver_update("sampler.latents", x, x0, p, k)?;
    let both = b.concat("sampler.model_input", &[next, next])?;
    let bad = b.any_nonfinite("sampler.velocity_nonfinite", v)?;
    b.mark(X0, x0)?;
    b.mark(LATENTS, next)?;
    b.mark(MODEL_INPUT, both)?;
    b.mark(VELOCITY_NONFINITE, bad)?;
    Ok(b.finish())
}

/// The noise [`NOISE`] [1, elems] as the first step's [`LATENTS`] (and [`X0`], which the first,
/// first-order step does not read) and [`MODEL_INPUT`]: the one upload of a batch's latents.
pub fn sampler_prime_graph(elems: usize) -> crate::Result<Graph> {
    let mut b = GraphBuilder::new();
    let z = b.input(NOISE, [1, elems])?;
    let copy = b.concat("sampler.noise", &[z])?;
    let both = b.concat("sampler.model_input", &[z, z])?;
    b.mark(LATENTS, copy)?;
    b.mark(X0, copy)?;
    b.mark(MODEL_INPUT, both)?;
    Ok(b.finish())
}

/// [`sampler_prime_graph`] with the noise drawn where the graph runs (`Op::GaussianNoise`): image
/// i's `per_image` values from seed i of the [`SEEDS`] input, so a batch's noise never crosses
/// from the host (16 bytes of seed an image do).
pub fn sampler_seeded_prime_graph(n: usize, per_image: usize) -> crate::Result<Graph> {
    let mut b = GraphBuilder::new();
    let seeds = b.input(SEEDS, [n, openuni_graph::seed::LIMBS])?;
    let z = b.gaussian_noise("sampler.noise", seeds, per_image)?;
    let both = b.concat("sampler.model_input", &[z, z])?;
    b.mark(LATENTS, z)?;
    b.mark(X0, z)?;
    b.mark(MODEL_INPUT, both)?;
    Ok(b.finish())
}

/// The schedule for `num_steps` steps: `sigmas` has N+1 entries (the last is 0), `timesteps` N
/// integers (σ·1000 truncated; what the transformer sees).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSchedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<i64>,
}

pub const NUM_TRAIN_TIMESTEPS: usize = 1000;

/// The most sampling steps a schedule is made for (beyond the 1000 training timesteps they only
/// repeat; the bound keeps a typo like 2^62 an error instead of an allocation abort).
pub const MAX_STEPS: usize = 10_000;

/// Refuses step counts and shifts no schedule can be made from.
fn check_schedule(num_steps: usize, flow_shift: f64) -> Result<(), String> {
    if !(1..=MAX_STEPS).contains(&num_steps) {
        return Err(format!(
            "the number of steps is {num_steps}, expected 1 to {MAX_STEPS}"
        ));
    }
    if !(flow_shift.is_finite() && flow_shift > 0.0 && flow_shift <= crate::config::MAX_FLOW_SHIFT)
    {
        return Err(format!(
            "flow_shift must be a positive number up to {}, found {flow_shift}",
            crate::config::MAX_FLOW_SHIFT
        ));
    }
    Ok(())
}

impl FlowSchedule {
    pub fn new(num_steps: usize, flow_shift: f64) -> Result<FlowSchedule, String> {
        check_schedule(num_steps, flow_shift)?;
        let n = num_steps;
        let t_min = 1.0 / NUM_TRAIN_TIMESTEPS as f64;
        // alphas = linspace(1, 1/1000, N+1); s = 1 - alphas; shifted, reversed, last (0) dropped.
        let mut sigmas: Vec<f64> = (0..=n)
            .map(|i| {
                let alpha = 1.0 + (t_min - 1.0) * i as f64 / n as f64;
                let s = 1.0 - alpha;
                flow_shift * s / (1.0 + (flow_shift - 1.0) * s)
            })
            .collect();
        sigmas.reverse();
        sigmas.pop();
        let timesteps = sigmas
            .iter()
            .map(|&s| (s * NUM_TRAIN_TIMESTEPS as f64) as i64)
            .collect();
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(FlowSchedule { sigmas, timesteps })
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }
}

/// λ(σ) = ln(1 − σ) − ln σ, in f32 like diffusers (+∞ at σ = 0).
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

/// Which sampler runs the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// DPM-Solver++ 2M (midpoint) with flow sigmas: OpenUni's default.
    DpmSolver,
    /// Flow-matching Euler: `x += (σ_{i+1} − σ_i)·v`.
    FlowEuler,
}

impl SamplerKind {
    pub fn parse(s: &str) -> Option<SamplerKind> {
        match s {
            "dpm-solver" | "dpmsolver++" | "flow_dpm_solver" => Some(SamplerKind::DpmSolver),
            "euler" | "flow_euler" => Some(SamplerKind::FlowEuler),
            _ => None,
        }
    }
}

/// diffusers `FlowMatchEulerDiscreteScheduler(shift).set_timesteps(N)`: N+1 sigmas (last 0) and N
/// float timesteps σ·1000. diffusers shifts twice (once for σ_min/σ_max at construction, again in
/// set_timesteps); that is reproduced here, since it is what users of the scheduler get.
pub fn flow_euler_schedule(num_steps: usize, shift: f64) -> Result<(Vec<f32>, Vec<f32>), String> {
    check_schedule(num_steps, shift)?;
    let n_train = NUM_TRAIN_TIMESTEPS as f64;
    // Construction (f32 tensors): the shifted training sigmas' extremes.
    let shift32 = |s: f32| (shift as f32) * s / (1.0 + (shift as f32 - 1.0) * s);
    let (sigma_max, sigma_min) = (shift32(1.0) as f64, shift32((1.0 / n_train) as f32) as f64);
    // set_timesteps (numpy f64): linspace over σ·1000, back to σ, shifted again.
    let shift64 = |s: f64| shift * s / (1.0 + (shift - 1.0) * s);
    let sigmas: Vec<f32> = (0..num_steps)
        .map(|i| {
            let t = if num_steps == 1 {
                sigma_max * n_train
            } else {
                sigma_max * n_train
                    + (sigma_min - sigma_max) * n_train * i as f64 / (num_steps - 1) as f64
            };
            shift64(t / n_train) as f32
        })
        .collect();
    let timesteps = sigmas
        .iter()
        .map(|&s| s * NUM_TRAIN_TIMESTEPS as f32)
        .collect();
    let mut sigmas = sigmas;
    sigmas.push(0.0);
    Ok((sigmas, timesteps))
}

/// The sampling state of one generation: the schedule, the step counter and, for DPM-Solver++,
/// the previous step's x0 prediction (the multistep history).
pub struct Sampler {
    pub kind: SamplerKind,
    /// N+1 noise levels; the last is 0.
    pub sigmas: Vec<f32>,
    /// The N timesteps the transformer sees (integers for DPM-Solver++, floats for Euler).
    pub timesteps: Vec<f32>,
    step: usize,
    prev_x0: Option<Vec<f32>>,
    /// Steps taken on the device ([`advance`](Self::advance)), whose history lies there.
    device_steps: usize,
}

/// The DPM-Solver++ sampler by its historical name.
pub type DpmSolver = Sampler;

impl Sampler {
    /// OpenUni's default sampler (DPM-Solver++ 2M, flow sigmas).
    pub fn new(num_steps: usize, flow_shift: f64) -> Result<Sampler, String> {
        Sampler::with_kind(SamplerKind::DpmSolver, num_steps, flow_shift)
    }

    pub fn with_kind(
        kind: SamplerKind,
        num_steps: usize,
        flow_shift: f64,
    ) -> Result<Sampler, String> {
        let (sigmas, timesteps) = match kind {
            SamplerKind::DpmSolver => {
                let s = FlowSchedule::new(num_steps, flow_shift)?;
                (s.sigmas, s.timesteps.iter().map(|&t| t as f32).collect())
            }
            SamplerKind::FlowEuler => flow_euler_schedule(num_steps, flow_shift)?,
        };
        Ok(Sampler {
            kind,
            sigmas,
            timesteps,
            step: 0,
            prev_x0: None,
            device_steps: 0,
        })
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// The timestep the model sees at the current step; `None` when done.
    pub fn timestep(&self) -> Option<f32> {
        self.timesteps.get(self.step).copied()
    }

    /// Keeps only the rows `keep` (each `row_len` values, in that order) of the multistep
    /// history, for a batch whose other images left: the step is elementwise, so the rows kept
    /// go on exactly as they would in the whole batch.
    pub fn keep_rows(&mut self, row_len: usize, keep: &[usize]) {
        if let Some(h) = self.prev_x0.as_mut() {
            *h = keep
                .iter()
                .flat_map(|&r| h[r * row_len..(r + 1) * row_len].iter().copied())
                .collect();
        }
    }

    /// The current step's coefficients as the `coeffs` input of `Op::GuidedX0` and
    /// `Op::DpmSolverUpdate` (layout `openuni_graph::coeff`), f32 as [`step`](Self::step) computes
    /// them; the device sampler runs the step with them, then [`advance`](Self::advance)s.
    pub fn coefficients(&self, guidance: f32) -> Result<[f32; SAMPLER_COEFFS], String> {
        let n = self.num_steps();
        let i = self.step;
        if i >= n {
            return Err(format!("all {n} steps have been taken"));
        }
        let sig = &self.sigmas;
        let mut k = [0f32; SAMPLER_COEFFS];
        k[coeff::GUIDANCE] = guidance;
        if self.kind == SamplerKind::FlowEuler {
            // x + Δt·v as x − (−Δt)·v: the same f32 result (negation is exact).
            k[coeff::SIGMA] = -(sig[i + 1] - sig[i]);
            return Ok(k);
        }
        let s0 = sig[i];
        let t = sig[i + 1];
        let h = lambda(t) - lambda(s0);
        let c = (1.0 - t) * ((-h).exp() - 1.0);
        k[coeff::SIGMA] = s0;
        k[coeff::RATIO] = t / s0;
        k[coeff::C] = c;
        k[coeff::HALF_C] = 0.5 * c;
        // First order at the first step and at the last (final σ = 0 gives exactly x0).
        let first_order = i == 0 || i == n - 1 || !self.has_history();
        k[coeff::ORDER] = if first_order { 1.0 } else { 2.0 };
        if !first_order {
            let h0 = lambda(s0) - lambda(sig[i - 1]);
            k[coeff::INV_R0] = 1.0 / (h0 / h);
        }
        Ok(k)
    }

    /// Whether the multistep history holds the previous step's estimate (DPM-Solver++ after a
    /// step; on the device the sampler keeps it, so this counts the steps taken).
    fn has_history(&self) -> bool {
        self.prev_x0.is_some() || self.device_steps > 0
    }

    /// Moves to the next step after the device took this one with [`coefficients`](Self::coefficients).
    pub fn advance(&mut self) {
        self.step += 1;
        self.device_steps += 1;
    }

    /// One step: `velocity` is the (guided) model output for `sample`; `sample` is updated in place.
    pub fn step(&mut self, velocity: &[f32], sample: &mut [f32]) -> Result<(), String> {
        let n = self.num_steps();
        if self.step >= n {
            return Err(format!("all {n} steps have been taken"));
        }
        if velocity.len() != sample.len() {
            return Err(format!(
                "velocity has {} values, the sample {}",
                velocity.len(),
                sample.len()
            ));
        }
        let i = self.step;
        let sig = &self.sigmas;
        if self.kind == SamplerKind::FlowEuler {
            let dt = sig[i + 1] - sig[i];
            for (x, &v) in sample.iter_mut().zip(velocity) {
                *x += dt * v;
            }
            self.step += 1;
            return Ok(());
        }
        let s0 = sig[i];
        // convert_model_output (flow prediction): x0 = x − σ·v.
        let x0: Vec<f32> = sample
            .iter()
            .zip(velocity)
            .map(|(&x, &v)| x - s0 * v)
            .collect();
        let t = sig[i + 1];
        let (alpha_t, sigma_t) = (1.0 - t, t);
        let h = lambda(t) - lambda(s0);
        let em1 = (-h).exp() - 1.0;
        let ratio = sigma_t / s0;
        // First order at the first step and at the last (final σ = 0 gives exactly x0).
        let first_order = i == 0 || i == n - 1 || self.prev_x0.is_none();
        if first_order {
            let c = alpha_t * em1;
            for (x, &d0) in sample.iter_mut().zip(&x0) {
                *x = ratio * *x - c * d0;
            }
        } else {
            let m1 = self.prev_x0.as_ref().expect("history present after step 0");
            let s1 = sig[i - 1];
            let h0 = lambda(s0) - lambda(s1);
            let r0 = h0 / h;
            let c = alpha_t * em1;
            for ((x, &d0), &p) in sample.iter_mut().zip(&x0).zip(m1) {
                let d1 = (1.0 / r0) * (d0 - p);
                *x = ratio * *x - c * d0 - 0.5 * c * d1;
            }
        }
        self.prev_x0 = Some(x0);
        self.step += 1;
        Ok(())
    }
}

/// Classifier-free guidance in f32: `v = v_u + g·(v_c − v_u)`, batch ordered [uncond, cond].
pub fn guide(uncond: &[f32], cond: &[f32], guidance: f32, out: &mut [f32]) {
    for ((o, &u), &c) in out.iter_mut().zip(uncond).zip(cond) {
        *o = u + guidance * (c - u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_20_steps_shift_3_matches_the_published_table() {
        // docs/models.md ("Sampling"), read off diffusers.
        let s = FlowSchedule::new(20, 3.0).unwrap();
        assert_eq!(
            s.timesteps,
            [
                999, 982, 963, 944, 922, 899, 874, 847, 817, 785, 749, 710, 666, 617, 562, 499,
                428, 345, 249, 136
            ]
        );
        assert!((s.sigmas[0] - 0.999666).abs() < 1e-6 && (s.sigmas[19] - 0.13624).abs() < 1e-5);
        assert_eq!(s.sigmas.len(), 21);
        assert_eq!(s.sigmas[20], 0.0);
    }

    #[test]
    fn euler_schedule_matches_the_published_start() {
        // docs/models.md ("Sampling"): flow Euler's timesteps are σ·1000 as floats (1000.0, 981.875, ...).
        let (s, t) = flow_euler_schedule(20, 3.0).unwrap();
        assert_eq!(t[0], 1000.0);
        assert!((t[1] - 981.875).abs() < 0.01, "{}", t[1]);
        assert_eq!((s.len(), s[20]), (21, 0.0));
    }

    /// The device sampler's CPU twins (`guided_x0`, `dpm_solver_update`) with [`Sampler::coefficients`]
    /// equal the host's `guide` + [`Sampler::step`] bit for bit, over every step of both samplers.
    #[test]
    fn device_sampler_ops_equal_the_host_solver_bit_for_bit() {
        use openuni_cpu::ops::{dpm_solver_update, guided_x0};
        let n = 37;
        let mut seed = 1u32;
        let mut rnd = move || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
        };
        for kind in [SamplerKind::DpmSolver, SamplerKind::FlowEuler] {
            for steps in [1, 2, 20] {
                let (mut host, mut dev) = (
                    Sampler::with_kind(kind, steps, 3.0).unwrap(),
                    Sampler::with_kind(kind, steps, 3.0).unwrap(),
                );
                let mut x_host: Vec<f32> = (0..n).map(|_| rnd()).collect();
                let (mut x_dev, mut prev) = (x_host.clone(), vec![0f32; n]);
                let g = 4.5;
                for _ in 0..steps {
                    let v: Vec<f32> = (0..2 * n).map(|_| rnd()).collect();
                    let mut guided = vec![0f32; n];
                    guide(&v[..n], &v[n..], g, &mut guided);
                    host.step(&guided, &mut x_host).unwrap();
                    let k = dev.coefficients(g).unwrap();
                    let (mut x0, mut next) = (vec![0f32; n], vec![0f32; n]);
                    guided_x0(&v, &x_dev, &k, &mut x0);
                    dpm_solver_update(&x_dev, &x0, &prev, &k, &mut next);
                    dev.advance();
                    (x_dev, prev) = (next, x0);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&x_dev), bits(&x_host), "{kind:?} {steps} steps");
                }
                assert!(dev.coefficients(g).is_err());
            }
        }
    }

    #[test]
    fn last_step_returns_the_clean_estimate() {
        let mut d = DpmSolver::new(1, 3.0).unwrap();
        let s0 = d.sigmas[0];
        let mut x = vec![1.0, -2.0];
        let v = [0.5, 0.25];
        d.step(&v, &mut x).unwrap();
        assert!((x[0] - (1.0 - s0 * 0.5)).abs() < 1e-6 && (x[1] - (-2.0 - s0 * 0.25)).abs() < 1e-6);
        assert!(d.step(&v, &mut x).is_err());
    }
}
