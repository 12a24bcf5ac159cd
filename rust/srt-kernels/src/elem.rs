//! Element types of kernel inputs and outputs: `f32`, and bfloat16 held as its bits ([`Bf16`]),
//! the two dtypes srt runs models in on the CPU. Arithmetic is always f32.

/// A storage element: converted to f32 on load, rounded back on store.
pub trait Elem: Copy + Send + Sync + 'static {
    /// Whether the type is [`Bf16`] (16 bits a value), else f32: how SIMD code loads it.
    const BF16: bool;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The slice itself when the type is f32 (no conversion needed).
    #[inline(always)]
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

/// bfloat16 as its 16 bits (the top half of an f32), as torch stores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Elem for Bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
    /// Round to nearest, ties to even (torch's rounding); NaN stays NaN.
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        let bits = x.to_bits();
        if x.is_nan() {
            return Bf16(((bits >> 16) | 0x40) as u16);
        }
        let rounding = 0x7fff + ((bits >> 16) & 1);
        Bf16((bits.wrapping_add(rounding) >> 16) as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_trips_and_rounds_to_nearest_even() {
        for x in [0.0f32, 1.0, -2.5, 3.140625, 1e-30, -1e30, f32::INFINITY] {
            let b = Bf16::from_f32(x);
            assert_eq!(Bf16::from_f32(b.to_f32()), b);
        }
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even one (1).
        assert_eq!(Bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
        assert_eq!(Bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 1.0 / 64.0);
        assert!(Bf16::from_f32(f32::NAN).to_f32().is_nan());
    }
}
