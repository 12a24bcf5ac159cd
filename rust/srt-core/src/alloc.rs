//! KV slot allocator.
//!
//! API CONTRACT (fixed):
//! - Slots are `u32` indices into the KV pool tensors. Page 0 (slots `0..page_size`) is
//!   reserved as a padding sink (CUDA graphs and padded batches write there), so a pool of
//!   `size` usable slots hands out slots in `page_size..page_size + size` and the tensors need
//!   `size + page_size` rows.
//! - `size` must be a multiple of `page_size`. With `page_size > 1` memory is handed out in
//!   whole pages; a request's tokens fill its last page before a new page is taken
//!   (see [`SlotAllocator::alloc_extend`]).
//! - Freeing a slot frees its whole page. Freeing a page that is already free, or a slot the
//!   allocator never handed out, is an error and changes nothing.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("out of KV cache memory: requested {requested} slots, {available} available")]
    OutOfMemory { requested: usize, available: usize },
    #[error("slot {0} is not allocated (double free or never handed out)")]
    NotAllocated(u32),
    #[error("slot {0} is outside the pool")]
    OutOfRange(u32),
    #[error("invalid allocator configuration: {0}")]
    BadConfig(String),
}

pub struct SlotAllocator {
    // implementation detail
}

impl SlotAllocator {
    pub fn new(size: usize, page_size: usize) -> Result<Self, AllocError> {
        todo!()
    }
    pub fn page_size(&self) -> usize {
        todo!()
    }
    /// Usable slots (excluding the reserved page 0).
    pub fn size(&self) -> usize {
        todo!()
    }
    /// Free slots (free pages * page_size).
    pub fn available(&self) -> usize {
        todo!()
    }
    /// `n` fresh slots from whole pages (`ceil(n / page_size)` pages; the slots of the last page
    /// beyond `n` stay owned by the caller's page). All or nothing.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>, AllocError> {
        todo!()
    }
    /// Slots for `n_new` more tokens of a sequence that already holds `seq_len` tokens whose
    /// last slot is `last_slot` (ignored when `seq_len % page_size == 0`): the remainder of the
    /// last page first, then fresh pages. All or nothing.
    pub fn alloc_extend(&mut self, seq_len: usize, last_slot: u32, n_new: usize) -> Result<Vec<u32>, AllocError> {
        todo!()
    }
    /// Pages that `alloc_extend(seq_len, _, n_new)` would take from the free list.
    pub fn pages_needed(&self, seq_len: usize, n_new: usize) -> usize {
        todo!()
    }
    /// Frees the pages of `slots` (deduplicated). Validates everything before freeing anything.
    pub fn free(&mut self, slots: &[u32]) -> Result<(), AllocError> {
        todo!()
    }
    /// Makes every slot free again.
    pub fn reset(&mut self) {
        todo!()
    }
}
