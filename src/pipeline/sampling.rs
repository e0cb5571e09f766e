//! The sampling loop: conditioning (LLM with meta-queries, connector, projector), the caption
//! path's K/V, the denoising steps with classifier-free guidance, and the checks that no stage
//! passed on a non-finite value.

use openuni_models::openuni::{self as head, segments, CONNECTOR, HIDDEN, PROMPT_EMBEDS};
use openuni_models::sana;
use openuni_models::scheduler::{self, Sampler, SamplerKind};
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_graph::{Graph, GraphBuilder};
use openuni_tensor::{DType, HostTensor, Shape};

use crate::exec::{Device, GraphExecutor, TensorHandle};

use super::resident::Stage;
use super::{
    Conditioning, GenerationBatch, LatentNoise, OpenUni, PendingConditioning, RunOptions,
    SamplingParams, StepRecord,
};

/// A check asked before every denoising step of batch `i` (the index in a
/// [`generate_batches`](OpenUni::generate_batches) call; 0 for [`denoise`](OpenUni::denoise)):
/// one flag per image of that batch, in its order, `true` while the image is still wanted. An
/// image no longer wanted leaves the batch at that step (its latent rows and its uncond and cond
/// caption K/V rows are dropped; the rest go on at the smaller batch); when none is wanted the
/// batch ends with [`Stopped`].
pub type StopCheck = Box<dyn Fn(usize) -> Vec<bool>>;

/// The error of a batch ended by its [`StopCheck`] (e.g. every client of a served batch left).
#[derive(Debug)]
pub struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "generation stopped before its last step: nobody waits for it"
        )
    }
}

impl std::error::Error for Stopped {}

impl OpenUni {
    /// Prompt ids (cond, uncond) -> prompt embeddings [2, Q, caption_channels], [uncond, cond].
    pub fn condition(
        &self,
        ids_cond: &[u32],
        ids_uncond: &[u32],
        run: RunOptions,
    ) -> Result<Conditioning> {
        self.condition_batch(&[(ids_cond, ids_uncond)], run)
    }

    /// N prompts' ids (cond, uncond) -> prompt embeddings [2N, Q, caption_channels] in the
    /// order [uncond_0..N-1, cond_0..N-1].
    pub fn condition_batch(
        &self,
        prompts: &[(&[u32], &[u32])],
        run: RunOptions,
    ) -> Result<Conditioning> {
        let pending = self.start_conditioning(prompts, run)?;
        let mut c = self.finish_conditioning(pending)?;
        // A caller holding the result must not hold the conditioning's device memory with it.
        c.prompt_embeds_on_device = TensorHandle::Host(c.prompt_embeds.clone());
        Ok(c)
    }

    /// Starts the conditioning of N prompts (`conditioning_graph` on their packed sequences). On a
    /// GPU it is enqueued on the device's second lane and this returns before it has run, so the
    /// caller can denoise another batch meanwhile; [`finish_conditioning`](Self::finish_conditioning)
    /// waits for it.
    pub fn start_conditioning(
        &self,
        prompts: &[(&[u32], &[u32])],
        run: RunOptions,
    ) -> Result<PendingConditioning> {
        let n = prompts.len();
        if n == 0 {
            bail!("no prompts to condition on");
        }
        let segments = segments(prompts, self.num_queries);
        let total: usize = segments.iter().sum();
        // Only the token ids cross to the device (4 B a token); refused here if outside the vocabulary.
        let ids = self.head().input_ids(prompts)?;
        // The graph depends on the prompts' lengths: its executor stays resident for those lengths
        // (keyed by the segments), so a batch of the lengths before uploads only its ids (no
        // constant tables, nothing allocated); other lengths replace it.
        let input = HashMap::from([(
            head::INPUT_IDS.to_string(),
            HostTensor::from_f32([1, total], ids)?,
        )]);
        self.with_executor(
            Stage::Conditioning,
            "conditioning",
            &segments,
            run,
            false,
            || self.conditioning_graph(&segments),
            |e| {
                e.set_inputs(&input)?;
                e.execute()
            },
        )?;
        Ok(PendingConditioning { segments, run, n })
    }

