//! Matrix products with GGUF-quantized weights, read in their shipped block formats.
//!
//! A weight matrix `[n, k]` is `n` rows of `k / block_elems` blocks each (llama.cpp's layout:
//! blocks run along the input dimension). Formats: Q4_0, Q4_1, Q8_0 (32 weights a block) and
//! the K-quants Q4_K, Q6_K (256 a block), dequantized exactly as llama.cpp's reference code
//! does (`dequantize_row_*`), in f32.
//!
//! [`matmul`] computes `out[b, n] = sum_k x[b, k] * w[n, k]` for a few activation rows: each
//! block is unpacked once into registers and multiplied into every row of `x`, so the weights
//! are read once per call in their compressed size (4.5 to 8.5 bits a weight instead of 16 or
//! 32). [`dequantize`] unpacks whole rows, for callers that multiply many activation rows with
//! a BLAS matmul instead.

use rayon::prelude::*;

use crate::math::LANES;
use crate::pool::pool;
use crate::KernelError;

/// A GGUF block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl QType {
    /// The format of a GGUF type name ("Q4_0", "Q4_K", ...).
    pub fn from_name(name: &str) -> Option<QType> {
        Some(match name {
            "Q4_0" => QType::Q4_0,
            "Q4_1" => QType::Q4_1,
            "Q8_0" => QType::Q8_0,
            "Q4_K" => QType::Q4K,
            "Q6_K" => QType::Q6K,
            _ => return None,
        })
    }

    /// Weights per block.
    pub fn block_elems(self) -> usize {
        match self {
            QType::Q4_0 | QType::Q4_1 | QType::Q8_0 => 32,
            QType::Q4K | QType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q6K => 210,
        }
    }

    /// Bytes of one row of `k` weights (`k` a multiple of the block size).
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_elems() * self.block_bytes()
    }
}

/// IEEE half-precision bits to f32 (exact: every f16 is an f32).
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    let bits = if exp == 0 {
        if man == 0 {
            sign
        } else {
            // Subnormal: value = man * 2^-24, exact in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
    } else if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

#[inline(always)]
fn half(src: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([src[at], src[at + 1]]))
}

