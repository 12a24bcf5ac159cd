//! `BatchScheduler`, `Step` and `CommitResult`: the request table and batch planner of the
//! scheduler process. A step crosses to Python as numpy arrays that take over the Rust
//! buffers (no copy); a commit's tokens come in as a numpy array. Glue only: the logic is
//! `srt_core::sched`.

use crate::errors::{sched_error, sched_invariant_error, value_error};
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::IntoPyObjectExt;
use srt_core::detok::{DecodeParams, Detokenizer as CoreDetokenizer};
use srt_core::sched::{
    flags, step, BatchScheduler, FinishKind, Finished, NewRequest, Policy, SamplingParams,
    SchedConfig, Step, StepKind, StopStrings,
};

/// Prompt tokens the detokenizers (the scheduler's stop checker and the detokenizer process)
/// decode as context before a request's first output token.
pub const PROMPT_TAIL: usize = 16;

/// One planned step: every integer array in `ints` (section `i` is
/// `ints[offsets[i]:offsets[i + 1]]`, sections named by `STEP_SECTIONS`), every float array in
/// `floats` (`STEP_FLOAT_SECTIONS`), and the OR of the feature flags of its sampling sequences
/// (`flags`) and of all of them (`all_flags`).
#[pyclass(module = "srt._native", name = "Step", frozen)]
pub struct PyStep {
    #[pyo3(get)]
    kind: &'static str,
    #[pyo3(get)]
    ints: Py<PyArray1<i64>>,
    #[pyo3(get)]
    offsets: Py<PyArray1<i64>>,
    #[pyo3(get)]
    floats: Py<PyArray1<f32>>,
    #[pyo3(get)]
    float_offsets: Py<PyArray1<i64>>,
    #[pyo3(get)]
    flags: u32,
    #[pyo3(get)]
    all_flags: u32,
    /// The largest top-k among the sampling rows that filter (0: none; top-p alone counts
    /// as the vocabulary size, reported as 2**64 - 1).
    #[pyo3(get)]
    top_k_max: u64,
    #[pyo3(get)]
    num_seqs: usize,
    #[pyo3(get)]
    num_tokens: usize,
    #[pyo3(get)]
    num_samples: usize,
}

#[pymethods]
impl PyStep {
    fn __repr__(&self) -> String {
        format!(
            "Step(kind='{}', num_seqs={}, num_tokens={}, num_samples={})",
            self.kind, self.num_seqs, self.num_tokens, self.num_samples
        )
    }
}

fn offsets_array<'py>(py: Python<'py>, offsets: &[usize]) -> Py<PyArray1<i64>> {
    PyArray1::from_iter(py, offsets.iter().map(|&o| o as i64)).unbind()
}

impl PyStep {
    fn from_core(py: Python<'_>, step: Step) -> Self {
        let kind = match step.kind {
            StepKind::Idle => "idle",
            StepKind::Prefill => "prefill",
            StepKind::Decode => "decode",
        };
        PyStep {
            kind,
            num_seqs: step.num_seqs(),
            num_tokens: step.num_tokens(),
            num_samples: step.num_samples(),
            flags: step.flags,
            all_flags: step.all_flags,
            top_k_max: step.top_k_max,
            offsets: offsets_array(py, &step.offsets),
            float_offsets: offsets_array(py, &step.float_offsets),
            // NOTE: the arrays take over the Vecs' buffers: no copy.
            ints: PyArray1::from_vec(py, step.ints).unbind(),
            floats: PyArray1::from_vec(py, step.floats).unbind(),
        }
    }
}

/// What a commit decided: `ids` / `tokens` (int64 arrays) of the requests that got a token,
/// `first` (id, cached prompt tokens) of first tokens, and `finished`: (id, kind, value,
/// completion_tokens, cached_tokens) with kind "stop" (value: the stop token id or stop
/// string), "length" (value: the length) or "abort" (value: None).
#[pyclass(module = "srt._native", name = "CommitResult", frozen)]
pub struct PyCommitResult {
    #[pyo3(get)]
    ids: Py<PyArray1<i64>>,
    #[pyo3(get)]
    tokens: Py<PyArray1<i64>>,
    #[pyo3(get)]
    first: Vec<(u64, usize)>,
    #[pyo3(get)]
    finished: Py<PyAny>,
}

