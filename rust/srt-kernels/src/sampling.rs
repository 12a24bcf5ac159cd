//! The draw of sampled tokens on the CPU: top-k / top-p / min-p filtering of softmax
//! probabilities and one inverse-CDF draw per row, from a seeded counter-based uniform.
//!
//! It is the same computation, to the bit, as srt's torch sampler on the CPU
//! (`srt/layers/sampler.py`: `_top_k_top_p`, `_drop_below`, `_inverse_cdf`, `seeded_uniforms`),
//! whose float semantics it follows: cumulative sums accumulate in f64 and are rounded to f32
//! per element (torch's CPU cumsum), comparisons and products are f32. It replaces a dozen
//! full-width tensor passes per step with one walk per row over the kept tokens.
//!
//! Per row: of the tokens in (probability descending, id ascending) order, the first `top_k`
//! are candidates; of those, each whose preceding mass is within `top_p` of the candidates'
//! total is kept (the first always); then tokens below `min_p` times the largest probability
//! drop. The kept probabilities, in id order, are drawn from by inverse CDF with the row's
//! uniform: the first id whose cumulative mass exceeds `u * total`.

use rayon::prelude::*;

use crate::math::{exp_nonpositive, max, position, sum, widest};
use crate::pool::pool;
use crate::KernelError;

