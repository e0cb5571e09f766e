//! Tiled DC-AE decoding (`OpenUni::decode_tiled`) against the one-piece decode, with the
//! built-in tiny model (the real DC-AE structure at toy widths, random weights), on the CPU and
//! on the emulated GPU.
//!
//! The decoder's attention is global, so its global part (conv_in and the attention stages) runs
//! on the whole latent and only the local part (ResBlock stages and the head) is tiled, each tile
//! reaching the local part's receptive field beyond the pixels it keeps. The tiled image is then
//! the one-piece image up to summation order everywhere, the tile borders included; with less
//! context than the receptive field it is not (the margin is needed, not padding).

use openuni::exec::Device;
use openuni::generate::noise;
use openuni::pipeline::{
    decode_graphs, owned_spans, planned_graph_bytes, tile_starts, DecodeOptions, OpenUni,
    RunOptions, Tiling,
};
use openuni::tiny_model;
use openuni_models::dcae::{DcaeConfig, LocalSplit};
use openuni_tensor::{DType, HostTensor};

const RUN: RunOptions = RunOptions {
    device: Device::Cpu,
    dtype: DType::F32,
};

fn model(dir: &std::path::Path) -> OpenUni {
    let p = tiny_model::ensure(dir).unwrap();
    OpenUni::load(&tiny_model::paths(&p), tiny_model::connector_config()).unwrap()
}

/// (max abs error, relative L2 error) of `a` against `reference`.
fn errors(a: &[f32], reference: &[f32]) -> (f32, f64) {
    assert_eq!(a.len(), reference.len());
    let max = a
        .iter()
        .zip(reference)
        .map(|(x, r)| (x - r).abs())
        .fold(0.0, f32::max);
    let num: f64 = a
        .iter()
        .zip(reference)
        .map(|(&x, &r)| ((x - r) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|&r| (r as f64).powi(2)).sum();
    (max, (num / den).sqrt())
}

/// The SANA VAEs' decoder (dc-ae-f32c32-sana-1.0 / 1.1, docs/models.md).
fn sana_vae_config() -> DcaeConfig {
    serde_json::from_str(
        r#"{"latent_channels": 32, "attention_head_dim": 32,
            "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
            "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"],
            "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
            "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
            "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "upsample_block_type": "interpolate",
            "scaling_factor": 0.41407}"#,
    )
    .unwrap()
}

#[test]
fn the_split_and_its_receptive_field() {
    // SANA's VAE: attention down to stage 3 (1/8 resolution, 512 channels); below it 3 upsamplers
    // and 9 ResBlocks plus conv_out reach 1 + 7 = 8 px at full resolution, 4 + 7 = 11 at 1/2, 6 + 7 =
    // 13 at 1/4, 7 at 1/8: 56 output pixels.
    assert_eq!(
        sana_vae_config().local_split(),
        LocalSplit {
            split: 3,
            channels: 512,
            upscale: 8,
            grid: 4,
            context: 7
        }
    );
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    // The tiny model: one block per stage: 1 + 3 = 4 -> 2, 2 + 3 = 5 -> 3, 3 + 3 = 6 -> 3.
    assert_eq!(
        m.vae_cfg.local_split(),
        LocalSplit {
            split: 3,
            channels: 16,
            upscale: 8,
            grid: 4,
            context: 3
        }
    );
}

/// The activation memory the executors allocate for decoding with the SANA VAE (the planner's
/// arenas: static, the same on every device), one piece and tiled.
#[test]
fn decode_memory_plan_of_the_sana_vae() {
    let vae = sana_vae_config();
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let plan = |px: usize, n: usize, tile: Option<usize>| -> Vec<(&'static str, usize)> {
        let graphs = decode_graphs(&vae, n, px / 32, px / 32, DecodeOptions { tile }).unwrap();
        graphs
            .iter()
            .map(|(name, g)| (*name, planned_graph_bytes(g, DType::BF16)))
            .collect()
    };
    let mut tile_parts = vec![];
    for px in [512, 1024, 2048, 4096] {
        let whole: usize = plan(px, 1, None).iter().map(|p| p.1).sum();
        let g = &decode_graphs(&vae, 1, px / 32, px / 32, DecodeOptions::default()).unwrap()[0].1;
        let p = openuni_graph::plan(g, false);
        eprintln!(
            "  one-piece arena {:.0} MiB, live peak {:.0} MiB",
            mib(p.arena_elems * 2),
            mib(p.live_peak_elems * 2)
        );
        let tiled = plan(px, 1, Some(512));
        let parts: Vec<String> = tiled
            .iter()
            .map(|(name, b)| format!("{name} {:.0} MiB", mib(*b)))
            .collect();
        eprintln!(
            "SANA VAE decode {px}², batch 1, bf16: one piece {:.0} MiB; 512-px tiles: {}",
            mib(whole),
            parts.join(" + ")
        );
        if px >= 1024 {
            tile_parts.push(tiled.last().unwrap().1);
        }
        if px == 1024 {
            // The issue's target: at most 0.8 GiB at 1024², batch 1 (diffusers: about 1.6 GiB).
            assert!(
                whole as f64 <= 0.8 * (1u64 << 30) as f64,
                "1024² plans {:.0} MiB",
                mib(whole)
            );
        }
    }
    // The tile bounds the local part's memory whatever the image size.
    assert!(
        tile_parts.windows(2).all(|w| w[0] == w[1]),
        "{tile_parts:?}"
    );
}

