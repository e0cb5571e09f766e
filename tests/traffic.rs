//! Host<->device traffic of a generation on the emulated GPU (issue 13, item 1): the emulated
//! driver counts every byte copied host->device and device->host (crates/emu, `count_traffic`),
//! and a `--batch 8` generation of the tiny model in bf16, after a first generation has uploaded
//! the weights and built the resident executors, must move exactly the bytes listed below and no
//! more: 2,808 B up and 98,320 B down. The noise is drawn on the device from the images' seeds
//! (16 B an image up instead of the 4,096 B of noise: 6,776 B up before). Against 18,808 /
//! 102,416 B before that: 4,096 B less each way
//! since the decoder's input is made on the device (the final latents [8, 32, 2, 2] f32 no longer
//! come back to the host nor go into the decoder as `latents / scaling_factor`), and 7,936 B less
//! up since the conditioning executor stays resident for the batch's prompt lengths (its
//! constant tables are not uploaded again; 14,712 B up with them).
//! docs/gpu-plan.md ("Host<->device traffic") says what still moves and why.
//! Also checks that the device's token gather, its `latents / scaling_factor` (in one piece and
//! tiled) and its uint8 quantization give the host path's pixels.

use openuni::exec::Device;
use openuni::pipeline::{
    DecodeOptions, GenerationBatch, LatentNoise, OpenUni, RunOptions, SamplingParams,
};
use openuni::tiny_model;
use openuni_models::scheduler::SamplerKind;
use openuni_tensor::DType;

const N: usize = 8;
const STEPS: usize = 2;
/// 64 px images: a 2x2 latent for the tiny DC-AE (32x upscale).
const PX: usize = 64;

/// Eight different prompts (ids below the tiny vocabulary of 328) of the lengths `bench --plan`
/// models (30-token prompts, 16-token unconditional prompts), so that the plan's host<->device
/// bytes can be checked against the measured ones.
/// `shift` moves every id (the same lengths, other prompts).
fn batch(c: usize, h: usize, w: usize, shift: u32) -> GenerationBatch {
    let prompts: Vec<(Vec<u32>, Vec<u32>)> = (0..N as u32)
        .map(|i| {
            (
                (10 + 7 * i + shift..40 + 7 * i + shift).collect(),
                (200 + i + shift..216 + i + shift).collect(),
            )
        })
        .collect();
    GenerationBatch {
        prompts,
        noise: LatentNoise::seeded((0..N as u64).map(|i| 11 + i).collect(), c, h, w),
    }
}