// splitmix64 (Steele, Lea, Flood 2014), as `srt.layers.sampler.splitmix64`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One float in [0, 1) per (seed, output index): its top 24 bits of a double splitmix64.
pub fn seeded_uniform(seed: i64, step: i64) -> f32 {
    let h = splitmix64(splitmix64(seed as u64).wrapping_add(step as u64));
    (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// What turns the sampling rows' logits into their distributions: output-token penalties,
/// temperature, softmax. `[S, V]` arrays are row-major.
pub struct Softmax<'a> {
    /// `[S, V]` logits (logit bias, repetition penalty and masks already applied)
    pub logits: &'a [f32],
    pub vocab: usize,
    /// `[S]`, positive (greedy rows hold 1)
    pub temperature: &'a [f32],
    /// Frequency / presence penalties (OpenAI semantics): the output-token counts table
    /// (`[R, V]`), each sampling row's row in it, and the per-row weights.
    pub counts: Option<&'a [f32]>,
    pub rows: &'a [i64],
    pub frequency: &'a [f32],
    pub presence: Option<&'a [f32]>,
}

/// Writes each row's probabilities, softmax((logits - frequency * count - presence *
/// \[count > 0\]) / temperature), into `probs`, and the first maximum of its penalised logits
/// (a greedy row's token) into `argmax`.
pub fn softmax(s: &Softmax<'_>, probs: &mut [f32], argmax: &mut [i64]) -> Result<(), KernelError> {
    softmax_threads(s, probs, argmax, 1)
}

/// [`softmax`] with the rows split over `threads` threads (the kernels' pool); each row is
/// computed alike, so the result is the same.
pub fn softmax_threads(
    s: &Softmax<'_>,
    probs: &mut [f32],
    argmax: &mut [i64],
    threads: usize,
) -> Result<(), KernelError> {
    let (n, v) = (argmax.len(), s.vocab);
    let fail = |m: String| Err(KernelError(m));
    if v == 0 || s.logits.len() != n * v || probs.len() != n * v {
        return fail(format!("logits / probs are not [{n}, {v}]"));
    }
    if s.temperature.len() != n {
        return fail(format!("{} temperatures for {n} rows", s.temperature.len()));
    }
    if let Some(counts) = s.counts {
        let table_rows = counts.len() / v;
        if counts.len() % v != 0 || s.rows.len() != n || s.frequency.len() != n {
            return fail(format!(
                "counts [{table_rows}, {v}], rows and weights must fit {n} rows"
            ));
        }
        if s.presence.is_some_and(|p| p.len() != n) {
            return fail(format!("presence weights must have {n} entries"));
        }
        if let Some(&r) = s.rows.iter().find(|&&r| r < 0 || r as usize >= table_rows) {
            return fail(format!(
                "row {r} is outside the counts table's {table_rows} rows"
            ));
        }
    }
    let per = per_task(n, threads);
    if per >= n {
        softmax_some(s, probs, argmax, 0);
    } else {
        pool(threads).install(|| {
            probs
                .par_chunks_mut(per * v)
                .zip(argmax.par_chunks_mut(per))
                .enumerate()
                .for_each(|(c, (p, a))| softmax_some(s, p, a, c * per))
        });
    }
    Ok(())
}

/// Rows per task for `n` rows on `threads` threads (`n`: one task).
fn per_task(n: usize, threads: usize) -> usize {
    if threads <= 1 || n < 2 {
        n.max(1)
    } else {
        n.div_ceil(threads)
    }
}

widest!(fn softmax_some(
    s: &Softmax<'_>,
    probs: &mut [f32],
    argmax: &mut [i64],
    first: usize,
) -> () => softmax_rows);

/// Rows `first ..` (as many as `argmax` holds) into `probs` / `argmax`.
#[inline(always)]
fn softmax_rows(s: &Softmax<'_>, probs: &mut [f32], argmax: &mut [i64], first: usize) {
    let v = s.vocab;
    for (i, (x, best)) in probs.chunks_exact_mut(v).zip(argmax.iter_mut()).enumerate() {
        let r = first + i;
        x.copy_from_slice(&s.logits[r * v..(r + 1) * v]);
        if let Some(counts) = s.counts {
            let c = &counts[s.rows[r] as usize * v..][..v];
            let f = s.frequency[r];
            for (x, &c) in x.iter_mut().zip(c) {
                *x -= c * f;
            }
            if let Some(presence) = s.presence {
                let p = presence[r];
                for (x, &c) in x.iter_mut().zip(c) {
                    *x -= if c > 0.0 { p } else { 0.0 };
                }
            }
        }
        let max = max(x);
        *best = position(x, max).unwrap_or(0) as i64;
        // Division is monotone, so the largest scaled logit is the scaled largest one.
        let t = s.temperature[r];
        let top = max / t;
        for y in x.iter_mut() {
            *y = exp_nonpositive(*y / t - top);
        }
        let inv = 1.0 / sum(x);
        for y in x.iter_mut() {
            *y *= inv;
        }
    }
}

/// The inputs of one draw; `[S, V]` arrays are row-major.
pub struct Draw<'a> {
    /// `[S, V]` softmax probabilities (non-negative)
    pub probs: &'a [f32],
    pub vocab: usize,
    /// Top-k / top-p: each row's probabilities sorted ascending (`[S, V]`), and how many of
    /// the largest any row keeps at most (the largest top_k, or V).
    pub sorted: Option<&'a [f32]>,
    pub candidates: usize,
    /// `[S]`: top_k (>= V: none), top_p (1: none), min_p (0: none, or no slice at all)
    pub top_k: &'a [i64],
    pub top_p: &'a [f32],
    pub min_p: Option<&'a [f32]>,
    /// `[S]`: each row's seed and output index
    pub seeds: &'a [i64],
    pub steps: &'a [i64],
}

impl Draw<'_> {
    fn validate(&self, out_len: usize) -> Result<(), KernelError> {
        let s = out_len;
        let v = self.vocab;
        let fail = |m: String| Err(KernelError(m));
        if v == 0 || self.probs.len() != s * v {
            return fail(format!(
                "probs has {} elements, not [{s}, {v}]",
                self.probs.len()
            ));
        }
        if self.sorted.is_some_and(|x| x.len() != s * v) {
            return fail(format!("sorted probs are not [{s}, {v}]"));
        }
        let lens = [
            self.top_k.len(),
            self.top_p.len(),
            self.seeds.len(),
            self.steps.len(),
        ];
        if lens.iter().any(|&n| n != s) || self.min_p.is_some_and(|m| m.len() != s) {
            return fail(format!("per-row parameters must all have {s} entries"));
        }
        Ok(())
    }
}

/// The sampled token of each row into `out` (`[S]`).
pub fn draw(d: &Draw<'_>, out: &mut [i64]) -> Result<(), KernelError> {
    draw_threads(d, out, 1)
}

