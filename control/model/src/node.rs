//! Nodes: the machines that joined the cluster. They are not applied like
//! the other kinds: a node joins with a single-use token, which records it.

use std::time::SystemTime;

/// A joined node as the control service keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// As given at join; `None`: the node has no zone.
    pub zone: Option<String>,
    /// Serial numbers (hex) of the certificates the node may use: the
    /// current one first, then the one it replaces while a renewal is under
    /// way.
    pub serials: Vec<String>,
    pub certificate_expires: SystemTime,
    pub joined_at: SystemTime,
}
