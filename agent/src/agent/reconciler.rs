//! The one reconciler both sources feed: a view (the control service's, or
//! the one a standalone agent computes from its manifest with the same
//! function) becomes this node's desired state, then a plan, then map
//! writes; its network policy is installed beside. Health verdicts and
//! drain deadlines apply the last view again.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sluice_common::types::AgentMeta;
use sluice_model::error_chain;
use sluice_model::manifest;
use sluice_model::policy::compiled::CompiledPolicy;
use sluice_model::view::{ServiceRef, View};
use tracing::{error, info, warn};

use super::AgentError;
use crate::{
    alloc::SlotRange,
    apply,
    dataplane::Dataplane,
    drain::Drains,
    health::{self, Health},
    metrics,
    policy::{PolicyWriter, revoke},
    reconcile::{self, Allocator, Desired, Node, Scope, State},
};

/// Slot ranges a frontend stopped pointing to wait this long before reuse:
/// far longer than any packet takes through the programs.
const SLOT_GRACE: Duration = Duration::from_secs(2);

/// What one reconcile did, for the log.
struct Applied {
    steps: usize,
    udp_flows_purged: usize,
    flows_purged: usize,
    micros: u64,
}

/// What is programmed, and what to do with it.
pub struct Reconciler {
    pub state: State,
    alloc: Allocator,
    /// Slot ranges waiting out their grace period.
    retiring: Vec<(SlotRange, Instant)>,
    /// Identifies the input last applied (a manifest's content hash, or a
    /// view's version), so that an unchanged manifest costs nothing.
    pub last_applied: Option<u64>,
    /// Content hash of the last manifest rejected, to log each bad one once.
    pub last_rejected: Option<u64>,
    /// The last desired state applied, before health checks had their say:
    /// a change of health applies it again.
    pub input: Desired,
    /// What the maps hold, as the effective desired state (health applied)
    /// of the last plan written whole; `None` when not known (at start, or
    /// after a failed write). A plan looks only at what differs from it.
    planned: Option<Desired>,
    pub health: Health,
    drains: Drains,
    /// Who this node is: which zone weights and probes are its own.
    pub node: Node,
    /// The network policy in the maps, as the view last gave it.
    pub installed_policy: Option<CompiledPolicy>,
    /// For `/metrics`.
    pub stats: metrics::AgentStats,
}

impl Reconciler {
    pub fn new(dp: &Dataplane, node: Node) -> Result<Self, AgentError> {
        let state = apply::read_state(&dp.maps)?;
        let alloc = Allocator::for_state(&state);
        Ok(Self {
            state,
            alloc,
            retiring: Vec::new(),
            last_applied: None,
            last_rejected: None,
            input: Desired::new(),
            planned: None,
            health: Health::default(),
            drains: Drains::default(),
            node,
            installed_policy: None,
            stats: metrics::AgentStats::default(),
        })
    }

    /// Parses the manifest `text` and makes the maps match the view it
    /// makes. Returns whether anything was applied (an unchanged manifest is
    /// skipped).
    pub fn apply_manifest(
        &mut self,
        dp: &mut Dataplane,
        source: &str,
        text: &str,
    ) -> Result<bool, AgentError> {
        let hash = fnv1a(text.as_bytes());
        if self.last_applied == Some(hash) {
            return Ok(false);
        }
        if text.trim().is_empty() {
            return Err(AgentError::EmptyManifest {
                file: source.to_owned(),
            });
        }
        let manifest = manifest::parse(source, text)?;
        let done = self.program(dp, &View::of_manifest(&manifest), hash)?;
        info!(
            services = manifest.services.len(),
            steps = done.steps,
            udp_flows_purged = done.udp_flows_purged,
            flows_purged = done.flows_purged,
            micros = done.micros,
            "applied manifest"
        );
        Ok(true)
    }

    /// Makes the maps match the control service's view.
    pub fn apply_view(&mut self, dp: &mut Dataplane, view: &View) -> Result<(), AgentError> {
        let done = self.program(dp, view, fnv1a(&view.version.to_le_bytes()))?;
        info!(
            version = view.version,
            frontends = view.frontends.len(),
            steps = done.steps,
            udp_flows_purged = done.udp_flows_purged,
            flows_purged = done.flows_purged,
            micros = done.micros,
            "applied view version {}",
            view.version
        );
        Ok(())
    }

    /// The one path of both sources: `view` → this node's desired state →
    /// plan → map writes, then its network policy; `input` identifies what
    /// was applied (a manifest's hash, or the view's version).
    fn program(
        &mut self,
        dp: &mut Dataplane,
        view: &View,
        input: u64,
    ) -> Result<Applied, AgentError> {
        let desired = reconcile::desired(&view.frontends, &self.node);
        let done = self.apply_desired(dp, desired, input)?;
        self.apply_policy(dp, &view.policy)?;
        Ok(done)
    }

