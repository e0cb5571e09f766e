//! The `.pth` reader against files written by `torch.save` (tools/make_references.py, case `pth`),
//! hostile pickles, hand-built pickles for the paths torch.save does not exercise in the fixtures,
//! and corrupted input.

use std::collections::BTreeMap;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use openuni_tensor::{
    read_pth, read_pth_bytes, read_pth_with, DType, HostData, HostTensor, MemoryBudget, PthError,
    PthOptions, Weights, MAX_OVERLAPPING_VIEW_ELEMENTS,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/pth")
        .join(name)
}

fn expected(name: &str) -> BTreeMap<String, HostTensor> {
    let w = Weights::open(fixture(name)).unwrap();
    w.keys()
        .map(|k| (k.to_string(), w.get(k).unwrap()))
        .collect()
}

#[test]
fn flat_f32_matches_torch() {
    let got = read_pth(&fixture("openuni_flat_f32.pth")).unwrap();
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    // the file's (OrderedDict) order
    assert_eq!(
        names,
        [
            "meta_queries",
            "connector.layers.0.self_attn.q_proj.weight",
            "connector.layers.0.self_attn.k_proj.weight",
            "connector.layers.0.self_attn.v_proj.weight",
            "connector.layers.0.layer_norm1.weight",
            "connector.layers.0.mlp.fc1.weight",
            "projector.weight",
            "projector.bias",
        ]
    );
    let exp = expected("openuni_flat_f32.expected.safetensors");
    assert_eq!(exp.len(), got.len());
    for (name, t) in &got {
        let e = &exp[name];
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert_eq!(t.shape, e.shape, "{name}");
        // bit-exact
        assert_eq!(t.data.as_bytes(), e.data.as_bytes(), "{name}");
    }
}

#[test]
fn state_dict_bf16_matches_torch() {
    let path = fixture("openuni_state_dict_bf16.pth");
    let exp = expected("openuni_state_dict_bf16.expected.safetensors");

    // default: `module.` stripped, dtype kept
    let ck = read_pth_with(&path, &PthOptions::default()).unwrap();
    assert_eq!(ck.wrapper, ["state_dict"]);
    assert_eq!(ck.stripped_prefix.as_deref(), Some("module."));
    assert!(ck.ignored.is_empty(), "{:?}", ck.ignored);
    assert_eq!(ck.tensors.len(), exp.len());
    for (name, t) in &ck.tensors {
        let e = &exp[&format!("module.{name}")];
        assert_eq!(t.dtype(), DType::BF16, "{name}");
        assert_eq!(t.shape, e.shape, "{name}");
        // the expected file holds the bf16 values widened to f32: widening is exact
        assert_eq!(t.to_f32_vec(), e.to_f32_vec(), "{name}");
    }
    assert_eq!(ck.tensors[0].0, "meta_queries");

    // names exactly as saved when stripping is off
    let raw = read_pth_with(
        &path,
        &PthOptions {
            strip_module_prefix: false,
        },
    )
    .unwrap();
    let names: Vec<&String> = raw.tensors.iter().map(|(n, _)| n).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, exp.keys().collect::<Vec<_>>());
    assert_eq!(raw.stripped_prefix, None);
}