    /// Runs `f` on a new conditioning executor of `prompts` with its input ids set, not yet run
    /// (`openuni bench --profile` times its nodes).
    pub fn with_conditioning_executor<R>(
        &self,
        prompts: &[(&[u32], &[u32])],
        run: RunOptions,
        f: impl FnOnce(&mut dyn GraphExecutor) -> Result<R>,
    ) -> Result<R> {
        let segments = segments(prompts, self.num_queries);
        let total: usize = segments.iter().sum();
        let ids = self.head().input_ids(prompts)?;
        let mut exec = self.new_executor(
            Stage::Conditioning,
            &self.conditioning_graph(&segments)?,
            run,
        )?;
        exec.set_inputs(&HashMap::from([(
            head::INPUT_IDS.to_string(),
            HostTensor::from_f32([1, total], ids)?,
        )]))?;
        f(exec.as_mut())
    }

    /// Waits for a conditioning started by [`start_conditioning`](Self::start_conditioning).
    pub fn finish_conditioning(&self, p: PendingConditioning) -> Result<Conditioning> {
        let (n, q, d) = (p.n, self.num_queries, self.llm_cfg.hidden_size);
        let (mut out, mut handles) =
            self.resident_executor("conditioning", &p.segments, p.run, |e| {
                Ok((e.outputs()?, e.output_handles()?))
            })?;
        let hidden = HIDDEN.take(&mut out)?.to_f32_vec();
        let half = n * q * d;
        let prompt_embeds_on_device = PROMPT_EMBEDS.take(&mut handles)?;
        Ok(Conditioning {
            prompt_embeds_on_device,
            prompt_embeds: PROMPT_EMBEDS.take(&mut out)?,
            connector: CONNECTOR.take(&mut out)?,
            hidden_uncond: HostTensor::from_f32([n, q, d], hidden[..half].to_vec())?,
            hidden_cond: HostTensor::from_f32([n, q, d], hidden[half..].to_vec())?,
        })
    }

    /// The conditioning as `generate` runs it: the prompt embeddings [2N, Q, C] left where the
    /// conditioning wrote them (on a GPU the device), each stage's output checked for non-finite
    /// values by a device flag, nothing else read back (`openuni bench` times this).
    pub fn condition_batch_on_device(
        &self,
        prompts: &[(&[u32], &[u32])],
        run: RunOptions,
    ) -> Result<TensorHandle> {
        let pending = self.start_conditioning(prompts, run)?;
        self.finish_conditioning_on_device(pending, 0)
    }

    /// Waits for a conditioning started by [`start_conditioning`](Self::start_conditioning) and
    /// checks each stage's output on the device (one flag each, [`check_finite_flag`]): the prompt
    /// embeddings where the conditioning left them, nothing else read back.
    fn finish_conditioning_on_device(
        &self,
        p: PendingConditioning,
        batch: usize,
    ) -> Result<TensorHandle> {
        let mut h =
            self.resident_executor("conditioning", &p.segments, p.run, |e| e.output_handles())?;
        for (out, stage) in [
            (HIDDEN, "conditioning: the LLM's query states"),
            (CONNECTOR, "conditioning: the connector output"),
            (
                PROMPT_EMBEDS,
                "conditioning: the projector output (prompt embeddings)",
            ),
        ] {
            check_finite_flag(&h, out.0, stage, batch)?;
        }
        Ok(PROMPT_EMBEDS.take(&mut h)?)
    }

