//! Image files: 8-bit RGB PNGs carrying the generation parameters as text chunks, so an image
//! says how it was made.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Writes `rgb` (H·W·3 bytes, row-major) to `path`, with `text` as PNG tEXt/iTXt chunks.
pub fn write_png(path: &Path, rgb: &[u8], width: usize, height: usize, text: &[(String, String)]) -> Result<()> {
    if rgb.len() != width * height * 3 {
        bail!("{}: {} bytes do not make a {width}x{height} RGB image", path.display(), rgb.len());
    }
    // Write to a temporary name and rename, so an interrupted run never leaves a truncated PNG
    // that a re-run would take for finished work.
    let tmp = path.with_extension("png.part");
    let file = File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        if v.is_ascii() {
            enc.add_text_chunk(k.clone(), v.clone())?;
        } else {
            enc.add_itxt_chunk(k.clone(), v.clone())?;
        }
    }
    let mut w = enc.write_header().with_context(|| format!("{}: cannot write", tmp.display()))?;
    w.write_image_data(rgb).with_context(|| format!("{}: cannot write", tmp.display()))?;
    w.finish()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// Reads a PNG back: (width, height, RGB bytes, text chunks). Used by tests and `--skip` checks.
pub fn read_png(path: &Path) -> Result<(usize, usize, Vec<u8>, Vec<(String, String)>)> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let dec = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = dec.read_info().with_context(|| format!("{}: not a PNG", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf).with_context(|| format!("{}: cannot decode", path.display()))?;
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let mut text: Vec<(String, String)> = meta.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    for t in &meta.utf8_text {
        text.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    Ok((info.width as usize, info.height as usize, buf, text))
}
