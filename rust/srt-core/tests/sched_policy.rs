//! Each schedule policy's ordering, observed as the order of a prefill plan's entries (the
//! adder admits in policy order; every request fits here).

mod common;

use common::{config, seq, Driver};
use srt_core::sched::{Policy, SchedConfig, StepKind};

fn big(policy: Policy) -> SchedConfig {
    let mut cfg = config(4096);
    cfg.policy = policy;
    // Dedupe would hold back requests that share a prefix; these tests look at order only.
    cfg.in_batch_prefix_threshold = 0;
    cfg
}

fn first_plan_order(d: &mut Driver) -> Vec<u64> {
    let step = d.step();
    assert_eq!(step.kind, StepKind::Prefill, "expected a prefill");
    step.ids()
}

/// Puts `prompts` into the prefix cache by running them to completion.
fn warm(d: &mut Driver, first_id: u64, prompts: &[Vec<u32>]) {
    for (i, p) in prompts.iter().enumerate() {
        d.add(first_id + i as u64, p.clone(), 1, "");
        d.run(100);
    }
}

fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
    [a, b].concat()
}

#[test]
fn fcfs_keeps_arrival_order() {
    let mut d = Driver::new(big(Policy::Fcfs));
    for id in [3, 1, 2] {
        d.add(id, seq(100 * id as u32, 8), 4, "");
    }
    assert_eq!(first_plan_order(&mut d), vec![3, 1, 2]);
    d.run(100);
    d.check_drained();
}

#[test]
fn lof_runs_longest_output_first() {
    let mut d = Driver::new(big(Policy::Lof));
    for (id, max_new) in [(1, 5), (2, 20), (3, 10), (4, 20)] {
        d.add(id, seq(100 * id as u32, 8), max_new, "");
    }
    // Ties keep arrival order.
    assert_eq!(first_plan_order(&mut d), vec![2, 4, 3, 1]);
    d.run(100);
    d.check_drained();
}

#[test]
fn random_is_a_seeded_permutation() {
    let order = |seed: u64| {
        let mut cfg = big(Policy::Random);
        cfg.seed = seed;
        let mut d = Driver::new(cfg);
        for id in 0..8 {
            d.add(id, seq(100 * id as u32, 4), 1, "");
        }
        first_plan_order(&mut d)
    };
    let a = order(7);
    assert_eq!(a, order(7), "same seed, same order");
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..8).collect::<Vec<u64>>());
    assert!((0..5).any(|s| order(s) != a), "the seed must matter");
    assert_ne!(a, (0..8).collect::<Vec<u64>>(), "not fcfs in disguise");
}

#[test]
fn lpm_prefers_the_longest_cached_prefix_and_falls_back_to_fcfs() {
    let p = seq(1000, 40);
    for (fallback, expected) in [(128, vec![13, 12, 11]), (2, vec![11, 12, 13])] {
        let mut cfg = big(Policy::Lpm);
        cfg.lpm_fallback_queue_len = fallback;
        let mut d = Driver::new(cfg);
        warm(&mut d, 1, &[cat(&p, &[7])]);
        d.add(11, seq(5000, 20), 2, ""); // nothing cached
        d.add(12, cat(&p[..10], &seq(6000, 10)), 2, ""); // 10 cached
        d.add(13, cat(&p, &seq(7000, 5)), 2, ""); // 40 cached
        assert_eq!(first_plan_order(&mut d), expected, "fallback {fallback}");
        d.run(100);
        d.check_drained();
    }
}

#[test]
fn dfs_weight_visits_heavier_subtrees_first_and_deeper_matches_first() {
    let x = seq(1000, 40);
    let y = seq(2000, 40);
    let y2 = cat(&y, &seq(3000, 20));
    let mut d = Driver::new(big(Policy::DfsWeight));
    // Cache x, y and y2 (y2 extends y, so y ends at a node with a child).
    warm(
        &mut d,
        1,
        &[cat(&x, &[900]), cat(&y, &[901]), cat(&y2, &[902])],
    );
    d.add(11, cat(&x, &[555, 1]), 2, ""); // under x
    d.add(12, cat(&y, &[555, 2]), 2, ""); // at y
    d.add(13, cat(&y2, &[555, 3]), 2, ""); // at y2, below y
    d.add(14, cat(&y, &[556, 4]), 2, ""); // at y
    d.add(15, seq(8000, 6), 2, ""); // nothing cached
                                    // The y subtree holds three requests: it goes first, its deepest match before its own;
                                    // then x (one request) and the unmatched one at the root, last.
    assert_eq!(first_plan_order(&mut d), vec![13, 12, 14, 11, 15]);
    d.run(100);
    d.check_drained();
}

#[test]
fn dfs_weight_falls_back_to_fcfs_on_a_long_queue() {
    let x = seq(1000, 40);
    let mut cfg = big(Policy::DfsWeight);
    cfg.lpm_fallback_queue_len = 1;
    let mut d = Driver::new(cfg);
    warm(&mut d, 1, &[cat(&x, &[900])]);
    d.add(11, seq(5000, 6), 2, "");
    d.add(12, cat(&x, &[555]), 2, "");
    assert_eq!(first_plan_order(&mut d), vec![11, 12]);
}

#[test]
fn policies_parse_from_their_names() {
    for (name, p) in [
        ("fcfs", Policy::Fcfs),
        ("lpm", Policy::Lpm),
        ("dfs-weight", Policy::DfsWeight),
        ("lof", Policy::Lof),
        ("random", Policy::Random),
    ] {
        assert_eq!(name.parse::<Policy>(), Ok(p));
    }
    assert!("LPM".parse::<Policy>().is_err());
}