    /// The caption path for `prompt_embeds`: every block's cross-attention K/V, left on the
    /// device (a GPU) for the step executor's inputs.
    pub(super) fn cross_kv(
        &self,
        prompt_embeds: TensorHandle,
        run: RunOptions,
    ) -> Result<HashMap<String, TensorHandle>> {
        let shape = prompt_embeds.shape().clone();
        let inputs = HashMap::from([(sana::ENCODER_HIDDEN_STATES.to_string(), prompt_embeds)]);
        self.with_executor(
            Stage::Transformer,
            "caption",
            shape.dims(),
            run,
            false,
            || self.caption_graph(&shape),
            |e| {
                e.set_input_handles(&inputs)?;
                e.execute()?;
                e.output_handles()
            },
        )
    }

    /// Generates `batches` one after another: the conditioning of batch i + 1 is started (on the
    /// device's second lane) before batch i is denoised, so on a GPU the two overlap. Each batch's
    /// images, uint8 pixels [N, H, W, 3] (quantized on the device), go to `done(batch index, images)`; `on_step(N)` after each step.
    /// With a [`StopCheck`] that drops images, use [`generate_batches_rows`](Self::generate_batches_rows).
    pub fn generate_batches(
        &self,
        batches: &[GenerationBatch],
        p: &SamplingParams,
        run: RunOptions,
        on_step: impl FnMut(usize),
        mut done: impl FnMut(usize, HostTensor) -> Result<()>,
    ) -> Result<()> {
        let stopped = std::cell::Cell::new(false);
        self.generate_batches_rows(
            batches,
            p,
            run,
            on_step,
            |i, decoded, rows| {
                if rows.len() < batches[i].prompts.len() {
                    stopped.set(true);
                }
                done(i, decoded)
            },
            |_| stopped.set(true),
        )?;
        if stopped.get() {
            return Err(Stopped.into());
        }
        Ok(())
    }

    /// [`generate_batches`](Self::generate_batches) under the [`StopCheck`]: `done(batch index,
    /// uint8 images [M, H, W, 3], rows)` gets the images still wanted, `rows` their indices in the
    /// batch (ascending); a batch whose images all left is skipped (`skipped(batch index)`) and
    /// the next one goes on. The steps after a drop run at the smaller batch, so the images that
    /// stay equal the whole batch's bit for bit where the step's per-image arithmetic does not
    /// depend on the batch size (tests/batching.rs checks it on the CPU and the emulated GPU).
    pub fn generate_batches_rows(
        &self,
        batches: &[GenerationBatch],
        p: &SamplingParams,
        run: RunOptions,
        mut on_step: impl FnMut(usize),
        mut done: impl FnMut(usize, HostTensor, &[usize]) -> Result<()>,
        mut skipped: impl FnMut(usize),
    ) -> Result<()> {
        let start = |b: &GenerationBatch| {
            let pairs: Vec<(&[u32], &[u32])> =
                b.prompts.iter().map(|(c, u)| (&c[..], &u[..])).collect();
            self.start_conditioning(&pairs, run)
        };
        if batches.is_empty() {
            return Ok(());
        }
        // Releasing the LLM: every batch is conditioned first (the results are small host
        // tensors), then the LLM's memory goes before the transformer's comes.
        let release = self.release_stages.get();
        let mut conditioned = vec![];
        if release {
            for (i, b) in batches.iter().enumerate() {
                // Brought to the host: the conditioning's executors (and their memory) go next.
                let pe = self.finish_conditioning_on_device(start(b)?, i)?;
                conditioned.push(Some(TensorHandle::Host(pe.to_host()?)));
            }
            self.release_stage(Stage::Conditioning);
        }
        let mut next = if release {
            None
        } else {
            Some(start(&batches[0])?)
        };
        for (i, b) in batches.iter().enumerate() {
            // No image is written from a non-finite value: each stage's output is checked (on the
            // device where it lies), and the first one holding NaN/Inf is named (NaN weights, an
            // overflow, a bad config value).
            let prompt_embeds = match conditioned.get_mut(i) {
                Some(c) => c.take().expect("each batch's conditioning is taken once"),
                None => {
                    self.finish_conditioning_on_device(next.take().expect("started before"), i)?
                }
            };
            check_denoise_inputs(
                &self.transformer_cfg,
                prompt_embeds.shape(),
                &b.noise.shape(),
            )?;
            // The caption path reads the prompt embeddings where the conditioning left them; the
            // handle (and with it the conditioning's memory) is dropped before the next batch's
            // conditioning allocates its own.
            let kv = self.cross_kv(prompt_embeds, run)?;
            if let Some(after) = batches.get(i + 1).filter(|_| !release) {
                next = Some(start(after)?);
            }
            // Each step's non-finite check is a device flag read in `denoise_rows` (one scalar a step).
            let denoised = self.denoise_rows(
                i,
                kv,
                &b.noise,
                p.steps,
                p.guidance,
                p.sampler,
                p.flow_shift,
                run,
                |r| on_step(r.latents.shape().dims()[0]),
            );
            let (latents, rows) = match denoised {
                Err(e) if e.is::<Stopped>() => {
                    skipped(i);
                    continue;
                }
                other => other?,
            };
            if release && i + 1 == batches.len() {
                // Nothing denoises after the last batch: the decode gets the transformer's memory
                // (the latents' handle keeps the sampler's small arena alive until the decode).
                self.release_stage(Stage::Transformer);
            }
            // uint8 pixels [N, H, W, 3] from the latents where the sampler left them (their
            // finiteness flagged after every step), the decoder's output checked for non-finite
            // values first (a set flag names the latents or the decoder input when they hold it).
            let decoded = self.decode_u8(latents, run, p.decode, i)?;
            // The decode runs on the whole batch, the images that left included (discarded
            // here): decoders whose arithmetic depends on the batch size (the CPU's convolutions
            // pick their threading by it) then give the kept images the whole batch's bits.
            let decoded = if rows.len() < b.prompts.len() {
                select_rows(&decoded, &rows)?
            } else {
                decoded
            };
            done(i, decoded, &rows)?;
        }
        Ok(())
    }

