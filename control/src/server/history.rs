//! The last view updates, so that an agent that reconnects with the version
//! it last applied gets only what it missed.

use std::collections::VecDeque;
use std::sync::Arc;

use sluice_model::view::ViewUpdate;

/// The last updates, oldest first, each with the version it starts from.
#[derive(Clone, Debug)]
pub struct History {
    /// Shared: the state (and this history) is copied for every change.
    updates: VecDeque<(u64, Arc<ViewUpdate>)>,
    capacity: usize,
}

impl History {
    pub fn new(capacity: usize) -> Self {
        Self {
            updates: VecDeque::new(),
            capacity,
        }
    }

    /// Records `update`, which applies on top of version `from`.
    pub fn push(&mut self, from: u64, update: ViewUpdate) {
        if self.updates.len() == self.capacity {
            self.updates.pop_front();
        }
        self.updates.push_back((from, Arc::new(update)));
    }

    /// The updates that bring a node at `since` to `current`: empty when it is
    /// current, None when the history does not reach back that far (the caller
    /// sends a snapshot).
    pub fn since(&self, since: u64, current: u64) -> Option<Vec<Arc<ViewUpdate>>> {
        if since == current {
            return Some(Vec::new());
        }
        // A node with nothing gets the view in one snapshot, not every change
        // since the beginning.
        if since == 0 {
            return None;
        }
        let start = self.updates.iter().position(|(from, _)| *from == since)?;
        Some(
            self.updates
                .iter()
                .skip(start)
                .map(|(_, u)| u.clone())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_replays_what_was_missed_or_asks_for_a_snapshot() {
        let mut h = History::new(2);
        let u = |v| ViewUpdate {
            version: v,
            ..Default::default()
        };
        h.push(1, u(2));
        h.push(2, u(3));
        assert_eq!(h.since(3, 3).map(|v| v.len()), Some(0));
        assert_eq!(h.since(2, 3).map(|v| v.len()), Some(1));
        assert_eq!(h.since(1, 3).map(|v| v.len()), Some(2));
        h.push(3, u(4));
        assert!(h.since(1, 4).is_none(), "1 fell out of the history");
        assert!(h.since(9, 4).is_none(), "unknown version");
    }
}
