//! GGUF weights repacked once at load for a fast matmul with integer activations.
//!
//! [`pack`] turns a `[n, k]` matrix of GGUF blocks into [`Packed`]: per row, the 32-weight
//! blocks' quants laid out for wide loads (4-bit: the two blocks of a pair side by side in 32
//! bytes; 8-bit: each block's 32 bytes, offset to unsigned), and each block's scale `d` and
//! offset `m` ([`Scales`]: `w = d * q + m` for every format that fits: Q4_0, Q4_1, Q8_0 and
//! Q4_K, whose 32-weight sub-blocks have a scale and a min of their own). The weights are the
//! same numbers as the GGUF blocks' (`dequantize` of either gives the same f32 values).
//!
//! [`matmul`] takes the activations as integers per 32 values and multiplies in integer
//! arithmetic: int16 with AVX-512 VNNI (`vpdpwssd`, `quant_wide`) where the CPU has
//! it, else int8 (llama.cpp's Q8 of the activations) with AVX2 (`vpmaddubsw`), else plain
//! Rust. A decode step streams every weight once: the kernels prefetch ahead of their rows.

use rayon::prelude::*;

use crate::pool::pool;
#[cfg(test)]
use crate::quant::dequantize as dequantize_blocks;
use crate::quant::QType;
use crate::quant_wide::WideActs;
use crate::KernelError;

/// Weights per block of the packed layout.
pub const BLOCK: usize = 32;

/// Packed weights: `bits` 4 or 8; `data` `[n, row_bytes]`; the scales `[n, blocks]` where
/// `blocks` is `k / 32` rounded up to even (a padding block has d = m = 0).
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub bits: u8,
    pub n: usize,
    pub k: usize,
    pub data: Vec<u8>,
    pub scales: Scales,
}

/// Each block's scale `d` and offset `m` (`w = d * q + m`): as f16 bits when every value of
/// the matrix is exact in f16 (Q4_0, Q4_1 and Q8_0, whose GGUF blocks hold f16 scales), else
/// f32 (Q4_K's products of a scale and a sub-block scale). A decode step streams every weight
/// from memory once: f16 scales make a 4-bit weight 0.625 bytes instead of 0.75.
#[derive(Debug, Clone, PartialEq)]
pub enum Scales {
    F32 { d: Vec<f32>, m: Vec<f32> },
    F16 { d: Vec<u16>, m: Vec<u16> },
}

/// Borrowed [`Scales`] (the arrays may live in numpy).
#[derive(Clone, Copy, Debug)]
pub enum ScalesRef<'a> {
    F32 { d: &'a [f32], m: &'a [f32] },
    F16 { d: &'a [u16], m: &'a [u16] },
}

impl Scales {
    /// f16 when every value round-trips exactly, else f32.
    fn compact(d: Vec<f32>, m: Vec<f32>) -> Scales {
        let half = |v: &[f32]| {
            v.iter()
                .map(|&x| f16_exact(x))
                .collect::<Option<Vec<u16>>>()
        };
        match (half(&d), half(&m)) {
            (Some(d), Some(m)) => Scales::F16 { d, m },
            _ => Scales::F32 { d, m },
        }
    }
}

impl ScalesRef<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            ScalesRef::F32 { d, m } => (d.len(), m.len()),
            ScalesRef::F16 { d, m } => (d.len(), m.len()),
        }
    }

    /// (d, m) of block `i`.
    #[inline(always)]
    fn get(&self, i: usize) -> (f32, f32) {
        match self {
            ScalesRef::F32 { d, m } => (d[i], m[i]),
            ScalesRef::F16 { d, m } => (d[i].to_f32(), m[i].to_f32()),
        }
    }
}

/// A scale's storage: f32, or f16 as its bits.
pub trait ScaleElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl ScaleElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl ScaleElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        crate::quant::f16_to_f32(self)
    }
}

