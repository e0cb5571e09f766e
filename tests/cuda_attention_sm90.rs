//! kernels/attention_sm90.cu (FA3-style attention on wgmma + TMA, issue 16 item 2) against the CPU
//! twin (openuni_cpu::ops::attention), launched directly, and the selection rule. Tolerance: the
//! bf16 rule of tests/cuda_attention.rs (relative L2 <= 2x that of a plain bf16 run).
//!
//! Cases: causal and not, GQA (2/1, 4/2), key-padding masks (one sample with every key padded),
//! n != m both ways, lengths not multiples of the 64-key tile or the 128-row query block (5, 33,
//! 70, 77, 100, 130), head dims 32 and 72 (zero-filled up to the 64 / 128 capacities), 64 and 128.
//! Fused RoPE (the LLM prefill: the pre-pass `attention_rope_bf16`, then the wgmma kernel): causal
//! and not, GQA, head dims 64 and 128, lengths 70 and 130, packed segments (batch 1) whose
//! boundaries straddle the key tiles and query blocks, against the CPU twin
//! (`openuni_cpu::ops::attention_ext`), the pre-pass's rotated q and k bit for bit against the CPU's
//! `rope_at` on the bf16 inputs, and through the executor (the path an sm_90 device selects, and
//! attention.cu's under `OPENUNI_KERNELS=mma`).
//! (tests/cuda_attention.rs's graph cases also run this kernel wherever it qualifies on an sm_90a
//! device.) Without a CUDA device: `skipped: no CUDA device`; not sm_90a: `skipped: not an sm_90a device`.

use std::collections::HashMap;
use std::sync::Arc;

use openuni_cpu::ops::{self as cpu, AttentionDims};
use openuni_cuda::families::attention::{rope_table, segment_table, AttentionArgs};
use openuni_cuda::families::{attention_sm90, conv_sm90};
use openuni_cuda::testing::{check, device_or_skip, rel_l2, round_to, Rng};
use openuni_cuda::{CudaDevice, CudaExecutor, DeviceBuffer};
use openuni_graph::{AttentionParams, GraphBuilder};
use openuni_tensor::{DType, HostTensor};

const BF: DType = DType::BF16;

fn sm90_device() -> Option<Arc<CudaDevice>> {
    let dev = device_or_skip()?;
    if !conv_sm90::device_supports(&dev) {
        println!(
            "skipped: not an sm_90a device ({:?})",
            dev.compute_capability()
        );
        return None;
    }
    Some(dev)
}

fn upload(dev: &CudaDevice, v: &[f32]) -> (DeviceBuffer, u64) {
    let h: Vec<u16> = v
        .iter()
        .map(|&f| half::bf16::from_f32(f).to_bits())
        .collect();
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
        // The narrow capacities: SANA's cross-attention shapes (hd 72 -> 80, 112), in small: 300
        // keys (a partial last tile), a key mask; hd 80, 104 (-> 112) and 120 (-> 128) at the edges.
        (2, 64, 300, 2, 2, 72, false, true),
        (1, 64, 300, 2, 2, 112, false, false),
        (1, 130, 65, 1, 1, 80, false, false),
        (2, 40, 40, 2, 1, 104, true, false),
        (1, 40, 70, 1, 1, 120, false, true),
    ];
    for &(b, n, m, heads, kv_heads, hd, causal, with_mask) in cases {
        let scale = 1.0 / (hd as f32).sqrt();
        let q = rng.normals(b * n * heads * hd, 0.0, 1.0);
        let k = rng.normals(b * m * kv_heads * hd, 0.0, 1.0);
        let v = rng.normals(b * m * kv_heads * hd, 0.0, 1.0);
        // Sample 0 pads its last third, sample 1 (when present) every key.
        let mask: Vec<f32> = (0..b * m)
            .map(|i| {
                if i / m == 0 {
                    f32::from(i % m < m - m / 3)
                } else {
                    0.0
                }
            })
            .collect();
        let d = AttentionDims {
            batch: b,
            q_len: n,
            kv_len: m,
            heads,
            kv_heads,
            head_dim: hd,
            causal,
            scale,
        };
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
        let ls = attention_sm90::launch(&a, 0).unwrap();
        // SAFETY: every buffer holds the shapes launched.
        for l in &ls {
            unsafe { l.enqueue(&dev).unwrap() };
        }
        let mut got = vec![0u16; b * n * heads * hd];
        dev.copy_to_host(op, &mut got).unwrap();
        let got: Vec<f32> = got
            .into_iter()
            .map(|x| half::bf16::from_bits(x).to_f32())
            .collect();
        check(
            &format!("{} [{b}, {n} x {m}, {heads}/{kv_heads} heads, hd {hd}] causal={causal} mask={with_mask}", ls[0].kernel),
            BF,
            &got,
            &want,
            &base,
        );
    }
}

