//! The per-shape cuBLASLt algorithm choice (crate::gemm, crate::gemm_cache) through a real
//! `LinearGemm` on the device (emulated or real): a corrupt cache file is rebuilt with a warning,
//! the first use of a shape tries the heuristic's candidates (a miss, written to the file), a second
//! use reads the choice (a hit), another shape is a miss again. On the emulated GPU the choice is the
//! first candidate (timing means nothing there); its heuristic returns 3 candidates.
//! One test in this binary: it sets OPENUNI_GEMM_CACHE before the device's cuBLASLt handle exists.

use openuni_cuda::gemm::{Epilogue, LinearArgs, LinearGemm, ALGO_CANDIDATES};
use openuni_cuda::gemm_cache;
use openuni_cuda::testing::device_or_skip;
use openuni_tensor::DType;

#[test]
fn choices_are_made_once_per_shape_and_kept_on_disk() {
    let dir = std::env::temp_dir().join(format!("openuni-gemm-choice-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gemm-algos.tsv");
    std::fs::write(&path, "not a cache file\n").unwrap(); // corrupt: a warning, then rebuilt
    std::env::set_var("OPENUNI_GEMM_CACHE", &path);
    let Some(dev) = device_or_skip() else { return };
    let blas = dev.blas().unwrap();
    assert_eq!(blas.choice_cache(), Some(path.as_path()));
    let (rows, k, n) = (24usize, 40usize, 16usize);
    let x = dev.alloc(rows * k * 2).unwrap();
    let w = dev.alloc(n * k * 2).unwrap();
    let b = dev.alloc(n * 2).unwrap();
    let y = dev.alloc(rows * n * 2).unwrap();
    for buf in [&x, &w, &b] {
        dev.fill_bytes(buf.ptr(), 0, buf.bytes()).unwrap();
    }
    let args = |rows: usize, epilogue: Epilogue| LinearArgs {
        dtype: DType::BF16,
        rows,
        in_features: k,
        out_features: n,
        epilogue,
        x: x.ptr(),
        w: w.ptr(),
        bias: matches!(epilogue, Epilogue::BiasGelu).then_some(b.ptr()),
        y: y.ptr(),
    };
    let first = LinearGemm::new(&dev, &blas, &args(rows, Epilogue::BiasGelu))
        .unwrap()
        .algo_choice();
    println!("first use: {first:?}");
    assert!(!first.cached, "the first use of a shape is a miss");
    assert!(first.candidates >= 1 && first.candidates <= ALGO_CANDIDATES);
    if dev.is_emulated() {
        assert_eq!(
            (first.index, first.candidates),
            (0, 3),
            "the emulator's choice is its first of 3 candidates"
        );
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let on_disk = gemm_cache::parse(&text)
        .unwrap_or_else(|e| panic!("the rebuilt cache does not parse: {e}\n{text}"));
    assert_eq!(on_disk.len(), 1, "{text}");
    let key = on_disk.keys().next().unwrap();
    assert!(
        key.contains(dev.name())
            && key.contains("m16 n24 k40")
            && key.contains("BiasGelu")
            && key.contains("cublasLt"),
        "{key}"
    );

    let again = LinearGemm::new(&dev, &blas, &args(rows, Epilogue::BiasGelu))
        .unwrap()
        .algo_choice();
    assert!(
        again.cached && again.index == first.index,
        "the second use reads the choice: {again:?}"
    );
    let other = LinearGemm::new(&dev, &blas, &args(rows / 2, Epilogue::None))
        .unwrap()
        .algo_choice();
    assert!(
        !other.cached,
        "another shape and epilogue is a miss: {other:?}"
    );
    assert_eq!(
        gemm_cache::parse(&std::fs::read_to_string(&path).unwrap())
            .unwrap()
            .len(),
        2
    );
    println!("cache {}: 2 choices, hit on reuse", path.display());
    let _ = std::fs::remove_dir_all(&dir);
}
