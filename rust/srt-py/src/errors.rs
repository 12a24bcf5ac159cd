//! The one place where srt-core errors become Python exceptions.
//! Add a `From`-style helper per core error type; never panic on input.

use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::PyErr;
use srt_core::alloc::AllocError;
use srt_core::radix::RadixError;
use srt_core::router::RouterError;

pub fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// `SchedError` -> exception: bad input or misuse -> `ValueError`; a failure inside the prefix
/// cache or the allocator (a bookkeeping bug, never the caller's input) -> `RuntimeError`.
pub fn sched_error(e: srt_core::sched::SchedError) -> PyErr {
    use srt_core::sched::SchedError;
    match e {
        SchedError::Radix(_) | SchedError::Alloc(_) => {
            pyo3::exceptions::PyRuntimeError::new_err(e.to_string())
        }
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// A violated `BatchScheduler` invariant -> `AssertionError`.
pub fn sched_invariant_error(violation: String) -> PyErr {
    pyo3::exceptions::PyAssertionError::new_err(format!(
        "scheduler invariant violated: {violation}"
    ))
}

/// Every radix error is a caller mistake: `ValueError`.
pub fn radix_error(e: RadixError) -> PyErr {
    value_error(e)
}

/// Running out of KV memory is `MemoryError` (the scheduler retracts or waits); bad frees and
/// bad configurations are `ValueError`.
pub fn alloc_error(e: AllocError) -> PyErr {
    match e {
        AllocError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
        _ => value_error(e),
    }
}

/// Detokenizer errors: unknown or duplicate requests, unreadable tokenizers and decode failures
/// are all bad input to the caller, hence `ValueError` (a missing tokenizer file is reported as
/// `FileNotFoundError` by the binding before it gets here).
pub fn detok_error(e: srt_core::detok::DetokError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Router index errors (no replicas, a zero cap, a replica out of range) are caller mistakes:
/// `ValueError`.
pub fn router_error(e: RouterError) -> PyErr {
    value_error(e)
}
