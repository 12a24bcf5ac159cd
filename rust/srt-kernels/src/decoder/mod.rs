//! A whole step (decode or prefill) of a Llama-family decoder on the CPU in one call: the CPU's
//! answer to a CUDA graph.
//!
//! The torch forward of a decode step on the CPU is a few hundred small operations, each
//! paying Python and dispatch costs that, for a small model, exceed its arithmetic; and each
//! kernel either runs on one core or wakes a thread pool for a few microseconds of work.
//! [`Decoder::forward`] runs the step (embedding lookup, every layer, the final norm and the
//! logits) as one walk of a [`team`] of threads over the same kernels srt's layers call one
//! by one: [`rms_norm`], the packed GGUF product ([`quant_packed`]), the GGUF block product
//! ([`quant`]), `rotate_head` and the paged [`attention`] (decode) or [`extend`] (prefill)
//! attention. Each row and each output column is computed by the same code in the same order
//! as the layer-by-layer path, so the two agree to the bit for the GGUF formats (dense f32
//! weights use their own dot product).
//!
//! A layer: `h = norm(res += x)`; `qkv = h W_qkv^T (+ b)`; q/k norms, RoPE, k and v stored at
//! the step's KV slots; attention over the paged pool; `x = attn W_o^T (+ b)`; then either
//! `h = norm(res += x)` or, with sandwich norms (Gemma 2/3), `h = pre(res += post_attn(x))`;
//! `x = act(h W_gu^T) W_down^T`, and with sandwich norms `x = post_ff(x)`. Layer 0 starts from
//! `res = embed(ids) * embed_scale` without the add.

use std::sync::Mutex;

use crate::attention::{self, PagedDecode};
use crate::elem::Elem;
use crate::elementwise::{rms_norm, silu_and_mul};
use crate::extend::{self, PagedExtend};
use crate::math::dot;
use crate::quant;
use crate::quant_packed::{self, Acts};
use crate::rope::rotate_head;
use crate::team::{self, Member};
use crate::KernelError;

mod model;

pub use model::{Act, KvLayer, Layer, Linear, Model, Norm, Part, Rope, Seqs, Step};

/// A chunk of a product: rows `start..end` of part `part`, whose outputs start at `col`.
#[derive(Clone, Copy)]
struct Chunk {
    part: usize,
    col: usize,
    start: usize,
    end: usize,
}

/// Chunks of output rows a product is cut into: enough for the members to share unevenly
/// loaded cores, few enough that claiming them costs nothing next to the work.
const CHUNKS_PER_PRODUCT: usize = 16;
const MIN_CHUNK_ROWS: usize = 16;

fn chunks(lin: &Linear<'_>) -> Vec<Chunk> {
    // NOTE: whole multiples of 16 rows: the AMX kernel's tiles (it leaves other rows to FMA).
    let rows = lin
        .n()
        .div_ceil(CHUNKS_PER_PRODUCT)
        .next_multiple_of(16)
        .max(MIN_CHUNK_ROWS);
    let mut out = Vec::new();
    let mut col = 0;
    for (part, p) in lin.parts.iter().enumerate() {
        let n = p.n();
        out.extend((0..n).step_by(rows).map(|start| Chunk {
            part,
            col,
            start,
            end: (start + rows).min(n),
        }));
        col += n;
    }
    out
}

/// The chunk plans of a layer's products.
struct LayerPlan {
    qkv: Vec<Chunk>,
    o: Vec<Chunk>,
    gate_up: Vec<Chunk>,
    down: Vec<Chunk>,
}

/// A validated [`Model`] and its products' chunk plans.
pub struct Decoder<'a> {
    model: Model<'a>,
    layers: Vec<LayerPlan>,
    lm_head: Vec<Chunk>,
    rope_positions: usize,
}

