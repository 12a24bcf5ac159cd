//! Packed GGUF weights ([`crate::quant_packed`]) times activations held as int16 per 32
//! values, on CPUs with AVX-512 VNNI (`vpdpwssd`).
//!
//! The int8 activations of llama.cpp (and of the AVX2 path here) round every value to one of
//! 255 steps of its block's largest: products drift from the float ones by ~0.5%, and a
//! 135M-parameter model's greedy answers change with it (the default model answers "What is
//! the capital of France?" with a loop of "la France"). int16 rounds to 65,535 steps: the
//! products match the dequantized float ones to ~1e-5, like the fp32 path, at twice the
//! integer work of int8, which a decode step hides behind its memory traffic (it streams
//! every weight once). A block's offset term `m * sum(x)` uses the exact float sum.

use crate::quant_packed::{packed_blocks, PackedRef};

/// The activations as int16 per 32 values, in the order the packed weights need.
pub(crate) struct WideActs {
    /// `[b, blocks * 32]`: 4-bit layout: per pair of blocks A, B the values
    /// `A0..15, B0..15, A16..31, B16..31`; 8-bit: in order.
    q: Vec<i16>,
    /// `[b, blocks]`: each block's scale (`x ~ dx * q`).
    dx: Vec<f32>,
    /// `[b, blocks]`: each block's sum of its float values.
    sx: Vec<f32>,
}

impl WideActs {
    pub(crate) fn new(x: &[f32], b: usize, k: usize, bits: u8) -> WideActs {
        let nbp = packed_blocks(k);
        let kp = nbp * 32;
        let mut a = WideActs {
            q: vec![0; b * kp],
            dx: vec![0.0; b * nbp],
            sx: vec![0.0; b * nbp],
        };
        let mut block = [0i16; 32];
        for i in 0..b {
            let xs = &x[i * k..(i + 1) * k];
            for blk in 0..nbp {
                let lo = blk * 32;
                let vals = if lo < k {
                    &xs[lo..(lo + 32).min(k)]
                } else {
                    &[][..]
                };
                let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 32767.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                block.fill(0);
                for (q, &v) in block.iter_mut().zip(vals) {
                    *q = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
                }
                a.dx[i * nbp + blk] = d;
                a.sx[i * nbp + blk] = vals.iter().sum();
                let row = &mut a.q[i * kp..(i + 1) * kp];
                if bits == 8 {
                    row[lo..lo + 32].copy_from_slice(&block);
                } else {
                    let (pair, second) = (blk / 2, blk % 2);
                    let base = pair * 64 + 16 * second;
                    row[base..base + 16].copy_from_slice(&block[..16]);
                    row[base + 32..base + 48].copy_from_slice(&block[16..]);
                }
            }
        }
        a
    }
}