/// One block's weights into `dst` (`block_elems` of them), as llama.cpp computes them.
#[inline(always)]
fn dequant_block(qt: QType, src: &[u8], dst: &mut [f32]) {
    match qt {
        QType::Q4_0 => {
            let d = half(src, 0);
            let qs = &src[2..18];
            for j in 0..16 {
                dst[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                dst[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        QType::Q4_1 => {
            let d = half(src, 0);
            let m = half(src, 2);
            let qs = &src[4..20];
            for j in 0..16 {
                dst[j] = (qs[j] & 0x0f) as f32 * d + m;
                dst[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        QType::Q8_0 => {
            let d = half(src, 0);
            for j in 0..32 {
                dst[j] = (src[2 + j] as i8) as f32 * d;
            }
        }
        QType::Q4K => {
            let d = half(src, 0);
            let dmin = half(src, 2);
            let scales = &src[4..16];
            let qs = &src[16..144];
            for (g, chunk) in dst.chunks_exact_mut(64).enumerate() {
                let (sc1, m1) = scale_min_k4(2 * g, scales);
                let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
                let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * g..32 * g + 32];
                for l in 0..32 {
                    chunk[l] = d1 * (q[l] & 0x0f) as f32 - mm1;
                    chunk[l + 32] = d2 * (q[l] >> 4) as f32 - mm2;
                }
            }
        }
        QType::Q6K => {
            let ql = &src[0..128];
            let qh = &src[128..192];
            let sc = &src[192..208];
            let d = half(src, 208);
            for (h, chunk) in dst.chunks_exact_mut(128).enumerate() {
                let ql = &ql[64 * h..64 * h + 64];
                let qh = &qh[32 * h..32 * h + 32];
                let sc = &sc[8 * h..8 * h + 8];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    chunk[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    chunk[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    chunk[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    chunk[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K block (llama.cpp's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

pub(crate) fn check(qt: QType, w: &[u8], n: usize, k: usize) -> Result<(), KernelError> {
    if !k.is_multiple_of(qt.block_elems()) {
        return Err(KernelError(format!(
            "{qt:?} rows hold {} weights a block; k={k} is not a multiple",
            qt.block_elems()
        )));
    }
    if w.len() != n * qt.row_bytes(k) {
        return Err(KernelError(format!(
            "{qt:?} weights of shape [{n}, {k}] take {} bytes, got {}",
            n * qt.row_bytes(k),
            w.len()
        )));
    }
    Ok(())
}

/// Rows `[n, k]` of quantized weights as f32 `out` (`n * k`), on `threads` threads.
pub fn dequantize(
    qt: QType,
    w: &[u8],
    n: usize,
    k: usize,
    out: &mut [f32],
    threads: usize,
) -> Result<(), KernelError> {
    check(qt, w, n, k)?;
    if out.len() != n * k {
        return Err(KernelError(format!(
            "out holds {} values, not {}",
            out.len(),
            n * k
        )));
    }
    if n == 0 || k == 0 {
        return Ok(());
    }
    let rb = qt.row_bytes(k);
    let be = qt.block_elems();
    let bb = qt.block_bytes();
    let run = |(row, dst): (usize, &mut [f32])| {
        let src = &w[row * rb..(row + 1) * rb];
        for (blk, d) in dst.chunks_exact_mut(be).enumerate() {
            dequant_block(qt, &src[blk * bb..(blk + 1) * bb], d);
        }
    };
    if threads > 1 && n * k >= PARALLEL_MIN_WEIGHTS {
        pool(threads).install(|| out.par_chunks_mut(k).enumerate().for_each(run));
    } else {
        out.chunks_mut(k).enumerate().for_each(run);
    }
    Ok(())
}

/// Below this many weights a call runs on the calling thread (a pool's wake-up costs more).
const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;

/// `out[i * ldo + j] = sum_k x[i * k + kk] * w[j, kk]` for the `b` rows of `x` (`[b, k]`) and
/// the `n` rows of `w`; `out` is `[b, ldo]` with the result in its first `n` columns (the
/// caller passes the slice that starts at its column offset: `ldo >= n`).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    qt: QType,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    b: usize,
    out: &mut [f32],
    ldo: usize,
    threads: usize,
) -> Result<(), KernelError> {
    check(qt, w, n, k)?;
    if x.len() != b * k {
        return Err(KernelError(format!(
            "x holds {} values, not {b} x {k}",
            x.len()
        )));
    }
    if ldo < n || (b > 0 && out.len() < (b - 1) * ldo + n) {
        return Err(KernelError(format!(
            "out ({} values, row stride {ldo}) cannot hold {b} x {n}",
            out.len()
        )));
    }
    if b == 0 || n == 0 {
        return Ok(());
    }
    let out_ptr = SendPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let q8 = (matches!(qt, QType::Q4_0 | QType::Q4_1 | QType::Q8_0) && has_avx2_fma())
        .then(|| Q8Rows::quantize(x, b, k));
    #[cfg(not(target_arch = "x86_64"))]
    let q8: Option<Q8Rows> = None;
    let rows = |range: std::ops::Range<usize>| {
        // SAFETY: each task writes the columns of its own rows of `w` only, disjoint from the
        // others', inside `out` (bounds checked above); the CPU has AVX2 when q8 is Some.
        unsafe {
            match &q8 {
                #[cfg(target_arch = "x86_64")]
                Some(q8) => int8::matmul_rows(qt, w, k, q8, range, out_ptr, ldo),
                _ => matmul_rows(qt, w, k, x, b, range, out_ptr, ldo),
            }
        }
    };
    let chunk = rows_per_task(n, k, b);
    if threads > 1 && n * k >= PARALLEL_MIN_WEIGHTS && n > chunk {
        let tasks: Vec<usize> = (0..n).step_by(chunk).collect();
        pool(threads).install(|| {
            tasks
                .par_iter()
                .for_each(|&start| rows(start..(start + chunk).min(n)))
        });
    } else {
        rows(0..n);
    }
    Ok(())
}

/// Rows of `w` a task takes: enough work per task to pay for its scheduling, small enough
/// that the threads share the rows evenly.
fn rows_per_task(n: usize, k: usize, b: usize) -> usize {
    let per_row = k * b.max(1);
    (4096 * 32 / per_row.max(1)).clamp(4, 256).min(n.max(1))
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint elements (see `matmul`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Rows `range` of the product, each block unpacked once and applied to every row of `x`.
///
/// # Safety
/// `w` is checked for `qt`, `range.end` rows and `k`; `out` must hold `[b, ldo]` values with
/// `range.end <= ldo`, written by no one else in these columns.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_rows(
    qt: QType,
    w: &[u8],
    k: usize,
    x: &[f32],
    b: usize,
    range: std::ops::Range<usize>,
    out: SendPtr,
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU has the features; the contract is the caller's.
            return unsafe { matmul_rows_avx2(qt, w, k, x, b, range, out, ldo) };
        }
    }
    // SAFETY: the contract is the caller's.
    unsafe { matmul_rows_generic(qt, w, k, x, b, range, out, ldo) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_rows_avx2(
    qt: QType,
    w: &[u8],
    k: usize,
    x: &[f32],
    b: usize,
    range: std::ops::Range<usize>,
    out: SendPtr,
    ldo: usize,
) {
    // SAFETY: the contract is the caller's.
    unsafe { matmul_rows_generic(qt, w, k, x, b, range, out, ldo) }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_rows_generic(
    qt: QType,
    w: &[u8],
    k: usize,
    x: &[f32],
    b: usize,
    range: std::ops::Range<usize>,
    out: SendPtr,
    ldo: usize,
) {
    let be = qt.block_elems();
    let bb = qt.block_bytes();
    let rb = qt.row_bytes(k);
    let mut block = [0f32; 256];
    let mut acc = vec![[0f32; LANES]; b];
    for row in range {
        acc.iter_mut().for_each(|a| *a = [0f32; LANES]);
        let src = &w[row * rb..(row + 1) * rb];
        for blk in 0..k / be {
            let wb = &mut block[..be];
            dequant_block(qt, &src[blk * bb..(blk + 1) * bb], wb);
            let base = blk * be;
            for (i, a) in acc.iter_mut().enumerate() {
                let xs = &x[i * k + base..i * k + base + be];
                for (wc, xc) in wb.chunks_exact(LANES).zip(xs.chunks_exact(LANES)) {
                    for l in 0..LANES {
                        a[l] = wc[l].mul_add(xc[l], a[l]);
                    }
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: i < b and row < ldo: inside `out`, in this task's columns.
            unsafe { *out.0.add(i * ldo + row) = a.iter().sum() };
        }
    }
}

/// Activation rows quantized to int8 in blocks of 32 (llama.cpp's Q8_0 of the activations,
/// with each block's sum kept for the formats whose weights carry an offset): the weights of
/// the 32-blocks formats are multiplied with them in integer arithmetic.
pub struct Q8Rows {
    k: usize,
    q: Vec<i8>,
    /// per block: the scale d (x ~ d * q)
    d: Vec<f32>,
    /// per block: d * sum(q), the block's sum as the int8 values give it
    s: Vec<f32>,
    /// per block: sum(q)
    isum: Vec<i32>,
}

impl Q8Rows {
    fn quantize(x: &[f32], b: usize, k: usize) -> Q8Rows {
        let blocks = b * k / 32;
        let mut r = Q8Rows {
            k,
            q: vec![0; b * k],
            d: vec![0.0; blocks],
            s: vec![0.0; blocks],
            isum: vec![0; blocks],
        };
        for (i, (xs, qs)) in x.chunks_exact(32).zip(r.q.chunks_exact_mut(32)).enumerate() {
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, &v) in qs.iter_mut().zip(xs) {
                let qi = (v * inv).round() as i32;
                *q = qi as i8;
                sum += qi;
            }
            r.d[i] = d;
            r.isum[i] = sum;
            r.s[i] = d * sum as f32;
        }
        r
    }

    fn rows(&self) -> usize {
        self.q.len() / self.k.max(1)
    }
}

#[cfg(target_arch = "x86_64")]
mod int8 {
    use std::arch::x86_64::*;

    use super::{Q8Rows, QType, SendPtr};

    /// The f16 at `src[at..at + 2]` as f32, with the F16C instruction.
    #[inline(always)]
    unsafe fn f16c(src: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([src[at], src[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Rows `range` of the product of 32-block weights with int8 activation rows.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `out` as in `super::matmul_rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn matmul_rows(
        qt: QType,
        w: &[u8],
        k: usize,
        x: &Q8Rows,
        range: std::ops::Range<usize>,
        out: SendPtr,
        ldo: usize,
    ) {
        let b = x.rows();
        let nb = k / 32;
        let bb = qt.block_bytes();
        let rb = nb * bb;
        let mut acc = vec![_mm256_setzero_ps(); b];
        let mut offset = vec![0f32; b];
        let low = _mm_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        for row in range {
            acc.iter_mut().for_each(|a| *a = _mm256_setzero_ps());
            offset.iter_mut().for_each(|o| *o = 0.0);
            let src = &w[row * rb..(row + 1) * rb];
            for blk in 0..nb {
                let p = &src[blk * bb..(blk + 1) * bb];
                let d = f16c(p, 0);
                // The block's weights as 32 bytes (u8 for the 4-bit formats, i8 for Q8_0).
                let (wv, m) = match qt {
                    QType::Q8_0 => (_mm256_loadu_si256(p[2..].as_ptr().cast()), 0.0),
                    _ => {
                        let at = if qt == QType::Q4_1 { 4 } else { 2 };
                        let qs = _mm_loadu_si128(p[at..].as_ptr().cast());
                        let lo = _mm_and_si128(qs, low);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), low);
                        let m = if qt == QType::Q4_1 { f16c(p, 2) } else { 0.0 };
                        (_mm256_set_m128i(hi, lo), m)
                    }
                };
                let wabs = if qt == QType::Q8_0 {
                    _mm256_sign_epi8(wv, wv)
                } else {
                    wv
                };
                for i in 0..b {
                    let xb = i * nb + blk;
                    let xq = _mm256_loadu_si256(x.q[xb * 32..].as_ptr().cast());
                    // maddubs multiplies unsigned by signed bytes: Q8_0 moves its signs onto x.
                    let xs = if qt == QType::Q8_0 {
                        _mm256_sign_epi8(xq, wv)
                    } else {
                        xq
                    };
                    let pairs = _mm256_maddubs_epi16(wabs, xs);
                    let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    let dx = x.d[xb];
                    acc[i] = _mm256_fmadd_ps(sums, _mm256_set1_ps(d * dx), acc[i]);
                    match qt {
                        // w = d (q - 8): minus 8 d dx sum(xq)
                        QType::Q4_0 => offset[i] -= 8.0 * d * dx * x.isum[xb] as f32,
                        // w = d q + m: plus m dx sum(xq)
                        QType::Q4_1 => offset[i] += m * x.s[xb],
                        _ => {}
                    }
                }
            }
            for i in 0..b {
                let v = acc[i];
                let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
                // SAFETY: i < b, row < ldo (the caller's contract).
                unsafe { *out.0.add(i * ldo + row) = _mm_cvtss_f32(s1) + offset[i] };
            }
        }
    }
}

/// Test data shared by the quant modules' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::QType;

    pub fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    /// Random blocks whose f16 scales are sane (|d| < 1, no NaN / inf).
    pub fn random_blocks(qt: QType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut w: Vec<u8> = (0..n * qt.row_bytes(k))
            .map(|_| lcg(&mut s) as u8)
            .collect();
        let halves: &[usize] = match qt {
            QType::Q4_0 | QType::Q8_0 => &[0],
            QType::Q4_1 | QType::Q4K => &[0, 2],
            QType::Q6K => &[208],
        };
        for blk in w.chunks_exact_mut(qt.block_bytes()) {
            for &at in halves {
                // exponent 10..13 (2^-5 .. 2^-2), random sign and mantissa
                let h: u16 =
                    ((lcg(&mut s) as u16) & 0x83ff) | ((10 + (lcg(&mut s) % 4) as u16) << 10);
                blk[at..at + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{lcg, random_blocks};
    use super::*;

    const ALL: [QType; 5] = [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q6K,
    ];

    #[test]
    fn f16_conversion() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn q4_1_block_by_hand() {
        // d = 0.5, m = -1: w = 0.5 q - 1; qs[j] = (j + 1) << 4 | j
        let mut blk = vec![0u8; 20];
        blk[0..2].copy_from_slice(&0x3800u16.to_le_bytes());
        blk[2..4].copy_from_slice(&0xbc00u16.to_le_bytes());
        for j in 0..16 {
            blk[4 + j] = (((j + 1) % 16) << 4 | j) as u8;
        }
        let mut out = vec![0f32; 32];
        dequantize(QType::Q4_1, &blk, 1, 32, &mut out, 1).unwrap();
        for j in 0..16 {
            assert_eq!(out[j], 0.5 * j as f32 - 1.0);
            assert_eq!(out[j + 16], 0.5 * ((j + 1) % 16) as f32 - 1.0);
        }
    }

    #[test]
    fn matmul_matches_dequantized_product() {
        for qt in ALL {
            for &(n, k, b) in &[(1, 256, 1), (37, 512, 3), (300, 768, 2)] {
                let w = random_blocks(qt, n, k, 7);
                let mut wf = vec![0f32; n * k];
                dequantize(qt, &w, n, k, &mut wf, 2).unwrap();
                let mut s = 11u64;
                let x: Vec<f32> = (0..b * k)
                    .map(|_| (lcg(&mut s) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let ldo = n + 5;
                let mut out = vec![f32::NAN; b * ldo];
                for threads in [1, 2] {
                    matmul(qt, &w, n, k, &x, b, &mut out, ldo, threads).unwrap();
                    for i in 0..b {
                        for j in 0..n {
                            let want: f64 = (0..k)
                                .map(|kk| x[i * k + kk] as f64 * wf[j * k + kk] as f64)
                                .sum();
                            // The 32-block formats take x rounded to int8 per block (at most
                            // amax / 254 off per value); the K-quants take x as it is.
                            let rounding: f64 = if qt.block_elems() == 32 {
                                (0..k / 32)
                                    .map(|blk| {
                                        let r = i * k + 32 * blk..i * k + 32 * blk + 32;
                                        let amax = x[r].iter().fold(0f32, |m, v| m.max(v.abs()));
                                        let wsum: f32 = wf[j * k + 32 * blk..j * k + 32 * blk + 32]
                                            .iter()
                                            .map(|v| v.abs())
                                            .sum();
                                        (amax / 254.0 * wsum) as f64
                                    })
                                    .sum()
                            } else {
                                0.0
                            };
                            let got = out[i * ldo + j] as f64;
                            assert!(
                                (got - want).abs() <= rounding + 1e-4 * (1.0 + want.abs()),
                                "{qt:?} [{i},{j}]: {got} vs {want} (rounding {rounding})"
                            );
                        }
                        assert!(out[i * ldo + n].is_nan(), "wrote past its columns");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = random_blocks(QType::Q4_0, 2, 64, 1);
        let mut out = vec![0f32; 4];
        assert!(matmul(QType::Q4_0, &w, 2, 48, &[0.0; 48], 1, &mut out, 2, 1).is_err());
        assert!(matmul(QType::Q4_0, &w, 3, 64, &[0.0; 64], 1, &mut out, 3, 1).is_err());
        assert!(matmul(QType::Q4_0, &w, 2, 64, &[0.0; 64], 1, &mut out, 1, 1).is_err());
        assert!(matmul(QType::Q4_0, &w, 2, 64, &[0.0; 64], 3, &mut out, 2, 1).is_err());
        assert_eq!(QType::from_name("Q5_K"), None);
    }
}