    /// The sampling loop from `noise` [N, 32, h, w] with `prompt_embeds` [2N, Q, cc] (uncond rows
    /// first): each step runs the transformer once on the batch [uncond, cond] of all N images,
    /// guides in f32 and takes a sampler step; latents stay f32. The caption path runs once, its
    /// K/V stay on the device for every step, and on a GPU the step is a captured CUDA graph.
    /// Under a [`StopCheck`] that drops images, the latents of the images still wanted.
    #[allow(clippy::too_many_arguments)]
    pub fn denoise(
        &self,
        prompt_embeds: &HostTensor,
        noise: &HostTensor,
        steps: usize,
        guidance: f32,
        sampler: SamplerKind,
        flow_shift: f64,
        run: RunOptions,
        on_step: impl FnMut(StepRecord),
    ) -> Result<HostTensor> {
        check_denoise_inputs(&self.transformer_cfg, &prompt_embeds.shape, &noise.shape)?;
        let kv = self.cross_kv(TensorHandle::Host(prompt_embeds.clone()), run)?;
        let (latents, rows) = self.denoise_rows(
            0,
            kv,
            &LatentNoise::Values(noise.clone()),
            steps,
            guidance,
            sampler,
            flow_shift,
            run,
            on_step,
        )?;
        select_rows(&latents.to_host()?, &rows)
    }

