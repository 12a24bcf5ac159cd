//! The decoder's tests: tiny dense models, decode and extend steps, bad inputs.

use super::*;
use crate::elem::Bf16;

struct Rng(u64);
impl Rng {
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }
}

const H: usize = 32;
const D: usize = 8;
const I: usize = 48;
const V: usize = 40;
const POS: usize = 16;

struct Weights {
    w: Vec<Vec<f32>>,
    ones: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn weights() -> Weights {
    let mut r = Rng(3);
    let shapes = [(V, H), (H + 2 * 2 * D, H), (H, H), (2 * I, H), (H, I)];
    let angles: Vec<f32> = (0..POS * D)
        .map(|i| (i / D) as f32 * 0.1 * ((i % (D / 2)) + 1) as f32)
        .collect();
    Weights {
        w: shapes.iter().map(|&(n, k)| r.vec(n * k, 0.3)).collect(),
        ones: vec![1.0; H],
        cos: angles.iter().map(|a| a.cos()).collect(),
        sin: angles.iter().map(|a| a.sin()).collect(),
    }
}

fn model(w: &Weights, layers: usize) -> Model<'_> {
    let dense = |i: usize, n: usize, k: usize| Part::Dense { w: &w.w[i], n, k };
    let lin = |i: usize, n: usize, k: usize| Linear {
        parts: vec![dense(i, n, k)],
        bias: None,
    };
    let norm = || Norm {
        weight: &w.ones,
        eps: 1e-6,
        gemma: false,
    };
    Model {
        hidden: H,
        heads: 4,
        kv_heads: 2,
        head_dim: D,
        intermediate: I,
        vocab: V,
        embed: dense(0, V, H),
        embed_scale: None,
        layers: (0..layers)
            .map(|_| Layer {
                input_norm: norm(),
                qkv: lin(1, H + 4 * D, H),
                q_norm: None,
                k_norm: None,
                rope: Rope {
                    cos: &w.cos,
                    sin: &w.sin,
                },
                scale: 0.35,
                window: 0,
                softcap: 0.0,
                o: lin(2, H, H),
                post_attn_norm: norm(),
                ff_norms: None,
                gate_up: lin(3, 2 * I, H),
                down: lin(4, H, I),
            })
            .collect(),
        norm: norm(),
        lm_head: lin(0, V, H),
        final_softcap: 0.0,
        act: Act::Silu,
    }
}

/// Runs one step of 3 sequences (lengths 1, 3, 2; the cache holds zeros before them).
fn step(dec: &Decoder<'_>, ids: &[i64], threads: usize) -> Result<Vec<f32>, KernelError> {
    step_with::<f32>(dec, ids, threads).map(|(logits, _)| logits)
}

/// `step` over a pool of `K`; also returns the first layer's keys.
fn step_with<K: Elem>(
    dec: &Decoder<'_>,
    ids: &[i64],
    threads: usize,
) -> Result<(Vec<f32>, Vec<f32>), KernelError> {
    let layers = dec.model().layers.len();
    let zero = K::from_f32(0.0);
    let mut pools: Vec<(Vec<K>, Vec<K>)> = (0..layers)
        .map(|_| (vec![zero; 8 * 2 * D], vec![zero; 8 * 2 * D]))
        .collect();
    let mut kv: Vec<KvLayer<'_, K>> = pools.iter_mut().map(|(k, v)| KvLayer { k, v }).collect();
    let table: Vec<i32> = (0..3 * 4).map(|i| i % 8).collect();
    let s = Step {
        ids,
        positions: &[0, 2, 1],
        out_loc: &[0, 6, 9 % 8],
        table: &table,
        table_cols: 4,
        rows: &[0, 1, 2],
        seqs: Seqs::Decode { lens: &[1, 3, 2] },
        logit_rows: None,
    };
    let mut logits = vec![f32::NAN; ids.len() * V];
    dec.forward(&s, &mut kv, &mut logits, threads)?;
    let keys = kv[0].k.iter().map(|x| x.to_f32()).collect();
    Ok((logits, keys))
}

#[test]
fn a_bf16_pool_holds_the_rounded_keys_and_attends_close_to_f32() {
    let w = weights();
    let dec = Decoder::new(model(&w, 2)).unwrap();
    let (want, keys) = step_with::<f32>(&dec, &[3, 7, 39], 2).unwrap();
    let (got, bf16_keys) = step_with::<Bf16>(&dec, &[3, 7, 39], 2).unwrap();
    let rounded: Vec<f32> = keys.iter().map(|&x| Bf16::from_f32(x).to_f32()).collect();
    assert_eq!(bf16_keys, rounded);
    assert!(keys
        .iter()
        .any(|&x| x != 0.0 && Bf16::from_f32(x).to_f32() != x));
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() <= 0.02 * scale, "{g} vs {w}");
    }
    assert_eq!(step_with::<Bf16>(&dec, &[3, 7, 39], 3).unwrap().0, got);
}

#[test]
fn threads_do_not_change_the_logits() {
    let w = weights();
    let dec = Decoder::new(model(&w, 2)).unwrap();
    let one = step(&dec, &[3, 7, 39], 1).unwrap();
    assert!(one.iter().all(|v| v.is_finite()));
    for threads in [2, 3] {
        assert_eq!(step(&dec, &[3, 7, 39], threads).unwrap(), one);
    }
}

/// A pool of 16 slots in f32, one per layer.
fn pool(layers: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
    (0..layers)
        .map(|_| (vec![0.0; 16 * 2 * D], vec![0.0; 16 * 2 * D]))
        .collect()
}

