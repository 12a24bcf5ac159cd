//! Stop strings over the final text of one request: holds back any tail that could start one,
//! cuts at the first that completes.

/// Holds back text that could be the start of a stop string, and cuts at a match.
#[derive(Debug)]
pub(super) struct StopFilter {
    /// (index in `DecodeParams::stop`, string), empty strings left out.
    stops: Vec<(usize, String)>,
    keep_stop: bool,
    held: String,
    pub(super) matched: Option<usize>,
}

impl StopFilter {
    pub(super) fn new(stop: &[String], keep_stop: bool) -> Self {
        StopFilter {
            stops: stop
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(i, s)| (i, s.clone()))
                .collect(),
            keep_stop,
            held: String::new(),
            matched: None,
        }
    }

    /// Appends final text; returns what may be shown.
    pub(super) fn push(&mut self, text: &str) -> String {
        if self.matched.is_some() {
            return String::new();
        }
        if self.stops.is_empty() {
            return text.to_owned();
        }
        self.held.push_str(text);
        // Earliest end wins, then earliest start (longest), then the first listed. `held` has
        // no match before this push, so each string's first occurrence is its earliest end.
        let best = self
            .stops
            .iter()
            .filter_map(|(i, s)| self.held.find(s.as_str()).map(|at| (at + s.len(), at, *i)))
            .min();
        if let Some((end, start, index)) = best {
            self.matched = Some(index);
            let keep = if self.keep_stop { end } else { start };
            let out = self.held[..keep].to_owned();
            self.held = String::new();
            return out;
        }
        let hold = self
            .stops
            .iter()
            .map(|(_, s)| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let out = self.held[..self.held.len() - hold].to_owned();
        self.held.drain(..self.held.len() - hold);
        out
    }

    /// End of the request: what was held cannot become a stop string any more.
    pub(super) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`. Byte-wise: a
/// suffix of valid UTF-8 that starts a valid string begins at a char boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let (text, stop) = (text.as_bytes(), stop.as_bytes());
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.ends_with(&stop[..k]))
        .unwrap_or(0)
}
