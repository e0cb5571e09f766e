//! InternVL3 image preprocessing, bit for bit as the model card's `load_image`:
//! `Image.open(path).convert('RGB')` -> `dynamic_preprocess` (aspect-ratio grid, tiles, thumbnail) ->
//! `T.Resize((448,448), BICUBIC)` -> `T.ToTensor()` -> `T.Normalize(ImageNet)`.
//! The algorithm, Pillow's fixed-point BICUBIC and every conversion rule are described in
//! docs/internvl3-preprocess.md (sources: Pillow `src/libImaging/Resample.c`, `Image.resize`,
//! `Convert.c`, `JpegDecode.c`; torchvision `ToTensor`/`Normalize`; the InternVL3 model card).

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use openuni_tensor::HostTensor;

/// The tile side InternViT-300M-448px takes.
pub const INPUT_SIZE: usize = 448;
/// The model card's `max_num` (`max_dynamic_patch` in the config).
pub const DEFAULT_MAX_NUM: usize = 12;
/// Largest accepted image, in pixels: Pillow's `Image.MAX_IMAGE_PIXELS` (its decompression-bomb
/// threshold, 1024·1024·1024 / 4 / 3). Checked on the declared size before any pixel is decoded.
pub const MAX_PIXELS: u64 = 89_478_485;
/// Largest accepted `input_size` and `max_num` (tile side and tile budget of [`load_image`]).
pub const MAX_INPUT_SIZE: usize = 896;
pub const MAX_MAX_NUM: usize = 40;
/// Largest accepted file: a PNG/JPEG/WebP of MAX_PIXELS needs far less.
pub const MAX_FILE_BYTES: u64 = 512 << 20;
/// Decoder allocation bound given to the `image` crate: a 16-bit RGBA buffer of MAX_PIXELS plus slack.
const MAX_DECODER_ALLOC: u64 = MAX_PIXELS * 8 + (64 << 20);
/// torchvision's ImageNet statistics as the model card writes them (f32, as `Normalize` converts them).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A bad or unsupported image: names the file and says what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {msg}")]
pub struct ImageInputError {
    pub file: String,
    pub msg: String,
}

fn err(file: &str, msg: impl Into<String>) -> ImageInputError {
    ImageInputError {
        file: file.to_string(),
        msg: msg.into(),
    }
}

/// An 8-bit RGB image, rows top to bottom, pixels interleaved R,G,B (Pillow's "RGB" mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> RgbImage {
        assert_eq!(data.len(), width * height * 3, "RGB buffer size");
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// `Image.crop((x0, y0, x0 + w, y0 + h))` for a box inside the image.
    pub fn crop(&self, x0: usize, y0: usize, w: usize, h: usize) -> RgbImage {
        assert!(
            x0 + w <= self.width && y0 + h <= self.height,
            "crop box inside the image"
        );
        let mut data = Vec::with_capacity(w * h * 3);
        for y in y0..y0 + h {
            let row = (y * self.width + x0) * 3;
            data.extend_from_slice(&self.data[row..row + w * 3]);
        }
        RgbImage::new(w, h, data)
    }
}

// ------------------------------------------------------------------------------------------------
// Decoding: `Image.open(path).convert('RGB')`
// ------------------------------------------------------------------------------------------------

