//! Bindings of srt-kernels' fused row ops (RMSNorm with its residual add, gated SiLU) over
//! numpy arrays (CPU torch tensors via `.numpy()`, bf16 as int16 bits), without the GIL.

use numpy::{
    Element, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use srt_kernels::elem::{Bf16, Elem};
use srt_kernels::elementwise;

use crate::errors::value_error;

/// `&[T]` as `&[E]` (same size and layout: f32 as itself, i16 as bf16 bits).
fn cast<T: Element, E: Elem>(s: &[T]) -> &[E] {
    debug_assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<E>());
    // SAFETY: E has T's size and alignment and every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<E>(), s.len()) }
}

fn cast_mut<T: Element, E: Elem>(s: &mut [T]) -> &mut [E] {
    // SAFETY: as in `cast`.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<E>(), s.len()) }
}

fn contiguous<'a, T>(
    s: Result<&'a [T], numpy::NotContiguousError>,
    name: &str,
) -> PyResult<&'a [T]> {
    s.map_err(|_| value_error(format!("{name} must be C-contiguous")))
}

#[allow(clippy::too_many_arguments)]
fn norm_as<T: Element, E: Elem>(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    residual: Option<&Bound<'_, PyAny>>,
    weight: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f32,
    gemma: bool,
    threads: usize,
) -> PyResult<()> {
    let x: PyReadonlyArray2<'_, T> = x.extract()?;
    let weight: PyReadonlyArray1<'_, T> = weight.extract()?;
    let mut out: PyReadwriteArray2<'_, T> = out.extract()?;
    let mut residual: Option<PyReadwriteArray2<'_, T>> =
        residual.map(|r| r.extract()).transpose()?;
    let d = x.shape()[1];
    if out.shape() != x.shape() || residual.as_ref().is_some_and(|r| r.shape() != x.shape()) {
        return Err(value_error(
            "rms_norm: x, residual and out must have one shape",
        ));
    }
    let xs = cast::<T, E>(contiguous(x.as_slice(), "x")?);
    let ws = cast::<T, E>(contiguous(weight.as_slice(), "weight")?);
    let os = cast_mut::<T, E>(
        out.as_slice_mut()
            .map_err(|_| value_error("out must be C-contiguous"))?,
    );
    let rs = match residual.as_mut() {
        Some(r) => Some(cast_mut::<T, E>(
            r.as_slice_mut()
                .map_err(|_| value_error("residual must be C-contiguous"))?,
        )),
        None => None,
    };
    py.detach(|| elementwise::rms_norm_threads(xs, rs, ws, os, d, eps, gemma, threads))
        .map_err(value_error)
}

/// RMSNorm of the rows of `x` (`[T, d]`) into `out`; with `residual`, first `residual += x`
/// (in place) and the norm of that. float32 or int16 (bf16 bits) arrays, one dtype. `threads`
/// > 1 splits the rows over that many threads when there are enough.
#[pyfunction]
#[pyo3(signature = (x, residual, weight, out, eps, gemma=false, threads=1))]
#[allow(clippy::too_many_arguments)]
fn rms_norm(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    residual: Option<&Bound<'_, PyAny>>,
    weight: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    eps: f32,
    gemma: bool,
    threads: usize,
) -> PyResult<()> {
    if x.extract::<PyReadonlyArray2<'_, f32>>().is_ok() {
        norm_as::<f32, f32>(py, x, residual, weight, out, eps, gemma, threads)
    } else if x.extract::<PyReadonlyArray2<'_, i16>>().is_ok() {
        norm_as::<i16, Bf16>(py, x, residual, weight, out, eps, gemma, threads)
    } else {
        Err(value_error(
            "rms_norm: x must be a 2-D float32 or int16 (bf16) array",
        ))
    }
}

fn silu_as<T: Element, E: Elem>(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let x: PyReadonlyArray2<'_, T> = x.extract()?;
    let mut out: PyReadwriteArray2<'_, T> = out.extract()?;
    let d = out.shape()[1];
    if x.shape()[0] != out.shape()[0] || x.shape()[1] != 2 * d {
        return Err(value_error(
            "silu_and_mul: x must be [T, 2d] and out [T, d]",
        ));
    }
    let xs = cast::<T, E>(contiguous(x.as_slice(), "x")?);
    let os = cast_mut::<T, E>(
        out.as_slice_mut()
            .map_err(|_| value_error("out must be C-contiguous"))?,
    );
    py.detach(|| elementwise::silu_and_mul_threads(xs, os, d, threads))
        .map_err(value_error)
}

/// `out = silu(x[:, :d]) * x[:, d:]` for `x` `[T, 2d]` (gate then up), float32 or int16 (bf16);
/// `threads` as in `rms_norm`.
#[pyfunction]
#[pyo3(signature = (x, out, threads=1))]
fn silu_and_mul(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    if x.extract::<PyReadonlyArray2<'_, f32>>().is_ok() {
        silu_as::<f32, f32>(py, x, out, threads)
    } else if x.extract::<PyReadonlyArray2<'_, i16>>().is_ok() {
        silu_as::<i16, Bf16>(py, x, out, threads)
    } else {
        Err(value_error(
            "silu_and_mul: x must be a 2-D float32 or int16 (bf16) array",
        ))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rms_norm, m)?)?;
    m.add_function(wrap_pyfunction!(silu_and_mul, m)?)
}
