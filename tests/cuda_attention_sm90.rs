//! kernels/attention_sm90.cu (FA3-style attention on wgmma + TMA, issue 16 item 2) against the CPU
//! twin (openuni_cpu::ops::attention), launched directly, and the selection rule. Tolerance: the
//! bf16 rule of tests/cuda_attention.rs (relative L2 <= 2x that of a plain bf16 run).
//!
//! Cases: causal and not, GQA (2/1, 4/2), key-padding masks (one sample with every key padded),
//! n != m both ways, lengths not multiples of the 64-key tile or the 128-row query block (5, 33,
//! 70, 77, 100, 130), head dims 32 and 72 (zero-filled up to the 64 / 128 capacities), 64 and 128.
//! (tests/cuda_attention.rs's graph cases also run this kernel wherever it qualifies on an sm_90a
//! device.) Without a CUDA device: `skipped: no CUDA device`; not sm_90a: `skipped: not an sm_90a device`.

use std::sync::Arc;

use openuni_cpu::ops::{self as cpu, AttentionDims};
use openuni_cuda::families::attention::AttentionArgs;
use openuni_cuda::families::{attention_sm90, conv_sm90};
use openuni_cuda::testing::{check, device_or_skip, round_to, Rng};
use openuni_cuda::{CudaDevice, DeviceBuffer};
use openuni_tensor::DType;

const BF: DType = DType::BF16;

fn sm90_device() -> Option<Arc<CudaDevice>> {
    let dev = device_or_skip()?;
    if !conv_sm90::device_supports(&dev) {
        println!("skipped: not an sm_90a device ({:?})", dev.compute_capability());
        return None;
    }
    Some(dev)
}

fn upload(dev: &CudaDevice, v: &[f32]) -> (DeviceBuffer, u64) {
    let h: Vec<u16> = v.iter().map(|&f| half::bf16::from_f32(f).to_bits()).collect();
    let buf = dev.alloc(h.len().max(1) * 2).unwrap();
    dev.copy_to_device(&h, buf.ptr()).unwrap();
    let p = buf.ptr();
    (buf, p)
}

#[test]
fn attention_sm90_matches_cpu() {
    let Some(dev) = sm90_device() else { return };
    let mut rng = Rng::new(41);
    // (batch, n, m, heads, kv_heads, hd, causal, mask)
    let cases: &[(usize, usize, usize, usize, usize, usize, bool, bool)] = &[
        (1, 70, 70, 2, 1, 64, true, false),
        (2, 33, 100, 2, 2, 128, false, true),
        (1, 130, 130, 1, 1, 72, true, false),
        (2, 5, 77, 4, 2, 32, false, true),
        (1, 100, 33, 1, 1, 128, false, false),
    ];
    for &(b, n, m, heads, kv_heads, hd, causal, with_mask) in cases {
        let scale = 1.0 / (hd as f32).sqrt();
        let q = rng.normals(b * n * heads * hd, 0.0, 1.0);
        let k = rng.normals(b * m * kv_heads * hd, 0.0, 1.0);
        let v = rng.normals(b * m * kv_heads * hd, 0.0, 1.0);
        // Sample 0 pads its last third, sample 1 (when present) every key.
        let mask: Vec<f32> = (0..b * m).map(|i| if i / m == 0 { f32::from(i % m < m - m / 3) } else { 0.0 }).collect();
        let d = AttentionDims { batch: b, q_len: n, kv_len: m, heads, kv_heads, head_dim: hd, causal, scale };
        let twin = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut o = vec![0.0; b * n * heads * hd];
            cpu::attention(q, k, v, with_mask.then_some(&mask[..]), d, &mut o);
            o
        };
        let want = twin(&q, &k, &v);
        let base = twin(&round_to(BF, &q), &round_to(BF, &k), &round_to(BF, &v));
        let (_qb, qp) = upload(&dev, &q);
        let (_kb, kp) = upload(&dev, &k);
        let (_vb, vp) = upload(&dev, &v);
        let (_mb, mp) = upload(&dev, &mask);
        let (_ob, op) = upload(&dev, &vec![f32::NAN; b * n * heads * hd]);
        let a = AttentionArgs {
            dtype: BF,
            q: qp,
            k: kp,
            v: vp,
            mask: if with_mask { mp } else { 0 },
            segments: 0,
            rope_cs: 0,
            out: op,
            batch: b,
            n,
            m,
            heads,
            kv_heads,
            head_dim: hd,
            causal,
            scale,
        };
        assert!(attention_sm90::qualifies(&a));
        let ls = attention_sm90::launch(&a).unwrap();
        // SAFETY: every buffer holds the shapes launched.
        for l in &ls {
            unsafe { l.enqueue(&dev).unwrap() };
        }
        let mut got = vec![0u16; b * n * heads * hd];
        dev.copy_to_host(op, &mut got).unwrap();
        let got: Vec<f32> = got.into_iter().map(|x| half::bf16::from_bits(x).to_f32()).collect();
        check(
            &format!("{} [{b}, {n} x {m}, {heads}/{kv_heads} heads, hd {hd}] causal={causal} mask={with_mask}", ls[0].kernel),
            BF,
            &got,
            &want,
            &base,
        );
    }
}

#[test]
fn attention_sm90_selection_rule() {
    let a = AttentionArgs {
        dtype: BF,
        q: 0x1000,
        k: 0x2000,
        v: 0x3000,
        mask: 0,
        segments: 0,
        rope_cs: 0,
        out: 0x4000,
        batch: 1,
        n: 8,
        m: 8,
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        causal: false,
        scale: 0.125,
    };
    assert!(attention_sm90::qualifies(&a));
    for hd in [8, 72, 112, 128] {
        assert!(attention_sm90::qualifies(&AttentionArgs { head_dim: hd, ..a }), "hd {hd}");
    }
    for hd in [4, 100, 136, 256] {
        assert!(!attention_sm90::qualifies(&AttentionArgs { head_dim: hd, ..a }), "hd {hd}");
    }
    assert!(!attention_sm90::qualifies(&AttentionArgs { segments: 0x5000, ..a }));
    assert!(!attention_sm90::qualifies(&AttentionArgs { rope_cs: 0x5000, ..a }));
    assert!(!attention_sm90::qualifies(&AttentionArgs { dtype: DType::F32, ..a }));
    assert!(!attention_sm90::qualifies(&AttentionArgs { q: 0x1002, ..a }));
}