/// The f16 bits of `x` when f16 holds it exactly (zeros, normals and subnormals in range).
fn f16_exact(x: f32) -> Option<u16> {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if x == 0.0 {
        return Some(sign);
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let mant = bits & 0x7f_ffff;
    let h = if exp >= 31 {
        return None;
    } else if exp > 0 {
        sign | ((exp as u16) << 10) | (mant >> 13) as u16
    } else if exp >= -10 {
        sign | ((mant | 0x80_0000) >> (14 - exp)) as u16
    } else {
        return None;
    };
    (crate::quant::f16_to_f32(h) == x).then_some(h)
}

/// Blocks per packed row (even: the 4-bit layout works in pairs).
pub fn packed_blocks(k: usize) -> usize {
    k.div_ceil(BLOCK).next_multiple_of(2)
}

/// Bytes per packed row.
pub fn packed_row_bytes(bits: u8, k: usize) -> usize {
    packed_blocks(k) * BLOCK * bits as usize / 8
}

/// Whether `qt` packs (the others stay in their GGUF blocks).
pub fn packs(qt: QType) -> bool {
    matches!(qt, QType::Q4_0 | QType::Q4_1 | QType::Q8_0 | QType::Q4K)
}

/// The packed form of GGUF blocks `w` (`[n, k]` weights of type `qt`).
pub fn pack(qt: QType, w: &[u8], n: usize, k: usize) -> Result<Packed, KernelError> {
    if !packs(qt) {
        return Err(KernelError(format!("{qt:?} has no packed form")));
    }
    if !k.is_multiple_of(qt.block_elems()) || w.len() != n * qt.row_bytes(k) {
        return Err(KernelError(format!(
            "{qt:?} weights of shape [{n}, {k}] need k a multiple of {} and {} bytes, got {}",
            qt.block_elems(),
            n * qt.row_bytes(k),
            w.len()
        )));
    }
    let bits: u8 = if qt == QType::Q8_0 { 8 } else { 4 };
    let nbp = packed_blocks(k);
    let rb = packed_row_bytes(bits, k);
    let mut data_all = vec![0; n * rb];
    let mut d_all = vec![0f32; n * nbp];
    let mut m_all = vec![0f32; n * nbp];
    let src_rb = qt.row_bytes(k);
    for row in 0..n {
        let src = &w[row * src_rb..(row + 1) * src_rb];
        let data = &mut data_all[row * rb..(row + 1) * rb];
        let d = &mut d_all[row * nbp..(row + 1) * nbp];
        let m = &mut m_all[row * nbp..(row + 1) * nbp];
        match qt {
            QType::Q4_0 | QType::Q4_1 => {
                let bb = qt.block_bytes();
                for blk in 0..k / 32 {
                    let b = &src[blk * bb..(blk + 1) * bb];
                    let scale = half(b, 0);
                    d[blk] = scale;
                    let qs_at = if qt == QType::Q4_1 { 4 } else { 2 };
                    // Q4_0: w = d (q - 8) = d q - 8 d.
                    m[blk] = if qt == QType::Q4_1 {
                        half(b, 2)
                    } else {
                        -8.0 * scale
                    };
                    data[blk * 16..blk * 16 + 16].copy_from_slice(&b[qs_at..qs_at + 16]);
                }
            }
            QType::Q8_0 => {
                for blk in 0..k / 32 {
                    let b = &src[blk * 34..(blk + 1) * 34];
                    let scale = half(b, 0);
                    d[blk] = scale;
                    // Stored as q + 128 (unsigned): w = d q = d (q + 128) - 128 d.
                    m[blk] = -128.0 * scale;
                    for j in 0..32 {
                        data[blk * 32 + j] = b[2 + j] ^ 0x80;
                    }
                }
            }
            QType::Q4K => {
                for sb in 0..k / 256 {
                    let b = &src[sb * 144..(sb + 1) * 144];
                    let (dd, dmin) = (half(b, 0), half(b, 2));
                    let scales = &b[4..16];
                    let qs = &b[16..144];
                    for g in 0..4 {
                        let q = &qs[32 * g..32 * g + 32];
                        for (h, shift) in [(0usize, 0u8), (1, 4)] {
                            let blk = sb * 8 + 2 * g + h;
                            let (sc, mn) = crate::quant::scale_min_k4(2 * g + h, scales);
                            d[blk] = dd * sc as f32;
                            m[blk] = -(dmin * mn as f32);
                            // Element l of this sub-block is nibble `shift` of q[l]; the
                            // packed block holds element j in the low nibble of byte j and
                            // element j + 16 in the high one.
                            for j in 0..16 {
                                let lo = (q[j] >> shift) & 0x0f;
                                let hi = (q[j + 16] >> shift) & 0x0f;
                                data[blk * 16 + j] = lo | (hi << 4);
                            }
                        }
                    }
                }
            }
            QType::Q6K => unreachable!("checked by packs()"),
        }
    }
    Ok(Packed {
        bits,
        n,
        k,
        data: data_all,
        scales: Scales::compact(d_all, m_all),
    })
}

#[inline(always)]
fn half(src: &[u8], at: usize) -> f32 {
    crate::quant::f16_to_f32(u16::from_le_bytes([src[at], src[at + 1]]))
}

impl Packed {
    /// The f32 weights `[n, k]`, for checks and for callers that multiply many rows at once.
    pub fn dequantize(&self, out: &mut [f32]) -> Result<(), KernelError> {
        let (n, k) = (self.n, self.k);
        if out.len() != n * k {
            return Err(KernelError(format!(
                "out holds {} values, not {n} x {k}",
                out.len()
            )));
        }
        let w = PackedRef::from(self);
        for (row, dst) in out.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            w.dequantize_row(row, dst);
        }
        Ok(())
    }
}

