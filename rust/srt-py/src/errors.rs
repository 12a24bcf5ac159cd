//! The one place where srt-core errors become Python exceptions.
//! Add a `From`-style helper per core error type; never panic on input.

use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

pub fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}
