//! The one rayon pool the kernels share, sized to the caller's thread count.

use std::sync::{Arc, Mutex, OnceLock};

/// The process's rayon pool for `threads` threads (rebuilt when the count changes).
pub fn pool(threads: usize) -> Arc<rayon::ThreadPool> {
    static POOL: OnceLock<Mutex<Option<Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut guard = POOL
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(pool) = guard
        .as_ref()
        .filter(|p| p.current_num_threads() == threads)
    {
        return pool.clone();
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("srt-kernel-{i}"))
            .build()
            .expect("building a thread pool"),
    );
    *guard = Some(pool.clone());
    pool
}
