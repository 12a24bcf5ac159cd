//! A team of threads that walks one sequence of operations together, for a whole model step
//! in one call.
//!
//! Every member runs the same code: each operation (`Member::split`) is cut into chunks, which
//! members claim one at a time from a shared counter, and a member leaves an operation once
//! every chunk of it is done (by whichever member). The next operation may read everything
//! the last one wrote.
//!
//! Why not a fork-join per operation: a decode step of a small model is a few hundred
//! operations of 10-50 us each, and waking a sleeping pool for each costs as much as the work.
//! Here the pool wakes once per step and members wait for each other by spinning briefly.
//!
//! Each member starts on its own contiguous share of an operation's chunks (so it streams
//! its rows of a weight matrix in order, as the prefetchers want), then claims what is left of
//! the others' shares. Why claimed chunks rather than fixed shares alone: on a shared machine
//! a member can lose its core for a scheduler slice. The others then take its chunks instead
//! of waiting for it, and it catches up (finding nothing left to claim) when it runs again.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::pool::pool;
use crate::KernelError;

/// How long a member spins for the others before sleeping `NAP`s between checks.
const SPIN: Duration = Duration::from_micros(50);
const NAP: Duration = Duration::from_micros(20);

/// A counter on its own cache line.
#[derive(Default)]
#[repr(align(128))]
struct Counter(AtomicUsize);

struct Shared {
    threads: usize,
    /// per operation: `threads` cursors (chunks claimed in each member's share), then the
    /// count of chunks done
    ops: Vec<Counter>,
    failed: AtomicBool,
    error: Mutex<Option<String>>,
}

/// A member's handle on the team's operations.
pub struct Member<'t> {
    shared: &'t Shared,
    index: usize,
    op: usize,
}

/// Runs `body` on `threads` threads at once, each with its [`Member`] (index 0..threads); the
/// body may run at most `max_ops` operations. A chunk that panics fails the whole run (the
/// other chunks still complete, so no member waits forever).
pub fn run<F>(threads: usize, max_ops: usize, body: F) -> Result<(), KernelError>
where
    F: Fn(&mut Member<'_>) + Sync,
{
    let threads = threads.max(1);
    let shared = Shared {
        threads,
        ops: (0..max_ops * (threads + 1))
            .map(|_| Counter::default())
            .collect(),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
    };
    let member = |index| {
        body(&mut Member {
            shared: &shared,
            index,
            op: 0,
        })
    };
    if threads <= 1 {
        member(0);
    } else {
        pool(threads).broadcast(|ctx| member(ctx.index()));
    }
    if shared.failed.load(Ordering::Acquire) {
        let msg = shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        return Err(KernelError(
            msg.unwrap_or_else(|| "a step chunk failed".into()),
        ));
    }
    Ok(())
}

impl Member<'_> {
    /// This member's index in the team (0 .. threads).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The next operation: chunks `0..n`, each run once by some member (`f(chunk)`); returns
    /// when all of them are done. Every member must call `split` in the same order.
    pub fn split(&mut self, n: usize, mut f: impl FnMut(usize)) {
        let t = self.shared.threads;
        let counters = &self.shared.ops[self.op * (t + 1)..(self.op + 1) * (t + 1)];
        self.op += 1;
        let (cursors, done) = (&counters[..t], &counters[t].0);
        // Share s: chunks s * n / t .. (s + 1) * n / t; this member's own first.
        for s in (0..t).map(|k| (self.index + k) % t) {
            let (start, end) = (s * n / t, (s + 1) * n / t);
            loop {
                let i = start + cursors[s].0.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                if let Err(e) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                    self.fail(e);
                }
                // Release: what the chunk wrote is visible to whoever sees the count.
                done.fetch_add(1, Ordering::AcqRel);
            }
        }
        let start = Instant::now();
        let mut spins = 0u32;
        while done.load(Ordering::Acquire) < n {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                // NOTE: a sleep, not a yield: an idle core lets the kernel move a member that
                // waits for its core (beside another busy process) onto this one.
                std::thread::sleep(NAP);
            }
        }
    }

    /// Whether a chunk of this run has failed (later operations may skip their work).
    pub fn failed(&self) -> bool {
        self.shared.failed.load(Ordering::Relaxed)
    }

    fn fail(&self, panic: Box<dyn std::any::Any + Send>) {
        let msg = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a step chunk panicked".into());
        let mut slot = self.shared.error.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(msg);
        self.shared.failed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once_and_operations_follow_each_other() {
        for threads in [1, 2, 3] {
            let n = 37;
            let cells: Vec<AtomicUsize> = (0..2 * n).map(|_| AtomicUsize::new(0)).collect();
            run(threads, 2, |m| {
                m.split(n, |i| {
                    cells[i].fetch_add(1, Ordering::Relaxed);
                });
                // The second operation sees every write of the first.
                m.split(n, |i| {
                    let seen: usize = cells[..n].iter().map(|c| c.load(Ordering::Relaxed)).sum();
                    cells[n + i].store(seen, Ordering::Relaxed);
                });
            })
            .unwrap();
            assert!(cells[..n].iter().all(|c| c.load(Ordering::Relaxed) == 1));
            assert!(cells[n..].iter().all(|c| c.load(Ordering::Relaxed) == n));
        }
    }

    #[test]
    fn a_panicking_chunk_is_an_error_not_a_hang() {
        let err = run(2, 2, |m| {
            m.split(8, |i| assert!(i != 5, "chunk five"));
            m.split(4, |_| {});
        })
        .unwrap_err();
        assert!(err.0.contains("chunk five"), "{err}");
    }
}
