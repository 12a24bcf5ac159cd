//! srt-core: the bookkeeping of the srt serving runtime, in pure Rust (no Python).
//!
//! - [`radix`]: prefix tree over token ids whose values are KV slot indices.
//! - [`alloc`]: KV slot allocator (page-granular when `page_size > 1`).
//! - [`sched`]: waiting queue, schedule policies, prefill/decode batch assembly, retraction.
//! - [`router`]: approximate prefix index over data-parallel replicas (built on `radix`).
//! - [`detok`]: incremental detokenizer with stop strings, built on the `tokenizers` crate.
//!
//! Every type owns its state, so a binding layer (see `srt-py`) can hold it.

pub mod alloc;
pub mod detok;
pub mod radix;
pub mod rng;
pub mod router;
pub mod sched;
