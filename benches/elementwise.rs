//! Bandwidth of kernels/elementwise.cu at the models' shapes, against the device-to-device copy
//! bandwidth measured in the same run. CUDA events, warm-up, median of 50 samples, each sample a
//! batch of calls rotating through input sets 3x the L2 size so that every call reads from DRAM.
//! Prints one line per kernel and a JSON record (device, date, commit); without a CUDA device it
//! prints `skipped: no CUDA device`. Run: `cargo bench --bench elementwise` (or tools/gpu_run.sh).

use openuni_cuda::families::{elementwise, enqueue};
use openuni_cuda::testing::{random_bytes, rotation, time_ms, BenchReport, Rng};
use openuni_graph::UnaryFn;
use openuni_tensor::DType;

#[derive(Clone, Copy)]
enum Kind {
    Unary(UnaryFn),
    Add,
    /// adaLN gated residual over [B, tokens, cols].
    GatedAdd {
        tokens: usize,
    },
    /// The same with the gate read from adaLN-single's t6 [B, 6·cols] and table [6, cols]
    /// (`ada_gated_add`, as the step runs it).
    AdaGatedAdd {
        tokens: usize,
    },
    /// Storage cast to `DType` (f32 -> bf16 when BF16, bf16 -> f32 when F32).
    Cast(DType),
}

