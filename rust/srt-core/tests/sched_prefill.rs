//! The prefill adder: token budget, running cap, chunked prefill, in-batch dedupe, prefix
//! reuse, the disabled cache, pages, and the API's errors and finish-in-any-state.

mod common;

use common::{config, seq, Driver};
use srt_core::sched::{
    BatchScheduler, NewRequest, PrefillView, SchedConfig, SchedError, Section, Step, StepKind,
};

fn prefill(step: Step) -> Vec<PrefillView> {
    assert_eq!(step.kind, StepKind::Prefill, "expected a prefill");
    step.entries()
}

/// (id, prefix_len, extend_len, is_last_chunk) of each entry.
fn shape(entries: &[PrefillView]) -> Vec<(u64, usize, usize, bool)> {
    entries
        .iter()
        .map(|e| (e.id, e.prefix_len, e.extend_len, e.is_last_chunk))
        .collect()
}

#[test]
fn token_budget_is_never_exceeded() {
    let mut cfg = config(4096);
    cfg.max_prefill_tokens = 100;
    cfg.chunked_prefill_size = None;
    let mut d = Driver::new(cfg);
    for id in 0..5 {
        d.add(id, seq(1000 * (id as u32 + 1), 40), 3, "");
    }
    // 40 + 40 fit, a third would make 120.
    assert_eq!(
        shape(&prefill(d.step())),
        vec![(0, 0, 40, true), (1, 0, 40, true)]
    );
    d.run(100);
    d.check_drained();
}

#[test]
fn a_prompt_over_the_budget_runs_alone_without_chunking() {
    let mut cfg = config(4096);
    cfg.max_prefill_tokens = 100;
    cfg.chunked_prefill_size = None;
    let mut d = Driver::new(cfg);
    d.add(1, seq(1000, 10), 3, "");
    d.add(2, seq(2000, 150), 3, "");
    d.add(3, seq(3000, 10), 3, "");
    assert_eq!(shape(&prefill(d.step())), vec![(1, 0, 10, true)]);
    assert_eq!(shape(&prefill(d.step())), vec![(2, 0, 150, true)]);
    assert_eq!(shape(&prefill(d.step())), vec![(3, 0, 10, true)]);
    d.run(100);
    d.check_drained();
}

#[test]
fn running_cap_counts_running_and_admitted() {
    let mut cfg = config(4096);
    cfg.max_running_requests = 3;
    let mut d = Driver::new(cfg);
    for id in 0..5 {
        d.add(id, seq(1000 * (id as u32 + 1), 8), 2 + id as usize, "");
    }
    assert_eq!(prefill(d.step()).len(), 3);
    assert_eq!(d.step().kind, StepKind::Decode, "cap reached: decode");
    assert_eq!(
        d.stats().num_running,
        2,
        "request 0 finished after 2 tokens"
    );
    assert_eq!(shape(&prefill(d.step())), vec![(3, 0, 8, true)]);
    d.run(100);
    d.check_drained();
}

#[test]
fn a_long_prompt_is_chunked_across_steps_and_resumes_first() {
    let mut cfg = config(4096);
    cfg.chunked_prefill_size = Some(64);
    let mut d = Driver::new(cfg);
    d.add(1, seq(1000, 10), 3, "");
    d.add(2, seq(2000, 200), 3, "");
    d.add(3, seq(3000, 10), 3, "");
    assert_eq!(
        shape(&prefill(d.step())),
        vec![(1, 0, 10, true), (2, 0, 54, false)]
    );
    assert_eq!(d.stats().num_running, 2);
    // The mid-chunk request takes the whole budget; nothing decodes meanwhile.
    assert_eq!(shape(&prefill(d.step())), vec![(2, 54, 64, false)]);
    assert_eq!(shape(&prefill(d.step())), vec![(2, 118, 64, false)]);
    assert_eq!(
        shape(&prefill(d.step())),
        vec![(2, 182, 18, true), (3, 0, 10, true)]
    );
    let e = &prefill_of(&mut d, 2);
    assert!(e.is_none(), "request 2 is done with prefill");
    d.run(100);
    d.check_drained();
}

fn prefill_of(d: &mut Driver, id: u64) -> Option<PrefillView> {
    let step = d.step();
    if step.kind != StepKind::Prefill {
        return None;
    }
    step.entries().into_iter().find(|e| e.id == id)
}

#[test]
fn chunks_end_on_page_boundaries() {
    let mut cfg = config(4096);
    cfg.page_size = 4;
    cfg.chunked_prefill_size = Some(30);
    let mut d = Driver::new(cfg);
    d.add(1, seq(1000, 3), 2, "");
    d.add(2, seq(2000, 70), 2, "");
    // 30 - 3 = 27 left, 24 of it page aligned; then 28 (30 aligned down), then the rest.
    assert_eq!(
        shape(&prefill(d.step())),
        vec![(1, 0, 3, true), (2, 0, 24, false)]
    );
    assert_eq!(shape(&prefill(d.step())), vec![(2, 24, 28, false)]);
    assert_eq!(shape(&prefill(d.step())), vec![(2, 52, 18, true)]);
    d.run(100);
    d.check_drained();
}

