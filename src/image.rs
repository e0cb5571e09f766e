//! Image files: 8-bit RGB PNGs carrying the generation parameters as text chunks, so an image
//! says how it was made, and a re-run can tell a finished image made with the same settings from
//! a truncated file or one made with other settings.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use openuni_tensor::HostTensor;

/// Text chunks that describe the program, not the image: ignored when settings are compared.
const NOT_SETTINGS: [&str; 1] = ["Software"];

/// Writes `rgb` (H·W·3 bytes, row-major) to `path` atomically (see `crate::atomic`), with `text`
/// as PNG tEXt/iTXt chunks.
pub fn write_png(
    path: &Path,
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(String, String)],
) -> Result<()> {
    if width.checked_mul(height).and_then(|n| n.checked_mul(3)) != Some(rgb.len()) {
        bail!(
            "{}: {} bytes do not make a {width}x{height} RGB image",
            path.display(),
            rgb.len()
        );
    }
    let (w32, h32) = (u32::try_from(width), u32::try_from(height));
    let (Ok(w32), Ok(h32)) = (w32, h32) else {
        bail!(
            "{}: {width}x{height} is too large for a PNG",
            path.display()
        )
    };
    crate::atomic::write_with(path, |out| {
        let mut enc = png::Encoder::new(out, w32, h32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            if v.is_ascii() {
                enc.add_text_chunk(k.clone(), v.clone())?;
            } else {
                enc.add_itxt_chunk(k.clone(), v.clone())?;
            }
        }
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
        Ok(())
    })
}

/// A decoded PNG: width, height, RGB bytes, text chunks.
pub type Png = (usize, usize, Vec<u8>, Vec<(String, String)>);

/// Reads a whole PNG (through its end chunk, so a truncated file is an error). With
/// `expect_size`, a file of another size is refused before its pixels are allocated.
fn decode_png(path: &Path, expect_size: Option<(usize, usize)>) -> Result<Png> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    // Our largest image (8192² RGB) plus room for text chunks.
    dec.set_limits(png::Limits {
        bytes: 8192 * 8192 * 3 + (16 << 20),
    });
    let mut reader = dec
        .read_info()
        .with_context(|| format!("{}: not a PNG", path.display()))?;
    let (w, h) = reader.info().size();
    if let Some((ew, eh)) = expect_size {
        if (w as usize, h as usize) != (ew, eh) {
            bail!("{}: {w}x{h}, not {ew}x{eh}", path.display());
        }
    }
    if reader.info().color_type != png::ColorType::Rgb
        || reader.info().bit_depth != png::BitDepth::Eight
    {
        bail!("{}: not an 8-bit RGB PNG", path.display());
    }
    let mut buf = vec![
        0;
        reader
            .output_buffer_size()
            .with_context(|| format!("{}: too large", path.display()))?
    ];
    let info = reader
        .next_frame(&mut buf)
        .with_context(|| format!("{}: cannot decode (truncated or corrupt)", path.display()))?;
    buf.truncate(info.buffer_size());
    reader
        .finish()
        .with_context(|| format!("{}: incomplete (no end chunk)", path.display()))?;
    let meta = reader.info();
    let mut text: Vec<(String, String)> = meta
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &meta.utf8_text {
        text.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    Ok((info.width as usize, info.height as usize, buf, text))
}

/// Reads a PNG back: (width, height, RGB bytes, text chunks).
pub fn read_png(path: &Path) -> Result<Png> {
    decode_png(path, None)
}

/// What is already at an output path.
#[derive(Debug, PartialEq, Eq)]
pub enum Existing {
    Missing,
    /// A complete PNG of this size made with these settings: nothing to do.
    Finished,
    /// Something that must be made again, and why (unreadable, truncated, other settings).
    Redo(String),
}

/// Compares the file at `path` with the image a run would write there (`width`×`height`, text
/// chunks `settings`). Only a PNG that decodes completely and whose settings all match is
/// `Finished`.
pub fn existing(
    path: &Path,
    width: usize,
    height: usize,
    settings: &[(String, String)],
) -> Existing {
    if !path.exists() {
        return Existing::Missing;
    }
    let (_, _, _, text) = match decode_png(path, Some((width, height))) {
        Ok(p) => p,
        Err(e) => return Existing::Redo(format!("{e:#}")),
    };
    let differing: Vec<String> = settings
        .iter()
        .filter(|(k, _)| !NOT_SETTINGS.contains(&k.as_str()))
        .filter_map(|(k, v)| {
            let old = text
                .iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, vv)| vv.as_str());
            (old != Some(v.as_str())).then(|| format!("{k} {} (now {v})", old.unwrap_or("missing")))
        })
        .collect();
    if differing.is_empty() {
        Existing::Finished
    } else {
        Existing::Redo(format!(
            "{}: made with other settings: {}",
            path.display(),
            differing.join(", ")
        ))
    }
}

/// OpenUni's post-processing: `uint8(clamp(127.5·x + 128, 0, 255))` (the cast truncates;
/// `openuni_cpu::ops::quantize_u8`, the rule the device's `Op::QuantizeU8` shares), NCHW
/// [B, 3, H, W] -> NHWC bytes [B, H, W, 3]. Pixels already quantized on the device (uint8
/// [B, H, W, 3], what `generate_batches` hands out) pass through as they are.
pub fn to_uint8_nhwc(decoded: &HostTensor) -> Result<(Vec<u8>, [usize; 4])> {
    let d = decoded.shape.dims();
    if let openuni_tensor::HostData::U8(px) = &decoded.data {
        if d.len() != 4 || d[3] != 3 {
            bail!(
                "uint8 image has shape {}, expected [B, H, W, 3]",
                decoded.shape
            );
        }
        return Ok((px.clone(), [d[0], d[1], d[2], 3]));
    }
    if d.len() != 4 || d[1] != 3 {
        bail!(
            "decoded image has shape {}, expected [B, 3, H, W]",
            decoded.shape
        );
    }
    let (b, h, w) = (d[0], d[2], d[3]);
    let x = decoded.to_f32_vec();
    let mut out = vec![0u8; b * h * w * 3];
    for bi in 0..b {
        for c in 0..3 {
            for p in 0..h * w {
                out[(bi * h * w + p) * 3 + c] =
                    openuni_cpu::ops::quantize_u8(x[(bi * 3 + c) * h * w + p]);
            }
        }
    }
    Ok((out, [b, h, w, 3]))
}
