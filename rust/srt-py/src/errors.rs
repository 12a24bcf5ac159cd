//! The one place where srt-core errors become Python exceptions.
//! Add a `From`-style helper per core error type; never panic on input.

use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

pub fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Detokenizer errors: unknown or duplicate requests, unreadable tokenizers and decode failures
/// are all bad input to the caller, hence `ValueError` (a missing tokenizer file is reported as
/// `FileNotFoundError` by the binding before it gets here).
pub fn detok_error(e: srt_core::detok::DetokError) -> PyErr {
    PyValueError::new_err(e.to_string())
}