#[test]
fn in_batch_dedupe_lets_one_request_seed_a_shared_prefix() {
    let shared = seq(1000, 64);
    let mut d = Driver::new(config(4096));
    d.add(1, [shared.clone(), seq(5000, 8)].concat(), 3, "");
    d.add(2, [shared.clone(), seq(6000, 8)].concat(), 3, "");
    d.add(3, seq(9000, 8), 3, "");
    // Request 2 waits (3, unrelated, runs); next step it hits the cache request 1 seeded.
    assert_eq!(
        shape(&prefill(d.step())),
        vec![(1, 0, 72, true), (3, 0, 8, true)]
    );
    let e = prefill(d.step());
    assert_eq!(shape(&e), vec![(2, 64, 8, true)]);
    assert_eq!(d.sched.cached_len(2), Some(64));
    d.run(100);
    d.check_drained();
}

#[test]
fn short_shared_prefixes_are_not_deduped() {
    let shared = seq(1000, 8);
    let mut d = Driver::new(config(4096));
    d.add(1, [shared.clone(), seq(5000, 8)].concat(), 3, "");
    d.add(2, [shared.clone(), seq(6000, 8)].concat(), 3, "");
    assert_eq!(
        shape(&prefill(d.step())),
        vec![(1, 0, 16, true), (2, 0, 16, true)]
    );
    // Both computed the shared 8 tokens; request 2's copy stays its own until it finishes.
    d.run(100);
    d.check_drained();
}

#[test]
fn a_cached_prefix_is_reused_and_reported() {
    let mut d = Driver::new(config(4096));
    let prompt = seq(1000, 30);
    d.add(1, prompt.clone(), 4, "");
    d.run(100);
    // The finished request's prompt and output are cached (30 + 3 computed tokens).
    assert_eq!(d.sched.tree().total_size(), 33);
    d.add(2, [prompt.clone(), seq(7000, 5)].concat(), 2, "");
    let e = prefill(d.step());
    assert_eq!(shape(&e), vec![(2, 30, 5, true)]);
    assert_eq!(d.sched.cached_len(2), Some(30));
    // An identical prompt still computes its last token (its logits give the next token).
    d.add(3, prompt.clone(), 2, "");
    let e = prefill(d.step());
    assert_eq!(shape(&e), vec![(3, 29, 1, true)]);
    // Namespaces never share.
    d.run(100);
    d.add(4, prompt.clone(), 2, "salt");
    assert_eq!(shape(&prefill(d.step())), vec![(4, 0, 30, true)]);
    d.run(100);
    d.check_drained();
}

#[test]
fn disabled_radix_cache_never_matches_or_caches() {
    let mut cfg = config(256);
    cfg.enable_radix_cache = false;
    let mut d = Driver::new(cfg);
    let prompt = seq(1000, 30);
    d.add(1, prompt.clone(), 4, "");
    d.run(100);
    assert_eq!(d.sched.tree().total_size(), 0);
    assert_eq!(d.stats().available, 256);
    d.add(2, prompt.clone(), 4, "");
    d.add(3, prompt, 4, "");
    let e = prefill(d.step());
    assert_eq!(shape(&e), vec![(2, 0, 30, true), (3, 0, 30, true)]);
    d.run(100);
    assert_eq!(d.stats().available, 256);
    d.check_drained();
}

#[test]
fn pages_are_filled_before_new_ones_are_taken() {
    let mut cfg = config(256);
    cfg.page_size = 4;
    let mut d = Driver::new(cfg);
    let prompt = seq(1000, 10);
    d.add(1, prompt.clone(), 5, "");
    let step = d.step();
    assert_eq!(step.kind, StepKind::Prefill);
    let pages: Vec<i64> = step
        .section(Section::OutLoc)
        .iter()
        .map(|s| s / 4)
        .collect();
    assert_eq!(pages[8], pages[9], "tokens 8 and 9 share their page");
    assert_ne!(pages[0], 0, "page 0 is the padding sink");
    // Decode fills slots 10 and 11 of the third page, then takes a fourth.
    let mut decode_pages = Vec::new();
    loop {
        let step = d.step();
        if step.kind != StepKind::Decode {
            break;
        }
        decode_pages.push(step.section(Section::OutLoc)[0] / 4);
    }
    assert_eq!(decode_pages[..2], [pages[9], pages[9]]);
    assert_ne!(decode_pages[2], pages[9]);
    d.run(100);
    // Pages: 10 prompt + 4 decoded tokens computed = 14, so 12 (3 pages) are cached.
    assert_eq!(d.sched.tree().total_size(), 12);
    // A request with the same prompt matches its first 9 tokens, page aligned: 8.
    d.add(2, prompt, 2, "");
    assert_eq!(shape(&prefill(d.step())), vec![(2, 8, 2, true)]);
    d.run(100);
    d.check_drained();
}

