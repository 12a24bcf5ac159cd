//! Row-wise layer ops of a decoder step, fused: RMSNorm (with the residual add before it) and
//! the gated SiLU of the MLP. On the CPU each replaces several torch ops (and their dispatch,
//! which costs more than the arithmetic at decode sizes).
//!
//! Numerics follow HF's torch code: the residual add rounds to the storage type, the norm runs
//! in f32 (`x * rsqrt(mean(x^2) + eps)`, rounded to the storage type, then times the weight
//! and rounded again; Gemma: `x * rsqrt(..) * (1 + weight)` in f32, rounded once), SiLU in f32.
//! Sums are taken in a fixed lane order, so results can differ from torch's in the last bit.

use rayon::prelude::*;

use crate::elem::Elem;
use crate::math::{exp_nonpositive, widest, LANES};
use crate::pool::pool;
use crate::KernelError;

/// `out = rmsnorm(x)`, or with `residual`: `residual += x` (rounded to E) then
/// `out = rmsnorm(residual)`. Rows of `d` values; `weight` `[d]`.
pub fn rms_norm<E: Elem>(
    x: &[E],
    residual: Option<&mut [E]>,
    weight: &[E],
    out: &mut [E],
    d: usize,
    eps: f32,
    gemma: bool,
) -> Result<(), KernelError> {
    if d == 0 || weight.len() != d || !x.len().is_multiple_of(d) || out.len() != x.len() {
        return Err(KernelError(format!(
            "rms_norm: x {} values, out {}, weight {} for rows of {d}",
            x.len(),
            out.len(),
            weight.len()
        )));
    }
    rms_norm_widest(x, residual, weight, out, d, eps, gemma)
}

widest!(fn rms_norm_widest<E: Elem>(
    x: &[E],
    residual: Option<&mut [E]>,
    weight: &[E],
    out: &mut [E],
    d: usize,
    eps: f32,
    gemma: bool,
) -> Result<(), KernelError> => rms_norm_rows);

#[inline(always)]
fn rms_norm_rows<E: Elem>(
    x: &[E],
    residual: Option<&mut [E]>,
    weight: &[E],
    out: &mut [E],
    d: usize,
    eps: f32,
    gemma: bool,
) -> Result<(), KernelError> {
    let mut row = vec![0f32; d];
    match residual {
        Some(res) => {
            if res.len() != x.len() {
                return Err(KernelError(format!(
                    "rms_norm: residual {} values, x {}",
                    res.len(),
                    x.len()
                )));
            }
            for ((xr, rr), or) in x
                .chunks_exact(d)
                .zip(res.chunks_exact_mut(d))
                .zip(out.chunks_exact_mut(d))
            {
                for ((r, &xv), v) in rr.iter_mut().zip(xr).zip(row.iter_mut()) {
                    *r = E::from_f32(r.to_f32() + xv.to_f32());
                    *v = r.to_f32();
                }
                norm_row(&row, weight, or, eps, gemma);
            }
        }
        None => {
            for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                for (v, &xv) in row.iter_mut().zip(xr) {
                    *v = xv.to_f32();
                }
                norm_row(&row, weight, or, eps, gemma);
            }
        }
    }
    Ok(())
}

#[inline(always)]
fn norm_row<E: Elem>(row: &[f32], weight: &[E], out: &mut [E], eps: f32, gemma: bool) {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i] * c[i];
        }
    }
    let sum = acc.iter().sum::<f32>() + rest.iter().map(|v| v * v).sum::<f32>();
    let r = 1.0 / (sum / row.len() as f32 + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(row).zip(weight) {
        *o = if gemma {
            E::from_f32(v * r * (1.0 + w.to_f32()))
        } else {
            E::from_f32(w.to_f32() * E::from_f32(v * r).to_f32())
        };
    }
}

