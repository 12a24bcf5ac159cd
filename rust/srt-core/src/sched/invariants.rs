//! `BatchScheduler::check_invariants`: the ownership and accounting rules that every
//! scheduler state must satisfy, checked from the outside of the tree and the allocator.

use super::{BatchScheduler, State};
use std::collections::{HashMap, HashSet};

pub(super) fn check(s: &BatchScheduler) -> Result<(), String> {
    let p = s.cfg.page_size;
    let (lo, hi) = (p as u64, (p + s.cfg.pool_size) as u64);
    // Pages owned by requests, and pages that some request knows to be the tree's.
    let mut owner: HashMap<u32, u64> = HashMap::new();
    let mut tree_pages: HashSet<u32> = HashSet::new();
    let mut request_owned = 0;
    let (mut n_waiting, mut n_running, mut n_mid) = (0, 0, 0);
    let mut rows: HashMap<u32, u64> = HashMap::new();
    for (&id, r) in &s.reqs {
        let kv = r.slots.len();
        // Tokens including the samples in flight.
        let len = r.len();
        let shape_ok = match r.state {
            State::Waiting => {
                n_waiting += 1;
                kv == 0 && r.node.is_none() && r.row.is_none() && r.pending + r.discard <= 2
            }
            State::MidChunk => {
                n_mid += 1;
                s.chunked == Some(id)
                    && r.pending == 0
                    && r.discard == 0
                    && kv > 0
                    && kv < len
                    && kv.is_multiple_of(p)
                    && r.table_len <= kv
            }
            State::Running => {
                n_running += 1;
                kv + 1 == len && r.pending <= 2 && r.table_len == kv
            }
        };
        if !shape_ok {
            return Err(format!(
                "request {id} ({}) holds {kv} KV slots for {len} tokens ({} in flight, table \
                 {}, row {:?})",
                r.state.name(),
                r.pending,
                r.table_len,
                r.row
            ));
        }
        if (r.state == State::Waiting) == r.row.is_some() {
            return Err(format!(
                "request {id} ({}) has row {:?}",
                r.state.name(),
                r.row
            ));
        }
        if let Some(row) = r.row {
            if row as usize >= s.cfg.max_running_requests {
                return Err(format!("request {id} holds row {row} outside the table"));
            }
            if let Some(other) = rows.insert(row, id) {
                return Err(format!(
                    "row {row} is held by requests {other} and {id} at once"
                ));
            }
        }
        if r.tree_owned > kv || !r.tree_owned.is_multiple_of(p) {
            return Err(format!(
                "request {id}: tree-owned prefix {} of {kv} slots is not page aligned",
                r.tree_owned
            ));
        }
        if r.node.is_some() != (r.tree_owned > 0) {
            return Err(format!(
                "request {id}: locked node {:?} but {} tree-owned slots",
                r.node, r.tree_owned
            ));
        }
        if !s.cfg.enable_radix_cache && r.tree_owned > 0 {
            return Err(format!("request {id} shares slots with a disabled cache"));
        }
        for &s in &r.slots {
            if !(lo..hi).contains(&u64::from(s)) {
                return Err(format!("request {id} holds slot {s} outside the pool"));
            }
        }
        tree_pages.extend(r.slots[..r.tree_owned].iter().map(|&s| s / p as u32));
        let mut own = HashSet::new();
        for &s in &r.slots[r.tree_owned..] {
            let page = s / p as u32;
            if own.insert(page) {
                if let Some(other) = owner.insert(page, id) {
                    return Err(format!(
                        "slot {s} is owned by requests {other} and {id} at once"
                    ));
                }
            }
        }
        if own.len() * p != s.owned_slots(r) {
            return Err(format!(
                "request {id} owns {} pages for {} own tokens",
                own.len(),
                kv - r.tree_owned
            ));
        }
        request_owned += own.len() * p;
    }
    if let Some(page) = owner.keys().find(|page| tree_pages.contains(page)) {
        return Err(format!(
            "page {page} is owned by request {} and by the tree",
            owner[page]
        ));
    }
    if n_waiting != s.waiting.len()
        || !s
            .waiting
            .iter()
            .all(|(_, id)| s.reqs.get(id).map(|r| r.state) == Some(State::Waiting))
        || !s.waiting.windows(2).all(|w| w[0].0 < w[1].0)
    {
        return Err("the waiting queue disagrees with the request table".into());
    }
    if n_running != s.running.len()
        || s.running.iter().collect::<HashSet<_>>().len() != n_running
        || !s
            .running
            .iter()
            .all(|id| s.reqs.get(id).is_some_and(|r| r.state == State::Running))
    {
        return Err("the running list disagrees with the request table".into());
    }
    if n_mid > 1 || n_mid != usize::from(s.chunked.is_some()) {
        return Err(format!("{n_mid} requests are mid-chunk"));
    }
    let free: HashSet<u32> = s.free_rows.iter().copied().collect();
    if free.len() != s.free_rows.len()
        || free.iter().any(|row| rows.contains_key(row))
        || free.len() + rows.len() != s.cfg.max_running_requests
    {
        return Err(format!(
            "rows leak or are owned twice: {} free ({} distinct) + {} held != {}",
            s.free_rows.len(),
            free.len(),
            rows.len(),
            s.cfg.max_running_requests
        ));
    }
    if s.in_flight.len() > 2 {
        return Err(format!("{} steps are uncommitted", s.in_flight.len()));
    }
    let (evictable, protected, total) = (
        s.tree.evictable_size(),
        s.tree.protected_size(),
        s.tree.total_size(),
    );
    if evictable + protected != total {
        return Err(format!(
            "tree: evictable {evictable} + protected {protected} != total {total}"
        ));
    }
    if !s.cfg.enable_radix_cache && total != 0 {
        return Err(format!("the disabled cache holds {total} tokens"));
    }
    if let Some(r) = s.reqs.values().max_by_key(|r| r.tree_owned) {
        if r.tree_owned > protected {
            return Err(format!(
                "a request locks {} cached tokens but only {protected} are protected",
                r.tree_owned
            ));
        }
    }
    let available = s.alloc.available();
    if available + total + request_owned != s.cfg.pool_size {
        return Err(format!(
            "slots leak or are owned twice: available {available} + cached {total} + \
             request-owned {request_owned} != pool {}",
            s.cfg.pool_size
        ));
    }
    Ok(())
}