/// A shared step buffer: members write disjoint rows or columns of it within an operation
/// and read it in later ones (the team orders the operations).
struct Buf<T = f32>(*mut T, usize);
// SAFETY: see `Buf`: concurrent writes are to disjoint elements, reads follow the writes'
// operation.
unsafe impl<T> Send for Buf<T> {}
unsafe impl<T> Sync for Buf<T> {}
impl<T> Clone for Buf<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Buf<T> {}

impl<T> Buf<T> {
    fn of(v: &mut [T]) -> Buf<T> {
        Buf(v.as_mut_ptr(), v.len())
    }

    /// # Safety
    /// No one writes the buffer during the current operation.
    unsafe fn all<'x>(self) -> &'x [T] {
        unsafe { std::slice::from_raw_parts(self.0, self.1) }
    }

    /// Row `i` of rows of `w` values.
    ///
    /// # Safety
    /// No one else reads or writes that row during the current operation.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row<'x>(self, i: usize, w: usize) -> &'x mut [T] {
        assert!(
            (i + 1) * w <= self.1,
            "row {i} of {w} outside a buffer of {}",
            self.1
        );
        unsafe { std::slice::from_raw_parts_mut(self.0.add(i * w), w) }
    }
}

/// A member's own scratch.
#[derive(Default)]
struct Scratch {
    attn: attention::Scratch,
    extend: extend::Scratch,
    row: Vec<f32>,
}

/// What checking a step found: its extend attention's tasks (the same in every layer), and
/// how many logit rows it computes.
struct StepPlan {
    tasks: Vec<extend::Task>,
    logit_rows: usize,
}

impl<'a> Decoder<'a> {
    /// Checks every shape of `model` once; the steps then check only their inputs.
    pub fn new(model: Model<'a>) -> Result<Decoder<'a>, KernelError> {
        let m = &model;
        let (h, d) = (m.hidden, m.head_dim);
        let (q, kv) = (m.heads * d, m.kv_heads * d);
        if h == 0 || d == 0 || d % 2 != 0 || m.heads == 0 || m.kv_heads == 0 {
            return fail(format!(
                "hidden {h}, head_dim {d} (even), {} heads, {} KV heads must be positive",
                m.heads, m.kv_heads
            ));
        }
        if !m.heads.is_multiple_of(m.kv_heads) {
            return fail(format!(
                "{} heads are not a multiple of {} KV heads",
                m.heads, m.kv_heads
            ));
        }
        m.embed.check()?;
        if m.embed.n() != m.vocab || m.embed.k() != h {
            return fail(format!(
                "embedding [{}, {}], expected [{}, {h}]",
                m.embed.n(),
                m.embed.k(),
                m.vocab
            ));
        }
        let norm = |what: &str, n: &Norm<'_>, size: usize| {
            if n.weight.len() != size {
                return fail(format!(
                    "{what}: {} weights, expected {size}",
                    n.weight.len()
                ));
            }
            Ok(())
        };
        let mut rope_positions = usize::MAX;
        for (i, l) in m.layers.iter().enumerate() {
            let at = |what: &str| format!("layer {i} {what}");
            norm(&at("input norm"), &l.input_norm, h)?;
            norm(&at("post-attention norm"), &l.post_attn_norm, h)?;
            for (what, n) in [("q norm", &l.q_norm), ("k norm", &l.k_norm)] {
                if let Some(n) = n {
                    norm(&at(what), n, d)?;
                }
            }
            if let Some((pre, post)) = &l.ff_norms {
                norm(&at("pre-MLP norm"), pre, h)?;
                norm(&at("post-MLP norm"), post, h)?;
            }
            l.qkv.check(&at("qkv"), h, q + 2 * kv)?;
            l.o.check(&at("o"), q, h)?;
            l.gate_up.check(&at("gate_up"), h, 2 * m.intermediate)?;
            l.down.check(&at("down"), m.intermediate, h)?;
            let r = &l.rope;
            if r.cos.len() != r.sin.len() || r.cos.is_empty() || r.cos.len() % d != 0 {
                return fail(format!(
                    "layer {i} RoPE tables of {} / {} values are not [positions, {d}]",
                    r.cos.len(),
                    r.sin.len()
                ));
            }
            rope_positions = rope_positions.min(r.cos.len() / d);
            if !(l.softcap >= 0.0 && l.softcap.is_finite()) {
                return fail(format!("layer {i} soft-cap {} must be >= 0", l.softcap));
            }
        }
        norm("final norm", &m.norm, h)?;
        m.lm_head.check("lm_head", h, m.vocab)?;
        if !(m.final_softcap >= 0.0 && m.final_softcap.is_finite()) {
            return fail(format!("final soft-cap {} must be >= 0", m.final_softcap));
        }
        let layers = m
            .layers
            .iter()
            .map(|l| LayerPlan {
                qkv: chunks(&l.qkv),
                o: chunks(&l.o),
                gate_up: chunks(&l.gate_up),
                down: chunks(&l.down),
            })
            .collect();
        let lm_head = chunks(&m.lm_head);
        Ok(Decoder {
            model,
            layers,
            lm_head,
            rope_positions,
        })
    }