#[test]
fn tiled_decode_equals_the_one_piece_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let ctx = m.vae_cfg.local_split().context;
    // (batch, latent h, w, tile in output px): several tiles in each direction, clamped last
    // tiles, a dimension that one tile covers, a batch of two.
    for (n, h, w, tile_px) in [(1, 8, 10, 64), (2, 7, 9, 96), (1, 12, 3, 128)] {
        let z = noise(3, 32, h, w);
        let z = HostTensor::from_f32(
            [n, 32, h, w],
            z.to_f32_vec()
                .repeat(n)
                .iter()
                .enumerate()
                .map(|(i, &v)| v + (i / (32 * h * w)) as f32 * 0.5)
                .collect(),
        )
        .unwrap();
        let full = m.decode(&z, RUN).unwrap();
        let t = Tiling::new(&m.vae_cfg, tile_px).unwrap();
        assert_eq!(t.context, ctx);
        let tiled = m.decode_tiled(&z, RUN, t).unwrap();
        assert_eq!(tiled.shape, full.shape);
        assert_eq!(full.shape.dims(), &[n, 3, h * 32, w * 32]);
        let (max, rel) = errors(&tiled.to_f32_vec(), &full.to_f32_vec());
        let tiles =
            tile_starts(h * 4, t.tile, 2 * ctx).len() * tile_starts(w * 4, t.tile, 2 * ctx).len();
        eprintln!("CPU f32, latent [{n},32,{h},{w}], {tile_px}-px tiles ({tiles} tiles): max abs error {max:.2e}, relative L2 {rel:.2e}");
        assert!(tiles > 1);
        assert!(
            max <= 1e-5 && rel <= 1e-6,
            "tiled differs from one piece: max {max:.2e}, rel L2 {rel:.2e}"
        );
        // decode_with picks the tiling for a tile flag.
        let with = m
            .decode_with(
                &z,
                RUN,
                DecodeOptions {
                    tile: Some(tile_px),
                },
            )
            .unwrap();
        assert_eq!(with.to_f32_vec(), tiled.to_f32_vec());
    }
}

#[test]
fn less_context_than_the_receptive_field_differs() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let ctx = m.vae_cfg.local_split().context;
    let z = noise(4, 32, 8, 10);
    let full = m.decode(&z, RUN).unwrap().to_f32_vec();
    for c in (0..ctx).rev() {
        // The same tile size, so only the context changes.
        let tiled = m
            .decode_tiled(
                &z,
                RUN,
                Tiling {
                    tile: 8,
                    context: c,
                },
            )
            .unwrap()
            .to_f32_vec();
        let (max, rel) = errors(&tiled, &full);
        eprintln!("CPU f32, context {c} of {ctx}: max abs error {max:.2e}, relative L2 {rel:.2e}");
        // Measured: context 2 -> max abs 7.8e-3, 1 -> 3.0e-1 (the full context gives 0): the
        // receptive field is tight, one pixel less already lets the tiles' zero padding in.
        assert!(max > 1e-3, "context {c}: max abs error {max:.2e}");
    }
}

#[test]
fn tiled_decode_on_the_emulated_gpu() {
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let z = noise(5, 32, 6, 7);
    let reference = m.decode(&z, RUN).unwrap().to_f32_vec();
    for dtype in [DType::F32, DType::BF16] {
        let run = RunOptions {
            device: Device::Emu,
            dtype,
        };
        let full = m.decode(&z, run).unwrap().to_f32_vec();
        let tiled = m
            .decode_tiled(&z, run, Tiling::new(&m.vae_cfg, 96).unwrap())
            .unwrap()
            .to_f32_vec();
        let (max, rel) = errors(&tiled, &full);
        let (_, rel_ref) = errors(&tiled, &reference);
        eprintln!("emu {dtype}, 96-px tiles (12 tiles) vs one piece on the device: max abs {max:.2e}, relative L2 {rel:.2e}; vs the CPU f32 decode: relative L2 {rel_ref:.2e}");
        // bf16: the features cross between the two graphs as the bf16 values the one-piece
        // graph keeps, and no kernel mixes pixels beyond the receptive field, so the tiles agree
        // with the device's own one-piece decode to the accumulations' summation order.
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-3 };
        assert!(
            rel <= tol,
            "{dtype}: tiled differs from one piece: rel L2 {rel:.2e}"
        );
        assert!(
            rel_ref <= if dtype == DType::F32 { 1e-5 } else { 5e-2 },
            "{dtype}: vs the CPU reference {rel_ref:.2e}"
        );
    }
}

