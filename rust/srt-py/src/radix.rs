//! `srt._native.RadixTree`: the prefix cache of the scheduler process (wraps
//! `srt_core::radix::RadixTree`). Token ids and KV slot values cross as lists of ints.

use crate::errors::radix_error;
use pyo3::prelude::*;
use srt_core::radix::RadixTree;

/// Work below this many tokens runs with the GIL held: releasing it costs more than the call,
/// and reacquiring it can wait a whole thread switch interval behind another Python thread.
pub(crate) const DETACH_MIN_TOKENS: usize = 16 * 1024;

#[pyclass(name = "RadixTree", module = "srt._native")]
pub struct PyRadixTree {
    inner: RadixTree,
}

#[pymethods]
impl PyRadixTree {
    #[new]
    #[pyo3(signature = (page_size = 1))]
    fn new(page_size: usize) -> PyResult<Self> {
        let inner = RadixTree::new(page_size).map_err(radix_error)?;
        Ok(PyRadixTree { inner })
    }

    #[getter]
    fn page_size(&self) -> usize {
        self.inner.page_size()
    }

    /// `(values, node, length)` of the longest cached page-aligned prefix of `key`.
    #[pyo3(signature = (key, namespace = ""))]
    fn match_prefix(
        &mut self,
        py: Python<'_>,
        key: Vec<u32>,
        namespace: &str,
    ) -> (Vec<u32>, u32, usize) {
        let tree = &mut self.inner;
        let m = if key.len() >= DETACH_MIN_TOKENS {
            py.detach(|| tree.match_prefix(&key, namespace))
        } else {
            tree.match_prefix(&key, namespace)
        };
        (m.values, m.node, m.len)
    }

    /// Inserts `key -> values`; returns how many leading tokens were already cached.
    #[pyo3(signature = (key, values, namespace = ""))]
    fn insert(
        &mut self,
        py: Python<'_>,
        key: Vec<u32>,
        values: Vec<u32>,
        namespace: &str,
    ) -> PyResult<usize> {
        let tree = &mut self.inner;
        let result = if key.len() >= DETACH_MIN_TOKENS {
            py.detach(|| tree.insert(&key, &values, namespace))
        } else {
            tree.insert(&key, &values, namespace)
        };
        result.map_err(radix_error)
    }

    fn lock(&mut self, node: u32) -> PyResult<()> {
        self.inner.lock(node).map_err(radix_error)
    }

    fn unlock(&mut self, node: u32) -> PyResult<()> {
        self.inner.unlock(node).map_err(radix_error)
    }

    /// Frees least recently used unlocked leaves until `n_tokens` are freed; returns their slots.
    fn evict(&mut self, py: Python<'_>, n_tokens: usize) -> Vec<u32> {
        let tree = &mut self.inner;
        if n_tokens >= DETACH_MIN_TOKENS {
            py.detach(|| tree.evict(n_tokens))
        } else {
            tree.evict(n_tokens)
        }
    }

    fn evictable_size(&self) -> usize {
        self.inner.evictable_size()
    }

    fn protected_size(&self) -> usize {
        self.inner.protected_size()
    }

    fn total_size(&self) -> usize {
        self.inner.total_size()
    }

    /// Drops everything; returns every cached slot (the caller frees them).
    fn reset(&mut self, py: Python<'_>) -> Vec<u32> {
        let tree = &mut self.inner;
        if tree.total_size() >= DETACH_MIN_TOKENS {
            py.detach(|| tree.reset())
        } else {
            tree.reset()
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "RadixTree(page_size={}, total={}, evictable={}, protected={})",
            self.inner.page_size(),
            self.inner.total_size(),
            self.inner.evictable_size(),
            self.inner.protected_size()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRadixTree>()
}
