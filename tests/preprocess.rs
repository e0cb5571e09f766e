//! InternVL3 image preprocessing: the committed `preprocess` cases (Pillow 13 + torchvision
//! transform, tools/make_references.py) must match bit for bit, a one-ulp change must fail, and
//! bad images must give clear errors naming the file, never a panic or an unbounded allocation.

use std::path::{Path, PathBuf};
use std::process::Command;

use openuni::exec::Device;
use openuni::verify::{run_case, Options};
use openuni_models::internvl_preprocess::{decode_rgb, decode_rgb_bytes, load_image, MAX_PIXELS};
use openuni_tensor::{write_safetensors, DType, HostTensor, Weights};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn preprocess_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            std::fs::read_to_string(p.join("case.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|j| j["component"] == "preprocess")
        })
        .collect();
    v.sort();
    v
}

fn cpu() -> Options {
    Options {
        device: Device::Cpu,
        dtype: DType::F32,
        diff_nodes: false,
    }
}

#[test]
fn committed_cases_match_pillow_bit_for_bit() {
    let cases = preprocess_cases();
    assert!(
        cases.len() >= 10,
        "expected the committed preprocess cases, found {}",
        cases.len()
    );
    for c in &cases {
        let report = run_case(c, &cpu()).unwrap_or_else(|e| panic!("{}: {e:#}", c.display()));
        let text = report.render();
        assert!(report.passed(), "{text}");
        assert!(
            report.lines.iter().all(|l| l.diff.max_abs == 0.0),
            "not bit-exact:\n{text}"
        );
    }
}

/// The CLI path: component registered, exit 0 and PASS.
#[test]
fn verify_cli_runs_a_preprocess_case() {
    let case = fixtures().join("preprocess_wide_250x60");
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("verify")
        .arg(&case)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("component preprocess") && stdout.contains("result: PASS"),
        "{stdout}"
    );
}

/// A single value one ulp away from the reference fails the case: the comparison really is exact.
#[test]
fn one_ulp_off_fails() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("preprocess_la_alpha");
    for f in ["case.json", "image.png"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let pv = Weights::open(src.join("io.safetensors"))
        .unwrap()
        .get("pixel_values")
        .unwrap();
    let mut v = pv.to_f32_vec();
    v[1234] = f32::from_bits(v[1234].to_bits() + 1);
    let edited = HostTensor::from_f32(pv.shape.clone(), v).unwrap();
    write_safetensors(
        &dir.path().join("io.safetensors"),
        [("pixel_values", &edited)],
        None,
    )
    .unwrap();
    let report = run_case(dir.path(), &cpu()).unwrap();
    assert!(
        !report.passed(),
        "a one-ulp difference passed:\n{}",
        report.render()
    );
}

/// Calls the loader and returns its error message; a panic fails the test.
fn load_err(path: &Path) -> String {
    match load_image(path, 448, 12) {
        Ok(t) => panic!("{}: accepted, shape {}", path.display(), t.shape),
        Err(e) => e.to_string(),
    }
}

fn assert_names(msg: &str, path: &Path, phrase: &str) {
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    assert!(
        msg.to_lowercase().contains(&phrase.to_lowercase()),
        "error lacks `{phrase}`: {msg}"
    );
}

/// A PNG with only a signature, an IHDR claiming `w`x`h` (8-bit RGB) and an IEND.
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IEND", &[]);
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn small_png() -> Vec<u8> {
    let mut buf = Vec::new();
    let mut enc = png::Encoder::new(&mut buf, 40, 30);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let data: Vec<u8> = (0..40 * 30 * 3).map(|i| (i * 37 % 251) as u8).collect();
    enc.write_header().unwrap().write_image_data(&data).unwrap();
    buf
}

