//! Decode attention of one sequence on AVX-512 with FMA, for head sizes that are a multiple of
//! 16: the portable body's computation, vectorised across keys.
//!
//! Scores: for a block of up to 16 keys, 16 independent dot products (one 16-lane vector each,
//! head_dim / 16 fused multiply-adds) whose lanes are then summed all at once by a shuffle tree
//! ([`sums16`]), so a score costs its multiply-adds and ~3 more operations rather than a
//! horizontal sum of its own. Values: each query head's output stays in registers (two sets
//! for alternate keys, so consecutive multiply-adds do not wait on each other). K and V are
//! loaded as f32 whatever their storage (bf16 is widened in registers). The sums are f32 in
//! another order than the portable body's, so the two agree to rounding, not bit for bit; on
//! a CPU that has these instructions every caller (the native decode step, the torch
//! forward's attention) takes this path.

use std::arch::x86_64::*;

use super::{prefetch, PagedDecode, Scratch};
use crate::elem::Elem;
use crate::math::{exp_nonpositive, max, sum};

/// Whether [`sequence`] runs heads of `head_dim` on this CPU.
pub(crate) fn applies(head_dim: usize) -> bool {
    head_dim.is_multiple_of(16)
        && matches!(head_dim / 16, 1..=8 | 16)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma")
}

/// Sequence `b`'s attention into `out` (its `[num_heads, head_dim]`); `slots` are the KV
/// slots of its attending positions, each inside the pool.
///
/// # Safety
/// `applies(p.head_dim)` holds and `p` is validated.
pub(super) unsafe fn sequence<E: Elem, K: Elem>(
    p: &PagedDecode<'_, E, K>,
    scratch: &mut Scratch,
    b: usize,
    slots: &[i32],
    out: &mut [E],
) {
    // SAFETY: the caller's guarantee; the arms are the sizes `applies` accepts.
    unsafe {
        match p.head_dim / 16 {
            1 => body::<E, K, 1>(p, scratch, b, slots, out),
            2 => body::<E, K, 2>(p, scratch, b, slots, out),
            3 => body::<E, K, 3>(p, scratch, b, slots, out),
            4 => body::<E, K, 4>(p, scratch, b, slots, out),
            5 => body::<E, K, 5>(p, scratch, b, slots, out),
            6 => body::<E, K, 6>(p, scratch, b, slots, out),
            7 => body::<E, K, 7>(p, scratch, b, slots, out),
            8 => body::<E, K, 8>(p, scratch, b, slots, out),
            16 => body::<E, K, 16>(p, scratch, b, slots, out),
            c => unreachable!("head size {} is not one `applies` accepts", c * 16),
        }
    }
}

/// The 16 values at `ptr` as f32.
#[inline(always)]
pub(crate) unsafe fn load<E: Elem>(ptr: *const E) -> __m512 {
    // SAFETY: the caller's: 16 values readable at `ptr`, AVX-512F present.
    unsafe {
        if E::BF16 {
            let h = _mm256_loadu_si256(ptr.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        } else {
            _mm512_loadu_ps(ptr.cast())
        }
    }
}

/// The lane sums of 16 vectors: element t of the result is the sum of `v[t]`'s 16 lanes.
#[inline(always)]
unsafe fn sums16(v: &[__m512; 16]) -> __m512 {
    // SAFETY: register operations only; AVX-512F present (the caller's).
    unsafe {
        // Within each 128-bit lane L, of v[2k] = a and v[2k + 1] = c:
        // (a0 + a2, c0 + c2, a1 + a3, c1 + c3).
        let mut t = [_mm512_setzero_ps(); 8];
        for (k, t) in t.iter_mut().enumerate() {
            let (a, c) = (v[2 * k], v[2 * k + 1]);
            *t = _mm512_add_ps(_mm512_unpacklo_ps(a, c), _mm512_unpackhi_ps(a, c));
        }
        // Within each 128-bit lane L: lane L's sums of v[4m], .. v[4m + 3] (64-bit moves).
        let mut q = [_mm512_setzero_ps(); 4];
        for (m, q) in q.iter_mut().enumerate() {
            let (a, c) = (_mm512_castps_pd(t[2 * m]), _mm512_castps_pd(t[2 * m + 1]));
            let lo = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            let hi = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            *q = _mm512_add_ps(lo, hi);
        }
        // Across the 128-bit lanes: [a.L0 + a.L1, a.L2 + a.L3, c.L0 + c.L1, c.L2 + c.L3].
        let across = |a: __m512, c: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, c),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, c),
            )
        };
        across(across(q[0], q[1]), across(q[2], q[3]))
    }
}

