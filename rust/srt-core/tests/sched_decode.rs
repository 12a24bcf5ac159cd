//! Decode: retraction when KV runs out (who goes, that they come back and finish), and the
//! new_token_ratio schedule.

mod common;

use common::{config, seq, Driver, Phase};
use srt_core::sched::{SchedConfig, Section, StepKind};
use std::collections::HashMap;

fn tight(pool: usize) -> SchedConfig {
    let mut cfg = config(pool);
    // Reserve little growth, so everything is admitted and decode runs out of KV.
    cfg.init_new_token_ratio = 0.1;
    cfg.min_new_token_ratio = 0.1;
    cfg
}

#[test]
fn retraction_frees_kv_and_retracted_requests_come_back() {
    let mut d = Driver::new(tight(48));
    // Same output counts at first: the longest prompt (request 1) goes first.
    for (id, len) in [(0, 6), (1, 10), (2, 8), (3, 7)] {
        d.add(id, seq(1000 * (id as u32 + 1), len), 20, "");
    }
    let step = d.step();
    assert!(step.kind == StepKind::Prefill && step.num_seqs() == 4);
    let mut first = None;
    let mut ratio_checked = false;
    for _ in 0..500 {
        if d.all_finished() {
            break;
        }
        let outs: HashMap<u64, usize> = d.reqs.iter().map(|(&id, r)| (id, r.outputs())).collect();
        let available_before = d.stats().available + d.stats().evictable;
        let step = d.step();
        let (ids, retracted) = (step.ids(), step.retracted());
        if step.kind == StepKind::Decode && !retracted.is_empty() {
            first.get_or_insert(retracted[0]);
            assert!(
                !ids.is_empty(),
                "the last request that fits is never retracted"
            );
            assert!(ids.len() <= 3);
            // Retracted KV went to the cache: more became free or evictable.
            let after = d.stats().available + d.stats().evictable;
            assert!(after + ids.len() > available_before);
            if !ratio_checked {
                let decoded: usize = ids.iter().map(|id| outs[id]).sum();
                let max_new: usize = ids.iter().map(|id| d.reqs[id].max_new).sum();
                let expected = ((decoded + 10 * ids.len()) as f64 / max_new as f64).min(1.0);
                let got = d.stats().new_token_ratio;
                assert!((got - expected).abs() < 1e-9, "ratio {got} != {expected}");
                ratio_checked = true;
            }
        }
    }
    assert!(d.all_finished(), "requests hang");
    assert_eq!(
        first,
        Some(1),
        "fewest outputs, then longest prompt, goes first"
    );
    assert!(d.counters.retractions > 0);
    for (id, r) in &d.reqs {
        assert_eq!(r.outputs(), 20, "request {id}");
    }
    assert!(d.reqs.values().any(|r| r.retractions > 0));
    d.check_drained();
}

#[test]
fn a_retracted_request_reuses_its_own_cached_kv() {
    // Big enough that the retracted KV stays cached until the request comes back.
    let mut d = Driver::new(tight(64));
    d.add(1, seq(1000, 20), 30, "");
    d.add(2, seq(2000, 4), 30, "");
    let mut readmitted = None;
    for _ in 0..500 {
        if d.all_finished() {
            break;
        }
        let was_waiting_after_retraction = d.reqs.values().any(|r| r.retractions > 0);
        let step = d.step();
        if step.kind == StepKind::Prefill && was_waiting_after_retraction && readmitted.is_none() {
            let e = step.entries()[0];
            // The row is written from its first column again (the driver checks each read).
            let cols = step.section(Section::TableCols);
            readmitted = Some((e.id, e.prefix_len, cols.first().copied()));
        }
    }
    assert!(d.all_finished());
    let (id, prefix_len, first_col) = readmitted.expect("a request was retracted");
    assert_eq!(id, 1, "the longer prompt is retracted");
    assert_eq!(
        first_col,
        Some(0),
        "the whole row is written on readmission"
    );
    // At least the prompt that its prefill cached (its last token is always computed).
    assert!(
        prefix_len >= 19,
        "its prompt KV came from the cache ({prefix_len})"
    );
    d.check_drained();
}

#[test]
fn a_lone_request_that_cannot_grow_is_retracted_and_waits() {
    // The Python side rejects such requests; the core must still neither panic nor spin.
    let mut d = Driver::new(tight(16));
    d.add(1, seq(1000, 8), 20, "");
    let mut steps = 0;
    let step = loop {
        steps += 1;
        assert!(steps < 50);
        let step = d.step();
        if !step.retracted().is_empty() {
            break step;
        }
    };
    assert_eq!(step.retracted(), vec![1]);
    assert_eq!(step.kind, StepKind::Idle, "nothing is left to decode");
    assert_eq!(d.reqs[&1].phase, Phase::Waiting);
    assert_eq!(
        d.step().kind,
        StepKind::Idle,
        "17 tokens never fit in 16 slots"
    );
    d.abort(1);
    d.check_drained();
}

#[test]
fn new_token_ratio_decays_per_decode_step_and_resets_when_idle() {
    let mut cfg = config(1024);
    cfg.init_new_token_ratio = 0.7;
    cfg.min_new_token_ratio = 0.2;
    cfg.new_token_ratio_decay = 0.1;
    let mut d = Driver::new(cfg);
    d.add(1, seq(1000, 4), 10, "");
    d.step();
    let mut seen = vec![d.stats().new_token_ratio];
    while d.step().kind == StepKind::Decode {
        seen.push(d.stats().new_token_ratio);
    }
    let expected = [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2, 0.2, 0.2];
    assert_eq!(seen.len(), expected.len(), "{seen:?}");
    for (got, want) in seen.iter().zip(expected) {
        assert!((got - want).abs() < 1e-9, "{seen:?}");
    }
    // The last step was Idle: nothing runs, so the ratio is back at its start.
    assert!((d.stats().new_token_ratio - 0.7).abs() < 1e-12);
    d.check_drained();
}
