//! DC-AE decoding on the resident executors: in one piece, or in exact tiles (the geometry is
//! `openuni_models::dcae::Tiling`, next to the decoder's receptive-field logic).

use openuni_models::dcae::{
    decoder_global_graph, decoder_graph, decoder_tile_graph, owned_spans, tile_starts, DcaeConfig,
    Tiling, FEATURES, LATENT, SAMPLE,
};
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_graph::{Graph, GraphBuilder};
use openuni_models::scheduler;
use openuni_tensor::{DType, HostData, HostTensor, Shape};

use crate::exec::TensorHandle;

use super::resident::Stage;
use super::sampling::{check_finite, check_finite_flag, with_finite_flags};
use super::{to_uint8_nhwc, OpenUni, RunOptions};

/// The decoder graph's uint8 pixels [B, H, W, 3] (`Op::QuantizeU8` of [`SAMPLE`]): what a
/// generation reads back, one byte a value.
pub const IMAGE_U8: &str = "image_u8";

/// The decoder as the pipeline runs it: the model's [`SAMPLE`] [B, 3, H, W], its uint8 pixels
/// [`IMAGE_U8`] and its non-finite flag, each read from the device only when wanted.
pub fn pipeline_decoder_graph(vae: &DcaeConfig, shape: &Shape) -> Result<Graph> {
    let mut b = GraphBuilder::extend(with_finite_flags(decoder_graph(vae, shape)?, &[SAMPLE.0])?);
    let sample = b
        .output_id(SAMPLE.0)
        .context("the decoder graph has no sample output")?;
    let pixels = b.quantize_u8(IMAGE_U8, sample)?;
    b.output(IMAGE_U8, pixels)?;
    Ok(b.finish())
}

/// The input of [`decoder_input_graph`]: the sampler's f32 latents [B, C, h, w].
pub const DENOISED: &str = scheduler::LATENTS.0;

/// "decoder.input", f32 on every device: the decoder's input [`LATENT`] = `latents / scaling_factor`
/// ([`Op::DivScalar`](openuni_graph::Op::DivScalar), one correctly rounded f32 division a value,
/// as the host divides) from the sampler's latents [`DENOISED`] of `shape`, made where the
/// sampler left them so that they never cross to the host before the decode.
pub fn decoder_input_graph(vae: &DcaeConfig, shape: &Shape) -> Result<Graph> {
    let mut b = GraphBuilder::new();
    let x = b.input(DENOISED, shape.clone())?;
    let y = b.div_scalar(LATENT, x, vae.scaling_factor)?;
    b.output(LATENT, y)?;
    Ok(b.finish())
}

impl OpenUni {
    /// `decoder(latents / scaling_factor)` -> [B, 3, H, W] in nominal [-1, 1], in one piece.
    pub fn decode(&self, latents: &HostTensor, run: RunOptions) -> Result<HostTensor> {
        self.check_latent(latents)?;
        self.decode_piece(latents.shape.clone(), latents.to_f32_vec(), run)
    }

    /// Decodes as `opts` asks: tiled when a tile size is set and the latent does not fit in one
    /// tile, else in one piece (`decode`).
    pub fn decode_with(
        &self,
        latents: &HostTensor,
        run: RunOptions,
        opts: DecodeOptions,
    ) -> Result<HostTensor> {
        match tiling(&self.vae_cfg, latents.shape.dims(), opts)? {
            Some(t) => self.decode_tiled(latents, run, t),
            None => self.decode(latents, run),
        }
    }

    pub(super) fn check_latent(&self, latents: &HostTensor) -> Result<()> {
        self.check_latent_shape(&latents.shape)
    }

    fn check_latent_shape(&self, shape: &Shape) -> Result<()> {
        let d = shape.dims();
        let c = self.vae_cfg.latent_channels;
        if d.len() != 4 || d[1] != c {
            bail!(
                "the latent has shape {shape}, expected [B, {c}, h, w] (the VAE's latent channels)"
            );
        }
        if d[0] == 0 || d[2] == 0 || d[3] == 0 {
            bail!("the latent has shape {shape}: an empty latent cannot be decoded");
        }
        Ok(())
    }