/// Borrowed packed weights (the arrays may live in numpy).
#[derive(Clone, Copy)]
pub struct PackedRef<'a> {
    pub bits: u8,
    pub n: usize,
    pub k: usize,
    pub data: &'a [u8],
    pub scales: ScalesRef<'a>,
}

impl PackedRef<'_> {
    pub(crate) fn check(&self) -> Result<(), KernelError> {
        let nbp = packed_blocks(self.k);
        if !matches!(self.bits, 4 | 8)
            || self.data.len() != self.n * packed_row_bytes(self.bits, self.k)
            || self.scales.lens() != (self.n * nbp, self.n * nbp)
        {
            return Err(KernelError(format!(
                "packed weights of shape [{}, {}] ({} bits) have the wrong sizes",
                self.n, self.k, self.bits
            )));
        }
        Ok(())
    }
}

impl<'a> From<&'a Packed> for PackedRef<'a> {
    fn from(p: &'a Packed) -> Self {
        PackedRef {
            bits: p.bits,
            n: p.n,
            k: p.k,
            data: &p.data,
            scales: match &p.scales {
                Scales::F32 { d, m } => ScalesRef::F32 { d, m },
                Scales::F16 { d, m } => ScalesRef::F16 { d, m },
            },
        }
    }
}

/// The activations as int8 per 32 values, in the order the packed weights need.
pub(crate) struct Activations {
    /// `[b, blocks * 32]`: 4-bit layout: per pair of blocks A, B the values
    /// `A0..15, B0..15, A16..31, B16..31`; 8-bit: in order.
    q: Vec<i8>,
    /// `[b, blocks * 8]`: per pair (4-bit) or per block (8-bit), the 8 lane scales of the
    /// integer sums: `dx` of the block each lane sums.
    dx: Vec<f32>,
    /// Like `dx`: the block's `dx * sum(q) / (lanes per block)`, so that `m * s` summed over
    /// the lanes adds `m * dx * sum(q)` once.
    s: Vec<f32>,
}

/// Calls `f(row, block, values, d, inv)` for each 32-value block of each of the `b` rows of `x`
/// (`[b, k]`; `k` rounded up to the packed blocks, so the last blocks may be short or empty),
/// with `d` the scale that maps the block's largest magnitude to `steps` and `inv` = 1 / d
/// (0 for an all-zero block): the activations' quantization, shared by their forms.
pub(crate) fn for_each_block(
    x: &[f32],
    b: usize,
    k: usize,
    steps: f32,
    mut f: impl FnMut(usize, usize, &[f32], f32, f32),
) {
    for i in 0..b {
        let xs = &x[i * k..(i + 1) * k];
        for blk in 0..packed_blocks(k) {
            let lo = (blk * 32).min(k);
            let vals = &xs[lo..(lo + 32).min(k)];
            let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / steps;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            f(i, blk, vals, d, inv);
        }
    }
}