    pub fn model(&self) -> &Model<'a> {
        &self.model
    }

    /// Runs the step on `threads` threads: `logits` (`[logit rows, vocab]`, see
    /// [`Step::logit_rows`]), and every token's K and V stored at `out_loc` in `kv` (one entry
    /// per layer). A decode step and an extend (prefill) step differ only in their attention.
    pub fn forward<K: Elem>(
        &self,
        step: &Step<'_>,
        kv: &mut [KvLayer<'_, K>],
        logits: &mut [f32],
        threads: usize,
    ) -> Result<(), KernelError> {
        let m = &self.model;
        let b = step.ids.len();
        let (h, d) = (m.hidden, m.head_dim);
        let (q, kvw) = (m.heads * d, m.kv_heads * d);
        let mut qs = vec![0f32; b * q];
        let plan = self.check_step(step, kv, logits.len(), &qs)?;
        if b == 0 {
            return Ok(());
        }
        let mut res = vec![0f32; b * h];
        let mut x = vec![0f32; b * h];
        let mut hn = vec![0f32; b * h];
        let mut tmp = vec![0f32; b * h];
        let mut sel = vec![
            0f32;
            if step.logit_rows.is_some() {
                plan.logit_rows * h
            } else {
                0
            }
        ];
        let mut qkv = vec![0f32; b * (q + 2 * kvw)];
        let mut attn = vec![0f32; b * q];
        let mut gu = vec![0f32; b * 2 * m.intermediate];
        let mut act = vec![0f32; b * m.intermediate];
        let bufs = Bufs {
            res: Buf::of(&mut res),
            x: Buf::of(&mut x),
            h: Buf::of(&mut hn),
            tmp: Buf::of(&mut tmp),
            sel: Buf::of(&mut sel),
            qkv: Buf::of(&mut qkv),
            q: Buf::of(&mut qs),
            attn: Buf::of(&mut attn),
            gu: Buf::of(&mut gu),
            act: Buf::of(&mut act),
            logits: Buf::of(logits),
        };
        let pools: Vec<(Buf<K>, Buf<K>)> = kv
            .iter_mut()
            .map(|l| (Buf::of(l.k), Buf::of(l.v)))
            .collect();
        let threads = threads.max(1);
        let scratch: Vec<Mutex<Scratch>> = (0..threads).map(|_| Mutex::default()).collect();
        let max_ops = 5 + 11 * m.layers.len();
        team::run(threads, max_ops, |member| {
            let mut s = scratch[member.index()]
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.walk(member, step, b, &plan, &bufs, &pools, &mut s);
        })
    }

    /// Checks the step's inputs against the model and the pool (`q`: a query buffer of the
    /// step's size, for the attention's own checks).
    fn check_step<K: Elem>(
        &self,
        s: &Step<'_>,
        kv: &[KvLayer<'_, K>],
        logits: usize,
        q: &[f32],
    ) -> Result<StepPlan, KernelError> {
        let m = &self.model;
        let b = s.ids.len();
        if [s.positions.len(), s.out_loc.len()] != [b; 2] {
            return fail(format!(
                "{b} ids, {} positions, {} KV slots",
                s.positions.len(),
                s.out_loc.len(),
            ));
        }
        match s.seqs {
            Seqs::Decode { lens } => {
                if [s.rows.len(), lens.len()] != [b; 2] {
                    return fail(format!(
                        "a decode step of {b} tokens has {} rows and {} lengths",
                        s.rows.len(),
                        lens.len()
                    ));
                }
            }
            Seqs::Extend {
                prefix_lens,
                extend_lens,
            } => {
                let total: i64 = extend_lens.iter().sum();
                if total != b as i64 || extend_lens.iter().any(|&n| n < 0) {
                    return fail(format!(
                        "extend lengths {extend_lens:?} do not add up to the step's {b} tokens"
                    ));
                }
                if [prefix_lens.len(), extend_lens.len()] != [s.rows.len(); 2] {
                    return fail(format!(
                        "{} rows, {} prefix lengths, {} extend lengths",
                        s.rows.len(),
                        prefix_lens.len(),
                        extend_lens.len()
                    ));
                }
            }
        }
        let logit_rows = match s.logit_rows {
            None => b,
            Some(rows) => {
                if let Some(&r) = rows.iter().find(|&&r| r < 0 || r as usize >= b) {
                    return fail(format!("logit row {r} is outside the step's {b} tokens"));
                }
                rows.len()
            }
        };
        if logits != logit_rows * m.vocab {
            return fail(format!(
                "logits hold {logits} values, not {logit_rows} x {}",
                m.vocab
            ));
        }
        if kv.len() != m.layers.len() {
            return fail(format!(
                "{} KV layers for {} layers",
                kv.len(),
                m.layers.len()
            ));
        }
        let width = m.kv_heads * m.head_dim;
        let slots = kv[..].first().map_or(0, |l| l.k.len() / width);
        for (i, l) in kv.iter().enumerate() {
            if l.k.len() != slots * width || l.v.len() != slots * width {
                return fail(format!(
                    "KV layer {i}: k {} / v {} values, expected [{slots}, {width}]",
                    l.k.len(),
                    l.v.len()
                ));
            }
        }
        if let Some(&id) = s.ids.iter().find(|&&t| t < 0 || t as usize >= m.vocab) {
            return fail(format!(
                "token id {id} is outside the vocabulary of {}",
                m.vocab
            ));
        }
        if let Some(&p) = s
            .positions
            .iter()
            .find(|&&p| p < 0 || p as usize >= self.rope_positions)
        {
            return fail(format!(
                "position {p} is outside the RoPE table's {} positions",
                self.rope_positions
            ));
        }
        if let Some(&loc) = s.out_loc.iter().find(|&&l| l < 0 || l as usize >= slots) {
            return fail(format!("KV slot {loc} is outside the pool's {slots} slots"));
        }
        let mut tasks = Vec::new();
        if b > 0 && !kv.is_empty() {
            // The table, rows and lengths as the attention reads them (the same every layer).
            let (k, v, l) = (&kv[0].k[..], &kv[0].v[..], &m.layers[0]);
            match s.seqs {
                Seqs::Decode { lens } => self.decode_args(k, v, q, s, lens, l).validate(q.len())?,
                Seqs::Extend {
                    prefix_lens,
                    extend_lens,
                } => {
                    tasks = self
                        .extend_args(k, v, q, s, prefix_lens, extend_lens, l)
                        .validate(q.len())?
                }
            }
        }
        Ok(StepPlan { tasks, logit_rows })
    }

    fn decode_args<'x, K: Elem>(
        &self,
        k: &'x [K],
        v: &'x [K],
        q: &'x [f32],
        s: &'x Step<'_>,
        lens: &'x [i64],
        l: &Layer<'_>,
    ) -> PagedDecode<'x, f32, K> {
        let m = &self.model;
        PagedDecode {
            q,
            k,
            v,
            table: s.table,
            table_cols: s.table_cols,
            rows: s.rows,
            lens,
            num_heads: m.heads,
            num_kv_heads: m.kv_heads,
            head_dim: m.head_dim,
            scale: l.scale,
            window: l.window,
            softcap: l.softcap,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn extend_args<'x, K: Elem>(
        &self,
        k: &'x [K],
        v: &'x [K],
        q: &'x [f32],
        s: &'x Step<'_>,
        prefix_lens: &'x [i64],
        extend_lens: &'x [i64],
        l: &Layer<'_>,
    ) -> PagedExtend<'x, f32, K> {
        let m = &self.model;
        PagedExtend {
            q,
            k,
            v,
            table: s.table,
            table_cols: s.table_cols,
            rows: s.rows,
            prefix_lens,
            extend_lens,
            num_heads: m.heads,
            num_kv_heads: m.kv_heads,
            head_dim: m.head_dim,
            scale: l.scale,
            window: l.window,
            softcap: l.softcap,
        }
    }

    /// One member's walk through the step (every member runs the same operations).
    #[allow(clippy::too_many_arguments)]
    fn walk<K: Elem>(
        &self,
        member: &mut Member<'_>,
        s: &Step<'_>,
        b: usize,
        plan: &StepPlan,
        bufs: &Bufs,
        pools: &[(Buf<K>, Buf<K>)],
        scratch: &mut Scratch,
    ) {
        let m = &self.model;
        let (h, d, inter) = (m.hidden, m.head_dim, m.intermediate);
        let (qw, kvw) = (m.heads * d, m.kv_heads * d);
        let qkvw = qw + 2 * kvw;
        // SAFETY (all `Buf` accesses below): within an operation, chunk i touches row i (or
        // its own columns, in the products) of the buffers it writes and only reads buffers
        // no chunk of the operation writes.
        member.split(b, |i| unsafe {
            let r = bufs.res.row(i, h);
            if let Err(e) = m.embed.row(s.ids[i] as usize, r) {
                member_error(e);
            }
            if let Some(scale) = m.embed_scale {
                r.iter_mut().for_each(|v| *v *= scale);
            }
        });
        for (li, (l, chunks)) in m.layers.iter().zip(&self.layers).enumerate() {
            member.split(b, |i| unsafe {
                let (x, r, o) = (bufs.x.row(i, h), bufs.res.row(i, h), bufs.h.row(i, h));
                let res = if li == 0 {
                    norm(&l.input_norm, r, None, o)
                } else {
                    norm(&l.input_norm, x, Some(r), o)
                };
                res.unwrap_or_else(member_error);
            });
            product(
                member,
                &l.qkv,
                &chunks.qkv,
                unsafe { bufs.h.all() },
                b,
                bufs.qkv,
            );
            let (kp, vp) = pools[li];
            member.split(b, |i| unsafe {
                let row = bufs.qkv.row(i, qkvw);
                let (qr, rest) = row.split_at_mut(qw);
                let (kr, vr) = rest.split_at_mut(kvw);
                let qo = bufs.q.row(i, qw);
                qo.copy_from_slice(qr);
                let pos = s.positions[i] as usize;
                let (c, sn) = (&l.rope.cos[pos * d..][..d], &l.rope.sin[pos * d..][..d]);
                for (heads, n) in [(&mut *qo, &l.q_norm), (&mut *kr, &l.k_norm)] {
                    for head in heads.chunks_exact_mut(d) {
                        if let Some(n) = n {
                            scratch.row.clear();
                            scratch.row.extend_from_slice(head);
                            norm(n, &scratch.row, None, head).unwrap_or_else(member_error);
                        }
                        rotate_head(head, c, sn);
                    }
                }
                let slot = s.out_loc[i] as usize;
                store(kp.row(slot, kvw), kr);
                store(vp.row(slot, kvw), vr);
            });
            match s.seqs {
                Seqs::Decode { lens } => member.split(b, |i| unsafe {
                    let p = self.decode_args(kp.all(), vp.all(), bufs.q.all(), s, lens, l);
                    if let Err(e) =
                        attention::sequence(&p, &mut scratch.attn, i, bufs.attn.row(i, qw))
                    {
                        member_error(e);
                    }
                }),
                Seqs::Extend {
                    prefix_lens,
                    extend_lens,
                } => member.split(plan.tasks.len(), |t| unsafe {
                    let (k, v, q) = (kp.all(), vp.all(), bufs.q.all());
                    let p = self.extend_args(k, v, q, s, prefix_lens, extend_lens, l);
                    // NOTE: each task writes its own tokens' heads of `attn`.
                    let out = extend::OutPtr(bufs.attn.0);
                    if let Err(e) = extend::task(&p, &mut scratch.extend, plan.tasks[t], out) {
                        member_error(e);
                    }
                }),
            }
            product(
                member,
                &l.o,
                &chunks.o,
                unsafe { bufs.attn.all() },
                b,
                bufs.x,
            );
            member.split(b, |i| unsafe {
                let (x, r, o) = (bufs.x.row(i, h), bufs.res.row(i, h), bufs.h.row(i, h));
                let res = match &l.ff_norms {
                    None => norm(&l.post_attn_norm, x, Some(r), o),
                    Some((pre, _)) => {
                        let t = bufs.tmp.row(i, h);
                        norm(&l.post_attn_norm, x, None, t).and_then(|_| norm(pre, t, Some(r), o))
                    }
                };
                res.unwrap_or_else(member_error);
            });
            product(
                member,
                &l.gate_up,
                &chunks.gate_up,
                unsafe { bufs.h.all() },
                b,
                bufs.gu,
            );
            member.split(b, |i| unsafe {
                let (g, a) = (bufs.gu.row(i, 2 * inter), bufs.act.row(i, inter));
                match m.act {
                    Act::Silu => silu_and_mul(&*g, a, inter).unwrap_or_else(member_error),
                    Act::GeluTanh => gelu_tanh_and_mul(g, a),
                }
            });
            product(
                member,
                &l.down,
                &chunks.down,
                unsafe { bufs.act.all() },
                b,
                bufs.x,
            );
            if let Some((_, post)) = &l.ff_norms {
                member.split(b, |i| unsafe {
                    let (x, t) = (bufs.x.row(i, h), bufs.tmp.row(i, h));
                    norm(post, x, None, t).unwrap_or_else(member_error);
                    x.copy_from_slice(t);
                });
            }
        }
        member.split(b, |i| unsafe {
            let (x, r, o) = (bufs.x.row(i, h), bufs.res.row(i, h), bufs.h.row(i, h));
            if m.layers.is_empty() {
                norm(&m.norm, r, None, o)
            } else {
                norm(&m.norm, x, Some(r), o)
            }
            .unwrap_or_else(member_error);
        });
        let (normed, nl) = match s.logit_rows {
            None => (bufs.h, b),
            Some(rows) => {
                member.split(rows.len(), |j| unsafe {
                    bufs.sel
                        .row(j, h)
                        .copy_from_slice(bufs.h.row(rows[j] as usize, h));
                });
                (bufs.sel, rows.len())
            }
        };
        product(
            member,
            &m.lm_head,
            &self.lm_head,
            unsafe { normed.all() },
            nl,
            bufs.logits,
        );
        let cap = m.final_softcap;
        if cap > 0.0 {
            member.split(nl, |i| unsafe {
                for v in bufs.logits.row(i, m.vocab) {
                    *v = (*v / cap).tanh() * cap;
                }
            });
        }
    }
}

