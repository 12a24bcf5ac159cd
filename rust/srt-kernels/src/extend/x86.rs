//! An extend task on AVX-512 with FMA, for head sizes that are a multiple of 16: the portable
//! body's computation, vectorised across keys the way decode attention is
//! (`attention::x86`): each query row's scores 16 keys at a time with one shuffle-tree sum,
//! then its output in registers. Only the keys a query sees (causal, within its window) are
//! read. Sums are f32 in another order than the portable body's (the same to rounding).

use std::arch::x86_64::*;

use super::{PagedExtend, Scratch, Task};
use crate::attention::x86::{load, sums16};
use crate::elem::Elem;
use crate::math::{exp_nonpositive, max, sum};

/// Whether [`task`] runs heads of `head_dim` on this CPU.
pub(super) fn applies(head_dim: usize) -> bool {
    crate::attention::x86::applies(head_dim)
}

/// Task `t` (its keys at `slots`, the positions `lo ..`, all inside the pool) into `out`.
///
/// # Safety
/// `applies(p.head_dim)` holds, `p` is validated and `out` is as in `paged_extend`.
pub(super) unsafe fn task<E: Elem, K: Elem>(
    p: &PagedExtend<'_, E, K>,
    scratch: &mut Scratch,
    t: Task,
    slots: &[i32],
    lo: usize,
    out: *mut E,
) {
    // SAFETY: the caller's guarantee; the arms are the sizes `applies` accepts.
    unsafe {
        match p.head_dim / 16 {
            1 => body::<E, K, 1>(p, scratch, t, slots, lo, out),
            2 => body::<E, K, 2>(p, scratch, t, slots, lo, out),
            3 => body::<E, K, 3>(p, scratch, t, slots, lo, out),
            4 => body::<E, K, 4>(p, scratch, t, slots, lo, out),
            5 => body::<E, K, 5>(p, scratch, t, slots, lo, out),
            6 => body::<E, K, 6>(p, scratch, t, slots, lo, out),
            7 => body::<E, K, 7>(p, scratch, t, slots, lo, out),
            8 => body::<E, K, 8>(p, scratch, t, slots, lo, out),
            16 => body::<E, K, 16>(p, scratch, t, slots, lo, out),
            c => unreachable!("head size {} is not one `applies` accepts", c * 16),
        }
    }
}

#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::needless_range_loop)] // a0, a1 and the loads share the index
unsafe fn body<E: Elem, K: Elem, const C: usize>(
    p: &PagedExtend<'_, E, K>,
    scratch: &mut Scratch,
    t: Task,
    slots: &[i32],
    lo: usize,
    out: *mut E,
) {
    let d = C * 16;
    let (hq, hkv) = (p.num_heads, p.num_kv_heads);
    let group = hq / hkv;
    let width = hkv * d;
    let q_first = p.prefix_lens[t.seq] as usize + t.first;
    let scores = &mut scratch.scores;
    scores.resize(slots.len(), 0.0);
    // SAFETY (the block): AVX-512F and FMA are enabled here; every key and value read is a
    // slot's row inside the pool (the caller checked the slots), q and out rows are this
    // task's (inside the arrays, checked by `validate`).
    unsafe {
        let (kp, vp) = (p.k.as_ptr(), p.v.as_ptr());
        let at = |j: usize| slots[j] as usize * width + t.head * d;
        let scale = _mm512_set1_ps(p.scale);
        for i in 0..t.count {
            let qpos = q_first + i;
            // The keys this query sees: positions first ..= qpos, as indices from `lo`.
            let first = if p.window > 0 {
                (qpos + 1).saturating_sub(p.window).max(lo)
            } else {
                lo
            };
            let (a, n) = (first - lo, qpos + 1 - first);
            let s = &mut scores[..n];
            for g in 0..group {
                let row = ((t.token + i) * hq + t.head * group + g) * d;
                let qrow = p.q.as_ptr().add(row);
                let qh: [__m512; C] =
                    std::array::from_fn(|c| _mm512_mul_ps(load(qrow.add(16 * c)), scale));
                for j0 in (0..n).step_by(16) {
                    let m = (n - j0).min(16);
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for (u, acc) in acc.iter_mut().enumerate().take(m) {
                        let key = kp.add(at(a + j0 + u));
                        let mut x = _mm512_mul_ps(load(key), qh[0]);
                        for (c, qc) in qh.iter().enumerate().skip(1) {
                            x = _mm512_fmadd_ps(load(key.add(16 * c)), *qc, x);
                        }
                        *acc = x;
                    }
                    let mask = ((1u32 << m) - 1) as u16;
                    _mm512_mask_storeu_ps(s.as_mut_ptr().add(j0), mask, sums16(&acc));
                }
                if p.softcap > 0.0 {
                    let cap = p.softcap;
                    for x in s.iter_mut() {
                        *x = cap * (*x / cap).tanh();
                    }
                }
                let top = max(s);
                for x in s.iter_mut() {
                    *x = exp_nonpositive(*x - top);
                }
                let inv = _mm512_set1_ps(1.0 / sum(s));
                let mut a0 = [_mm512_setzero_ps(); C];
                let mut a1 = [_mm512_setzero_ps(); C];
                let mut j = 0;
                while j + 1 < n {
                    let (v0, v1) = (vp.add(at(a + j)), vp.add(at(a + j + 1)));
                    let (w0, w1) = (_mm512_set1_ps(s[j]), _mm512_set1_ps(s[j + 1]));
                    for c in 0..C {
                        a0[c] = _mm512_fmadd_ps(w0, load(v0.add(16 * c)), a0[c]);
                        a1[c] = _mm512_fmadd_ps(w1, load(v1.add(16 * c)), a1[c]);
                    }
                    j += 2;
                }
                if j < n {
                    let v0 = vp.add(at(a + j));
                    let w0 = _mm512_set1_ps(s[j]);
                    for c in 0..C {
                        a0[c] = _mm512_fmadd_ps(w0, load(v0.add(16 * c)), a0[c]);
                    }
                }
                for c in 0..C {
                    let r = _mm512_mul_ps(_mm512_add_ps(a0[c], a1[c]), inv);
                    let mut lanes = [0f32; 16];
                    _mm512_storeu_ps(lanes.as_mut_ptr(), r);
                    for (e, x) in lanes.into_iter().enumerate() {
                        *out.add(row + 16 * c + e) = E::from_f32(x);
                    }
                }
            }
        }
    }
}
