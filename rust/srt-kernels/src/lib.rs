//! srt-kernels: the CPU compute kernels of the srt serving runtime, in pure Rust (no Python).
//!
//! - [`attention`]: decode attention that reads K and V straight from the paged KV pool
//!   through the request-to-token table (no gathered copy of the keys), GQA, f32 or bf16.
//! - [`extend`]: extend (prefill) attention over the paged pool for a whole batch in one call.
//! - [`rope`]: rotary position embedding in place, bit for bit torch's `rotate_half` form.
//! - [`sampling`]: the draw of sampled tokens (top-k / top-p / min-p, inverse CDF from a
//!   seeded uniform), bit for bit the computation of srt's torch sampler on the CPU.
//! - [`quant`]: matrix products with GGUF-quantized weights (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K)
//!   read in their block formats.
//! - [`elementwise`]: RMSNorm (with its residual add) and gated SiLU, one call per layer op.
//! - [`decoder`]: a whole decode step of a Llama-family model in one call, on a [`team`] of
//!   threads that walks its operations together (the CPU's stand-in for a CUDA graph).
//! - [`elem`]: the element types the kernels read and write (f32, bf16 bits).
//!
//! The torch ops they replace are correct but pay, per call, a gather of every key and value
//! of the batch and a per-(sequence, head) kernel launch; on the CPU, where srt's default
//! model runs, that is most of a decode step's attention time.

pub mod attention;
pub mod decoder;
pub mod elem;
pub mod elementwise;
pub mod extend;
pub mod math;
pub mod pool;
pub mod quant;
mod quant_amx;
pub mod quant_packed;
mod quant_wide;
pub mod rope;
pub mod sampling;
pub mod team;

/// A kernel's inputs do not describe a valid call (shapes, indices out of range).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct KernelError(pub String);
