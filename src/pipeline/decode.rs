//! DC-AE decoding on the resident executors: in one piece, or in exact tiles (the geometry is
//! `openuni_models::dcae::Tiling`, next to the decoder's receptive-field logic).

use openuni_models::dcae::{decoder_global_graph, decoder_graph, decoder_tile_graph, owned_spans, tile_starts, DcaeConfig, Tiling, FEATURES, LATENT, SAMPLE};
use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use openuni_graph::{Graph, GraphBuilder};
use openuni_tensor::{HostData, HostTensor, Shape};

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
    let sample = b.output_id(SAMPLE.0).context("the decoder graph has no sample output")?;
    let pixels = b.quantize_u8(IMAGE_U8, sample)?;
    b.output(IMAGE_U8, pixels)?;
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
    pub fn decode_with(&self, latents: &HostTensor, run: RunOptions, opts: DecodeOptions) -> Result<HostTensor> {
        match tiling(&self.vae_cfg, latents.shape.dims(), opts)? {
            Some(t) => self.decode_tiled(latents, run, t),
            None => self.decode(latents, run),
        }
    }

    pub(super) fn check_latent(&self, latents: &HostTensor) -> Result<()> {
        let d = latents.shape.dims();
        let c = self.vae_cfg.latent_channels;
        if d.len() != 4 || d[1] != c {
            bail!("the latent has shape {}, expected [B, {c}, h, w] (the VAE's latent channels)", latents.shape);
        }
        if d[0] == 0 || d[2] == 0 || d[3] == 0 {
            bail!("the latent has shape {}: an empty latent cannot be decoded", latents.shape);
        }
        Ok(())
    }

    /// Decodes raw (unscaled) latents `values` of `shape` on the resident decoder executor: the
    /// f32 sample [B, 3, H, W].
    pub(super) fn decode_piece(&self, shape: Shape, values: Vec<f32>, run: RunOptions) -> Result<HostTensor> {
        let inputs = HashMap::from([(LATENT.to_string(), self.scaled_latent(shape.clone(), values)?)]);
        let sample = self.with_executor(Stage::Vae, "decoder", shape.dims(), run, false, || pipeline_decoder_graph(&self.vae_cfg, &shape), |e| {
            e.set_inputs(&inputs)?;
            e.execute()?;
            SAMPLE.take(&mut e.output_handles()?)?.to_host()
        })?;
        Ok(HostTensor::from_f32(sample.shape.clone(), sample.to_f32_vec())?)
    }

    /// Decodes `latents` as `opts` says to uint8 pixels [B, H, W, 3] (the host writer's layout),
    /// refusing a non-finite decoder output (batch `batch` of a call, for the message). In one
    /// piece the pixels are quantized on the device and read back at one byte a value after a
    /// one-scalar finite check; tiled, the stitched f32 image is checked and quantized on the
    /// host by the same rule.
    pub fn decode_u8(&self, latents: &HostTensor, run: RunOptions, opts: DecodeOptions, batch: usize) -> Result<HostTensor> {
        let stage = format!("decode: the VAE output (latents / scaling_factor {} decoded)", self.vae_cfg.scaling_factor);
        if let Some(t) = tiling(&self.vae_cfg, latents.shape.dims(), opts)? {
            let decoded = self.decode_tiled(latents, run, t)?;
            check_finite(&stage, &decoded, batch)?;
            let (px, dims) = to_uint8_nhwc(&decoded)?;
            return Ok(HostTensor::new(dims.to_vec(), HostData::U8(px))?);
        }
        self.check_latent(latents)?;
        let shape = latents.shape.clone();
        let inputs = HashMap::from([(LATENT.to_string(), self.scaled_latent(shape.clone(), latents.to_f32_vec())?)]);
        self.with_executor(Stage::Vae, "decoder", shape.dims(), run, false, || pipeline_decoder_graph(&self.vae_cfg, &shape), |e| {
            e.set_inputs(&inputs)?;
            e.execute()?;
            let h = e.output_handles()?;
            check_finite_flag(&h, SAMPLE.0, &stage, batch)?;
            h.get(IMAGE_U8).context("the decoder graph has no uint8 image")?.to_host_u8()
        })
    }

    pub(super) fn scaled_latent(&self, shape: Shape, values: Vec<f32>) -> Result<HostTensor> {
        let sf = self.vae_cfg.scaling_factor;
        Ok(HostTensor::from_f32(shape, values.iter().map(|x| x / sf).collect())?)
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
    pub fn decode_tiled(&self, latents: &HostTensor, run: RunOptions, tiling: Tiling) -> Result<HostTensor> {
        self.check_latent(latents)?;
        let Tiling { tile, context } = tiling;
        if tile <= 2 * context {
            bail!("decode tile of {tile} feature pixels keeps nothing of its own with {context} pixels of context on each side");
        }
        let d = latents.shape.dims().to_vec();
        let (bsz, h, w) = (d[0], d[2], d[3]);
        let split = self.vae_cfg.local_split();
        let (up, fh, fw, ch) = (split.upscale, h * split.grid, w * split.grid, split.channels);
        let (ph, pw) = (fh * up, fw * up);
        let npix = bsz
            .checked_mul(3)
            .and_then(|n| n.checked_mul(ph))
            .and_then(|n| n.checked_mul(pw))
            .filter(|&n| n <= isize::MAX as usize / 4)
            .with_context(|| format!("the latent {} decodes to an image too large to hold in memory", latents.shape))?;
        let inputs = HashMap::from([(LATENT.to_string(), self.scaled_latent(latents.shape.clone(), latents.to_f32_vec())?)]);
        let mut out = self.with_executor(Stage::Vae, "decoder.global", &d, run, false, || Ok(decoder_global_graph(&self.vae_cfg, &latents.shape)?), |e| e.run(&inputs))?;
        let features = FEATURES.take(&mut out)?.to_f32_vec();
        let (th, tw) = (tile.min(fh), tile.min(fw));
        let (ys, xs) = (tile_starts(fh, tile, 2 * context), tile_starts(fw, tile, 2 * context));
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
                let inputs = HashMap::from([(FEATURES.0.to_string(), HostTensor::from_f32([bsz, th * tw, ch], piece)?)]);
                let dims = [bsz, th, tw];
                let mut out = self.with_executor(Stage::Vae, "decoder.tile", &dims, run, false, || Ok(decoder_tile_graph(&self.vae_cfg, bsz, th, tw)?), |e| e.run(&inputs))?;
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
pub(super) fn tiling(vae: &DcaeConfig, dims: &[usize], opts: DecodeOptions) -> Result<Option<Tiling>> {
    let Some(px) = opts.tile else { return Ok(None) };
    let (t, grid) = (Tiling::new(vae, px)?, vae.local_split().grid);
    Ok((dims.len() == 4 && (dims[2] * grid > t.tile || dims[3] * grid > t.tile)).then_some(t))
}

/// The decode graphs a batch of `n` latents of `h`×`w` keeps resident as `opts` decodes: the
/// whole decoder, or its global part and one tile of the local part.
pub fn decode_graphs(vae: &DcaeConfig, n: usize, h: usize, w: usize, opts: DecodeOptions) -> Result<Vec<(&'static str, Graph)>> {
    let shape: Shape = [n, vae.latent_channels, h, w].into();
    Ok(match tiling(vae, shape.dims(), opts)? {
        None => vec![("decoder", pipeline_decoder_graph(vae, &shape)?)],
        Some(t) => {
            let grid = vae.local_split().grid;
            vec![("decoder.global", decoder_global_graph(vae, &shape)?), ("decoder.tile", decoder_tile_graph(vae, n, t.tile.min(h * grid), t.tile.min(w * grid))?)]
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
    pub fn from_flags(tile_px: Option<usize>, height: usize, width: usize, vae: &DcaeConfig) -> Result<DecodeOptions> {
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
