//! Bandwidth of kernels/layout.cu (the NCHW <-> token transposes at the model interfaces) against
//! the device-to-device copy bandwidth measured in the same run. CUDA events, warm-up, median of
//! 50 samples. Prints one line per case and a JSON record (device, date, commit); without a CUDA
//! device it prints `skipped: no CUDA device`; on the emulated GPU the shapes are cut (a smoke run
//! of the benchmark code only). Run: `cargo bench --bench layout`.

use openuni_cuda::families::{enqueue, layout};
use openuni_cuda::testing::{random_bytes, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

fn main() {
    let Some(mut r) = BenchReport::start("layout", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    // (where, batch, rows, cols): [B, rows, cols] -> [B, cols, rows].
    let cases: Vec<(&str, usize, usize, usize)> = vec![
        ("DC-AE latent NCHW -> tokens (32 ch, 32²)", 1, 32, 32 * 32),
        (
            "DC-AE output tokens -> NCHW (1024², 3 ch)",
            1,
            1024 * 1024,
            3,
        ),
        (
            "SANA latent NCHW -> tokens, CFG batch (32 ch, 32²)",
            2,
            32,
            32 * 32,
        ),
        ("square tile case (1024 x 1024)", 1, 1024, 1024),
    ];
    let mut rng = Rng::new(3);
    let (warmup, runs) = r.runs();
    let dev = r.dev.clone();
    for dtype in [DType::BF16, DType::F32] {
        for &(label, batch, rows, cols) in &cases {
            // On the emulated GPU keep at most 8 rows and 64 columns.
            let (rows, cols) = if dev.is_emulated() {
                (rows.min(8), cols.min(64))
            } else {
                (rows, cols)
            };
            let n = batch * rows * cols;
            let x = dev
                .upload(&random_bytes(&mut rng, dtype, n, 0.0, 1.0))
                .unwrap();
            let y = dev.alloc(n * dtype.size_in_bytes()).unwrap();
            let l = layout::transpose(dtype, x.ptr(), y.ptr(), batch, rows, cols).unwrap();
            // SAFETY: x and y hold [batch, rows, cols] elements of dtype.
            let ms = time_ms(&dev, warmup, runs, 1, |_| unsafe { enqueue(&dev, &l) }).unwrap();
            r.add(
                &l[0].kernel,
                label,
                &[batch, rows, cols],
                2 * n * dtype.size_in_bytes(),
                ms,
            );
        }
    }
    r.finish();
}