    /// Decodes raw (unscaled) latents `values` of `shape` on the resident decoder executor: the
    /// f32 sample [B, 3, H, W].
    pub(super) fn decode_piece(
        &self,
        shape: Shape,
        values: Vec<f32>,
        run: RunOptions,
    ) -> Result<HostTensor> {
        let inputs = HashMap::from([(
            LATENT.to_string(),
            self.scaled_latent(shape.clone(), values)?,
        )]);
        let sample = self.with_executor(
            Stage::Vae,
            "decoder",
            shape.dims(),
            run,
            false,
            || pipeline_decoder_graph(&self.vae_cfg, &shape),
            |e| {
                e.set_inputs(&inputs)?;
                e.execute()?;
                SAMPLE.take(&mut e.output_handles()?)?.to_host()
            },
        )?;
        Ok(HostTensor::from_f32(
            sample.shape.clone(),
            sample.to_f32_vec(),
        )?)
    }

    /// The pipeline's decode: `latents` [N, C, h, w] (f32) where the sampler left them, decoded
    /// as `opts` says to uint8 pixels [N, H, W, 3] (the host writer's layout), refusing a
    /// non-finite decoder output (batch `batch` of a call, for the message). The decoder's input
    /// `latents / scaling_factor` is made where the latents lie ([`decoder_input_graph`]: on a
    /// GPU the latents never come to the host). In one piece the pixels are quantized on the
    /// device and read back at one byte a value after a one-scalar finite check; tiled, the
    /// stitched f32 image is checked and quantized on the host by the same rule.
    pub(super) fn decode_u8(
        &self,
        latents: TensorHandle,
        run: RunOptions,
        opts: DecodeOptions,
        batch: usize,
    ) -> Result<HostTensor> {
        self.check_latent_shape(latents.shape())?;
        let stage = format!(
            "decode: the VAE output (latents / scaling_factor {} decoded)",
            self.vae_cfg.scaling_factor
        );
        let input = self.decoder_input(&latents, run)?;
        if let Some(t) = tiling(&self.vae_cfg, latents.shape().dims(), opts)? {
            let decoded = self.decode_tiled_input(&input, run, t)?;
            if let Err(e) = check_finite(&stage, &decoded, batch) {
                self.check_decoder_inputs(&latents, &input, batch)?;
                return Err(e);
            }
            let (px, dims) = to_uint8_nhwc(&decoded)?;
            return Ok(HostTensor::new(dims.to_vec(), HostData::U8(px))?);
        }
        let shape = latents.shape().clone();
        let inputs = HashMap::from([(LATENT.to_string(), input.clone())]);
        self.with_executor(
            Stage::Vae,
            "decoder",
            shape.dims(),
            run,
            false,
            || pipeline_decoder_graph(&self.vae_cfg, &shape),
            |e| {
                e.set_input_handles(&inputs)?;
                e.execute()?;
                let h = e.output_handles()?;
                if let Err(err) = check_finite_flag(&h, SAMPLE.0, &stage, batch) {
                    self.check_decoder_inputs(&latents, &input, batch)?;
                    return Err(err);
                }
                h.get(IMAGE_U8)
                    .context("the decoder graph has no uint8 image")?
                    .to_host_u8()
            },
        )
    }

    /// `latents / scaling_factor`, the decoder's input, made where `latents` lie by the f32
    /// graph "decoder.input" ([`decoder_input_graph`]): one correctly rounded f32 division per
    /// value, the host path's [`scaled_latent`](Self::scaled_latent) bit for bit. A device output
    /// set into a bf16 decoder goes through its f32 staging slot and cast, as a host upload does.
    pub(super) fn decoder_input(
        &self,
        latents: &TensorHandle,
        run: RunOptions,
    ) -> Result<TensorHandle> {
        let shape = latents.shape().clone();
        let f32_run = RunOptions {
            dtype: DType::F32,
            ..run
        };
        let inputs = HashMap::from([(DENOISED.to_string(), latents.clone())]);
        self.with_executor(
            Stage::Vae,
            "decoder.input",
            shape.dims(),
            f32_run,
            false,
            || decoder_input_graph(&self.vae_cfg, &shape),
            |e| {
                e.set_input_handles(&inputs)?;
                e.execute()?;
                e.output_handles()?
                    .remove(LATENT)
                    .context("the decoder input graph has no output")
            },
        )
    }

