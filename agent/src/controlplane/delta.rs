//! Reports carry only the counters that changed.
//!
//! Every second a node reports its counters; at 10,000 services most of
//! them have not moved since the last report, and sending them all costs the
//! node and the control service CPU for nothing (at that size, more than the
//! changes being applied). So a report on a connection whose previous report
//! was acknowledged carries the frontends whose counters differ from what
//! that report carried, and the keys of those it no longer has; the control
//! service merges them into what it holds for the node. The first report on
//! a connection, and the next after a failed one, is complete, so a
//! restarted control service or another replica never merges into nothing.

use std::collections::HashMap;

use sluice_api::v1;
use sluice_model::wire::observe::address_from_bytes;

/// A frontend's identity in a report: (VIP bytes, port, protocol).
type Key = (Vec<u8>, u32, i32);

fn key(c: &v1::FrontendCounters) -> Key {
    (c.vip.clone(), c.port, c.protocol)
}

/// What the control service holds for this node: the counters of the last
/// acknowledged report on the current connection (`None`: nothing known).
#[derive(Debug, Default)]
pub struct Acknowledged(Option<HashMap<Key, v1::FrontendCounters>>);

impl Acknowledged {
    /// Nothing is known any more (a new connection, a failed report).
    pub fn forget(&mut self) {
        self.0 = None;
    }

    /// `report`, complete, reduced to what changed since the acknowledged
    /// one (unchanged when nothing is acknowledged).
    pub fn reduce(&self, report: &mut v1::ReportStatusRequest) {
        let Some(before) = &self.0 else {
            return;
        };
        let now: HashMap<Key, &v1::FrontendCounters> =
            report.counters.iter().map(|c| (key(c), c)).collect();
        report.counters_gone = before
            .iter()
            .filter(|(k, _)| !now.contains_key(*k))
            .filter_map(|(_, c)| gone(c))
            .collect();
        report.counters.retain(|c| before.get(&key(c)) != Some(c));
        report.counters_changed_only = true;
    }

    /// The control service took a report whose complete counters were
    /// `counters`.
    pub fn took(&mut self, counters: &[v1::FrontendCounters]) {
        self.0 = Some(counters.iter().map(|c| (key(c), c.clone())).collect());
    }
}

/// The key of a frontend no longer reported, as the API names frontends.
fn gone(c: &v1::FrontendCounters) -> Option<v1::FrontendKey> {
    let ip = address_from_bytes("vip", &c.vip).ok()?;
    Some(v1::FrontendKey {
        vip: ip.to_string(),
        port: c.port,
        protocol: c.protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(last_octet: u8, packets: u64) -> v1::FrontendCounters {
        v1::FrontendCounters {
            vip: vec![198, 18, 0, last_octet],
            port: 80,
            protocol: v1::Protocol::Tcp as i32,
            counters: Some(v1::TrafficCounters {
                packets,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn report(counters: Vec<v1::FrontendCounters>) -> v1::ReportStatusRequest {
        v1::ReportStatusRequest {
            counters,
            ..Default::default()
        }
    }

    #[test]
    fn nothing_acknowledged_sends_everything() {
        let ack = Acknowledged::default();
        let mut r = report(vec![counters(1, 5), counters(2, 7)]);
        ack.reduce(&mut r);
        assert_eq!(r.counters.len(), 2);
        assert!(!r.counters_changed_only && r.counters_gone.is_empty());
    }

    #[test]
    fn only_changes_and_departures_follow_an_acknowledged_report() {
        let mut ack = Acknowledged::default();
        ack.took(&[counters(1, 5), counters(2, 7), counters(3, 9)]);
        // 1 moved, 2 did not, 3 is gone, 4 is new.
        let mut r = report(vec![counters(1, 6), counters(2, 7), counters(4, 1)]);
        ack.reduce(&mut r);
        assert!(r.counters_changed_only);
        assert_eq!(r.counters, vec![counters(1, 6), counters(4, 1)]);
        assert_eq!(
            r.counters_gone,
            vec![v1::FrontendKey {
                vip: "198.18.0.3".into(),
                port: 80,
                protocol: v1::Protocol::Tcp as i32,
            }]
        );
        // Nothing changed: an empty change list, still a report.
        ack.took(&[counters(1, 6), counters(2, 7), counters(4, 1)]);
        let mut same = report(vec![counters(1, 6), counters(2, 7), counters(4, 1)]);
        ack.reduce(&mut same);
        assert!(same.counters_changed_only && same.counters.is_empty());
        assert!(same.counters_gone.is_empty());
    }

    #[test]
    fn a_forgotten_acknowledgement_means_a_complete_report_again() {
        let mut ack = Acknowledged::default();
        ack.took(&[counters(1, 5)]);
        ack.forget();
        let mut r = report(vec![counters(1, 5)]);
        ack.reduce(&mut r);
        assert_eq!(r.counters.len(), 1);
        assert!(!r.counters_changed_only);
    }
}
