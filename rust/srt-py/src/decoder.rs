//! Binding of srt-kernels' whole-step decoder: `NativeDecoder(spec, kv)` over the model's
//! numpy arrays (CPU torch tensors via `.numpy()`), then `decode(...)` once per decode step,
//! without the GIL.
//!
//! The decoder reads the weights and writes the KV pool in place: it keeps a reference to
//! every array it was given (so none is freed while it lives) and their data pointers (numpy
//! never moves an array's data). The caller must not resize them.
//!
//! Spec (plain Python values, built by `srt.model_executor.cpu_decode`):
//! - part: `("packed", bits, data u8 [n, bytes], d [n, blocks], m [n, blocks], k)` (scales
//!   float32 or uint16 f16 bits),
//!   `("blocks", qtype, blocks u8 [n, row_bytes], k)` or `("dense", w f32 [n, k])`;
//! - linear: `{"parts": [part, ...], "bias": f32 [n] or None}`;
//! - norm: `(weight f32 [size], eps, gemma)`;
//! - layer: `{"input_norm", "qkv", "q_norm" (norm or None), "k_norm", "cos", "sin" (f32
//!   [positions, head_dim]), "scale", "window", "softcap", "o", "post_attn_norm",
//!   "ff_norms" ((pre, post) or None), "gate_up", "down"}`;
//! - model: `{"hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "embed"
//!   (part), "embed_scale" (float or None), "layers", "norm", "lm_head" (linear),
//!   "final_softcap", "act" ("silu" or "gelu_tanh")}`.

use numpy::{
    Element, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyReadwriteArray2,
    PyReadwriteArrayDyn, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use srt_kernels::decoder::{
    Act, Decoder, KvLayer, Layer, Linear, Model, Norm, Part, Rope, Seqs, Step,
};
use srt_kernels::elem::{Bf16, Elem};
use srt_kernels::quant::QType;
use srt_kernels::quant_packed::{PackedRef, ScalesRef};

use crate::errors::value_error;

/// Arrays the decoder reads or writes, held for its lifetime.
struct Keep(Vec<Py<PyAny>>);

impl Keep {
    /// The data of `obj` (a C-contiguous numpy array of T) for as long as the decoder lives.
    fn slice<T: Element>(&mut self, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<&'static [T]> {
        let arr = obj.extract::<PyReadonlyArrayDyn<'_, T>>().map_err(|_| {
            value_error(format!(
                "{what} must be a numpy array of {}",
                std::any::type_name::<T>()
            ))
        })?;
        let s = arr
            .as_slice()
            .map_err(|_| value_error(format!("{what} must be C-contiguous")))?;
        let (ptr, len) = (s.as_ptr(), s.len());
        self.0.push(obj.clone().unbind());
        // SAFETY: `obj` is kept alive in `self` (owned by the decoder) and numpy never moves
        // an array's data; the decoder only reads it.
        Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    /// A packed matrix's scales: float32, or uint16 (f16 bits).
    fn scales(
        &mut self,
        d: &Bound<'_, PyAny>,
        m: &Bound<'_, PyAny>,
        what: &str,
    ) -> PyResult<ScalesRef<'static>> {
        if d.extract::<PyReadonlyArrayDyn<'_, u16>>().is_ok() {
            return Ok(ScalesRef::F16 {
                d: self.slice(d, what)?,
                m: self.slice(m, what)?,
            });
        }
        Ok(ScalesRef::F32 {
            d: self.slice(d, what)?,
            m: self.slice(m, what)?,
        })
    }

    /// A KV pool array: (data pointer, length, whether it holds bf16 bits (int16) rather
    /// than float32).
    fn pool(&mut self, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<(usize, usize, bool)> {
        let contiguous = |_| value_error(format!("{what} must be C-contiguous"));
        let out = if let Ok(mut arr) = obj.extract::<PyReadwriteArrayDyn<'_, f32>>() {
            let s = arr.as_slice_mut().map_err(contiguous)?;
            (s.as_mut_ptr() as usize, s.len(), false)
        } else if let Ok(mut arr) = obj.extract::<PyReadwriteArrayDyn<'_, i16>>() {
            let s = arr.as_slice_mut().map_err(contiguous)?;
            (s.as_mut_ptr() as usize, s.len(), true)
        } else {
            return Err(value_error(format!(
                "{what} must be a writable float32 or int16 (bf16 bits) numpy array"
            )));
        };
        self.0.push(obj.clone().unbind());
        Ok(out)
    }
}

