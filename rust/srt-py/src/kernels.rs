//! Bindings of srt-kernels: functions over numpy arrays (CPU torch tensors via `.numpy()`, read
//! and written in place, no copy), run without the GIL. bf16 tensors cross as their int16
//! bits (`tensor.view(torch.int16).numpy()`), since numpy has no bfloat16.

use numpy::{
    Element, PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
    PyReadwriteArray3, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use srt_kernels::attention::{paged_decode, PagedDecode};
use srt_kernels::elem::{Bf16, Elem};
use srt_kernels::extend::{paged_extend, PagedExtend};
use srt_kernels::rope::rope_neox;
use srt_kernels::sampling::{draw_threads, softmax_threads, Draw, Softmax};

use crate::errors::value_error;

/// The array's elements as `E` (same size and layout as `T`: `f32` as itself, `i16` as bf16).
fn as_elems<'a, T: Element, E: Elem>(a: &'a PyReadonlyArray3<'_, T>) -> PyResult<&'a [E]> {
    let s = a
        .as_slice()
        .map_err(|_| value_error("arrays must be C-contiguous"))?;
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<E>());
    // SAFETY: E has T's size and alignment and every bit pattern is valid for both.
    Ok(unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<E>(), s.len()) })
}

/// q, k, v and out of an attention call as kernel elements.
/// A numpy element type the attention kernels read, and the kernels' element for it (f32 as
/// itself, int16 as bf16 bits).
trait Storage: Element {
    type K: Elem;
}
impl Storage for f32 {
    type K = f32;
}
impl Storage for i16 {
    type K = Bf16;
}

/// q, k, v, out as the kernels take them: queries and output of `T`, the pool of `U`.
type AttnSlices<'a, T, U> = (
    &'a [<T as Storage>::K],
    &'a [<U as Storage>::K],
    &'a [<U as Storage>::K],
    &'a mut [<T as Storage>::K],
);

struct AttnArrays<'py, T: Storage, U: Storage> {
    q: PyReadonlyArray3<'py, T>,
    k: PyReadonlyArray3<'py, U>,
    v: PyReadonlyArray3<'py, U>,
    out: PyReadwriteArray3<'py, T>,
}

impl<'py, T: Storage, U: Storage> AttnArrays<'py, T, U> {
    fn extract(
        name: &str,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
    ) -> PyResult<Self> {
        let a = AttnArrays {
            q: q.extract()?,
            k: k.extract()?,
            v: v.extract()?,
            out: out.extract()?,
        };
        let (qs, ks) = (a.q.shape(), a.k.shape());
        if a.out.shape() != qs || a.v.shape() != ks || qs[2] != ks[2] {
            return Err(value_error(format!(
                "{name}: q {qs:?}, k {ks:?}, v {:?}, out {:?} do not fit",
                a.v.shape(),
                a.out.shape()
            )));
        }
        Ok(a)
    }

    fn heads(&self) -> (usize, usize, usize) {
        (self.q.shape()[1], self.k.shape()[1], self.q.shape()[2])
    }

    fn slices(&mut self) -> PyResult<AttnSlices<'_, T, U>> {
        let (q, k, v) = (
            as_elems::<T, T::K>(&self.q)?,
            as_elems::<U, U::K>(&self.k)?,
            as_elems::<U, U::K>(&self.v)?,
        );
        let o = self
            .out
            .as_slice_mut()
            .map_err(|_| value_error("out must be C-contiguous"))?;
        // SAFETY: as in `as_elems`.
        let o = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<T::K>(), o.len()) };
        Ok((q, k, v, o))
    }
}

fn table_slice<'a>(table: &'a PyReadonlyArray2<'_, i32>) -> PyResult<(&'a [i32], usize)> {
    let t = table
        .as_slice()
        .map_err(|_| value_error("table must be C-contiguous"))?;
    Ok((t, table.shape()[1]))
}

/// Which element types an attention call's q and k arrays hold: both float32, both int16
/// (bf16), or float32 queries over an int16 (bf16) pool.
enum Types {
    F32,
    Bf16,
    F32OverBf16,
}

