//! Packed GGUF weights ([`crate::quant_packed`]) times a batch of activation rows on CPUs with
//! AMX (Intel Sapphire Rapids and later): `tdpbf16ps` multiplies a 16 x 32 tile of bf16
//! weights by a 32 x 16 tile of bf16 activations into 16 x 16 f32 sums, 8,192 multiply-adds in
//! one instruction against 16 for an AVX-512 FMA.
//!
//! - Weights: 32 rows at a time (two tiles' worth) are dequantized (`d * q + m`, as
//!   `rows_float` does) and rounded to bf16, row-major: a tile reads 16 rows of one 32-value
//!   block. The rounding (2^-9 of each weight) is far inside the 4-bit quantization's own
//!   error; on the default model, 16 chat answers of 48 tokens came out the same as with the
//!   f32 products.
//! - Activations: each f32 value `x` is split into `hi = bf16(x)` and `lo = bf16(x - hi)`,
//!   and both are multiplied: the products keep ~16 bits of every activation, as the int16
//!   path does (bf16 alone rounds them the way int8 activations do, which changed the default
//!   model's greedy answers: see `quant_wide`). They are laid out as the tiles' second operand
//!   once per product ([`AmxActs`]).
//! - Sums are f32, in the tiles, over the whole row.
//!
//! The tiles are per-thread state: a call configures them (`ldtilecfg`) and releases them
//! (`tilerelease`). Linux lends a process the AMX register file only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), made once by [`available`].
//! `SRT_DISABLE_AMX=1` turns the path off (the FMA path serves).

use std::sync::OnceLock;

/// Whether this process may run the AMX-BF16 kernel: the CPU has AMX-BF16 and AVX-512 BF16,
/// Linux granted the tile data, and `SRT_DISABLE_AMX` is not `1`.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| std::env::var("SRT_DISABLE_AMX").as_deref() != Ok("1") && detect())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    let leaf7 = __cpuid_count(7, 0);
    let amx_bf16 = leaf7.edx & (1 << 22) != 0;
    let amx_tile = leaf7.edx & (1 << 24) != 0;
    if !(amx_bf16
        && amx_tile
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c"))
    {
        return false;
    }
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM) reads its two integer arguments and changes
    // nothing but this process's permitted xsave features; syscall clobbers rcx and r11.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Rows of a tile (activation rows and weight rows alike), and f32 values of a block.
const TILE: usize = 16;
const BLOCK: usize = 32;
/// Pairs of weight tiles dequantized together (128 weight rows) for a few activation rows.
const GROUP: usize = 4;
/// Above this many activation rows (a prefill's), the group grows to about `PANEL_BYTES` of
/// bf16 weights: the activations, too big for the caches then, are read once per group, so
/// 128-row groups read a 1184-row prefill's ~17x per gate/up product (~130 MB a layer from
/// memory).
const WIDE_ROWS: usize = 64;
const PANEL_BYTES: usize = 512 * 1024;

/// The weight rows dequantized together for `b` activation rows of length `k`: whole pairs of
/// tiles.
fn group_rows(b: usize, k: usize) -> usize {
    let pairs = if b > WIDE_ROWS {
        (PANEL_BYTES / (2 * TILE * 2 * k)).clamp(GROUP, 32)
    } else {
        GROUP
    };
    2 * TILE * pairs
}

/// The activations of a product as the tiles take them (their second operand): per tile of 16
/// rows and per block of 32 values, 16 pairs of values by 16 rows (bf16 pairs as u32), for
/// the high and the low part of each value; padding rows are zero.
pub(crate) struct AmxActs {
    hi: Vec<Line>,
    lo: Vec<Line>,
    k: usize,
}

/// 64 bytes, 64-aligned: the tiles' buffers are made of these. NOTE: a tile load whose rows
/// straddle cache lines took ~6x as long (16.5 vs 2.7 ns from L1).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([u32; 16]);

