//! Packed GGUF weights ([`crate::quant_packed`]) times activations on CPUs with AVX-512
//! VNNI: held as int16 per 32 values (`vpdpwssd`) for a few activation rows, and as they
//! are (f32) against weight rows dequantized a few at a time for batches (`rows_float`).
//!
//! The int8 activations of llama.cpp (and of the AVX2 path here) round every value to one of
//! 255 steps of its block's largest: products drift from the float ones by ~0.5%, and a
//! 135M-parameter model's greedy answers change with it (the default model answers "What is
//! the capital of France?" with a loop of "la France"). int16 rounds to 65,535 steps: the
//! products match the dequantized float ones to ~1e-5, like the fp32 path, at twice the
//! integer work of int8, which a decode step hides behind its memory traffic (it streams
//! every weight once). A block's offset term `m * sum(x)` uses the exact float sum.

use crate::quant_packed::{for_each_block, packed_blocks, pair_offset, PackedRef};

/// The activations as int16 per 32 values, in the order the packed weights need.
pub(crate) struct WideActs {
    /// `[b, blocks * 32]`: per pair of blocks A, B the values `A0..15, B0..15, A16..31,
    /// B16..31` (the order in which the weights unpack, for either width).
    q: Vec<i16>,
    /// `[b, blocks]`: each block's scale (`x ~ dx * q`).
    dx: Vec<f32>,
    /// `[b, blocks]`: each block's sum of its float values.
    sx: Vec<f32>,
}

impl WideActs {
    pub(crate) fn new(x: &[f32], b: usize, k: usize) -> WideActs {
        let nbp = packed_blocks(k);
        let kp = nbp * 32;
        let mut a = WideActs {
            q: vec![0; b * kp],
            dx: vec![0.0; b * nbp],
            sx: vec![0.0; b * nbp],
        };
        let mut block = [0i16; 32];
        for_each_block(x, b, k, 32767.0, |i, blk, vals, d, inv| {
            block.fill(0);
            for (q, &v) in block.iter_mut().zip(vals) {
                *q = (v * inv).round().clamp(-32767.0, 32767.0) as i16;
            }
            a.dx[i * nbp + blk] = d;
            a.sx[i * nbp + blk] = vals.iter().sum();
            let (row, at) = (&mut a.q[i * kp..(i + 1) * kp], pair_offset(blk));
            row[at..at + 16].copy_from_slice(&block[..16]);
            row[at + 32..at + 48].copy_from_slice(&block[16..]);
        });
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

    /// Weight rows two at a time, activation rows four at a time: each unpacked weight vector
    /// serves four activation rows and each loaded activation vector two weight rows, in
    /// independent accumulators (registers).
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
            let rows = (range.end - row).min(2);
            let mut i = 0;
            while i < b {
                let acts = match b - i {
                    4.. => 4,
                    2 | 3 => 2,
                    _ => 1,
                };
                // SAFETY: rows and activation rows in range; the caller's contract.
                unsafe {
                    match (rows, acts) {
                        (2, 4) => group::<S, 2, 4>(w, ds, ms, a, row, i, out, ldo),
                        (2, 2) => group::<S, 2, 2>(w, ds, ms, a, row, i, out, ldo),
                        (2, _) => group::<S, 2, 1>(w, ds, ms, a, row, i, out, ldo),
                        (_, 4) => group::<S, 1, 4>(w, ds, ms, a, row, i, out, ldo),
                        (_, 2) => group::<S, 1, 2>(w, ds, ms, a, row, i, out, ldo),
                        (_, _) => group::<S, 1, 1>(w, ds, ms, a, row, i, out, ldo),
                    }
                }
                i += acts;
            }
            row += rows;
        }
    }

    /// Rows `row..row + R` times activation rows `act..act + N`: per pair of blocks (64
    /// weights), 16 i32 lanes, 8 per block; the blocks' offsets (`m * sum(x)`) after.
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
        let mut acc = [[_mm512_setzero_ps(); R]; N];
        let ahead = Ahead::new(w, ds, ms, row, R);
        for p in 0..nbp / 2 {
            ahead.step(p, nbp / 2);
            let mut x0 = [_mm512_setzero_si512(); N];
            let mut x1 = [_mm512_setzero_si512(); N];
            let mut dx = [_mm512_setzero_ps(); N];
            for j in 0..N {
                let x = xq.add((act + j) * kp + 64 * p);
                x0[j] = _mm512_loadu_si512(x.cast());
                x1[j] = _mm512_loadu_si512(x.add(32).cast());
                let at = (act + j) * nbp + 2 * p;
                dx[j] = _mm512_permutexvar_ps(two, _mm512_castps128_ps512(f32::load2(xdx.add(at))));
            }
            for r in 0..R {
                let at = (row + r) * nbp + 2 * p;
                let dd = _mm512_permutexvar_ps(two, _mm512_castps128_ps512(S::load2(dp.add(at))));
                // The pair's weights as two vectors of 32 bytes, [A0-15 B0-15] and
                // [A16-31 B16-31], the activations' order.
                let (lo, hi) = if w.bits == 4 {
                    let v = _mm256_loadu_si256(data.add((row + r) * rb + 32 * p).cast());
                    (
                        _mm256_and_si256(v, low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
                    )
                } else {
                    let src = data.add((row + r) * rb + 64 * p);
                    let (va, vb) = (
                        _mm256_loadu_si256(src.cast()),
                        _mm256_loadu_si256(src.add(32).cast()),
                    );
                    (
                        _mm256_permute2x128_si256::<0x20>(va, vb),
                        _mm256_permute2x128_si256::<0x31>(va, vb),
                    )
                };
                let (lo, hi) = (_mm512_cvtepu8_epi16(lo), _mm512_cvtepu8_epi16(hi));
                for j in 0..N {
                    let s = _mm512_dpwssd_epi32(
                        _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, x0[j]),
                        hi,
                        x1[j],
                    );
                    let scale = _mm512_mul_ps(dd, dx[j]);
                    acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j][r]);
                }
            }
        }
        for j in 0..N {
            for r in 0..R {
                let offsets = offset_sum(mp.add((row + r) * nbp), xsx.add((act + j) * nbp), nbp);
                let total = _mm512_reduce_add_ps(acc[j][r]) + offsets;
                // SAFETY: the caller's contract.
                unsafe { *out.add((act + j) * ldo + row + r) = total };
            }
        }
    }

    /// `sum(m[i] * sx[i] for i < n)`: a row's block offsets times an activation row's block
    /// sums, 16 blocks at a time.
    #[inline(always)]
    unsafe fn offset_sum<S: Load>(m: *const S, sx: *const f32, n: usize) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let count = (n - i).min(16);
            let mask: __mmask16 = if count == 16 { !0 } else { (1u16 << count) - 1 };
            let x = _mm512_maskz_loadu_ps(mask, sx.add(i));
            acc = _mm512_fmadd_ps(S::load16(m.add(i), mask), x, acc);
            i += 16;
        }
        _mm512_reduce_add_ps(acc)
    }
}