/// The emulated driver's byte counters are per process: the tests of this file run one at a time.
static COUNTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn batch_of_8_moves_only_the_listed_bytes() {
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    let _counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let m = OpenUni::load(
        &tiny_model::paths(&tiny_model::ensure(dir.path()).unwrap()),
        tiny_model::connector_config(),
    )
    .unwrap();
    let run = RunOptions {
        device: Device::Emu,
        dtype: DType::BF16,
    };
    let p = SamplingParams {
        steps: STEPS,
        guidance: 4.5,
        sampler: SamplerKind::DpmSolver,
        flow_shift: 3.0,
        decode: DecodeOptions::default(),
    };
    let (c, h, w) = (m.transformer_cfg.in_channels, PX / 32, PX / 32);
    let b = batch(c, h, w, 0);
    let generate = || {
        let mut images = vec![];
        m.generate_batches(
            std::slice::from_ref(&b),
            &p,
            run,
            |_| {},
            |_, img| {
                images.push(img);
                Ok(())
            },
        )
        .unwrap();
        images.remove(0)
    };
    // The first generation uploads the weights and builds the resident executors.
    let first = generate();
    assert!(
        openuni_cuda::reset_emu_traffic(),
        "the emulated driver exports no traffic counters"
    );
    let second = generate();
    let (htod, dtoh) = openuni_cuda::emu_traffic().expect("emulated driver");
    assert_eq!(
        first.data.as_bytes(),
        second.data.as_bytes(),
        "the same batch gave another image the second time"
    );
    // The values handed over on the device (prompt embeddings, K/V, the final latents into the
    // device's `latents / scaling_factor`) are the ones the host path sets (`denoise` from host
    // prompt embeddings, its latents read back, divided on the host and uploaded by `decode_with`):
    // a bf16 value read to f32 and set again is exact, and the device's division is the host's.
    // The noise the device drew from the seeds is the CPU twin's, which the host path uploads.
    let pairs: Vec<(&[u32], &[u32])> = b.prompts.iter().map(|(cd, u)| (&cd[..], &u[..])).collect();
    let cond = m.condition_batch(&pairs, run).unwrap();
    let lat = m
        .denoise(
            &cond.prompt_embeds,
            &b.noise.to_host().unwrap(),
            STEPS,
            p.guidance,
            p.sampler,
            p.flow_shift,
            run,
            |_| {},
        )
        .unwrap();
    let host_path = m.decode_with(&lat, run, p.decode).unwrap();
    // ... and the pixels quantized on the device are the host rule's on the f32 image.
    let (host_pixels, _) = openuni::pipeline::to_uint8_nhwc(&host_path).unwrap();
    assert_eq!(
        first.data.as_bytes(),
        &host_pixels[..],
        "the device hand-over or the device quantization changed the image"
    );

    // What a batch moves, tensor by tensor (f32 = 4 bytes a value).
    let q = m.num_queries;
    let tokens: usize = b
        .prompts
        .iter()
        .map(|(cd, u)| cd.len() + u.len())
        .sum::<usize>()
        + 2 * N * q;
    let image = N * 3 * PX * PX;
    // Not the conditioning executor's constant tables (the attention's segment table and RoPE
    // table, 7,936 B here): the executor stays resident for these prompt lengths, so the second
    // batch uploads neither them nor any weight, only its ids.
    // Storage bytes of a scalar read back in the executors' dtype (a non-finite flag).
    let flag = run.dtype.size_in_bytes();
    let up = [
        ("conditioning: token ids, the meta-queries' ids appended [1, tokens] f32 (gathered from the tables on the device)", tokens * 4),
        // Not the noise [N, C, h, w]: it is drawn on the device ("sampler.prime", Op::GaussianNoise).
        ("sampler: each image's noise seed as 4 limbs [N, 4] f32, once (the noise, the latents, the multistep history and the CFG + solver step stay on the device)", N * 4 * 4),
        ("step: timesteps [2N] f32, every step", STEPS * 2 * N * 4),
        ("sampler: the step's coefficients [7] f32, every step", STEPS * 7 * 4),
        // Not the decoder's input: `latents / scaling_factor` is made on the device from the
        // sampler's latents ("decoder.input", Op::DivScalar) and handed to the decoder there.
    ];
    let down = [
        ("conditioning: non-finite flags of hidden, connector, prompt embeddings (one scalar each)", 3 * flag),
        ("sampler: non-finite flag of the latents after each step (one f32 scalar)", STEPS * 4),
        // Not the final latents: they stay on the device for the decoder's input.
        ("decoder: non-finite flag of the image (one scalar)", flag),
        ("decoder: image [N, H, W, 3] uint8 (quantized on the device)", image),
    ];
    for (what, bytes) in up.iter() {
        println!("host->device {bytes:>9} B  {what}");
    }
    for (what, bytes) in down.iter() {
        println!("device->host {bytes:>9} B  {what}");
    }
    let (want_up, want_down): (usize, usize) =
        (up.iter().map(|x| x.1).sum(), down.iter().map(|x| x.1).sum());
    println!("measured: host->device {htod} B (listed {want_up}), device->host {dtoh} B (listed {want_down})");
    assert_eq!(
        htod as usize, want_up,
        "host->device bytes of a batch of {N}"
    );
    assert_eq!(
        dtoh as usize, want_down,
        "device->host bytes of a batch of {N}"
    );

    // `openuni bench --plan`'s model of the same batch (docs/gpu-plan.md) counts the same bytes.
    let opts = openuni::bench::plan::PlanOptions {
        variant: "tiny".into(),
        batches: vec![N],
        steps: STEPS,
        size: Some(PX),
        json: None,
        command: String::new(),
    };
    let plan = openuni::bench::plan::run(&opts).unwrap();
    let stages = &plan.results[0].stages;
    let (plan_up, plan_down) = (
        stages.iter().map(|s| s.htod_bytes_per_batch).sum::<f64>(),
        stages.iter().map(|s| s.dtoh_bytes_per_batch).sum::<f64>(),
    );
    println!("bench --plan tiny, batch {N}: host->device {plan_up} B, device->host {plan_down} B");
    assert_eq!(
        plan_up as usize, htod as usize,
        "the plan's host->device bytes against the measured ones"
    );
    assert_eq!(
        plan_down as usize, dtoh as usize,
        "the plan's device->host bytes against the measured ones"
    );

    // Two batches of other prompts of the same lengths in one call: twice a batch's bytes. The
    // second batch's conditioning runs on the first one's executor (its tables and weights are
    // not uploaded again), as every other stage's.
    let two = [batch(c, h, w, 1), batch(c, h, w, 2)];
    assert!(openuni_cuda::reset_emu_traffic());
    let mut images = 0;
    m.generate_batches(
        &two,
        &p,
        run,
        |_| {},
        |_, _| {
            images += 1;
            Ok(())
        },
    )
    .unwrap();
    let (htod2, dtoh2) = openuni_cuda::emu_traffic().expect("emulated driver");
    println!("two batches: host->device {htod2} B, device->host {dtoh2} B");
    assert_eq!(images, 2);
    assert_eq!(
        (htod2 as usize, dtoh2 as usize),
        (2 * want_up, 2 * want_down),
        "host<->device bytes of two batches of {N} in one call"
    );
}