    /// Makes the maps match `desired`. On any error the maps keep their
    /// previous content (planning precedes every write), or, if a write
    /// failed midway, a consistent mix that the next change completes.
    fn apply_desired(
        &mut self,
        dp: &mut Dataplane,
        desired: Desired,
        input: u64,
    ) -> Result<Applied, AgentError> {
        let planning = Instant::now();
        let result = self.plan_and_apply(dp, desired, input);
        match &result {
            Ok(_) => self
                .stats
                .reconciles
                .observe(planning.elapsed().as_secs_f64()),
            Err(_) => self.stats.reconcile_errors += 1,
        }
        result
    }

    fn plan_and_apply(
        &mut self,
        dp: &mut Dataplane,
        desired: Desired,
        input: u64,
    ) -> Result<Applied, AgentError> {
        let effective = health::overlay(&desired, |service, t| self.health.is_healthy(service, t));
        let changed = self
            .planned
            .as_ref()
            .map(|before| reconcile::changed_frontends(before, &effective));
        let scope = changed.as_ref().map_or(Scope::All, Scope::Only);
        let plan = reconcile::plan_scoped(&effective, &self.state, &self.alloc, scope)?;
        let started = Instant::now();
        match apply::apply(&mut dp.maps, &plan.steps) {
            Ok(applied) => {
                self.state = plan.next;
                self.alloc = plan.alloc;
                self.drains.track(&self.state, &effective, Instant::now());
                self.planned = Some(effective);
                self.health.track(&desired);
                self.input = desired;
                let due = Instant::now() + SLOT_GRACE;
                self.retiring
                    .extend(plan.retired_ranges.into_iter().map(|r| (r, due)));
                self.last_applied = Some(input);
                let meta = AgentMeta {
                    manifest_hash: input,
                    applied_at: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                    ..dp.maps.agent_meta.get(&0, 0).unwrap_or_default()
                };
                if let Err(e) = dp.maps.agent_meta.set(0, meta, 0) {
                    warn!("recording the applied state: {e}");
                }
                Ok(Applied {
                    steps: applied.steps,
                    udp_flows_purged: applied.udp_flows_purged,
                    flows_purged: applied.flows_purged,
                    micros: started.elapsed().as_micros() as u64,
                })
            }
            Err(e) => {
                // Part of the plan is in the maps; each step left them
                // consistent. Re-read where we stand; the next change retries.
                self.resync(dp);
                Err(e.into())
            }
        }
    }

    /// Installs the view's network policy if it changed (atomically, see
    /// `policy`), then ends the established flows it now denies.
    fn apply_policy(
        &mut self,
        dp: &mut Dataplane,
        policy: &CompiledPolicy,
    ) -> Result<(), AgentError> {
        if self.installed_policy.as_ref() == Some(policy) {
            return Ok(());
        }
        let generation = PolicyWriter.install(&mut dp.maps, policy)?;
        let revoked = revoke(&mut dp.maps, policy)?;
        info!(
            generation,
            identities = policy.identities.len(),
            rules = policy.rules.len(),
            enforcing = policy.enforces(),
            flows_revoked = revoked,
            "network policy installed"
        );
        self.installed_policy = Some(policy.clone());
        Ok(())
    }

    /// Applies the last input again after a backend's health changed.
    pub fn apply_health(&mut self, dp: &mut Dataplane) {
        let Some(input) = self.last_applied else {
            return;
        };
        match self.apply_desired(dp, self.input.clone(), input) {
            Ok(done) => info!(
                steps = done.steps,
                micros = done.micros,
                "applied a change of backend health"
            ),
            Err(e) => error!("applying a change of backend health: {}", error_chain(&e)),
        }
    }

    /// Ends the flows of backends whose drain timeout passed.
    pub fn end_drained(&mut self, dp: &mut Dataplane) {
        let due = self.drains.due(Instant::now());
        if due.is_empty() {
            return;
        }
        match apply::purge_flows(&mut dp.maps, |_, flow| due.contains(&flow.backend_id)) {
            Ok(flows) => info!(backends = ?due, flows, "drain timeout: ended the remaining flows"),
            Err(e) => warn!("ending drained flows: {e}"),
        }
    }

    fn resync(&mut self, dp: &Dataplane) {
        match apply::read_state(&dp.maps) {
            Ok(state) => {
                self.alloc = Allocator::for_state(&state);
                for (range, _) in &self.retiring {
                    self.alloc.slots.mark_used(*range);
                }
                self.state = state;
                self.last_applied = None;
                self.planned = None;
            }
            Err(e) => error!("re-reading the maps after a failed update: {e}"),
        }
    }

    pub fn release_due_ranges(&mut self) {
        let now = Instant::now();
        let alloc = &mut self.alloc;
        self.retiring.retain(|(range, due)| {
            if *due <= now {
                alloc.slots.release(*range);
                false
            } else {
                true
            }
        });
    }

    /// The service a programmed frontend belongs to, as the view names it.
    pub fn service_of(&self, key: &sluice_common::types::FrontendKeyV4) -> Option<&ServiceRef> {
        self.input.get(key).map(|f| &f.service)
    }
}

/// FNV-1a, 64 bits: identifies a manifest's content in status.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