fn main() {
    let Some(mut r) = BenchReport::start("elementwise", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    let bf = DType::BF16;
    // (where the shape comes from, kind, rows, cols, storage dtype of the input)
    let cases: Vec<(&str, Kind, usize, usize, DType)> = vec![
        (
            "SANA-1.6B MLP hidden (2.5 x 2240)",
            Kind::Unary(UnaryFn::GeluTanh),
            2 * 1024,
            5600,
            bf,
        ),
        (
            "SANA-1.6B MLP hidden",
            Kind::Unary(UnaryFn::Silu),
            2 * 1024,
            5600,
            bf,
        ),
        (
            "connector (L) MLP",
            Kind::Unary(UnaryFn::GeluTanh),
            2 * 256,
            8960,
            bf,
        ),
        (
            "SANA-1.6B MLP hidden",
            Kind::Unary(UnaryFn::GeluErf),
            2 * 1024,
            5600,
            bf,
        ),
        (
            "SANA-1.6B MLP hidden",
            Kind::Unary(UnaryFn::Relu),
            2 * 1024,
            5600,
            bf,
        ),
        (
            "SANA-1.6B width",
            Kind::Unary(UnaryFn::Silu),
            2 * 1024,
            2240,
            DType::F32,
        ),
        ("SANA-1.6B residual", Kind::Add, 2 * 1024, 2240, bf),
        (
            "SANA-1.6B gated residual",
            Kind::GatedAdd { tokens: 1024 },
            2 * 1024,
            2240,
            bf,
        ),
        (
            "SANA-1.6B gated residual",
            Kind::GatedAdd { tokens: 1024 },
            2 * 1024,
            2240,
            DType::F32,
        ),
        (
            "SANA-1.6B gated residual, table rows",
            Kind::AdaGatedAdd { tokens: 1024 },
            2 * 1024,
            2240,
            bf,
        ),
        (
            "SANA-1.6B width",
            Kind::Cast(DType::BF16),
            2 * 1024,
            2240,
            DType::F32,
        ),
        (
            "SANA-1.6B width",
            Kind::Cast(DType::F32),
            2 * 1024,
            2240,
            bf,
        ),
    ];
    let mut rng = Rng::new(2);
    let (warmup, runs) = r.runs();
    for (label, kind, rows, cols, dtype) in cases {
        let rows = r.rows(rows);
        let dev = r.dev.clone();
        let n = rows * cols;
        let es = dtype.size_in_bytes();
        let out_es = match kind {
            Kind::Cast(to) => to.size_in_bytes(),
            _ => es,
        };
        let (set_in, set_out) = (
            (n * es).div_ceil(256) * 256,
            (n * out_es).div_ceil(256) * 256,
        );
        let reads = match kind {
            Kind::Add | Kind::GatedAdd { .. } | Kind::AdaGatedAdd { .. } => 2,
            _ => 1,
        };
        let sets = if dev.is_emulated() {
            1
        } else {
            rotation(&dev, reads * set_in + set_out)
        };
        let a = dev.alloc(set_in * sets).unwrap();
        let b = dev.alloc(set_in * sets).unwrap();
        let y = dev.alloc(set_out * sets).unwrap();
        dev.copy_to_device(&random_bytes(&mut rng, dtype, n, 0.0, 2.0), a.ptr())
            .unwrap();
        dev.copy_to_device(&random_bytes(&mut rng, dtype, n, 0.0, 1.0), b.ptr())
            .unwrap();
        for s in 1..sets {
            dev.copy_on_device(a.ptr(), a.ptr() + (s * set_in) as u64, set_in)
                .unwrap();
            dev.copy_on_device(b.ptr(), b.ptr() + (s * set_in) as u64, set_in)
                .unwrap();
        }
        let samples = match kind {
            Kind::GatedAdd { tokens } | Kind::AdaGatedAdd { tokens } => {
                rows.div_ceil(tokens.min(rows))
            }
            _ => 1,
        };
        let gate = dev
            .upload(&random_bytes(&mut rng, dtype, samples * cols, 0.0, 1.0))
            .unwrap();
        let t6 = dev
            .upload(&random_bytes(&mut rng, dtype, samples * 6 * cols, 0.0, 1.0))
            .unwrap();
        let table = dev
            .upload(&random_bytes(&mut rng, dtype, 6 * cols, 0.0, 0.5))
            .unwrap();
        let (name, bytes) = match kind {
            Kind::Unary(f) => (format!("{}_{dtype}", f.name()), 2 * n * es),
            Kind::Add => (format!("add_{dtype}"), 3 * n * es),
            Kind::GatedAdd { .. } => (format!("gated_add_{dtype}"), (3 * n + samples * cols) * es),
            Kind::AdaGatedAdd { .. } => (
                format!("ada_gated_add_{dtype}"),
                (3 * n + samples * cols + cols) * es,
            ),
            Kind::Cast(to) => (format!("cast_{dtype}_to_{to}"), n * (es + out_es)),
        };
        let sms = dev.sm_count();
        let ms =
            time_ms(&dev, warmup, runs, sets, |i| {
                let s = i % sets;
                let (ap, bp, yp) = (
                    a.ptr() + (s * set_in) as u64,
                    b.ptr() + (s * set_in) as u64,
                    y.ptr() + (s * set_out) as u64,
                );
                // SAFETY: every buffer holds the shapes launched.
                unsafe {
                    match kind {
                        Kind::Unary(f) => elementwise::unary(dtype, sms, f, ap, yp, n)
                            .and_then(|l| enqueue(&dev, &l)),
                        Kind::Add => elementwise::add(dtype, sms, ap, bp, yp, n)
                            .and_then(|l| enqueue(&dev, &l)),
                        Kind::GatedAdd { tokens } => elementwise::gated_add(
                            dtype,
                            sms,
                            ap,
                            gate.ptr(),
                            bp,
                            yp,
                            n,
                            tokens.min(rows),
                            cols,
                        )
                        .and_then(|l| enqueue(&dev, &l)),
                        Kind::AdaGatedAdd { tokens } => {
                            let (gate, stride) = openuni_cuda::families::norm::table_row(
                                t6.ptr(),
                                6 * cols,
                                table.ptr(),
                                6,
                                cols,
                                2,
                                es,
                            );
                            elementwise::ada_gated_add(
                                dtype,
                                sms,
                                ap,
                                gate,
                                stride,
                                bp,
                                yp,
                                n,
                                tokens.min(rows),
                                cols,
                            )
                            .and_then(|l| enqueue(&dev, &l))
                        }
                        Kind::Cast(to) => {
                            elementwise::cast(to, sms, ap, yp, n).and_then(|l| enqueue(&dev, &l))
                        }
                    }
                }
            })
            .unwrap();
        r.add(&name, label, &[rows, cols], bytes, ms);
    }
    r.finish();
}