fn item<'py>(d: &Bound<'py, PyDict>, key: &str) -> PyResult<Bound<'py, PyAny>> {
    d.get_item(key)?
        .ok_or_else(|| value_error(format!("decoder spec lacks {key:?}")))
}

fn part(keep: &mut Keep, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Part<'static>> {
    let t = obj.cast::<PyTuple>()?;
    let kind: String = t.get_item(0)?.extract()?;
    let rows = |a: &Bound<'_, PyAny>| -> PyResult<usize> {
        let shape: Vec<usize> = a.getattr("shape")?.extract()?;
        shape
            .first()
            .copied()
            .ok_or_else(|| value_error(format!("{what} must be 2-D")))
    };
    match kind.as_str() {
        "packed" => {
            let data = t.get_item(2)?;
            Ok(Part::Packed(PackedRef {
                bits: t.get_item(1)?.extract()?,
                n: rows(&data)?,
                k: t.get_item(5)?.extract()?,
                data: keep.slice(&data, what)?,
                scales: keep.scales(&t.get_item(3)?, &t.get_item(4)?, what)?,
            }))
        }
        "blocks" => {
            let name: String = t.get_item(1)?.extract()?;
            let qt = QType::from_name(&name)
                .ok_or_else(|| value_error(format!("{what}: unknown GGUF type {name:?}")))?;
            let w = t.get_item(2)?;
            Ok(Part::Blocks {
                qt,
                n: rows(&w)?,
                k: t.get_item(3)?.extract()?,
                w: keep.slice(&w, what)?,
            })
        }
        "dense" => {
            let w = t.get_item(1)?;
            let shape: Vec<usize> = w.getattr("shape")?.extract()?;
            let [n, k] = shape[..] else {
                return Err(value_error(format!("{what} must be 2-D")));
            };
            Ok(Part::Dense {
                w: keep.slice(&w, what)?,
                n,
                k,
            })
        }
        _ => Err(value_error(format!("{what}: unknown weight kind {kind:?}"))),
    }
}

fn linear(keep: &mut Keep, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Linear<'static>> {
    let d = obj.cast::<PyDict>()?;
    let parts = item(d, "parts")?
        .try_iter()?
        .map(|p| part(keep, &p?, what))
        .collect::<PyResult<Vec<_>>>()?;
    let bias = item(d, "bias")?;
    let bias = if bias.is_none() {
        None
    } else {
        Some(keep.slice(&bias, what)?)
    };
    Ok(Linear { parts, bias })
}

fn norm(keep: &mut Keep, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Norm<'static>> {
    let t = obj.cast::<PyTuple>()?;
    Ok(Norm {
        weight: keep.slice(&t.get_item(0)?, what)?,
        eps: t.get_item(1)?.extract()?,
        gemma: t.get_item(2)?.extract()?,
    })
}

fn optional_norm(
    keep: &mut Keep,
    obj: &Bound<'_, PyAny>,
    what: &str,
) -> PyResult<Option<Norm<'static>>> {
    if obj.is_none() {
        return Ok(None);
    }
    norm(keep, obj, what).map(Some)
}

fn layer(keep: &mut Keep, obj: &Bound<'_, PyAny>, i: usize) -> PyResult<Layer<'static>> {
    let d = obj.cast::<PyDict>()?;
    let at = |what: &str| format!("layer {i} {what}");
    let ff = item(d, "ff_norms")?;
    let ff_norms = if ff.is_none() {
        None
    } else {
        let t = ff.cast::<PyTuple>()?;
        Some((
            norm(keep, &t.get_item(0)?, &at("pre-MLP norm"))?,
            norm(keep, &t.get_item(1)?, &at("post-MLP norm"))?,
        ))
    };
    Ok(Layer {
        input_norm: norm(keep, &item(d, "input_norm")?, &at("input norm"))?,
        qkv: linear(keep, &item(d, "qkv")?, &at("qkv"))?,
        q_norm: optional_norm(keep, &item(d, "q_norm")?, &at("q norm"))?,
        k_norm: optional_norm(keep, &item(d, "k_norm")?, &at("k norm"))?,
        rope: Rope {
            cos: keep.slice(&item(d, "cos")?, &at("cos"))?,
            sin: keep.slice(&item(d, "sin")?, &at("sin"))?,
        },
        scale: item(d, "scale")?.extract()?,
        window: item(d, "window")?.extract()?,
        softcap: item(d, "softcap")?.extract()?,
        o: linear(keep, &item(d, "o")?, &at("o"))?,
        post_attn_norm: norm(
            keep,
            &item(d, "post_attn_norm")?,
            &at("post-attention norm"),
        )?,
        ff_norms,
        gate_up: linear(keep, &item(d, "gate_up")?, &at("gate_up"))?,
        down: linear(keep, &item(d, "down")?, &at("down"))?,
    })
}

fn contiguous<'a>(
    s: Result<&'a [i64], numpy::NotContiguousError>,
    what: &str,
) -> PyResult<&'a [i64]> {
    s.map_err(|_| value_error(format!("{what} must be contiguous")))
}