#[test]
fn finish_works_in_every_state() {
    let mut cfg = config(4096);
    cfg.chunked_prefill_size = Some(16);
    let mut d = Driver::new(cfg);
    d.add(1, seq(1000, 40), 5, "");
    d.add(2, seq(2000, 8), 5, "");
    d.step(); // 1 is mid-chunk, 2 waits
    assert_eq!(d.stats().num_running, 1);
    d.abort(2); // waiting
    d.abort(1); // mid-chunk
    assert!(!d.sched.contains(1) && !d.sched.contains(2));
    d.add(3, seq(3000, 8), 5, "");
    d.add(4, seq(4000, 8), 5, "");
    d.step();
    d.abort(3); // running
                // A request may end between its plan and its commit: its token is dropped.
    let step = d.sched.schedule().unwrap();
    assert_eq!(step.kind, StepKind::Decode);
    assert_eq!(step.ids(), vec![4]);
    d.sched.finish(4).unwrap();
    d.check();
    let res = d.sched.commit(&[7]).unwrap();
    assert!(res.ids.is_empty() && res.finished.is_empty());
    d.reqs.clear();
    d.check_drained();
}

fn sched() -> BatchScheduler {
    BatchScheduler::new(config(64)).unwrap()
}

fn req(id: u64, tokens: Vec<u32>) -> NewRequest {
    NewRequest::new(id, tokens, 4)
}

#[test]
fn errors_are_returned_not_panicked() {
    let mut s = sched();
    assert_eq!(
        s.add_request(req(1, vec![])),
        Err(SchedError::EmptyRequest(1))
    );
    s.add_request(req(1, vec![1, 2, 3])).unwrap();
    assert_eq!(
        s.add_request(req(1, vec![4])),
        Err(SchedError::DuplicateRequest(1))
    );
    let mut with_stops = req(2, vec![1]);
    with_stops.stop_strings = Some(srt_core::sched::StopStrings {
        prompt_tail: vec![1],
        params: Default::default(),
    });
    assert_eq!(s.add_request(with_stops), Err(SchedError::NoStopChecker(2)));
    assert!(!s.contains(2));
    assert_eq!(s.finish(9), Err(SchedError::UnknownRequest(9)));
    assert_eq!(s.commit(&[5]), Err(SchedError::NothingInFlight));
    assert_eq!(s.abandon(), Err(SchedError::NothingInFlight));
    assert_eq!(s.flush_cache(), Ok(()), "a waiting request holds nothing");
    assert_eq!(s.schedule().map(|st| st.kind), Ok(StepKind::Prefill));
    assert_eq!(s.flush_cache(), Err(SchedError::Busy(1)));
    assert_eq!(
        s.commit(&[]),
        Err(SchedError::LengthMismatch {
            expected: 1,
            tokens: 0
        })
    );
    // One step may stay uncommitted while the next is planned, not two.
    assert_eq!(s.schedule().map(|st| st.kind), Ok(StepKind::Decode));
    assert_eq!(s.schedule(), Err(SchedError::TooManyInFlight(2)));
    s.check_invariants().unwrap();
    s.commit(&[5]).unwrap();
    s.commit(&[6]).unwrap();
    assert_eq!(s.tokens(1), Some(&[1, 2, 3, 5, 6][..]));
    s.check_invariants().unwrap();
    s.finish(1).unwrap();
    s.flush_cache().unwrap();
    assert_eq!(s.stats().available, 64);
    assert_eq!(s.schedule().map(|st| st.kind), Ok(StepKind::Idle));
}

#[test]
fn bad_configs_are_rejected() {
    let bad: [fn(&mut SchedConfig); 8] = [
        |c| c.page_size = 0,
        |c| c.page_size = 3, // 64 is not a multiple
        |c| c.pool_size = 0,
        |c| c.max_running_requests = 0,
        |c| c.chunked_prefill_size = Some(0),
        |c| c.min_new_token_ratio = 0.9, // above init
        |c| c.new_token_ratio_decay = f64::NAN,
        |c| c.context_len = 1,
    ];
    for (i, f) in bad.iter().enumerate() {
        let mut cfg = config(64);
        f(&mut cfg);
        assert!(
            matches!(BatchScheduler::new(cfg), Err(SchedError::BadConfig(_))),
            "case {i}"
        );
    }
}