fn types(name: &str, q: &Bound<'_, PyAny>, k: &Bound<'_, PyAny>) -> PyResult<Types> {
    let f32_ = |a: &Bound<'_, PyAny>| a.extract::<PyReadonlyArray3<'_, f32>>().is_ok();
    let i16_ = |a: &Bound<'_, PyAny>| a.extract::<PyReadonlyArray3<'_, i16>>().is_ok();
    match (f32_(q), i16_(q), f32_(k), i16_(k)) {
        (true, _, true, _) => Ok(Types::F32),
        (_, true, _, true) => Ok(Types::Bf16),
        (true, _, _, true) => Ok(Types::F32OverBf16),
        _ => Err(value_error(format!(
            "{name}: q and out must be 3-D float32 or int16 (bf16) arrays, k and v the same type \
             or int16 (bf16) under float32 queries"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn run<T: Storage, U: Storage>(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    (table, rows, lens): (
        &PyReadonlyArray2<'_, i32>,
        &PyReadonlyArray1<'_, i64>,
        &PyReadonlyArray1<'_, i64>,
    ),
    scale: f32,
    out: &Bound<'_, PyAny>,
    (threads, window, softcap): (usize, usize, f32),
) -> PyResult<()> {
    let mut a = AttnArrays::<T, U>::extract("paged_decode_attention", q, k, v, out)?;
    let (num_heads, num_kv_heads, head_dim) = a.heads();
    let (table, table_cols) = table_slice(table)?;
    let (q, k, v, o) = a.slices()?;
    let p = PagedDecode {
        q,
        k,
        v,
        table,
        table_cols,
        rows: rows.as_slice()?,
        lens: lens.as_slice()?,
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
        window,
        softcap,
    };
    py.detach(|| paged_decode(&p, o, threads))
        .map_err(value_error)
}

#[allow(clippy::too_many_arguments)]
fn run_extend<T: Storage, U: Storage>(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    table: &PyReadonlyArray2<'_, i32>,
    (rows, prefix, extend): (
        &PyReadonlyArray1<'_, i64>,
        &PyReadonlyArray1<'_, i64>,
        &PyReadonlyArray1<'_, i64>,
    ),
    scale: f32,
    out: &Bound<'_, PyAny>,
    (threads, window, softcap): (usize, usize, f32),
) -> PyResult<()> {
    let mut a = AttnArrays::<T, U>::extract("paged_extend_attention", q, k, v, out)?;
    let (num_heads, num_kv_heads, head_dim) = a.heads();
    let (table, table_cols) = table_slice(table)?;
    let (q, k, v, o) = a.slices()?;
    let p = PagedExtend {
        q,
        k,
        v,
        table,
        table_cols,
        rows: rows.as_slice()?,
        prefix_lens: prefix.as_slice()?,
        extend_lens: extend.as_slice()?,
        num_heads,
        num_kv_heads,
        head_dim,
        scale,
        window,
        softcap,
    };
    py.detach(|| paged_extend(&p, o, threads))
        .map_err(value_error)
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, table, rows, prefix_lens, extend_lens, scale, out, threads, window=0, softcap=0.0))]
fn paged_extend_attention(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    table: PyReadonlyArray2<'_, i32>,
    rows: PyReadonlyArray1<'_, i64>,
    prefix_lens: PyReadonlyArray1<'_, i64>,
    extend_lens: PyReadonlyArray1<'_, i64>,
    scale: f32,
    out: &Bound<'_, PyAny>,
    threads: usize,
    window: usize,
    softcap: f32,
) -> PyResult<()> {
    let opts = (threads, window, softcap);
    let seqs = (&rows, &prefix_lens, &extend_lens);
    match types("paged_extend_attention", q, k)? {
        Types::F32 => run_extend::<f32, f32>(py, q, k, v, &table, seqs, scale, out, opts),
        Types::Bf16 => run_extend::<i16, i16>(py, q, k, v, &table, seqs, scale, out, opts),
        Types::F32OverBf16 => run_extend::<f32, i16>(py, q, k, v, &table, seqs, scale, out, opts),
    }
}

/// Decode attention over one layer of the paged KV pool: `out[b]` = attention of `q[b]`
/// (`[B, Hq, D]`) over the keys and values (`[slots, Hkv, D]`) at slots
/// `table[rows[b], :lens[b]]`, scaled by `scale`. q, k, v and out are all float32 or all
/// int16 (bf16 bits); table int32 `[R, C]`; rows and lens int64 `[B]`. `threads` > 1 runs
/// sequences in parallel. `window` > 0 keeps only the last `window` positions; `softcap` > 0
/// caps the scaled scores at `softcap * tanh(score / softcap)`. Raises ValueError on shapes
/// or indices that do not fit.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (q, k, v, table, rows, lens, scale, out, threads, window=0, softcap=0.0))]
fn paged_decode_attention(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    table: PyReadonlyArray2<'_, i32>,
    rows: PyReadonlyArray1<'_, i64>,
    lens: PyReadonlyArray1<'_, i64>,
    scale: f32,
    out: &Bound<'_, PyAny>,
    threads: usize,
    window: usize,
    softcap: f32,
) -> PyResult<()> {
    let opts = (threads, window, softcap);
    let seqs = (&table, &rows, &lens);
    match types("paged_decode_attention", q, k)? {
        Types::F32 => run::<f32, f32>(py, q, k, v, seqs, scale, out, opts),
        Types::Bf16 => run::<i16, i16>(py, q, k, v, seqs, scale, out, opts),
        Types::F32OverBf16 => run::<f32, i16>(py, q, k, v, seqs, scale, out, opts),
    }
}

/// The sampled token of each row of `probs` (float32 `[S, V]` softmax probabilities): top-k /
/// top-p over `sorted` (each row ascending, or None when no row filters so), min-p (None: no
/// row), one inverse-CDF draw from the uniform of (seed, step). Returns int64 `[S]`. `threads`
/// > 1 splits the rows over that many threads (the same result).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (probs, sorted, candidates, top_k, top_p, min_p, seeds, steps, threads=1))]
fn sample_draw<'py>(
    py: Python<'py>,
    probs: PyReadonlyArray2<'py, f32>,
    sorted: Option<PyReadonlyArray2<'py, f32>>,
    candidates: usize,
    top_k: PyReadonlyArray1<'py, i64>,
    top_p: PyReadonlyArray1<'py, f32>,
    min_p: Option<PyReadonlyArray1<'py, f32>>,
    seeds: PyReadonlyArray1<'py, i64>,
    steps: PyReadonlyArray1<'py, i64>,
    threads: usize,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let contiguous = |_| value_error("sample_draw: arrays must be C-contiguous");
    let d = Draw {
        probs: probs.as_slice().map_err(contiguous)?,
        vocab: probs.shape()[1],
        sorted: optional_slice(&sorted).map_err(contiguous)?,
        candidates,
        top_k: top_k.as_slice().map_err(contiguous)?,
        top_p: top_p.as_slice().map_err(contiguous)?,
        min_p: optional_slice(&min_p).map_err(contiguous)?,
        seeds: seeds.as_slice().map_err(contiguous)?,
        steps: steps.as_slice().map_err(contiguous)?,
    };
    let mut out = vec![0i64; probs.shape()[0]];
    py.detach(|| draw_threads(&d, &mut out, threads))
        .map_err(value_error)?;
    Ok(PyArray1::from_vec(py, out))
}

fn rope_as<T: Element, E: Elem>(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    positions: &[i64],
    cos: &PyReadonlyArray2<'_, f32>,
    sin: &PyReadonlyArray2<'_, f32>,
) -> PyResult<()> {
    let mut x: PyReadwriteArray3<'_, T> = x.extract()?;
    let view = x.as_array_mut();
    let (shape, strides) = (view.raw_dim(), view.strides().to_vec());
    if strides.iter().any(|&s| s < 0) {
        return Err(value_error("rope_neox: negative strides"));
    }
    let strides = ndarray::Ix3(
        strides[0] as usize,
        strides[1] as usize,
        strides[2] as usize,
    );
    // SAFETY: the same memory, shape and strides as `view`, read as E (T's size and layout).
    let view = unsafe {
        ndarray::ArrayViewMut3::from_shape_ptr(
            ndarray::ShapeBuilder::strides(shape, strides),
            view.as_ptr().cast_mut().cast::<E>(),
        )
    };
    let (cos, sin) = (cos.as_array(), sin.as_array());
    py.detach(|| rope_neox(view, positions, cos, sin))
        .map_err(value_error)
}

/// Rotary embedding (neox `rotate_half` form) in place over `x` (`[T, H, D]` float32, or int16
/// holding bf16; any strides with each head's D values contiguous): token t by the rows
/// `positions[t]` of the float32 `cos` / `sin` tables (`[max_position, D]`). Bit for bit
/// `x * cos + rotate_half(x) * sin` with the tables cast to x's dtype.
#[pyfunction]
fn rope_neox_inplace(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    positions: PyReadonlyArray1<'_, i64>,
    cos: PyReadonlyArray2<'_, f32>,
    sin: PyReadonlyArray2<'_, f32>,
) -> PyResult<()> {
    let positions = positions.as_slice()?;
    if x.extract::<PyReadwriteArray3<'_, f32>>().is_ok() {
        rope_as::<f32, f32>(py, x, positions, &cos, &sin)
    } else if x.extract::<PyReadwriteArray3<'_, i16>>().is_ok() {
        rope_as::<i16, Bf16>(py, x, positions, &cos, &sin)
    } else {
        Err(value_error(
            "rope_neox_inplace: x must be a writable 3-D float32 or int16 array",
        ))
    }
}