/// [`draw`] with the rows split over `threads` threads (the same result: a row's draw is its
/// own).
pub fn draw_threads(d: &Draw<'_>, out: &mut [i64], threads: usize) -> Result<(), KernelError> {
    d.validate(out.len())?;
    let n = out.len();
    let per = per_task(n, threads);
    if per >= n {
        draw_rows(d, out, 0);
    } else {
        pool(threads).install(|| {
            out.par_chunks_mut(per)
                .enumerate()
                .for_each(|(c, o)| draw_rows(d, o, c * per))
        });
    }
    Ok(())
}

/// Rows `first ..` (as many as `out` holds).
fn draw_rows(d: &Draw<'_>, out: &mut [i64], first: usize) {
    let v = d.vocab;
    let mut kept = Vec::with_capacity(v);
    for (i, o) in out.iter_mut().enumerate() {
        let r = first + i;
        let probs = &d.probs[r * v..(r + 1) * v];
        let cut = match d.sorted {
            Some(sorted) => top_k_top_p(
                &sorted[r * v..(r + 1) * v],
                d.candidates,
                d.top_k[r],
                d.top_p[r],
            ),
            None => Cut::NONE,
        };
        let min_p = d.min_p.map_or(0.0, |m| m[r]);
        let floor = if min_p > 0.0 {
            let top = match d.sorted {
                Some(sorted) => sorted[(r + 1) * v - 1],
                None => probs
                    .iter()
                    .copied()
                    .fold(0f32, |m, x| if x > m { x } else { m }),
            };
            min_p * top
        } else {
            0.0
        };
        *o = inverse_cdf(
            probs,
            cut,
            floor,
            seeded_uniform(d.seeds[r], d.steps[r]),
            &mut kept,
        );
    }
}

/// What top-k / top-p keep of a row: every probability above `last`, and of those equal to
/// it the `equal` lowest ids (all of them when `equal` is `usize::MAX`).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cut {
    last: f32,
    equal: usize,
}

impl Cut {
    const NONE: Cut = Cut {
        last: 0.0,
        equal: usize::MAX,
    };
}

/// The cut of one row from its ascending values (see `_top_k_top_p`: ranks beyond top_k
/// count as 0; the kept ranks are those whose preceding mass is within top_p of the total).
fn top_k_top_p(ascending: &[f32], candidates: usize, top_k: i64, top_p: f32) -> Cut {
    let v = ascending.len();
    let cols = candidates.clamp(1, v);
    let k = if top_k > 0 {
        top_k as usize
    } else {
        usize::MAX
    };
    if k >= v && top_p >= 1.0 {
        return Cut::NONE;
    }
    let desc = |i: usize| if i < k { ascending[v - 1 - i] } else { 0.0 };
    // The total of the candidates (f64 accumulation rounded to f32, as cumsum's last entry).
    let mut acc = 0f64;
    for i in 0..cols {
        acc += f64::from(desc(i));
    }
    let bound = top_p * acc as f32;
    let mut acc = 0f64;
    let mut kept = 0;
    // NOTE: `acc as f32 - p` never decreases along the ranks (the rounded running sum does not,
    // p does not grow, and rounding is monotone), so the first rank that fails ends the kept
    // ones: the walk stops there instead of at the last candidate.
    for i in 0..cols.min(k) {
        let p = desc(i);
        acc += f64::from(p);
        if acc as f32 - p <= bound {
            kept += 1;
        } else {
            break;
        }
    }
    let kept = kept.max(1); // NaN rows only
    let last = desc(kept - 1);
    // When the next rank holds the same value, only the lowest ids of that value make it.
    let following = ascending[v - 1 - kept.min(v - 1)];
    if kept < v && following == last && last > 0.0 {
        let greater = (0..kept).filter(|&i| desc(i) > last).count();
        return Cut {
            last,
            equal: kept - greater,
        };
    }
    Cut {
        last,
        equal: usize::MAX,
    }
}

