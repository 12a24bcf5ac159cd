//! `BatchScheduler`, `Plan` and `PrefillEntry`: the batch planner of the scheduler process.
//! Python calls `schedule()` once per step and gets back plain ints (request ids, lengths, KV
//! slots); `commit` / `finish` feed the step's outcome back. Glue only: the logic is
//! `srt_core::sched`.

use crate::errors::{sched_error, sched_invariant_error, value_error};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use srt_core::sched::{BatchScheduler, NewRequest, Plan, Policy, SchedConfig};

/// One request's part of a prefill step (see `srt_core::sched::PrefillEntry`).
#[pyclass(module = "srt._native", name = "PrefillEntry", frozen, get_all)]
pub struct PyPrefillEntry {
    rid: u64,
    prefix_len: usize,
    extend_len: usize,
    cached_len: usize,
    slots_from: usize,
    slots: Vec<u32>,
    is_last_chunk: bool,
}

#[pymethods]
impl PyPrefillEntry {
    fn __repr__(&self) -> String {
        format!(
            "PrefillEntry(rid={}, prefix_len={}, extend_len={}, cached_len={}, slots_from={}, \
             slots=<{} slots>, is_last_chunk={})",
            self.rid,
            self.prefix_len,
            self.extend_len,
            self.cached_len,
            self.slots_from,
            self.slots.len(),
            if self.is_last_chunk { "True" } else { "False" }
        )
    }
}

/// What the next step runs: `kind` is "idle", "prefill" (`entries`) or "decode" (`ids`,
/// `slots`, `retracted`); the fields of the other kinds are empty.
#[pyclass(module = "srt._native", name = "Plan", frozen)]
pub struct PyPlan {
    #[pyo3(get)]
    kind: &'static str,
    entries: Vec<Py<PyPrefillEntry>>,
    #[pyo3(get)]
    ids: Vec<u64>,
    #[pyo3(get)]
    slots: Vec<u32>,
    #[pyo3(get)]
    retracted: Vec<u64>,
}

#[pymethods]
impl PyPlan {
    #[getter]
    fn entries(&self, py: Python<'_>) -> Vec<Py<PyPrefillEntry>> {
        self.entries.iter().map(|e| e.clone_ref(py)).collect()
    }

    fn __repr__(&self) -> String {
        match self.kind {
            "prefill" => format!("Plan(kind='prefill', entries=<{}>)", self.entries.len()),
            "decode" => format!(
                "Plan(kind='decode', ids={:?}, retracted={:?})",
                self.ids, self.retracted
            ),
            kind => format!("Plan(kind='{kind}')"),
        }
    }
}

impl PyPlan {
    fn from_core(py: Python<'_>, plan: Plan) -> PyResult<Self> {
        let empty = |kind| PyPlan {
            kind,
            entries: Vec::new(),
            ids: Vec::new(),
            slots: Vec::new(),
            retracted: Vec::new(),
        };
        Ok(match plan {
            Plan::Idle => empty("idle"),
            Plan::Prefill(entries) => PyPlan {
                entries: entries
                    .into_iter()
                    .map(|e| {
                        Py::new(
                            py,
                            PyPrefillEntry {
                                rid: e.id,
                                prefix_len: e.prefix_len,
                                extend_len: e.extend_len,
                                cached_len: e.cached_len,
                                slots_from: e.slots_from,
                                slots: e.slots,
                                is_last_chunk: e.is_last_chunk,
                            },
                        )
                    })
                    .collect::<PyResult<_>>()?,
                ..empty("prefill")
            },
            Plan::Decode(d) => PyPlan {
                ids: d.ids,
                slots: d.slots,
                retracted: d.retracted,
                ..empty("decode")
            },
        })
    }
}

/// Waiting queue, prefix cache, KV slot allocator and batch assembly in one object.
#[pyclass(module = "srt._native", name = "BatchScheduler")]
pub struct PyBatchScheduler {
    inner: BatchScheduler,
}

fn count(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| value_error(format!("{name} must be >= 0, got {v}")))
}