/// Where the 4-bit layout puts block `blk`'s values 0..16 in a row of activations (its values
/// 16..32 follow 32 places later): per pair of blocks A, B, `A0..15, B0..15, A16..31, B16..31`.
#[inline]
pub(crate) fn pair_offset(blk: usize) -> usize {
    blk / 2 * 64 + 16 * (blk % 2)
}

impl Activations {
    pub(crate) fn new(x: &[f32], b: usize, k: usize, bits: u8) -> Activations {
        let nbp = packed_blocks(k);
        let kp = nbp * 32;
        let mut a = Activations {
            q: vec![0; b * kp],
            dx: vec![0.0; b * nbp * 4],
            s: vec![0.0; b * nbp * 4],
        };
        let mut block_q = [0i8; 32];
        for_each_block(x, b, k, 127.0, |i, blk, vals, d, inv| {
            let mut sum = 0i32;
            block_q.fill(0);
            for (q, &v) in block_q.iter_mut().zip(vals) {
                let qi = (v * inv).round() as i32;
                *q = qi as i8;
                sum += qi;
            }
            let s = d * sum as f32;
            let qrow = &mut a.q[i * kp..(i + 1) * kp];
            if bits == 8 {
                qrow[blk * 32..blk * 32 + 32].copy_from_slice(&block_q);
                let lanes = &mut a.dx[(i * nbp + blk) * 4..][..4];
                lanes.fill(d);
                // 8 lanes per block in the 8-bit layout (see `dx` of pairs below): the
                // two halves of `dx[.. * 4]` hold blocks 2p and 2p + 1.
                a.s[(i * nbp + blk) * 4..][..4].fill(s / 8.0);
            } else {
                let at = pair_offset(blk);
                qrow[at..at + 16].copy_from_slice(&block_q[..16]);
                qrow[at + 32..at + 48].copy_from_slice(&block_q[16..]);
                let lanes = (i * nbp + blk / 2 * 2) * 4 + 4 * (blk % 2);
                a.dx[lanes..lanes + 4].fill(d);
                a.s[lanes..lanes + 4].fill(s / 4.0);
            }
        });
        a
    }
}