    /// After the decoder's output was found non-finite: names the latents or the decoder's input
    /// instead when they hold the first non-finite value (read back only then, an error anyway).
    fn check_decoder_inputs(
        &self,
        latents: &TensorHandle,
        input: &TensorHandle,
        batch: usize,
    ) -> Result<()> {
        check_finite("the latents after denoising", &latents.to_host()?, batch)?;
        let sf = self.vae_cfg.scaling_factor;
        check_finite(
            &format!("the decoder input (the latents / the VAE's scaling_factor {sf})"),
            &input.to_host()?,
            batch,
        )
    }

    /// `latents / scaling_factor` on the host (the host path of [`decode`](Self::decode)), by the
    /// CPU twin of the device's division (`Op::DivScalar`).
    pub(super) fn scaled_latent(&self, shape: Shape, values: Vec<f32>) -> Result<HostTensor> {
        let mut scaled = vec![0f32; values.len()];
        openuni_cpu::ops::div_scalar(&values, self.vae_cfg.scaling_factor, &mut scaled);
        Ok(HostTensor::from_f32(shape, scaled)?)
    }

    /// Tiled decode, exact up to summation order (docs/models.md, "DC-AE decoder"). DC-AE's attention is
    /// global, so the decoder's global part (conv_in and the attention stages, at most 1/8 of the
    /// image's resolution for the SANA VAEs) runs on the whole latent once. Its features are then
    /// cut into overlapping `tiling.tile`-pixel tiles for the local part (the high-resolution
    /// ResBlock stages, where the memory is), each tile reaching `tiling.context` pixels beyond
    /// the region it keeps; with the model's own context (`Tiling::new`) every kept pixel sees
    /// all it depends on, so the stitched image is the one-piece decode's: no seam, no blend.
    /// Tiles start every `tile - 2·context` pixels, the last one in each direction clamped to the
    /// edge, so every tile has one shape and one resident executor serves them all.
    pub fn decode_tiled(
        &self,
        latents: &HostTensor,
        run: RunOptions,
        tiling: Tiling,
    ) -> Result<HostTensor> {
        self.check_latent(latents)?;
        let input =
            TensorHandle::Host(self.scaled_latent(latents.shape.clone(), latents.to_f32_vec())?);
        self.decode_tiled_input(&input, run, tiling)
    }

    /// [`decode_tiled`](Self::decode_tiled) of the decoder's input `latents / scaling_factor`
    /// where it lies (the global part reads it on the device when it is there).
    fn decode_tiled_input(
        &self,
        input: &TensorHandle,
        run: RunOptions,
        tiling: Tiling,
    ) -> Result<HostTensor> {
        let Tiling { tile, context } = tiling;
        if tile <= 2 * context {
            bail!("decode tile of {tile} feature pixels keeps nothing of its own with {context} pixels of context on each side");
        }
        let shape = input.shape().clone();
        let d = shape.dims().to_vec();
        let (bsz, h, w) = (d[0], d[2], d[3]);
        let split = self.vae_cfg.local_split();
        let (up, fh, fw, ch) = (
            split.upscale,
            h * split.grid,
            w * split.grid,
            split.channels,
        );
        let (ph, pw) = (fh * up, fw * up);
        let npix = bsz
            .checked_mul(3)
            .and_then(|n| n.checked_mul(ph))
            .and_then(|n| n.checked_mul(pw))
            .filter(|&n| n <= isize::MAX as usize / 4)
            .with_context(|| {
                format!("the latent {shape} decodes to an image too large to hold in memory")
            })?;
        let inputs = HashMap::from([(LATENT.to_string(), input.clone())]);
        let mut out = self.with_executor(
            Stage::Vae,
            "decoder.global",
            &d,
            run,
            false,
            || Ok(decoder_global_graph(&self.vae_cfg, &shape)?),
            |e| {
                e.set_input_handles(&inputs)?;
                e.execute()?;
                e.outputs()
            },
        )?;
        let features = FEATURES.take(&mut out)?.to_f32_vec();
        let (th, tw) = (tile.min(fh), tile.min(fw));
        let (ys, xs) = (
            tile_starts(fh, tile, 2 * context),
            tile_starts(fw, tile, 2 * context),
        );
        let (own_y, own_x) = (owned_spans(&ys, fh, context), owned_spans(&xs, fw, context));
        let mut image = vec![0f32; npix];
        for (&y0, &(oy0, oy1)) in ys.iter().zip(&own_y) {
            for (&x0, &(ox0, ox1)) in xs.iter().zip(&own_x) {
                let mut piece = Vec::with_capacity(bsz * th * tw * ch);
                for bi in 0..bsz {
                    for y in y0..y0 + th {
                        let row = (bi * fh + y) * fw;
                        piece.extend_from_slice(&features[(row + x0) * ch..(row + x0 + tw) * ch]);
                    }
                }
                let inputs = HashMap::from([(
                    FEATURES.0.to_string(),
                    HostTensor::from_f32([bsz, th * tw, ch], piece)?,
                )]);
                let dims = [bsz, th, tw];
                let mut out = self.with_executor(
                    Stage::Vae,
                    "decoder.tile",
                    &dims,
                    run,
                    false,
                    || Ok(decoder_tile_graph(&self.vae_cfg, bsz, th, tw)?),
                    |e| e.run(&inputs),
                )?;
                let decoded = SAMPLE.take(&mut out)?.to_f32_vec();
                let (tph, tpw) = (th * up, tw * up);
                let (cx0, cx1) = ((ox0 - x0) * up, (ox1 - x0) * up);
                for bc in 0..bsz * 3 {
                    for y in oy0 * up..oy1 * up {
                        let src = &decoded[(bc * tph + y - y0 * up) * tpw..][cx0..cx1];
                        image[(bc * ph + y) * pw + ox0 * up..][..cx1 - cx0].copy_from_slice(src);
                    }
                }
            }
        }
        Ok(HostTensor::from_f32([bsz, 3, ph, pw], image)?)
    }
}