/// Float rows: for batches, the weights are dequantized a few rows at a time into a small
/// buffer (exact: `d * q + m`) and multiplied with the f32 activations by FMA, each weight
/// vector against four activation rows and each activation vector against four weight rows.
/// The products are the fp32 ones (up to summation order), and per multiply-add this does
/// less port work than `vpdpwssd` plus its per-block scaling once the batch amortizes the
/// dequantization.
///
/// # Safety
/// As `rows_vnni`; `x` holds `[b, k]` f32 values.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows_float(
    w: &PackedRef<'_>,
    x: &[f32],
    b: usize,
    range: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    use crate::quant_packed::ScalesRef;
    // SAFETY (both arms): the caller's contract.
    match w.scales {
        ScalesRef::F32 { d, m } => unsafe { float::rows(w, d, m, x, b, range, out, ldo) },
        ScalesRef::F16 { d, m } => unsafe { float::rows(w, d, m, x, b, range, out, ldo) },
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod float {
    use std::arch::x86_64::*;

    use crate::quant_packed::x86::Load;
    use crate::quant_packed::{packed_blocks, packed_row_bytes, PackedRef};

    /// Weight rows dequantized at a time.
    const R: usize = 4;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        x: &[f32],
        b: usize,
        range: std::ops::Range<usize>,
        out: *mut f32,
        ldo: usize,
    ) {
        let k = w.k;
        let mut buf = vec![0f32; R * k];
        let mut row = range.start;
        while row < range.end {
            let rows = (range.end - row).min(R);
            for r in 0..rows {
                dequantize(w, ds, ms, row + r, &mut buf[r * k..(r + 1) * k]);
            }
            let mut i = 0;
            while i < b {
                let acts = (b - i).min(4);
                // SAFETY: the caller's contract; rows and acts in range.
                unsafe {
                    match (rows, acts) {
                        (4, 4) => tile::<4, 4>(&buf, x, k, row, i, out, ldo),
                        (4, 3) => tile::<4, 3>(&buf, x, k, row, i, out, ldo),
                        (4, 2) => tile::<4, 2>(&buf, x, k, row, i, out, ldo),
                        (4, _) => tile::<4, 1>(&buf, x, k, row, i, out, ldo),
                        (3, _) => tile::<3, 1>(&buf, x, k, row, i, out, ldo),
                        (2, _) => tile::<2, 1>(&buf, x, k, row, i, out, ldo),
                        (_, _) => tile::<1, 1>(&buf, x, k, row, i, out, ldo),
                    }
                }
                // Fewer than 4 weight rows go one activation row at a time.
                i += if rows == 4 { acts } else { 1 };
            }
            row += rows;
        }
    }

    /// Row `row` of `w` as f32 into `dst` (`k` values), 16 at a time.
    #[inline(always)]
    unsafe fn dequantize<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        row: usize,
        dst: &mut [f32],
    ) {
        // SAFETY: the caller's (`row < w.n`); each block's stores stay inside `dst`.
        unsafe {
            dequantized_blocks(w, ds, ms, row, |blk, w0, w1| {
                let out = dst.as_mut_ptr().add(32 * blk);
                _mm512_storeu_ps(out, w0);
                _mm512_storeu_ps(out.add(16), w1);
            })
        }
    }

    /// `f(blk, values 0..16, values 16..32)` for every 32-value block of row `row` of `w`,
    /// dequantized exactly (`d * q + m` in f32; `d * q` is exact).
    ///
    /// # Safety
    /// `row < w.n`, and `w`'s sizes checked; the CPU has AVX-512 F, BW and VL, F16C.
    #[inline(always)]
    pub(crate) unsafe fn dequantized_blocks<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        row: usize,
        mut f: impl FnMut(usize, __m512, __m512),
    ) {
        let nbp = packed_blocks(w.k);
        let rb = packed_row_bytes(w.bits, w.k);
        // SAFETY (the block): the caller's; the loads read the row's bytes of one block.
        unsafe {
            let data = w.data.as_ptr().add(row * rb);
            let low = _mm_set1_epi8(0x0f);
            let blocks = w.k / 32;
            // The scales, 16 blocks at a time, converted by vector instructions (F16C for f16
            // ones) rather than one by one.
            let (mut dv, mut mv) = ([0f32; 16], [0f32; 16]);
            for blk in 0..blocks {
                if blk % 16 == 0 {
                    let mask = (((1u32 << (blocks - blk).min(16)) - 1) & 0xffff) as __mmask16;
                    let at = row * nbp + blk;
                    _mm512_storeu_ps(dv.as_mut_ptr(), S::load16(ds.as_ptr().add(at), mask));
                    _mm512_storeu_ps(mv.as_mut_ptr(), S::load16(ms.as_ptr().add(at), mask));
                }
                let d = _mm512_set1_ps(dv[blk % 16]);
                let m = _mm512_set1_ps(mv[blk % 16]);
                let (q0, q1) = if w.bits == 4 {
                    // Element j < 16 in the low nibble of byte j, j + 16 in the high one.
                    let v = _mm_loadu_si128(data.add(16 * blk).cast());
                    (
                        _mm_and_si128(v, low),
                        _mm_and_si128(_mm_srli_epi16::<4>(v), low),
                    )
                } else {
                    let p = data.add(32 * blk);
                    (_mm_loadu_si128(p.cast()), _mm_loadu_si128(p.add(16).cast()))
                };
                let w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q0)), d, m);
                let w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q1)), d, m);
                f(blk, w0, w1);
            }
        }
    }

    /// `out[act + j][row + r] = buf[r] . x[act + j]` for R2 rows and N activation rows.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const R2: usize, const N: usize>(
        buf: &[f32],
        x: &[f32],
        k: usize,
        row: usize,
        act: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); N]; R2];
        let (wp, xp) = (buf.as_ptr(), x.as_ptr());
        for c in (0..k).step_by(16) {
            let mut xv = [_mm512_setzero_ps(); N];
            for j in 0..N {
                xv[j] = _mm512_loadu_ps(xp.add((act + j) * k + c));
            }
            for r in 0..R2 {
                let wv = _mm512_loadu_ps(wp.add(r * k + c));
                for j in 0..N {
                    acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
                }
            }
        }
        for r in 0..R2 {
            for j in 0..N {
                *out.add((act + j) * ldo + row + r) = _mm512_reduce_add_ps(acc[r][j]);
            }
        }
    }
}