/// Whether batches of activation rows multiply on AMX-BF16 tiles here (`quant_amx`): their
/// cost then grows little with the rows, so a prefill's products are cheaper through
/// [`matmul`] than through dequantized weights and a BLAS product.
pub fn batch_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        Path::detect() == Path::Vnni512 && crate::quant_amx::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i * ldo + j] = sum_k x[i, k] * w[j, k]` (`x` `[b, k]` f32), `ldo >= n`.
pub fn matmul(
    w: PackedRef<'_>,
    x: &[f32],
    b: usize,
    out: &mut [f32],
    ldo: usize,
    threads: usize,
) -> Result<(), KernelError> {
    w.check()?;
    let (n, k) = (w.n, w.k);
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
    let acts = Acts::new(x, b, k, w.bits);
    let out_ptr = OutPtr(out.as_mut_ptr());
    let rows = |range: std::ops::Range<usize>| {
        // SAFETY: tasks write disjoint columns (their rows of w) of `out`, inside its bounds
        // (checked above).
        unsafe { rows_into(&w, &acts, b, range, out_ptr.ptr(), ldo) }
    };
    // NOTE: one chunk of rows per thread; a product of fewer than PARALLEL_MIN_WORK
    // weight-rows runs on the calling thread: waking the pool costs more than it saves (on the
    // default model, 2 threads for every layer made a decode step 25% slower than 1).
    // Whole multiples of 16 rows: a row's result does not depend on the split (the AMX
    // kernel leaves rows outside whole tiles of 16 to the FMA path).
    let chunk = n.div_ceil(threads.max(1)).max(64).next_multiple_of(16);
    if threads > 1 && n * k * b >= PARALLEL_MIN_WORK && n > chunk {
        let starts: Vec<usize> = (0..n).step_by(chunk).collect();
        pool(threads).install(|| starts.par_iter().for_each(|&s| rows(s..(s + chunk).min(n))));
    } else {
        rows(0..n);
    }
    Ok(())
}

/// The activations of a product in the form this CPU's kernel takes: where the CPU has
/// AVX-512 VNNI (`quant_wide`), int16 per 32 values for a few rows and f32 for
/// batches (bf16 tiles where it has AMX, `quant_amx`); else int8.
pub(crate) enum Acts<'x> {
    Narrow(Activations),
    Wide(WideActs),
    /// The f32 activations themselves (`[b, k]`, borrowed), for batches of `FLOAT_MIN_ROWS`
    /// rows and more on AVX-512 CPUs: the weights are dequantized a few rows at a time instead.
    Float(&'x [f32]),
    /// The same batches on CPUs with AMX-BF16 (`quant_amx`): the activations split into bf16
    /// high and low parts for the tiles, and the f32 ones for the rows left over.
    Amx(crate::quant_amx::AmxActs, &'x [f32]),
}

/// Activation rows from which AVX-512 CPUs multiply dequantized weight rows by FMA
/// (`quant_wide::rows_float`): below, the integer kernel's memory traffic hides its work.
const FLOAT_MIN_ROWS: usize = 8;

impl<'x> Acts<'x> {
    pub(crate) fn new(x: &'x [f32], b: usize, k: usize, bits: u8) -> Acts<'x> {
        #[cfg(target_arch = "x86_64")]
        if Path::detect() == Path::Vnni512 {
            if b >= FLOAT_MIN_ROWS {
                let x = &x[..b * k];
                if k.is_multiple_of(32) && crate::quant_amx::available() {
                    return Acts::Amx(crate::quant_amx::AmxActs::new(x, b, k), x);
                }
                return Acts::Float(x);
            }
            return Acts::Wide(WideActs::new(x, b, k));
        }
        Acts::Narrow(Activations::new(x, b, k, bits))
    }
}

/// Rows `range` of `w` times the activations `a` (`b` rows), into `out[i * ldo + row]`.
///
/// # Safety
/// `out` holds `[b, ldo]` values with `range.end <= ldo`, and no one else reads or writes
/// these rows' columns meanwhile; `a` was made by `Acts::new` for `w`'s `k` and `bits`.
pub(crate) unsafe fn rows_into(
    w: &PackedRef<'_>,
    a: &Acts<'_>,
    b: usize,
    range: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    // SAFETY: the caller's contract; `detect` matches the CPU, and wide activations are made
    // only where it has VNNI.
    match a {
        Acts::Narrow(a) => unsafe { run_rows(Path::detect(), w, a, b, range, OutPtr(out), ldo) },
        #[cfg(target_arch = "x86_64")]
        Acts::Wide(a) => unsafe { crate::quant_wide::rows_vnni(w, a, b, range, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        Acts::Float(x) => unsafe { crate::quant_wide::rows_float(w, x, b, range, out, ldo) },
        // SAFETY: as above; AMX activations are made only where `quant_amx::available()`.
        #[cfg(target_arch = "x86_64")]
        Acts::Amx(a, x) => unsafe { crate::quant_amx::rows(w, a, x, b, range, out, ldo) },
        #[cfg(not(target_arch = "x86_64"))]
        Acts::Wide(_) | Acts::Float(_) | Acts::Amx(..) => {
            unreachable!("wide, float and AMX activations are made for VNNI CPUs only")
        }
    }
}

impl PackedRef<'_> {
    /// Row `row` of the weights as f32 (`out`: `k` values), the same numbers as `dequantize`.
    pub(crate) fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let nbp = packed_blocks(self.k);
        let rb = packed_row_bytes(self.bits, self.k);
        let data = &self.data[row * rb..(row + 1) * rb];
        for (kk, o) in out.iter_mut().enumerate().take(self.k) {
            let (blk, j) = (kk / 32, kk % 32);
            let q = if self.bits == 8 {
                data[kk] as f32
            } else {
                let byte = data[blk * 16 + (j % 16)];
                (if j < 16 { byte & 0x0f } else { byte >> 4 }) as f32
            };
            let (d, m) = self.scales.get(row * nbp + blk);
            *o = q * d + m;
        }
    }
}

/// Weights x activation rows below which a product runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 21;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (see `matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Generic,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Vnni512,
}

impl Path {
    fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if !has!("f16c") {
                return Path::Generic;
            }
            if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("avx512vl") {
                return Path::Vnni512;
            }
            if has!("avx2") && has!("fma") {
                return Path::Avx2;
            }
        }
        Path::Generic
    }
}