/// The tiling `opts` asks for on latents of `dims`, or `None` when one tile would cover them.
pub(super) fn tiling(
    vae: &DcaeConfig,
    dims: &[usize],
    opts: DecodeOptions,
) -> Result<Option<Tiling>> {
    let Some(px) = opts.tile else { return Ok(None) };
    let (t, grid) = (Tiling::new(vae, px)?, vae.local_split().grid);
    Ok((dims.len() == 4 && (dims[2] * grid > t.tile || dims[3] * grid > t.tile)).then_some(t))
}

/// The decode graphs a batch of `n` latents of `h`×`w` keeps resident as `opts` decodes: the
/// whole decoder, or its global part and one tile of the local part.
pub fn decode_graphs(
    vae: &DcaeConfig,
    n: usize,
    h: usize,
    w: usize,
    opts: DecodeOptions,
) -> Result<Vec<(&'static str, Graph)>> {
    let shape: Shape = [n, vae.latent_channels, h, w].into();
    Ok(match tiling(vae, shape.dims(), opts)? {
        None => vec![("decoder", pipeline_decoder_graph(vae, &shape)?)],
        Some(t) => {
            let grid = vae.local_split().grid;
            vec![
                ("decoder.global", decoder_global_graph(vae, &shape)?),
                (
                    "decoder.tile",
                    decoder_tile_graph(vae, n, t.tile.min(h * grid), t.tile.min(w * grid))?,
                ),
            ]
        }
    })
}

/// How the DC-AE decode is split: `tile: None` decodes in one piece, else tiles of that many
/// output pixels a side (the tile bounds the local part's memory; see `decode_tiled`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    pub tile: Option<usize>,
}

impl DecodeOptions {
    /// Images with a side above this many pixels are tiled by default.
    pub const AUTO_ABOVE_PX: usize = 1024;
    pub const DEFAULT_TILE_PX: usize = 512;

    /// From `--decode-tile PX` (a multiple of the VAE's upscale, larger than twice its context)
    /// for an image of `height`×`width` pixels. No flag: tiled with the default tile when a side
    /// exceeds `AUTO_ABOVE_PX`.
    pub fn from_flags(
        tile_px: Option<usize>,
        height: usize,
        width: usize,
        vae: &DcaeConfig,
    ) -> Result<DecodeOptions> {
        let large = height > Self::AUTO_ABOVE_PX || width > Self::AUTO_ABOVE_PX;
        let tile = match tile_px {
            Some(t) => t,
            None if large => Self::DEFAULT_TILE_PX,
            None => return Ok(DecodeOptions::default()),
        };
        Tiling::new(vae, tile)?;
        Ok(DecodeOptions { tile: Some(tile) })
    }
}
