//! Python binding of `srt_core::detok`: the `Detokenizer` class (incremental detokenization
//! with stop strings, one instance per detokenizer process). Glue only.

use std::path::Path;

use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyFileNotFoundError, PyValueError};
use pyo3::prelude::*;
use srt_core::detok::{DecodeParams, Detokenizer as CoreDetokenizer, StepOutput};

use crate::errors::detok_error;

/// Text per token, and (index, message) of the tokens that failed.
type StepTexts = (Vec<String>, Vec<(usize, String)>);

/// Incremental detokenizer over a `tokenizer.json`: per-request state keyed by request id.
#[pyclass(module = "srt._native", name = "Detokenizer")]
pub struct Detokenizer {
    inner: CoreDetokenizer,
}

fn to_tuple(out: StepOutput) -> (String, Option<usize>) {
    (out.text, out.stop)
}

#[pymethods]
impl Detokenizer {
    /// Loads a `tokenizer.json` file, or the one inside a folder.
    #[new]
    fn new(tokenizer_path: &str) -> PyResult<Self> {
        let path = Path::new(tokenizer_path);
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(PyFileNotFoundError::new_err(format!(
                "no tokenizer.json at {tokenizer_path}"
            )));
        }
        let inner = CoreDetokenizer::from_file(tokenizer_path).map_err(detok_error)?;
        Ok(Detokenizer { inner })
    }

    /// Loads a tokenizer from the text of a `tokenizer.json`.
    #[staticmethod]
    fn from_json(json: &str) -> PyResult<Self> {
        let inner = CoreDetokenizer::from_json(json).map_err(detok_error)?;
        Ok(Detokenizer { inner })
    }

    #[pyo3(signature = (rid, prompt_ids, skip_special_tokens = true, spaces_between_special_tokens = true, stop = None, no_stop_trim = false))]
    fn add(
        &mut self,
        rid: u64,
        prompt_ids: Vec<u32>,
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool,
        stop: Option<Vec<String>>,
        no_stop_trim: bool,
    ) -> PyResult<()> {
        let params = DecodeParams {
            skip_special_tokens,
            spaces_between_special_tokens,
            stop: stop.unwrap_or_default(),
            no_stop_trim,
        };
        self.inner
            .add_request(rid, &prompt_ids, params)
            .map_err(detok_error)
    }

    /// Text that became final, and the index of the matched stop string if one matched.
    fn step(&mut self, rid: u64, new_ids: Vec<u32>) -> PyResult<(String, Option<usize>)> {
        self.inner
            .step(rid, &new_ids)
            .map(to_tuple)
            .map_err(detok_error)
    }

    /// `step` for many requests, without the GIL. Checks every rid before stepping any, so an
    /// error leaves all requests as they were.
    fn step_batch(
        &mut self,
        py: Python<'_>,
        rids: Vec<u64>,
        new_ids: Vec<Vec<u32>>,
    ) -> PyResult<Vec<(String, Option<usize>)>> {
        if rids.len() != new_ids.len() {
            return Err(PyValueError::new_err(format!(
                "step_batch: {} rids but {} id lists",
                rids.len(),
                new_ids.len()
            )));
        }
        if let Some(rid) = rids.iter().find(|rid| !self.inner.contains(**rid)) {
            return Err(PyValueError::new_err(format!("unknown request {rid}")));
        }
        let items: Vec<(u64, Vec<u32>)> = rids.into_iter().zip(new_ids).collect();
        let inner = &mut self.inner;
        let results = py.detach(move || inner.step_batch(&items));
        results
            .into_iter()
            .map(|r| r.map(to_tuple).map_err(detok_error))
            .collect()
    }

    /// One new token for each of many requests (`ids[i]` gets `tokens[i]`; int64 arrays, read
    /// without a copy), without the GIL. Returns the text that became final for each, and
    /// `(index, message)` for each request that could not be stepped (unknown id, decode
    /// failure; its text is "" and the others are unaffected). Stop strings are trimmed; a
    /// match is not reported (the scheduler decides when a request ends).
    fn step_tokens(
        &mut self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, i64>,
        tokens: PyReadonlyArray1<'_, i64>,
    ) -> PyResult<StepTexts> {
        let (ids, tokens) = (ids.as_slice()?, tokens.as_slice()?);
        if ids.len() != tokens.len() {
            return Err(PyValueError::new_err(format!(
                "step_tokens: {} ids but {} tokens",
                ids.len(),
                tokens.len()
            )));
        }
        let inner = &mut self.inner;
        Ok(py.detach(move || {
            let mut texts = Vec::with_capacity(ids.len());
            let mut errors = Vec::new();
            for (i, (&id, &tok)) in ids.iter().zip(tokens).enumerate() {
                let stepped = match (u64::try_from(id), u32::try_from(tok)) {
                    (Ok(id), Ok(tok)) => inner.step(id, &[tok]).map_err(|e| e.to_string()),
                    _ => Err(format!("id {id} / token {tok} out of range")),
                };
                match stepped {
                    Ok(out) => texts.push(out.text),
                    Err(e) => {
                        texts.push(String::new());
                        errors.push((i, e));
                    }
                }
            }
            (texts, errors)
        }))
    }

    /// Flushes what was held back and forgets the request.
    fn finish(&mut self, rid: u64) -> PyResult<String> {
        self.inner.finish(rid).map_err(detok_error)
    }

    /// Forgets a request without flushing (abort); false if it was unknown.
    fn remove(&mut self, rid: u64) -> bool {
        self.inner.remove(rid)
    }

    fn num_requests(&self) -> usize {
        self.inner.num_requests()
    }

    /// Whether a request with this id is live.
    fn contains(&self, rid: u64) -> bool {
        self.inner.contains(rid)
    }

    fn __contains__(&self, rid: u64) -> bool {
        self.inner.contains(rid)
    }

    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(detok_error)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Detokenizer>()
}
