//! Objects by label, kept with the tables: which endpoints carry a label,
//! which services select by one. Refreshing a view after a change (see
//! [`crate::view::refresh`]) then looks up what the change can affect
//! instead of reading every endpoint and every service. Persistent maps, as
//! the tables are: a copy of the state shares the index too.

use imbl::{OrdMap, OrdSet};

use crate::kind::Labels;

/// (namespace, label key, label value) → the names of the objects under it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelIndex(OrdMap<(String, String, String), OrdSet<String>>);

impl LabelIndex {
    pub fn add(&mut self, namespace: &str, name: &str, labels: &Labels) {
        for (k, v) in labels {
            self.0
                .entry((namespace.to_owned(), k.clone(), v.clone()))
                .or_default()
                .insert(name.to_owned());
        }
    }

    pub fn remove(&mut self, namespace: &str, name: &str, labels: &Labels) {
        for (k, v) in labels {
            let key = (namespace.to_owned(), k.clone(), v.clone());
            let emptied = match self.0.get_mut(&key) {
                Some(names) => {
                    names.remove(name);
                    names.is_empty()
                }
                None => false,
            };
            if emptied {
                self.0.remove(&key);
            }
        }
    }

    /// The names under one label.
    pub fn get(&self, namespace: &str, key: &str, value: &str) -> Option<&OrdSet<String>> {
        self.0
            .get(&(namespace.to_owned(), key.to_owned(), value.to_owned()))
    }

    /// The names under every label of `labels` (not empty), read from the
    /// rarest label's list.
    pub fn all_of(&self, namespace: &str, labels: &Labels) -> Vec<&String> {
        let lists: Option<Vec<&OrdSet<String>>> = labels
            .iter()
            .map(|(k, v)| self.get(namespace, k, v))
            .collect();
        let Some(lists) = lists else {
            return Vec::new();
        };
        let Some(rarest) = lists.iter().copied().min_by_key(|l| l.len()) else {
            return Vec::new();
        };
        rarest
            .iter()
            .filter(|name| lists.iter().all(|l| l.contains(*name)))
            .collect()
    }
}