/// The draw over the kept probabilities of one row, in id order. Only kept entries move the
/// cumulative sum (adding 0 to it changes nothing), so the walk visits only those.
fn inverse_cdf(
    probs: &[f32],
    cut: Cut,
    floor: f32,
    uniform: f32,
    kept: &mut Vec<(u32, f32)>,
) -> i64 {
    let v = probs.len();
    kept.clear();
    if cut.equal == usize::MAX {
        let threshold = cut.last.max(floor);
        kept.extend(
            probs
                .iter()
                .enumerate()
                .filter(|(_, &p)| p >= threshold)
                .map(|(i, &p)| (i as u32, p)),
        );
    } else {
        let mut equal_left = cut.equal;
        for (i, &p) in probs.iter().enumerate() {
            let take = p > cut.last || (p == cut.last && equal_left > 0);
            if p == cut.last && take {
                equal_left -= 1;
            }
            if take && p >= floor {
                kept.push((i as u32, p));
            }
        }
    }
    let total = kept.iter().fold(0f64, |acc, &(_, p)| acc + f64::from(p)) as f32;
    let target = (uniform * total).min(next_down(total));
    let mut acc = 0f64;
    for &(i, p) in kept.iter() {
        acc += f64::from(p);
        if acc as f32 > target {
            return i64::from(i);
        }
    }
    // Nothing above the target: a row without mass (NaN, or all zero).
    (v - 1) as i64
}

