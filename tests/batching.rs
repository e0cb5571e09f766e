//! Batched generation (`--batch`): N prompts conditioned, denoised and decoded together must give
//! each image what a batch of one gives it, on the CPU reference and on the emulated GPU (where
//! the step runs as a captured CUDA graph and every stage's executor stays resident).

use openuni::exec::Device;
use openuni::generate::noise;
use openuni::pipeline::{OpenUni, RunOptions};
use openuni::tiny_model;
use openuni_models::scheduler::SamplerKind;
use openuni_tensor::{DType, HostTensor};

fn model(dir: &std::path::Path) -> OpenUni {
    let p = tiny_model::ensure(dir).unwrap();
    OpenUni::load(&tiny_model::paths(&p), tiny_model::connector_config()).unwrap()
}

fn rel_l2(a: &[f32], r: &[f32]) -> f64 {
    assert_eq!(a.len(), r.len());
    let num: f64 = a.iter().zip(r).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = r.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Three prompts of different lengths (ids below the tiny vocabulary), uncond shorter.
fn prompts() -> Vec<(Vec<u32>, Vec<u32>)> {
    vec![
        ((10..27).collect(), (3..9).collect()),
        ((40..44).collect(), (3..9).collect()),
        ((5..36).collect(), (50..52).collect()),
    ]
}

/// Runs the three prompts as one batch and one by one; returns the worst relative L2 error of the
/// batched prompt embeddings, latents and decoded images against the single runs.
fn batched_vs_single(run: RunOptions) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let ps = prompts();
    let pairs: Vec<(&[u32], &[u32])> = ps.iter().map(|(c, u)| (&c[..], &u[..])).collect();
    let (c, h, w) = (m.transformer_cfg.in_channels, 4, 6);
    let n = ps.len();

    let batch = m.condition_batch(&pairs, run).unwrap();
    let mut z = vec![];
    for i in 0..n {
        z.extend(noise(7 + i as u64, c, h, w).to_f32_vec());
    }
    let z = HostTensor::from_f32([n, c, h, w], z).unwrap();
    let lat = m
        .denoise(
            &batch.prompt_embeds,
            &z,
            4,
            4.5,
            SamplerKind::DpmSolver,
            3.0,
            run,
            |_| {},
        )
        .unwrap();
    let img = m.decode(&lat, run).unwrap();

    let pe = batch.prompt_embeds.to_f32_vec();
    let per_pe = pe.len() / (2 * n);
    let (lat_b, img_b) = (lat.to_f32_vec(), img.to_f32_vec());
    let (per_lat, per_img) = (lat_b.len() / n, img_b.len() / n);
    // The comparison means something only if the images differ from each other.
    assert!(
        rel_l2(
            &pe[n * per_pe..(n + 1) * per_pe],
            &pe[(n + 1) * per_pe..(n + 2) * per_pe]
        ) > 1e-2,
        "two prompts gave the same embeddings"
    );
    assert!(
        rel_l2(&lat_b[..per_lat], &lat_b[per_lat..2 * per_lat]) > 1e-2,
        "two images gave the same latents"
    );
    let (mut e_pe, mut e_lat, mut e_img) = (0f64, 0f64, 0f64);
    for (i, (cond, uncond)) in pairs.iter().enumerate() {
        let single = m.condition(cond, uncond, run).unwrap();
        let s = single.prompt_embeds.to_f32_vec();
        // Batched rows: [uncond_0..n-1, cond_0..n-1]; single rows: [uncond, cond].
        e_pe = e_pe.max(rel_l2(&pe[i * per_pe..(i + 1) * per_pe], &s[..per_pe]));
        e_pe = e_pe.max(rel_l2(
            &pe[(n + i) * per_pe..(n + i + 1) * per_pe],
            &s[per_pe..],
        ));
        let zi = noise(7 + i as u64, c, h, w);
        let li = m
            .denoise(
                &single.prompt_embeds,
                &zi,
                4,
                4.5,
                SamplerKind::DpmSolver,
                3.0,
                run,
                |_| {},
            )
            .unwrap();
        e_lat = e_lat.max(rel_l2(
            &lat_b[i * per_lat..(i + 1) * per_lat],
            &li.to_f32_vec(),
        ));
        let ii = m.decode(&li, run).unwrap();
        e_img = e_img.max(rel_l2(
            &img_b[i * per_img..(i + 1) * per_img],
            &ii.to_f32_vec(),
        ));
    }
    (e_pe, e_lat, e_img)
}