/// The slice of an optional C-contiguous array (None stays None).
fn optional_slice<'a, T: Element, D: numpy::ndarray::Dimension>(
    a: &'a Option<numpy::PyReadonlyArray<'_, T, D>>,
) -> Result<Option<&'a [T]>, numpy::NotContiguousError> {
    a.as_ref().map(|x| x.as_slice()).transpose()
}

/// `(probs [S, V], argmax [S])` of `sample_softmax`.
type Distributions<'py> = (Bound<'py, numpy::PyArray2<f32>>, Bound<'py, PyArray1<i64>>);

/// The sampling distribution of each row of float32 `logits` (`[S, V]`): softmax of the logits
/// less the frequency / presence penalties (when `counts`, the output-token counts table
/// `[R, V]` with each row's index `rows`, is given) over `temperature`. Returns
/// `(probs [S, V] float32, argmax [S] int64)`, argmax the first maximum of the penalised
/// logits (the token of a greedy row). `threads` as in `sample_draw`; `out` (float32 `[S, V]`,
/// C-contiguous) receives the probabilities and is returned as `probs` (a caller that keeps
/// one spares each call fresh pages: ~1 ms of 32 rows of a 49k vocabulary).
#[pyfunction]
#[pyo3(signature = (logits, temperature, counts, rows, frequency, presence, threads=1, out=None))]
#[allow(clippy::too_many_arguments)]
fn sample_softmax<'py>(
    py: Python<'py>,
    logits: PyReadonlyArray2<'py, f32>,
    temperature: PyReadonlyArray1<'py, f32>,
    counts: Option<PyReadonlyArray2<'py, f32>>,
    rows: PyReadonlyArray1<'py, i64>,
    frequency: PyReadonlyArray1<'py, f32>,
    presence: Option<PyReadonlyArray1<'py, f32>>,
    threads: usize,
    out: Option<Bound<'py, numpy::PyArray2<f32>>>,
) -> PyResult<Distributions<'py>> {
    let contiguous = |_| value_error("sample_softmax: arrays must be C-contiguous");
    let (n, v) = (logits.shape()[0], logits.shape()[1]);
    if counts.as_ref().is_some_and(|c| c.shape()[1] != v) {
        return Err(value_error(
            "sample_softmax: counts and logits differ in vocabulary",
        ));
    }
    let s = Softmax {
        logits: logits.as_slice().map_err(contiguous)?,
        vocab: v,
        temperature: temperature.as_slice().map_err(contiguous)?,
        counts: optional_slice(&counts).map_err(contiguous)?,
        rows: rows.as_slice().map_err(contiguous)?,
        frequency: frequency.as_slice().map_err(contiguous)?,
        presence: optional_slice(&presence).map_err(contiguous)?,
    };
    let mut argmax = vec![0i64; n];
    let probs = match out {
        Some(out) => {
            if out.shape() != [n, v] {
                return Err(value_error(
                    "sample_softmax: out must be [S, V] like logits",
                ));
            }
            {
                let mut w = out.readwrite();
                let probs = w.as_slice_mut().map_err(contiguous)?;
                py.detach(|| softmax_threads(&s, probs, &mut argmax, threads))
                    .map_err(value_error)?;
            }
            out
        }
        None => {
            let mut probs = vec![0f32; n * v];
            py.detach(|| softmax_threads(&s, &mut probs, &mut argmax, threads))
                .map_err(value_error)?;
            PyArray1::from_vec(py, probs).reshape([n, v])?
        }
    };
    Ok((probs, PyArray1::from_vec(py, argmax)))
}

/// Threads this process can run at once: its CPU affinity and, on Linux, its cgroup's CPU
/// quota (a container's `--cpus`), as Rust's `std::thread::available_parallelism` counts them;
/// 1 where neither can be read.
#[pyfunction]
fn available_parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(available_parallelism, m)?)?;
    m.add_function(wrap_pyfunction!(sample_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(paged_decode_attention, m)?)?;
    m.add_function(wrap_pyfunction!(paged_extend_attention, m)?)?;
    m.add_function(wrap_pyfunction!(rope_neox_inplace, m)?)?;
    m.add_function(wrap_pyfunction!(sample_draw, m)?)
}
