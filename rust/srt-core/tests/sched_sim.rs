//! Seeded randomized simulation: random requests (prompts drawn from a few shared prefixes,
//! random max_new_tokens, some namespaces), random pool sizes (some tiny, to force eviction
//! and retraction), random policies, page sizes, budgets and aborts, with commits at once or
//! one step late (overlap). The driver in `common` checks every step (budgets, running cap,
//! rows, table writes, slot ownership, the KV each request reads) and the scheduler's
//! invariants after every step; at the end every request must have finished with exactly
//! max_new_tokens outputs and the pool must be whole again.

mod common;

use common::{mix, Driver, Phase};
use srt_core::sched::{Policy, SchedConfig, StepKind};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64) < p * (1u64 << 53) as f64
    }
}

const POLICIES: [Policy; 5] = [
    Policy::Fcfs,
    Policy::Lpm,
    Policy::DfsWeight,
    Policy::Lof,
    Policy::Random,
];

fn random_config(rng: &mut Rng) -> SchedConfig {
    let page = [1, 1, 2, 4][rng.below(4)];
    // Tiny pools force eviction and retraction; large ones exercise batching.
    let pages = [24, 40, 80, 400][rng.below(4)] / page;
    let mut cfg = SchedConfig::new(pages * page);
    cfg.page_size = page;
    cfg.policy = POLICIES[rng.below(POLICIES.len())];
    cfg.seed = rng.next();
    cfg.max_prefill_tokens = rng.range(page.max(8), 96);
    cfg.chunked_prefill_size = if rng.chance(0.7) {
        Some(rng.range(page.max(4), 48))
    } else {
        None
    };
    cfg.max_running_requests = rng.range(1, 10);
    cfg.enable_radix_cache = rng.chance(0.8);
    cfg.lpm_fallback_queue_len = [2, 128][rng.below(2)];
    cfg.in_batch_prefix_threshold = [0, 4, 8, 32][rng.below(4)];
    cfg.init_new_token_ratio = [0.2, 0.7, 1.0][rng.below(3)];
    cfg.min_new_token_ratio = cfg.init_new_token_ratio * 0.2;
    cfg.new_token_ratio_decay = [0.001, 0.05][rng.below(2)];
    cfg.clip_max_new_tokens = [4, 4096][rng.below(2)];
    cfg
}

/// One simulation; returns the driver's counters and every request's output tokens.
fn simulate(seed: u64, overlap: bool, aborts: bool) -> (common::Counters, Vec<Vec<u32>>) {
    let mut rng = Rng(seed.wrapping_mul(0x1000_0001));
    let cfg = random_config(&mut rng);
    let pool = cfg.pool_size;
    let page = cfg.page_size;
    let mut d = if overlap {
        Driver::overlapped(cfg.clone())
    } else {
        Driver::new(cfg.clone())
    };
    let prefixes: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            (0..rng.range(0, 40))
                .map(|j| 1000 * (i + 1) + j as u32)
                .collect()
        })
        .collect();
    let total = rng.range(5, 30);
    let mut added = 0u64;
    for step_no in 0..20_000 {
        // Arrivals.
        if added < total as u64 && rng.chance(0.4) {
            for _ in 0..rng.range(1, 3) {
                if added == total as u64 {
                    break;
                }
                let mut tokens = prefixes[rng.below(prefixes.len())].clone();
                let suffix = rng.range(1, 30);
                tokens.extend((0..suffix).map(|_| rng.below(50) as u32));
                let max_new = rng.range(0, 20);
                // Every request must fit in the pool alone (the Python side rejects others).
                let limit = pool - max_new.min(pool);
                let aligned_limit = limit - limit % page;
                tokens.truncate(aligned_limit.max(1));
                let ns = if rng.chance(0.15) { "other" } else { "" };
                d.add(added, tokens, max_new, ns);
                added += 1;
            }
        }
        // Aborts, in any state (also with a sample in flight, in overlap mode). The draw is
        // made every step, so both modes abort at the same steps.
        let abort = rng.chance(0.02);
        let pick = rng.next() as usize;
        if abort && aborts {
            let live: Vec<u64> = d.live().map(|(&id, _)| id).collect();
            if !live.is_empty() {
                d.abort(live[pick % live.len()]);
            }
        }
        if added == total as u64 && d.all_finished() && d.sched.stats().in_flight == 0 {
            d.check_drained();
            let c = std::mem::take(&mut d.counters);
            for r in d.reqs.values() {
                if !r.aborted {
                    assert_eq!(r.outputs(), r.max_new, "seed {seed}: wrong output count");
                }
            }
            let outputs = d
                .reqs
                .values()
                .map(|r| r.output_tokens().to_vec())
                .collect();
            return (c, outputs);
        }
        // Idle with nothing in flight (no running request that a commit may end) and every
        // live request waiting: nothing can ever be admitted.
        let in_flight = d.sched.stats().in_flight;
        let step = d.step();
        if step.kind == StepKind::Idle
            && in_flight == 0
            && d.live().next().is_some()
            && d.live().all(|(_, r)| r.phase == Phase::Waiting)
        {
            for (id, r) in d.live() {
                eprintln!(
                    "live {id}: prompt {} committed {} known {} max_new {} phase {:?}",
                    r.prompt_len,
                    r.committed,
                    r.tokens.len(),
                    r.max_new,
                    r.phase
                );
            }
            eprintln!("{:?}", d.sched.stats());
            panic!("seed {seed}: idle at step {step_no} with waiting requests ({cfg:?})");
        }
    }
    panic!("seed {seed}: requests hang ({cfg:?})");
}

#[test]
fn randomized_simulation_keeps_every_contract() {
    let mut total = common::Counters::default();
    for seed in 0..120 {
        for overlap in [false, true] {
            let (c, _) = simulate(seed, overlap, true);
            total.prefills += c.prefills;
            total.decodes += c.decodes;
            total.chunks += c.chunks;
            total.retractions += c.retractions;
            total.cached_tokens += c.cached_tokens;
            total.dropped += c.dropped;
        }
    }
    // The seeds must actually reach the interesting paths.
    assert!(total.chunks > 100, "{total:?}");
    assert!(total.retractions > 40, "{total:?}");
    assert!(total.cached_tokens > 2000, "{total:?}");
    eprintln!("{total:?}");
}

#[test]
fn overlap_gives_the_same_outputs_and_drops_only_extra_tokens() {
    let mut dropped = 0;
    for seed in 0..60 {
        let (_, plain) = simulate(seed, false, false);
        let (c, overlapped) = simulate(seed, true, false);
        assert_eq!(
            plain, overlapped,
            "seed {seed}: overlap changed the outputs"
        );
        dropped += c.dropped;
    }
    // Requests end by length here, which is foreseen: nothing is sampled past the end.
    assert_eq!(dropped, 0);
}