/// The emulated-GPU tests of this file share the process's device and its stream: a CUDA-graph
/// capture by one would catch the other's calls, so they run one at a time.
static EMU: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn batch_equals_single_images_on_cpu() {
    let (pe, lat, img) = batched_vs_single(RunOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    });
    println!("cpu f32, batch of 3 vs one by one: prompt_embeds {pe:.2e}, latents {lat:.2e}, image {img:.2e}");
    // Same f32 arithmetic per row; only GEMM blocking may change summation order.
    assert!(
        pe < 1e-5 && lat < 1e-5 && img < 1e-5,
        "batched differs from single: {pe:.2e} {lat:.2e} {img:.2e}"
    );
}

#[test]
fn batch_equals_single_images_on_the_emulated_gpu() {
    let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    for dtype in [DType::F32, DType::BF16] {
        let (pe, lat, img) = batched_vs_single(RunOptions {
            device: Device::Emu,
            dtype,
        });
        println!("emu {dtype}, batch of 3 vs one by one (captured step graph): prompt_embeds {pe:.2e}, latents {lat:.2e}, image {img:.2e}");
        // Rows never mix in any kernel, so even bf16 agrees to rounding noise of the f32
        // accumulations (summation order may differ with the batch's GEMM tiling).
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        assert!(
            pe < tol && lat < tol && img < tol,
            "{dtype}: batched differs from single: {pe:.2e} {lat:.2e} {img:.2e}"
        );
    }
}

/// Four DPM-Solver++ steps at guidance 4.5, the whole-image decode.
fn four_steps() -> openuni::pipeline::SamplingParams {
    openuni::pipeline::SamplingParams {
        steps: 4,
        guidance: 4.5,
        sampler: SamplerKind::DpmSolver,
        flow_shift: 3.0,
        decode: openuni::pipeline::DecodeOptions::default(),
    }
}

/// Every batch's images (f32) as `generate_batches` gives them, nobody leaving.
fn whole_batches(
    m: &OpenUni,
    batches: &[openuni::pipeline::GenerationBatch],
    params: &openuni::pipeline::SamplingParams,
    run: RunOptions,
) -> Vec<Vec<f32>> {
    let mut full = vec![];
    m.generate_batches(
        batches,
        params,
        run,
        |_| {},
        |_, img| {
            full.push(img.to_f32_vec());
            Ok(())
        },
    )
    .unwrap();
    full
}

