//! `srt._native.PrefixIndex`: the data-parallel router's approximate prefix index (wraps
//! `srt_core::router::PrefixIndex`). Keys cross as lists of ints (token ids or UTF-8 bytes).

use crate::errors::router_error;
use crate::radix::DETACH_MIN_TOKENS;
use pyo3::prelude::*;
use srt_core::router::PrefixIndex;

#[pyclass(name = "PrefixIndex", module = "srt._native")]
pub struct PyPrefixIndex {
    inner: PrefixIndex,
}

#[pymethods]
impl PyPrefixIndex {
    #[new]
    fn new(num_replicas: usize, max_tokens: usize) -> PyResult<Self> {
        let inner = PrefixIndex::new(num_replicas, max_tokens).map_err(router_error)?;
        Ok(PyPrefixIndex { inner })
    }

    #[getter]
    fn num_replicas(&self) -> usize {
        self.inner.num_replicas()
    }

    #[getter]
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens()
    }

    /// `(replica, matched length)` of the candidate holding the longest prefix of `key`
    /// (ties: the smallest tree, then the lowest index); None when `candidates` is empty.
    #[pyo3(signature = (key, candidates, namespace = ""))]
    fn match_prefix(
        &mut self,
        py: Python<'_>,
        key: Vec<u32>,
        candidates: Vec<usize>,
        namespace: &str,
    ) -> PyResult<Option<(usize, usize)>> {
        let ix = &mut self.inner;
        let m = if key.len() >= DETACH_MIN_TOKENS {
            py.detach(|| ix.match_prefix(&key, namespace, &candidates))
        } else {
            ix.match_prefix(&key, namespace, &candidates)
        };
        Ok(m.map_err(router_error)?.map(|m| (m.replica, m.len)))
    }

    /// Records `key` as routed to `replica` (evicting its least recently routed keys down to
    /// `max_tokens`); returns how much of it the replica already held.
    #[pyo3(signature = (replica, key, namespace = ""))]
    fn insert(
        &mut self,
        py: Python<'_>,
        replica: usize,
        key: Vec<u32>,
        namespace: &str,
    ) -> PyResult<usize> {
        let ix = &mut self.inner;
        let r = if key.len() >= DETACH_MIN_TOKENS {
            py.detach(|| ix.insert(replica, &key, namespace))
        } else {
            ix.insert(replica, &key, namespace)
        };
        r.map_err(router_error)
    }

    /// The candidate with the smallest tree (ties: the lowest index); None when empty.
    fn smallest(&self, candidates: Vec<usize>) -> PyResult<Option<usize>> {
        self.inner.smallest(&candidates).map_err(router_error)
    }

    /// Tokens indexed for `replica`.
    fn size(&self, replica: usize) -> PyResult<usize> {
        self.inner.size(replica).map_err(router_error)
    }

    /// Forgets everything routed to `replica`.
    fn clear(&mut self, replica: usize) -> PyResult<()> {
        self.inner.clear(replica).map_err(router_error)
    }

    fn __repr__(&self) -> String {
        let sizes: Vec<String> = (0..self.inner.num_replicas())
            .map(|r| self.inner.size(r).unwrap_or(0).to_string())
            .collect();
        format!(
            "PrefixIndex(max_tokens={}, sizes=[{}])",
            self.inner.max_tokens(),
            sizes.join(", ")
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPrefixIndex>()
}