#[test]
fn bad_images_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);

    std::fs::write(p("empty.png"), b"").unwrap();
    assert_names(
        &load_err(&p("empty.png")),
        &p("empty.png"),
        "empty (0 bytes)",
    );

    assert_names(
        &load_err(&p("missing.png")),
        &p("missing.png"),
        "cannot read",
    );
    assert_names(&load_err(dir.path()), dir.path(), "not a file");

    std::fs::write(p("notes.png"), b"this is not an image at all").unwrap();
    assert_names(
        &load_err(&p("notes.png")),
        &p("notes.png"),
        "not a PNG, JPEG or WebP",
    );

    let mut corrupt = small_png();
    let n = corrupt.len();
    for b in &mut corrupt[40..n - 20] {
        *b ^= 0x5A;
    }
    std::fs::write(p("corrupt.png"), &corrupt).unwrap();
    assert_names(
        &load_err(&p("corrupt.png")),
        &p("corrupt.png"),
        "corrupt or truncated",
    );

    let png = small_png();
    std::fs::write(p("truncated.png"), &png[..png.len() / 2]).unwrap();
    assert_names(
        &load_err(&p("truncated.png")),
        &p("truncated.png"),
        "corrupt or truncated",
    );

    let jpeg = std::fs::read(fixtures().join("preprocess_jpeg/image.jpg")).unwrap();
    std::fs::write(p("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    // A cut scan is an error (Pillow: "image file is truncated"), not an image padded with grey.
    assert_names(
        &load_err(&p("truncated.jpg")),
        &p("truncated.jpg"),
        "corrupt or truncated",
    );
    // Every 7th byte of the second half flipped: Pillow reports "broken data stream".
    let mut jcorrupt = jpeg.clone();
    let n = jcorrupt.len();
    for b in jcorrupt[n / 2..n - 2].iter_mut().step_by(7) {
        *b ^= 0x55;
    }
    std::fs::write(p("corrupt.jpg"), &jcorrupt).unwrap();
    assert_names(
        &load_err(&p("corrupt.jpg")),
        &p("corrupt.jpg"),
        "corrupt or truncated",
    );
    let webp = std::fs::read(fixtures().join("preprocess_webp_lossy_alpha/image.webp")).unwrap();
    std::fs::write(p("truncated.webp"), &webp[..webp.len() * 2 / 3]).unwrap();
    assert_names(
        &load_err(&p("truncated.webp")),
        &p("truncated.webp"),
        "corrupt or truncated",
    );
    let msg = load_err(&p("truncated.jpg"));
    assert!(msg.contains("truncated file"), "{msg}");
    std::fs::write(p("header_cut.jpg"), &jpeg[..100]).unwrap();
    assert_names(
        &load_err(&p("header_cut.jpg")),
        &p("header_cut.jpg"),
        "jpeg",
    );

    // 30000x30000 declared in a 50-byte file: refused from the header, before any allocation.
    std::fs::write(p("huge.png"), png_header_only(30000, 30000)).unwrap();
    let msg = load_err(&p("huge.png"));
    assert_names(&msg, &p("huge.png"), "30000x30000");
    assert!(msg.contains(&MAX_PIXELS.to_string()), "{msg}");

    // The same for a JPEG whose frame header (SOF0) is patched to 30000x30000.
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline JPEG has SOF0");
    let mut huge_jpeg = jpeg.clone();
    huge_jpeg[sof + 5..sof + 9].copy_from_slice(&[0x75, 0x30, 0x75, 0x30]);
    std::fs::write(p("huge.jpg"), &huge_jpeg).unwrap();
    assert_names(&load_err(&p("huge.jpg")), &p("huge.jpg"), "30000x30000");

    std::fs::write(p("zero.png"), png_header_only(0, 16)).unwrap();
    assert_names(&load_err(&p("zero.png")), &p("zero.png"), "png");

    let bad = fixtures().join("preprocess_bad_inputs");
    assert_names(
        &load_err(&bad.join("cmyk.jpg")),
        &bad.join("cmyk.jpg"),
        "CMYK",
    );
    assert_names(
        &load_err(&bad.join("gray16.png")),
        &bad.join("gray16.png"),
        "16-bit grayscale",
    );

    // A GIF is a real image format, but not one the model card's pipeline is specified for here.
    std::fs::write(p("x.gif"), b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    assert_names(&load_err(&p("x.gif")), &p("x.gif"), "PNG, JPEG and WebP");
}

#[test]
fn max_num_out_of_range_is_refused() {
    let img = fixtures().join("preprocess_la_alpha/image.png");
    let e = load_image(&img, 448, 0).unwrap_err().to_string();
    assert!(
        e.contains("max_num 0") && e.contains(&img.display().to_string()),
        "{e}"
    );
    let e = load_image(&img, 448, 1000).unwrap_err().to_string();
    assert!(e.contains("max_num 1000"), "{e}");
    let e = load_image(&img, 100_000, 12).unwrap_err().to_string();
    assert!(e.contains("input_size 100000"), "{e}");
}

/// 16-bit RGB keeps the high byte of each sample, as Pillow's "RGB;16B" unpacker does (the
/// committed preprocess_rgb16 case checks the whole pipeline; this checks the decode alone).
#[test]
fn sixteen_bit_rgb_keeps_the_high_byte() {
    let mut buf = Vec::new();
    let mut enc = png::Encoder::new(&mut buf, 2, 1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Sixteen);
    let samples: [u16; 6] = [0x01FF, 0x8080, 0xFF00, 0x00FF, 0x7F80, 0x1234];
    let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_be_bytes()).collect();
    enc.write_header()
        .unwrap()
        .write_image_data(&bytes)
        .unwrap();
    let img = decode_rgb_bytes(&buf, "rgb16.png").unwrap();
    assert_eq!(img.data, vec![0x01, 0x80, 0xFF, 0x00, 0x7F, 0x12]);
    assert!(decode_rgb(Path::new("/nonexistent/x.png"))
        .unwrap_err()
        .to_string()
        .starts_with("/nonexistent/x.png: "));
}

/// Low-bit gray PNGs scale like Pillow's unpackers: 1-bit -> 0/255 (mode "1"), 2-bit -> x85
/// ("L;2"). Expected values printed by Pillow 13.0.0 for the same 4x1 images.
#[test]
fn low_bit_gray_scales_like_pillow() {
    for (depth, row, pillow) in [
        (png::BitDepth::Two, 0b0001_1011u8, [0u8, 85, 170, 255]),
        (png::BitDepth::One, 0b0101_0000, [0, 255, 0, 255]),
    ] {
        let mut buf = Vec::new();
        let mut enc = png::Encoder::new(&mut buf, 4, 1);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(depth);
        enc.write_header()
            .unwrap()
            .write_image_data(&[row])
            .unwrap();
        let img = decode_rgb_bytes(&buf, "low.png").unwrap();
        let want: Vec<u8> = pillow.iter().flat_map(|&v| [v, v, v]).collect();
        assert_eq!(img.data, want, "{depth:?}");
    }
}
