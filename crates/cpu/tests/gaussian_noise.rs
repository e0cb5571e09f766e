//! `ops::gaussian_noise`, the one definition of the seeded initial noise (kernels/misc.cu's
//! `gaussian_noise` draws the same bits; tests/cuda_misc.rs compares the two): Philox4x32-10
//! against Random123's published known answers, our log and sin/cos against f64 over every input
//! the generator can give them, and the values against the standard normal distribution.

use openuni_cpu::ops;
use openuni_graph::seed;

/// Random123's tests/kat_vectors, the three "philox4x32 10" lines (counter, key, expected).
#[test]
fn philox4x32_10_gives_the_published_known_answers() {
    let kat: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
        (
            [0, 0, 0, 0],
            [0, 0],
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8],
        ),
        (
            [u32::MAX; 4],
            [u32::MAX; 2],
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd],
        ),
        (
            [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
            [0xa409_3822, 0x299f_31d0],
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1],
        ),
    ];
    for (ctr, key, want) in kat {
        assert_eq!(
            ops::philox4x32_10(ctr, key),
            want,
            "counter {ctr:08x?} key {key:08x?}"
        );
    }
}

/// Units in the last place of `want` rounded to f32 (at least the smallest normal's).
fn ulps(got: f32, want: f64) -> f64 {
    let w = want as f32;
    let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()).max(f32::MIN_POSITIVE) as f64;
    (got as f64 - want).abs() / ulp
}

/// Every radius input u1 = k / 2^24, k = 1..=2^24: ln within 1 ulp of the f64 value (0.82 measured).
#[test]
fn noise_ln_is_within_one_ulp_everywhere_it_is_used() {
    let mut worst = (0.0f64, 0u32);
    for k in 1..=(1u32 << 24) {
        let x = k as f32 / 16_777_216.0;
        let e = ulps(ops::noise_ln(x), (x as f64).ln());
        if e > worst.0 {
            worst = (e, k);
        }
    }
    println!("noise_ln: worst {:.3} ulp at k = {}", worst.0, worst.1);
    assert!(
        worst.0 <= 1.0,
        "noise_ln is {:.3} ulp off at {} / 2^24",
        worst.0,
        worst.1
    );
    assert_eq!(ops::noise_ln(1.0), 0.0);
}

/// Every angle input t = 0..2^24 (a 2^-24 turn each): sin and cos within 1.5e-7 of the f64 values
/// (1.07e-7 measured).
#[test]
fn noise_sincos_turn_is_accurate_for_every_angle() {
    let mut worst = 0.0f64;
    for t in 0..(1u32 << 24) {
        let a = std::f64::consts::TAU * t as f64 / 16_777_216.0;
        let (s, c) = ops::noise_sincos_turn(t);
        worst = worst
            .max((s as f64 - a.sin()).abs())
            .max((c as f64 - a.cos()).abs());
    }
    println!("noise_sincos_turn: worst absolute error {worst:.3e}");
    assert!(worst <= 1.5e-7, "sin/cos off by {worst:e}");
    assert_eq!(ops::noise_sincos_turn(0), (0.0, 1.0));
}

fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

