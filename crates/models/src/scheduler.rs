//! The sampler OpenUni uses through diffusers' SanaPipeline: `DPMSolverMultistepScheduler` with
//! `algorithm_type dpmsolver++, solver_order 2, solver_type midpoint, prediction_type
//! flow_prediction, use_flow_sigmas, final_sigmas_type zero, lower_order_final` (spec/sana_dcae.md
//! §4.3-4.4). All solver math is f32, as diffusers computes it (its coefficients are 0-d f32
//! tensors); the schedule itself is made in f64 and stored as f32.

/// The schedule for `num_steps` steps: `sigmas` has N+1 entries (the last is 0), `timesteps` N
/// integers (σ·1000 truncated; what the transformer sees).
#[derive(Clone, Debug, PartialEq)]
pub struct FlowSchedule {
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<i64>,
}

pub const NUM_TRAIN_TIMESTEPS: usize = 1000;

impl FlowSchedule {
    pub fn new(num_steps: usize, flow_shift: f64) -> Result<FlowSchedule, String> {
        if num_steps == 0 {
            return Err("the number of steps must be at least 1".into());
        }
        if !(flow_shift.is_finite() && flow_shift > 0.0) {
            return Err(format!("flow_shift must be a positive number, found {flow_shift}"));
        }
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
        let timesteps = sigmas.iter().map(|&s| (s * NUM_TRAIN_TIMESTEPS as f64) as i64).collect();
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

/// Multistep DPM-Solver++ (order 2, midpoint) state for one generation.
pub struct DpmSolver {
    pub schedule: FlowSchedule,
    step: usize,
    /// x0 prediction of the previous step (the multistep history).
    prev_x0: Option<Vec<f32>>,
}

impl DpmSolver {
    pub fn new(num_steps: usize, flow_shift: f64) -> Result<DpmSolver, String> {
        Ok(DpmSolver { schedule: FlowSchedule::new(num_steps, flow_shift)?, step: 0, prev_x0: None })
    }

    /// The timestep the model sees at the current step.
    pub fn timestep(&self) -> Option<i64> {
        self.schedule.timesteps.get(self.step).copied()
    }

    /// One step: `velocity` is the (guided) model output for `sample`; `sample` is updated in place.
    pub fn step(&mut self, velocity: &[f32], sample: &mut [f32]) -> Result<(), String> {
        let n = self.schedule.num_steps();
        if self.step >= n {
            return Err(format!("all {n} steps have been taken"));
        }
        if velocity.len() != sample.len() {
            return Err(format!("velocity has {} values, the sample {}", velocity.len(), sample.len()));
        }
        let i = self.step;
        let sig = &self.schedule.sigmas;
        let s0 = sig[i];
        // convert_model_output (flow prediction): x0 = x − σ·v.
        let x0: Vec<f32> = sample.iter().zip(velocity).map(|(&x, &v)| x - s0 * v).collect();
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
        // spec/sana_dcae.md §4.3, read off diffusers.
        let s = FlowSchedule::new(20, 3.0).unwrap();
        assert_eq!(
            s.timesteps,
            [999, 982, 963, 944, 922, 899, 874, 847, 817, 785, 749, 710, 666, 617, 562, 499, 428, 345, 249, 136]
        );
        assert!((s.sigmas[0] - 0.999666).abs() < 1e-6 && (s.sigmas[19] - 0.13624).abs() < 1e-5);
        assert_eq!(s.sigmas.len(), 21);
        assert_eq!(s.sigmas[20], 0.0);
    }

    #[test]
    fn last_step_returns_the_clean_estimate() {
        let mut d = DpmSolver::new(1, 3.0).unwrap();
        let s0 = d.schedule.sigmas[0];
        let mut x = vec![1.0, -2.0];
        let v = [0.5, 0.25];
        d.step(&v, &mut x).unwrap();
        assert!((x[0] - (1.0 - s0 * 0.5)).abs() < 1e-6 && (x[1] - (-2.0 - s0 * 0.25)).abs() < 1e-6);
        assert!(d.step(&v, &mut x).is_err());
    }
}
