//! `openuni generate --eval`: the three benchmark layouts from examples/eval/ (tiny model, 64 px,
//! 2 steps), shards and devices that give bit-identical files, a failing device's work retried on
//! another, interrupted runs that resume to the uninterrupted result, and `--check`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use openuni::image::read_png;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/eval");
const SMALL: [&str; 6] = ["--steps", "2", "--height", "64", "--width", "64"];

fn openuni(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_openuni"));
    c.arg("generate")
        .args(args)
        .env("OPENUNI_CACHE", cache)
        .env("HF_HUB_CACHE", cache.join("no-hub"));
    for k in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_COUNT",
        "JOB_COMPLETION_INDEX",
        "JOB_COMPLETION_COUNT",
        "OPENUNI_EMU_DEVICES",
        "OPENUNI_EMU_FAIL_DEVICE",
        "OPENUNI_EMU_FAIL_AFTER",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn eval(
    cache: &Path,
    bench: &str,
    prompts: &str,
    out: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut args = vec![
        "--eval",
        bench,
        "--prompts",
        prompts,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(SMALL);
    args.extend(extra);
    openuni(cache, &args, env).output().unwrap()
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

/// Every file under `dir` except the manifests, by relative path, with its bytes.
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if !p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("manifest-")
            {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The two folders hold the same files, bit for bit (names of any that differ otherwise).
fn assert_same(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    let names = |f: &BTreeMap<PathBuf, Vec<u8>>| {
        f.keys()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(&fa),
        names(&fb),
        "different files in {} and {}",
        a.display(),
        b.display()
    );
    let differing: Vec<String> = fa
        .iter()
        .filter(|(k, v)| fb[*k] != **v)
        .map(|(k, _)| k.display().to_string())
        .collect();
    assert!(
        differing.is_empty(),
        "differ between {} and {}: {differing:?}",
        a.display(),
        b.display()
    );
}

fn check(cache: &Path, bench: &str, prompts: &str, dir: &Path) -> (i32, String) {
    let o = openuni(
        cache,
        &[
            "--eval",
            bench,
            "--prompts",
            prompts,
            "--check",
            dir.to_str().unwrap(),
        ],
        &[],
    )
    .output()
    .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

fn example(name: &str) -> String {
    format!("{EXAMPLES}/{name}")
}

#[test]
fn three_layouts_from_the_example_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    // GenEval: {index:05}/metadata.jsonl (the prompt's line) and samples/{k:05}.png.
    let geneval = tmp.path().join("geneval");
    ok(&eval(
        cache,
        "geneval",
        &example("geneval_metadata.jsonl"),
        &geneval,
        &["--samples", "2"],
        &[],
    ));
    let lines: Vec<String> = std::fs::read_to_string(example("geneval_metadata.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let names: Vec<String> = files(&geneval)
        .keys()
        .map(|p| p.display().to_string())
        .collect();
    let mut want = vec![];
    for i in 0..lines.len() {
        want.extend([
            format!("{i:05}/metadata.jsonl"),
            format!("{i:05}/samples/00000.png"),
            format!("{i:05}/samples/00001.png"),
        ]);
    }
    assert_eq!(names, want);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            &std::fs::read_to_string(geneval.join(format!("{i:05}/metadata.jsonl"))).unwrap(),
            line
        );
    }
    let (w, h, a, _) = read_png(&geneval.join("00000/samples/00000.png")).unwrap();
    assert_eq!((w, h), (64, 64));
    assert_ne!(
        a,
        read_png(&geneval.join("00000/samples/00001.png"))
            .unwrap()
            .2,
        "two samples of a prompt have different seeds"
    );
    assert_eq!(
        check(
            cache,
            "geneval",
            &example("geneval_metadata.jsonl"),
            &geneval
        )
        .0,
        1,
        "--check counts 4 samples by default"
    );

    // DPG-Bench: one 2x2 grid of 4 samples per prompt file, named after its stem.
    let dpg = tmp.path().join("dpg");
    ok(&eval(
        cache,
        "dpg",
        &example("dpg_prompts"),
        &dpg,
        &["--batch", "3"],
        &[],
    ));
    let names: Vec<String> = files(&dpg)
        .keys()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(names, ["1.png", "2.png"]);
    let (w, h, grid, text) = read_png(&dpg.join("1.png")).unwrap();
    assert_eq!((w, h), (128, 128));
    assert_eq!(
        text.iter()
            .find(|(k, _)| k == "seed")
            .unwrap()
            .1
            .split(',')
            .count(),
        4
    );
    let tile = |k: usize| -> Vec<u8> {
        (0..64)
            .flat_map(|y| grid[((k / 2 * 64 + y) * 128 + k % 2 * 64) * 3..][..64 * 3].to_vec())
            .collect()
    };
    assert_ne!(tile(0), tile(1));
    assert_ne!(tile(2), tile(3));
    let (code, report) = check(cache, "dpg", &example("dpg_prompts"), &dpg);
    assert_eq!(code, 0, "{report}");

    // WISE: {prompt_id}.png.
    let wise = tmp.path().join("wise");
    ok(&eval(
        cache,
        "wise",
        &example("wise_prompts.json"),
        &wise,
        &[],
        &[],
    ));
    let names: Vec<String> = files(&wise)
        .keys()
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(names, ["1.png", "2.png", "3.png"]);
    let (code, report) = check(cache, "wise", &example("wise_prompts.json"), &wise);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("3 of 3 files complete"), "{report}");
    // A re-run makes nothing.
    let err = ok(&eval(
        cache,
        "wise",
        &example("wise_prompts.json"),
        &wise,
        &[],
        &[],
    ));
    assert!(
        err.contains("3 file(s) of this shard are complete already"),
        "{err}"
    );
}

#[test]
fn four_shards_make_the_files_of_one_and_never_the_same_file() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let prompts = example("geneval_metadata.jsonl");
    let one = tmp.path().join("one");
    // The set's batches are fixed by --batch (the same for every shard): batch b goes to shard b % 4.
    ok(&eval(
        cache,
        "geneval",
        &prompts,
        &one,
        &["--samples", "3", "--batch", "2"],
        &[],
    ));
    let four = tmp.path().join("four");
    for k in 0..4 {
        // Shard 1 from the Slurm environment, shard 3 from a Kubernetes Indexed Job's, the rest by flag.
        let shard = format!("{k}/4");
        let k_s = k.to_string();
        let (extra, env): (Vec<&str>, Vec<(&str, &str)>) = match k {
            1 => (
                vec![],
                vec![
                    ("SLURM_ARRAY_TASK_ID", &k_s),
                    ("SLURM_ARRAY_TASK_COUNT", "4"),
                ],
            ),
            3 => (
                vec![],
                vec![
                    ("JOB_COMPLETION_INDEX", &k_s),
                    ("JOB_COMPLETION_COUNT", "4"),
                ],
            ),
            _ => (vec!["--shard", &shard], vec![]),
        };
        let mut args = vec!["--samples", "3", "--batch", "2"];
        args.extend(extra);
        let err = ok(&eval(cache, "geneval", &prompts, &four, &args, &env));
        assert!(err.contains(&format!("shard {k}/4")), "{err}");
        if k == 1 {
            assert!(err.contains("from $SLURM_ARRAY_TASK_ID=1"), "{err}");
        }
    }
    assert_same(&one, &four);
    // Each shard's manifest lists its own files: 9 files over 4 shards, i % 4.
    let mut listed = vec![];
    for k in 0..4 {
        let text = std::fs::read_to_string(four.join(format!("manifest-{k}-of-4.jsonl"))).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["shard"], format!("{k}/4"));
            for key in [
                "prompt",
                "seeds",
                "steps",
                "guidance",
                "device",
                "seconds_per_image",
            ] {
                assert!(v.get(key).is_some(), "{key} in {line}");
            }
            listed.push(v["file"].as_str().unwrap().to_string());
        }
    }
    listed.sort();
    assert_eq!(listed.len(), 9);
    listed.dedup();
    assert_eq!(listed.len(), 9);
    let (code, report) = check(cache, "geneval", &prompts, &four);
    assert_eq!(code, 1, "{report}"); // --samples not given to --check: 4 per prompt expected
    let o = openuni(
        cache,
        &[
            "--eval",
            "geneval",
            "--prompts",
            &prompts,
            "--samples",
            "3",
            "--check",
            four.to_str().unwrap(),
        ],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

#[test]
fn check_reports_missing_and_duplicated_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let prompts = example("wise_prompts.json");
    let out = tmp.path().join("wise");
    for k in 0..2 {
        ok(&eval(
            cache,
            "wise",
            &prompts,
            &out,
            &["--shard", &format!("{k}/2")],
            &[],
        ));
    }
    assert_eq!(check(cache, "wise", &prompts, &out).0, 0);
    std::fs::remove_file(out.join("2.png")).unwrap();
    // Another shard layout also wrote 1.png (shard 0/2 did too).
    let other = std::fs::read_to_string(out.join("manifest-0-of-2.jsonl"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(other.contains("\"file\":\"1.png\""), "{other}");
    std::fs::write(out.join("manifest-0-of-3.jsonl"), format!("{other}\n")).unwrap();
    let (code, report) = check(cache, "wise", &prompts, &out);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("missing: 2.png: missing"), "{report}");
    assert!(
        report.contains(
            "duplicated: 1.png: written by 2 shards (manifest-0-of-2.jsonl, manifest-0-of-3.jsonl)"
        ),
        "{report}"
    );
    // A truncated PNG counts as missing.
    let bytes = std::fs::read(out.join("3.png")).unwrap();
    std::fs::write(out.join("3.png"), &bytes[..bytes.len() / 2]).unwrap();
    let (_, report) = check(cache, "wise", &prompts, &out);
    assert!(
        report.contains("missing: 3.png: not a complete PNG"),
        "{report}"
    );
}

#[test]
fn malformed_prompt_files_and_flags_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let out = tmp.path().join("out");
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        (
            "geneval",
            write("g1.jsonl", "{\"prompt\": \"a\"}\n{\"tag\": \"x\"}\n"),
            vec![],
            "g1.jsonl:2: no field `prompt`",
        ),
        (
            "geneval",
            write("g2.jsonl", "{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\"}\n"),
            vec![],
            "g2.jsonl:2: empty line",
        ),
        (
            "geneval",
            write("g3.jsonl", "{\"prompt\": 3}\n"),
            vec![],
            "g3.jsonl:1: field `prompt`: expected a string, found a number",
        ),
        (
            "wise",
            write("w1.json", "[{\"prompt_id\": 1, \"prompt\": \"a\"}]"),
            vec![],
            "w1.json: entry 0 (prompt_id 1): no field `Prompt`",
        ),
        (
            "wise",
            write(
                "w2.json",
                "[{\"prompt_id\": 1, \"Prompt\": \"a\"}, {\"prompt_id\": 1, \"Prompt\": \"b\"}]",
            ),
            vec![],
            "entry 1: prompt_id 1 again (first at entry 0)",
        ),
        (
            "wise",
            write("w3.json", "{\"prompt_id\": 1}"),
            vec![],
            "w3.json: expected a JSON list",
        ),
        (
            "dpg",
            write("d.txt", "a"),
            vec![],
            "reads a folder of prompt files",
        ),
        (
            "wise",
            example("wise_prompts.json"),
            vec!["--shard", "2/2"],
            "shard index 2 is not below the shard count 2",
        ),
        (
            "wise",
            example("wise_prompts.json"),
            vec!["--samples", "2"],
            "--samples 2: --eval wise makes 1 image per prompt",
        ),
        (
            "wise",
            example("wise_prompts.json"),
            vec!["--device", "emu:0,0"],
            "device 0 is listed twice",
        ),
    ];
    for (bench, file, extra, says) in cases {
        let o = eval(cache, bench, &file, &out, &extra, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bench} {file}: {err}");
        assert!(err.contains(says), "want `{says}` in: {err}");
    }
    let o = eval(
        cache,
        "wise",
        &example("wise_prompts.json"),
        &out,
        &[],
        &[
            ("SLURM_ARRAY_TASK_ID", "x"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ],
    );
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("$SLURM_ARRAY_TASK_ID=\"x\" is not a non-negative integer"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Kills the run (SIGKILL and SIGINT, alternately) at pseudo-random points, re-runs until it
/// finishes, and compares with an uninterrupted run: the same files, bit for bit, no corrupt PNG,
/// no temporary file left.
#[test]
fn interrupted_runs_resume_to_the_uninterrupted_files() {
    // 60 images: long enough (about a second here) to be cut several times.
    const SAMPLES: &str = "20";
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let prompts = example("geneval_metadata.jsonl");
    let whole = tmp.path().join("whole");
    let t = std::time::Instant::now();
    ok(&eval(
        cache,
        "geneval",
        &prompts,
        &whole,
        &["--samples", SAMPLES],
        &[],
    ));
    // Kill points between 5% and 30% of an uninterrupted run's time: the first two runs are cut on
    // any machine speed, later ones maybe.
    let whole_ms = t.elapsed().as_millis() as u64;
    let out = tmp.path().join("killed");
    // Pseudo-random points from a fixed seed.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut kills = 0;
    for round in 0..8 {
        let mut args = vec![
            "--eval",
            "geneval",
            "--prompts",
            &prompts,
            "--out",
            out.to_str().unwrap(),
            "--samples",
            SAMPLES,
        ];
        args.extend(SMALL);
        let mut child = openuni(cache, &args, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let delay = whole_ms / 20 + state % (whole_ms / 4).max(1);
        std::thread::sleep(std::time::Duration::from_millis(delay));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let sig = if round % 2 == 0 {
            libc::SIGKILL
        } else {
            libc::SIGINT
        };
        // SAFETY: signals our own child process, by its id.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().unwrap();
        kills += 1;
        // Whatever is at a target name now is complete.
        for (p, _) in files(&out) {
            if p.extension().is_some_and(|e| e == "png")
                && !p.file_name().unwrap().to_string_lossy().starts_with('.')
            {
                read_png(&out.join(&p))
                    .unwrap_or_else(|e| panic!("{}: corrupt after a kill: {e:#}", p.display()));
            }
        }
    }
    println!("interrupted {kills} times");
    assert!(kills >= 2, "the run was interrupted only {kills} times");
    ok(&eval(
        cache,
        "geneval",
        &prompts,
        &out,
        &["--samples", SAMPLES],
        &[],
    ));
    // Also no temporary file left (files() lists hidden ones too).
    assert_same(&whole, &out);
}

/// Emulated GPU: two devices make the files of one, bit for bit; a device that fails hands its
/// work to the other and the run completes; when every device fails, the run fails.
#[test]
fn emulated_devices_share_the_work_and_survive_a_failing_one() {
    if !openuni::exec::emulator_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path();
    let prompts = example("wise_prompts.json");
    let one = tmp.path().join("one");
    ok(&eval(
        cache,
        "wise",
        &prompts,
        &one,
        &["--device", "emu"],
        &[],
    ));
    let two = tmp.path().join("two");
    let err = ok(&eval(
        cache,
        "wise",
        &prompts,
        &two,
        &["--device", "emu:all", "--batch", "1", "--verbose"],
        &[("OPENUNI_EMU_DEVICES", "2")],
    ));
    assert!(err.contains("2 device(s): emu, emu:1"), "{err}");
    assert_same(&one, &two);

    let failing = tmp.path().join("failing");
    let err = ok(&eval(
        cache,
        "wise",
        &prompts,
        &failing,
        &["--device", "emu:0,1"],
        &[
            ("OPENUNI_EMU_DEVICES", "2"),
            ("OPENUNI_EMU_FAIL_DEVICE", "1"),
        ],
    ));
    assert!(
        err.contains("emu:1: failed, its unfinished work goes back to the queue"),
        "{err}"
    );
    assert!(err.contains("injected failure"), "{err}");
    assert!(err.contains("1 device failure(s)"), "{err}");
    assert_same(&one, &failing);

    let o = eval(
        cache,
        "wise",
        &prompts,
        &tmp.path().join("x"),
        &["--device", "emu:0,3"],
        &[("OPENUNI_EMU_DEVICES", "2")],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && err.contains("there is no emu:3 (2 emu device(s): 0..2)"),
        "{err}"
    );

    let none = tmp.path().join("none");
    let o = eval(
        cache,
        "wise",
        &prompts,
        &none,
        &["--device", "emu:all"],
        &[
            ("OPENUNI_EMU_DEVICES", "1"),
            ("OPENUNI_EMU_FAIL_DEVICE", "0"),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("3 image(s) not made: no device could make them (emu: "),
        "{err}"
    );
}
