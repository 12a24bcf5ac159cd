//! Decode attention over the paged KV pool.
//!
//! A decode step has one query token per sequence. Sequence `b` attends to the keys and values
//! of its first `lens[b]` positions, whose KV slots are `table[rows[b], ..lens[b]]` (the
//! request-to-token table); the pool holds `[slots, kv_heads, head_dim]` per layer. The query
//! heads of a KV head (grouped-query attention) share each key and value load.
//!
//! Per (sequence, KV head): the scores of its query heads against every position, a softmax
//! per query head (max-subtracted, f32), then the probability-weighted sum of the values.
//! Options: a sliding window (only the last `window` positions attend: Mistral, Gemma's local
//! layers) and a logit soft-cap (scores become `cap * tanh(score / cap)`: Gemma 2).
//! Everything is f32 arithmetic whatever the storage type. Sequences run in parallel on
//! `threads` threads (a rayon pool kept for the process), one sequence per task.

use rayon::prelude::*;

use crate::elem::Elem;
use crate::math::{dot, exp_nonpositive, sum};
use crate::pool::pool;
use crate::KernelError;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86;

/// The inputs of one decode attention call; slices are row-major.
pub struct PagedDecode<'a, E: Elem, K: Elem = E> {
    /// `[batch, num_heads, head_dim]`
    pub q: &'a [E],
    /// `[slots, num_kv_heads, head_dim]`, one layer of the pool (its own storage type: a bf16
    /// pool serves f32 queries)
    pub k: &'a [K],
    /// `[slots, num_kv_heads, head_dim]`
    pub v: &'a [K],
    /// `[table_rows, table_cols]`: the KV slot of each position of each row
    pub table: &'a [i32],
    pub table_cols: usize,
    /// `[batch]`: each sequence's table row
    pub rows: &'a [i64],
    /// `[batch]`: each sequence's length (its positions 0 .. len attend)
    pub lens: &'a [i64],
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// multiplies q . k (usually head_dim^-0.5)
    pub scale: f32,
    /// 0: every position attends; else only the last `window` ones (the query's own included)
    pub window: usize,
    /// 0: none; else the scaled scores become `softcap * tanh(score / softcap)`
    pub softcap: f32,
}

impl<E: Elem, K: Elem> PagedDecode<'_, E, K> {
    fn batch(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn validate(&self, out_len: usize) -> Result<(), KernelError> {
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
        let b = self.batch();
        if self.lens.len() != b {
            return err(format!("{} lengths for {b} rows", self.lens.len()));
        }
        if self.q.len() != b * hq * d || out_len != self.q.len() {
            return err(format!(
                "q has {} and out {out_len} elements; expected [{b}, {hq}, {d}]",
                self.q.len()
            ));
        }
        let cols = self.table_cols;
        for (&row, &len) in self.rows.iter().zip(self.lens) {
            if row < 0 || row as usize >= table_rows {
                return err(format!(
                    "row {row} is outside the table's {table_rows} rows"
                ));
            }
            if len < 1 || len as usize > cols {
                return err(format!("length {len} is outside 1 ..= {cols}"));
            }
        }
        Ok(())
    }
}

/// The sizes an attention call over the paged pool reads (decode and extend alike).
pub(crate) struct PoolLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub softcap: f32,
    /// lengths of the pool's K and V and of the request-to-token table
    pub k: usize,
    pub v: usize,
    pub table: usize,
    pub table_cols: usize,
}

/// Checks the heads, the soft-cap, the pool (`[slots, kv_heads, head_dim]` each) and the
/// table (`[rows, cols]`); returns the table's rows.
pub(crate) fn check_layout(l: &PoolLayout) -> Result<usize, KernelError> {
    let err = |m: String| Err(KernelError(m));
    let (hq, hkv, d) = (l.num_heads, l.num_kv_heads, l.head_dim);
    if hq == 0 || hkv == 0 || d == 0 || !hq.is_multiple_of(hkv) {
        return err(format!(
            "{hq} query heads must be a positive multiple of {hkv} KV heads (head_dim {d})"
        ));
    }
    if !(l.softcap >= 0.0 && l.softcap.is_finite()) {
        return err(format!("soft-cap {} must be finite and >= 0", l.softcap));
    }
    if l.k != l.v || !l.k.is_multiple_of(hkv * d) {
        return err(format!(
            "k ({}) and v ({}) must both be [slots, {hkv}, {d}]",
            l.k, l.v
        ));
    }
    if l.table_cols == 0 || !l.table.is_multiple_of(l.table_cols) {
        return err(format!(
            "table of {} entries is not [rows, {}]",
            l.table, l.table_cols
        ));
    }
    Ok(l.table / l.table_cols)
}