/// Reads a PNG, JPEG or WebP file as 8-bit RGB the way Pillow's `Image.open(path).convert('RGB')`
/// does (alpha dropped without compositing, palette looked up, gray replicated, 16-bit samples
/// reduced to their high byte); refuses what Pillow would turn into a silently wrong image.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, ImageInputError> {
    let name = path.display().to_string();
    let meta =
        std::fs::metadata(path).map_err(|e| err(&name, format!("cannot read the image: {e}")))?;
    if !meta.is_file() {
        return Err(err(
            &name,
            "is not a file (expected a PNG, JPEG or WebP image)",
        ));
    }
    if meta.len() == 0 {
        return Err(err(
            &name,
            "is empty (0 bytes), expected a PNG, JPEG or WebP image",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(err(
            &name,
            format!(
                "is {} bytes, more than the {MAX_FILE_BYTES}-byte bound for an input image",
                meta.len()
            ),
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|e| err(&name, format!("cannot read the image: {e}")))?;
    decode_rgb_bytes(&bytes, &name)
}

/// [`decode_rgb`] on bytes already in memory; `name` is used in errors.
pub fn decode_rgb_bytes(bytes: &[u8], name: &str) -> Result<RgbImage, ImageInputError> {
    if bytes.is_empty() {
        return Err(err(
            name,
            "is empty (0 bytes), expected a PNG, JPEG or WebP image",
        ));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| err(name, format!("cannot read: {e}")))?;
    let format = match reader.format() {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Some(other) => {
            return Err(err(
                name,
                format!("is a {other:?} image; supported formats are PNG, JPEG and WebP"),
            ))
        }
        None => {
            return Err(err(
                name,
                "is not a PNG, JPEG or WebP image (unrecognised file signature)",
            ))
        }
    };
    match format {
        // JPEG goes to libjpeg-turbo (Pillow's decoder), see decode_jpeg.
        ImageFormat::Jpeg => return decode_jpeg(bytes, name),
        // The PNG header says what the `image` crate hides (16-bit gray expands to 16-bit gray+alpha
        // with tRNS); read it before decoding.
        ImageFormat::Png => check_png_header(bytes, name)?,
        _ => {}
    }
    let mut reader = reader;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_ALLOC);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| {
        err(
            name,
            format!("cannot read the {format:?} header: {e} (corrupt or truncated file?)"),
        )
    })?;
    let (w, h) = decoder.dimensions();
    check_dimensions(w as u64, h as u64, name)?;
    let img = DynamicImage::from_decoder(decoder).map_err(|e| {
        err(
            name,
            format!(
                "cannot decode the {format:?} image ({w}x{h}): {e} (corrupt or truncated file?)"
            ),
        )
    })?;
    to_rgb8_like_pillow(img, name)
}

/// Zero or over-large declared sizes are refused before any pixel buffer is allocated.
fn check_dimensions(w: u64, h: u64, name: &str) -> Result<(), ImageInputError> {
    if w == 0 || h == 0 {
        return Err(err(name, format!("declares a zero-sized image ({w}x{h})")));
    }
    if w * h > MAX_PIXELS {
        return Err(err(
            name,
            format!("declares {w}x{h} = {} pixels, more than the {MAX_PIXELS}-pixel bound (Pillow's MAX_IMAGE_PIXELS); not decoded", w * h),
        ));
    }
    Ok(())
}

/// PNG IHDR: dimensions, and the 16-bit grayscale case. Pillow opens 16-bit gray as mode "I;16"
/// and `convert('RGB')` saturates every sample above 255 to white, which destroys the image, so
/// such files are refused rather than matched.
fn check_png_header(bytes: &[u8], name: &str) -> Result<(), ImageInputError> {
    let mut dec = png::Decoder::new(Cursor::new(bytes));
    dec.set_ignore_text_chunk(true);
    let info = dec.read_header_info().map_err(|e| {
        err(
            name,
            format!("cannot read the PNG header: {e} (corrupt or truncated file?)"),
        )
    })?;
    check_dimensions(info.width as u64, info.height as u64, name)?;
    if info.color_type == png::ColorType::Grayscale && info.bit_depth == png::BitDepth::Sixteen {
        return Err(err(
            name,
            "is a 16-bit grayscale PNG; Pillow's convert('RGB') clips such samples to 255 (a white image), \
             so it is refused: convert it to 8-bit first",
        ));
    }
    Ok(())
}

/// JPEG through libjpeg-turbo's decoder (the `mozjpeg` crate builds it from source; mozjpeg changes
/// only the encoder), the same decoder Pillow uses, with the same defaults (ISLOW integer IDCT, fancy
/// upsampling), so the pixels agree bit for bit. libjpeg reports fatal errors by unwinding into
/// `catch_unwind` here. Differences from plain libjpeg, as Pillow does: data that ends early (libjpeg
/// would warn and pad with grey) is an error ("image file is truncated" in Pillow). The header is
/// checked before decoding: dimensions against [`MAX_PIXELS`]; CMYK / YCCK are refused (Pillow keeps
/// them as "CMYK" and converts with its own formula). Gray JPEGs come out replicated to RGB (libjpeg's
/// gray -> RGB is Pillow's L -> RGB).
fn decode_jpeg(bytes: &[u8], name: &str) -> Result<RgbImage, ImageInputError> {
    use mozjpeg_sys::J_COLOR_SPACE::{JCS_CMYK, JCS_YCCK};
    let run = || -> Result<RgbImage, ImageInputError> {
        let header = mozjpeg::Decompress::with_err(strict_jpeg_errors())
            .from_mem(bytes)
            .map_err(|e| {
                err(
                    name,
                    format!("cannot read the JPEG header: {e} (corrupt or truncated file?)"),
                )
            })?;
        let (w, h) = header.size();
        check_dimensions(w as u64, h as u64, name)?;
        if matches!(header.color_space(), JCS_CMYK | JCS_YCCK) {
            return Err(err(name, "is a CMYK (or YCCK) JPEG; only grayscale and YCbCr/RGB JPEGs are supported: convert it to RGB first"));
        }
        let mut started = header
            .rgb()
            .map_err(|e| err(name, format!("cannot decode the JPEG image ({w}x{h}): {e}")))?;
        let data = started
            .read_scanlines::<u8>()
            .map_err(|e| err(name, format!("cannot decode the JPEG image ({w}x{h}): {e}")))?;
        started
            .finish()
            .map_err(|e| err(name, format!("cannot finish the JPEG image ({w}x{h}): {e}")))?;
        if data.len() != w * h * 3 {
            return Err(err(
                name,
                format!("JPEG decoder returned {} bytes for {w}x{h} RGB", data.len()),
            ));
        }
        Ok(RgbImage::new(w, h, data))
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "libjpeg failed".into());
            Err(err(
                name,
                format!("cannot decode the JPEG image: {msg} (corrupt or truncated file?)"),
            ))
        }
    }
}

