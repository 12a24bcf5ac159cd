//! Extend (prefill) attention over the paged KV pool: every new token of every sequence of a
//! batch in one call, whatever the mix of prompt and prefix lengths.
//!
//! Sequence `b` computes `extend_lens[b]` new tokens after `prefix_lens[b]` tokens already in
//! the pool; its new token `j` sits at position `P = prefix_lens[b] + j` and attends causally
//! to the keys at positions `0 ..= P` (with a sliding window `W`: `P - W + 1 ..= P`), read in
//! place through the request-to-token table row `rows[b]`, the new tokens' own keys included
//! (they are stored before attention runs). Scores are scaled by `scale`, optionally soft-capped
//! (`cap * tanh(score / cap)`), soft-maxed per query in f32 (max-subtracted), and weight the
//! values.
//!
//! Work is cut into tasks of (sequence, KV head, tile of up to `TILE` new tokens): a task
//! holds the tile's queries of every query head of its KV head, so each key and value row it
//! loads serves all of them. Tasks run in parallel on `threads` threads. Arithmetic is f32
//! whatever the storage type (f32 or bf16).

use rayon::prelude::*;

use crate::attention::{check_layout, PoolLayout};
use crate::elem::Elem;
use crate::math::{dot, exp_nonpositive, sum};
use crate::pool::pool;
use crate::KernelError;

#[cfg(target_arch = "x86_64")]
mod x86;

/// New tokens of a sequence per task.
const TILE: usize = 16;

/// The inputs of one extend attention call; slices are row-major.
pub struct PagedExtend<'a, E: Elem, K: Elem = E> {
    /// `[tokens, num_heads, head_dim]`: the batch's new tokens, sequence after sequence
    pub q: &'a [E],
    /// `[slots, num_kv_heads, head_dim]`, one layer of the pool (its own storage type)
    pub k: &'a [K],
    pub v: &'a [K],
    /// `[table_rows, table_cols]`: the KV slot of each position of each row
    pub table: &'a [i32],
    pub table_cols: usize,
    /// `[batch]` each sequence's table row, cached prefix length and new token count
    pub rows: &'a [i64],
    pub prefix_lens: &'a [i64],
    pub extend_lens: &'a [i64],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// 0: every earlier position attends; else only the last `window` ones (own included)
    pub window: usize,
    /// 0: none; else the scaled scores become `softcap * tanh(score / softcap)`
    pub softcap: f32,
}

/// One task: KV head `head` of sequence `seq`, its new tokens `first..first + count` (within
/// the sequence), which are rows `token..` of `q` and `out`.
#[derive(Clone, Copy)]
pub(crate) struct Task {
    seq: usize,
    head: usize,
    first: usize,
    count: usize,
    token: usize,
}

impl<E: Elem, K: Elem> PagedExtend<'_, E, K> {
    /// The call's tasks, once its inputs are checked (`out_len`: the output's length).
    pub(crate) fn validate(&self, out_len: usize) -> Result<Vec<Task>, KernelError> {
        let err = |m: String| Err(KernelError(m));
        let (hq, d) = (self.num_heads, self.head_dim);
        let table_rows = check_layout(&PoolLayout {
            num_heads: hq,
            num_kv_heads: self.num_kv_heads,
            head_dim: d,
            softcap: self.softcap,
            k: self.k.len(),
            v: self.v.len(),
            table: self.table.len(),
            table_cols: self.table_cols,
        })?;
        let b = self.rows.len();
        if self.prefix_lens.len() != b || self.extend_lens.len() != b {
            return err(format!(
                "{b} rows, {} prefix lengths, {} extend lengths",
                self.prefix_lens.len(),
                self.extend_lens.len()
            ));
        }
        let cols = self.table_cols;
        let mut tasks = Vec::new();
        let mut token = 0usize;
        for s in 0..b {
            let (row, prefix, n) = (self.rows[s], self.prefix_lens[s], self.extend_lens[s]);
            if row < 0 || row as usize >= table_rows {
                return err(format!(
                    "row {row} is outside the table's {table_rows} rows"
                ));
            }
            if prefix < 0 || n < 0 || (prefix + n) as usize > cols {
                return err(format!(
                    "prefix {prefix} + {n} new tokens do not fit the table's {cols} columns"
                ));
            }
            let n = n as usize;
            for head in 0..self.num_kv_heads {
                for first in (0..n).step_by(TILE) {
                    tasks.push(Task {
                        seq: s,
                        head,
                        first,
                        count: TILE.min(n - first),
                        token: token + first,
                    });
                }
            }
            token += n;
        }
        if self.q.len() != token * hq * d || out_len != self.q.len() {
            return err(format!(
                "q has {} and out {out_len} elements; expected [{token}, {hq}, {d}]",
                self.q.len()
            ));
        }
        Ok(tasks)
    }
}

