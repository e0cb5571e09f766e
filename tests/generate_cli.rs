//! `openuni generate` with the built-in tiny model: PNGs of the asked size with their parameters,
//! re-runs skip finished images (and only those), and bad input is reported clearly (more bad
//! input in tests/bad_inputs.rs).

use std::path::Path;
use std::process::Command;

use openuni::image::read_png;

fn generate(cache: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_openuni"))
        .arg("generate")
        .args(args)
        .env("OPENUNI_CACHE", cache)
        // No Hugging Face cache: the built-in model must be chosen.
        .env("HF_HUB_CACHE", cache.join("no-hub"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn builtin_model_writes_pngs_with_parameters_and_skips_existing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = [
        "--prompt",
        "a red bicycle",
        "--steps",
        "2",
        "--height",
        "64",
        "--width",
        "96",
        "--seed",
        "7",
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = generate(tmp.path(), &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("not meaningful"), "{stderr}");
    let file = out.join("00000-7-a-red-bicycle.png");
    assert!(stdout.contains("00000-7-a-red-bicycle.png"), "{stdout}");
    let (w, h, rgb, text) = read_png(&file).unwrap();
    assert_eq!((w, h, rgb.len()), (96, 64, 96 * 64 * 3));
    let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone());
    assert_eq!(get("prompt").as_deref(), Some("a red bicycle"));
    assert_eq!(get("seed").as_deref(), Some("7"));
    assert_eq!(get("steps").as_deref(), Some("2"));
    // Not a constant image: the whole path ran.
    assert!(rgb.iter().any(|&v| v != rgb[0]));

    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    let (code, _, stderr) = generate(tmp.path(), &args);
    assert_eq!(code, 0);
    assert!(
        stderr.contains("exists with the same settings, skipped"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        before
    );

    // The same seed reproduces the same pixels.
    let out2 = tmp.path().join("out2");
    let mut args2 = args.to_vec();
    *args2.last_mut().unwrap() = out2.to_str().unwrap();
    assert_eq!(generate(tmp.path(), &args2).0, 0);
    assert_eq!(
        read_png(&out2.join("00000-7-a-red-bicycle.png")).unwrap().2,
        rgb
    );
}

#[test]
fn prompts_file_reports_bad_lines_and_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("p.txt");
    std::fs::write(
        &prompts,
        "a cat\n{\"prompt\": \"a dog\", \"seed\": 3}\n{\"prompt\": 5}\n\n# comment\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let (code, stdout, stderr) = generate(
        tmp.path(),
        &[
            "--prompts",
            prompts.to_str().unwrap(),
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "32",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        code, 1,
        "a skipped line makes the exit code non-zero: {stderr}"
    );
    assert!(stderr.contains("p.txt:3: no string `prompt`"), "{stderr}");
    assert!(
        stdout.contains("00000-42-a-cat.png") && stdout.contains("00001-3-a-dog.png"),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _, err) = generate(tmp.path(), &["--prompt", "x", "--variant", "xl"]);
    assert_eq!(code, 2);
    assert!(err.contains("--variant `xl`"), "{err}");
    let (code, _, err) = generate(
        tmp.path(),
        &[
            "--prompt",
            "x",
            "--height",
            "100",
            "--out",
            tmp.path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("--height 100"), "{err}");
    let (code, _, err) = generate(tmp.path(), &["--prompt", "x", "--mllm", "/nowhere"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("not found") && err.contains("--checkpoint"),
        "{err}"
    );
    let (code, _, err) = generate(
        tmp.path(),
        &[
            "--prompt",
            "   ",
            "--out",
            tmp.path().to_str().unwrap(),
            "--height",
            "32",
            "--width",
            "32",
        ],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("empty"), "{err}");
    for (flags, want) in [
        (
            &["--decode-tile", "100"][..],
            "--decode-tile 100 is not a positive multiple of 32",
        ),
        (&["--decode-tile", "0"][..], "--decode-tile 0"),
        (
            &["--decode-tile", "32"][..],
            "--decode-tile 32 keeps no pixels of its own: each tile decodes 24 px of context",
        ),
    ] {
        let mut args = vec![
            "--prompt",
            "x",
            "--steps",
            "1",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            tmp.path().to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let (code, _, err) = generate(tmp.path(), &args);
        assert_eq!(code, 2, "{flags:?}: {err}");
        assert!(err.contains(want), "{flags:?}: {err}");
    }
}

#[test]
fn tiled_decode_flag_writes_the_full_image() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let args = [
        "--prompt",
        "a lighthouse",
        "--steps",
        "1",
        "--height",
        "128",
        "--width",
        "160",
        "--seed",
        "5",
        "--out",
        out.to_str().unwrap(),
    ];
    let mut tiled = args.to_vec();
    tiled.extend(["--decode-tile", "64"]);
    let (code, _, stderr) = generate(tmp.path(), &tiled);
    assert_eq!(code, 0, "{stderr}");
    let (w, h, rgb, _) = read_png(&out.join("00000-5-a-lighthouse.png")).unwrap();
    assert_eq!((w, h, rgb.len()), (160, 128, 160 * 128 * 3));
    assert!(rgb.iter().any(|&v| v != rgb[0]));
    // The same generation decoded in one piece: the tiled decode is exact up to summation
    // order, so at most a rounding step of the uint8 cast may differ.
    let out2 = tmp.path().join("out2");
    let mut plain = args.to_vec();
    *plain.last_mut().unwrap() = out2.to_str().unwrap();
    assert_eq!(generate(tmp.path(), &plain).0, 0);
    let rgb2 = read_png(&out2.join("00000-5-a-lighthouse.png")).unwrap().2;
    let max_diff = rgb
        .iter()
        .zip(&rgb2)
        .map(|(&a, &b)| a.abs_diff(b))
        .max()
        .unwrap();
    let differing = rgb.iter().zip(&rgb2).filter(|(a, b)| a != b).count();
    eprintln!("tiled (64-px tiles) vs one-piece decode: {differing} of {} values differ, by at most {max_diff}", rgb.len());
    assert!(max_diff <= 1, "{max_diff}");
}

/// A re-run skips only a complete PNG made with the same settings: a truncated, empty or foreign
/// file at the name, or an image made with other settings, is made again with a note, and no
/// temporary file is left.
#[test]
fn rerun_remakes_truncated_files_and_images_of_other_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let file = out.join("00000-3-a-kite.png");
    let args = |steps: &'static str| {
        [
            "--prompt",
            "a kite",
            "--steps",
            steps,
            "--height",
            "32",
            "--width",
            "64",
            "--seed",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]
    };
    let (code, _, stderr) = generate(tmp.path(), &args("1"));
    assert_eq!(code, 0, "{stderr}");
    let good = std::fs::read(&file).unwrap();

    let leftovers = || {
        std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect::<Vec<_>>()
    };
    for (what, bytes) in [
        ("empty", vec![]),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("not a PNG", b"hello".to_vec()),
    ] {
        std::fs::write(&file, &bytes).unwrap();
        let (code, _, stderr) = generate(tmp.path(), &args("1"));
        assert_eq!(code, 0, "{what}: {stderr}");
        assert!(
            stderr.contains("making it again") && !stderr.contains("skipped"),
            "{what}: {stderr}"
        );
        assert_eq!(
            std::fs::read(&file).unwrap(),
            good,
            "{what}: the same settings make the same image"
        );
        assert!(leftovers().is_empty(), "{what}: {:?}", leftovers());
    }

    // Other settings: made again, and the PNG says so.
    let (code, _, stderr) = generate(tmp.path(), &args("2"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("made with other settings: steps 1 (now 2)")
            && stderr.contains("making it again"),
        "{stderr}"
    );
    let text = read_png(&file).unwrap().3;
    assert!(
        text.contains(&("steps".to_string(), "2".to_string())),
        "{text:?}"
    );
    // And now it is finished for those settings.
    let (code, _, stderr) = generate(tmp.path(), &args("2"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("exists with the same settings, skipped"),
        "{stderr}"
    );
    assert!(leftovers().is_empty(), "{:?}", leftovers());
}