/// libjpeg's standard error manager, with fatal errors unwinding (as the `mozjpeg` crate's own)
/// and the end-of-data warning made fatal; other warnings stay silent, as in Pillow.
fn strict_jpeg_errors() -> mozjpeg_sys::jpeg_error_mgr {
    use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error, JWRN_JPEG_EOF};
    unsafe extern "C-unwind" fn fatal(cinfo: &mut jpeg_common_struct) {
        let code = cinfo.err.as_ref().map_or(-1, |e| e.msg_code);
        let mut text = format!("libjpeg error {code}");
        if let Some(format) = cinfo.err.as_ref().and_then(|e| e.format_message) {
            // libjpeg writes at most JMSG_LENGTH_MAX (200) bytes, NUL included, into the buffer it is
            // given; the binding declares it `&[u8; 80]`, so pass a raw pointer to a larger one.
            type Writer = unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8);
            let mut buf = [0u8; 256];
            // SAFETY: both signatures take a thin pointer as second argument; the buffer outlives the call.
            let write: Writer = unsafe { std::mem::transmute(format) };
            unsafe { write(cinfo, buf.as_mut_ptr()) };
            let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            text = format!("libjpeg: {}", String::from_utf8_lossy(&buf[..len]));
        }
        std::panic::resume_unwind(Box::new(text));
    }
    unsafe extern "C-unwind" fn message(
        cinfo: &mut jpeg_common_struct,
        level: std::os::raw::c_int,
    ) {
        if level < 0
            && cinfo
                .err
                .as_ref()
                .is_some_and(|e| e.msg_code == JWRN_JPEG_EOF)
        {
            std::panic::resume_unwind(Box::new("the data ends early (truncated file)".to_string()));
        }
    }
    // SAFETY: jpeg_error_mgr is a plain C struct that jpeg_std_error fully initialises.
    let mut e: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { jpeg_std_error(&mut e) };
    e.error_exit = Some(fatal);
    e.emit_message = Some(message);
    e
}