/// `out[t] = silu(x[t, :d]) * x[t, d:]` for rows `x` of `2 d` values (gate then up).
pub fn silu_and_mul<E: Elem>(x: &[E], out: &mut [E], d: usize) -> Result<(), KernelError> {
    if d == 0 || !x.len().is_multiple_of(2 * d) || out.len() * 2 != x.len() {
        return Err(KernelError(format!(
            "silu_and_mul: x {} values, out {} for gate/up rows of {d}",
            x.len(),
            out.len()
        )));
    }
    silu_widest(x, out, d);
    Ok(())
}

widest!(fn silu_widest<E: Elem>(x: &[E], out: &mut [E], d: usize) -> () => silu_rows);

#[inline(always)]
fn silu_rows<E: Elem>(x: &[E], out: &mut [E], d: usize) {
    for (xr, or) in x.chunks_exact(2 * d).zip(out.chunks_exact_mut(d)) {
        let (gate, up) = xr.split_at(d);
        for ((o, &g), &u) in or.iter_mut().zip(gate).zip(up) {
            let g = g.to_f32();
            // silu(g) = g / (1 + e^-g), with e^-|g| (never overflowing) for either sign.
            let e = exp_nonpositive(-g.abs());
            let sig = if g >= 0.0 {
                1.0 / (1.0 + e)
            } else {
                e / (1.0 + e)
            };
            // NOTE: torch rounds silu(g) to the storage type before the product.
            *o = E::from_f32(E::from_f32(g * sig).to_f32() * u.to_f32());
        }
    }
}

/// Below this many values a call runs on the calling thread (waking the pool costs more).
const PARALLEL_MIN_VALUES: usize = 64 * 1024;

/// [`rms_norm`] with the rows split over `threads` threads (the kernels' pool) when there are
/// enough of them; each row's arithmetic is the same, so is the result.
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_threads<E: Elem>(
    x: &[E],
    residual: Option<&mut [E]>,
    weight: &[E],
    out: &mut [E],
    d: usize,
    eps: f32,
    gemma: bool,
    threads: usize,
) -> Result<(), KernelError> {
    let rows = x.len().checked_div(d).unwrap_or(0);
    if threads <= 1 || rows < 2 || x.len() < PARALLEL_MIN_VALUES || out.len() != x.len() {
        return rms_norm(x, residual, weight, out, d, eps, gemma);
    }
    let per = rows.div_ceil(threads) * d;
    pool(threads).install(|| match residual {
        Some(res) if res.len() == x.len() => x
            .par_chunks(per)
            .zip(res.par_chunks_mut(per))
            .zip(out.par_chunks_mut(per))
            .try_for_each(|((x, r), o)| rms_norm(x, Some(r), weight, o, d, eps, gemma)),
        Some(res) => rms_norm(x, Some(res), weight, out, d, eps, gemma),
        None => x
            .par_chunks(per)
            .zip(out.par_chunks_mut(per))
            .try_for_each(|(x, o)| rms_norm(x, None, weight, o, d, eps, gemma)),
    })
}

