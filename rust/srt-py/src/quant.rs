//! Bindings of srt-kernels' quantized matmul: GGUF weight blocks (uint8 `[n, row_bytes]`)
//! times float32 activations, over numpy arrays (CPU torch tensors via `.numpy()`), without
//! the GIL.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use srt_kernels::quant::{dequantize, matmul, QType};
use srt_kernels::quant_packed::{self, pack, packed_blocks, PackedRef, Scales, ScalesRef};

use crate::errors::value_error;

fn qtype(name: &str) -> PyResult<QType> {
    QType::from_name(name).ok_or_else(|| {
        value_error(format!(
            "unsupported GGUF block type {name:?} (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)"
        ))
    })
}

fn contiguous<'a, T>(
    s: Result<&'a [T], numpy::NotContiguousError>,
    name: &str,
) -> PyResult<&'a [T]> {
    s.map_err(|_| value_error(format!("{name} must be C-contiguous")))
}

/// The activations `x` (`[b, k]`) and the slice of `out` (`[b, m]`) from column `col` on, for
/// a product with `n` weight rows: (x, b, out from col, m). ValueError when they do not fit.
fn product_io<'a>(
    x: &'a PyReadonlyArray2<'_, f32>,
    out: &'a mut PyReadwriteArray2<'_, f32>,
    k: usize,
    n: usize,
    col: usize,
) -> PyResult<(&'a [f32], usize, &'a mut [f32], usize)> {
    let b = x.shape()[0];
    if x.shape()[1] != k {
        return Err(value_error(format!(
            "x has {} columns, not k={k}",
            x.shape()[1]
        )));
    }
    let (ob, m) = (out.shape()[0], out.shape()[1]);
    if ob != b || col + n > m {
        return Err(value_error(format!(
            "out [{ob}, {m}] cannot take [{b}, {n}] at column {col}"
        )));
    }
    let x = contiguous(x.as_slice(), "x")?;
    let o = out
        .as_slice_mut()
        .map_err(|_| value_error("out must be C-contiguous"))?;
    Ok((x, b, &mut o[col..], m))
}

/// `out[:, col:col + n] = x @ dequantize(w).T`: `w` uint8 `[n, row_bytes]` blocks of `qtype`
/// holding `[n, k]` weights, `x` float32 `[b, k]`, `out` float32 `[b, m]` (C-contiguous,
/// `col + n <= m`). Raises ValueError on shapes that do not fit.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (qtype_name, w, k, x, out, col, threads))]
fn quant_matmul(
    py: Python<'_>,
    qtype_name: &str,
    w: PyReadonlyArray2<'_, u8>,
    k: usize,
    x: PyReadonlyArray2<'_, f32>,
    mut out: PyReadwriteArray2<'_, f32>,
    col: usize,
    threads: usize,
) -> PyResult<()> {
    let qt = qtype(qtype_name)?;
    let n = w.shape()[0];
    let w = contiguous(w.as_slice(), "w")?;
    let (x, b, o, m) = product_io(&x, &mut out, k, n, col)?;
    py.detach(|| matmul(qt, w, n, k, x, b, o, m, threads))
        .map_err(value_error)
}

/// `out = dequantize(w)`: uint8 `[n, row_bytes]` blocks of `qtype` into float32 `[n, k]`.
#[pyfunction]
fn quant_dequantize(
    py: Python<'_>,
    qtype_name: &str,
    w: PyReadonlyArray2<'_, u8>,
    k: usize,
    mut out: PyReadwriteArray2<'_, f32>,
    threads: usize,
) -> PyResult<()> {
    let qt = qtype(qtype_name)?;
    let n = w.shape()[0];
    if out.shape() != [n, k] {
        return Err(value_error(format!(
            "out is {:?}, not [{n}, {k}]",
            out.shape()
        )));
    }
    let w = contiguous(w.as_slice(), "w")?;
    let o = out
        .as_slice_mut()
        .map_err(|_| value_error("out must be C-contiguous"))?;
    py.detach(|| dequantize(qt, w, n, k, o, threads))
        .map_err(value_error)
}

type PackedArrays<'py> = (
    u8,
    Bound<'py, PyArray2U8>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
);
type PyArray2U8 = numpy::PyArray2<u8>;

/// A packed matrix's scale arrays as the caller passed them: float32, or uint16 (f16 bits).
pub enum ScaleArrays<'py> {
    F32(PyReadonlyArray2<'py, f32>, PyReadonlyArray2<'py, f32>),
    F16(PyReadonlyArray2<'py, u16>, PyReadonlyArray2<'py, u16>),
}