/// Pillow's `convert('RGB')` on what the decoder produced. 16-bit samples keep their high byte,
/// as Pillow's PNG unpackers ("RGB;16B", "RGBA;16B", "LA;16B") do when they open the file.
fn to_rgb8_like_pillow(img: DynamicImage, name: &str) -> Result<RgbImage, ImageInputError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = w * h;
    let mut out = Vec::with_capacity(n * 3);
    match img {
        DynamicImage::ImageRgb8(b) => out = b.into_raw(),
        DynamicImage::ImageRgba8(b) => {
            out.extend(b.as_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]))
        }
        DynamicImage::ImageLuma8(b) => out.extend(b.as_raw().iter().flat_map(|&l| [l, l, l])),
        DynamicImage::ImageLumaA8(b) => {
            out.extend(b.as_raw().chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]))
        }
        DynamicImage::ImageRgb16(b) => out.extend(b.as_raw().iter().map(|&v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(b) => out.extend(
            b.as_raw()
                .chunks_exact(4)
                .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8]),
        ),
        DynamicImage::ImageLumaA16(b) => out.extend(b.as_raw().chunks_exact(2).flat_map(|p| {
            let l = (p[0] >> 8) as u8;
            [l, l, l]
        })),
        other => {
            return Err(err(
                name,
                format!(
                    "has pixel type {:?}, which has no Pillow 'RGB' equivalent here",
                    other.color()
                ),
            ))
        }
    }
    Ok(RgbImage::new(w, h, out))
}

// ------------------------------------------------------------------------------------------------
// Pillow BICUBIC resampling (Resample.c, 8 bits per channel)
// ------------------------------------------------------------------------------------------------

/// Fixed-point fraction bits of Pillow's 8-bit resampler: 32 - 8 - 2 (two bits of headroom for
/// coefficients that sum above one or below zero).
const PRECISION_BITS: u32 = 22;

/// Keys' cubic convolution kernel with a = -0.5, support 2 (Pillow's `bicubic_filter`; the
/// operation order is Pillow's so the doubles agree).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One axis of a resize: for each output index, the first input index and its fixed-point weights.
struct AxisCoeffs {
    /// (first input index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` weights per output index, the first `taps` of them used.
    weights: Vec<i32>,
    ksize: usize,
}

/// Pillow's `precompute_coeffs` for the whole input range, followed by `normalize_coeffs_8bpc`.
fn axis_coeffs(in_size: usize, out_size: usize) -> AxisCoeffs {
    const SUPPORT: f64 = 2.0;
    // (double)(in1 - in0) / outSize with the float box (0, in_size): exact for any accepted size.
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0); // antialiasing: widen the kernel when shrinking
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv_filterscale = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C `(int)` truncates toward zero; negative starts are clamped to 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = bicubic(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..xmax {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            // Round half away from zero, then truncate, as `(int)(±0.5 + w * (1 << 22))`.
            let scaled = w * (1u32 << PRECISION_BITS) as f64;
            row[x] = if w < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    AxisCoeffs {
        bounds,
        weights,
        ksize,
    }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift) and clamp to 0..=255.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Start value of every accumulator: one half, so the final shift rounds to nearest.
const ROUND_HALF: i32 = 1 << (PRECISION_BITS - 1);

/// `Image.resize((w, h))` of an RGB image with the default filter (BICUBIC) and no reducing_gap:
/// two separable passes through an 8-bit intermediate image; an unchanged axis is not
/// resampled and an unchanged size is a copy. Which pass runs first follows the reference
/// Pillow ([`vertical_pass_first`]). The i32 accumulators cannot overflow:
/// |sum| <= 255 · Σ|k| · 2^22 < 2^31 for the bicubic kernel (Σ|k| < 1.3).
pub fn resize_bicubic(src: &RgbImage, width: usize, height: usize) -> RgbImage {
    assert!(width > 0 && height > 0, "resize target must be non-empty");
    let need_h = src.width != width;
    let need_v = src.height != height;
    match (need_h, need_v) {
        (false, false) => src.clone(),
        (true, false) => horizontal_pass(src, &axis_coeffs(src.width, width), 0, src.height),
        (false, true) => vertical_pass(src, &axis_coeffs(src.height, height), 0),
        (true, true) if vertical_pass_first(src.width, src.height, width, height) => {
            let tmp = vertical_pass(src, &axis_coeffs(src.height, height), 0);
            horizontal_pass(&tmp, &axis_coeffs(src.width, width), 0, height)
        }
        (true, true) => {
            let vert = axis_coeffs(src.height, height);
            // Only the source rows the vertical pass reads go through the horizontal pass.
            let first = vert.bounds[0].0;
            let last = vert.bounds[height - 1].0 + vert.bounds[height - 1].1;
            let tmp = horizontal_pass(src, &axis_coeffs(src.width, width), first, last);
            vertical_pass(&tmp, &vert, first)
        }
    }
}

/// The pass order of the reference Pillow (13.0.0, as pinned in the reference venv): when both
/// axes change, the vertical pass runs first iff the height shrinks by more than twice as many
/// pixels as the width does (`in_h - h > 2 * (in_w - w)`, so always when the width grows and
/// the height shrinks). Read from its compiled `ImagingResample` and confirmed on 396 random
/// size pairs; Pillow's main branch up to 12.x always ran the horizontal pass first. The order
/// matters: the intermediate image is rounded to 8 bits.
pub fn vertical_pass_first(in_w: usize, in_h: usize, w: usize, h: usize) -> bool {
    let (in_w, in_h, w, h) = (in_w as i64, in_h as i64, w as i64, h as i64);
    in_h - h > 0 && in_h - h > 2 * (in_w - w)
}

/// Pillow's `ImagingResampleHorizontal_8bpc` over source rows `first..last`.
fn horizontal_pass(src: &RgbImage, c: &AxisCoeffs, first: usize, last: usize) -> RgbImage {
    let width = c.bounds.len();
    let mut out = vec![0u8; (last - first) * width * 3];
    for (ty, y) in (first..last).enumerate() {
        let line = &src.data[y * src.width * 3..(y + 1) * src.width * 3];
        for (xx, &(xmin, taps)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..xx * c.ksize + taps];
            let mut acc = [ROUND_HALF; 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &line[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for ch in 0..3 {
                    acc[ch] += p[ch] as i32 * kx;
                }
            }
            let o = (ty * width + xx) * 3;
            for ch in 0..3 {
                out[o + ch] = clip8(acc[ch]);
            }
        }
    }
    RgbImage::new(width, last - first, out)
}

/// Pillow's `ImagingResampleVertical_8bpc`; `src` row 0 is source row `row_offset`.
fn vertical_pass(src: &RgbImage, c: &AxisCoeffs, row_offset: usize) -> RgbImage {
    let height = c.bounds.len();
    let stride = src.width * 3;
    let mut out = vec![0u8; height * stride];
    for (yy, &(ymin, taps)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..yy * c.ksize + taps];
        let dst = &mut out[yy * stride..(yy + 1) * stride];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = ROUND_HALF;
            for (y, &ky) in k.iter().enumerate() {
                acc += src.data[(ymin - row_offset + y) * stride + i] as i32 * ky;
            }
            *d = clip8(acc);
        }
    }
    RgbImage::new(src.width, height, out)
}