/// Writes `out` (`[tokens, num_heads, head_dim]`, the layout of `q`).
pub fn paged_extend<E: Elem, K: Elem>(
    p: &PagedExtend<'_, E, K>,
    out: &mut [E],
    threads: usize,
) -> Result<(), KernelError> {
    let tasks = p.validate(out.len())?;
    let out_ptr = OutPtr(out.as_mut_ptr());
    let run = |s: &mut Scratch, t: &Task| {
        // SAFETY: each task writes only its tokens' rows of its KV head's query heads, which
        // no other task writes, inside `out` (its size was checked).
        unsafe { task(p, s, *t, out_ptr) }
    };
    if threads <= 1 || tasks.len() <= 1 {
        let mut scratch = Scratch::default();
        return tasks.iter().try_for_each(|t| run(&mut scratch, t));
    }
    pool(threads).install(|| tasks.par_iter().try_for_each_init(Scratch::default, run))
}

#[derive(Clone, Copy)]
pub(crate) struct OutPtr<E>(pub(crate) *mut E);
// SAFETY: tasks write disjoint elements (see `paged_extend`).
unsafe impl<E> Send for OutPtr<E> {}
unsafe impl<E> Sync for OutPtr<E> {}

/// Per-thread buffers, reused across tasks.
#[derive(Default)]
pub(crate) struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    row: Vec<f32>,
    inv: Vec<f32>,
}