#[pymethods]
impl PyCommitResult {
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "CommitResult(tokens={}, first={}, finished={})",
            self.ids.bind(py).len().unwrap_or(0),
            self.first.len(),
            self.finished.bind(py).len().unwrap_or(0)
        )
    }
}

/// (id, kind, value, completion_tokens, cached_tokens) tuples.
fn finished_list(py: Python<'_>, finished: Vec<Finished>) -> PyResult<Py<PyAny>> {
    let items = finished
        .into_iter()
        .map(|f| {
            let (kind, value) = match f.kind {
                FinishKind::StopToken(t) => ("stop", t.into_py_any(py)?),
                FinishKind::StopString(s) => ("stop", s.into_py_any(py)?),
                FinishKind::Length(n) => ("length", n.into_py_any(py)?),
                FinishKind::Abort => ("abort", py.None()),
            };
            PyTuple::new(
                py,
                [
                    f.id.into_py_any(py)?,
                    kind.into_py_any(py)?,
                    value,
                    f.output_len.into_py_any(py)?,
                    f.cached_len.into_py_any(py)?,
                ],
            )
            .map(|t| t.into_any().unbind())
        })
        .collect::<PyResult<Vec<_>>>()?;
    items.into_py_any(py)
}

/// The request table, waiting queue, prefix cache, KV slot allocator, table rows and batch
/// assembly of the scheduler process, in one object.
#[pyclass(module = "srt._native", name = "BatchScheduler")]
pub struct PyBatchScheduler {
    inner: BatchScheduler,
}

fn count(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| value_error(format!("{name} must be >= 0, got {v}")))
}

