//! A view → kernel map operations, as a pure function.
//!
//! [`desired()`] reads what this node must program out of a view (the same
//! view whether the control service computed it or a standalone agent did,
//! from its manifest, with the same function): each frontend as the kernel
//! will see it, with this node's zone weights and probe assignments. [`plan()`]
//! compares that with what the maps hold ([`State`]) and returns the
//! [`Step`]s that take the maps from one to the other, plus the state they
//! lead to, ordered so that every intermediate state is safe for packets in
//! flight. Nothing here touches the kernel: `apply` executes the steps, and
//! tests check plans directly.

mod desired;
mod plan;
#[cfg(test)]
mod tests;

pub use desired::{Desired, DesiredBackend, DesiredFrontend, Naming, Node, desired, kernel_key};
pub use plan::{
    Allocator, FrontendState, Plan, PlanError, Scope, State, Step, kernel_algorithm, plan,
    plan_scoped, slot_table,
};

/// The frontends whose desired state differs between `before` and `after`
/// (in either only, or in both but unequal): what a plan from maps that
/// hold `before` must look at.
pub fn changed_frontends(
    before: &Desired,
    after: &Desired,
) -> std::collections::BTreeSet<sluice_common::types::FrontendKeyV4> {
    let mut changed: std::collections::BTreeSet<_> = after
        .iter()
        .filter(|(key, want)| before.get(key) != Some(want))
        .map(|(key, _)| *key)
        .collect();
    changed.extend(before.keys().filter(|key| !after.contains_key(key)));
    changed
}