fn assert_forbidden(file: &str, global: &str) {
    let path = fixture(file);
    let marker = Path::new("/tmp/openuni_hostile_pth_executed");
    let _ = std::fs::remove_file(marker);
    let err = read_pth(&path).unwrap_err();
    match &err {
        PthError::ForbiddenGlobal {
            global: g,
            entry,
            path: p,
            ..
        } => {
            assert_eq!(g, global);
            assert!(entry.ends_with("/data.pkl"), "{entry}");
            assert_eq!(p, &path);
        }
        other => panic!("expected ForbiddenGlobal, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(global) && msg.contains(file) && msg.contains("refusing"),
        "{msg}"
    );
    assert!(!marker.exists(), "the hostile pickle ran");
}

#[test]
fn hostile_os_system_is_refused() {
    assert_forbidden("hostile.pth", "os.system");
}

#[test]
fn hostile_builtins_eval_is_refused() {
    assert_forbidden("hostile_eval.pth", "builtins.eval");
}

#[test]
fn garbage_empty_missing_and_truncated_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pth");
    std::fs::write(
        &garbage,
        b"this is not a checkpoint at all, just some text\n".repeat(20),
    )
    .unwrap();
    let msg = read_pth(&garbage).unwrap_err().to_string();
    assert!(
        msg.contains("garbage.pth") && msg.contains("not a torch.save zip archive"),
        "{msg}"
    );

    let msg = read_pth(&fixture("openuni_flat_f32.expected.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("looks like a safetensors file"), "{msg}");

    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    let msg = read_pth(&empty).unwrap_err().to_string();
    assert!(msg.contains("empty.pth") && msg.contains("empty"), "{msg}");

    let missing = dir.path().join("missing.pth");
    assert!(matches!(read_pth(&missing), Err(PthError::Io { .. })));

    let legacy = dir.path().join("legacy.pth");
    std::fs::write(
        &legacy,
        b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.",
    )
    .unwrap();
    let msg = read_pth(&legacy).unwrap_err().to_string();
    assert!(msg.contains("legacy"), "{msg}");

    // every truncation of a valid file is an error, never a panic
    let full = std::fs::read(fixture("openuni_flat_f32.pth")).unwrap();
    for len in (0..full.len()).step_by(37) {
        let r = std::panic::catch_unwind(|| {
            read_pth_bytes(Path::new("t.pth"), &full[..len], &PthOptions::default())
        });
        assert!(
            r.expect("panicked").is_err(),
            "truncated to {len} bytes but read fine"
        );
    }
    // a truncated pickle inside a well-formed archive names the entry and the cause
    let pkl = data_pkl(&full);
    let bad = make_archive("cut", &pkl[..pkl.len() / 2], &[]);
    let msg = read_pth_bytes(Path::new("cut.pth"), &bad, &PthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("cut.pth") && msg.contains("cut/data.pkl") && msg.contains("truncated"),
        "{msg}"
    );
}

// ------------------------------------------------------------------------------------------------
// hand-built archives
// ------------------------------------------------------------------------------------------------

/// The `data.pkl` bytes of a torch.save archive.
fn data_pkl(archive: &[u8]) -> Vec<u8> {
    let mut z = zip::ZipArchive::new(Cursor::new(archive)).unwrap();
    let name = z
        .file_names()
        .map(|n| n.unwrap().to_string())
        .find(|n| n.ends_with("/data.pkl"))
        .unwrap();
    let mut f = z.by_name(&name).unwrap();
    let mut v = vec![];
    std::io::Read::read_to_end(&mut f, &mut v).unwrap();
    v
}

/// A torch.save-like archive (stored entries) with the given pickle and storages.
fn make_archive(top: &str, pkl: &[u8], storages: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    w.start_file(format!("{top}/data.pkl"), opts).unwrap();
    w.write_all(pkl).unwrap();
    w.start_file(format!("{top}/byteorder"), opts).unwrap();
    w.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        w.start_file(format!("{top}/data/{key}"), opts).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.start_file(format!("{top}/version"), opts).unwrap();
    w.write_all(b"3\n").unwrap();
    w.finish().unwrap().into_inner()
}

/// A tiny pickle writer (protocol 2 opcodes, plus protocol 4 ones where asked).
#[derive(Default)]
struct P(Vec<u8>);

impl P {
    fn op(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn s(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn short_s(&mut self, s: &str) -> &mut Self {
        self.0.push(0x8c);
        self.0.push(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: i64) -> &mut Self {
        if (0..256).contains(&v) {
            self.op(&[b'K', v as u8])
        } else {
            self.0.push(b'J');
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
            self
        }
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn tuple_ints(&mut self, v: &[i64]) -> &mut Self {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2(('storage', Storage, key, 'cpu', numel), offset, size, stride, False, OrderedDict())`
    fn tensor(
        &mut self,
        storage: &str,
        key: &str,
        numel: i64,
        offset: i64,
        size: &[i64],
        stride: &[i64],
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .s("storage")
            .global("torch", storage)
            .s(key)
            .s("cpu");
        self.int(numel)
            .op(b"tQ")
            .int(offset)
            .tuple_ints(size)
            .tuple_ints(stride);
        self.op(b"\x89")
            .global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn parameters_doubles_ints_bools_scalars_and_wrappers() {
    // {'model': {'module.w': Parameter(f64 [2,3] transposed view of a [3,2] storage), 'module.n': i64 scalar,
    //  'module.mask': bool [3], 'module.e': empty f32 [0, 4], 'module.x': i32 [2,2] with stride (0,1)},
    //  'epoch': 3, 'cfg': 'x'}
    let mut p = P::default();
    p.op(b"\x80\x02}q\x00(").s("model").op(b"}q\x01(");
    p.s("module.w").global("torch._utils", "_rebuild_parameter");
    p.op(b"(")
        .tensor("DoubleStorage", "0", 6, 0, &[2, 3], &[1, 2])
        .op(b"\x88")
        .global("collections", "OrderedDict")
        .op(b")Rtq\x02R");
    p.s("module.n").tensor("LongStorage", "1", 2, 1, &[], &[]);
    p.s("module.mask")
        .tensor("BoolStorage", "2", 3, 0, &[3], &[1]);
    p.s("module.e")
        .tensor("FloatStorage", "3", 0, 0, &[0, 4], &[4, 1]);
    p.s("module.x")
        .tensor("IntStorage", "4", 3, 1, &[2, 2], &[0, 1]);
    p.op(b"u").s("epoch").int(3).s("cfg").s("x").op(b"u.");
    let storages = vec![
        ("0", f64_bytes(&[1.0, 2.0, 3.0, 4.0, 5.5, -6.25])),
        (
            "1",
            [7i64, -9].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        ("2", vec![1, 0, 1]),
        ("3", vec![]),
        (
            "4",
            [10i32, 20, 30]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
    ];
    let bytes = make_archive("archive", &p.0, &storages);
    let ck = read_pth_bytes(Path::new("synthetic.pth"), &bytes, &PthOptions::default()).unwrap();
    assert_eq!(ck.wrapper, ["model"]);
    assert_eq!(ck.stripped_prefix.as_deref(), Some("module."));
    let t: BTreeMap<_, _> = ck.tensors.into_iter().collect();
    // storage [[1,2],[3,4],[5.5,-6.25]] read with strides (1,2): rows of the transpose
    assert_eq!(
        t["w"].data,
        HostData::F32(vec![1.0, 3.0, 5.5, 2.0, 4.0, -6.25])
    );
    assert_eq!(t["w"].shape.dims(), [2, 3]);
    assert_eq!(t["n"].data, HostData::I64(vec![-9]));
    assert_eq!(t["n"].shape.rank(), 0);
    assert_eq!(t["mask"].data, HostData::U8(vec![1, 0, 1]));
    assert_eq!(t["e"].shape.dims(), [0, 4]);
    assert_eq!(t["e"].dtype(), DType::F32);
    assert_eq!(t["x"].data, HostData::I32(vec![20, 30, 20, 30]));
}

#[test]
fn protocol4_frames_and_memoize() {
    // protocol 4 with FRAME, MEMOIZE, SHORT_BINUNICODE, STACK_GLOBAL and LONG1 (as torch.save(pickle_protocol=4)).
    let mut p = P::default();
    p.op(b"\x80\x04\x95").op(&0u64.to_le_bytes()).op(b"}\x94");
    p.short_s("a").op(b"\x94");
    p.short_s("torch._utils")
        .short_s("_rebuild_tensor_v2")
        .op(b"\x93\x94");
    p.op(b"((")
        .short_s("storage")
        .short_s("torch")
        .short_s("HalfStorage")
        .op(b"\x93")
        .short_s("0")
        .short_s("cpu");
    p.op(b"\x8a\x01\x02tQ")
        .int(0)
        .op(b"\x8a\x01\x02\x85K\x01\x85\x89")
        .global("collections", "OrderedDict")
        .op(b")Rt\x94R");
    p.op(b"\x94s.");
    let half = [0x3c00u16, 0xc000]; // 1.0, -2.0
    let bytes = make_archive(
        "p4",
        &p.0,
        &[("0", half.iter().flat_map(|x| x.to_le_bytes()).collect())],
    );
    let got = read_pth_bytes(Path::new("p4.pth"), &bytes, &PthOptions::default())
        .unwrap()
        .tensors;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "a");
    assert_eq!(got[0].1.to_f32_vec(), [1.0, -2.0]);
    assert_eq!(got[0].1.dtype(), DType::F16);
}

#[test]
fn structural_errors_name_the_problem() {
    type Case = (Vec<u8>, Vec<(&'static str, Vec<u8>)>, &'static str);
    let cases: Vec<Case> = vec![
        // view past the end of its storage
        (
            {
                let mut p = P::default();
                p.op(b"\x80\x02}")
                    .s("w")
                    .tensor("FloatStorage", "0", 4, 2, &[3], &[1])
                    .op(b"s.");
                p.0
            },
            vec![("0", vec![0; 16])],
            "past the storage",
        ),
        // storage entry shorter than numel says
        (
            {
                let mut p = P::default();
                p.op(b"\x80\x02}")
                    .s("w")
                    .tensor("FloatStorage", "0", 4, 0, &[4], &[1])
                    .op(b"s.");
                p.0
            },
            vec![("0", vec![0; 12])],
            "needs 16 bytes",
        ),
        // missing storage
        (
            {
                let mut p = P::default();
                p.op(b"\x80\x02}")
                    .s("w")
                    .tensor("FloatStorage", "7", 1, 0, &[1], &[1])
                    .op(b"s.");
                p.0
            },
            vec![],
            "missing from the archive",
        ),
        // a list at the top
        (
            b"\x80\x02]q\x00.".to_vec(),
            vec![],
            "expected a dict of tensors",
        ),
        // a dict without tensors
        (
            {
                let mut p = P::default();
                p.op(b"\x80\x02}").s("epoch").int(3).op(b"s.");
                p.0
            },
            vec![],
            "no tensors found",
        ),
        // an opcode torch.save never writes
        (b"\x80\x02}\x81.".to_vec(), vec![], "NEWOBJ"),
        // a storage type outside the allow-list is a forbidden global
        (
            {
                let mut p = P::default();
                p.op(b"\x80\x02}")
                    .s("w")
                    .tensor("ComplexFloatStorage", "0", 1, 0, &[1], &[1])
                    .op(b"s.");
                p.0
            },
            vec![("0", vec![0; 8])],
            "torch.ComplexFloatStorage",
        ),
        // calling a storage type
        (
            {
                let mut p = P::default();
                p.op(b"\x80\x02}")
                    .s("w")
                    .global("torch", "FloatStorage")
                    .op(b")Rs.");
                p.0
            },
            vec![],
            "only allowed as a type tag",
        ),
        // memo read before write
        (b"\x80\x02h\x05.".to_vec(), vec![], "memo entry 5"),
    ];
    for (i, (pkl, storages, want)) in cases.into_iter().enumerate() {
        let bytes = make_archive("bad", &pkl, &storages);
        let err = read_pth_bytes(Path::new("bad.pth"), &bytes, &PthOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(want) && msg.contains("bad.pth"),
            "case {i}: {msg}"
        );
    }
}

/// xorshift64*: deterministic without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutated_pickles_never_panic() {
    let full = std::fs::read(fixture("openuni_flat_f32.pth")).unwrap();
    let pkl = data_pkl(&full);
    let storages: Vec<(String, Vec<u8>)> = (0..7)
        .map(|i| {
            let mut z = zip::ZipArchive::new(Cursor::new(&full[..])).unwrap();
            let mut f = z.by_name(&format!("openuni_flat_f32/data/{i}")).unwrap();
            let mut v = vec![];
            std::io::Read::read_to_end(&mut f, &mut v).unwrap();
            (i.to_string(), v)
        })
        .collect();
    let storages: Vec<(&str, Vec<u8>)> = storages
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    // the unmutated rebuild reads fine
    let ok = make_archive("m", &pkl, &storages);
    assert_eq!(
        read_pth_bytes(Path::new("m.pth"), &ok, &PthOptions::default())
            .unwrap()
            .tensors
            .len(),
        8
    );

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut oks, mut errs) = (0, 0);
    for round in 0..400 {
        let mut m = pkl.clone();
        for _ in 0..1 + rng.below(4) {
            match rng.below(5) {
                0 | 1 => {
                    let i = rng.below(m.len());
                    m[i] = rng.next() as u8;
                }
                2 => {
                    let i = rng.below(m.len());
                    m[i] ^= 1 << rng.below(8);
                }
                3 if m.len() > 2 => {
                    let i = rng.below(m.len());
                    m.remove(i);
                }
                _ => {
                    let i = rng.below(m.len() + 1);
                    m.insert(i, rng.next() as u8);
                }
            }
        }
        let bytes = make_archive("m", &m, &storages);
        let r = std::panic::catch_unwind(|| {
            read_pth_bytes(Path::new("m.pth"), &bytes, &PthOptions::default())
        });
        match r {
            Ok(Ok(_)) => oks += 1,
            Ok(Err(_)) => errs += 1,
            Err(_) => panic!("round {round}: the reader panicked on a mutated pickle"),
        }
    }
    assert!(errs > 100, "{oks} ok, {errs} errors");

    // random bytes, and random changes anywhere in the archive (zip structure included)
    for round in 0..300 {
        let bytes: Vec<u8> = if round % 3 == 0 {
            (0..rng.below(2000)).map(|_| rng.next() as u8).collect()
        } else {
            let mut b = full.clone();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            b
        };
        let r = std::panic::catch_unwind(|| {
            read_pth_bytes(Path::new("r.pth"), &bytes, &PthOptions::default())
        });
        assert!(
            r.is_ok(),
            "round {round}: the reader panicked on a corrupted archive"
        );
    }
}

#[test]
fn amplifying_views_are_refused_and_memory_is_budgeted() {
    // A stride-0 view of a one-element storage asking for 16M elements (64 MiB from 4 bytes).
    let mut p = P::default();
    p.op(b"\x80\x02}")
        .s("big")
        .tensor("FloatStorage", "0", 1, 0, &[4096, 4096], &[0, 0])
        .op(b"s.");
    let bytes = make_archive("amp", &p.0, &[("0", vec![0; 4])]);
    let msg = read_pth_bytes(Path::new("amp.pth"), &bytes, &PthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("amp.pth") && msg.contains("`big`") && msg.contains("would amplify"),
        "{msg}"
    );

    // A small expanded view (as `expand` can leave in a state dict) is still read.
    let mut p = P::default();
    p.op(b"\x80\x02}")
        .s("bias")
        .tensor("FloatStorage", "0", 1, 0, &[3, 4], &[0, 0])
        .op(b"s.");
    let bytes = make_archive("small", &p.0, &[("0", 2.5f32.to_le_bytes().to_vec())]);
    let t = read_pth_bytes(Path::new("small.pth"), &bytes, &PthOptions::default())
        .unwrap()
        .tensors;
    assert_eq!(t[0].1.to_f32_vec(), vec![2.5; 12]);

    // Many views of one storage: each alone is allowed, together they exceed twice the file plus
    // 256 MiB; the error names the tensor where the budget ran out, before allocating it.
    let n = MAX_OVERLAPPING_VIEW_ELEMENTS as i64;
    let views = |storage: &str, count: usize| {
        let mut p = P::default();
        p.op(b"\x80\x02}(");
        for i in 0..count {
            p.s(&format!("t{i}"))
                .tensor(storage, "0", 1, 0, &[n / 1024, 1024], &[0, 0]);
        }
        p.op(b"u.");
        p.0
    };
    let bytes = make_archive("many", &views("FloatStorage", 300), &[("0", vec![0; 4])]);
    let budget = MemoryBudget::for_archive(bytes.len() as u64);
    assert!(budget.bytes <= (bytes.len() as u64) * 2 + MemoryBudget::SLACK_BYTES);
    let msg = read_pth_bytes(Path::new("many.pth"), &bytes, &PthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("many.pth") && msg.contains("tensor `t") && msg.contains("bytes allowed"),
        "{msg}"
    );
    // 40 one-byte views (40 MiB) fit.
    let bytes = make_archive("bytes", &views("ByteStorage", 40), &[("0", vec![7])]);
    assert_eq!(
        read_pth_bytes(Path::new("bytes.pth"), &bytes, &PthOptions::default())
            .unwrap()
            .tensors
            .len(),
        40
    );
}

#[test]
fn tensor_named_metadata_is_refused() {
    let mut p = P::default();
    p.op(b"\x80\x02}")
        .s("__metadata__")
        .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
        .op(b"s.");
    let bytes = make_archive("meta", &p.0, &[("0", vec![0; 4])]);
    let msg = read_pth_bytes(Path::new("meta.pth"), &bytes, &PthOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("meta.pth") && msg.contains("`__metadata__`") && msg.contains("reserved"),
        "{msg}"
    );
    // The writer refuses the name too, whatever the source.
    let dir = tempfile::tempdir().unwrap();
    let t = HostTensor::from_f32([1], vec![1.0]).unwrap();
    let err = openuni_tensor::write_safetensors(
        &dir.path().join("x.safetensors"),
        [("__metadata__", &t)],
        None,
    )
    .unwrap_err();
    assert!(err.to_string().contains("__metadata__"), "{err}");
}