#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::needless_range_loop)] // a0, a1 and the loads share the index
unsafe fn body<E: Elem, K: Elem, const C: usize>(
    p: &PagedDecode<'_, E, K>,
    scratch: &mut Scratch,
    b: usize,
    slots: &[i32],
    out: &mut [E],
) {
    let d = C * 16;
    let (hq, hkv) = (p.num_heads, p.num_kv_heads);
    let group = hq / hkv;
    let len = slots.len();
    let width = hkv * d; // one slot's row of the pool
    let Scratch { q, scores, inv, .. } = scratch;
    q.resize(hq * d, 0.0);
    scores.resize(hq * len, 0.0); // [query head, position]
    inv.resize(hq, 0.0);
    for (x, v) in q.iter_mut().zip(&p.q[b * hq * d..(b + 1) * hq * d]) {
        *x = v.to_f32() * p.scale;
    }
    // Element offset of position j's head h in a layer of the pool.
    let at = |j: usize, h: usize| slots[j] as usize * width + h * d;
    // SAFETY (the block): AVX-512F and FMA are enabled here; every pointer read is a slot's
    // row inside the pool (the caller checked the slots), `q` holds hq * d values, `scores`
    // hq * len, `out` hq * d.
    unsafe {
        let (kp, vp) = (p.k.as_ptr(), p.v.as_ptr());
        for h in 0..hkv {
            for g in 0..group {
                let head = h * group + g;
                let qh: [__m512; C] =
                    std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(head * d + 16 * c)));
                for j0 in (0..len).step_by(16) {
                    let n = (len - j0).min(16);
                    if h == 0 && g == 0 {
                        // The next block's whole rows (every KV head, keys and values).
                        for j in (j0 + 16..len).take(16) {
                            let o = slots[j] as usize * width;
                            prefetch(&p.k[o..o + width]);
                            prefetch(&p.v[o..o + width]);
                        }
                    }
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for (t, acc) in acc.iter_mut().enumerate().take(n) {
                        let key = kp.add(at(j0 + t, h));
                        let mut a = _mm512_mul_ps(load(key), qh[0]);
                        for (c, qc) in qh.iter().enumerate().skip(1) {
                            a = _mm512_fmadd_ps(load(key.add(16 * c)), *qc, a);
                        }
                        *acc = a;
                    }
                    let mask = ((1u32 << n) - 1) as u16;
                    let dst = scores.as_mut_ptr().add(head * len + j0);
                    _mm512_mask_storeu_ps(dst, mask, sums16(&acc));
                }
            }
        }
        if p.softcap > 0.0 {
            let cap = p.softcap;
            for x in scores.iter_mut() {
                *x = cap * (*x / cap).tanh();
            }
        }
        for (head, s) in scores.chunks_exact_mut(len).enumerate() {
            let top = max(s);
            for x in s.iter_mut() {
                *x = exp_nonpositive(*x - top);
            }
            inv[head] = 1.0 / sum(s);
        }
        for h in 0..hkv {
            for g in 0..group {
                let head = h * group + g;
                let w = &scores[head * len..(head + 1) * len];
                let mut a0 = [_mm512_setzero_ps(); C];
                let mut a1 = [_mm512_setzero_ps(); C];
                let mut j = 0;
                while j + 1 < len {
                    let (v0, v1) = (vp.add(at(j, h)), vp.add(at(j + 1, h)));
                    let (w0, w1) = (_mm512_set1_ps(w[j]), _mm512_set1_ps(w[j + 1]));
                    for c in 0..C {
                        a0[c] = _mm512_fmadd_ps(w0, load(v0.add(16 * c)), a0[c]);
                        a1[c] = _mm512_fmadd_ps(w1, load(v1.add(16 * c)), a1[c]);
                    }
                    j += 2;
                }
                if j < len {
                    let v0 = vp.add(at(j, h));
                    let w0 = _mm512_set1_ps(w[j]);
                    for c in 0..C {
                        a0[c] = _mm512_fmadd_ps(w0, load(v0.add(16 * c)), a0[c]);
                    }
                }
                let scale = _mm512_set1_ps(inv[head]);
                let o = &mut out[head * d..(head + 1) * d];
                for c in 0..C {
                    let r = _mm512_mul_ps(_mm512_add_ps(a0[c], a1[c]), scale);
                    let mut lanes = [0f32; 16];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), r);
                    for (o, x) in o[16 * c..16 * (c + 1)].iter_mut().zip(lanes) {
                        *o = E::from_f32(x);
                    }
                }
            }
        }
    }
}