fn token(name: &str, v: i64) -> PyResult<u32> {
    u32::try_from(v).map_err(|_| value_error(format!("{name}: {v} is not a token id")))
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
        context_len = None,
        init_new_token_ratio = 0.7,
        min_new_token_ratio = 0.1,
        new_token_ratio_decay = 0.001,
        clip_max_new_tokens = 4096,
        tokenizer_path = None,
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
        context_len: Option<i64>,
        init_new_token_ratio: f64,
        min_new_token_ratio: f64,
        new_token_ratio_decay: f64,
        clip_max_new_tokens: i64,
        tokenizer_path: Option<&str>,
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
        if let Some(n) = context_len {
            cfg.context_len = count("context_len", n)?;
        }
        cfg.init_new_token_ratio = init_new_token_ratio;
        cfg.min_new_token_ratio = min_new_token_ratio;
        cfg.new_token_ratio_decay = new_token_ratio_decay;
        cfg.clip_max_new_tokens = count("clip_max_new_tokens", clip_max_new_tokens)?;
        let mut inner = BatchScheduler::new(cfg).map_err(sched_error)?;
        if let Some(path) = tokenizer_path {
            let checker = CoreDetokenizer::from_file(path).map_err(value_error)?;
            inner.set_stop_checker(checker);
        }
        Ok(PyBatchScheduler { inner })
    }

    /// Adds a request to the waiting queue. `tokens`: the prompt. `stop`: stop strings
    /// (needs `tokenizer_path`); decoded from the prompt's last `PROMPT_TAIL` ids with the
    /// given settings. `logit_bias`: (token id, bias) pairs. `user_flags`: the caller's
    /// feature bits (already shifted by `USER_FLAG_SHIFT`). `arrival`: seconds, for `expired`.
    #[pyo3(signature = (
        id,
        tokens,
        max_new_tokens,
        *,
        min_new_tokens = 0,
        stop_ids = Vec::new(),
        stop = None,
        skip_special_tokens = true,
        spaces_between_special_tokens = true,
        no_stop_trim = false,
        namespace = "",
        temperature = 0.0,
        top_p = 1.0,
        top_k = -1,
        min_p = 0.0,
        repetition_penalty = 1.0,
        frequency_penalty = 0.0,
        presence_penalty = 0.0,
        seed = 0,
        logit_bias = Vec::new(),
        user_flags = 0,
        arrival = 0.0,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn add_request(
        &mut self,
        id: u64,
        tokens: Vec<u32>,
        max_new_tokens: i64,
        min_new_tokens: i64,
        stop_ids: Vec<u32>,
        stop: Option<Vec<String>>,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
        no_stop_trim: bool,
        namespace: &str,
        temperature: f32,
        top_p: f32,
        top_k: i64,
        min_p: f32,
        repetition_penalty: f32,
        frequency_penalty: f32,
        presence_penalty: f32,
        seed: u64,
        logit_bias: Vec<(u32, f32)>,
        user_flags: u32,
        arrival: f64,
    ) -> PyResult<()> {
        let stop_strings = stop.filter(|s| !s.is_empty()).map(|stop| StopStrings {
            prompt_tail: tokens[tokens.len().saturating_sub(PROMPT_TAIL)..].to_vec(),
            params: DecodeParams {
                skip_special_tokens,
                spaces_between_special_tokens,
                stop,
                no_stop_trim,
            },
        });
        let req = NewRequest {
            min_new_tokens: count("min_new_tokens", min_new_tokens)?,
            stop_ids,
            stop_strings,
            namespace: namespace.to_string(),
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                repetition_penalty,
                frequency_penalty,
                presence_penalty,
                seed,
                logit_bias,
            },
            user_flags,
            arrival,
            ..NewRequest::new(id, tokens, count("max_new_tokens", max_new_tokens)?)
        };
        self.inner.add_request(req).map_err(sched_error)
    }

    /// Plans the next step (the GIL is released while planning).
    fn schedule(&mut self, py: Python<'_>) -> PyResult<PyStep> {
        let inner = &mut self.inner;
        let step = py.detach(|| inner.schedule()).map_err(sched_error)?;
        Ok(PyStep::from_core(py, step))
    }

    /// Commits the oldest uncommitted step: `tokens[i]` (an int64 array) was sampled for its
    /// i-th sampling sequence.
    fn commit(
        &mut self,
        py: Python<'_>,
        tokens: PyReadonlyArray1<'_, i64>,
    ) -> PyResult<PyCommitResult> {
        let tokens = tokens
            .as_slice()?
            .iter()
            .map(|&t| token("commit", t))
            .collect::<PyResult<Vec<u32>>>()?;
        let inner = &mut self.inner;
        let res = py.detach(|| inner.commit(&tokens)).map_err(sched_error)?;
        Ok(PyCommitResult {
            ids: PyArray1::from_vec(py, res.ids).unbind(),
            tokens: PyArray1::from_vec(py, res.tokens).unbind(),
            first: res.first.into_iter().collect(),
            finished: finished_list(py, res.finished)?,
        })
    }

    /// Drops the oldest uncommitted step (it failed); its requests still in the system end.
    /// Returns their (id, "abort", None, completion_tokens, cached_tokens).
    fn abandon(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let ended = self.inner.abandon().map_err(sched_error)?;
        finished_list(py, ended)
    }

    /// Ends a request in any state; returns (completion_tokens, cached_tokens).
    fn finish(&mut self, id: u64) -> PyResult<(usize, usize)> {
        let f = self.inner.finish(id).map_err(sched_error)?;
        Ok((f.output_len, f.cached_len))
    }

    /// Puts an admitted request back in the waiting queue without its KV (a step it depends
    /// on failed); the tokens of its samples in flight are dropped at their commits.
    fn requeue(&mut self, id: u64) -> PyResult<()> {
        self.inner.requeue(id).map_err(sched_error)
    }

    /// Ids of the requests that arrived more than `limit` seconds before `now`.
    fn expired(&self, now: f64, limit: f64) -> Vec<u64> {
        self.inner.expired(now, limit)
    }

    fn contains(&self, id: u64) -> bool {
        self.inner.contains(id)
    }

    fn __contains__(&self, id: u64) -> bool {
        self.inner.contains(id)
    }

    fn request_ids(&self) -> Vec<u64> {
        self.inner.request_ids()
    }

    /// The committed tokens (prompt, then output) of a request, or None.
    fn tokens(&self, id: u64) -> Option<Vec<u32>> {
        self.inner.tokens(id).map(<[u32]>::to_vec)
    }

    fn set_admission_paused(&mut self, paused: bool) {
        self.inner.set_admission_paused(paused);
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("num_requests", s.num_requests)?;
        d.set_item("num_waiting", s.num_waiting)?;
        d.set_item("num_running", s.num_running)?;
        d.set_item("pool_size", s.pool_size)?;
        d.set_item("available", s.available)?;
        d.set_item("evictable", s.evictable)?;
        d.set_item("protected", s.protected)?;
        d.set_item("request_owned", s.request_owned)?;
        d.set_item("new_token_ratio", s.new_token_ratio)?;
        d.set_item("rows_free", s.rows_free)?;
        d.set_item("in_flight", s.in_flight)?;
        d.set_item("retracted_total", s.retracted_total)?;
        d.set_item("hit_prompt_tokens", s.hit_prompt_tokens)?;
        d.set_item("hit_cached_tokens", s.hit_cached_tokens)?;
        d.set_item("admission_paused", s.admission_paused)?;
        Ok(d)
    }

    /// Empties the prefix cache; refused (ValueError) while a request holds KV or a step is
    /// uncommitted.
    fn flush_cache(&mut self) -> PyResult<()> {
        self.inner.flush_cache().map_err(sched_error)
    }

    fn check_invariants(&self) -> PyResult<()> {
        self.inner.check_invariants().map_err(sched_invariant_error)
    }

    #[getter]
    fn num_requests(&self) -> usize {
        self.inner.stats().num_requests
    }

    #[getter]
    fn num_waiting(&self) -> usize {
        self.inner.stats().num_waiting
    }

    #[getter]
    fn num_running(&self) -> usize {
        self.inner.stats().num_running
    }

    #[getter]
    fn in_flight(&self) -> usize {
        self.inner.stats().in_flight
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
    m.add_class::<PyStep>()?;
    m.add_class::<PyCommitResult>()?;
    let sections: Vec<&str> = step::Section::ALL.iter().map(|s| s.name()).collect();
    m.add("STEP_SECTIONS", PyTuple::new(m.py(), sections)?)?;
    let floats: Vec<&str> = step::FloatSection::ALL.iter().map(|s| s.name()).collect();
    m.add("STEP_FLOAT_SECTIONS", PyTuple::new(m.py(), floats)?)?;
    m.add("ADMIT_FLOATS", step::ADMIT_FLOATS)?;
    m.add("PROMPT_TAIL", PROMPT_TAIL)?;
    m.add("FLAG_SAMPLED", flags::SAMPLED)?;
    m.add("FLAG_TOP_K_P", flags::TOP_K_P)?;
    m.add("FLAG_MIN_P", flags::MIN_P)?;
    m.add("FLAG_OUTPUT_PENALTY", flags::OUTPUT_PENALTY)?;
    m.add("FLAG_REPETITION_PENALTY", flags::REPETITION_PENALTY)?;
    m.add("FLAG_LOGIT_BIAS", flags::LOGIT_BIAS)?;
    m.add("FLAG_MIN_TOKENS", flags::MIN_TOKENS)?;
    m.add("FLAG_GREEDY", flags::GREEDY)?;
    m.add("FLAG_PRESENCE_PENALTY", flags::PRESENCE_PENALTY)?;
    m.add("USER_FLAG_SHIFT", flags::USER_SHIFT)?;
    Ok(())
}