/// Through `generate_batches_rows` (what `openuni serve` runs, with the stop check it sets when a
/// client leaves): in batch 0 of three images, image 1 leaves after the second of four steps and
/// the other two go on at a batch of two; every image of batch 1 leaves at once (the batch is
/// skipped and batch 2 still runs; `all_three` false: batch 0 alone). The images that stay are bit for bit the ones the same call
/// gives without anybody leaving. Returns how many image values differ from those.
fn rows_leave_a_running_batch(run: RunOptions, all_three: bool) -> usize {
    use openuni::pipeline::GenerationBatch;
    use std::cell::{Cell, RefCell};
    use std::rc::Rc;
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let (c, h, w) = (m.transformer_cfg.in_channels, 4, 6);
    let batch = |seed: u64| {
        let ps = prompts();
        let n = ps.len();
        // Drawn from seeds where the sampler runs (`generate`'s path); the other test gives values.
        GenerationBatch {
            prompts: ps,
            noise: openuni::pipeline::LatentNoise::seeded(
                (0..n as u64).map(|i| seed + i).collect(),
                c,
                h,
                w,
            ),
        }
    };
    let batches = if all_three {
        vec![batch(7), batch(20), batch(30)]
    } else {
        vec![batch(7)]
    };
    let params = four_steps();
    let full = whole_batches(&m, &batches, &params, run);

    let asked = Rc::new(Cell::new(0));
    let counter = asked.clone();
    m.set_stop_check(Some(Box::new(move |batch| match batch {
        0 => {
            counter.set(counter.get() + 1);
            vec![true, counter.get() <= 2, true]
        }
        1 => vec![false; 3],
        _ => vec![true; 3],
    })));
    let sizes = RefCell::new(vec![]);
    let (mut got, mut skipped) = (vec![], vec![]);
    m.generate_batches_rows(
        &batches,
        &params,
        run,
        |n| sizes.borrow_mut().push(n),
        |i, img, rows| {
            got.push((i, rows.to_vec(), img.to_f32_vec()));
            Ok(())
        },
        |i| skipped.push(i),
    )
    .unwrap();
    m.set_stop_check(None);
    let (steps, done): (Vec<usize>, Vec<(usize, Vec<usize>)>) = if all_three {
        (
            vec![3, 3, 2, 2, 3, 3, 3, 3],
            vec![(0, vec![0, 2]), (2, vec![0, 1, 2])],
        )
    } else {
        (vec![3, 3, 2, 2], vec![(0, vec![0, 2])])
    };
    assert_eq!(
        sizes.into_inner(),
        steps,
        "image 1 of batch 0 did not leave after two steps"
    );
    assert_eq!(skipped, if all_three { vec![1] } else { vec![] });
    assert_eq!(
        got.iter()
            .map(|(i, r, _)| (*i, r.clone()))
            .collect::<Vec<_>>(),
        done
    );
    let mut differing = 0;
    for (i, rows, img) in &got {
        let per = full[*i].len() / 3;
        for (k, &r) in rows.iter().enumerate() {
            differing += img[k * per..(k + 1) * per]
                .iter()
                .zip(&full[*i][r * per..(r + 1) * per])
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
        }
    }
    // Every image of a batch leaving: `denoise` ends with Stopped.
    m.set_stop_check(Some(Box::new(|_| vec![false; 3])));
    let cond = m
        .condition_batch(
            &batches[0]
                .prompts
                .iter()
                .map(|(c, u)| (&c[..], &u[..]))
                .collect::<Vec<_>>(),
            run,
        )
        .unwrap();
    let e = m
        .denoise(
            &cond.prompt_embeds,
            &batches[0].noise.to_host().unwrap(),
            4,
            4.5,
            SamplerKind::DpmSolver,
            3.0,
            run,
            |_| {},
        )
        .unwrap_err();
    assert!(e.is::<openuni::pipeline::Stopped>(), "{e:#}");
    m.set_stop_check(None);
    differing
}

#[test]
fn rows_leaving_a_batch_keep_the_others_bits_on_cpu() {
    let differing = rows_leave_a_running_batch(
        RunOptions {
            device: Device::Cpu,
            dtype: DType::F32,
        },
        true,
    );
    assert_eq!(
        differing, 0,
        "image values differing from the whole batch's"
    );
}

#[test]
fn rows_leaving_a_batch_keep_the_others_bits_on_the_emulated_gpu() {
    let _one_at_a_time = EMU.lock().unwrap_or_else(|e| e.into_inner());
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    // bf16, what `openuni serve` runs on a GPU (the step re-planned and captured at each size);
    // batch 0 only, to keep the emulator's time small.
    let differing = rows_leave_a_running_batch(
        RunOptions {
            device: Device::Emu,
            dtype: DType::BF16,
        },
        false,
    );
    assert_eq!(
        differing, 0,
        "image values differing from the whole batch's"
    );
}