/// A Llama-family decoder's decode step in one native call (see `srt_kernels::decoder`).
#[pyclass(module = "srt._native", frozen)]
pub struct NativeDecoder {
    decoder: Decoder<'static>,
    /// Each layer's K and V pool (data pointer, length).
    kv: Vec<[(usize, usize); 2]>,
    /// Whether the pool holds bf16 (else f32).
    bf16: bool,
    _keep: Keep,
}

#[pymethods]
impl NativeDecoder {
    #[new]
    fn new(spec: &Bound<'_, PyDict>, kv: &Bound<'_, PyAny>) -> PyResult<Self> {
        let mut keep = Keep(Vec::new());
        let act = match item(spec, "act")?.extract::<String>()?.as_str() {
            "silu" => Act::Silu,
            "gelu_tanh" => Act::GeluTanh,
            other => return Err(value_error(format!("unsupported activation {other:?}"))),
        };
        let layers = item(spec, "layers")?
            .try_iter()?
            .enumerate()
            .map(|(i, l)| layer(&mut keep, &l?, i))
            .collect::<PyResult<Vec<_>>>()?;
        let embed_scale = item(spec, "embed_scale")?.extract::<Option<f32>>()?;
        let model = Model {
            hidden: item(spec, "hidden")?.extract()?,
            heads: item(spec, "heads")?.extract()?,
            kv_heads: item(spec, "kv_heads")?.extract()?,
            head_dim: item(spec, "head_dim")?.extract()?,
            intermediate: item(spec, "intermediate")?.extract()?,
            vocab: item(spec, "vocab")?.extract()?,
            embed: part(&mut keep, &item(spec, "embed")?, "embedding")?,
            embed_scale,
            layers,
            norm: norm(&mut keep, &item(spec, "norm")?, "final norm")?,
            lm_head: linear(&mut keep, &item(spec, "lm_head")?, "lm_head")?,
            final_softcap: item(spec, "final_softcap")?.extract()?,
            act,
        };
        let mut pools = Vec::new();
        let mut types = Vec::new();
        for (i, pair) in kv.try_iter()?.enumerate() {
            let t = pair?;
            let t = t.cast::<PyTuple>()?;
            let (k, klen, kb) = keep.pool(&t.get_item(0)?, &format!("KV layer {i} k"))?;
            let (v, vlen, vb) = keep.pool(&t.get_item(1)?, &format!("KV layer {i} v"))?;
            pools.push([(k, klen), (v, vlen)]);
            types.extend([kb, vb]);
        }
        let bf16 = types.first().copied().unwrap_or(false);
        if types.iter().any(|&t| t != bf16) {
            return Err(value_error("the KV layers must all be float32 or all bf16"));
        }
        if pools.len() != model.layers.len() {
            return Err(value_error(format!(
                "{} KV layers for {} layers",
                pools.len(),
                model.layers.len()
            )));
        }
        let decoder = Decoder::new(model).map_err(value_error)?;
        Ok(NativeDecoder {
            decoder,
            kv: pools,
            bf16,
            _keep: keep,
        })
    }

    /// One decode step: `logits` float32 `[batch, vocab]` of each sequence's token (`ids`,
    /// `positions`, `out_loc` int64 `[batch]`), attending through the request-to-token
    /// `table` int32 `[rows, cols]` at `rows` with lengths `lens` (int64 `[batch]`, the
    /// token included). ValueError on inputs that do not fit.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (ids, positions, out_loc, table, rows, lens, logits, threads))]
    fn decode(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, i64>,
        positions: PyReadonlyArray1<'_, i64>,
        out_loc: PyReadonlyArray1<'_, i64>,
        table: PyReadonlyArray2<'_, i32>,
        rows: PyReadonlyArray1<'_, i64>,
        lens: PyReadonlyArray1<'_, i64>,
        logits: PyReadwriteArray2<'_, f32>,
        threads: usize,
    ) -> PyResult<()> {
        let seqs = Seqs::Decode {
            lens: contiguous(lens.as_slice(), "lens")?,
        };
        let tokens = Tokens::of(&ids, &positions, &out_loc, &table, &rows)?;
        self.forward(py, tokens, seqs, None, logits, threads)
    }