    /// [`denoise`](Self::denoise) as batch `batch` of a call: asks the [`StopCheck`] before every
    /// step, and when images are no longer wanted drops their rows (latents, uncond and cond
    /// caption K/V) and goes on at the smaller batch with the step executor of that size (on a
    /// GPU a new captured graph). Returns the latents [N, 32, h, w] (f32) of the whole batch (an
    /// image that left keeps the latents it had then) and the indices of the images still
    /// wanted. The latents stay where the sampler left them (on a GPU the device) unless images
    /// left, whose rows are put together on the host (rare).
    #[allow(clippy::too_many_arguments)]
    fn denoise_rows(
        &self,
        batch: usize,
        mut kv: HashMap<String, TensorHandle>,
        noise: &LatentNoise,
        steps: usize,
        guidance: f32,
        sampler: SamplerKind,
        flow_shift: f64,
        run: RunOptions,
        mut on_step: impl FnMut(StepRecord),
    ) -> Result<(TensorHandle, Vec<usize>)> {
        let cfg = &self.transformer_cfg;
        let noise_shape = noise.shape();
        let nd = noise_shape.dims().to_vec();
        let n = nd[0];
        let (h, w) = (nd[2], nd[3]);
        let kv_shapes = |kv: &HashMap<String, TensorHandle>| -> HashMap<String, Shape> {
            kv.iter()
                .map(|(k, v)| (k.clone(), v.shape().clone()))
                .collect()
        };
        let capture = run.device != Device::Cpu;
        // The sampler runs in f32 whatever the step's storage (the latents and the multistep
        // history stay f32 on the device; docs/architecture.md, "The device sampler").
        let f32_run = RunOptions {
            dtype: DType::F32,
            ..run
        };
        let mut solver =
            Sampler::with_kind(sampler, steps, flow_shift).map_err(anyhow::Error::msg)?;
        let per_image = cfg.in_channels * h * w;
        // The latents of the rows kept after images left, uploaded in the next round.
        let mut latents: Option<Vec<f32>> = None;
        // Every image's latents, the ones that left as they were when they left (each row is
        // written when it leaves, or at the first drop, before it is read).
        let mut all = vec![0.0f32; n * per_image];
        // The batch's images still in it (indices into the batch).
        let mut rows: Vec<usize> = (0..n).collect();
        // The multistep history of the rows kept, while a drop moves them to a smaller batch.
        let mut history: Option<Vec<f32>> = None;
        loop {
            let m = rows.len();
            let dims = [2 * m, cfg.in_channels, h, w];
            let lat_shape = Shape::from([m, cfg.in_channels, h, w]);
            let elems = m * per_image;
            let shapes = kv_shapes(&kv);
            let prime =
                |e: &mut dyn GraphExecutor, inputs: HashMap<String, HostTensor>| -> Result<_> {
                    e.set_inputs(&inputs)?;
                    e.execute()?;
                    let mut o = e.output_handles()?;
                    Ok((
                        scheduler::LATENTS.take(&mut o)?,
                        scheduler::X0.take(&mut o)?,
                        scheduler::MODEL_INPUT.take(&mut o)?,
                    ))
                };
            let upload = |values: Vec<f32>| -> Result<_> {
                let inputs = HashMap::from([(
                    scheduler::NOISE.to_string(),
                    HostTensor::from_f32([1, elems], values)?,
                )]);
                self.with_executor(
                    Stage::Transformer,
                    "sampler.prime_values",
                    &[elems],
                    f32_run,
                    false,
                    || sampler_values_prime_graph(elems),
                    |e| prime(e, inputs),
                )
            };
            let (mut sample, mut prev_x0, mut model_input) = match (latents.take(), noise) {
                // Host latents cross to the device once: the rows kept after images left, or given
                // noise for a batch.
                (Some(values), _) => upload(values)?,
                (None, LatentNoise::Values(t)) => upload(t.to_f32_vec())?,
                // Seeded noise: only the seeds cross (16 bytes an image).
                (None, LatentNoise::Seeded { seeds, .. }) => {
                    let limbs: Vec<f32> = seeds
                        .iter()
                        .flat_map(|&s| openuni_graph::seed::limbs(s))
                        .collect();
                    let inputs = HashMap::from([(
                        scheduler::SEEDS.to_string(),
                        HostTensor::from_f32([n, openuni_graph::seed::LIMBS], limbs)?,
                    )]);
                    self.with_executor(
                        Stage::Transformer,
                        "sampler.prime",
                        &[n, per_image],
                        f32_run,
                        false,
                        || sampler_seeded_prime_graph(n, per_image),
                        |e| prime(e, inputs),
                    )?
                }
            };
            if let Some(h) = history.take() {
                // After a drop, the rows kept of the multistep history go back with the latents.
                prev_x0 = TensorHandle::Host(HostTensor::from_f32([1, elems], h)?);
            }
            let mut kv_set = false;
            let mut keep = None;
            while let Some(ts) = solver.timestep() {
                if let Some(check) = self.stop_check.borrow().as_ref() {
                    let wanted = check(batch);
                    let k: Vec<usize> = (0..m)
                        .filter(|&p| wanted.get(rows[p]).copied().unwrap_or(true))
                        .collect();
                    if k.is_empty() {
                        return Err(Stopped.into());
                    }
                    if k.len() < m {
                        keep = Some(k);
                        break;
                    }
                }
                // The transformer on [uncond; cond]: the latents handed over on the device (f32 into
                // the step's storage), the timestep (as f32, as SanaPipeline passes it) from the host.
                let velocity = self.with_executor(
                    Stage::Transformer,
                    "step",
                    &dims,
                    run,
                    capture,
                    || self.step_graph(&shapes, 2 * m, h, w),
                    |e| {
                        if !kv_set {
                            // The batch's K/V once, device to device.
                            e.set_input_handles(&kv)?;
                        }
                        e.set_input_handles(&HashMap::from([(
                            sana::HIDDEN_STATES.to_string(),
                            model_input.reshaped(dims)?,
                        )]))?;
                        e.set_inputs(&HashMap::from([(
                            sana::TIMESTEP.to_string(),
                            HostTensor::from_f32([2 * m], vec![ts; 2 * m])?,
                        )]))?;
                        e.execute()?;
                        Ok(sana::VELOCITY.take(&mut e.output_handles()?)?)
                    },
                )?;
                kv_set = true;
                // Guidance and the solver step on the device, with this step's coefficients.
                let coeffs = solver.coefficients(guidance).map_err(anyhow::Error::msg)?;
                let mut out = self.with_executor(
                    Stage::Transformer,
                    "sampler",
                    &[elems],
                    f32_run,
                    false,
                    || sampler_step_graph(elems),
                    |e| {
                        e.set_inputs(&HashMap::from([(
                            scheduler::COEFFS.to_string(),
                            HostTensor::from_f32([openuni_graph::SAMPLER_COEFFS], coeffs.to_vec())?,
                        )]))?;
                        e.set_input_handles(&HashMap::from([
                            (
                                scheduler::VELOCITY.to_string(),
                                velocity.reshaped([1, 2 * elems])?,
                            ),
                            (scheduler::SAMPLE.to_string(), sample.clone()),
                            (scheduler::PREV_X0.to_string(), prev_x0.clone()),
                        ]))?;
                        e.execute()?;
                        e.output_handles()
                    },
                )?;
                solver.advance();
                // One scalar a step: the latents' non-finite flag; only when set (an error anyway)
                // does the velocity's flag say which stage to name.
                let k = solver.steps_taken();
                let at = format!("denoise step {k} of {steps}");
                if let Err(e) = check_finite_flag(
                    &out,
                    scheduler::LATENTS.0,
                    &format!("{at}: the guided sampler update (guidance {guidance})"),
                    batch,
                ) {
                    let flag = out
                        .get(scheduler::VELOCITY_NONFINITE.0)
                        .context("the sampler graph has no velocity flag")?;
                    if flag.to_host()?.to_f32_vec().first() != Some(&0.0) {
                        check_finite(&format!("{at}: the transformer output (from its weights, the caption path's K/V or the latents fed in)"), &velocity.to_host()?, batch)?;
                    }
                    return Err(e);
                }
                sample = scheduler::LATENTS.take(&mut out)?;
                prev_x0 = scheduler::X0.take(&mut out)?;
                model_input = scheduler::MODEL_INPUT.take(&mut out)?;
                on_step(StepRecord {
                    timestep: ts,
                    model_output: velocity,
                    latents: sample.reshaped(lat_shape.clone())?,
                });
            }
            if keep.is_none() && m == n {
                // No image left: the decoder reads the latents where they are.
                return Ok((sample.reshaped(noise_shape.clone())?, rows));
            }
            // Images left: the latents come to the host for the rows kept (and for the decoder).
            let host = sample.to_host()?.to_f32_vec();
            for (p, &r) in rows.iter().enumerate() {
                all[r * per_image..(r + 1) * per_image]
                    .copy_from_slice(&host[p * per_image..(p + 1) * per_image]);
            }
            let Some(keep) = keep else {
                return Ok((
                    TensorHandle::Host(HostTensor::from_f32(noise_shape.clone(), all)?),
                    rows,
                ));
            };
            // Images left: their rows leave the latents, the multistep history and the K/V
            // ([uncond rows, cond rows]); the history comes to the host for it (rare).
            latents = Some(
                keep.iter()
                    .flat_map(|&p| host[p * per_image..(p + 1) * per_image].iter().copied())
                    .collect(),
            );
            let h = prev_x0.to_host()?.to_f32_vec();
            history = Some(
                keep.iter()
                    .flat_map(|&p| h[p * per_image..(p + 1) * per_image].iter().copied())
                    .collect(),
            );
            let cfg_rows: Vec<usize> = keep
                .iter()
                .copied()
                .chain(keep.iter().map(|&p| m + p))
                .collect();
            // The K/V come to the host for the row selection (rare: only when a request leaves).
            kv = kv
                .into_iter()
                .map(|(name, t)| {
                    Ok((
                        name,
                        TensorHandle::Host(select_rows(&t.to_host()?, &cfg_rows)?),
                    ))
                })
                .collect::<Result<_>>()?;
            rows = keep.iter().map(|&p| rows[p]).collect();
        }
    }
}