/// Out of device memory (the emulated GPU with a small memory cap): `generate` names the batch
/// that failed and one that fits by the memory plan, and that batch then runs under the same cap.
#[test]
fn out_of_memory_names_a_batch_that_fits() {
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_openuni"));
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a\nb\nc\nd\ne\nf\ng\nh\n").unwrap();
    let generate = |batch: &str| {
        let out = std::process::Command::new(&exe)
            .args([
                "generate",
                "--prompts",
                prompts.to_str().unwrap(),
                "--device",
                "emu",
                "--dtype",
                "bf16",
            ])
            .args([
                "--height",
                "64",
                "--width",
                "64",
                "--steps",
                "1",
                "--batch",
                batch,
                "--out",
                dir.path().join("out").to_str().unwrap(),
            ])
            // Every stage resident (releasing them when done lets batch 8 fit this cap).
            .args(["--release-stages", "no"])
            // 64 MiB go to the two lanes' cuBLASLt workspaces; the rest holds weights and a few
            // images' graphs (67 MiB since the DiT fusions shrank batch 8's plan to 3.8 MiB).
            .env("OPENUNI_EMU_MEMORY", "67MiB")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = generate("8");
    assert_eq!(code, Some(2), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string();
    println!("{line}");
    assert!(line.contains("out of GPU memory at --batch 8"), "{err}");
    let fits: usize = line
        .split("; --batch ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no batch advised: {line}"));
    assert!((1..8).contains(&fits));
    let (code, err) = generate(&fits.to_string());
    assert_eq!(
        code,
        Some(0),
        "the advised --batch {fits} failed too: {err}"
    );
}

/// An image's denoising on the CPU does not depend on the batch it is in, bit for bit: the same
/// prompt embeddings and noise give the same latents alone and as the second image of two. (The
/// sgemm libraries change kernels with the row count; the executor runs each image's rows as their
/// own GEMM for this.) Sizes from the tiny 4×6 latents, where OpenBLAS's small-matrix kernels
/// decide, to 32×32.
#[test]
fn an_images_latents_do_not_depend_on_its_batch_on_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let run = RunOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    let ps = prompts();
    let pairs: Vec<(&[u32], &[u32])> = ps[..2].iter().map(|(c, u)| (&c[..], &u[..])).collect();
    let c = m.transformer_cfg.in_channels;
    let embeds = m.condition_batch(&pairs, run).unwrap().prompt_embeds;
    // Rows [uncond_0, uncond_1, cond_0, cond_1]; image 1 alone: [uncond_1, cond_1].
    let pe = embeds.to_f32_vec();
    let per = pe.len() / 4;
    let single: Vec<f32> = pe[per..2 * per]
        .iter()
        .chain(&pe[3 * per..])
        .copied()
        .collect();
    let mut dims = embeds.shape.dims().to_vec();
    dims[0] = 2;
    let single = HostTensor::from_f32(dims, single).unwrap();
    for (h, w) in [(4, 6), (8, 8), (32, 32)] {
        let z: Vec<f32> = [7u64, 8]
            .iter()
            .flat_map(|&s| noise(s, c, h, w).to_f32_vec())
            .collect();
        let both = m
            .denoise(
                &embeds,
                &HostTensor::from_f32([2, c, h, w], z).unwrap(),
                2,
                4.5,
                SamplerKind::DpmSolver,
                3.0,
                run,
                |_| {},
            )
            .unwrap()
            .to_f32_vec();
        let alone = m
            .denoise(
                &single,
                &noise(8, c, h, w),
                2,
                4.5,
                SamplerKind::DpmSolver,
                3.0,
                run,
                |_| {},
            )
            .unwrap()
            .to_f32_vec();
        let differing = alone
            .iter()
            .zip(&both[alone.len()..])
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differing, 0, "{h}x{w} latents: {differing} of {} values differ between the image alone and in a batch of two", alone.len());
    }
}

/// [`rows_leave_a_running_batch`] with two images of 4×6 latents (OpenBLAS's small-matrix sizes):
/// the image that stays after the other leaves (after step 1, 2 or 3 of 4) keeps the bits it has
/// when nobody leaves.
#[test]
fn an_image_staying_in_a_batch_of_two_keeps_its_bits_on_cpu() {
    use openuni::pipeline::GenerationBatch;
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let run = RunOptions {
        device: Device::Cpu,
        dtype: DType::F32,
    };
    let c = m.transformer_cfg.in_channels;
    let (h, w) = (4, 6);
    let z = (0..2)
        .flat_map(|i| noise(7 + i as u64, c, h, w).to_f32_vec())
        .collect();
    let batches = vec![GenerationBatch {
        prompts: prompts()[..2].to_vec(),
        noise: openuni::pipeline::LatentNoise::Values(
            HostTensor::from_f32([2, c, h, w], z).unwrap(),
        ),
    }];
    let params = four_steps();
    let full = whole_batches(&m, &batches, &params, run);
    let per = full[0].len() / 2;
    for leave_after in 1..=3 {
        let asked = std::rc::Rc::new(std::cell::Cell::new(0));
        let counter = asked.clone();
        m.set_stop_check(Some(Box::new(move |_| {
            counter.set(counter.get() + 1);
            vec![counter.get() <= leave_after, true]
        })));
        let mut got = vec![];
        m.generate_batches_rows(
            &batches,
            &params,
            run,
            |_| {},
            |_, img, rows| {
                got.push((rows.to_vec(), img.to_f32_vec()));
                Ok(())
            },
            |_| {},
        )
        .unwrap();
        m.set_stop_check(None);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, vec![1], "image 0 did not leave");
        let differing = got[0]
            .1
            .iter()
            .zip(&full[0][per..])
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            differing, 0,
            "leaving after step {leave_after}: {differing} of {per} image values differ"
        );
    }
}