/// Below this many (position, KV head) pairs a call runs on the calling thread: waking the
/// pool (and competing with torch's OpenMP threads, which spin after their own work) costs
/// more than the split saves.
const PARALLEL_MIN_WORK: usize = 32 * 1024;

/// Writes `out` (`[batch, num_heads, head_dim]`, the layout of `q`).
pub fn paged_decode<E: Elem, K: Elem>(
    p: &PagedDecode<'_, E, K>,
    out: &mut [E],
    threads: usize,
) -> Result<(), KernelError> {
    p.validate(out.len())?;
    let per_seq = p.num_heads * p.head_dim;
    if p.batch() == 0 {
        return Ok(());
    }
    let run = |s: &mut Scratch, (b, out_b): (usize, &mut [E])| sequence(p, s, b, out_b);
    let work = p.lens.iter().map(|&n| n as usize).sum::<usize>() * p.num_kv_heads;
    if threads <= 1 || p.batch() == 1 || work < PARALLEL_MIN_WORK {
        let mut scratch = Scratch::default();
        return out
            .chunks_mut(per_seq)
            .enumerate()
            .try_for_each(|item| run(&mut scratch, item));
    }
    pool(threads).install(|| {
        out.par_chunks_mut(per_seq)
            .enumerate()
            .try_for_each_init(Scratch::default, run)
    })
}

/// Per-thread buffers, reused across the sequences a thread runs.
#[derive(Default)]
pub(crate) struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    acc: Vec<f32>,
    kv: Vec<f32>,
    inv: Vec<f32>,
}

/// Sequence `b`'s attention into `out` (its `[num_heads, head_dim]`), `p` validated.
pub(crate) fn sequence<E: Elem, K: Elem>(
    p: &PagedDecode<'_, E, K>,
    scratch: &mut Scratch,
    b: usize,
    out: &mut [E],
) -> Result<(), KernelError> {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::applies(p.head_dim) {
            let slots = attending_slots(p, b)?;
            // SAFETY: `applies` checked the CPU and the head size; `p` is validated and the
            // slots inside the pool.
            unsafe { x86::sequence(p, scratch, b, slots, out) };
            return Ok(());
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, the only feature `sequence_avx2` is compiled for.
            return unsafe { sequence_avx2(p, scratch, b, out) };
        }
    }
    by_head_dim(p, scratch, b, out)
}

/// The body specialised for the common head sizes (fixed-length loops the compiler unrolls
/// and vectorises whole), and a generic one for the rest.
#[inline(always)]
fn by_head_dim<E: Elem, K: Elem>(
    p: &PagedDecode<'_, E, K>,
    scratch: &mut Scratch,
    b: usize,
    out: &mut [E],
) -> Result<(), KernelError> {
    match p.head_dim {
        16 => sequence_body::<E, K, 16>(p, scratch, b, out),
        32 => sequence_body::<E, K, 32>(p, scratch, b, out),
        64 => sequence_body::<E, K, 64>(p, scratch, b, out),
        128 => sequence_body::<E, K, 128>(p, scratch, b, out),
        _ => sequence_body::<E, K, 0>(p, scratch, b, out),
    }
}

/// The same code compiled for AVX2 (8-lane vectors); the arithmetic and its order are the
/// same as the baseline build's, so both give identical results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sequence_avx2<E: Elem, K: Elem>(
    p: &PagedDecode<'_, E, K>,
    scratch: &mut Scratch,
    b: usize,
    out: &mut [E],
) -> Result<(), KernelError> {
    by_head_dim(p, scratch, b, out)
}

/// Brings the cache lines of `row` toward the core ahead of their use.
#[inline(always)]
fn prefetch<E>(row: &[E]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(row);
        let base = row.as_ptr().cast::<i8>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: a prefetch never faults; the address lies inside `row`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(off)) };
            off += 64;
        }
    }
}

/// How many positions ahead the loops prefetch (the slots are scattered in the pool).
const AHEAD: usize = 4;

