//! `sluice-control migrate --from DATA_DIR --to etcd://…`: a single-machine
//! cluster moved into etcd as it is.
//!
//! Everything is copied as stored: objects (so VIPs), nodes (so node
//! identities and the certificates they hold stay valid), join tokens, the
//! sealed CA (the same key file opens it), the view's version and history
//! (so agents resume without a full resend). Values are written in the
//! order of their versions, so resource versions keep their order (they
//! become etcd revisions: larger numbers, same order). Transactions stay
//! under etcd's default limit of 128 operations: a batch is whole groups of
//! one version where they fit. The target must hold no Sluice state.

use sluice_model::ObjectKind;

use super::state::tables;
use crate::store::{Expect, Key, Store, StoreError, StoreExt as _, Versioned};

/// Operations per etcd transaction (its default `--max-txn-ops` is 128;
/// one more goes to the store's own sentinel).
const BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the target already holds a Sluice state ({count} records, e.g. {example}); \
         migrate only into an empty store (or another --etcd-prefix)"
    )]
    NotEmpty { count: usize, example: String },
}

/// Every table the control service writes.
fn all_tables() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = ObjectKind::ALL
        .iter()
        .map(|k| k.visit(super::state::TableName))
        .collect();
    all.extend([
        tables::NODE,
        tables::TOKEN,
        tables::PKI,
        tables::VIEW,
        tables::VIEW_LOG,
    ]);
    all
}

/// Copies everything from `from` into `to` (which must be empty); returns
/// how many records were copied.
pub fn migrate(from: &dyn Store, to: &dyn Store) -> Result<usize, MigrateError> {
    let tables = all_tables();
    let (existing, _) = to.load(&tables)?;
    if let Some((key, _)) = existing.first() {
        return Err(MigrateError::NotEmpty {
            count: existing.len(),
            example: key.to_string(),
        });
    }
    let (mut entries, _) = from.load(&tables)?;
    entries.sort_by_key(|(_, v)| v.version);
    let total = entries.len();
    for batch in batches(&entries) {
        to.write(|tx| -> Result<(), StoreError> {
            for (key, Versioned { value, .. }) in batch {
                tx.put(key, value, Expect::Absent)?;
            }
            Ok(())
        })?;
    }
    Ok(total)
}

/// Consecutive runs of `entries` (sorted by version) of at most [`BATCH`],
/// cut between versions where a run allows.
fn batches(entries: &[(Key, Versioned)]) -> Vec<&[(Key, Versioned)]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut end = (start + BATCH).min(entries.len());
        if end < entries.len() {
            // Back to the last change of version inside the window, if any.
            let cut = (start + 1..end)
                .rev()
                .find(|&i| entries[i].1.version != entries[i - 1].1.version);
            if let Some(cut) = cut {
                end = cut;
            }
        }
        out.push(&entries[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests;
