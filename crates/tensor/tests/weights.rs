//! Loading: single files, sharded index folders, dtype conversion, and errors that name the file,
//! the key, expected and found.

use std::collections::HashMap;

use openuni_tensor::{
    bf16, write_safetensors, DType, Error, HostData, HostTensor, Shape, TensorSource, Weights,
};

fn t(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor::from_f32(shape, v).unwrap()
}

#[test]
fn sharded_index_with_mixed_dtypes_loads_as_f32() {
    let dir = tempfile::tempdir().unwrap();
    let a = t(&[2, 2], vec![1.0, -2.0, 3.5, 0.25]);
    let b = a.to_dtype(DType::BF16).unwrap();
    write_safetensors(
        &dir.path().join("m-00001-of-00002.safetensors"),
        [("a.weight", &a)],
        None,
    )
    .unwrap();
    write_safetensors(
        &dir.path().join("m-00002-of-00002.safetensors"),
        [("b.weight", &b)],
        None,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("m.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"a.weight": "m-00001-of-00002.safetensors", "b.weight": "m-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let w = Weights::open(dir.path()).unwrap();
    assert_eq!(w.len(), 2);
    assert_eq!(w.dtype("b.weight").unwrap(), DType::BF16);
    let got = w.tensor_f32("b.weight", &Shape::new([2, 2])).unwrap();
    assert_eq!(got, a); // these values are exact in bf16
}

#[test]
fn errors_name_file_key_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("model.safetensors");
    let ids = HostTensor::new([3], HostData::I64(vec![1, 2, 3])).unwrap();
    write_safetensors(&f, [("w", &t(&[2, 3], vec![0.0; 6])), ("ids", &ids)], None).unwrap();
    let w = Weights::open(&f).unwrap();

    let e = w.get_f32("w", Some(&Shape::new([3, 2]))).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("`w`")
            && msg.contains("[3, 2]")
            && msg.contains("[2, 3]"),
        "{msg}"
    );

    let msg = w.get_f32("missing.weight", None).unwrap_err().to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("missing.weight"),
        "{msg}"
    );

    let msg = w.get_f32("ids", None).unwrap_err().to_string();
    assert!(msg.contains("`ids`") && msg.contains("I64"), "{msg}");
    assert_eq!(w.get("ids").unwrap().to_i64_vec(), vec![1, 2, 3]);

    let msg = Weights::open(dir.path().join("nope.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("nope.safetensors"), "{msg}");

    std::fs::write(
        dir.path().join("junk.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let msg = Weights::open(dir.path().join("junk.safetensors"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("junk.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
}

#[test]
fn index_naming_a_key_its_shard_lacks_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_safetensors(
        &dir.path().join("s1.safetensors"),
        [("a", &t(&[1], vec![1.0]))],
        None,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("x.safetensors.index.json"),
        r#"{"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}"#,
    )
    .unwrap();
    let msg = Weights::open(dir.path()).err().unwrap().to_string();
    assert!(
        msg.contains("`b`") && msg.contains("s1.safetensors"),
        "{msg}"
    );
}

#[test]
fn conversions_round_to_nearest_even() {
    let x = t(&[3], vec![1.0, 1.00390625, 3.0e38]);
    let b = x.to_dtype(DType::BF16).unwrap();
    let HostData::BF16(v) = &b.data else { panic!() };
    // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0).
    assert_eq!(v[1], bf16::from_f32(1.0));
    assert!(HostTensor::new([2], HostData::F32(vec![1.0])).is_err());
    let m: HashMap<String, HostTensor> = HashMap::from([("k".into(), x)]);
    assert!(m.tensor_f32("k", &Shape::new([4])).is_err());
}

#[test]
fn overlay_prefers_the_checkpoint_and_falls_back_to_the_base() {
    use openuni_tensor::{Overlay, TensorMap};
    let base: HashMap<String, HostTensor> = HashMap::from([
        ("proj_out.weight".to_string(), t(&[2], vec![1.0, 2.0])),
        ("proj_out.bias".to_string(), t(&[1], vec![3.0])),
    ]);
    // A fine-tuned OpenUni checkpoint carries the transformer under `transformer.`.
    let ckpt = TensorMap {
        origin: "ckpt.pth".into(),
        tensors: HashMap::from([
            (
                "transformer.proj_out.weight".to_string(),
                t(&[2], vec![9.0, 8.0]),
            ),
            ("meta_queries".to_string(), t(&[1], vec![0.0])),
        ]),
    };
    let o = Overlay {
        top: &ckpt,
        prefix: "transformer.".into(),
        base: &base,
    };
    assert_eq!(
        o.tensor_f32("proj_out.weight", &Shape::new([2]))
            .unwrap()
            .to_f32_vec(),
        vec![9.0, 8.0]
    );
    assert_eq!(
        o.tensor_f32("proj_out.bias", &Shape::new([1]))
            .unwrap()
            .to_f32_vec(),
        vec![3.0]
    );
    let msg = o
        .tensor_f32("proj_out.weight", &Shape::new([3]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("ckpt.pth") && msg.contains("transformer.proj_out.weight"),
        "{msg}"
    );
    assert!(o.tensor_f32("missing", &Shape::new([1])).is_err());
}

#[test]
fn tensor_larger_than_available_memory_is_an_error() {
    // A sparse file (no disk used) holding one f16 tensor 1 GiB larger than MemAvailable: reading it
    // must be an error naming the tensor, not an allocation abort.
    let Some(avail) = openuni_tensor::mem_available() else {
        println!("skipped: no /proc/meminfo MemAvailable on this system");
        return;
    };
    let n = (avail + (1 << 30)) / 2 * 2;
    let header = format!(
        r#"{{"huge":{{"dtype":"F16","shape":[{}],"data_offsets":[0,{n}]}}}}"#,
        n / 2
    );
    let mut header = header.into_bytes();
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.safetensors");
    let mut f = std::fs::File::create(&p).unwrap();
    std::io::Write::write_all(&mut f, &(header.len() as u64).to_le_bytes()).unwrap();
    std::io::Write::write_all(&mut f, &header).unwrap();
    f.set_len(8 + header.len() as u64 + n).unwrap();
    drop(f);
    let w = Weights::open(&p).unwrap();
    let shape = Shape::new([(n / 2) as usize]);
    for err in [
        w.get("huge").unwrap_err(),
        w.get_f32("huge", None).unwrap_err(),
        w.weight_f32("huge", &shape).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(
            msg.contains("huge.safetensors")
                && msg.contains("`huge`")
                && msg.contains("MemAvailable"),
            "{msg}"
        );
    }
}

/// A safetensors file from a raw JSON header (padded to 8 bytes) and data bytes.
fn raw_safetensors(path: &std::path::Path, header: &str, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn f32_weights_are_used_in_place_and_others_converted_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("m.safetensors");
    let a = t(&[3, 2], vec![1.0, -2.0, 3.5, 0.25, 7.0, -0.5]);
    let b = a.to_dtype(DType::BF16).unwrap();
    let c = a.to_dtype(DType::F16).unwrap();
    write_safetensors(&f, [("a", &a), ("b", &b), ("c", &c)], None).unwrap();
    let w = Weights::open(&f).unwrap();
    let shape = Shape::new([3, 2]);
    let in_place = w.weight_f32("a", &shape).unwrap();
    assert!(
        in_place.is_mapped(),
        "an aligned f32 tensor is read from the mapping, not copied"
    );
    assert_eq!(&in_place[..], a.f32s().unwrap());
    for key in ["b", "c"] {
        let v = w.weight_f32(key, &shape).unwrap();
        assert!(!v.is_mapped());
        assert_eq!(
            &v[..],
            a.f32s().unwrap(),
            "{key}: these values are exact in bf16 and f16"
        );
    }
    // Size-1 dims are the same data (a 1×1 conv weight read as a linear weight).
    assert!(w
        .weight_f32("a", &Shape::new([3, 2, 1, 1]))
        .unwrap()
        .is_mapped());
    let msg = w
        .weight_f32("a", &Shape::new([2, 3]))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("m.safetensors")
            && msg.contains("`a`")
            && msg.contains("[2, 3]")
            && msg.contains("[3, 2]"),
        "{msg}"
    );
    // Through the trait and an Overlay (how the pipeline reads a fine-tuned transformer).
    let src: &dyn TensorSource = &w;
    assert!(src.weight_f32("a", &shape).unwrap().is_mapped());
    assert_eq!(
        src.stored_bytes("b", &shape).unwrap().unwrap().0,
        DType::BF16
    );
}

#[test]
fn unaligned_f32_data_is_copied_not_misread() {
    // A 1-byte tensor first puts the f32 tensor at an odd offset: it cannot be used in place.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("odd.safetensors");
    let vals = [1.5f32, -3.25];
    let mut data = vec![7u8];
    data.extend(vals.iter().flat_map(|v| v.to_le_bytes()));
    raw_safetensors(
        &f,
        r#"{"flag":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}"#,
        &data,
    );
    let w = Weights::open(&f).unwrap();
    let v = w.weight_f32("w", &Shape::new([2])).unwrap();
    assert!(!v.is_mapped());
    assert_eq!(&v[..], &vals);
}

#[test]
fn offsets_past_the_end_are_refused_at_open() {
    // A header declaring 10^15 bytes of data in a file of a few bytes: refused before any read
    // or allocation, naming the file.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("lying.safetensors");
    raw_safetensors(
        &f,
        r#"{"w":{"dtype":"F32","shape":[250000000000000],"data_offsets":[0,1000000000000000]}}"#,
        &[0u8; 16],
    );
    let msg = Weights::open(&f).err().expect("refused").to_string();
    assert!(msg.contains("lying.safetensors"), "{msg}");
}

/// This process's resident file-backed memory (RssFile), in bytes.
fn rss_file() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("RssFile:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[test]
fn released_pages_leave_resident_memory() {
    if rss_file().is_none() {
        println!("skipped: no /proc/self/status RssFile on this system");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("big.safetensors");
    let n = 8 << 20; // 32 MiB of f32
    let a = HostTensor::from_f32([n], (0..n).map(|i| i as f32).collect()).unwrap();
    write_safetensors(&f, [("w", &a)], None).unwrap();
    let w = Weights::open(&f).unwrap();
    let before = rss_file().unwrap();
    let v = w.weight_f32("w", &Shape::new([n])).unwrap();
    assert!(v.is_mapped());
    assert_eq!(
        v.iter().map(|&x| x as f64).sum::<f64>(),
        (n as f64 - 1.0) * n as f64 / 2.0
    );
    let touched = rss_file().unwrap();
    assert!(
        touched >= before + (24 << 20),
        "reading the in-place tensor maps its pages: RssFile {before} -> {touched}"
    );
    w.release_pages();
    let released = rss_file().unwrap();
    assert!(
        released + (24 << 20) <= touched,
        "release_pages drops them: RssFile {touched} -> {released}"
    );
    // Still readable: the pages map again from the page cache.
    assert_eq!(v[n - 1], (n - 1) as f32);
}
