//! `srt._native.SlotAllocator`: the KV slot allocator of the scheduler process (wraps
//! `srt_core::alloc::SlotAllocator`). Slots cross as lists of ints.

use crate::errors::alloc_error;
use pyo3::prelude::*;
use srt_core::alloc::SlotAllocator;

#[pyclass(name = "SlotAllocator", module = "srt._native")]
pub struct PySlotAllocator {
    inner: SlotAllocator,
}

#[pymethods]
impl PySlotAllocator {
    #[new]
    #[pyo3(signature = (size, page_size = 1))]
    fn new(size: usize, page_size: usize) -> PyResult<Self> {
        let inner = SlotAllocator::new(size, page_size).map_err(alloc_error)?;
        Ok(PySlotAllocator { inner })
    }

    #[getter]
    fn page_size(&self) -> usize {
        self.inner.page_size()
    }

    fn size(&self) -> usize {
        self.inner.size()
    }

    fn available(&self) -> usize {
        self.inner.available()
    }

    fn alloc(&mut self, n: usize) -> PyResult<Vec<u32>> {
        self.inner.alloc(n).map_err(alloc_error)
    }

    fn alloc_extend(&mut self, seq_len: usize, last_slot: u32, n_new: usize) -> PyResult<Vec<u32>> {
        self.inner
            .alloc_extend(seq_len, last_slot, n_new)
            .map_err(alloc_error)
    }

    fn pages_needed(&self, seq_len: usize, n_new: usize) -> usize {
        self.inner.pages_needed(seq_len, n_new)
    }

    fn free(&mut self, slots: Vec<u32>) -> PyResult<()> {
        self.inner.free(&slots).map_err(alloc_error)
    }

    fn reset(&mut self) {
        self.inner.reset()
    }

    fn __repr__(&self) -> String {
        format!(
            "SlotAllocator(size={}, page_size={}, available={})",
            self.inner.size(),
            self.inner.page_size(),
            self.inner.available()
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySlotAllocator>()
}
