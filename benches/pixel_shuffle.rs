//! Bandwidth of kernels/pixel_shuffle.cu (mlp1's LayerNorm reading InternViT's output through the
//! pixel-shuffle index map) at InternVL3's shapes, against the device-to-device copy bandwidth of
//! the same run: the bytes are the patch tokens read once (the class token is skipped), the
//! normalised [T, 256, 4096] written once, plus the weight and bias. CUDA events, warm-up, median of
//! 50, input sets rotated through 3x the L2. Before this kernel the same work was a drop-CLS slice,
//! two transposes and a LayerNorm: four passes writing three intermediate copies.
//! Without a CUDA device it prints `skipped: no CUDA device`; on the emulated GPU the tile counts
//! are cut down (a smoke run of the code, CPU times). Run: `cargo bench --bench pixel_shuffle`.

use openuni_cuda::families::enqueue;
use openuni_cuda::families::pixel_shuffle::pixel_shuffle_layernorm;
use openuni_cuda::testing::{random_bytes, rotation, time_ms, BenchReport, Rng};
use openuni_tensor::DType;

fn main() {
    let Some(mut r) = BenchReport::start("pixel_shuffle", env!("OPENUNI_GIT_COMMIT")) else {
        return;
    };
    // InternViT-300M: C = 1024, grid 32 (448 / 14), class token first.
    let (c, grid, skip) = (1024, 32, 1);
    let cases = [
        ("InternVL3 ViT, 1 tile", 1, DType::BF16),
        ("InternVL3 ViT, 13 tiles (12 + thumbnail)", 13, DType::BF16),
        ("InternVL3 ViT, 13 tiles, f32", 13, DType::F32),
    ];
    let mut rng = Rng::new(7);
    let (warmup, runs) = r.runs();
    for (label, tiles, dtype) in cases {
        let dev = r.dev.clone();
        let tiles = if dev.is_emulated() { 1 } else { tiles };
        let es = dtype.size_in_bytes();
        let (n_in, n_out) = (tiles * (skip + grid * grid) * c, tiles * grid * grid * c);
        let set = (n_in * es).div_ceil(256) * 256;
        let sets = if dev.is_emulated() {
            1
        } else {
            rotation(&dev, set + n_out * es)
        };
        let x = dev.alloc(set * sets).unwrap();
        dev.copy_to_device(&random_bytes(&mut rng, dtype, n_in, 0.0, 1.0), x.ptr())
            .unwrap();
        for s in 1..sets {
            dev.copy_on_device(x.ptr(), x.ptr() + (s * set) as u64, set)
                .unwrap();
        }
        let y = dev.alloc(n_out * es).unwrap();
        let w = dev
            .upload(&random_bytes(&mut rng, dtype, 4 * c, 1.0, 0.2))
            .unwrap();
        let b = dev
            .upload(&random_bytes(&mut rng, dtype, 4 * c, 0.0, 0.2))
            .unwrap();
        let ms = time_ms(&dev, warmup, runs, sets, |i| {
            let xp = x.ptr() + ((i % sets) * set) as u64;
            // SAFETY: the buffers hold the shapes launched.
            unsafe {
                pixel_shuffle_layernorm(
                    dtype,
                    xp,
                    w.ptr(),
                    b.ptr(),
                    y.ptr(),
                    tiles,
                    c,
                    grid,
                    skip,
                    1e-5,
                )
                .and_then(|l| enqueue(&dev, &l))
            }
        })
        .unwrap();
        let bytes = (2 * n_out + 8 * c) * es;
        r.add(
            &format!("pixel_shuffle_layernorm_{dtype}"),
            label,
            &[tiles, (grid / 2) * (grid / 2), 4 * c],
            bytes,
            ms,
        );
    }
    r.finish();
}