/// The step's buffers (see `Decoder::forward`).
struct Bufs {
    res: Buf,
    x: Buf,
    h: Buf,
    tmp: Buf,
    /// the logit rows' final hidden states, when a step computes some tokens' logits only
    sel: Buf,
    qkv: Buf,
    q: Buf,
    attn: Buf,
    gu: Buf,
    act: Buf,
    logits: Buf,
}

fn fail<T>(msg: String) -> Result<T, KernelError> {
    Err(KernelError(msg))
}

/// A kernel error inside a chunk: the team catches it and fails the step with the message.
fn member_error(e: KernelError) {
    std::panic::panic_any(e.0)
}

fn norm(
    n: &Norm<'_>,
    x: &[f32],
    res: Option<&mut [f32]>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    rms_norm(x, res, n.weight, out, x.len(), n.eps, n.gemma)
}

/// `out = x W^T (+ bias)` for the `b` rows of `x`, chunk by chunk over the members; each member
/// quantizes the activations for the packed parts itself, on its first chunk.
fn product(
    member: &mut Member<'_>,
    lin: &Linear<'_>,
    plan: &[Chunk],
    x: &[f32],
    b: usize,
    out: Buf,
) {
    let ldo = lin.n();
    let k = lin.parts[0].k();
    let mut acts: [Option<Acts<'_>>; 2] = [None, None];
    member.split(plan.len(), |c| {
        let ch = plan[c];
        let rows = ch.start..ch.end;
        // SAFETY: the chunk's output columns `col + rows` of every row lie inside `out`
        // (`[b, ldo]`, checked by the caller's plan) and belong to this chunk alone.
        let o = unsafe { out.0.add(ch.col) };
        match &lin.parts[ch.part] {
            Part::Packed(w) => {
                let a = acts[usize::from(w.bits == 8)]
                    .get_or_insert_with(|| Acts::new(x, b, k, w.bits));
                // SAFETY: as above; `a` was made for w's bits and k.
                unsafe { quant_packed::rows_into(w, a, b, rows, o, ldo) }
            }
            // SAFETY: as above; the blocks were checked for `qt`, n and k.
            Part::Blocks { qt, w, k, .. } => unsafe {
                quant::matmul_rows(*qt, w, *k, x, b, rows, quant::SendPtr(o), ldo)
            },
            Part::Dense { w, k, .. } => {
                for r in rows {
                    let wr = &w[r * k..(r + 1) * k];
                    for i in 0..b {
                        // SAFETY: as above.
                        unsafe { *o.add(i * ldo + r) = dense_dot(wr, &x[i * k..(i + 1) * k]) };
                    }
                }
            }
        }
        if let Some(bias) = lin.bias {
            for i in 0..b {
                for r in ch.start..ch.end {
                    // SAFETY: as above.
                    unsafe { *o.add(i * ldo + r) += bias[ch.col + r] };
                }
            }
        }
    });
}

/// A token's keys or values into the pool's row, rounded to its type.
#[inline]
fn store<K: Elem>(dst: &mut [K], src: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = K::from_f32(x);
    }
}

fn dense_dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features `dot_avx2` is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b)
}

/// `out = gelu_tanh(gate) * up` over a row `[gate | up]`, as torch's
/// `gelu(gate, approximate="tanh") * up` in f32.
fn gelu_tanh_and_mul(x: &[f32], out: &mut [f32]) {
    let (gate, up) = x.split_at(out.len());
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let inner = C * (g + 0.044_715 * g * g * g);
        *o = 0.5 * g * (1.0 + inner.tanh()) * u;
    }
}

#[cfg(test)]
mod tests;