#[test]
fn one_tile_covering_the_latent_is_the_one_piece_decode() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let z = noise(3, 32, 6, 5);
    let full = m.decode(&z, RUN).unwrap().to_f32_vec();
    // The global and local parts as two graphs compute exactly what the one graph does.
    assert_eq!(
        m.decode_tiled(
            &z,
            RUN,
            Tiling {
                tile: 24,
                context: 3
            }
        )
        .unwrap()
        .to_f32_vec(),
        full
    );
    // decode_with: a tile that covers the latent (or none) decodes in one piece.
    assert_eq!(
        m.decode_with(&z, RUN, DecodeOptions { tile: Some(192) })
            .unwrap()
            .to_f32_vec(),
        full
    );
    assert_eq!(
        m.decode_with(&z, RUN, DecodeOptions::default())
            .unwrap()
            .to_f32_vec(),
        full
    );
}

#[test]
fn tile_layout_and_flags() {
    assert_eq!(tile_starts(8, 4, 2), vec![0, 2, 4]);
    assert_eq!(tile_starts(10, 4, 2), vec![0, 2, 4, 6]);
    assert_eq!(tile_starts(64, 16, 2), vec![0, 14, 28, 42, 48]);
    assert_eq!(tile_starts(16, 16, 2), vec![0]);
    assert_eq!(tile_starts(5, 16, 2), vec![0]);
    // Kept spans partition [0, n), each at least `context` inside its tile's inner edges.
    for (n, tile, ctx) in [
        (32, 8, 3),
        (40, 8, 3),
        (64, 64, 7),
        (256, 64, 7),
        (100, 16, 7),
    ] {
        let starts = tile_starts(n, tile, 2 * ctx);
        let spans = owned_spans(&starts, n, ctx);
        assert_eq!(spans.first().unwrap().0, 0);
        assert_eq!(spans.last().unwrap().1, n);
        for (i, (&s, &(lo, hi))) in starts.iter().zip(&spans).enumerate() {
            assert!(lo < hi, "{n} {tile} {ctx}: empty span {i}");
            assert!(
                i == 0 || lo >= s + ctx,
                "{n} {tile} {ctx}: span {i} starts too close to its tile's edge"
            );
            assert!(
                i + 1 == starts.len() || hi + ctx <= s + tile,
                "{n} {tile} {ctx}: span {i} ends too close to its tile's edge"
            );
            assert!(i + 1 == spans.len() || hi == spans[i + 1].0);
        }
    }

    let vae = sana_vae_config();
    let f = |t, h, w| DecodeOptions::from_flags(t, h, w, &vae);
    // Defaults: one piece up to 1024², then 512-px tiles.
    assert_eq!(f(None, 1024, 1024).unwrap(), DecodeOptions { tile: None });
    assert_eq!(
        f(None, 2048, 2048).unwrap(),
        DecodeOptions { tile: Some(512) }
    );
    assert_eq!(
        f(None, 1024, 1056).unwrap(),
        DecodeOptions { tile: Some(512) }
    );
    assert_eq!(
        f(Some(128), 512, 512).unwrap(),
        DecodeOptions { tile: Some(128) }
    );
    assert_eq!(
        Tiling::new(&vae, 512).unwrap(),
        Tiling {
            tile: 64,
            context: 7
        }
    );

    let err = |t| f(Some(t), 2048, 2048).unwrap_err().to_string();
    assert!(
        err(0).contains("--decode-tile 0 is not a positive multiple of 32"),
        "{}",
        err(0)
    );
    assert!(err(500).contains("--decode-tile 500 is not a positive multiple of 32"));
    assert!(err(96).contains("--decode-tile 96 keeps no pixels of its own: each tile decodes 56 px of context on each side"), "{}", err(96));
    assert!(err(96).contains("larger than 112 px"));
}

#[test]
fn bad_latents_and_tiles_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model(tmp.path());
    let z = noise(1, 32, 4, 4);
    let e = m
        .decode_tiled(
            &z,
            RUN,
            Tiling {
                tile: 6,
                context: 3,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("keeps nothing of its own with 3 pixels of context"),
        "{e}"
    );
    let wrong = HostTensor::from_f32([1, 16, 4, 4], vec![0.0; 256]).unwrap();
    for e in [
        m.decode_tiled(
            &wrong,
            RUN,
            Tiling {
                tile: 8,
                context: 3,
            },
        )
        .unwrap_err()
        .to_string(),
        m.decode(&wrong, RUN).unwrap_err().to_string(),
    ] {
        assert!(e.contains("expected [B, 32, h, w]"), "{e}");
    }
    let empty = HostTensor::from_f32([1, 32, 0, 4], vec![]).unwrap();
    let e = m
        .decode_tiled(
            &empty,
            RUN,
            Tiling {
                tile: 8,
                context: 3,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty latent"), "{e}");
}