/// The device sampler's graphs for `n` images of `per_image` latent values, f32 on every device:
/// "sampler.prime" (the noise drawn from the images' seeds, once per batch: what `generate`
/// runs) and "sampler" (one guided DPM-Solver++ step, run every step, with the non-finite flag
/// of its latents). Given noise (and the rows kept after images left) is uploaded instead by
/// [`sampler_values_prime_graph`].
pub fn sampler_graphs(n: usize, per_image: usize) -> Result<Vec<(&'static str, Graph)>> {
    Ok(vec![
        ("sampler.prime", sampler_seeded_prime_graph(n, per_image)?),
        ("sampler", sampler_step_graph(n * per_image)?),
    ])
}

fn sampler_seeded_prime_graph(n: usize, per_image: usize) -> Result<Graph> {
    Ok(scheduler::sampler_seeded_prime_graph(n, per_image)?)
}

/// "sampler.prime_values": the latents [1, elems] uploaded from the host.
pub fn sampler_values_prime_graph(elems: usize) -> Result<Graph> {
    Ok(scheduler::sampler_prime_graph(elems)?)
}

fn sampler_step_graph(elems: usize) -> Result<Graph> {
    with_finite_flags(scheduler::sampler_graph(elems)?, &[scheduler::LATENTS.0])
}