    /// One extend (prefill) step: sequence i computes `extend_lens[i]` tokens after
    /// `prefix_lens[i]` already in the pool (`ids`, `positions`, `out_loc` int64, sequence
    /// after sequence), attending causally through `table` at `rows`; `logits` float32
    /// `[len(logit_rows), vocab]` of the tokens at `logit_rows` (int64 indices into `ids`).
    /// ValueError on inputs that do not fit.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (
        ids, positions, out_loc, table, rows, prefix_lens, extend_lens, logit_rows, logits,
        threads
    ))]
    fn extend(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, i64>,
        positions: PyReadonlyArray1<'_, i64>,
        out_loc: PyReadonlyArray1<'_, i64>,
        table: PyReadonlyArray2<'_, i32>,
        rows: PyReadonlyArray1<'_, i64>,
        prefix_lens: PyReadonlyArray1<'_, i64>,
        extend_lens: PyReadonlyArray1<'_, i64>,
        logit_rows: PyReadonlyArray1<'_, i64>,
        logits: PyReadwriteArray2<'_, f32>,
        threads: usize,
    ) -> PyResult<()> {
        let seqs = Seqs::Extend {
            prefix_lens: contiguous(prefix_lens.as_slice(), "prefix_lens")?,
            extend_lens: contiguous(extend_lens.as_slice(), "extend_lens")?,
        };
        let picked = Some(contiguous(logit_rows.as_slice(), "logit_rows")?);
        let tokens = Tokens::of(&ids, &positions, &out_loc, &table, &rows)?;
        self.forward(py, tokens, seqs, picked, logits, threads)
    }
}

/// A step's token and table arrays, as slices.
struct Tokens<'a> {
    ids: &'a [i64],
    positions: &'a [i64],
    out_loc: &'a [i64],
    table: &'a [i32],
    table_cols: usize,
    rows: &'a [i64],
}

impl<'a> Tokens<'a> {
    fn of(
        ids: &'a PyReadonlyArray1<'_, i64>,
        positions: &'a PyReadonlyArray1<'_, i64>,
        out_loc: &'a PyReadonlyArray1<'_, i64>,
        table: &'a PyReadonlyArray2<'_, i32>,
        rows: &'a PyReadonlyArray1<'_, i64>,
    ) -> PyResult<Tokens<'a>> {
        Ok(Tokens {
            ids: contiguous(ids.as_slice(), "ids")?,
            positions: contiguous(positions.as_slice(), "positions")?,
            out_loc: contiguous(out_loc.as_slice(), "out_loc")?,
            table: table
                .as_slice()
                .map_err(|_| value_error("table must be C-contiguous"))?,
            table_cols: table.shape()[1],
            rows: contiguous(rows.as_slice(), "rows")?,
        })
    }
}

impl NativeDecoder {
    fn forward(
        &self,
        py: Python<'_>,
        t: Tokens<'_>,
        seqs: Seqs<'_>,
        logit_rows: Option<&[i64]>,
        mut logits: PyReadwriteArray2<'_, f32>,
        threads: usize,
    ) -> PyResult<()> {
        let step = Step {
            ids: t.ids,
            positions: t.positions,
            out_loc: t.out_loc,
            table: t.table,
            table_cols: t.table_cols,
            rows: t.rows,
            seqs,
            logit_rows,
        };
        let out = logits
            .as_slice_mut()
            .map_err(|_| value_error("logits must be C-contiguous"))?;
        py.detach(|| {
            if self.bf16 {
                self.decoder
                    .forward(&step, &mut self.layers::<Bf16>(), out, threads)
            } else {
                self.decoder
                    .forward(&step, &mut self.layers::<f32>(), out, threads)
            }
        })
        .map_err(value_error)
    }

    /// The pool's layers as `K` (the type `new` found them to hold).
    fn layers<K: Elem>(&self) -> Vec<KvLayer<'_, K>> {
        self.kv
            .iter()
            .map(|[(k, kl), (v, vl)]| KvLayer {
                // SAFETY: the pool arrays are kept alive by `_keep` and hold `K` (checked in
                // `new`); a decode call is the only Rust access to them while it runs (the
                // caller's step holds the pool).
                k: unsafe { std::slice::from_raw_parts_mut(*k as *mut K, *kl) },
                v: unsafe { std::slice::from_raw_parts_mut(*v as *mut K, *vl) },
            })
            .collect()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeDecoder>()
}