#[pymethods]
impl PyBatchScheduler {
    #[new]
    #[pyo3(signature = (
        pool_size,
        page_size = 1,
        policy = "fcfs",
        max_prefill_tokens = 16384,
        chunked_prefill_size = Some(8192),
        max_running_requests = 256,
        enable_radix_cache = true,
        seed = 0,
        init_new_token_ratio = 0.7,
        min_new_token_ratio = 0.1,
        new_token_ratio_decay = 0.001,
        clip_max_new_tokens = 4096,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        pool_size: i64,
        page_size: i64,
        policy: &str,
        max_prefill_tokens: i64,
        chunked_prefill_size: Option<i64>,
        max_running_requests: i64,
        enable_radix_cache: bool,
        seed: i64,
        init_new_token_ratio: f64,
        min_new_token_ratio: f64,
        new_token_ratio_decay: f64,
        clip_max_new_tokens: i64,
    ) -> PyResult<Self> {
        let mut cfg = SchedConfig::new(count("pool_size", pool_size)?);
        cfg.page_size = count("page_size", page_size)?;
        cfg.policy = policy.parse::<Policy>().map_err(sched_error)?;
        cfg.max_prefill_tokens = count("max_prefill_tokens", max_prefill_tokens)?;
        cfg.chunked_prefill_size = chunked_prefill_size
            .map(|c| count("chunked_prefill_size", c))
            .transpose()?;
        cfg.max_running_requests = count("max_running_requests", max_running_requests)?;
        cfg.enable_radix_cache = enable_radix_cache;
        // Any int seeds the generator; negative seeds wrap.
        cfg.seed = seed as u64;
        cfg.init_new_token_ratio = init_new_token_ratio;
        cfg.min_new_token_ratio = min_new_token_ratio;
        cfg.new_token_ratio_decay = new_token_ratio_decay;
        cfg.clip_max_new_tokens = count("clip_max_new_tokens", clip_max_new_tokens)?;
        let inner = BatchScheduler::new(cfg).map_err(sched_error)?;
        Ok(PyBatchScheduler { inner })
    }

    #[pyo3(signature = (rid, tokens, max_new_tokens, namespace = ""))]
    fn add_request(
        &mut self,
        rid: u64,
        tokens: Vec<u32>,
        max_new_tokens: i64,
        namespace: &str,
    ) -> PyResult<()> {
        let max_new_tokens = count("max_new_tokens", max_new_tokens)?;
        self.inner
            .add_request(NewRequest {
                id: rid,
                tokens,
                max_new_tokens,
                namespace: namespace.to_string(),
            })
            .map_err(sched_error)
    }

    /// Plans the next step (the GIL is released while planning).
    fn schedule(&mut self, py: Python<'_>) -> PyResult<PyPlan> {
        let inner = &mut self.inner;
        let plan = py.detach(|| inner.schedule()).map_err(sched_error)?;
        PyPlan::from_core(py, plan)
    }

    fn commit(&mut self, rids: Vec<u64>, tokens: Vec<u32>) -> PyResult<()> {
        self.inner.commit(&rids, &tokens).map_err(sched_error)
    }

    fn finish(&mut self, rid: u64) -> PyResult<()> {
        self.inner.finish(rid).map_err(sched_error)
    }

    fn contains(&self, rid: u64) -> bool {
        self.inner.contains(rid)
    }

    fn __contains__(&self, rid: u64) -> bool {
        self.inner.contains(rid)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("num_waiting", s.num_waiting)?;
        d.set_item("num_running", s.num_running)?;
        d.set_item("pool_size", s.pool_size)?;
        d.set_item("available", s.available)?;
        d.set_item("evictable", s.evictable)?;
        d.set_item("protected", s.protected)?;
        d.set_item("request_owned", s.request_owned)?;
        d.set_item("new_token_ratio", s.new_token_ratio)?;
        Ok(d)
    }

    fn flush_cache(&mut self) -> PyResult<()> {
        self.inner.flush_cache().map_err(sched_error)
    }

    fn check_invariants(&self) -> PyResult<()> {
        self.inner.check_invariants().map_err(sched_invariant_error)
    }

    #[getter]
    fn num_waiting(&self) -> usize {
        self.inner.stats().num_waiting
    }

    #[getter]
    fn num_running(&self) -> usize {
        self.inner.stats().num_running
    }

    fn __repr__(&self) -> String {
        let s = self.inner.stats();
        format!(
            "BatchScheduler(pool_size={}, waiting={}, running={}, available={}, cached={})",
            s.pool_size,
            s.num_waiting,
            s.num_running,
            s.available,
            s.evictable + s.protected
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBatchScheduler>()?;
    m.add_class::<PyPlan>()?;
    m.add_class::<PyPrefillEntry>()?;
    Ok(())
}
