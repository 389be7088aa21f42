//! Rules about a whole list (no duplicates): small incremental sets, so both callers
//! report the first offending entry, in order.

use super::*;

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// `(port, protocol)` is unique within a service: it is the listener's key.
#[derive(Default)]
pub(crate) struct UniquePorts(HashMap<(u16, Protocol), usize>);

impl UniquePorts {
    pub(crate) fn insert(
        &mut self,
        index: usize,
        port: u16,
        protocol: Protocol,
    ) -> Result<(), Problem> {
        match self.0.insert((port, protocol), index) {
            Some(first) => Err(Problem::DuplicatePort {
                port,
                protocol,
                first: format!("ports[{first}]"),
            }),
            None => Ok(()),
        }
    }
}

/// A backend address appears once per service; its weight says how much traffic it gets.
#[derive(Default)]
pub(crate) struct UniqueBackends(HashMap<Ipv4Addr, usize>);

impl UniqueBackends {
    pub(crate) fn insert(&mut self, index: usize, address: Ipv4Addr) -> Result<(), Problem> {
        match self.0.insert(address, index) {
            Some(first) => Err(Problem::DuplicateBackend {
                address,
                first: format!("backends[{first}]"),
            }),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
pub(crate) struct UniquePermissions(HashMap<Permission, usize>);

impl UniquePermissions {
    pub(crate) fn insert(&mut self, index: usize, permission: Permission) -> Result<(), Problem> {
        match self.0.insert(permission, index) {
            Some(first) => Err(Problem::DuplicatePermission {
                verb: permission.verb,
                resource: permission.resource,
                first: format!("permissions[{first}]"),
            }),
            None => Ok(()),
        }
    }
}
