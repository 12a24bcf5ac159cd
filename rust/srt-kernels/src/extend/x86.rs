//! An extend task on AVX-512 with FMA, for head sizes that are a multiple of 16: the portable
//! body's computation, vectorised across query rows. The task's keys and values are first
//! gathered as f32 (once, whatever the pool's type); then 16 query rows at a time (the tile's
//! tokens times the KV head's query heads) walk them together: a key's scores for the 16 rows
//! are one vector (the queries held transposed, each key value broadcast), the softmax runs
//! lane-wise, and each output value of the 16 rows is one vector. A key is read once per 16
//! rows rather than once per row (per-row walks were bound by the L2 cache: ~32 cycles a
//! row-key pair on a 2000-token prompt). Keys a row does not see (after it, or out of its
//! window) are masked. Sums are f32 in another order than the portable body's (the same to
//! rounding).

use std::arch::x86_64::*;

use super::{PagedExtend, Scratch, Task};
use crate::attention::x86::load;
use crate::elem::Elem;
use crate::math::exp_nonpositive;

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

/// Query rows a pass over the keys serves (one vector of scores per key).
const ROWS: usize = 16;
/// Keys whose scores are summed side by side (independent chains of multiply-adds).
const KEYS: usize = 8;

#[target_feature(enable = "avx512f,fma")]
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
    let n_all = slots.len();
    let q_first = p.prefix_lens[t.seq] as usize + t.first;
    let rows = t.count * group;
    let Scratch {
        q: qt,
        scores: sc,
        acc: kf,
        row: vf,
        inv: tmp,
    } = scratch;
    qt.resize(d * ROWS, 0.0); // [d][16 rows]: the block's queries, transposed
    sc.resize(n_all * ROWS, 0.0); // [key][16 rows]
    kf.resize(n_all * d, 0.0); // the task's keys and values as f32, contiguous
    vf.resize(n_all * d, 0.0);
    tmp.resize(ROWS * 16, 0.0);
    // SAFETY (the block): AVX-512F and FMA are enabled here; the pool reads are the rows of
    // `slots` (inside the pool, the caller checked); q and out rows are this task's (inside
    // the arrays, checked by `validate`); scratch accesses stay inside the sizes set above.
    unsafe {
        let (kp, vp) = (p.k.as_ptr(), p.v.as_ptr());
        for (j, &slot) in slots.iter().enumerate() {
            let src = slot as usize * width + t.head * d;
            for c in 0..C {
                let (kd, vd) = (
                    kf.as_mut_ptr().add(j * d + 16 * c),
                    vf.as_mut_ptr().add(j * d + 16 * c),
                );
                _mm512_storeu_ps(kd, load(kp.add(src + 16 * c)));
                _mm512_storeu_ps(vd, load(vp.add(src + 16 * c)));
            }
        }
        let (kf, vf) = (kf.as_ptr(), vf.as_ptr());
        for rb in (0..rows).step_by(ROWS) {
            let nr = (rows - rb).min(ROWS);
            // Each row's visible keys, [first[r], last[r]] as indices from `lo` (padding rows
            // repeat the last real row; their outputs are not written).
            let (mut first, mut last) = ([0i32; ROWS], [0i32; ROWS]);
            for r in 0..ROWS {
                let i = (rb + r.min(nr - 1)) / group;
                let qpos = q_first + i;
                let f = if p.window > 0 {
                    (qpos + 1).saturating_sub(p.window).max(lo)
                } else {
                    lo
                };
                first[r] = (f - lo) as i32;
                last[r] = (qpos - lo) as i32;
            }
            let jlo = *first.iter().min().unwrap_or(&0) as usize;
            let jhi = *last.iter().max().unwrap_or(&0) as usize;
            let n = jhi + 1 - jlo;
            for r in 0..ROWS {
                let (i, g) = ((rb + r.min(nr - 1)) / group, (rb + r.min(nr - 1)) % group);
                let src = ((t.token + i) * hq + t.head * group + g) * d;
                for c in 0..d {
                    qt[c * ROWS + r] = p.q[src + c].to_f32() * p.scale;
                }
            }
            let (qtp, scp) = (qt.as_ptr(), sc.as_mut_ptr());
            // Raw scores, KEYS keys at a time: row r's score for key j is lane r.
            for j0 in (0..n).step_by(KEYS) {
                let m = (n - j0).min(KEYS);
                let mut acc = [_mm512_setzero_ps(); KEYS];
                for c in 0..d {
                    let q = _mm512_loadu_ps(qtp.add(c * ROWS));
                    for (u, acc) in acc.iter_mut().enumerate().take(m) {
                        let kv = _mm512_set1_ps(*kf.add((jlo + j0 + u) * d + c));
                        *acc = _mm512_fmadd_ps(q, kv, *acc);
                    }
                }
                for (u, acc) in acc.iter().enumerate().take(m) {
                    _mm512_storeu_ps(scp.add((j0 + u) * ROWS), *acc);
                }
            }
            // Soft-cap, mask (keys after a query or out of its window), running maximum.
            let (fv, lv) = (
                _mm512_loadu_si512(first.as_ptr().cast()),
                _mm512_loadu_si512(last.as_ptr().cast()),
            );
            let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
            for j in 0..n {
                let at = scp.add(j * ROWS);
                if p.softcap > 0.0 {
                    let cap = p.softcap;
                    for r in 0..ROWS {
                        *at.add(r) = cap * (*at.add(r) / cap).tanh();
                    }
                }
                let jv = _mm512_set1_epi32((jlo + j) as i32);
                let seen = _mm512_cmple_epi32_mask(fv, jv) & _mm512_cmpge_epi32_mask(lv, jv);
                let s = _mm512_mask_mov_ps(
                    _mm512_set1_ps(f32::NEG_INFINITY),
                    seen,
                    _mm512_loadu_ps(at),
                );
                _mm512_storeu_ps(at, s);
                top = _mm512_max_ps(top, s);
            }
            let mut tops = [0f32; ROWS];
            _mm512_storeu_ps(tops.as_mut_ptr(), top);
            let mut total = [0f32; ROWS];
            for j in 0..n {
                let row = &mut sc[j * ROWS..(j + 1) * ROWS];
                for r in 0..ROWS {
                    row[r] = exp_nonpositive(row[r] - tops[r]);
                    total[r] += row[r];
                }
            }
            let scp = sc.as_ptr();
            // Outputs, 16 of each row's values at a time: lane r of `o[e]` is row r's value e.
            for c in 0..C {
                let mut o = [_mm512_setzero_ps(); 16];
                for j in 0..n {
                    let w = _mm512_loadu_ps(scp.add(j * ROWS));
                    let v = vf.add((jlo + j) * d + 16 * c);
                    for (e, o) in o.iter_mut().enumerate() {
                        *o = _mm512_fmadd_ps(w, _mm512_set1_ps(*v.add(e)), *o);
                    }
                }
                for (e, o) in o.iter().enumerate() {
                    _mm512_storeu_ps(tmp.as_mut_ptr().add(e * ROWS), *o);
                }
                for r in 0..nr {
                    let (i, g) = ((rb + r) / group, (rb + r) % group);
                    let dst = ((t.token + i) * hq + t.head * group + g) * d + 16 * c;
                    let inv = 1.0 / total[r];
                    for e in 0..16 {
                        *out.add(dst + e) = E::from_f32(tmp[e * ROWS + r] * inv);
                    }
                }
            }
        }
    }
}