// ------------------------------------------------------------------------------------------------
// dynamic_preprocess (model card)
// ------------------------------------------------------------------------------------------------

/// The candidate grids (columns, rows) with 1 <= columns·rows <= max_num, ordered by tile count.
/// Python orders equal counts by set iteration; that order never changes the chosen grid (see
/// docs/internvl3-preprocess.md and the exhaustive test below), so here they follow columns.
pub fn target_ratios(max_num: usize) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = (1..=max_num)
        .flat_map(|i| (1..=max_num / i).map(move |j| (i, j)))
        .collect();
    v.sort_by_key(|&(i, j)| i * j);
    v
}

/// The model card's `find_closest_aspect_ratio`: the grid whose aspect ratio is closest to the
/// image's; on an exact tie the later (larger) grid wins when the image has more than half the
/// pixels that grid's tiles hold.
pub fn find_closest_aspect_ratio(
    aspect: f64,
    ratios: &[(usize, usize)],
    width: usize,
    height: usize,
    image_size: usize,
) -> (usize, usize) {
    let mut best_diff = f64::INFINITY;
    let mut best = (1, 1);
    let area = (width * height) as f64;
    for &(i, j) in ratios {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff
            && area > 0.5 * image_size as f64 * image_size as f64 * i as f64 * j as f64
        {
            best = (i, j);
        }
    }
    best
}

