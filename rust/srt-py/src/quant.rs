//! Bindings of srt-kernels' quantized matmul: GGUF weight blocks (uint8 `[n, row_bytes]`)
//! times float32 activations, over numpy arrays (CPU torch tensors via `.numpy()`), without
//! the GIL.

use numpy::{PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use srt_kernels::quant::{dequantize, matmul, QType};

use crate::errors::value_error;

fn qtype(name: &str) -> PyResult<QType> {
    QType::from_name(name).ok_or_else(|| {
        value_error(format!(
            "unsupported GGUF block type {name:?} (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)"
        ))
    })
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
    let w = w
        .as_slice()
        .map_err(|_| value_error("w must be C-contiguous"))?;
    let x = x
        .as_slice()
        .map_err(|_| value_error("x must be C-contiguous"))?;
    let o = out
        .as_slice_mut()
        .map_err(|_| value_error("out must be C-contiguous"))?;
    let o = &mut o[col..];
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
    let w = w
        .as_slice()
        .map_err(|_| value_error("w must be C-contiguous"))?;
    let o = out
        .as_slice_mut()
        .map_err(|_| value_error("out must be C-contiguous"))?;
    py.detach(|| dequantize(qt, w, n, k, o, threads))
        .map_err(value_error)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quant_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(quant_dequantize, m)?)
}