/// A zeroed, 64-aligned buffer of at least `bytes` bytes.
fn lines(bytes: usize) -> Vec<Line> {
    vec![Line([0; 16]); bytes.div_ceil(64)]
}

thread_local! {
    /// Each thread's weight panels ([`x86::rows`]), kept between calls: zeroing a fresh one
    /// per call (a few hundred KiB) cost several ms of a decode step. Every value a tile reads
    /// is written first in that call.
    static PANELS: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl AmxActs {
    /// # Panics
    /// If `k` is not a multiple of 32 or `x` holds fewer than `b * k` values.
    pub(crate) fn new(x: &[f32], b: usize, k: usize) -> AmxActs {
        assert!(
            k.is_multiple_of(BLOCK) && x.len() >= b * k,
            "AMX activations: bad shape"
        );
        // u32 pairs: tiles x k / 2 pairs x 16 rows; 64-byte lines of 16.
        let tiles = b.div_ceil(TILE);
        let n = tiles * (k / 2);
        let (mut hi, mut lo) = (Vec::<Line>::with_capacity(n), Vec::<Line>::with_capacity(n));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: made only where `available()`: the CPU has AVX-512 BF16. Both buffers have
        // room for n lines and `split` writes every one (padding rows as zeros), so all are
        // initialized before the lengths are set. NOTE: not zeroed up front: that was a few ms
        // of a decode step.
        unsafe {
            x86::split(
                &x[..b * k],
                b,
                k,
                hi.as_mut_ptr().cast(),
                lo.as_mut_ptr().cast(),
            );
            hi.set_len(n);
            lo.set_len(n);
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (hi, lo) = (lines(n * 64), lines(n * 64));
        }
        AmxActs { hi, lo, k }
    }
}

/// `out[i * ldo + r] = x[i] . w[r]` for the rows `r` in `range` and the `b` activation rows.
/// Whole tiles of 16 weight rows run on AMX; the rows left over, on the FMA path.
///
/// # Safety
/// [`available`] returned true; `out` holds `[b, ldo]` values with `range.end <= ldo`, and no
/// one else reads or writes these rows' columns meanwhile; `a` was made from `x` (`[b, k]`)
/// for `w`'s `k`.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn rows(
    w: &crate::quant_packed::PackedRef<'_>,
    a: &AmxActs,
    x: &[f32],
    b: usize,
    range: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    use crate::quant_packed::ScalesRef;
    let whole = range.start + (range.len() / TILE) * TILE;
    if whole > range.start {
        // SAFETY (both arms): the caller's contract.
        match w.scales {
            ScalesRef::F32 { d, m } => unsafe {
                x86::rows(w, d, m, a, b, range.start..whole, out, ldo)
            },
            ScalesRef::F16 { d, m } => unsafe {
                x86::rows(w, d, m, a, b, range.start..whole, out, ldo)
            },
        }
    }
    if whole < range.end {
        // SAFETY: the caller's contract, for the rows left.
        unsafe { crate::quant_wide::rows_float(w, x, b, whole..range.end, out, ldo) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{group_rows, lines, AmxActs, BLOCK, TILE};
    use crate::quant_packed::x86::Load;
    use crate::quant_packed::PackedRef;
    use crate::quant_wide::float::dequantized_blocks;

    /// `hi = bf16(x)`, `lo = bf16(x - hi)` (round to nearest even) of every value, into the
    /// layout of [`AmxActs`]: the pair `2p, 2p + 1` of row `i`'s block `blk` at u32
    /// `((i / 16 * blocks + blk) * 16 + p) * 16 + i % 16`. Per (tile, block), the 16 rows'
    /// pairs are transposed in registers and stored as 16 whole lines; a last tile's padding
    /// rows come out zero.
    ///
    /// NOTE: scattering each row's 16 pairs down a column (16 cache lines a store) cost ~3
    /// cycles a value, ~8% of a 32-sequence decode step.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    pub(super) unsafe fn split(x: &[f32], b: usize, k: usize, hi: *mut u32, lo: *mut u32) {
        let blocks = k / BLOCK;
        // SAFETY (the block): rows i < b of x hold k values; each tile's stores write the 16
        // lines of one (tile, block) of the buffers, sized for b.div_ceil(16) tiles.
        unsafe {
            for t in 0..b.div_ceil(TILE) {
                let rows = (b - t * TILE).min(TILE);
                for blk in 0..blocks {
                    let mut h = [_mm512_setzero_si512(); TILE];
                    let mut l = [_mm512_setzero_si512(); TILE];
                    for i in 0..rows {
                        let src = x.as_ptr().add((t * TILE + i) * k + blk * BLOCK);
                        let (v0, v1) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
                        let hv: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
                        let (h0, h1) = widen(hv);
                        h[i] = hv;
                        l[i] = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
                            _mm512_sub_ps(v1, h1),
                            _mm512_sub_ps(v0, h0),
                        ));
                    }
                    let at = (t * blocks + blk) * TILE * TILE;
                    store_transposed(&h, hi.add(at));
                    store_transposed(&l, lo.add(at));
                }
            }
        }
    }

    /// Stores the 16 x 16 u32 matrix whose row i is `m[i]` transposed: line p (16 u32 at
    /// `dst + 16 p`, 64-aligned) holds element p of every row.
    #[inline(always)]
    unsafe fn store_transposed(m: &[__m512i; TILE], dst: *mut u32) {
        // SAFETY: register operations, then 16 stores of 64 bytes at dst (the caller's).
        unsafe {
            for (p, r) in transpose16(m).into_iter().enumerate() {
                _mm512_store_si512(dst.add(p * TILE).cast(), r);
            }
        }
    }

    /// The transpose of the 16 x 16 (32-bit) matrix whose row i is `m[i]`: row p of the
    /// result holds element p of every row.
    #[inline(always)]
    unsafe fn transpose16(m: &[__m512i; TILE]) -> [__m512i; TILE] {
        // SAFETY: register operations only (AVX-512F, the callers').
        unsafe {
            // Within 128-bit lanes: 2 x 2 blocks of u32, then of u64.
            let mut t = [_mm512_setzero_si512(); TILE];
            for i in (0..TILE).step_by(2) {
                t[i] = _mm512_unpacklo_epi32(m[i], m[i + 1]);
                t[i + 1] = _mm512_unpackhi_epi32(m[i], m[i + 1]);
            }
            let mut u = [_mm512_setzero_si512(); TILE];
            for i in (0..TILE).step_by(4) {
                u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
                u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
                u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
                u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
            }
            // Now u[4a + c] holds, in its 128-bit lane L, elements 4L + c of rows 4a .. 4a + 4.
            // Across lanes: gather lane L of the four u[4a + c] (a = 0..4) into one vector.
            let mut out = [_mm512_setzero_si512(); TILE];
            for c in 0..4 {
                let (a0, a1, a2, a3) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
                let lo01 = _mm512_shuffle_i32x4::<0b01_00_01_00>(a0, a1); // a0.L0 a0.L1 a1.L0 a1.L1
                let hi01 = _mm512_shuffle_i32x4::<0b11_10_11_10>(a0, a1); // a0.L2 a0.L3 a1.L2 a1.L3
                let lo23 = _mm512_shuffle_i32x4::<0b01_00_01_00>(a2, a3);
                let hi23 = _mm512_shuffle_i32x4::<0b11_10_11_10>(a2, a3);
                // Lane L of (a0, a1, a2, a3), for L = 0 .. 4: elements 4L + c of rows 0 .. 16.
                out[c] = _mm512_shuffle_i32x4::<0b10_00_10_00>(lo01, lo23);
                out[4 + c] = _mm512_shuffle_i32x4::<0b11_01_11_01>(lo01, lo23);
                out[8 + c] = _mm512_shuffle_i32x4::<0b10_00_10_00>(hi01, hi23);
                out[12 + c] = _mm512_shuffle_i32x4::<0b11_01_11_01>(hi01, hi23);
            }
            out
        }
    }

    /// The 32 bf16 values of `h` (in order) as f32: values 0..16, then 16..32.
    #[inline(always)]
    unsafe fn widen(h: __m512i) -> (__m512, __m512) {
        let f = |x: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(x)));
        (
            f(_mm512_castsi512_si256(h)),
            f(_mm512_extracti64x4_epi64::<1>(h)),
        )
    }

    /// The tile configuration: palette 1, eight tiles of 16 rows of 64 bytes. tmm0 / tmm1: the
    /// sums of weight panel 0 with the high / low activations (16 weight rows by 16
    /// activation rows, f32), tmm2 / tmm3 those of panel 1; tmm4 / tmm5: panels 0 and 1 (16
    /// weight rows of one block's 32 bf16 values each); tmm6 / tmm7: the high / low
    /// activations (one block's 16 pairs by 16 activation rows).
    ///
    /// NOTE: four sums: `tdpbf16ps` takes ~50 cycles to finish and starts every 16, so one
    /// chain of products into a single tile ran at a third of the unit's rate.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn new() -> TileConfig {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64; // bytes per row (u16, little endian)
                c[48 + t] = TILE as u8; // rows
            }
            TileConfig(c)
        }
    }

    /// Weight rows `range` (whole tiles) times the activations, into `out`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        a: &AmxActs,
        b: usize,
        range: std::ops::Range<usize>,
        out: *mut f32,
        ldo: usize,
    ) {
        let k = w.k;
        assert_eq!(a.k, k, "AMX activations made for another k");
        // Pairs of panels of 16 weight rows as bf16, row-major (the tiles' first operand),
        // dequantized together: each activation tile is then read once per group (a
        // prefill's activations outgrow the caches).
        let group = group_rows(b, k);
        super::PANELS.with_borrow_mut(|panels| {
            if panels.len() * 32 < group * k {
                panels.resize((group * k).div_ceil(32), super::Line([0; 16]));
            }
            // SAFETY: the buffer holds at least `group * k` u16, 64-aligned (rows of k * 2
            // bytes, a multiple of 64); `a`, `out` as the caller's.
            unsafe {
                let panel = std::slice::from_raw_parts_mut(panels.as_mut_ptr().cast(), group * k);
                tiles(w, ds, ms, a, b, range, out, ldo, panel)
            }
        });
    }

    /// [`rows`] with the weight panels' buffer (`group_rows(b, k)` rows of `k` bf16).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        a: &AmxActs,
        b: usize,
        range: std::ops::Range<usize>,
        out: *mut f32,
        ldo: usize,
        panel: &mut [u16],
    ) {
        let k = w.k;
        let blocks = k / BLOCK;
        let group = group_rows(b, k);
        // The four sums' tiles: panel 0 high, panel 0 low, panel 1 high, panel 1 low.
        let mut sums_lines = lines(4 * TILE * TILE * 4);
        let sums = sums_lines.as_mut_ptr().cast::<f32>();
        let cfg = TileConfig::new();
        // SAFETY: the config is valid for palette 1 and the CPU has AMX (`available`).
        unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        let mut g0 = range.start;
        while g0 < range.end {
            let g_rows = (range.end - g0).min(group); // whole tiles (the caller's range)
            for r in 0..g_rows {
                // SAFETY: g0 + r < range.end <= w.n.
                unsafe { dequantize_row(w, ds, ms, g0 + r, &mut panel[r * k..(r + 1) * k]) };
            }
            for t in 0..b.div_ceil(TILE) {
                let tile = t * blocks * TILE * TILE;
                let mut r0 = 0;
                while r0 < g_rows {
                    let pair = g_rows - r0 >= 2 * TILE;
                    let p0 = panel.as_ptr().wrapping_add(r0 * k);
                    let p1 = p0.wrapping_add(TILE * k);
                    // SAFETY: every tile load reads 16 rows of 64 bytes inside `panel` (one
                    // block of 16 dequantized weight rows) or inside one (tile, block) of the
                    // activations; the stores write `sums` (4 x 16 x 64 bytes).
                    unsafe {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            options(nostack, nomem)
                        );
                        for blk in 0..blocks {
                            let at = tile + blk * TILE * TILE;
                            let h = a.hi.as_ptr().cast::<u32>().add(at);
                            let l = a.lo.as_ptr().cast::<u32>().add(at);
                            if pair {
                                asm!(
                                    "tileloadd tmm4, [{w0} + {ws}*1]",
                                    "tileloadd tmm5, [{w1} + {ws}*1]",
                                    "tileloadd tmm6, [{h} + {s}*1]",
                                    "tileloadd tmm7, [{l} + {s}*1]",
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tdpbf16ps tmm2, tmm5, tmm6",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    "tdpbf16ps tmm3, tmm5, tmm7",
                                    w0 = in(reg) p0.add(blk * BLOCK),
                                    w1 = in(reg) p1.add(blk * BLOCK),
                                    ws = in(reg) k * 2,
                                    h = in(reg) h,
                                    l = in(reg) l,
                                    s = in(reg) 64usize,
                                    options(nostack, readonly),
                                );
                            } else {
                                asm!(
                                    "tileloadd tmm4, [{w0} + {ws}*1]",
                                    "tileloadd tmm6, [{h} + {s}*1]",
                                    "tileloadd tmm7, [{l} + {s}*1]",
                                    "tdpbf16ps tmm0, tmm4, tmm6",
                                    "tdpbf16ps tmm1, tmm4, tmm7",
                                    w0 = in(reg) p0.add(blk * BLOCK),
                                    ws = in(reg) k * 2,
                                    h = in(reg) h,
                                    l = in(reg) l,
                                    s = in(reg) 64usize,
                                    options(nostack, readonly),
                                );
                            }
                        }
                        asm!(
                            "tilestored [{o0} + {s}*1], tmm0",
                            "tilestored [{o1} + {s}*1], tmm1",
                            "tilestored [{o2} + {s}*1], tmm2",
                            "tilestored [{o3} + {s}*1], tmm3",
                            o0 = in(reg) sums,
                            o1 = in(reg) sums.add(TILE * TILE),
                            o2 = in(reg) sums.add(2 * TILE * TILE),
                            o3 = in(reg) sums.add(3 * TILE * TILE),
                            s = in(reg) 64usize,
                            options(nostack),
                        );
                    }
                    // sums[2 q + part][r][i]: weight row g0 + r0 + 16 q + r, activation row
                    // t * 16 + i; the high and low parts add up.
                    let row0 = g0 + r0;
                    let panels = if pair { 2 } else { 1 };
                    for q in 0..panels {
                        let hi = sums.cast_const().wrapping_add(2 * q * TILE * TILE);
                        let lo = hi.wrapping_add(TILE * TILE);
                        // SAFETY: the loads read the two tiles just stored (16 rows of 16
                        // f32 each); activation row t*16+i < b, columns row0 + 16 q +
                        // (0..16) inside `range` (the caller's contract).
                        unsafe {
                            // Row r: weight row r's sums over the 16 activation rows; the
                            // transpose gives activation row i's sums over the weight rows.
                            let rows: [__m512i; TILE] = std::array::from_fn(|r| {
                                _mm512_castps_si512(_mm512_add_ps(
                                    _mm512_load_ps(hi.add(r * TILE)),
                                    _mm512_load_ps(lo.add(r * TILE)),
                                ))
                            });
                            let cols = transpose16(&rows);
                            for (i, v) in cols.iter().enumerate().take((b - t * TILE).min(TILE)) {
                                let dst = out.add((t * TILE + i) * ldo + row0 + q * TILE);
                                _mm512_storeu_ps(dst, _mm512_castsi512_ps(*v));
                            }
                        }
                    }
                    r0 += panels * TILE;
                }
            }
            g0 += g_rows;
        }
        // SAFETY: releases this thread's tile state (AMX is in use, see above).
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Weight row `row` as bf16 into `dst` (`k` values).
    #[inline(always)]
    unsafe fn dequantize_row<S: Load>(
        w: &PackedRef<'_>,
        ds: &[S],
        ms: &[S],
        row: usize,
        dst: &mut [u16],
    ) {
        // SAFETY: `row < w.n` (the caller's); each store writes one block's 64 bytes of
        // `dst` (k values).
        unsafe {
            dequantized_blocks(w, ds, ms, row, |blk, w0, w1| {
                let bf: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(w1, w0));
                _mm512_storeu_si512(dst.as_mut_ptr().add(blk * BLOCK).cast(), bf);
            })
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::quant::testing::random_blocks;
    use crate::quant::QType;
    use crate::quant_packed::{pack, PackedRef};

    fn bf16_round(v: f32) -> f32 {
        let b = v.to_bits();
        f32::from_bits(((b + 0x7fff + ((b >> 16) & 1)) >> 16) << 16)
    }

    #[test]
    fn amx_products_match_the_bf16_rounded_reference() {
        if !available() {
            eprintln!("no AMX-BF16 here: skipped");
            return;
        }
        for (qt, n, k, b) in [
            (QType::Q4_1, 48, 96, 19),
            (QType::Q8_0, 37, 64, 16),
            (QType::Q4_1, 16, 576, 5),
            (QType::Q8_0, 64, 160, 33),
            // A prefill's rows: wider weight groups (`group_rows`).
            (QType::Q4_1, 160, 96, 70),
            (QType::Q8_0, 1088, 64, 67),
        ] {
            let raw = random_blocks(qt, n, k, n as u64 * 7 + b as u64);
            let packed = pack(qt, &raw, n, k).unwrap();
            let w = PackedRef::from(&packed);
            let mut wf = vec![0f32; n * k];
            for r in 0..n {
                w.dequantize_row(r, &mut wf[r * k..(r + 1) * k]);
            }
            let x: Vec<f32> = (0..b * k)
                .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 3.7)
                .collect();
            let a = AmxActs::new(&x, b, k);
            let ldo = n + 3;
            let mut out = vec![f32::NAN; b * ldo];
            // SAFETY: AMX available; `out` is [b, ldo] with n <= ldo; `a` made from x.
            unsafe { rows(&w, &a, &x, b, 0..n, out.as_mut_ptr(), ldo) };
            for i in 0..b {
                for r in 0..n {
                    let (mut want, mut exact, mut mag) = (0f64, 0f64, 0f64);
                    for c in 0..k {
                        let (xv, wv) = (x[i * k + c], wf[r * k + c]);
                        let hi = bf16_round(xv);
                        let lo = bf16_round(xv - hi);
                        let wr = if r < n / 16 * 16 { bf16_round(wv) } else { wv };
                        want += (hi as f64 + lo as f64) * wr as f64;
                        exact += xv as f64 * wv as f64;
                        mag += (xv as f64 * wv as f64).abs();
                    }
                    let got = out[i * ldo + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * mag + 1e-6,
                        "{qt:?} n {n} k {k} b {b}: out[{i}][{r}] = {got}, want {want}"
                    );
                    // Against the exact product: the weights' bf16 rounding, 2^-9 of each.
                    assert!((got - exact).abs() <= mag / 256.0 + 1e-6);
                }
                assert!(out[i * ldo + n..(i + 1) * ldo].iter().all(|v| v.is_nan()));
            }
        }
    }
}
