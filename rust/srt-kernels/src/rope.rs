//! Rotary position embedding (neox style, `rotate_half`), in place over `[tokens, heads, dim]`.
//!
//! Token `t`'s heads are rotated by the table rows of `positions[t]`: with `c`, `s` the cos
//! and sin rows (each of `dim` values, the frequencies repeated over both halves) and `x1`,
//! `x2` a head's halves, `x1' = x1 c1 - x2 s1` and `x2' = x2 c2 + x1 s2`. Each product and the
//! sum round to the storage type, as the torch expression `x * cos + rotate_half(x) * sin`
//! with the table cast to `x`'s dtype does, so the result is the same to the bit.

use ndarray::{ArrayView2, ArrayViewMut3};

use crate::elem::Elem;
use crate::KernelError;

/// Rotates `x` (`[T, H, D]`, each head's D values contiguous) in place.
pub fn rope_neox<E: Elem>(
    mut x: ArrayViewMut3<'_, E>,
    positions: &[i64],
    cos: ArrayView2<'_, f32>,
    sin: ArrayView2<'_, f32>,
) -> Result<(), KernelError> {
    let (t, _, d) = x.dim();
    let fail = |m: String| Err(KernelError(m));
    if positions.len() != t {
        return fail(format!("{} positions for {t} tokens", positions.len()));
    }
    if !d.is_multiple_of(2) || cos.dim() != sin.dim() || cos.ncols() != d {
        return fail(format!(
            "tables {:?} / {:?} do not fit head size {d} (even)",
            cos.dim(),
            sin.dim()
        ));
    }
    if d > 0 && x.strides()[2] != 1 {
        return fail("each head's values must be contiguous".into());
    }
    let rows = cos.nrows();
    if let Some(&p) = positions.iter().find(|&&p| p < 0 || p as usize >= rows) {
        return fail(format!(
            "position {p} is outside the table's {rows} positions"
        ));
    }
    for (mut token, &p) in x.outer_iter_mut().zip(positions) {
        let (c, s) = (cos.row(p as usize), sin.row(p as usize));
        let (c, s) = (c.as_slice(), s.as_slice());
        let (Some(c), Some(s)) = (c, s) else {
            return fail("the cos / sin tables must be C-contiguous".into());
        };
        for mut head in token.outer_iter_mut() {
            rotate_head(
                head.as_slice_mut().expect("contiguous: checked above"),
                c,
                s,
            );
        }
    }
    Ok(())
}

/// One head (`d` values) rotated by the table rows `c`, `s` (`d` values each).
#[inline(always)]
pub(crate) fn rotate_head<E: Elem>(head: &mut [E], c: &[f32], s: &[f32]) {
    let half = head.len() / 2;
    // The table cast to the storage type, as torch casts it.
    let r = |v: f32| E::from_f32(v).to_f32();
    let (lo, hi) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (lo[i].to_f32(), hi[i].to_f32());
        let a1 = r(x1 * r(c[i]));
        let b1 = r(-x2 * r(s[i]));
        let a2 = r(x2 * r(c[half + i]));
        let b2 = r(x1 * r(s[half + i]));
        lo[i] = E::from_f32(a1 + b1);
        hi[i] = E::from_f32(a2 + b2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Bf16;
    use ndarray::{Array2, Array3};

    fn tables(positions: usize, d: usize) -> (Array2<f32>, Array2<f32>) {
        let half = d / 2;
        let angle =
            |p: usize, i: usize| p as f32 / 10000f32.powf((2 * (i % half)) as f32 / d as f32);
        (
            Array2::from_shape_fn((positions, d), |(p, i)| angle(p, i).cos()),
            Array2::from_shape_fn((positions, d), |(p, i)| angle(p, i).sin()),
        )
    }

    #[test]
    fn rotates_by_each_tokens_position_and_keeps_norms() {
        let (cos, sin) = tables(16, 8);
        let x = Array3::from_shape_fn((3, 2, 8), |(t, h, i)| (t * 16 + h * 8 + i) as f32 * 0.1);
        let mut y = x.clone();
        rope_neox(y.view_mut(), &[0, 5, 15], cos.view(), sin.view()).unwrap();
        // Position 0 is the identity; a rotation keeps each pair's norm.
        assert_eq!(
            y.slice(ndarray::s![0, .., ..]),
            x.slice(ndarray::s![0, .., ..])
        );
        for t in 1..3 {
            for h in 0..2 {
                for i in 0..4 {
                    let n0 = x[[t, h, i]].hypot(x[[t, h, i + 4]]);
                    let n1 = y[[t, h, i]].hypot(y[[t, h, i + 4]]);
                    assert!((n0 - n1).abs() < 1e-4, "{n0} vs {n1}");
                }
            }
        }
        // x1' = x1 cos - x2 sin at position 5, pair 1.
        let (c, s) = (cos[[5, 1]], sin[[5, 1]]);
        assert_eq!(y[[1, 0, 1]], x[[1, 0, 1]] * c + -x[[1, 0, 5]] * s);
    }

    #[test]
    fn bf16_rounds_each_operation() {
        let (cos, sin) = tables(8, 4);
        let vals = [1.5f32, -0.3, 2.25, 0.7];
        let mut x = Array3::from_shape_fn((1, 1, 4), |(_, _, i)| Bf16::from_f32(vals[i]));
        rope_neox(x.view_mut(), &[3], cos.view(), sin.view()).unwrap();
        let r = |v: f32| Bf16::from_f32(v).to_f32();
        let want = r(r(vals[0] * r(cos[[3, 0]])) + r(-vals[2] * r(sin[[3, 0]])));
        assert_eq!(x[[0, 0, 0]].to_f32(), want);
    }

    #[test]
    fn bad_positions_and_shapes_are_errors() {
        let (cos, sin) = tables(4, 8);
        let mut x = Array3::<f32>::zeros((2, 1, 8));
        assert!(rope_neox(x.view_mut(), &[0, 4], cos.view(), sin.view()).is_err());
        assert!(rope_neox(x.view_mut(), &[0], cos.view(), sin.view()).is_err());
        let mut odd = Array3::<f32>::zeros((1, 1, 6));
        assert!(rope_neox(odd.view_mut(), &[0], cos.view(), sin.view()).is_err());
    }
}