/// An extend step over `pools`: sequences in table rows 0 (slots 0..8) and 1 (8..16),
/// of `prefix` tokens already stored and `ids` new ones each.
fn extend(
    dec: &Decoder<'_>,
    pools: &mut [(Vec<f32>, Vec<f32>)],
    seqs: &[(i64, &[i64])],
    logit_rows: Option<&[i64]>,
) -> Result<Vec<f32>, KernelError> {
    let table: Vec<i32> = (0..16).collect();
    let (mut ids, mut positions, mut out_loc) = (vec![], vec![], vec![]);
    for (row, &(prefix, toks)) in seqs.iter().enumerate() {
        for (j, &t) in toks.iter().enumerate() {
            ids.push(t);
            positions.push(prefix + j as i64);
            out_loc.push(8 * row as i64 + prefix + j as i64);
        }
    }
    let rows: Vec<i64> = (0..seqs.len() as i64).collect();
    let prefix_lens: Vec<i64> = seqs.iter().map(|s| s.0).collect();
    let extend_lens: Vec<i64> = seqs.iter().map(|s| s.1.len() as i64).collect();
    let s = Step {
        ids: &ids,
        positions: &positions,
        out_loc: &out_loc,
        table: &table,
        table_cols: 8,
        rows: &rows,
        seqs: Seqs::Extend {
            prefix_lens: &prefix_lens,
            extend_lens: &extend_lens,
        },
        logit_rows,
    };
    let mut kv: Vec<KvLayer<'_, f32>> = pools.iter_mut().map(|(k, v)| KvLayer { k, v }).collect();
    let mut logits = vec![f32::NAN; logit_rows.map_or(ids.len(), |r| r.len()) * V];
    dec.forward(&s, &mut kv, &mut logits, 2)?;
    Ok(logits)
}

fn assert_close(got: &[f32], want: &[f32]) {
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5 * scale, "{g} vs {w}");
    }
}

#[test]
fn an_extend_step_matches_decoding_its_tokens_one_by_one() {
    let w = weights();
    let dec = Decoder::new(model(&w, 2)).unwrap();
    let (a, b): (&[i64], &[i64]) = (&[3, 7, 39, 5], &[11, 2]);
    let mut pools = pool(2);
    let all = extend(&dec, &mut pools, &[(0, a), (0, b)], None).unwrap();
    assert!(all.iter().all(|v| v.is_finite()));
    // The same tokens one decode step at a time, both sequences side by side.
    let mut one = pool(2);
    let table: Vec<i32> = (0..16).collect();
    for t in 0..a.len() {
        let (ids, mut positions, mut out_loc, mut rows, mut lens) = (
            vec![a[t]],
            vec![t as i64],
            vec![t as i64],
            vec![0],
            vec![t as i64 + 1],
        );
        let mut ids = ids;
        if t < b.len() {
            ids.push(b[t]);
            positions.push(t as i64);
            out_loc.push(8 + t as i64);
            rows.push(1);
            lens.push(t as i64 + 1);
        }
        let s = Step {
            ids: &ids,
            positions: &positions,
            out_loc: &out_loc,
            table: &table,
            table_cols: 8,
            rows: &rows,
            seqs: Seqs::Decode { lens: &lens },
            logit_rows: None,
        };
        let mut kv: Vec<KvLayer<'_, f32>> = one.iter_mut().map(|(k, v)| KvLayer { k, v }).collect();
        let mut logits = vec![f32::NAN; ids.len() * V];
        dec.forward(&s, &mut kv, &mut logits, 2).unwrap();
        assert_close(&logits[..V], &all[t * V..][..V]);
        if t < b.len() {
            assert_close(&logits[V..], &all[(a.len() + t) * V..][..V]);
        }
    }
    assert_close(&one[1].0, &pools[1].0);
    // The prompt's second half on top of its first, as chunked prefill runs it.
    let mut chunked = pool(2);
    extend(&dec, &mut chunked, &[(0, &a[..2])], None).unwrap();
    let rest = extend(&dec, &mut chunked, &[(2, &a[2..])], None).unwrap();
    assert_close(&rest, &all[2 * V..4 * V]);
    // Some tokens' logits only, in any order, repeats allowed.
    let picked = extend(&dec, &mut pool(2), &[(0, a), (0, b)], Some(&[5, 3, 5])).unwrap();
    for (j, r) in [5, 3, 5].into_iter().enumerate() {
        assert_eq!(&picked[j * V..][..V], &all[r * V..][..V]);
    }
}

#[test]
fn bad_models_and_steps_are_errors() {
    let w = weights();
    let mut bad = model(&w, 1);
    bad.layers[0].down = Linear {
        parts: vec![Part::Dense {
            w: &w.w[4],
            n: H,
            k: I - 1,
        }],
        bias: None,
    };
    assert!(Decoder::new(bad).is_err());
    let dec = Decoder::new(model(&w, 1)).unwrap();
    let e = step(&dec, &[3, 7, V as i64], 2).unwrap_err();
    assert!(e.0.contains("vocabulary"), "{e}");
    assert!(step(&dec, &[3, 7], 2).is_err()); // 2 ids for 3 positions
    let mut pools = pool(1);
    let e = extend(&dec, &mut pools, &[(0, &[3, 7])], Some(&[2])).unwrap_err();
    assert!(e.0.contains("logit row 2"), "{e}");
    let e = extend(&dec, &mut pools, &[(7, &[3, 7])], None).unwrap_err();
    assert!(e.0.contains("columns"), "{e}");
}
