//! What a [`super::Decoder`] runs: the model's weights and options ([`Model`], borrowed from
//! their owner, e.g. numpy arrays), one step's inputs ([`Step`]) and the KV pool it writes
//! ([`KvLayer`]); each weight form checks its own shape.

use crate::elem::Elem;
use crate::quant::{self, QType};
use crate::quant_packed::PackedRef;
use crate::KernelError;

/// One weight matrix `[n, k]` in one of the forms the kernels multiply.
pub enum Part<'a> {
    /// Repacked GGUF weights ([`crate::quant_packed::pack`]), integer or f32 activations (the CPU's
    /// kernel: `quant_packed::Acts`).
    Packed(PackedRef<'a>),
    /// GGUF blocks of `qt` (`[n, row_bytes]`), f32 activations.
    Blocks {
        qt: QType,
        w: &'a [u8],
        n: usize,
        k: usize,
    },
    /// Plain f32 rows.
    Dense { w: &'a [f32], n: usize, k: usize },
}

impl Part<'_> {
    pub fn n(&self) -> usize {
        match self {
            Part::Packed(w) => w.n,
            Part::Blocks { n, .. } | Part::Dense { n, .. } => *n,
        }
    }

    pub fn k(&self) -> usize {
        match self {
            Part::Packed(w) => w.k,
            Part::Blocks { k, .. } | Part::Dense { k, .. } => *k,
        }
    }

    pub(super) fn check(&self) -> Result<(), KernelError> {
        match self {
            Part::Packed(w) => w.check(),
            Part::Blocks { qt, w, n, k } => quant::check(*qt, w, *n, *k),
            Part::Dense { w, n, k } if w.len() != n * k => Err(KernelError(format!(
                "dense weights of [{n}, {k}] hold {} values",
                w.len()
            ))),
            Part::Dense { .. } => Ok(()),
        }
    }

    /// Row `row` as f32 (`out`: `k` values), bit for bit the dequantized weights.
    pub(super) fn row(&self, row: usize, out: &mut [f32]) -> Result<(), KernelError> {
        match self {
            Part::Packed(w) => {
                w.dequantize_row(row, out);
                Ok(())
            }
            Part::Blocks { qt, w, k, .. } => {
                let rb = qt.row_bytes(*k);
                quant::dequantize(*qt, &w[row * rb..(row + 1) * rb], 1, *k, out, 1)
            }
            Part::Dense { w, k, .. } => {
                out.copy_from_slice(&w[row * k..(row + 1) * k]);
                Ok(())
            }
        }
    }
}

/// `y = x W^T (+ bias)` with W the row concatenation of `parts` (stacked projections, or
/// shards of different formats).
pub struct Linear<'a> {
    pub parts: Vec<Part<'a>>,
    pub bias: Option<&'a [f32]>,
}

impl Linear<'_> {
    pub fn n(&self) -> usize {
        self.parts.iter().map(Part::n).sum()
    }

    pub(super) fn check(&self, what: &str, k: usize, n: usize) -> Result<(), KernelError> {
        let fail = |m: String| Err(KernelError(format!("{what}: {m}")));
        if self.parts.is_empty() {
            return fail("no weights".into());
        }
        for p in &self.parts {
            p.check().or_else(|e| fail(e.0))?;
            if p.k() != k {
                return fail(format!("weights of {} inputs, expected {k}", p.k()));
            }
        }
        if self.n() != n {
            return fail(format!("{} outputs, expected {n}", self.n()));
        }
        match self.bias {
            Some(b) if b.len() != n => fail(format!("bias of {} values for {n} outputs", b.len())),
            _ => Ok(()),
        }
    }
}

/// An RMSNorm's weight and options (Gemma: scale by `1 + weight`).
pub struct Norm<'a> {
    pub weight: &'a [f32],
    pub eps: f32,
    pub gemma: bool,
}

/// A RoPE table pair, `[positions, head_dim]` each (the halves' frequencies repeated).
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// The gated activation of the MLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Silu,
    /// GELU, tanh-approximated (Gemma).
    GeluTanh,
}

pub struct Layer<'a> {
    pub input_norm: Norm<'a>,
    pub qkv: Linear<'a>,
    pub q_norm: Option<Norm<'a>>,
    pub k_norm: Option<Norm<'a>>,
    pub rope: Rope<'a>,
    /// multiplies q . k
    pub scale: f32,
    /// 0: none; else only the last `window` positions attend
    pub window: usize,
    /// 0: none; else attention scores become `softcap * tanh(score / softcap)`
    pub softcap: f32,
    pub o: Linear<'a>,
    pub post_attn_norm: Norm<'a>,
    /// Gemma 2/3's norms before and after the MLP (the attention output is normed alone).
    pub ff_norms: Option<(Norm<'a>, Norm<'a>)>,
    pub gate_up: Linear<'a>,
    pub down: Linear<'a>,
}

pub struct Model<'a> {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// `[vocab, hidden]`
    pub embed: Part<'a>,
    pub embed_scale: Option<f32>,
    pub layers: Vec<Layer<'a>>,
    pub norm: Norm<'a>,
    /// `[vocab, hidden]`
    pub lm_head: Linear<'a>,
    /// 0: none; else logits become `cap * tanh(logit / cap)`
    pub final_softcap: f32,
    pub act: Act,
}

/// The step's inputs. Tokens (`ids`, `positions`, `out_loc`) come sequence by sequence.
pub struct Step<'a> {
    pub ids: &'a [i64],
    pub positions: &'a [i64],
    /// each token's KV slot
    pub out_loc: &'a [i64],
    /// `[table_rows, table_cols]`: the request-to-token table, holding this step's slots
    pub table: &'a [i32],
    pub table_cols: usize,
    /// each sequence's table row
    pub rows: &'a [i64],
    pub seqs: Seqs<'a>,
    /// The tokens whose logits the step computes, in the order of its output rows; `None`:
    /// every token's.
    pub logit_rows: Option<&'a [i64]>,
}

/// How the step's tokens belong to its sequences.
#[derive(Clone, Copy)]
pub enum Seqs<'a> {
    /// One token per sequence; each sequence's length, this token included.
    Decode { lens: &'a [i64] },
    /// Sequence `i` computes `extend_lens[i]` tokens after `prefix_lens[i]` already in the
    /// pool (a prompt, or its next chunk), each attending causally.
    Extend {
        prefix_lens: &'a [i64],
        extend_lens: &'a [i64],
    },
}

/// One layer's KV pool, `[slots, kv_heads, head_dim]` each, f32 or bf16 ([`Elem`]): the
/// step's keys and values are rounded to it when stored.
pub struct KvLayer<'a, K: Elem = f32> {
    pub k: &'a mut [K],
    pub v: &'a mut [K],
}
