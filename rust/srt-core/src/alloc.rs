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
//!
//! Implementation: a stack of free page ids plus a per-page "free" flag (for validation).
//! A fresh or reset allocator hands out low pages first; freed pages are reused LIFO (the most
//! recently freed first, which keeps the working set of the KV pool small and cache-warm).
//! Within one `free` call the pages are pushed so that the lowest of them comes out first.

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
    #[error("slot {slot} cannot be the last slot of a {seq_len}-token sequence with page size {page_size}")]
    Misaligned {
        slot: u32,
        seq_len: usize,
        page_size: usize,
    },
}

pub struct SlotAllocator {
    page_size: usize,
    /// Usable pages; page ids are `1..=num_pages` (page 0 is the reserved padding sink).
    num_pages: usize,
    /// Stack of free page ids; `pop` hands out the next page.
    free_pages: Vec<u32>,
    /// `is_free[p]` for page id `p` (index 0 unused).
    is_free: Vec<bool>,
}

impl SlotAllocator {
    pub fn new(size: usize, page_size: usize) -> Result<Self, AllocError> {
        if page_size == 0 {
            return Err(AllocError::BadConfig("page_size must be >= 1".into()));
        }
        if !size.is_multiple_of(page_size) {
            return Err(AllocError::BadConfig(format!(
                "size {size} is not a multiple of page_size {page_size}"
            )));
        }
        if size
            .checked_add(page_size)
            .is_none_or(|rows| rows > u32::MAX as usize + 1)
        {
            return Err(AllocError::BadConfig(format!(
                "size {size} + page_size {page_size} does not fit u32 slot indices"
            )));
        }
        let num_pages = size / page_size;
        let mut a = SlotAllocator {
            page_size,
            num_pages,
            free_pages: Vec::with_capacity(num_pages),
            is_free: vec![false; num_pages + 1],
        };
        a.reset();
        Ok(a)
    }

    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Usable slots (excluding the reserved page 0).
    pub fn size(&self) -> usize {
        self.num_pages * self.page_size
    }

    /// Free slots (free pages * page_size).
    pub fn available(&self) -> usize {
        self.free_pages.len() * self.page_size
    }