fn download(dev: &CudaDevice, p: u64, n: usize) -> Vec<f32> {
    let mut h = vec![0u16; n];
    dev.copy_to_host(p, &mut h).unwrap();
    h.into_iter()
        .map(|x| half::bf16::from_bits(x).to_f32())
        .collect()
}

const THETA: f32 = 1e6;

/// Fused RoPE on the sm_90a path, launched directly: the pre-pass's rotated q and k are exactly
/// the CPU's `rope_at` on the bf16 inputs, rounded to bf16 (a wrong table offset, position or
/// head would change them), and the attention matches the CPU twin's `attention_ext` with RoPE at
/// the bf16 tolerance (and is far from the result without RoPE, so skipping it would fail).
#[test]
fn attention_sm90_rope_matches_cpu() {
    let Some(dev) = sm90_device() else { return };
    let mut rng = Rng::new(43);
    // (batch, n = m, heads, kv_heads, hd, causal, packed segments). Segment boundaries 60, 70, 134, 137
    // straddle the 64-key tiles and the 128-row blocks (a block then starts its keys mid-sequence).
    let cases: &[(usize, usize, usize, usize, usize, bool, Option<&[usize]>)] = &[
        (1, 70, 4, 2, 64, true, None),
        (2, 130, 2, 1, 128, true, None),
        (1, 130, 2, 2, 64, false, None),
        (1, 237, 4, 2, 64, true, Some(&[60, 10, 64, 3, 100])),
        (1, 113, 2, 1, 128, false, Some(&[37, 5, 70, 1])),
    ];
    for &(b, n, heads, kv_heads, hd, causal, segs) in cases {
        let scale = 1.0 / (hd as f32).sqrt();
        let q = rng.normals(b * n * heads * hd, 0.0, 1.0);
        let k = rng.normals(b * n * kv_heads * hd, 0.1, 1.5);
        let v = rng.normals(b * n * kv_heads * hd, 0.5, 1.0);
        let d = AttentionDims {
            batch: b,
            q_len: n,
            kv_len: n,
            heads,
            kv_heads,
            head_dim: hd,
            causal,
            scale,
        };
        let twin = |q: &[f32], k: &[f32], v: &[f32], rope: Option<f32>| {
            let mut o = vec![0.0; b * n * heads * hd];
            cpu::attention_ext(q, k, v, None, d, segs, rope, &mut o);
            o
        };
        let want = twin(&q, &k, &v, Some(THETA));
        let base = twin(
            &round_to(BF, &q),
            &round_to(BF, &k),
            &round_to(BF, &v),
            Some(THETA),
        );
        let unrotated = rel_l2(&twin(&q, &k, &v, None), &want);
        assert!(
            unrotated > 0.05,
            "RoPE changes the result by only {unrotated:.3e}: the case cannot see it"
        );
        if segs.is_some() {
            let mut whole = vec![0.0; want.len()];
            cpu::attention_ext(&q, &k, &v, None, d, None, Some(THETA), &mut whole);
            let apart = rel_l2(&whole, &want);
            assert!(
                apart > 0.05,
                "segments change the result by only {apart:.3e}: the case cannot see them"
            );
        }
        let (_qb, qp) = upload(&dev, &q);
        let (_kb, kp) = upload(&dev, &k);
        let (_vb, vp) = upload(&dev, &v);
        let (_ob, op) = upload(&dev, &vec![f32::NAN; b * n * heads * hd]);
        let positions = segs.map_or(n, |s| s.iter().copied().max().unwrap());
        let table = dev
            .upload(
                &rope_table(THETA, hd, positions)
                    .iter()
                    .flat_map(|c| c.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .unwrap();
        let seg_table = segs.map(|s| {
            dev.upload(
                &segment_table(s)
                    .iter()
                    .flat_map(|c| c.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )
            .unwrap()
        });
        let a = AttentionArgs {
            dtype: BF,
            q: qp,
            k: kp,
            v: vp,
            mask: 0,
            segments: seg_table.as_ref().map_or(0, |t| t.ptr()),
            rope_cs: table.ptr(),
            out: op,
            batch: b,
            n,
            m: n,
            heads,
            kv_heads,
            head_dim: hd,
            causal,
            scale,
        };
        assert!(attention_sm90::qualifies(&a));
        let e = attention_sm90::launch(&a, 0).unwrap_err().to_string();
        assert!(
            e.contains("scratch")
                && e.contains(&attention_sm90::rope_scratch_bytes(&a).to_string()),
            "{e}"
        );
        let (_sb, sp) = upload(
            &dev,
            &vec![f32::NAN; attention_sm90::rope_scratch_bytes(&a) / 2],
        );
        let ls = attention_sm90::launch(&a, sp).unwrap();
        assert_eq!(ls.len(), attention_sm90::launch_count(&a));
        assert_eq!(ls[0].kernel, "attention_rope_bf16");
        // SAFETY: every buffer holds the shapes launched.
        for l in &ls {
            unsafe { l.enqueue(&dev).unwrap() };
        }
        // The pre-pass: bit for bit.
        let pos = cpu::token_positions(b, n, segs);
        for (what, x, h, off) in [("q", &q, heads, 0), ("k", &k, kv_heads, b * n * heads * hd)] {
            let mut r = vec![0.0; x.len()];
            cpu::rope_at(&round_to(BF, x), &pos, h, hd, THETA, &mut r);
            let r = round_to(BF, &r);
            let got = download(&dev, sp + 2 * off as u64, x.len());
            let bad = got
                .iter()
                .zip(&r)
                .position(|(g, w)| g.to_bits() != w.to_bits());
            assert!(
                bad.is_none(),
                "rotated {what} [{b}, {n}, {h} heads, hd {hd}] differs at {bad:?}: {:?} vs {:?}",
                bad.map(|i| got[i]),
                bad.map(|i| r[i])
            );
        }
        let got = download(&dev, op, b * n * heads * hd);
        check(
            &format!("{} + {} [{b}, {n}, {heads}/{kv_heads} heads, hd {hd}] causal={causal} segments={segs:?} rope", ls[0].kernel, ls[1].kernel),
            BF,
            &got,
            &want,
            &base,
        );
    }
}

/// The executor on an sm_90a device: a RoPE prefill (causal, GQA) takes the sm_90a path (its
/// resources are the RoPE table and the pre-pass's scratch), and with `OPENUNI_KERNELS=mma`
/// attention.cu (the table alone); both match the CPU twin. Run the binary both ways.
#[test]
fn executor_selects_sm90_for_rope_prefill() {
    let Some(dev) = sm90_device() else { return };
    let (b, n, heads, kv_heads, hd) = (1usize, 70usize, 4usize, 2usize, 64usize);
    let mut rng = Rng::new(44);
    let q = rng.normals(b * n * heads * hd, 0.0, 1.0);
    let k = rng.normals(b * n * kv_heads * hd, 0.1, 1.5);
    let v = rng.normals(b * n * kv_heads * hd, 0.5, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let d = AttentionDims {
        batch: b,
        q_len: n,
        kv_len: n,
        heads,
        kv_heads,
        head_dim: hd,
        causal: true,
        scale,
    };
    let twin = |q: &[f32], k: &[f32], v: &[f32]| {
        let mut o = vec![0.0; b * n * heads * hd];
        cpu::attention_ext(q, k, v, None, d, None, Some(THETA), &mut o);
        o
    };
    let want = twin(&q, &k, &v);
    let base = twin(&round_to(BF, &q), &round_to(BF, &k), &round_to(BF, &v));
    let mut gb = GraphBuilder::new();
    let qi = gb.input("q", [b, n, heads * hd]).unwrap();
    let ki = gb.input("k", [b, n, kv_heads * hd]).unwrap();
    let vi = gb.input("v", [b, n, kv_heads * hd]).unwrap();
    let p = AttentionParams {
        key_mask: None,
        heads,
        kv_heads,
        head_dim: hd,
        causal: true,
        scale,
        segments: None,
        rope: Some(THETA),
    };
    let y = gb.attention_ext("llm.attn", qi, ki, vi, p).unwrap();
    gb.output("y", y).unwrap();
    let g = gb.finish();
    let t = |s: &[usize], v: &[f32]| HostTensor::from_f32(s.to_vec(), v.to_vec()).unwrap();
    let feeds = HashMap::from([
        ("q".to_string(), t(&[b, n, heads * hd], &q)),
        ("k".to_string(), t(&[b, n, kv_heads * hd], &k)),
        ("v".to_string(), t(&[b, n, kv_heads * hd], &v)),
    ]);
    let mut ex =
        CudaExecutor::new(&dev, &g, &HashMap::<String, HostTensor>::new(), BF, false).unwrap();
    let got = ex.run(&feeds).unwrap()["y"].to_f32_vec();
    let table = n * hd * 4;
    let scratch = 2 * b * n * (heads + kv_heads) * hd;
    let forced = conv_sm90::forced_mma();
    let path = if forced {
        "attention.cu (OPENUNI_KERNELS=mma)"
    } else {
        "sm_90a"
    };
    check(
        &format!("executor RoPE prefill on {path}"),
        BF,
        &got,
        &want,
        &base,
    );
    let expected = if forced { table } else { table + scratch };
    assert_eq!(ex.resource_bytes(), expected, "resources on the {path} path: the RoPE table ({table} bytes) and, on sm_90a only, the pre-pass scratch ({scratch} bytes)");
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
        assert!(
            attention_sm90::qualifies(&AttentionArgs { head_dim: hd, ..a }),
            "hd {hd}"
        );
    }
    // The smallest capacity that holds the head dim: SANA's 72 computes 80 columns, not 128.
    for (hd, cap) in [
        (8, 64),
        (64, 64),
        (72, 80),
        (80, 80),
        (88, 112),
        (112, 112),
        (120, 128),
        (128, 128),
    ] {
        assert_eq!(attention_sm90::capacity(hd), Some(cap), "hd {hd}");
    }
    assert_eq!(
        attention_sm90::smem_bytes(80),
        attention_sm90::smem_bytes(128),
        "80 columns take two 64-column boxes"
    );
    assert_eq!(attention_sm90::kernel_name(80), "attention_bf16_wgmma_hd80");
    for hd in [4, 100, 136, 256] {
        assert!(
            !attention_sm90::qualifies(&AttentionArgs { head_dim: hd, ..a }),
            "hd {hd}"
        );
    }
    // Packed segments: batch 1, n = m.
    assert!(attention_sm90::qualifies(&AttentionArgs {
        segments: 0x5000,
        ..a
    }));
    assert!(!attention_sm90::qualifies(&AttentionArgs {
        segments: 0x5000,
        batch: 2,
        ..a
    }));
    assert!(!attention_sm90::qualifies(&AttentionArgs {
        segments: 0x5000,
        m: 9,
        ..a
    }));
    // Fused RoPE (n = m): the pre-pass, then the attention.
    let rope = AttentionArgs {
        rope_cs: 0x5000,
        causal: true,
        ..a
    };
    assert!(attention_sm90::qualifies(&rope));
    assert_eq!(attention_sm90::launch_count(&rope), 2);
    assert_eq!(attention_sm90::launch_count(&a), 1);
    assert_eq!(
        attention_sm90::rope_scratch_bytes(&rope),
        2 * 8 * (2 + 1) * 64
    );
    assert!(!attention_sm90::qualifies(&AttentionArgs { m: 9, ..rope }));
    assert!(attention_sm90::qualifies(&AttentionArgs {
        segments: 0x6000,
        ..rope
    }));
    assert!(!attention_sm90::qualifies(&AttentionArgs {
        dtype: DType::F32,
        ..a
    }));
    assert!(!attention_sm90::qualifies(&AttentionArgs {
        q: 0x1002,
        ..a
    }));
}
