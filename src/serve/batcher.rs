//! Dynamic batching: a bounded queue of requests and the one worker thread that owns the model.
//!
//! The worker takes the oldest request, waits until `window` after its arrival for more requests
//! of the same batch key (size, steps, guidance, sampler: what one `generate_batches` call shares),
//! and generates them as one batch of up to `max_batch` images: one batched conditioning, one
//! transformer run over all rows per step, one decode. When more compatible requests wait than one
//! batch holds, a second batch goes into the same call, so its conditioning overlaps the first
//! batch's denoising (the pipeline's throughput mode). A request's images never split between
//! batches. Image i of a request gets `seed + i`, so each image is what `openuni generate` makes.
//! Before every denoising step the pipeline asks which images are still wanted: the rows of a
//! request whose client left or whose deadline passed leave the running batch there.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use base64::Engine;
use openuni_models::prompt::PromptIds;
use openuni_models::scheduler::SamplerKind;
use tokio::sync::oneshot;

use super::api::ImageRequest;
use super::metrics::Metrics;
use crate::generate::is_out_of_memory;
use crate::pipeline::{
    to_uint8_nhwc, DecodeOptions, GenerationBatch, LatentNoise, OpenUni, RunOptions, SamplingParams,
};

/// One generated image of a request.
#[derive(Clone, Debug)]
pub struct Image {
    pub png_base64: String,
    pub seed: u64,
}

/// Why a request's batch failed.
#[derive(Clone, Debug)]
pub struct JobError {
    /// The metrics kind and error code: `generation_failed` or `out_of_memory`.
    pub code: &'static str,
    pub message: String,
}

/// A request admitted to the queue.
pub struct Job {
    pub request: ImageRequest,
    /// The seed of the first image (the request's, or one drawn at admission).
    pub seed: u64,
    pub ids: PromptIds,
    pub admitted: Instant,
    pub deadline: Instant,
    /// Set when the client went away or its deadline passed: the job is dropped before its batch,
    /// or its rows leave its running batch at the next step.
    pub cancelled: Arc<AtomicBool>,
    pub reply: oneshot::Sender<Result<Vec<Image>, JobError>>,
}

/// Requests that may share one batch: the parameters one `generate_batches` call fixes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchKey {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub sampler: SamplerKind,
}

impl Job {
    pub fn key(&self) -> BatchKey {
        let r = &self.request;
        BatchKey {
            width: r.width,
            height: r.height,
            steps: r.steps,
            guidance: r.guidance,
            sampler: r.sampler,
        }
    }

    fn gone(&self, now: Instant) -> bool {
        self.cancelled.load(Ordering::Relaxed) || now >= self.deadline || self.reply.is_closed()
    }
}

struct State {
    jobs: VecDeque<Job>,
    closing: bool,
}

/// The bounded request queue between the HTTP handlers and the worker.
pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
    metrics: Arc<Metrics>,
}

/// What the worker does with the queue.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub window: Duration,
    pub max_batch: usize,
}