    /// `n` fresh slots from whole pages (`ceil(n / page_size)` pages; the slots of the last page
    /// beyond `n` stay owned by the caller's page). All or nothing.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>, AllocError> {
        let pages = n.div_ceil(self.page_size);
        if pages > self.free_pages.len() {
            return Err(AllocError::OutOfMemory {
                requested: n,
                available: self.available(),
            });
        }
        let mut slots = Vec::with_capacity(n);
        self.take_pages(n, &mut slots);
        Ok(slots)
    }

    /// Slots for `n_new` more tokens of a sequence that already holds `seq_len` tokens whose
    /// last slot is `last_slot` (ignored when `seq_len % page_size == 0`): the remainder of the
    /// last page first, then fresh pages. All or nothing.
    ///
    /// Errors: `last_slot` outside the pool or on a free page, or not at offset
    /// `(seq_len - 1) % page_size` of its page (`Misaligned`).
    pub fn alloc_extend(
        &mut self,
        seq_len: usize,
        last_slot: u32,
        n_new: usize,
    ) -> Result<Vec<u32>, AllocError> {
        let page = self.page_size;
        let used_in_last = seq_len % page;
        let from_last = if used_in_last == 0 {
            0
        } else {
            (page - used_in_last).min(n_new)
        };
        if used_in_last != 0 {
            self.allocated_page(last_slot)?;
            if last_slot as usize % page != used_in_last - 1 {
                return Err(AllocError::Misaligned {
                    slot: last_slot,
                    seq_len,
                    page_size: page,
                });
            }
        }
        let rest = n_new - from_last;
        if self.pages_needed(seq_len, n_new) > self.free_pages.len() {
            return Err(AllocError::OutOfMemory {
                requested: rest,
                available: self.available(),
            });
        }
        let mut slots = Vec::with_capacity(n_new);
        // The slots after `last_slot` in its page belong to the sequence's page already.
        slots.extend((1..=from_last as u32).map(|i| last_slot + i));
        self.take_pages(rest, &mut slots);
        Ok(slots)
    }

    /// Pages that `alloc_extend(seq_len, _, n_new)` would take from the free list.
    pub fn pages_needed(&self, seq_len: usize, n_new: usize) -> usize {
        let page = self.page_size;
        let used_in_last = seq_len % page;
        let left_in_last = if used_in_last == 0 {
            0
        } else {
            page - used_in_last
        };
        n_new.saturating_sub(left_in_last).div_ceil(page)
    }

    /// Frees the pages of `slots` (deduplicated). Validates everything before freeing anything.
    pub fn free(&mut self, slots: &[u32]) -> Result<(), AllocError> {
        let mut pages = Vec::with_capacity(slots.len().div_ceil(self.page_size));
        for &slot in slots {
            pages.push(self.allocated_page(slot)?);
        }
        // Descending, so that the stack hands the lowest freed page out first.
        pages.sort_unstable_by(|a, b| b.cmp(a));
        pages.dedup();
        for p in pages {
            self.is_free[p as usize] = true;
            self.free_pages.push(p);
        }
        Ok(())
    }

    /// Makes every slot free again.
    pub fn reset(&mut self) {
        self.free_pages.clear();
        self.free_pages.extend((1..=self.num_pages as u32).rev());
        self.is_free.fill(true);
        self.is_free[0] = false;
    }

    /// The page of `slot`, which must be in the pool and handed out.
    fn allocated_page(&self, slot: u32) -> Result<u32, AllocError> {
        let p = slot as usize / self.page_size;
        if p == 0 || p > self.num_pages {
            return Err(AllocError::OutOfRange(slot));
        }
        if self.is_free[p] {
            return Err(AllocError::NotAllocated(slot));
        }
        Ok(p as u32)
    }

    /// Appends `n` slots from `ceil(n / page_size)` fresh pages. The caller checked capacity.
    fn take_pages(&mut self, n: usize, slots: &mut Vec<u32>) {
        let page = self.page_size;
        let mut left = n;
        while left > 0 {
            let p = self
                .free_pages
                .pop()
                .expect("capacity checked by the caller");
            self.is_free[p as usize] = false;
            let take = left.min(page);
            // usize: the end of the last page may be 2^32, one past the largest u32 slot.
            let first = p as usize * page;
            slots.extend((first..first + take).map(|s| s as u32));
            left -= take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors() {
        assert!(matches!(
            SlotAllocator::new(8, 0),
            Err(AllocError::BadConfig(_))
        ));
        assert!(matches!(
            SlotAllocator::new(10, 4),
            Err(AllocError::BadConfig(_))
        ));
        assert!(matches!(
            SlotAllocator::new(1 << 32, 1),
            Err(AllocError::BadConfig(_))
        ));
        // The largest pool whose slots (page 0 included) still fit u32.
        let a = SlotAllocator::new(1 << 31, 1 << 31).unwrap();
        assert_eq!((a.size(), a.available()), (1 << 31, 1 << 31));
        assert!(matches!(
            SlotAllocator::new(1 << 32, 1 << 30),
            Err(AllocError::BadConfig(_))
        ));
        let a = SlotAllocator::new(0, 1).unwrap();
        assert_eq!((a.size(), a.available()), (0, 0));
    }

    #[test]
    fn page_zero_is_reserved() {
        let mut a = SlotAllocator::new(4, 1).unwrap();
        assert_eq!(a.alloc(4).unwrap(), vec![1, 2, 3, 4]);
        let mut a = SlotAllocator::new(8, 4).unwrap();
        assert_eq!(a.alloc(8).unwrap(), (4..12).collect::<Vec<_>>());
        assert_eq!(a.free(&[0]), Err(AllocError::OutOfRange(0)));
        assert_eq!(a.free(&[3]), Err(AllocError::OutOfRange(3)));
        assert_eq!(a.free(&[12]), Err(AllocError::OutOfRange(12)));
    }

    #[test]
    fn alloc_and_free() {
        let mut a = SlotAllocator::new(8, 1).unwrap();
        assert_eq!(a.alloc(0).unwrap(), Vec::<u32>::new());
        let x = a.alloc(3).unwrap();
        assert_eq!(x, vec![1, 2, 3]);
        assert_eq!(a.available(), 5);
        a.free(&[2]).unwrap();
        assert_eq!(a.available(), 6);
        // LIFO: the page freed last comes back first.
        assert_eq!(a.alloc(1).unwrap(), vec![2]);
        assert_eq!(
            a.alloc(6),
            Err(AllocError::OutOfMemory {
                requested: 6,
                available: 5
            })
        );
        assert_eq!(a.available(), 5);
        assert_eq!(a.alloc(5).unwrap(), vec![4, 5, 6, 7, 8]);
        assert_eq!(
            a.alloc(1),
            Err(AllocError::OutOfMemory {
                requested: 1,
                available: 0
            })
        );
    }

    #[test]
    fn free_validates_before_freeing() {
        let mut a = SlotAllocator::new(8, 1).unwrap();
        a.alloc(3).unwrap();
        // 7 was never handed out: nothing is freed, not even 1 and 2.
        assert_eq!(a.free(&[1, 2, 7]), Err(AllocError::NotAllocated(7)));
        assert_eq!(a.available(), 5);
        assert_eq!(a.free(&[1, 99]), Err(AllocError::OutOfRange(99)));
        assert_eq!(a.available(), 5);
        // Duplicates within one call are one free.
        a.free(&[1, 1, 2]).unwrap();
        assert_eq!(a.available(), 7);
        // Double free across calls is an error.
        assert_eq!(a.free(&[1]), Err(AllocError::NotAllocated(1)));
        assert_eq!(a.available(), 7);
    }

    #[test]
    fn paged_alloc_and_free() {
        let mut a = SlotAllocator::new(16, 4).unwrap();
        let x = a.alloc(5).unwrap();
        assert_eq!(x, vec![4, 5, 6, 7, 8]);
        assert_eq!(a.available(), 8);
        // Freeing one slot frees its whole page.
        a.free(&[9]).unwrap();
        assert_eq!(a.available(), 12);
        assert_eq!(a.free(&[8]), Err(AllocError::NotAllocated(8)));
        assert_eq!(
            a.alloc(13),
            Err(AllocError::OutOfMemory {
                requested: 13,
                available: 12
            })
        );
        a.free(&x[..4]).unwrap();
        assert_eq!(a.available(), 16);
        a.reset();
        assert_eq!(a.alloc(4).unwrap(), vec![4, 5, 6, 7]);
    }

    #[test]
    fn alloc_extend_fills_last_page_first() {
        let mut a = SlotAllocator::new(16, 4).unwrap();
        let s = a.alloc(3).unwrap(); // 4, 5, 6 on page 1
        assert_eq!(a.pages_needed(3, 1), 0);
        assert_eq!(a.pages_needed(3, 2), 1);
        assert_eq!(a.pages_needed(3, 5), 1);
        assert_eq!(a.pages_needed(3, 6), 2);
        assert_eq!(a.pages_needed(4, 0), 0);
        assert_eq!(a.pages_needed(4, 1), 1);
        assert_eq!(a.alloc_extend(3, s[2], 1).unwrap(), vec![7]);
        assert_eq!(a.available(), 12);
        // seq_len 4 is page aligned: last_slot is ignored.
        assert_eq!(a.alloc_extend(4, 0, 2).unwrap(), vec![8, 9]);
        assert_eq!(a.alloc_extend(6, 9, 3).unwrap(), vec![10, 11, 12]);
        assert_eq!(a.available(), 4);
        // The sequence now holds 9 tokens: pages 1 and 2 full, slot 12 on page 3.
        assert_eq!(
            a.alloc_extend(9, 12, 8),
            Err(AllocError::OutOfMemory {
                requested: 5,
                available: 4
            })
        );
        assert_eq!(a.available(), 4);
        assert_eq!(
            a.alloc_extend(9, 12, 7).unwrap(),
            vec![13, 14, 15, 16, 17, 18, 19]
        );
        assert_eq!(a.available(), 0);
        assert_eq!(a.alloc_extend(16, 19, 0).unwrap(), Vec::<u32>::new());
        assert_eq!(
            a.alloc_extend(14, 19, 1),
            Err(AllocError::Misaligned {
                slot: 19,
                seq_len: 14,
                page_size: 4
            })
        );
        assert_eq!(a.alloc_extend(14, 2, 1), Err(AllocError::OutOfRange(2)));
        a.free(&[16]).unwrap();
        assert_eq!(a.alloc_extend(14, 17, 1), Err(AllocError::NotAllocated(17)));
    }

    #[test]
    fn alloc_extend_page_size_one() {
        let mut a = SlotAllocator::new(4, 1).unwrap();
        assert_eq!(a.pages_needed(7, 3), 3);
        assert_eq!(a.alloc_extend(7, 123, 3).unwrap(), vec![1, 2, 3]);
        assert_eq!(
            a.alloc_extend(10, 3, 2),
            Err(AllocError::OutOfMemory {
                requested: 2,
                available: 1
            })
        );
    }
}
