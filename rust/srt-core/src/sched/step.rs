//! `Step`: one planned step as contiguous arrays, the form in which it crosses to the model
//! runner. All integer arrays live in one `Vec<i64>` (so a device copy of the step is one
//! copy), one section after another in `Section` order; float arrays in one `Vec<f32>`.
//!
//! B = sequences in the batch, T = tokens computed (T == B for a decode step), S = sampling
//! sequences, W = request-to-token table writes, A = requests admitted to a row this step.

/// The integer sections of `Step::ints`, in storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// [B] request ids, in batch order.
    Ids,
    /// [B] request-to-token table rows.
    Rows,
    /// [B] KV length of each sequence after this step.
    SeqLens,
    /// [B] tokens already in KV before this step (prefill only; empty for decode).
    PrefixLens,
    /// [B] tokens computed this step (prefill only; empty for decode).
    ExtendLens,
    /// [B] each sequence's feature flags (`request::flags`).
    SeqFlags,
    /// [T] token ids. Decode: the last committed token, or -1 while it is still being sampled
    /// (the runner then reads it from the previous step's sample of the same row).
    InputIds,
    /// [T] positions.
    Positions,
    /// [T] KV slot written by each token.
    OutLoc,
    /// [W] table writes: `table[TableRows[i], TableCols[i]] = TableSlots[i]`, applied before
    /// the step runs.
    TableRows,
    TableCols,
    TableSlots,
    /// [S] batch positions (indices into B) whose next token is sampled.
    SamplePos,
    /// [S] their table rows.
    SampleRows,
    /// [S] output tokens before the one sampled (seeds each draw; min_new_tokens).
    SampleSteps,
    /// min_new_tokens masks: `logits[MaskSample[i], MaskTokens[i]] = -inf`, MaskSample
    /// indexing the S sampled rows.
    MaskSample,
    MaskTokens,
    /// [A] rows whose per-row sampling state is (re)written before the step runs, with the
    /// request's top_k and seed; its floats are `FloatSection::AdmitFloats`.
    AdmitRows,
    AdmitTopK,
    AdmitSeed,
    /// Logit bias of the admitted rows: `bias[BiasRows[i], BiasTokens[i]] =
    /// FloatSection::BiasValues[i]`.
    BiasRows,
    BiasTokens,
    /// Repetition penalty of the admitted rows: prompt and output tokens seen so far.
    SeenRows,
    SeenTokens,
    /// Frequency / presence penalties of the admitted rows: output tokens so far (repeated).
    CountRows,
    CountTokens,
    /// Requests moved back to the waiting queue by this step's planning.
    Retracted,
}

pub const NUM_SECTIONS: usize = Section::Retracted as usize + 1;

impl Section {
    pub const ALL: [Section; NUM_SECTIONS] = [
        Section::Ids,
        Section::Rows,
        Section::SeqLens,
        Section::PrefixLens,
        Section::ExtendLens,
        Section::SeqFlags,
        Section::InputIds,
        Section::Positions,
        Section::OutLoc,
        Section::TableRows,
        Section::TableCols,
        Section::TableSlots,
        Section::SamplePos,
        Section::SampleRows,
        Section::SampleSteps,
        Section::MaskSample,
        Section::MaskTokens,
        Section::AdmitRows,
        Section::AdmitTopK,
        Section::AdmitSeed,
        Section::BiasRows,
        Section::BiasTokens,
        Section::SeenRows,
        Section::SeenTokens,
        Section::CountRows,
        Section::CountTokens,
        Section::Retracted,
    ];

    /// snake_case name (the binding's section names).
    pub fn name(self) -> &'static str {
        match self {
            Section::Ids => "ids",
            Section::Rows => "rows",
            Section::SeqLens => "seq_lens",
            Section::PrefixLens => "prefix_lens",
            Section::ExtendLens => "extend_lens",
            Section::SeqFlags => "seq_flags",
            Section::InputIds => "input_ids",
            Section::Positions => "positions",
            Section::OutLoc => "out_loc",
            Section::TableRows => "table_rows",
            Section::TableCols => "table_cols",
            Section::TableSlots => "table_slots",
            Section::SamplePos => "sample_pos",
            Section::SampleRows => "sample_rows",
            Section::SampleSteps => "sample_steps",
            Section::MaskSample => "mask_sample",
            Section::MaskTokens => "mask_tokens",
            Section::AdmitRows => "admit_rows",
            Section::AdmitTopK => "admit_top_k",
            Section::AdmitSeed => "admit_seed",
            Section::BiasRows => "bias_rows",
            Section::BiasTokens => "bias_tokens",
            Section::SeenRows => "seen_rows",
            Section::SeenTokens => "seen_tokens",
            Section::CountRows => "count_rows",
            Section::CountTokens => "count_tokens",
            Section::Retracted => "retracted",
        }
    }
}

/// The float sections of `Step::floats`, in storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatSection {
    /// [A x ADMIT_FLOATS]: temperature, top_p, min_p, repetition, frequency and presence
    /// penalty of each admitted row.
    AdmitFloats,
    /// Values of the logit bias writes.
    BiasValues,
}

pub const NUM_FLOAT_SECTIONS: usize = 2;
/// Floats per admitted row in `FloatSection::AdmitFloats`.
pub const ADMIT_FLOATS: usize = 6;