impl<'py> ScaleArrays<'py> {
    pub fn extract(d: &Bound<'py, PyAny>, m: &Bound<'py, PyAny>) -> PyResult<Self> {
        if let (Ok(d), Ok(m)) = (d.extract(), m.extract()) {
            return Ok(ScaleArrays::F32(d, m));
        }
        match (d.extract(), m.extract()) {
            (Ok(d), Ok(m)) => Ok(ScaleArrays::F16(d, m)),
            _ => Err(value_error(
                "scales d and m must both be float32 or both uint16 (f16 bits) 2-D arrays",
            )),
        }
    }

    pub fn as_ref(&self) -> PyResult<ScalesRef<'_>> {
        Ok(match self {
            ScaleArrays::F32(d, m) => ScalesRef::F32 {
                d: contiguous(d.as_slice(), "d")?,
                m: contiguous(m.as_slice(), "m")?,
            },
            ScaleArrays::F16(d, m) => ScalesRef::F16 {
                d: contiguous(d.as_slice(), "d")?,
                m: contiguous(m.as_slice(), "m")?,
            },
        })
    }
}

/// GGUF blocks (uint8 `[n, row_bytes]` of `qtype`, `[n, k]` weights) repacked for
/// `quant_matmul_packed`: (bits, data uint8 `[n, bytes]`, d `[n, blocks]`, m `[n, blocks]`),
/// the scales as uint16 (f16 bits) where f16 holds them exactly, else float32. Q4_0, Q4_1,
/// Q8_0 and Q4_K pack; ValueError for the others.
#[pyfunction]
fn quant_pack<'py>(
    py: Python<'py>,
    qtype_name: &str,
    w: PyReadonlyArray2<'py, u8>,
    k: usize,
) -> PyResult<PackedArrays<'py>> {
    let qt = qtype(qtype_name)?;
    let n = w.shape()[0];
    let ws = contiguous(w.as_slice(), "w")?;
    let p = py.detach(|| pack(qt, ws, n, k)).map_err(value_error)?;
    let nbp = packed_blocks(k);
    let rb = quant_packed::packed_row_bytes(p.bits, k);
    let data = PyArray1::from_vec(py, p.data).reshape([n, rb])?;
    let (d, m) = match p.scales {
        Scales::F32 { d, m } => (
            PyArray1::from_vec(py, d).reshape([n, nbp])?.into_any(),
            PyArray1::from_vec(py, m).reshape([n, nbp])?.into_any(),
        ),
        Scales::F16 { d, m } => (
            PyArray1::from_vec(py, d).reshape([n, nbp])?.into_any(),
            PyArray1::from_vec(py, m).reshape([n, nbp])?.into_any(),
        ),
    };
    Ok((p.bits, data, d, m))
}

/// `out[:, col:col + n] = x @ W.T` for weights packed by `quant_pack` (`[n, k]`), x float32
/// `[b, k]`, out float32 `[b, m]`; x is taken as int8 per 32 values.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (bits, data, d, m, k, x, out, col, threads))]
fn quant_matmul_packed(
    py: Python<'_>,
    bits: u8,
    data: PyReadonlyArray2<'_, u8>,
    d: Bound<'_, PyAny>,
    m: Bound<'_, PyAny>,
    k: usize,
    x: PyReadonlyArray2<'_, f32>,
    mut out: PyReadwriteArray2<'_, f32>,
    col: usize,
    threads: usize,
) -> PyResult<()> {
    let n = data.shape()[0];
    let scales = ScaleArrays::extract(&d, &m)?;
    let w = PackedRef {
        bits,
        n,
        k,
        data: contiguous(data.as_slice(), "data")?,
        scales: scales.as_ref()?,
    };
    let (x, b, o, mcols) = product_io(&x, &mut out, k, n, col)?;
    py.detach(|| quant_packed::matmul(w, x, b, o, mcols, threads))
        .map_err(value_error)
}

/// Whether packed-weight products of many rows run on AMX tiles here (see
/// `srt_kernels::quant_packed::batch_tiles`).
#[pyfunction]
fn quant_batch_tiles() -> bool {
    quant_packed::batch_tiles()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quant_batch_tiles, m)?)?;
    m.add_function(wrap_pyfunction!(quant_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(quant_pack, m)?)?;
    m.add_function(wrap_pyfunction!(quant_matmul_packed, m)?)?;
    m.add_function(wrap_pyfunction!(quant_dequantize, m)?)
}