/// `src` as f32: itself when it is f32, else converted into `buf`.
#[inline(always)]
fn as_f32<'a, E: Elem>(src: &'a [E], buf: &'a mut [f32]) -> &'a [f32] {
    if let Some(s) = E::as_f32(src) {
        return s;
    }
    for (d, s) in buf.iter_mut().zip(src) {
        *d = s.to_f32();
    }
    &buf[..src.len()]
}

/// The KV slots of sequence `b`'s attending positions (the last `window` of it, or all),
/// checked to lie inside the pool.
fn attending_slots<'a, E: Elem, K: Elem>(
    p: &PagedDecode<'a, E, K>,
    b: usize,
) -> Result<&'a [i32], KernelError> {
    let end = p.lens[b] as usize;
    let row = p.rows[b] as usize;
    let first = if p.window > 0 {
        end.saturating_sub(p.window)
    } else {
        0
    };
    let slots = &p.table[row * p.table_cols + first..row * p.table_cols + end];
    let num_slots = p.k.len() / (p.num_kv_heads * p.head_dim);
    if let Some(&bad) = slots.iter().find(|&&s| s < 0 || s as usize >= num_slots) {
        return Err(KernelError(format!(
            "row {row} holds KV slot {bad}, outside the pool's {num_slots} slots"
        )));
    }
    Ok(slots)
}