impl FloatSection {
    pub const ALL: [FloatSection; NUM_FLOAT_SECTIONS] =
        [FloatSection::AdmitFloats, FloatSection::BiasValues];

    pub fn name(self) -> &'static str {
        match self {
            FloatSection::AdmitFloats => "admit_floats",
            FloatSection::BiasValues => "bias_values",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Nothing to run (samples in flight may still wait for their commit).
    Idle,
    Prefill,
    Decode,
}

/// One planned step. Every non-idle step must get exactly one `commit` (with one token per
/// sampling sequence, possibly none) or `abandon`, in planning order.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub kind: StepKind,
    pub ints: Vec<i64>,
    /// `ints[offsets[s] .. offsets[s + 1]]` is section `s`.
    pub offsets: [usize; NUM_SECTIONS + 1],
    pub floats: Vec<f32>,
    pub float_offsets: [usize; NUM_FLOAT_SECTIONS + 1],
    /// OR of the sampling sequences' flags.
    pub flags: u32,
    /// OR of every sequence's flags.
    pub all_flags: u32,
    /// The largest top-k of the sampling sequences that filter by top-k / top-p (`u64::MAX`
    /// when one filters by top-p alone; 0 when none filters): the sampler's filter only
    /// looks at that many candidates per row.
    pub top_k_max: u64,
}

impl Step {
    pub fn section(&self, s: Section) -> &[i64] {
        let i = s as usize;
        &self.ints[self.offsets[i]..self.offsets[i + 1]]
    }

    pub fn float_section(&self, s: FloatSection) -> &[f32] {
        let i = s as usize;
        &self.floats[self.float_offsets[i]..self.float_offsets[i + 1]]
    }

    pub fn num_seqs(&self) -> usize {
        self.section(Section::Ids).len()
    }

    pub fn num_tokens(&self) -> usize {
        self.section(Section::InputIds).len()
    }

    pub fn num_samples(&self) -> usize {
        self.section(Section::SamplePos).len()
    }

    /// Request ids in batch order.
    pub fn ids(&self) -> Vec<u64> {
        self.section(Section::Ids)
            .iter()
            .map(|&v| v as u64)
            .collect()
    }

    /// Request ids of the sampling sequences, in sample order (what `commit` expects).
    pub fn sample_ids(&self) -> Vec<u64> {
        let ids = self.section(Section::Ids);
        self.section(Section::SamplePos)
            .iter()
            .map(|&p| ids[p as usize] as u64)
            .collect()
    }

    pub fn retracted(&self) -> Vec<u64> {
        self.section(Section::Retracted)
            .iter()
            .map(|&v| v as u64)
            .collect()
    }

    /// Prefill steps: (id, prefix_len, extend_len, samples) of each sequence.
    pub fn entries(&self) -> Vec<PrefillView> {
        let ids = self.section(Section::Ids);
        let pre = self.section(Section::PrefixLens);
        let ext = self.section(Section::ExtendLens);
        let pos = self.section(Section::SamplePos);
        (0..pre.len())
            .map(|i| PrefillView {
                id: ids[i] as u64,
                prefix_len: pre[i] as usize,
                extend_len: ext[i] as usize,
                is_last_chunk: pos.contains(&(i as i64)),
            })
            .collect()
    }
}

/// One sequence of a prefill step (a convenience view of the arrays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillView {
    pub id: u64,
    pub prefix_len: usize,
    pub extend_len: usize,
    /// The whole sequence is in KV after this step and its next token is sampled.
    pub is_last_chunk: bool,
}

/// Collects a step's sections, then packs them.
#[derive(Default)]
pub(super) struct StepBuilder {
    parts: [Vec<i64>; NUM_SECTIONS],
    floats: [Vec<f32>; NUM_FLOAT_SECTIONS],
    pub flags: u32,
    pub all_flags: u32,
    pub top_k_max: u64,
}

impl StepBuilder {
    pub fn push(&mut self, s: Section, v: i64) {
        self.parts[s as usize].push(v);
    }

    pub fn extend(&mut self, s: Section, vs: impl IntoIterator<Item = i64>) {
        self.parts[s as usize].extend(vs);
    }

    pub fn push_float(&mut self, s: FloatSection, v: f32) {
        self.floats[s as usize].push(v);
    }

    pub fn len(&self, s: Section) -> usize {
        self.parts[s as usize].len()
    }

    pub fn build(self, kind: StepKind) -> Step {
        let mut offsets = [0; NUM_SECTIONS + 1];
        let total: usize = self.parts.iter().map(Vec::len).sum();
        let mut ints = Vec::with_capacity(total);
        for (i, p) in self.parts.iter().enumerate() {
            ints.extend_from_slice(p);
            offsets[i + 1] = ints.len();
        }
        let mut float_offsets = [0; NUM_FLOAT_SECTIONS + 1];
        let mut floats = Vec::new();
        for (i, p) in self.floats.iter().enumerate() {
            floats.extend_from_slice(p);
            float_offsets[i + 1] = floats.len();
        }
        Step {
            kind,
            ints,
            offsets,
            floats,
            float_offsets,
            flags: self.flags,
            all_flags: self.all_flags,
            top_k_max: self.top_k_max,
        }
    }
}