/// Runs one task of `p.validate`'s.
///
/// # Safety
/// `out` points at an output of the length `validate` was given, which no one else writes
/// at this task's elements meanwhile.
pub(crate) unsafe fn task<E: Elem, K: Elem>(
    p: &PagedExtend<'_, E, K>,
    s: &mut Scratch,
    t: Task,
    out: OutPtr<E>,
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::applies(p.head_dim) {
            let (slots, lo) = task_slots(p, &t)?;
            // SAFETY: `applies` checked the CPU and the head size; the slots are inside the
            // pool; the rest is the caller's contract.
            unsafe { x86::task(p, s, t, slots, lo, out.0) };
            return Ok(());
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the only feature `task_avx2` is compiled for.
            return unsafe { task_avx2(p, s, t, out) };
        }
    }
    // SAFETY: the caller's contract.
    unsafe { task_body(p, s, t, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn task_avx2<E: Elem, K: Elem>(
    p: &PagedExtend<'_, E, K>,
    s: &mut Scratch,
    t: Task,
    out: OutPtr<E>,
) -> Result<(), KernelError> {
    // SAFETY: the caller's contract.
    unsafe { task_body(p, s, t, out) }
}

#[inline(always)]
unsafe fn task_body<E: Elem, K: Elem>(
    p: &PagedExtend<'_, E, K>,
    scratch: &mut Scratch,
    t: Task,
    out: OutPtr<E>,
) -> Result<(), KernelError> {
    let (hq, hkv, d) = (p.num_heads, p.num_kv_heads, p.head_dim);
    let group = hq / hkv;
    let prefix = p.prefix_lens[t.seq] as usize;
    let q_first = prefix + t.first;
    let (slots, lo) = task_slots(p, &t)?;
    let len = slots.len();
    let width = hkv * d;
    // Query rows: (token i of the tile, query head g of the group) -> row i * group + g.
    let rows = t.count * group;
    let Scratch {
        q,
        scores,
        acc,
        row: kv,
        inv,
    } = scratch;
    q.resize(rows * d, 0.0);
    scores.resize(rows * len, 0.0);
    acc.resize(rows * d, 0.0);
    kv.resize(d, 0.0);
    inv.resize(rows, 0.0);
    for i in 0..t.count {
        for g in 0..group {
            let src = &p.q[((t.token + i) * hq + t.head * group + g) * d..][..d];
            let dst = &mut q[(i * group + g) * d..][..d];
            for (x, v) in dst.iter_mut().zip(src) {
                *x = v.to_f32() * p.scale;
            }
        }
    }
    let key = |j: usize| &p.k[slots[j] as usize * width + t.head * d..][..d];
    let value = |j: usize| &p.v[slots[j] as usize * width + t.head * d..][..d];
    // Scores, -inf where the key is after the query or out of its window.
    for j in 0..len {
        let kpos = lo + j;
        let k = to_f32(key(j), kv);
        for i in 0..t.count {
            let qpos = q_first + i;
            let visible = kpos <= qpos && (p.window == 0 || kpos + p.window > qpos);
            for g in 0..group {
                let r = i * group + g;
                scores[r * len + j] = if visible {
                    let s = dot(&q[r * d..(r + 1) * d], k);
                    if p.softcap > 0.0 {
                        p.softcap * (s / p.softcap).tanh()
                    } else {
                        s
                    }
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }
    for (r, iv) in inv.iter_mut().enumerate() {
        let s = &mut scores[r * len..(r + 1) * len];
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in s.iter_mut() {
            *x = exp_nonpositive(*x - max);
        }
        *iv = 1.0 / sum(s);
    }
    acc.fill(0.0);
    for j in 0..len {
        let v = to_f32(value(j), kv);
        for r in 0..rows {
            let w = scores[r * len + j];
            if w == 0.0 {
                continue;
            }
            for (a, x) in acc[r * d..(r + 1) * d].iter_mut().zip(v) {
                *a += w * x;
            }
        }
    }
    for i in 0..t.count {
        for g in 0..group {
            let r = i * group + g;
            let dst = ((t.token + i) * hq + t.head * group + g) * d;
            for (c, a) in acc[r * d..(r + 1) * d].iter().enumerate() {
                // SAFETY: inside `out` ([tokens, hq, d], checked), this task's elements.
                unsafe { *out.0.add(dst + c) = E::from_f32(a * inv[r]) };
            }
        }
    }
    Ok(())
}

/// The KV slots of the keys task `t`'s queries see (any of them), checked to lie inside the
/// pool, and the position of the first.
fn task_slots<'a, E: Elem, K: Elem>(
    p: &PagedExtend<'a, E, K>,
    t: &Task,
) -> Result<(&'a [i32], usize), KernelError> {
    let prefix = p.prefix_lens[t.seq] as usize;
    let row = p.rows[t.seq] as usize;
    let (q_first, q_last) = (prefix + t.first, prefix + t.first + t.count - 1);
    let lo = if p.window > 0 {
        (q_first + 1).saturating_sub(p.window)
    } else {
        0
    };
    let slots = &p.table[row * p.table_cols + lo..row * p.table_cols + q_last + 1];
    let num_slots = p.k.len() / (p.num_kv_heads * p.head_dim);
    if let Some(&bad) = slots.iter().find(|&&s| s < 0 || s as usize >= num_slots) {
        return Err(KernelError(format!(
            "row {row} holds KV slot {bad}, outside the pool's {num_slots} slots"
        )));
    }
    Ok((slots, lo))
}

/// `src` as f32: itself when it is f32, else converted into `buf`.
#[inline(always)]
fn to_f32<'a, E: Elem>(src: &'a [E], buf: &'a mut [f32]) -> &'a [f32] {
    if let Some(s) = E::as_f32(src) {
        return s;
    }
    for (d, s) in buf.iter_mut().zip(src) {
        *d = s.to_f32();
    }
    &buf[..src.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Bf16;

    fn lcg(s: &mut u64) -> f32 {
        *s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The plain computation: for each token and head, softmax over its visible keys.
    fn reference(p: &PagedExtend<'_, f32>) -> Vec<f32> {
        let (hq, hkv, d) = (p.num_heads, p.num_kv_heads, p.head_dim);
        let mut out = vec![0f32; p.q.len()];
        let mut token = 0;
        for s in 0..p.rows.len() {
            let (row, prefix) = (p.rows[s] as usize, p.prefix_lens[s] as usize);
            for j in 0..p.extend_lens[s] as usize {
                let qpos = prefix + j;
                for h in 0..hq {
                    let kh = h / (hq / hkv);
                    let q = &p.q[((token + j) * hq + h) * d..][..d];
                    let keys: Vec<usize> = (0..=qpos)
                        .filter(|&kp| p.window == 0 || kp + p.window > qpos)
                        .collect();
                    let sc: Vec<f64> = keys
                        .iter()
                        .map(|&kp| {
                            let slot = p.table[row * p.table_cols + kp] as usize;
                            let k = &p.k[(slot * hkv + kh) * d..][..d];
                            let mut v: f64 = q.iter().zip(k).map(|(a, b)| (a * b) as f64).sum();
                            v *= p.scale as f64;
                            if p.softcap > 0.0 {
                                v = p.softcap as f64 * (v / p.softcap as f64).tanh();
                            }
                            v
                        })
                        .collect();
                    let max = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..d {
                        let mut o = 0f64;
                        for (w, &kp) in e.iter().zip(&keys) {
                            let slot = p.table[row * p.table_cols + kp] as usize;
                            o += w * p.v[(slot * hkv + kh) * d + c] as f64;
                        }
                        out[((token + j) * hq + h) * d + c] = (o / total) as f32;
                    }
                }
            }
            token += p.extend_lens[s] as usize;
        }
        out
    }

    /// `p` over another pool (of another element type).
    fn over_pool<'a, K: Elem>(
        p: &PagedExtend<'a, f32>,
        k: &'a [K],
        v: &'a [K],
    ) -> PagedExtend<'a, f32, K> {
        let PagedExtend {
            q,
            table,
            table_cols,
            rows,
            prefix_lens,
            extend_lens,
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
            window,
            softcap,
            ..
        } = *p;
        PagedExtend {
            q,
            k,
            v,
            table,
            table_cols,
            rows,
            prefix_lens,
            extend_lens,
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
            window,
            softcap,
        }
    }

    #[test]
    fn matches_the_plain_computation() {
        // Head sizes that take the vector path where the CPU has one (16, 64) and one that
        // does not (12).
        for d in [16, 64, 12] {
            matches_the_plain_computation_for(d);
        }
    }

    fn matches_the_plain_computation_for(d: usize) {
        let (hq, hkv, cols) = (6, 2, 64);
        let mut seed = 11u64;
        // Three sequences: no prefix, a prefix, a long tail cut into tiles.
        let (prefix, ext) = ([0i64, 5, 3], [7i64, 4, 37]);
        let tokens: usize = ext.iter().sum::<i64>() as usize;
        let slots = 200;
        let k: Vec<f32> = (0..slots * hkv * d).map(|_| lcg(&mut seed)).collect();
        let v: Vec<f32> = (0..slots * hkv * d).map(|_| lcg(&mut seed)).collect();
        let q: Vec<f32> = (0..tokens * hq * d).map(|_| lcg(&mut seed)).collect();
        // Scattered slots per row.
        let table: Vec<i32> = (0..3 * cols)
            .map(|i| ((i * 37 + 11) % slots) as i32)
            .collect();
        for (window, softcap) in [(0, 0.0), (5, 0.0), (0, 0.7), (9, 1.5)] {
            let p = PagedExtend {
                q: &q,
                k: &k,
                v: &v,
                table: &table,
                table_cols: cols,
                rows: &[2, 0, 1],
                prefix_lens: &prefix,
                extend_lens: &ext,
                num_heads: hq,
                num_kv_heads: hkv,
                head_dim: d,
                scale: 0.3,
                window,
                softcap,
            };
            let want = reference(&p);
            for threads in [1, 3] {
                let mut out = vec![f32::NAN; q.len()];
                paged_extend(&p, &mut out, threads).unwrap();
                for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-5,
                        "d={d} w={window} cap={softcap} t={threads} [{i}]: {a} vs {b}"
                    );
                }
            }
            // The same pool in bf16 under f32 queries: the plain computation over the rounded
            // keys and values.
            let round = |x: &[f32]| -> Vec<Bf16> { x.iter().map(|&v| Bf16::from_f32(v)).collect() };
            let (kb, vb) = (round(&k), round(&v));
            let widen = |x: &[Bf16]| -> Vec<f32> { x.iter().map(|v| v.to_f32()).collect() };
            let (kr, vr) = (widen(&kb), widen(&vb));
            let want = reference(&PagedExtend {
                k: &kr,
                v: &vr,
                ..PagedExtend { ..p }
            });
            let mixed = over_pool(&p, &kb, &vb);
            let mut out = vec![f32::NAN; q.len()];
            paged_extend(&mixed, &mut out, 2).unwrap();
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "bf16 pool d={d}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (q, k, v) = (
            vec![0f32; 2 * 4 * 8],
            vec![0f32; 10 * 2 * 8],
            vec![0f32; 10 * 2 * 8],
        );
        let table = vec![0i32; 2 * 8];
        let mk =
            |rows: &'static [i64], prefix: &'static [i64], ext: &'static [i64], tbl| PagedExtend {
                q: &q,
                k: &k,
                v: &v,
                table: tbl,
                table_cols: 8,
                rows,
                prefix_lens: prefix,
                extend_lens: ext,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 8,
                scale: 1.0,
                window: 0,
                softcap: 0.0,
            };
        let mut out = vec![0f32; q.len()];
        assert!(paged_extend(&mk(&[5], &[0], &[2], &table), &mut out, 1).is_err());
        assert!(paged_extend(&mk(&[0], &[7], &[2], &table), &mut out, 1).is_err());
        assert!(paged_extend(&mk(&[0], &[0], &[3], &table), &mut out, 1).is_err());
        let bad = vec![99i32; 2 * 8];
        let e = paged_extend(&mk(&[0], &[0], &[2], &bad), &mut out, 1).unwrap_err();
        assert!(e.0.contains("outside the pool"), "{e}");
        assert!(paged_extend(&mk(&[0], &[0], &[2], &table), &mut out, 1).is_ok());
    }
}
