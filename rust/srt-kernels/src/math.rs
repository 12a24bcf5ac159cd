//! Vectorisable f32 helpers shared by the kernels: loops over fixed-width lane arrays that the
//! compiler turns into SIMD code, in an order that does not depend on the target.

/// Lanes of the partial sums (one AVX2 register of f32).
pub const LANES: usize = 8;

/// `widest!(fn name<E: Bound>(args...) -> R => body)` defines `name`, which runs `body` (an
/// `#[inline(always)]` function of the same arguments) compiled for AVX-512F or AVX2 where the
/// CPU has them, else as the baseline build. The copies run the same operations (Rust fuses no
/// multiply-adds, and the helpers here fix their partial sums' order), so every copy gives the
/// same bits; only the vector width changes.
macro_rules! widest {
    ($vis:vis fn $name:ident $(<$g:ident: $bound:path>)? ($($a:ident: $t:ty),* $(,)?) -> $r:ty => $body:ident) => {
        #[inline]
        $vis fn $name $(<$g: $bound>)? ($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512 $(<$g: $bound>)? ($($a: $t),*) -> $r {
                    $body($($a),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2 $(<$g: $bound>)? ($($a: $t),*) -> $r {
                    $body($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, the only feature the copy is compiled for.
                    return unsafe { avx512($($a),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above, AVX2.
                    return unsafe { avx2($($a),*) };
                }
            }
            $body($($a),*)
        }
    };
}
pub(crate) use widest;

/// The sum of `a` over LANES partial sums (vectorised), then across them.
#[inline(always)]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// The dot product of `a` and `b` (the length of the shorter), over LANES partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// The largest value of `a` (NaNs passed over; -inf when empty), over LANES partial maxima.
#[inline(always)]
pub fn max(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// The first index of `v` in `a`, LANES at a time.
#[inline(always)]
pub fn position(a: &[f32], v: f32) -> Option<usize> {
    let mut chunks = a.chunks_exact(LANES);
    for (k, c) in (&mut chunks).enumerate() {
        if c.iter().fold(false, |any, &x| any | (x == v)) {
            return c.iter().position(|&x| x == v).map(|i| k * LANES + i);
        }
    }
    let base = a.len() - chunks.remainder().len();
    chunks
        .remainder()
        .iter()
        .position(|&x| x == v)
        .map(|i| base + i)
}

/// e^x for x <= 0 (a softmax's shifted scores), in a form the compiler vectorises:
/// 2^n * p(r) with x = n ln 2 + r, |r| <= ln 2 / 2 and p the degree-6 Taylor polynomial
/// (relative error below 3e-7, about libm's); x below -87 gives 0 instead of a subnormal,
/// NaN gives NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer.
    const ROUND: f32 = 12_582_912.0;
    // NaN stays NaN (the comparison is false).
    let xc = if x < -87.0 { -87.0 } else { x };
    // t's low mantissa bits hold the integer n (t = ROUND + n): integer arithmetic gives 2^n
    // with no float-to-int conversion (which would not vectorise: it saturates).
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let e = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    let scale = f32::from_bits(e << 23);
    let y = p * scale;
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_over_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn max_and_position_find_the_first_maximum() {
        let mut a: Vec<f32> = (0..29).map(|i| ((i * 7) % 11) as f32).collect();
        a[20] = 50.0;
        a[27] = 50.0;
        a[3] = f32::NAN;
        assert_eq!(max(&a), 50.0);
        assert_eq!(position(&a, 50.0), Some(20));
        assert_eq!(position(&a[21..], 50.0), Some(6)); // in the remainder
        assert_eq!(position(&a, 99.0), None);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn sums_every_element() {
        let a: Vec<f32> = (0..37).map(|i| i as f32).collect();
        assert_eq!(sum(&a), (0..37).sum::<i32>() as f32);
        assert_eq!(sum(&[]), 0.0);
    }
}