impl Queue {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Queue {
        Queue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                closing: false,
            }),
            wake: Condvar::new(),
            capacity,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic never happens while the lock is held (only queue bookkeeping runs under it).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `job`, or says why not: `queue_full` or `shutting_down`.
    pub fn push(&self, job: Job) -> Result<(), &'static str> {
        let mut s = self.lock();
        if s.closing {
            return Err("shutting_down");
        }
        // Requests whose client went away hold no place in the queue.
        self.drop_gone(&mut s);
        if s.jobs.len() >= self.capacity {
            return Err("queue_full");
        }
        s.jobs.push_back(job);
        self.metrics.queue_depth.set(s.jobs.len() as i64);
        self.wake.notify_one();
        Ok(())
    }

    /// No more admissions; the worker finishes what is queued and stops.
    pub fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_all();
    }

    /// Blocks until a batch is ready: up to two groups of compatible requests, each of at most
    /// `max_batch` images. `None` when closed and empty. Requests whose client went away or
    /// whose deadline passed are dropped here, before any work is spent on them.
    pub fn next_batch(&self, p: BatchPolicy) -> Option<Vec<Vec<Job>>> {
        let mut s = self.lock();
        loop {
            self.drop_gone(&mut s);
            let Some(head) = s.jobs.front() else {
                if s.closing {
                    return None;
                }
                s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            let (key, window_end) = (head.key(), head.admitted + p.window);
            let rows: usize = s
                .jobs
                .iter()
                .filter(|j| j.key() == key)
                .map(|j| j.request.n)
                .sum();
            let now = Instant::now();
            if rows >= p.max_batch || now >= window_end || s.closing {
                let groups = take_groups(&mut s.jobs, key, p.max_batch);
                self.metrics.queue_depth.set(s.jobs.len() as i64);
                return Some(groups);
            }
            s = self
                .wake
                .wait_timeout(s, window_end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn drop_gone(&self, s: &mut State) {
        let now = Instant::now();
        let before = s.jobs.len();
        s.jobs.retain(|j| !j.gone(now));
        let dropped = before - s.jobs.len();
        if dropped > 0 {
            // The handler counts the error (cancelled or deadline); here only the depth changes.
            self.metrics.queue_depth.set(s.jobs.len() as i64);
        }
    }
}

/// Removes the requests of `key` that fill up to two batches of `max_batch` images, oldest
/// first; a request that does not fit stops the filling (so no later one overtakes it).
fn take_groups(jobs: &mut VecDeque<Job>, key: BatchKey, max_batch: usize) -> Vec<Vec<Job>> {
    let mut groups: Vec<Vec<Job>> = vec![vec![]];
    let mut rows = 0;
    let mut i = 0;
    while i < jobs.len() {
        if jobs[i].key() != key {
            i += 1;
            continue;
        }
        let n = jobs[i].request.n;
        if rows + n > max_batch {
            if groups.len() == 2 || groups[0].is_empty() {
                break;
            }
            groups.push(vec![]);
            rows = 0;
            continue;
        }
        rows += n;
        groups
            .last_mut()
            .expect("one group")
            .push(jobs.remove(i).expect("in range"));
    }
    groups.retain(|g| !g.is_empty());
    groups
}

/// The model and what a batch needs besides the requests.
pub struct Worker {
    pub model: OpenUni,
    pub run: RunOptions,
    pub flow_shift: f64,
    pub metrics: Arc<Metrics>,
    pub policy: BatchPolicy,
}

impl Worker {
    /// Serves batches until the queue is closed and empty.
    pub fn serve(&self, queue: &Queue) {
        while let Some(groups) = queue.next_batch(self.policy) {
            self.generate(groups);
        }
    }

    /// Generates `groups` in one pipeline call and answers every request. A failure (an error
    /// or a panic) fails only these requests; the worker goes on with the next batch.
    fn generate(&self, groups: Vec<Vec<Job>>) {
        let start = Instant::now();
        // A request cancelled while its batch was being formed is dropped here.
        let groups: Vec<Vec<Job>> = groups
            .into_iter()
            .map(|g| g.into_iter().filter(|j| !j.gone(start)).collect::<Vec<_>>())
            .filter(|g| !g.is_empty())
            .collect();
        if groups.is_empty() {
            return;
        }
        for j in groups.iter().flatten() {
            self.metrics
                .queue_wait
                .observe(start.duration_since(j.admitted).as_secs_f64());
        }
        self.metrics.batches_running.inc();
        // Before every denoising step the pipeline asks which images of the running batch are
        // still wanted: the rows of a request cancelled or past its deadline leave the batch at
        // that step, the others go on; a batch whose requests are all gone ends there.
        let watch: Vec<Vec<(Arc<AtomicBool>, Instant)>> = groups
            .iter()
            .map(|g| {
                g.iter()
                    .flat_map(|j| {
                        std::iter::repeat_n((j.cancelled.clone(), j.deadline), j.request.n)
                    })
                    .collect()
            })
            .collect();
        self.model.set_stop_check(Some(Box::new(move |gi| {
            let now = Instant::now();
            watch.get(gi).map_or(vec![], |rows| {
                rows.iter()
                    .map(|(c, d)| !c.load(Ordering::Relaxed) && now < *d)
                    .collect()
            })
        })));
        let mut replies: Vec<Option<Vec<Image>>> = vec![None; groups.iter().map(Vec::len).sum()];
        let outcome = catch_unwind(AssertUnwindSafe(|| self.run_groups(&groups, &mut replies)));
        self.model.set_stop_check(None);
        self.metrics.batches_running.dec();
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                let code = if is_out_of_memory(&e) {
                    "out_of_memory"
                } else {
                    "generation_failed"
                };
                Some(JobError {
                    code,
                    message: format!("{e:#}"),
                })
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Some(JobError {
                    code: "generation_failed",
                    message: format!("internal error: the batch panicked ({what})"),
                })
            }
        };
        if failure.is_some() {
            // Executors may be half-built after a failure: the next batch makes fresh ones.
            self.model.release_executors();
        }
        let images: usize = groups
            .iter()
            .flatten()
            .zip(&replies)
            .filter(|(_, r)| r.is_some())
            .map(|(j, _)| j.request.n)
            .sum();
        let elapsed = start.elapsed().as_secs_f64();
        self.metrics.batch_duration.observe(elapsed);
        for (job, reply) in groups.into_iter().flatten().zip(replies) {
            let answer = match (reply, &failure) {
                (Some(imgs), _) => Ok(imgs),
                (None, Some(f)) => Err(f.clone()),
                // Its rows left the batch: the client went away or its deadline passed.
                (None, None) if job.gone(Instant::now()) => Err(JobError {
                    code: "cancelled",
                    message:
                        "the request left its batch: its client went away or its deadline passed"
                            .into(),
                }),
                (None, None) => Err(JobError {
                    code: "generation_failed",
                    message: "internal error: the batch returned no images for this request".into(),
                }),
            };
            // A client that went away meanwhile does not take the result: it is discarded.
            let _ = job.reply.send(answer);
        }
        if failure.is_none() {
            self.metrics
                .images_per_second
                .set(images as f64 / elapsed.max(1e-9));
        }
    }

    /// One `generate_batches` call over `groups` (each one batch); `replies[k]` gets the images
    /// of the k-th request in group order.
    fn run_groups(&self, groups: &[Vec<Job>], replies: &mut [Option<Vec<Image>>]) -> Result<()> {
        let key = groups[0][0].key();
        let m = &self.model;
        let up = m.vae_cfg.upscale();
        let (lh, lw, c) = (
            key.height / up,
            key.width / up,
            m.transformer_cfg.in_channels,
        );
        let mut batches = vec![];
        for g in groups {
            let mut prompts = vec![];
            let mut seeds = vec![];
            for j in g {
                for i in 0..j.request.n {
                    prompts.push((j.ids.cond.clone(), j.ids.uncond.clone()));
                    seeds.push(j.seed.wrapping_add(i as u64));
                }
            }
            batches.push(GenerationBatch {
                prompts,
                noise: LatentNoise::seeded(seeds, c, lh, lw),
            });
        }
        let decode = DecodeOptions::from_flags(None, key.height, key.width, &m.vae_cfg)?;
        let params = SamplingParams {
            steps: key.steps,
            guidance: key.guidance,
            sampler: key.sampler,
            flow_shift: self.flow_shift,
            decode,
        };
        let first_of_group: Vec<usize> = groups
            .iter()
            .scan(0, |at, g| {
                let s = *at;
                *at += g.len();
                Some(s)
            })
            .collect();
        let rows_of = |gi: usize| groups[gi].iter().map(|j| j.request.n).sum::<usize>();
        m.generate_batches_rows(
            &batches,
            &params,
            self.run,
            |_| {},
            |gi, decoded, kept| {
                self.metrics
                    .batch_size
                    .observe(batches[gi].prompts.len() as f64);
                self.metrics
                    .rows_cancelled
                    .inc_by((rows_of(gi) - kept.len()) as u64);
                let (pixels, [_, h, w, _]) = to_uint8_nhwc(&decoded)?;
                let per = h * w * 3;
                // `kept` lists the batch rows still in `decoded`, ascending; a request's rows leave
                // together, so each request is either wholly in it or wholly out.
                let mut out = 0;
                let mut first_row = 0;
                for (k, j) in groups[gi].iter().enumerate() {
                    let n = j.request.n;
                    let rows = first_row..first_row + n;
                    first_row += n;
                    if !kept.contains(&rows.start) {
                        continue;
                    }
                    let mut imgs = vec![];
                    for i in 0..n {
                        let png = encode_png(&pixels[out * per..(out + 1) * per], w, h)?;
                        imgs.push(Image {
                            png_base64: base64::engine::general_purpose::STANDARD.encode(png),
                            seed: j.seed + i as u64,
                        });
                        out += 1;
                    }
                    self.metrics.images_generated.inc_by(n as u64);
                    replies[first_of_group[gi] + k] = Some(imgs);
                }
                anyhow::ensure!(
                    out == kept.len(),
                    "internal error: {} images decoded for {out} kept rows",
                    kept.len()
                );
                Ok(())
            },
            |gi| {
                // Every request of a batch left before its end: it stopped at its next step.
                self.metrics.batches_stopped.inc();
                self.metrics.rows_cancelled.inc_by(rows_of(gi) as u64);
            },
        )
    }
}

/// An 8-bit RGB PNG in memory.
pub fn encode_png(rgb: &[u8], width: usize, height: usize) -> Result<Vec<u8>> {
    let mut out = vec![];
    let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(rgb)?;
    w.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(
        width: usize,
        n: usize,
        cancelled: bool,
    ) -> (Job, oneshot::Receiver<Result<Vec<Image>, JobError>>) {
        let (reply, rx) = oneshot::channel();
        let request = ImageRequest {
            prompt: "p".into(),
            negative_prompt: None,
            n,
            width,
            height: 64,
            seed: None,
            steps: 2,
            guidance: 4.5,
            sampler: SamplerKind::DpmSolver,
        };
        let now = Instant::now();
        let ids = PromptIds {
            cond: vec![1],
            uncond: vec![2],
        };
        (
            Job {
                request,
                seed: 0,
                ids,
                admitted: now,
                deadline: now + Duration::from_secs(60),
                cancelled: Arc::new(AtomicBool::new(cancelled)),
                reply,
            },
            rx,
        )
    }

    #[test]
    fn groups_keep_arrival_order_and_never_split_a_request() {
        let mut rxs = vec![];
        let mut jobs = VecDeque::new();
        for (w, n) in [(64, 2), (96, 1), (64, 3), (64, 1), (64, 4)] {
            let (j, rx) = job(w, n, false);
            jobs.push_back(j);
            rxs.push(rx);
        }
        let key = jobs[0].key();
        let groups = take_groups(&mut jobs, key, 4);
        let sizes: Vec<Vec<usize>> = groups
            .iter()
            .map(|g| g.iter().map(|j| j.request.n).collect())
            .collect();
        // 2 then 3 does not fit: a second batch starts; the 4 fits in neither and waits.
        assert_eq!(sizes, vec![vec![2], vec![3, 1]]);
        let left: Vec<(usize, usize)> = jobs
            .iter()
            .map(|j| (j.request.width, j.request.n))
            .collect();
        assert_eq!(left, vec![(96, 1), (64, 4)]);
    }

    #[test]
    fn queue_is_bounded_and_cancelled_requests_leave_it() {
        let q = Queue::new(2, Arc::new(Metrics::new()));
        let (a, _ra) = job(64, 1, false);
        let (b, _rb) = job(64, 1, false);
        let (c, _rc) = job(64, 1, false);
        let (d, _rd) = job(64, 1, false);
        let flag_b = b.cancelled.clone();
        assert!(q.push(a).is_ok() && q.push(b).is_ok());
        assert_eq!(q.push(c).unwrap_err(), "queue_full");
        flag_b.store(true, Ordering::Relaxed);
        assert!(q.push(d).is_ok(), "a cancelled request kept its place");
        let policy = BatchPolicy {
            window: Duration::ZERO,
            max_batch: 8,
        };
        let groups = q.next_batch(policy).unwrap();
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), vec![2]);
        q.close();
        assert!(q.next_batch(policy).is_none());
    }
}
