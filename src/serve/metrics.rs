//! `GET /metrics`: Prometheus text exposition of the server's queue, batches, images and errors.

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    /// Requests admitted and not yet taken into a batch.
    pub queue_depth: IntGauge,
    /// Batches being generated now (0 or 1: one worker owns the model).
    pub batches_running: IntGauge,
    /// Images per generated batch.
    pub batch_size: Histogram,
    pub images_generated: IntCounter,
    /// Images per second of the last batch (its images over its wall time).
    pub images_per_second: Gauge,
    /// Successful requests, from arrival to the response.
    pub request_latency: Histogram,
    /// From admission to the start of the request's batch.
    pub queue_wait: Histogram,
    /// Wall time of one batch: conditioning, denoising, decoding, encoding.
    pub batch_duration: Histogram,
    /// Failed or refused requests by kind (the error `code`).
    pub errors: IntCounterVec,
    pub requests: IntCounter,
    /// Pipeline calls stopped between denoising steps because every request in them was gone.
    pub batches_stopped: IntCounter,
    /// Image rows that left a running batch at a denoising step (client gone or deadline passed).
    pub rows_cancelled: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let latency_buckets = vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0];
        let m = Metrics {
            queue_depth: IntGauge::new("openuni_queue_depth", "Requests waiting for a batch").expect("valid metric"),
            batches_running: IntGauge::new("openuni_batches_running", "Batches being generated now").expect("valid metric"),
            batch_size: Histogram::with_opts(
                HistogramOpts::new("openuni_batch_size", "Images per generated batch").buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
            )
            .expect("valid metric"),
            images_generated: IntCounter::new("openuni_images_generated_total", "Images generated and returned to clients").expect("valid metric"),
            images_per_second: Gauge::new("openuni_images_per_second", "Images per second of the last batch").expect("valid metric"),
            request_latency: Histogram::with_opts(
                HistogramOpts::new("openuni_request_duration_seconds", "Successful image requests, arrival to response").buckets(latency_buckets.clone()),
            )
            .expect("valid metric"),
            queue_wait: Histogram::with_opts(
                HistogramOpts::new("openuni_queue_wait_seconds", "Time from admission to the start of the request's batch").buckets(latency_buckets.clone()),
            )
            .expect("valid metric"),
            batch_duration: Histogram::with_opts(HistogramOpts::new("openuni_batch_duration_seconds", "Wall time of one pipeline call (one batch, or two when the second overlaps its conditioning)").buckets(latency_buckets))
                .expect("valid metric"),
            errors: IntCounterVec::new(Opts::new("openuni_errors_total", "Failed or refused requests by kind"), &["kind"]).expect("valid metric"),
            requests: IntCounter::new("openuni_requests_total", "Image generation requests received").expect("valid metric"),
            batches_stopped: IntCounter::new("openuni_batches_stopped_total", "Batches stopped between steps because every client left or timed out")
                .expect("valid metric"),
            rows_cancelled: IntCounter::new("openuni_rows_cancelled_total", "Image rows that left a running batch at a denoising step because their client left or timed out")
                .expect("valid metric"),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.queue_depth.clone())).expect("unique");
        r.register(Box::new(m.batches_running.clone())).expect("unique");
        r.register(Box::new(m.batch_size.clone())).expect("unique");
        r.register(Box::new(m.images_generated.clone())).expect("unique");
        r.register(Box::new(m.images_per_second.clone())).expect("unique");
        r.register(Box::new(m.request_latency.clone())).expect("unique");
        r.register(Box::new(m.queue_wait.clone())).expect("unique");
        r.register(Box::new(m.batch_duration.clone())).expect("unique");
        r.register(Box::new(m.errors.clone())).expect("unique");
        r.register(Box::new(m.requests.clone())).expect("unique");
        r.register(Box::new(m.batches_stopped.clone())).expect("unique");
        r.register(Box::new(m.rows_cancelled.clone())).expect("unique");
        // Every kind shows from the start (at 0), so a dashboard can rate() it.
        for kind in ["invalid_json", "invalid_value", "unknown_parameter", "missing_required_parameter", "model_not_found", "invalid_api_key", "queue_full", "deadline_exceeded", "cancelled", "payload_too_large", "generation_failed", "out_of_memory", "shutting_down"] {
            m.errors.with_label_values(&[kind]);
        }
        m
    }

    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    pub fn render(&self) -> String {
        let mut buf = vec![];
        // Encoding our own registered families cannot fail.
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