/// The model card's `dynamic_preprocess` with min_num 1: resize to the chosen grid of
/// `image_size` tiles, crop the tiles in raster order, and append a thumbnail (the whole image
/// resized to one tile) when there is more than one tile and `use_thumbnail` is set.
pub fn dynamic_preprocess(
    img: &RgbImage,
    max_num: usize,
    image_size: usize,
    use_thumbnail: bool,
) -> Vec<RgbImage> {
    let aspect = img.width as f64 / img.height as f64;
    let (cols, rows) = find_closest_aspect_ratio(
        aspect,
        &target_ratios(max_num),
        img.width,
        img.height,
        image_size,
    );
    let resized = resize_bicubic(img, image_size * cols, image_size * rows);
    let mut tiles: Vec<RgbImage> = (0..cols * rows)
        .map(|k| {
            resized.crop(
                (k % cols) * image_size,
                (k / cols) * image_size,
                image_size,
                image_size,
            )
        })
        .collect();
    if use_thumbnail && tiles.len() != 1 {
        tiles.push(resize_bicubic(img, image_size, image_size));
    }
    tiles
}

/// `T.ToTensor()` then `T.Normalize(mean, std)` of one tile into `out` (CHW): `u8 / 255` then
/// `(x - mean) / std`, each a true f32 division as PyTorch's CPU kernels compute it.
pub fn normalize_into(tile: &RgbImage, out: &mut [f32]) {
    let plane = tile.width * tile.height;
    assert_eq!(out.len(), 3 * plane, "CHW output size");
    for (p, px) in tile.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + p] = (px[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
}

/// The pixel values of an already decoded image: [T, 3, input_size, input_size] f32.
pub fn pixel_values(img: &RgbImage, input_size: usize, max_num: usize) -> HostTensor {
    let tiles = dynamic_preprocess(img, max_num, input_size, true);
    let per = 3 * input_size * input_size;
    let mut v = vec![0f32; tiles.len() * per];
    for (t, chunk) in tiles.iter().zip(v.chunks_exact_mut(per)) {
        // `T.Resize((input_size, input_size))` is a copy: every tile already has that size.
        normalize_into(t, chunk);
    }
    HostTensor::from_f32([tiles.len(), 3, input_size, input_size], v)
        .expect("shape matches the buffer")
}

/// The model card's `load_image(path, input_size, max_num)`: [T, 3, input_size, input_size] f32
/// pixel values (before any bf16 cast), T = tiles (+ thumbnail).
pub fn load_image(
    path: &Path,
    input_size: usize,
    max_num: usize,
) -> Result<HostTensor, ImageInputError> {
    let name = path.display().to_string();
    // Bounds keep the output allocation bounded (at most 41 tiles of 896², about 395 MB of f32).
    if !(1..=MAX_INPUT_SIZE).contains(&input_size) {
        return Err(err(&name, format!("input_size {input_size} is out of range (expected 1..={MAX_INPUT_SIZE}; InternViT uses 448)")));
    }
    if !(1..=MAX_MAX_NUM).contains(&max_num) {
        return Err(err(&name, format!("max_num {max_num} is out of range (expected 1..={MAX_MAX_NUM}; the model card uses 12)")));
    }
    let img = decode_rgb(path)?;
    Ok(pixel_values(&img, input_size, max_num))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Python's sorted(set(...)) order for max_num 12 (CPython 3.11 `set` iteration), pasted from
    /// the model card's code run under the reference interpreter.
    const PY_ORDER_12: [(usize, usize); 35] = [
        (1, 1),
        (1, 2),
        (2, 1),
        (3, 1),
        (1, 3),
        (2, 2),
        (4, 1),
        (1, 4),
        (5, 1),
        (1, 5),
        (1, 6),
        (6, 1),
        (3, 2),
        (2, 3),
        (7, 1),
        (1, 7),
        (4, 2),
        (2, 4),
        (1, 8),
        (8, 1),
        (1, 9),
        (3, 3),
        (9, 1),
        (2, 5),
        (5, 2),
        (10, 1),
        (1, 10),
        (11, 1),
        (1, 11),
        (12, 1),
        (3, 4),
        (4, 3),
        (1, 12),
        (6, 2),
        (2, 6),
    ];

    #[test]
    fn target_ratios_are_the_python_set_sorted_by_area() {
        let ours = target_ratios(12);
        let mut a = ours.clone();
        let mut b = PY_ORDER_12.to_vec();
        a.sort();
        b.sort();
        assert_eq!(a, b, "same candidate grids");
        let areas = |v: &[(usize, usize)]| v.iter().map(|&(i, j)| i * j).collect::<Vec<_>>();
        assert_eq!(areas(&ours), areas(&PY_ORDER_12), "same area order");
    }

    /// The order of equal-area grids cannot change the result: for every pair of distinct
    /// equal-area grids, the point where they tie is strictly closer to a grid with no more
    /// tiles (exact rational arithmetic), so neither of the pair is ever the best at its tie.
    #[test]
    fn equal_area_order_never_matters() {
        for max_num in 1..=12 {
            let c = target_ratios(max_num);
            for &(a0, a1) in &c {
                for &(b0, b1) in &c {
                    if (a0, a1) >= (b0, b1) || a0 * a1 != b0 * b1 {
                        continue;
                    }
                    // Midpoint m = (a0/a1 + b0/b1)/2 = num/den; compare |m - r| as fractions.
                    let (num, den) = ((a0 * b1 + b0 * a1) as i128, (2 * a1 * b1) as i128);
                    let dist = |p: usize, q: usize| {
                        ((num * q as i128 - p as i128 * den).abs(), den * q as i128)
                    };
                    let tie = dist(a0, a1);
                    let closer = c
                        .iter()
                        .filter(|&&(p, q)| {
                            p * q <= a0 * a1 && (p, q) != (a0, a1) && (p, q) != (b0, b1)
                        })
                        .any(|&(p, q)| {
                            let d = dist(p, q);
                            d.0 * tie.1 < tie.0 * d.1
                        });
                    assert!(
                        closer,
                        "max_num {max_num}: ({a0},{a1}) vs ({b0},{b1}) could tie"
                    );
                }
            }
        }
    }

    #[test]
    fn grids_follow_the_spec_examples() {
        let r = target_ratios(12);
        // Expected grids from the model card's Python code. 448x448 -> one tile; 1000x1000 ->
        // (3,3) through the larger-grid tie rule.
        assert_eq!(find_closest_aspect_ratio(1.0, &r, 448, 448, 448), (1, 1));
        assert_eq!(find_closest_aspect_ratio(1.0, &r, 1000, 1000, 448), (3, 3));
        assert_eq!(
            find_closest_aspect_ratio(500.0 / 120.0, &r, 500, 120, 448),
            (4, 1)
        );
        let img = RgbImage::new(1000, 1000, vec![7; 3_000_000]);
        assert_eq!(dynamic_preprocess(&img, 12, 448, true).len(), 10);
        // 37x61 (aspect 0.61) -> (2,3): 6 tiles + thumbnail; with max_num 1 a single tile.
        assert_eq!(
            find_closest_aspect_ratio(37.0 / 61.0, &r, 37, 61, 448),
            (2, 3)
        );
        let small = RgbImage::new(37, 61, vec![9; 37 * 61 * 3]);
        assert_eq!(dynamic_preprocess(&small, 12, 448, true).len(), 7);
        assert_eq!(dynamic_preprocess(&small, 1, 448, true).len(), 1);
        assert_eq!(
            find_closest_aspect_ratio(120.0 / 500.0, &target_ratios(3), 120, 500, 448),
            (1, 3)
        );
    }

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point() {
        for (i, o) in [
            (37, 448),
            (500, 1792),
            (1000, 448),
            (3, 448),
            (448, 448 * 3),
            (120, 448),
        ] {
            let c = axis_coeffs(i, o);
            for (xx, &(_, taps)) in c.bounds.iter().enumerate() {
                let s: i64 = c.weights[xx * c.ksize..xx * c.ksize + taps]
                    .iter()
                    .map(|&k| k as i64)
                    .sum();
                assert!(
                    (s - (1 << 22)).abs() <= taps as i64,
                    "{i}->{o} index {xx}: sum {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::new(37, 61, [10u8, 128, 250].repeat(37 * 61));
        let out = resize_bicubic(&img, 448, 896);
        assert!(out.data.chunks_exact(3).all(|p| p == [10, 128, 250]));
    }

    #[test]
    fn normalize_matches_the_formula() {
        let tile = RgbImage::new(1, 1, vec![0, 128, 255]);
        let mut out = [0f32; 3];
        normalize_into(&tile, &mut out);
        assert_eq!(out[0], (0.0f32 - 0.485) / 0.229);
        assert_eq!(out[1], (128.0f32 / 255.0 - 0.456) / 0.224);
        assert_eq!(out[2], (1.0f32 - 0.406) / 0.225);
    }
}
