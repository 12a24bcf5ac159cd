//! The request record's own decisions and the step arrays it feeds: finishes decided at
//! commit (stop ids after min_new_tokens, stop strings, lengths, score-only), the
//! min_new_tokens masks, the sampling state of admitted rows (parameters, logit bias, token
//! history for penalties after a retraction), overlap's dropped token, abandon, expiry and the
//! admission pause.

mod common;

use common::{config, seq, Driver};
use srt_core::detok::{DecodeParams, Detokenizer};
use srt_core::sched::{
    flags, BatchScheduler, FinishKind, FloatSection, NewRequest, SamplingParams, Section, StepKind,
    StopStrings,
};

fn sched() -> BatchScheduler {
    BatchScheduler::new(config(256)).unwrap()
}

#[test]
fn a_stop_id_ends_the_request_only_after_min_new_tokens_and_is_masked_before() {
    let mut s = sched();
    let mut r = NewRequest::new(1, seq(10, 4), 10);
    r.stop_ids = vec![7, 8];
    r.min_new_tokens = 2;
    s.add_request(r).unwrap();
    let step = s.schedule().unwrap();
    // Output index 0 < 2: both stop ids are masked for the one sample.
    assert_eq!(step.section(Section::SampleSteps), &[0]);
    assert_eq!(step.section(Section::MaskSample), &[0, 0]);
    assert_eq!(step.section(Section::MaskTokens), &[7, 8]);
    assert_ne!(step.flags & flags::MIN_TOKENS, 0);
    // A stop id sampled anyway (e.g. a grammar forced it) does not end it yet.
    let res = s.commit(&[7]).unwrap();
    assert!(res.finished.is_empty());
    assert_eq!(res.first, vec![(1, 0)]);
    let step = s.schedule().unwrap();
    assert_eq!(step.section(Section::SampleSteps), &[1]);
    assert_eq!(step.section(Section::MaskTokens), &[7, 8]);
    s.commit(&[3]).unwrap();
    let step = s.schedule().unwrap();
    assert!(
        step.section(Section::MaskTokens).is_empty(),
        "two tokens are out"
    );
    let res = s.commit(&[8]).unwrap();
    assert_eq!(res.ids, vec![1]);
    assert_eq!(res.tokens, vec![8]);
    assert_eq!(res.finished.len(), 1);
    assert_eq!(res.finished[0].kind, FinishKind::StopToken(8));
    assert_eq!(res.finished[0].output_len, 3);
    assert!(!s.contains(1));
    s.check_invariants().unwrap();
}

#[test]
fn lengths_and_the_context_end_requests_and_score_only_drops_its_token() {
    let mut cfg = config(256);
    cfg.context_len = 7;
    let mut s = BatchScheduler::new(cfg).unwrap();
    s.add_request(NewRequest::new(1, seq(10, 4), 2)).unwrap();
    s.add_request(NewRequest::new(2, seq(20, 4), 100)).unwrap();
    s.add_request(NewRequest::new(3, seq(30, 4), 0)).unwrap();
    s.schedule().unwrap();
    let res = s.commit(&[1, 2, 3]).unwrap();
    assert_eq!(res.ids, vec![1, 2], "the score-only request keeps no token");
    assert_eq!(res.finished.len(), 1);
    assert_eq!(res.finished[0].id, 3);
    assert_eq!(res.finished[0].kind, FinishKind::Length(0));
    assert_eq!(res.finished[0].output_len, 0);
    s.schedule().unwrap();
    let res = s.commit(&[4, 5]).unwrap();
    assert_eq!(res.finished[0].kind, FinishKind::Length(2));
    s.schedule().unwrap();
    let res = s.commit(&[6]).unwrap();
    // 4 prompt + 3 output = the context length 7.
    assert_eq!(res.finished[0].kind, FinishKind::Length(3));
    assert_eq!(s.stats().num_requests, 0);
    // Requests that produced output count toward the hit counters, the score-only one not.
    assert_eq!(s.stats().hit_prompt_tokens, 8);
    s.check_invariants().unwrap();
}

/// A byte-level tokenizer without merges whose token ids are the byte values, so text is
/// "sampled" byte by byte.
fn checker() -> Detokenizer {
    let vocab: Vec<String> = (0..=255u8)
        .map(|b| format!("\"{}\": {b}", json_char(byte_char(b))))
        .collect();
    let json = format!(
        r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
        "normalizer":null,"pre_tokenizer":null,"post_processor":null,
        "decoder":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}},
        "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
        "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
        "vocab":{{{}}},"merges":[]}}}}"#,
        vocab.join(",")
    );
    Detokenizer::from_json(&json).unwrap()
}

