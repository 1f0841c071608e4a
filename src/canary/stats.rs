//! The statistics the judge needs, with no dependency: the standard normal quantile
//! and two one-sided z-tests. Exact to the last digits that matter, tested against
//! values worked out by hand.

/// The `p` quantile of the standard normal distribution (Φ⁻¹), by Wichura's
/// algorithm AS 241 (PPND16, relative error about 1e-16). `p` must be in (0, 1);
/// 0 and 1 give -∞ and +∞.
pub fn normal_quantile(p: f64) -> f64 {
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180_625 - q * q;
        return q * poly(&A, r) / poly(&B, r);
    }
    let r = if q < 0.0 { p } else { 1.0 - p };
    let r = (-r.ln()).sqrt();
    let x = if r <= 5.0 {
        let r = r - 1.6;
        poly(&C, r) / poly(&D, r)
    } else {
        let r = r - 5.0;
        poly(&E, r) / poly(&F, r)
    };
    if q < 0.0 { -x } else { x }
}

/// `c[0] + c[1] x + ... + c[7] x^7`.
fn poly(c: &[f64; 8], x: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * x + k)
}

const A: [f64; 8] = [
    3.387_132_872_796_366_5,
    1.331_416_678_917_843_8e2,
    1.971_590_950_306_551_3e3,
    1.373_169_376_550_946e4,
    4.592_195_393_154_987e4,
    6.726_577_092_700_87e4,
    3.343_057_558_358_813e4,
    2.509_080_928_730_122_7e3,
];
const B: [f64; 8] = [
    1.0,
    4.231_333_070_160_091e1,
    6.871_870_074_920_579e2,
    5.394_196_021_424_751e3,
    2.121_379_430_158_659_7e4,
    3.930_789_580_009_271e4,
    2.872_908_573_572_194_3e4,
    5.226_495_278_852_545e3,
];
const C: [f64; 8] = [
    1.423_437_110_749_683_5,
    4.630_337_846_156_546,
    5.769_497_221_460_691,
    3.647_848_324_763_204_5,
    1.270_458_252_452_368_4,
    2.417_807_251_774_506e-1,
    2.272_384_498_926_918_4e-2,
    7.745_450_142_783_414e-4,
];
const D: [f64; 8] = [
    1.0,
    2.053_191_626_637_759,
    1.676_384_830_183_803_8,
    6.897_673_349_851e-1,
    1.481_039_764_274_800_8e-1,
    1.519_866_656_361_645_7e-2,
    5.475_938_084_995_345e-4,
    1.050_750_071_644_416_9e-9,
];
const E: [f64; 8] = [
    6.657_904_643_501_103,
    5.463_784_911_164_114,
    1.784_826_539_917_291_3,
    2.965_605_718_285_048_7e-1,
    2.653_218_952_657_612_4e-2,
    1.242_660_947_388_078_4e-3,
    2.711_555_568_743_487_6e-5,
    2.010_334_399_292_288_1e-7,
];
const F: [f64; 8] = [
    1.0,
    5.998_322_065_558_88e-1,
    1.369_298_809_227_358e-1,
    1.487_536_129_085_061_5e-2,
    7.868_691_311_456_133e-4,
    1.846_318_317_510_054_8e-5,
    1.421_511_758_316_446e-7,
    2.044_263_103_389_939_7e-15,
];

/// One-sided two-proportion z statistic for "the first proportion is larger":
/// `(x1/n1 - x2/n2) / sqrt(p (1 - p) (1/n1 + 1/n2))` with the pooled `p`.
/// `None` when either sample is empty or the pooled variance is 0 (no errors at
/// all, or nothing but errors: no evidence of a difference either way).
pub fn two_proportion_z(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<f64> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (x1, n1, x2, n2) = (to_f64(x1), to_f64(n1), to_f64(x2), to_f64(n2));
    let pooled = (x1 + x2) / (n1 + n2);
    let variance = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2);
    (variance > 0.0).then(|| (x1 / n1 - x2 / n2) / variance.sqrt())
}

/// One-sided one-proportion z statistic for "the true proportion is above `p0`":
/// `(x/n - p0) / sqrt(p0 (1 - p0) / n)`. `None` when `n` is 0 or `p0` is not in (0, 1).
pub fn proportion_above_z(x: u64, n: u64, p0: f64) -> Option<f64> {
    if n == 0 || p0 <= 0.0 || p0 >= 1.0 {
        return None;
    }
    let n = to_f64(n);
    Some((to_f64(x) / n - p0) / (p0 * (1.0 - p0) / n).sqrt())
}

/// Counts as f64: exact below 2^53, far beyond any request window.
#[allow(clippy::cast_precision_loss)]
pub fn to_f64(n: u64) -> f64 {
    n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1.0)
    }

    #[test]
    fn normal_quantile_matches_published_values() {
        // Values from standard tables (to 15 digits).
        for (p, z) in [
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.99, 2.326_347_874_040_841),
            (0.999, 3.090_232_306_167_813_5),
            (0.841_344_746_068_542_9, 1.0),
            (1.0 - 1e-9, 5.997_807_019_601_638),
            (1e-20, -9.262_340_089_798_405),
        ] {
            let got = normal_quantile(p);
            assert!(close(got, z, 1e-12), "Φ⁻¹({p}) = {got}, want {z}");
        }
        // Symmetry, and the ends.
        assert!(close(normal_quantile(0.01), -2.326_347_874_040_841, 1e-12));
        assert_eq!(normal_quantile(0.0), f64::NEG_INFINITY);
        assert_eq!(normal_quantile(1.0), f64::INFINITY);
    }

    #[test]
    fn two_proportion_z_by_hand() {
        // 30/1000 against 10/1000: pooled p = 0.02, variance = 0.02 * 0.98 * 0.002
        // = 3.92e-5, z = 0.02 / 0.006260990336 = 3.194382825.
        let z = two_proportion_z(30, 1000, 10, 1000).unwrap();
        assert!(close(z, 3.194_382_824_999_699, 1e-12), "{z}");
        // 200/1000 against 10/2000: pooled 0.07, variance 0.07 * 0.93 * 0.0015
        // = 9.765e-5, z = 0.195 / 0.009881801 = 19.733244.
        let z = two_proportion_z(200, 1000, 10, 2000).unwrap();
        assert!(close(z, 19.733_244_073_364_78, 1e-12), "{z}");
        // Antisymmetric; equal proportions give 0.
        assert!(close(
            two_proportion_z(10, 2000, 200, 1000).unwrap(),
            -z,
            1e-12
        ));
        assert_eq!(two_proportion_z(5, 500, 10, 1000), Some(0.0));
        // No evidence either way.
        assert_eq!(two_proportion_z(0, 100, 0, 200), None);
        assert_eq!(two_proportion_z(100, 100, 200, 200), None);
        assert_eq!(two_proportion_z(1, 0, 1, 10), None);
    }

    #[test]
    fn proportion_above_z_by_hand() {
        // 5 of 100 above a 1% line: (0.05 - 0.01) / sqrt(0.0099 / 100) = 4.020151.
        let z = proportion_above_z(5, 100, 0.01).unwrap();
        assert!(close(z, 4.020_151_261_036_848, 1e-12), "{z}");
        assert!(close(proportion_above_z(1, 100, 0.01).unwrap(), 0.0, 1e-12));
        assert_eq!(proportion_above_z(1, 0, 0.01), None);
        assert_eq!(proportion_above_z(1, 10, 0.0), None);
    }
}