/// # Safety
/// `path` matches the CPU; `out` as in `matmul`.
unsafe fn run_rows(
    path: Path,
    w: &PackedRef<'_>,
    a: &Activations,
    b: usize,
    range: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    // SAFETY (each arm): the caller's contract.
    match (path, w.scales) {
        // NOTE: int8 activations run on the AVX2 kernel on VNNI CPUs too (they take int16
        // ones in production: `Acts::new`).
        #[cfg(target_arch = "x86_64")]
        (Path::Avx2 | Path::Vnni512, ScalesRef::F32 { d, m }) => unsafe {
            x86::rows_avx2(w, d, m, a, b, range, out, ldo)
        },
        #[cfg(target_arch = "x86_64")]
        (Path::Avx2 | Path::Vnni512, ScalesRef::F16 { d, m }) => unsafe {
            x86::rows_avx2(w, d, m, a, b, range, out, ldo)
        },
        (Path::Generic, _) => unsafe { rows_generic(w, a, b, range, out, ldo) },
    }
}

/// Plain Rust: the same integer sums, lane layout and all.
unsafe fn rows_generic(
    w: &PackedRef<'_>,
    a: &Activations,
    b: usize,
    range: std::ops::Range<usize>,
    out: OutPtr,
    ldo: usize,
) {
    let nbp = packed_blocks(w.k);
    let rb = packed_row_bytes(w.bits, w.k);
    let kp = nbp * 32;
    for row in range {
        let data = &w.data[row * rb..(row + 1) * rb];
        for i in 0..b {
            let xq = &a.q[i * kp..(i + 1) * kp];
            let mut total = 0f32;
            for blk in 0..nbp {
                let (d, m) = w.scales.get(row * nbp + blk);
                let mut isum = 0i32;
                for j in 0..32 {
                    let (wq, xv) = if w.bits == 8 {
                        (data[blk * 32 + j] as i32, xq[blk * 32 + j] as i32)
                    } else {
                        let byte = data[blk * 16 + j % 16];
                        let q = if j < 16 { byte & 0x0f } else { byte >> 4 } as i32;
                        let (pair, second) = (blk / 2, blk % 2);
                        let at = pair * 64 + if j < 16 { 0 } else { 32 } + 16 * second + j % 16;
                        (q, xq[at] as i32)
                    };
                    isum += wq * xv;
                }
                let lanes = if w.bits == 8 {
                    (i * nbp + blk) * 4
                } else {
                    (i * nbp + blk / 2 * 2) * 4 + 4 * (blk % 2)
                };
                let dx = a.dx[lanes];
                let per_lane = if w.bits == 8 { 8.0 } else { 4.0 };
                total += d * dx * isum as f32 + m * a.s[lanes] * per_lane;
            }
            // SAFETY: the caller's contract.
            unsafe { *out.0.add(i * ldo + row) = total };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{packed_blocks, packed_row_bytes, Activations, OutPtr, PackedRef, ScaleElem};

    /// Loads of scales as f32 lanes.
    pub(crate) trait Load: ScaleElem {
        /// Two scales at `p` (a pair of blocks) in the low half of a register.
        unsafe fn load2(p: *const Self) -> __m128;
        /// The scales at `p` of the lanes `mask` sets (16 lanes; the others 0). AVX-512.
        unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512;
    }

    impl Load for f32 {
        #[inline(always)]
        unsafe fn load2(p: *const f32) -> __m128 {
            _mm_castpd_ps(_mm_load_sd(p.cast()))
        }
        #[inline(always)]
        unsafe fn load16(p: *const f32, mask: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(mask, p)
        }
    }

    impl Load for u16 {
        #[inline(always)]
        unsafe fn load2(p: *const u16) -> __m128 {
            _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned()))
        }
        #[inline(always)]
        unsafe fn load16(p: *const u16, mask: __mmask16) -> __m512 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast()))
        }
    }

    /// The two scales at `p` spread over 8 lanes: [p[0] x4, p[1] x4] (a pair's lane layout).
    #[inline(always)]
    unsafe fn pair_lanes<S: Load>(p: *const S) -> __m256 {
        let pairs = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
        _mm256_permutevar8x32_ps(_mm256_castps128_ps256(S::load2(p)), pairs)
    }

    #[inline(always)]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// AVX2: per pair of blocks (4-bit) or per block (8-bit), 8 lanes of i32 sums.
    ///
    /// # Safety
    /// AVX2 and FMA; `out` as in `super::matmul`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows_avx2<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        a: &Activations,
        b: usize,
        range: std::ops::Range<usize>,
        out: OutPtr,
        ldo: usize,
    ) {
        let nbp = packed_blocks(w.k);
        let rb = packed_row_bytes(w.bits, w.k);
        let kp = nbp * 32;
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = vec![_mm256_setzero_ps(); b];
        for row in range {
            acc.iter_mut().for_each(|v| *v = _mm256_setzero_ps());
            let data = w.data[row * rb..].as_ptr();
            let dp = ds[row * nbp..].as_ptr();
            let mp = ms[row * nbp..].as_ptr();
            if w.bits == 4 {
                for p in 0..nbp / 2 {
                    let v = _mm256_loadu_si256(data.add(32 * p).cast());
                    let lo = _mm256_and_si256(v, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                    let dd = pair_lanes(dp.add(2 * p));
                    let mm = pair_lanes(mp.add(2 * p));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xq = a.q[i * kp + 64 * p..].as_ptr();
                        let xl = _mm256_loadu_si256(xq.cast());
                        let xh = _mm256_loadu_si256(xq.add(32).cast());
                        let s = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xl), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xh), ones),
                        );
                        let lanes = (i * nbp + 2 * p) * 4;
                        let dx = _mm256_loadu_ps(a.dx[lanes..].as_ptr());
                        let sx = _mm256_loadu_ps(a.s[lanes..].as_ptr());
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dd, dx), *acc);
                        *acc = _mm256_fmadd_ps(mm, sx, *acc);
                    }
                }
            } else {
                for blk in 0..nbp {
                    // Back to signed quants: maddubs takes |w| and x with w's sign.
                    let u = _mm256_loadu_si256(data.add(32 * blk).cast());
                    let q = _mm256_xor_si256(u, flip);
                    let aq = _mm256_sign_epi8(q, q);
                    let d = _mm256_set1_ps((*dp.add(blk)).to_f32());
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_si256(a.q[i * kp + 32 * blk..].as_ptr().cast());
                        let s = _mm256_madd_epi16(
                            _mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv, q)),
                            ones,
                        );
                        let dx = _mm256_set1_ps(a.dx[(i * nbp + blk) * 4]);
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(d, dx), *acc);
                    }
                }
            }
            for (i, v) in acc.iter().enumerate() {
                // SAFETY: the caller's contract.
                unsafe { *out.0.add(i * ldo + row) = hsum256(*v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testing::{lcg, random_blocks};

    fn dequantize_via_blocks(qt: QType, w: &[u8], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * k];
        dequantize_blocks(qt, w, n, k, &mut out, 1).expect("valid blocks");
        out
    }

    #[test]
    fn packing_keeps_the_weights() {
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::Q4K] {
            let (n, k) = (5, 768);
            let w = random_blocks(qt, n, k, 3);
            let want = dequantize_via_blocks(qt, &w, n, k);
            let p = pack(qt, &w, n, k).unwrap();
            let mut got = vec![0f32; n * k];
            p.dequantize(&mut got).unwrap();
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-6 * (1.0 + e.abs()),
                    "{qt:?} {i}: {g} vs {e}"
                );
            }
        }
        assert!(pack(QType::Q6K, &[0; 210], 1, 256).is_err());
    }

    #[test]
    fn scales_are_f16_where_f16_holds_them() {
        let kind = |qt: QType| {
            let p = pack(qt, &random_blocks(qt, 4, 256, 7), 4, 256).unwrap();
            matches!(p.scales, Scales::F16 { .. })
        };
        // The 32-weight formats' scales are f16 in the file; Q4_K's products of two are not.
        assert!(kind(QType::Q4_0) && kind(QType::Q4_1) && kind(QType::Q8_0));
        assert!(!kind(QType::Q4K));
        assert_eq!(f16_exact(1.0), Some(0x3c00));
        assert_eq!(f16_exact(-0.0), Some(0x8000));
        assert_eq!(f16_exact(65504.0), Some(0x7bff));
        assert_eq!(f16_exact(2f32.powi(-24)), Some(1)); // the smallest subnormal
        assert_eq!(f16_exact(3.0 * 2f32.powi(-20)), Some(0x30)); // a subnormal
        assert_eq!(f16_exact(1.0 + 2f32.powi(-11)), None); // needs 11 mantissa bits
        assert_eq!(f16_exact(65536.0), None);
        assert_eq!(f16_exact(2f32.powi(-25)), None);
        assert_eq!(f16_exact(f32::NAN), None);
    }

    fn check_matmul(path_override: Option<Path>) {
        // int16 activations (VNNI, through `matmul`) round to 1/65534 of a block's largest
        // value, int8 ones to 1/254: the bound of each, and of the float sums' rounding.
        let wide = path_override.is_none() && Path::detect() == Path::Vnni512;
        let (steps, rel) = if wide { (65534.0, 2e-5) } else { (254.0, 1e-3) };
        for qt in [QType::Q4_0, QType::Q4_1, QType::Q8_0, QType::Q4K] {
            for &(n, k, b) in &[
                (3usize, 256usize, 1usize),
                (37, 576, 2),
                (70, 1536, 3),
                (9, 64, 1),
                // batches: the float path on AVX-512 CPUs (FLOAT_MIN_ROWS rows and more)
                (37, 576, 8),
                (70, 1536, 8),
            ] {
                if !k.is_multiple_of(qt.block_elems()) {
                    continue;
                }
                let w = random_blocks(qt, n, k, 5);
                let p = pack(qt, &w, n, k).unwrap();
                let wf = dequantize_via_blocks(qt, &w, n, k);
                let mut s = 9u64;
                let x: Vec<f32> = (0..b * k)
                    .map(|_| (lcg(&mut s) % 2001) as f32 / 1000.0 - 1.0)
                    .collect();
                let ldo = n + 2;
                let mut out = vec![f32::NAN; b * ldo];
                match path_override {
                    None => matmul((&p).into(), &x, b, &mut out, ldo, 2).unwrap(),
                    Some(path) => {
                        let acts = Activations::new(&x, b, k, p.bits);
                        let ptr = OutPtr(out.as_mut_ptr());
                        unsafe { run_rows(path, &(&p).into(), &acts, b, 0..n, ptr, ldo) };
                    }
                }
                // AMX tiles (batches, where the CPU has them) round each weight to bf16: 2^-9
                // of it at most.
                let amx = wide && b >= FLOAT_MIN_ROWS && crate::quant_amx::available();
                for i in 0..b {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|kk| x[i * k + kk] as f64 * wf[j * k + kk] as f64)
                            .sum();
                        let mag: f64 = (0..k)
                            .map(|kk| (x[i * k + kk] as f64 * wf[j * k + kk] as f64).abs())
                            .sum();
                        let bound: f64 = (0..k.div_ceil(32))
                            .map(|blk| {
                                let r = blk * 32..((blk + 1) * 32).min(k);
                                let amax = x[i * k + r.start..i * k + r.end]
                                    .iter()
                                    .fold(0f32, |m, v| m.max(v.abs()));
                                let ws: f32 = wf[j * k + r.start..j * k + r.end]
                                    .iter()
                                    .map(|v| v.abs())
                                    .sum();
                                (amax / steps * ws) as f64
                            })
                            .sum::<f64>()
                            + rel * (1.0 + want.abs())
                            + if amx { mag / 512.0 } else { 0.0 };
                        let got = out[i * ldo + j] as f64;
                        assert!(
                            (got - want).abs() <= bound,
                            "{qt:?} {path_override:?} n={n} k={k} [{i},{j}]: {got} vs {want}"
                        );
                    }
                    assert!(out[i * ldo + n].is_nan());
                }
            }
        }
    }

    #[test]
    fn matmul_matches_the_float_product() {
        check_matmul(None);
        check_matmul(Some(Path::Generic));
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                check_matmul(Some(Path::Avx2));
            }
        }
    }
}