/// The largest f32 below `x` toward zero (`nextafter(x, 0)`); 0 stays 0.
fn next_down(x: f32) -> f32 {
    if x > 0.0 && x.is_finite() {
        f32::from_bits(x.to_bits() - 1)
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(probs: &[f32], v: usize) -> Vec<f32> {
        let mut s = probs.to_vec();
        for row in s.chunks_exact_mut(v) {
            row.sort_by(f32::total_cmp);
        }
        s
    }

    fn one(probs: &[f32], top_k: i64, top_p: f32, min_p: f32, seed: i64) -> i64 {
        let v = probs.len();
        let s = sorted(probs, v);
        let d = Draw {
            probs,
            vocab: v,
            sorted: Some(&s),
            candidates: v,
            top_k: &[top_k],
            top_p: &[top_p],
            min_p: Some(&[min_p]),
            seeds: &[seed],
            steps: &[0],
        };
        let mut out = [0];
        draw(&d, &mut out).unwrap();
        out[0]
    }

    #[test]
    fn softmax_applies_penalties_then_temperature() {
        let logits = [1.0f32, 2.0, 3.0, 0.5, 2.0, 2.0];
        let counts = [0.0f32, 0.0, 0.0, 2.0, 0.0, 1.0, 9.0, 9.0, 9.0]; // rows 0, 1, 2
        let s = Softmax {
            logits: &logits,
            vocab: 3,
            temperature: &[1.0, 0.5],
            counts: Some(&counts),
            rows: &[0, 1],
            frequency: &[0.0, 0.25],
            presence: Some(&[0.0, 1.0]),
        };
        let (mut probs, mut argmax) = ([0f32; 6], [0i64; 2]);
        softmax(&s, &mut probs, &mut argmax).unwrap();
        // Row 1: [0.5 - 0.5 - 1, 2, 2 - 0.25 - 1] = [-1, 2, 0.75], then / 0.5.
        let want = |x: [f32; 3]| {
            let e = x.map(|y| (y / 0.5f32).exp());
            let z: f32 = e.iter().sum();
            e.map(|y| y / z)
        };
        for (got, want) in probs[3..].iter().zip(want([-1.0, 2.0, 0.75])) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert_eq!(argmax, [2, 1]);
        assert!((probs[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // Ties: the first maximum.
        let s = Softmax {
            logits: &[2.0, 5.0, 5.0],
            counts: None,
            ..s
        };
        let s = Softmax {
            temperature: &[1.0],
            ..s
        };
        let mut argmax = [0i64; 1];
        softmax(&s, &mut [0f32; 3], &mut argmax).unwrap();
        assert_eq!(argmax, [1]);
        let bad = Softmax {
            rows: &[0, 5],
            ..Softmax {
                counts: Some(&counts),
                ..s
            }
        };
        assert!(softmax(&bad, &mut [0f32; 3], &mut [0i64; 1]).is_err());
    }

    #[test]
    fn threads_do_not_change_distributions_or_draws() {
        let (n, v) = (7, 300);
        let logits: Vec<f32> = (0..n * v)
            .map(|i| ((i * 7919 % 1009) as f32 - 500.0) * 0.01)
            .collect();
        let temperature: Vec<f32> = (0..n).map(|r| 0.5 + r as f32 * 0.1).collect();
        let counts: Vec<f32> = (0..n * v).map(|i| (i % 3) as f32).collect();
        let rows: Vec<i64> = (0..n as i64).rev().collect();
        let s = Softmax {
            logits: &logits,
            vocab: v,
            temperature: &temperature,
            counts: Some(&counts),
            rows: &rows,
            frequency: &[0.1; 7],
            presence: Some(&[0.2; 7]),
        };
        let run = |threads: usize| {
            let (mut probs, mut argmax) = (vec![0f32; n * v], vec![0i64; n]);
            softmax_threads(&s, &mut probs, &mut argmax, threads).unwrap();
            let mut sorted = probs.clone();
            for row in sorted.chunks_exact_mut(v) {
                row.sort_by(f32::total_cmp);
            }
            let d = Draw {
                probs: &probs,
                vocab: v,
                sorted: Some(&sorted),
                candidates: v,
                top_k: &[0, 5, 0, 50, 0, 1, 0],
                top_p: &[0.9, 1.0, 0.5, 0.95, 1.0, 1.0, 0.7],
                min_p: Some(&[0.0, 0.0, 0.1, 0.0, 0.05, 0.0, 0.0]),
                seeds: &[1, 2, 3, 4, 5, 6, 7],
                steps: &[0, 1, 2, 3, 4, 5, 6],
            };
            let mut out = vec![0i64; n];
            draw_threads(&d, &mut out, threads).unwrap();
            (probs, argmax, out)
        };
        let one = run(1);
        assert_eq!(one, run(3));
        assert_eq!(one, run(16));
    }

    #[test]
    fn uniforms_match_the_reference_values() {
        // splitmix64's published first output for state 0 is 0xE220A8397B1DCDAF.
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        let u = seeded_uniform(7, 3);
        assert!((0.0..1.0).contains(&u));
        assert_eq!(u, seeded_uniform(7, 3));
        assert_ne!(u, seeded_uniform(7, 4));
    }

    #[test]
    fn filters_keep_exactly_what_they_say() {
        let probs = [0.1f32, 0.4, 0.05, 0.3, 0.15];
        for seed in 0..200 {
            // top_k 1 is the argmax; top_k 2 keeps ids 1 and 3.
            assert_eq!(one(&probs, 1, 1.0, 0.0, seed), 1);
            assert!([1, 3].contains(&one(&probs, 2, 1.0, 0.0, seed)));
            // top_p 0.5: 0.4 alone leaves 0.4 < 0.5 of the mass before 0.3, so 0.3 stays.
            assert!([1, 3].contains(&one(&probs, 0, 0.5, 0.0, seed)));
            // min_p 0.5: at least 0.2 kept: ids 1 and 3.
            assert!([1, 3].contains(&one(&probs, 0, 1.0, 0.5, seed)));
        }
        // Every token can be drawn without filters.
        let mut seen = [false; 5];
        for seed in 0..500 {
            seen[one(&probs, 0, 1.0, 0.0, seed) as usize] = true;
        }
        assert_eq!(seen, [true; 5]);
    }

    #[test]
    fn ties_at_the_cut_go_to_the_lowest_ids() {
        let probs = [0.2f32, 0.1, 0.2, 0.2, 0.3];
        for seed in 0..300 {
            // top_k 2: 0.3 (id 4) and the lowest id of the 0.2s (id 0).
            assert!([0, 4].contains(&one(&probs, 2, 1.0, 0.0, seed)));
            assert!([0, 2, 4].contains(&one(&probs, 3, 1.0, 0.0, seed)));
        }
    }

    #[test]
    fn zero_mass_rows_and_bad_shapes_do_not_fault() {
        let probs = [0f32; 4];
        assert!((0..4).contains(&one(&probs, 0, 1.0, 0.0, 1)));
        let nan = [f32::NAN; 4];
        assert!((0..4).contains(&one(&nan, 2, 0.9, 0.1, 1)));
        let d = Draw {
            probs: &probs,
            vocab: 4,
            sorted: None,
            candidates: 4,
            top_k: &[0, 0],
            top_p: &[1.0],
            min_p: None,
            seeds: &[0],
            steps: &[0],
        };
        assert!(draw(&d, &mut [0]).is_err());
    }
}