/// Rows `range` of `w` times the `b` activation rows of `a`, into `out[i * ldo + row]`.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL/VNNI and F16C; `out` holds `[b, ldo]` values with
/// `range.end <= ldo`, and no one else reads or writes these rows' columns meanwhile; `a` was
/// made for `w`'s `k` and `bits`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows_vnni(
    w: &PackedRef<'_>,
    a: &WideActs,
    b: usize,
    range: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    use crate::quant_packed::ScalesRef;
    // SAFETY (both arms): the caller's contract.
    match w.scales {
        ScalesRef::F32 { d, m } => unsafe { x86::rows(w, d, m, a, b, range, out, ldo) },
        ScalesRef::F16 { d, m } => unsafe { x86::rows(w, d, m, a, b, range, out, ldo) },
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::WideActs;
    use crate::quant_packed::x86::Load;
    use crate::quant_packed::{packed_blocks, packed_row_bytes, PackedRef};

    /// Software prefetch of the rows a few groups ahead, spread over the steps of a group:
    /// a decode step streams every weight from memory once, and the hardware prefetcher
    /// alone leaves the memory bus idle between the kernel's bursts.
    struct Ahead {
        data: *const u8,
        data_bytes: usize,
        d: *const u8,
        m: *const u8,
        scale_bytes: usize,
    }

    /// Rows ahead of the current group whose weights are prefetched.
    const AHEAD_ROWS: usize = 32;

    impl Ahead {
        #[inline(always)]
        unsafe fn new<S: Load>(
            w: &PackedRef<'_>,
            ds: &[S],
            ms: &[S],
            row: usize,
            r: usize,
        ) -> Ahead {
            let nbp = packed_blocks(w.k);
            let rb = packed_row_bytes(w.bits, w.k);
            let first = (row + r + AHEAD_ROWS).min(w.n);
            let last = (first + r).min(w.n);
            let sz = std::mem::size_of::<S>();
            Ahead {
                data: w.data.as_ptr().add(first * rb),
                data_bytes: (last - first) * rb,
                d: ds.as_ptr().add(first * nbp).cast(),
                m: ms.as_ptr().add(first * nbp).cast(),
                scale_bytes: (last - first) * nbp * sz,
            }
        }

        /// Step `p` of `steps`: its share of the lines.
        #[inline(always)]
        unsafe fn step(&self, p: usize, steps: usize) {
            let lines = self.data_bytes.div_ceil(64);
            let per = lines.div_ceil(steps.max(1));
            for l in p * per..((p + 1) * per).min(lines) {
                _mm_prefetch::<_MM_HINT_T0>(self.data.add(l * 64).cast());
            }
            if p == 0 {
                let mut off = 0;
                while off < self.scale_bytes {
                    _mm_prefetch::<_MM_HINT_T0>(self.d.add(off).cast());
                    _mm_prefetch::<_MM_HINT_T0>(self.m.add(off).cast());
                    off += 64;
                }
            }
        }
    }

    /// Weight rows four at a time, activation rows two at a time (as the int8 kernel).
    ///
    /// # Safety
    /// As `super::rows_vnni`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        a: &WideActs,
        b: usize,
        range: std::ops::Range<usize>,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut row = range.start;
        while row < range.end {
            let rows = (range.end - row).min(4);
            let mut i = 0;
            while i < b {
                let acts = (b - i).min(2);
                // SAFETY: rows and activation rows in range; the caller's contract.
                unsafe {
                    match (rows, acts) {
                        (4, 2) => group::<S, 4, 2>(w, ds, ms, a, row, i, out, ldo),
                        (4, _) => group::<S, 4, 1>(w, ds, ms, a, row, i, out, ldo),
                        (_, 2) => group::<S, 1, 2>(w, ds, ms, a, row, i, out, ldo),
                        (_, _) => group::<S, 1, 1>(w, ds, ms, a, row, i, out, ldo),
                    }
                }
                i += acts;
            }
            row += if rows == 4 { 4 } else { 1 };
        }
    }

    /// Rows `row..row + R` times activation rows `act..act + N`: per pair of blocks (64
    /// weights), 16 i32 lanes, 8 per block.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn group<S: Load, const R: usize, const N: usize>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        a: &WideActs,
        row: usize,
        act: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let nbp = packed_blocks(w.k);
        let rb = packed_row_bytes(w.bits, w.k);
        let kp = nbp * 32;
        let (data, dp, mp) = (w.data.as_ptr(), ds.as_ptr(), ms.as_ptr());
        let (xq, xdx, xsx) = (a.q.as_ptr(), a.dx.as_ptr(), a.sx.as_ptr());
        let low = _mm256_set1_epi8(0x0f);
        // 2 scales -> lanes [s0 x8, s1 x8]
        let two = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        // The 8-bit layout's two blocks' 16 lanes each, folded to 8 lanes each.
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let eighth = _mm512_set1_ps(0.125);
        let mut acc = [[_mm512_setzero_ps(); R]; N];
        let mut accm = [[_mm512_setzero_ps(); R]; N];
        let ahead = Ahead::new(w, ds, ms, row, R);
        for p in 0..nbp / 2 {
            ahead.step(p, nbp / 2);
            let mut x0 = [_mm512_setzero_si512(); N];
            let mut x1 = [_mm512_setzero_si512(); N];
            let mut dx = [_mm512_setzero_ps(); N];
            let mut sx = [_mm512_setzero_ps(); N];
            for j in 0..N {
                let x = xq.add((act + j) * kp + 64 * p);
                x0[j] = _mm512_loadu_si512(x.cast());
                x1[j] = _mm512_loadu_si512(x.add(32).cast());
                let at = (act + j) * nbp + 2 * p;
                dx[j] = _mm512_permutexvar_ps(two, _mm512_castps128_ps512(f32::load2(xdx.add(at))));
                let s = _mm512_permutexvar_ps(two, _mm512_castps128_ps512(f32::load2(xsx.add(at))));
                // 8 lanes a block: each carries an eighth of the block's sum (exact).
                sx[j] = _mm512_mul_ps(s, eighth);
            }
            for r in 0..R {
                let at = (row + r) * nbp + 2 * p;
                let dd = _mm512_permutexvar_ps(two, _mm512_castps128_ps512(S::load2(dp.add(at))));
                let mm = _mm512_permutexvar_ps(two, _mm512_castps128_ps512(S::load2(mp.add(at))));
                let src = data.add((row + r) * rb + 32 * p * w.bits as usize / 4);
                if w.bits == 4 {
                    // Low nibbles: [A0-15 B0-15], high: [A16-31 B16-31], as the activations.
                    let v = _mm256_loadu_si256(src.cast());
                    let lo = _mm512_cvtepu8_epi16(_mm256_and_si256(v, low));
                    let hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
                    for j in 0..N {
                        let s = _mm512_dpwssd_epi32(
                            _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, x0[j]),
                            hi,
                            x1[j],
                        );
                        let scale = _mm512_mul_ps(dd, dx[j]);
                        acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j][r]);
                        accm[j][r] = _mm512_fmadd_ps(mm, sx[j], accm[j][r]);
                    }
                } else {
                    let w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(src.cast()));
                    let w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(src.add(32).cast()));
                    for j in 0..N {
                        let s0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, x0[j]);
                        let s1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w1, x1[j]);
                        let s = _mm512_add_epi32(
                            _mm512_permutex2var_epi32(s0, even, s1),
                            _mm512_permutex2var_epi32(s0, odd, s1),
                        );
                        let scale = _mm512_mul_ps(dd, dx[j]);
                        acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j][r]);
                        accm[j][r] = _mm512_fmadd_ps(mm, sx[j], accm[j][r]);
                    }
                }
            }
        }
        for j in 0..N {
            for r in 0..R {
                let total = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][r], accm[j][r]));
                // SAFETY: the caller's contract.
                unsafe { *out.add((act + j) * ldo + row + r) = total };
            }
        }
    }
}