/// An error unless `noise` is [N, C, h, w] and prompt embeddings of shape `pe` hold the uncond
/// and cond rows of its N images: [2N, Q, caption_channels].
fn check_denoise_inputs(
    cfg: &openuni_models::sana::SanaConfig,
    pe: &Shape,
    noise: &Shape,
) -> Result<()> {
    let nd = noise.dims();
    if nd.len() != 4 || nd[0] == 0 || nd[1] != cfg.in_channels {
        bail!(
            "noise has shape {noise}, expected [N, {}, h, w]",
            cfg.in_channels
        );
    }
    let n = nd[0];
    let d = pe.dims();
    if d.len() != 3 || d[0] != 2 * n || d[2] != cfg.caption_channels {
        bail!("prompt embeddings have shape {pe}, expected [{}, Q, {}] (uncond and cond rows of {n} images)", 2 * n, cfg.caption_channels);
    }
    Ok(())
}

/// The rows `which` of `t` along its first dimension, in that order, in `t`'s dtype.
fn select_rows(t: &HostTensor, which: &[usize]) -> Result<HostTensor> {
    let dims = t.shape.dims();
    let Some(&first) = dims.first() else {
        bail!("cannot select rows of a scalar")
    };
    if let Some(&bad) = which.iter().find(|&&r| r >= first) {
        bail!("row {bad} of a tensor of shape {}", t.shape);
    }
    let bytes = t.data.as_bytes();
    let row = bytes.len() / first.max(1);
    let picked: Vec<u8> = which
        .iter()
        .flat_map(|&r| bytes[r * row..(r + 1) * row].iter().copied())
        .collect();
    let mut shape = dims.to_vec();
    shape[0] = which.len();
    Ok(HostTensor::new(
        shape,
        openuni_tensor::HostData::from_le_bytes(t.dtype(), &picked),
    )?)
}