/// A tiled decode in the pipeline reads `latents / scaling_factor` where "decoder.input" made it
/// (the decoder's global part takes the device value): its pixels equal the host path's (latents
/// read back, divided on the host, uploaded, decoded in the same tiles) bit for bit.
#[test]
fn tiled_decode_of_the_device_latents_equals_the_host_path() {
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    let _counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let m = OpenUni::load(
        &tiny_model::paths(&tiny_model::ensure(dir.path()).unwrap()),
        tiny_model::connector_config(),
    )
    .unwrap();
    let run = RunOptions {
        device: Device::Emu,
        dtype: DType::BF16,
    };
    // 192 px (a 6x6 latent) in 96-px tiles: four tiles.
    let decode = DecodeOptions { tile: Some(96) };
    let p = SamplingParams {
        steps: 1,
        guidance: 4.5,
        sampler: SamplerKind::DpmSolver,
        flow_shift: 3.0,
        decode,
    };
    let c = m.transformer_cfg.in_channels;
    let prompts = vec![(
        (10..40).collect::<Vec<u32>>(),
        (200..216).collect::<Vec<u32>>(),
    )];
    let b = GenerationBatch {
        prompts,
        noise: LatentNoise::seeded(vec![3], c, 6, 6),
    };
    let mut images = vec![];
    m.generate_batches(
        std::slice::from_ref(&b),
        &p,
        run,
        |_| {},
        |_, img| {
            images.push(img);
            Ok(())
        },
    )
    .unwrap();
    m.resident_executor("decoder.global", &[1, c, 6, 6], run, |_| Ok(()))
        .expect("the pipeline decoded in tiles");
    let cond = m.condition(&b.prompts[0].0, &b.prompts[0].1, run).unwrap();
    let lat = m
        .denoise(
            &cond.prompt_embeds,
            &b.noise.to_host().unwrap(),
            p.steps,
            p.guidance,
            p.sampler,
            p.flow_shift,
            run,
            |_| {},
        )
        .unwrap();
    let (host_pixels, dims) =
        openuni::pipeline::to_uint8_nhwc(&m.decode_with(&lat, run, decode).unwrap()).unwrap();
    assert_eq!(dims, [1, 192, 192, 3]);
    assert_eq!(
        images[0].data.as_bytes(),
        &host_pixels[..],
        "the tiled decode of the device's latents / scaling_factor changed the image"
    );
}