/// One sequence's attention; `D` is the head size when it is known at compile time, else 0.
#[inline(always)]
fn sequence_body<E: Elem, K: Elem, const D: usize>(
    p: &PagedDecode<'_, E, K>,
    scratch: &mut Scratch,
    b: usize,
    out: &mut [E],
) -> Result<(), KernelError> {
    let (hq, hkv) = (p.num_heads, p.num_kv_heads);
    let d = if D == 0 { p.head_dim } else { D };
    let group = hq / hkv;
    let slots = attending_slots(p, b)?;
    let len = slots.len();
    let width = hkv * d; // one slot's row of the pool
    let Scratch {
        q,
        scores,
        acc,
        kv,
        inv,
    } = scratch;
    q.resize(hq * d, 0.0);
    scores.resize(hq * len, 0.0); // [query head, position]
    acc.resize(hq * d, 0.0);
    kv.resize(width, 0.0);
    inv.resize(hq, 0.0);
    for (x, v) in q.iter_mut().zip(&p.q[b * hq * d..(b + 1) * hq * d]) {
        *x = v.to_f32() * p.scale;
    }
    #[inline(always)]
    fn at<'a, E>(buf: &'a [E], slots: &[i32], width: usize, j: usize) -> &'a [E] {
        &buf[slots[j] as usize * width..][..width]
    }
    // Scores: each slot's row (all KV heads) is read once. The value rows are fetched along
    // (a sequence's rows fit in L2), so the second pass finds them near.
    for j in 0..len {
        if j + AHEAD < len {
            prefetch(at(p.k, slots, width, j + AHEAD));
            prefetch(at(p.v, slots, width, j + AHEAD));
        }
        let keys = as_f32(at(p.k, slots, width, j), kv);
        for (h, key) in keys.chunks_exact(d).enumerate() {
            for g in 0..group {
                let head = h * group + g;
                scores[head * len + j] = dot(&q[head * d..(head + 1) * d], key);
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
        let max = s
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
        for x in s.iter_mut() {
            *x = exp_nonpositive(*x - max);
        }
        inv[head] = 1.0 / sum(s);
    }
    acc.fill(0.0);
    for j in 0..len {
        if j + AHEAD < len {
            prefetch(at(p.v, slots, width, j + AHEAD));
        }
        let values = as_f32(at(p.v, slots, width, j), kv);
        for (h, value) in values.chunks_exact(d).enumerate() {
            for g in 0..group {
                let head = h * group + g;
                let w = scores[head * len + j];
                for (a, x) in acc[head * d..(head + 1) * d].iter_mut().zip(value) {
                    *a += w * x;
                }
            }
        }
    }
    for (head, (o, a)) in out.chunks_exact_mut(d).zip(acc.chunks_exact(d)).enumerate() {
        for (o, a) in o.iter_mut().zip(a) {
            *o = E::from_f32(a * inv[head]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elem::Bf16;

    /// A small deterministic generator (tests only).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    /// Attention written the plain way: gather each sequence's keys, softmax, weighted sum.
    fn reference(p: &PagedDecode<'_, f32>) -> Vec<f32> {
        let (hq, hkv, d) = (p.num_heads, p.num_kv_heads, p.head_dim);
        let mut out = vec![0f32; p.q.len()];
        for b in 0..p.batch() {
            let row = p.rows[b] as usize;
            let len = p.lens[b] as usize;
            let first = if p.window > 0 && len > p.window {
                len - p.window
            } else {
                0
            };
            for h in 0..hq {
                let kh = h / (hq / hkv);
                let q = &p.q[(b * hq + h) * d..][..d];
                let at = |buf: &[f32], j: usize| {
                    let slot = p.table[row * p.table_cols + j] as usize;
                    buf[(slot * hkv + kh) * d..][..d].to_vec()
                };
                let cap = f64::from(p.softcap);
                let s: Vec<f64> = (first..len)
                    .map(|j| {
                        let k = at(p.k, j);
                        let s = q.iter().zip(&k).map(|(a, b)| f64::from(a * b)).sum::<f64>()
                            * f64::from(p.scale);
                        if cap > 0.0 {
                            cap * (s / cap).tanh()
                        } else {
                            s
                        }
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    let v = at(p.v, first + j);
                    for (o, x) in out[(b * hq + h) * d..][..d].iter_mut().zip(&v) {
                        *o += (w / z) as f32 * x;
                    }
                }
            }
        }
        out
    }

    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        table: Vec<i32>,
        rows: Vec<i64>,
        lens: Vec<i64>,
    }

    const COLS: usize = 40;

    fn case(batch: usize, hq: usize, hkv: usize, d: usize, seed: u64) -> Case {
        let mut rng = Lcg(seed);
        let slots = 200;
        let table_rows = batch + 3;
        let mut table = vec![0i32; table_rows * COLS];
        for (i, t) in table.iter_mut().enumerate() {
            *t = ((i * 7919 + 13) % slots) as i32;
        }
        Case {
            q: (0..batch * hq * d).map(|_| rng.next()).collect(),
            k: (0..slots * hkv * d).map(|_| rng.next() * 2.0).collect(),
            v: (0..slots * hkv * d).map(|_| rng.next()).collect(),
            table,
            // Rows out of order and not all of them; lengths from 1 to the whole row.
            rows: (0..batch)
                .map(|b| ((b * 5 + 2) % table_rows) as i64)
                .collect(),
            lens: (0..batch).map(|b| (1 + (b * 17) % COLS) as i64).collect(),
        }
    }

    fn params<'a, E: Elem>(
        c: &'a Case,
        q: &'a [E],
        k: &'a [E],
        v: &'a [E],
        shape: (usize, usize, usize),
    ) -> PagedDecode<'a, E> {
        PagedDecode {
            q,
            k,
            v,
            table: &c.table,
            table_cols: COLS,
            rows: &c.rows,
            lens: &c.lens,
            num_heads: shape.0,
            num_kv_heads: shape.1,
            head_dim: shape.2,
            scale: (shape.2 as f32).powf(-0.5),
            window: 0,
            softcap: 0.0,
        }
    }

    fn worst(p: &PagedDecode<'_, f32>, threads: usize) -> f32 {
        let want = reference(p);
        let mut out = vec![0f32; p.q.len()];
        paged_decode(p, &mut out, threads).unwrap();
        out.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    #[test]
    fn sliding_window_and_softcap_match_the_plain_computation() {
        // Windows shorter than some sequences (lengths 1 ..= 40) and longer than others;
        // a cap small enough to bite (scores reach ~4 with these inputs).
        let c = case(9, 6, 2, 16, 11);
        for (window, softcap) in [(1, 0.0), (7, 0.0), (40, 0.0), (0, 1.5), (5, 2.0)] {
            let p = PagedDecode {
                window,
                softcap,
                ..params(&c, &c.q, &c.k, &c.v, (6, 2, 16))
            };
            for threads in [1, 3] {
                let off = worst(&p, threads);
                assert!(off < 1e-5, "window {window} cap {softcap}: off by {off}");
            }
        }
        // The options change the result (the reference is not blind to them).
        let plain = params(&c, &c.q, &c.k, &c.v, (6, 2, 16));
        let windowed = PagedDecode {
            window: 3,
            ..params(&c, &c.q, &c.k, &c.v, (6, 2, 16))
        };
        let capped = PagedDecode {
            softcap: 0.5,
            ..params(&c, &c.q, &c.k, &c.v, (6, 2, 16))
        };
        let base = reference(&plain);
        for other in [reference(&windowed), reference(&capped)] {
            let diff = base
                .iter()
                .zip(&other)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff > 1e-3, "option made no difference ({diff})");
        }
        let bad = PagedDecode {
            softcap: -1.0,
            ..params(&c, &c.q, &c.k, &c.v, (6, 2, 16))
        };
        let mut out = vec![0f32; c.q.len()];
        assert!(paged_decode(&bad, &mut out, 1)
            .unwrap_err()
            .0
            .contains("soft-cap"));
    }

    #[test]
    fn matches_the_plain_computation_for_every_head_layout() {
        // MHA, GQA, MQA; head dims that are and are not a multiple of the vector width.
        for (i, &(hq, hkv, d)) in [
            (4, 4, 16),
            (6, 2, 16),
            (8, 1, 64),
            (9, 3, 64),
            (4, 2, 128),
            (2, 1, 256),
            (3, 3, 12),
            (4, 2, 5),
        ]
        .iter()
        .enumerate()
        {
            let c = case(9, hq, hkv, d, i as u64);
            let p = params(&c, &c.q, &c.k, &c.v, (hq, hkv, d));
            let want = reference(&p);
            for threads in [1, 3] {
                let mut out = vec![0f32; c.q.len()];
                paged_decode(&p, &mut out, threads).unwrap();
                let worst = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-5,
                    "({hq}, {hkv}, {d}) threads {threads}: off by {worst}"
                );
            }
        }
    }

    #[test]
    fn threads_do_not_change_the_result() {
        // Enough work for the parallel path (PARALLEL_MIN_WORK).
        let c = case(1000, 8, 2, 32, 7);
        assert!(c.lens.iter().sum::<i64>() as usize * 2 >= PARALLEL_MIN_WORK);
        let p = params(&c, &c.q, &c.k, &c.v, (8, 2, 32));
        let mut one = vec![0f32; c.q.len()];
        let mut four = vec![0f32; c.q.len()];
        paged_decode(&p, &mut one, 1).unwrap();
        paged_decode(&p, &mut four, 4).unwrap();
        assert_eq!(one, four);
    }

    #[test]
    fn bf16_storage_computes_in_f32() {
        let c = case(5, 4, 2, 16, 3);
        let to_bf16 = |x: &[f32]| x.iter().map(|&v| Bf16::from_f32(v)).collect::<Vec<_>>();
        let (q, k, v) = (to_bf16(&c.q), to_bf16(&c.k), to_bf16(&c.v));
        let mut out = vec![Bf16::default(); q.len()];
        paged_decode(&params(&c, &q, &k, &v, (4, 2, 16)), &mut out, 1).unwrap();
        // The reference on the bf16-rounded inputs: only the output's rounding differs.
        let back = |x: &[Bf16]| x.iter().map(|v| v.to_f32()).collect::<Vec<_>>();
        let (qf, kf, vf) = (back(&q), back(&k), back(&v));
        let want = reference(&params(&c, &qf, &kf, &vf, (4, 2, 16)));
        for (o, w) in back(&out).iter().zip(&want) {
            assert!((o - w).abs() <= w.abs() / 128.0 + 1e-6, "{o} vs {w}");
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_reads_out_of_bounds() {
        let c = case(2, 4, 2, 8, 1);
        let mut out = vec![0f32; c.q.len()];
        let shape = (4, 2, 8);
        let mut p = params(&c, &c.q, &c.k, &c.v, shape);
        p.num_heads = 3;
        assert!(paged_decode(&p, &mut out, 1).is_err());
        let rows = [0, 99];
        let p = PagedDecode {
            rows: &rows,
            ..params(&c, &c.q, &c.k, &c.v, shape)
        };
        assert!(paged_decode(&p, &mut out, 1)
            .unwrap_err()
            .0
            .contains("row 99"));
        let lens = [1, COLS as i64 + 1];
        let p = PagedDecode {
            lens: &lens,
            ..params(&c, &c.q, &c.k, &c.v, shape)
        };
        assert!(paged_decode(&p, &mut out, 1).is_err());
        let mut table = c.table.clone();
        table[c.rows[1] as usize * COLS] = 10_000;
        let p = PagedDecode {
            table: &table,
            ..params(&c, &c.q, &c.k, &c.v, shape)
        };
        assert!(paged_decode(&p, &mut out, 2)
            .unwrap_err()
            .0
            .contains("KV slot 10000"));
    }
}