/// erf by its Maclaurin series (|x| < 3) or continued fraction of erfc (beyond): within 1e-12.
fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 3.0 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        2.0 / std::f64::consts::PI.sqrt() * sum
    } else {
        // erfc(a) = exp(-a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...)))).
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

/// 2^20 values of one seed against N(0, 1): moments within 5 standard errors, the
/// Kolmogorov–Smirnov distance under its 0.1 % critical value, the tails' mass, and no
/// correlation between neighbours or between consecutive seeds.
#[test]
fn gaussian_noise_is_standard_normal() {
    let n = 1usize << 20;
    let draw = |s: u64| {
        let mut v = vec![0f32; n];
        ops::gaussian_noise(&seed::limbs(s), n, &mut v);
        v
    };
    let z = draw(20_250_531);
    let nf = n as f64;
    let mean = z.iter().map(|&v| v as f64).sum::<f64>() / nf;
    let m = |p: i32| z.iter().map(|&v| (v as f64 - mean).powi(p)).sum::<f64>() / nf;
    let (var, skew, kurt) = (m(2), m(3) / m(2).powf(1.5), m(4) / (m(2) * m(2)));
    println!("mean {mean:.5} var {var:.5} skew {skew:.5} kurtosis {kurt:.5}");
    assert!(mean.abs() < 5.0 / nf.sqrt(), "mean {mean}");
    assert!(
        (var - 1.0).abs() < 5.0 * (2.0 / nf).sqrt(),
        "variance {var}"
    );
    assert!(skew.abs() < 5.0 * (6.0 / nf).sqrt(), "skewness {skew}");
    assert!(
        (kurt - 3.0).abs() < 5.0 * (24.0 / nf).sqrt(),
        "kurtosis {kurt}"
    );

    let mut sorted: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    sorted.sort_by(f64::total_cmp);
    let ks = sorted.iter().enumerate().map(|(i, &x)| {
        let f = normal_cdf(x);
        (f - i as f64 / nf)
            .abs()
            .max(((i + 1) as f64 / nf - f).abs())
    });
    let d = ks.fold(0.0, f64::max);
    println!(
        "Kolmogorov-Smirnov distance {d:.6} (0.1 % critical value {:.6})",
        1.95 / nf.sqrt()
    );
    assert!(d < 1.95 / nf.sqrt(), "KS distance {d}");

    // P(|z| > 3) = 0.0026998; the radius of u1 >= 2^-24 bounds |z| by sqrt(48 ln 2) = 5.77.
    let tail = z.iter().filter(|v| v.abs() > 3.0).count() as f64 / nf;
    assert!(
        (tail - 0.0026998).abs() < 5.0 * (0.0027 / nf).sqrt(),
        "tail mass {tail}"
    );
    assert!(
        z.iter().all(|v| v.abs() <= 5.77),
        "a value beyond the Box-Muller bound"
    );

    let corr = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x as f64 * y as f64)
            .sum::<f64>()
            / a.len() as f64
    };
    for lag in [1, 2, 3, 4] {
        let r = corr(&z[..n - lag], &z[lag..]);
        assert!(r.abs() < 5.0 / nf.sqrt(), "lag-{lag} correlation {r}");
    }
    let r = corr(&z, &draw(20_250_532));
    assert!(
        r.abs() < 5.0 / nf.sqrt(),
        "correlation of consecutive seeds {r}"
    );
}

/// Counter-based: a seed's first values do not depend on how many are drawn (an image's noise
/// is a prefix of a larger image's), and other seeds give other values.
#[test]
fn gaussian_noise_is_a_function_of_seed_and_index() {
    let mut long = vec![0f32; 1001];
    ops::gaussian_noise(&seed::limbs(5), 1001, &mut long);
    for n in [1, 3, 4, 5, 999] {
        let mut short = vec![0f32; n];
        ops::gaussian_noise(&seed::limbs(5), n, &mut short);
        assert_eq!(short[..], long[..n], "{n} values");
    }
    // Two seeds in one call are each their own draw.
    let mut both = vec![0f32; 2 * 7];
    let limbs: Vec<f32> = [5u64, 6].iter().flat_map(|&s| seed::limbs(s)).collect();
    ops::gaussian_noise(&limbs, 7, &mut both);
    assert_eq!(both[..7], long[..7]);
    assert_ne!(both[7..], long[..7]);
}

#[test]
fn seed_limbs_round_trip_and_clamp() {
    for s in [0u64, 1, 65_535, 65_536, 0x0123_4567_89AB_CDEF, u64::MAX] {
        assert_eq!(seed::from_limbs(&seed::limbs(s)), s);
    }
    // A limb outside 0..=65535 is clamped, a fraction truncated, NaN read as 0.
    assert_eq!(
        seed::from_limbs(&[-3.0, 70_000.0, 2.7, f32::NAN]),
        0xFFFF << 16 | 2 << 32
    );
}