/// [`silu_and_mul`] with the rows split over `threads` threads when there are enough of them
/// (the same result).
pub fn silu_and_mul_threads<E: Elem>(
    x: &[E],
    out: &mut [E],
    d: usize,
    threads: usize,
) -> Result<(), KernelError> {
    let rows = out.len().checked_div(d).unwrap_or(0);
    if threads <= 1 || rows < 2 || out.len() < PARALLEL_MIN_VALUES || x.len() != 2 * out.len() {
        return silu_and_mul(x, out, d);
    }
    let per = rows.div_ceil(threads);
    pool(threads).install(|| {
        x.par_chunks(2 * d * per)
            .zip(out.par_chunks_mut(d * per))
            .try_for_each(|(x, o)| silu_and_mul(x, o, d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Bf16;

    #[test]
    fn rms_norm_matches_the_formula() {
        let d = 13;
        let x: Vec<f32> = (0..2 * d).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.1).collect();
        let mut out = vec![0f32; 2 * d];
        rms_norm(&x, None, &w, &mut out, d, 1e-6, false).unwrap();
        for t in 0..2 {
            let row = &x[t * d..(t + 1) * d];
            let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                let want = row[j] as f64 / (ms + 1e-6).sqrt() * w[j] as f64;
                assert!((out[t * d + j] as f64 - want).abs() < 1e-5, "{t} {j}");
            }
        }
        // With the residual: residual += x, out = norm(residual).
        let mut res: Vec<f32> = vec![1.0; 2 * d];
        let mut out2 = vec![0f32; 2 * d];
        rms_norm(&x, Some(&mut res), &w, &mut out2, d, 1e-6, false).unwrap();
        let summed: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
        assert_eq!(res, summed);
        let mut want = vec![0f32; 2 * d];
        rms_norm(&summed, None, &w, &mut want, d, 1e-6, false).unwrap();
        assert_eq!(out2, want);
        // Gemma scales by 1 + w.
        let mut g = vec![0f32; 2 * d];
        rms_norm(&x, None, &w, &mut g, d, 1e-6, true).unwrap();
        let ms: f64 = x[..d].iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
        assert!(
            (g[1] as f64 - x[1] as f64 / (ms + 1e-6).sqrt() * (1.0 + w[1] as f64)).abs() < 1e-5
        );
        assert!(rms_norm(&x, None, &w[..3], &mut out, d, 1e-6, false).is_err());
    }

    #[test]
    fn silu_and_mul_matches_the_formula() {
        let d = 11;
        let x: Vec<f32> = (0..4 * d)
            .map(|i| (i as f32 * 0.61).cos() * 9.0 - 1.0)
            .collect();
        let mut out = vec![0f32; 2 * d];
        silu_and_mul(&x, &mut out, d).unwrap();
        for t in 0..2 {
            for j in 0..d {
                let g = x[t * 2 * d + j] as f64;
                let u = x[t * 2 * d + d + j] as f64;
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((out[t * d + j] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
            }
        }
        let xb: Vec<Bf16> = x.iter().map(|&v| Bf16::from_f32(v)).collect();
        let mut ob = vec![Bf16(0); 2 * d];
        silu_and_mul(&xb, &mut ob, d).unwrap();
        assert!((ob[3].to_f32() - out[3]).abs() < 0.02 * (1.0 + out[3].abs()));
        assert!(silu_and_mul(&x, &mut out[..3], d).is_err());
    }

    #[test]
    fn threads_do_not_change_the_rows() {
        let (rows, d) = (300, 256);
        let x: Vec<f32> = (0..rows * 2 * d)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07)
            .collect();
        let (mut one, mut three) = (vec![0f32; rows * d], vec![0f32; rows * d]);
        silu_and_mul(&x, &mut one, d).unwrap();
        silu_and_mul_threads(&x, &mut three, d, 3).unwrap();
        assert_eq!(one, three);
        let h = &x[..rows * d];
        let w: Vec<f32> = (0..d).map(|i| 0.5 + i as f32 * 0.01).collect();
        let (mut r1, mut r3) = (vec![0.25f32; rows * d], vec![0.25f32; rows * d]);
        let (mut o1, mut o3) = (vec![0f32; rows * d], vec![0f32; rows * d]);
        rms_norm(h, Some(&mut r1), &w, &mut o1, d, 1e-6, false).unwrap();
        rms_norm_threads(h, Some(&mut r3), &w, &mut o3, d, 1e-6, false, 3).unwrap();
        assert_eq!((&r1, &o1), (&r3, &o3));
        rms_norm(h, None, &w, &mut o1, d, 1e-6, true).unwrap();
        rms_norm_threads(h, None, &w, &mut o3, d, 1e-6, true, 3).unwrap();
        assert_eq!(o1, o3);
        assert!(silu_and_mul_threads(&x, &mut one[..d], d, 3).is_err());
    }
}