/// GPT-2's printable stand-in for a byte.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

fn json_char(c: char) -> String {
    match c {
        '"' => "\\\"".into(),
        '\\' => "\\\\".into(),
        c => c.to_string(),
    }
}

#[test]
fn a_stop_string_is_decided_at_commit() {
    let mut s = sched();
    s.set_stop_checker(checker());
    let mut r = NewRequest::new(1, vec![b'x' as u32], 50);
    r.stop_strings = Some(StopStrings {
        prompt_tail: vec![b'x' as u32],
        params: DecodeParams {
            stop: vec!["lo w".into(), "zz".into()],
            ..Default::default()
        },
    });
    s.add_request(r).unwrap();
    let mut finished = None;
    for &c in b"hello world" {
        s.schedule().unwrap();
        let res = s.commit(&[u32::from(c)]).unwrap();
        if let Some(f) = res.finished.first() {
            finished = Some((f.kind.clone(), f.output_len));
            break;
        }
    }
    assert_eq!(
        finished,
        Some((FinishKind::StopString("lo w".into()), 7)),
        "\"hello w\" holds the stop string"
    );
    s.check_invariants().unwrap();
}

#[test]
fn admission_carries_the_sampling_state_and_readmission_the_history() {
    let mut cfg = config(24);
    cfg.init_new_token_ratio = 0.1;
    cfg.min_new_token_ratio = 0.1;
    let mut d = Driver::new(cfg);
    let mut r = NewRequest::new(1, seq(100, 8), 12);
    r.sampling = SamplingParams {
        temperature: 0.5,
        top_p: 0.9,
        top_k: 40,
        min_p: 0.05,
        repetition_penalty: 1.2,
        frequency_penalty: 0.5,
        presence_penalty: -0.25,
        seed: u64::MAX,
        logit_bias: vec![(3, 2.5), (9, -1.0)],
    };
    d.add_request(r);
    d.add(2, seq(200, 8), 12, "");
    let step = d.step();
    assert_eq!(step.kind, StepKind::Prefill);
    assert_eq!(step.section(Section::AdmitRows), &[0, 1]);
    assert_eq!(step.section(Section::AdmitTopK), &[40, -1]);
    assert_eq!(
        step.section(Section::AdmitSeed),
        &[-1, 0],
        "u64::MAX as int64"
    );
    assert_eq!(
        step.float_section(FloatSection::AdmitFloats),
        &[0.5, 0.9, 0.05, 1.2, 0.5, -0.25, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    );
    assert_eq!(step.section(Section::BiasRows), &[0, 0]);
    assert_eq!(step.section(Section::BiasTokens), &[3, 9]);
    assert_eq!(step.float_section(FloatSection::BiasValues), &[2.5, -1.0]);
    // Repetition penalty: the prompt; output penalties: no output yet.
    assert_eq!(
        step.section(Section::SeenTokens),
        seq(100, 8)
            .iter()
            .map(|&t| i64::from(t))
            .collect::<Vec<_>>()
    );
    assert!(step.section(Section::CountTokens).is_empty());
    let wanted = flags::SAMPLED
        | flags::TOP_K_P
        | flags::MIN_P
        | flags::REPETITION_PENALTY
        | flags::OUTPUT_PENALTY
        | flags::PRESENCE_PENALTY
        | flags::LOGIT_BIAS;
    assert_eq!(step.flags, wanted | flags::GREEDY);
    assert_eq!(step.top_k_max, 40);
    let seq_flags = step.section(Section::SeqFlags);
    assert_eq!(seq_flags, &[i64::from(wanted), i64::from(flags::GREEDY)]);
    // Decode until the pool runs out, a request is retracted and comes back with outputs.
    let mut readmitted = None;
    for _ in 0..100 {
        if d.all_finished() {
            break;
        }
        let step = d.step();
        if step.kind == StepKind::Prefill && readmitted.is_none() {
            readmitted = Some(step);
        }
    }
    let step = readmitted.expect("a request was retracted and came back");
    let id = step.ids()[0];
    let outputs: Vec<i64> = d.reqs[&id].tokens[8..]
        .iter()
        .take(step.section(Section::SampleSteps)[0] as usize)
        .map(|&t| i64::from(t))
        .collect();
    assert!(!outputs.is_empty());
    if id == 1 {
        assert_eq!(step.section(Section::CountTokens), outputs.as_slice());
        let seen = step.section(Section::SeenTokens);
        assert_eq!(seen.len(), 8 + outputs.len(), "prompt and outputs");
    } else {
        assert!(step.section(Section::CountTokens).is_empty());
    }
    d.run(200);
    d.check_drained();
}

#[test]
fn overlap_drops_the_token_after_a_stop_and_frees_its_slot() {
    let mut d = Driver::overlapped(config(256));
    let mut r = NewRequest::new(1, seq(10, 4), 100);
    // The driver samples hash(sequence) % 50: stop on whatever its third token is.
    let mut probe = Driver::new(config(256));
    probe.add(1, seq(10, 4), 3, "");
    probe.run(20);
    let outs = probe.reqs[&1].output_tokens().to_vec();
    let first = outs.iter().position(|&t| t == outs[2]).unwrap_or(2);
    r.stop_ids = vec![outs[2]];
    d.add_request(r);
    d.run(50);
    assert_eq!(d.reqs[&1].finish, Some(FinishKind::StopToken(outs[2])));
    assert_eq!(d.reqs[&1].outputs(), first + 1);
    assert_eq!(
        d.counters.dropped, 1,
        "the token sampled past the stop is dropped"
    );
    d.check_drained();
}

#[test]
fn abandon_ends_the_failed_steps_requests() {
    let mut s = sched();
    s.add_request(NewRequest::new(1, seq(10, 4), 5)).unwrap();
    s.add_request(NewRequest::new(2, seq(20, 4), 5)).unwrap();
    s.schedule().unwrap();
    s.commit(&[1, 1]).unwrap();
    // Step N is in flight, N + 1 planned on top of it; N fails.
    s.schedule().unwrap();
    s.finish(2).unwrap();
    s.schedule().unwrap();
    let ended = s.abandon().unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!((ended[0].id, ended[0].kind.clone()), (1, FinishKind::Abort));
    // N + 1 commits with nothing left to take its tokens.
    let res = s.commit(&[5]).unwrap();
    assert!(res.ids.is_empty());
    s.check_invariants().unwrap();
    assert_eq!(s.stats().num_requests, 0);
    assert_eq!(s.stats().rows_free, 256);
}

#[test]
fn expired_requests_are_listed_in_any_state() {
    let mut s = sched();
    for (id, at) in [(1, 0.0), (2, 5.0), (3, 9.0)] {
        let mut r = NewRequest::new(id, seq(10 * id as u32, 4), 5);
        r.arrival = at;
        s.add_request(r).unwrap();
    }
    s.schedule().unwrap();
    assert_eq!(s.expired(10.0, 4.0), vec![1, 2]);
    assert_eq!(s.expired(10.0, 20.0), Vec::<u64>::new());
}

#[test]
fn a_paused_admission_lets_running_requests_finish_then_the_cache_flushes() {
    let mut s = sched();
    s.add_request(NewRequest::new(1, seq(10, 4), 2)).unwrap();
    s.schedule().unwrap();
    s.commit(&[1]).unwrap();
    s.add_request(NewRequest::new(2, seq(20, 4), 2)).unwrap();
    s.set_admission_paused(true);
    let step = s.schedule().unwrap();
    assert_eq!(
        step.kind,
        StepKind::Decode,
        "only the running request steps"
    );
    s.commit(&[1]).unwrap();
    assert_eq!(s.schedule().unwrap().kind, StepKind::Idle);
    // Request 2 waits without KV: the cache can be flushed under it.
    s.flush_cache().unwrap();
    assert_eq!(s.stats().available, 256);
    s.set_admission_paused(false);
    assert_eq!(s.schedule().unwrap().kind, StepKind::Prefill);
    s.check_invariants().unwrap();
}

#[test]
fn a_requeued_request_drops_its_samples_in_flight_and_starts_over() {
    let mut s = sched();
    s.add_request(NewRequest::new(1, seq(10, 8), 5)).unwrap();
    s.add_request(NewRequest::new(2, seq(20, 4), 5)).unwrap();
    s.schedule().unwrap();
    s.commit(&[1, 2]).unwrap();
    // A decode is planned, then request 1's KV turns out to be untrustworthy.
    s.schedule().unwrap();
    s.requeue(1).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.stats().num_waiting, 1);
    let res = s.commit(&[7, 8]).unwrap();
    assert_eq!(
        res.ids,
        vec![2],
        "request 1's token of the dropped step is not kept"
    );
    assert_eq!(s.tokens(1).map(<[u32]>::len), Some(9));
    let step = s.schedule().unwrap();
    assert_eq!(step.kind, StepKind::Prefill);
    assert_eq!(step.ids(), vec![1]);
    // It comes back with the output it had committed and samples its next token.
    assert_eq!(step.section(Section::SampleSteps), &[1]);
    s.commit(&[9]).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.tokens(1).map(<[u32]>::len), Some(10));
}