/// The output holding [`Op::AnyNonFinite`](openuni_graph::Op::AnyNonFinite) of graph output `output`.
pub fn nonfinite_flag(output: &str) -> String {
    format!("{output}.nonfinite")
}

/// `g` with a non-finite flag ([`nonfinite_flag`]) after each of `outputs`: the pipeline reads
/// one scalar per checked tensor instead of the tensor.
pub(super) fn with_finite_flags(g: Graph, outputs: &[&str]) -> Result<Graph> {
    let mut b = GraphBuilder::extend(g);
    for &out in outputs {
        let id = b
            .output_id(out)
            .with_context(|| format!("the graph has no output `{out}` to check"))?;
        let flag = b.any_nonfinite(&nonfinite_flag(out), id)?;
        b.output(&nonfinite_flag(out), flag)?;
    }
    Ok(b.finish())
}

/// [`check_finite`] on a run's output left where it lies (`handles`, from `output_handles`):
/// reads its flag ([`with_finite_flags`]), one scalar; only when that is set (an error anyway)
/// does the tensor come to the host, for the same message as the host check.
pub(super) fn check_finite_flag(
    handles: &HashMap<String, TensorHandle>,
    output: &str,
    stage: &str,
    batch: usize,
) -> Result<()> {
    let get = |name: &str| {
        handles
            .get(name)
            .with_context(|| format!("the graph has no output `{name}`"))
    };
    if get(&nonfinite_flag(output))?
        .to_host()?
        .to_f32_vec()
        .first()
        == Some(&0.0)
    {
        return Ok(());
    }
    check_finite(stage, &get(output)?.to_host()?, batch)?;
    bail!("{stage} (batch {batch}): the device flagged a non-finite value that the host copy does not hold")
}

/// An error unless every value of `t` is finite: names the stage, the batch, what was found and
/// where to look (the stage's weights, `openuni verify --diff-nodes` to find the op).
pub fn check_finite(stage: &str, t: &HostTensor, batch: usize) -> Result<()> {
    let v = t.to_f32_vec();
    let Some(first) = v.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    let (nan, inf) = v.iter().fold((0usize, 0usize), |(n, i), x| {
        (n + x.is_nan() as usize, i + x.is_infinite() as usize)
    });
    bail!(
        "non-finite values first appeared in {stage} (batch {batch}): {nan} NaN and {inf} infinite of {} values, the first at \
         flat index {first} of shape {} ({}); no image was written. A NaN/Inf weight or config value of that stage, or an \
         overflow, causes this: check the model files, and run `openuni verify CASE --diff-nodes` on a reference case \
         of the component to find the first diverging op",
        v.len(),
        t.shape,
        v[first]
    )
}
