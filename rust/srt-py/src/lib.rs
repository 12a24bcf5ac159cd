//! `srt._native`: PyO3 bindings of srt-core. Glue only: one Python class per core type.

use pyo3::prelude::*;

mod alloc;
mod decoder;
mod detok;
mod elementwise;
mod errors;
mod kernels;
mod quant;
mod radix;
mod router;
mod sched;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    radix::register(m)?;
    alloc::register(m)?;
    sched::register(m)?;
    detok::register(m)?;
    router::register(m)?;
    kernels::register(m)?;
    quant::register(m)?;
    elementwise::register(m)?;
    decoder::register(m)?;
    Ok(())
}
