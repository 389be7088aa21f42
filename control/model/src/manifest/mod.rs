//! Manifests: the YAML files admins write, read in one of two modes.
//!
//! A manifest is a stream of YAML documents separated by `---`; each non-empty document
//! describes one object.
//!
//! * [`parse`] / [`load`] (`sluice-agent run --manifest FILE`, the standalone agent):
//!   only `kind: Service`, each with a `vip` and static `backends`, because there is no
//!   control service to allocate VIPs or resolve selectors. Returns a [`Manifest`].
//! * [`parse_objects`] / [`load_objects`] (`sluicectl apply -f FILE`, the control
//!   service): Service, Endpoint and Grant; a Service's `vip` is optional (the control
//!   service allocates one) and it may select Endpoints by label instead of listing
//!   backends. Returns [`Object`]s.
//!
//! ```yaml
//! kind: Service
//! namespace: shop                # optional, "default" when absent; DNS-1123 label
//! name: web                      # DNS-1035 label, unique per kind and namespace
//! labels: { tier: frontend }     # optional, on every kind; see `rules` for the syntax
//! vip: 198.18.0.10               # required by the agent; optional for the control service
//! ports:                         # 1..=64 entries, (port, protocol) unique in the service
//!   - { port: 80, protocol: TCP, targetPort: 8080 }
//!   - { port: 53, protocol: UDP }              # targetPort defaults to port
//! algorithm: round-robin         # optional, see `Algorithm`
//! # maglevTableSize: 16381       # algorithm maglev only: lookup table size, a prime ≤ 65521
//! backends:                      # optional; none means the data plane drops and counts
//!   - { address: 198.19.1.2, weight: 3 }       # weight 1..=10000, defaults to 1
//!   - { address: 198.19.1.3, version: v2, draining: true }  # both optional
//! # selector: { app: web }       # control service only; instead of backends, not with
//! # healthCheck, drainTimeoutSeconds, rollout, sessionAffinity, topologyAware: see `traffic`
//! ---
//! kind: Endpoint                 # control service only
//! namespace: shop
//! name: web-1
//! labels: { app: web }           # what service selectors match
//! address: 198.19.1.2            # same rules as a backend address
//! node: node-1                   # optional, DNS-1123 subdomain
//! zone: eu-west-1a               # optional
//! weight: 1                      # optional, 1..=10000, defaults to 1
//! ready: true                    # optional, defaults to true
//! draining: false                # optional: true takes it out of rotation, flows drain
//! ---
//! kind: Grant                    # control service only
//! namespace: shop                # where the grant itself lives
//! name: alice-edits-shop
//! subject: { user: alice }       # or { group: dev }, exactly one
//! role: editor                   # viewer | editor | admin | custom
//! scope: shop                    # a namespace, or "*" (quoted) for all of them and the
//!                                # cluster-scoped kinds
//! permissions:                   # required with role custom, forbidden otherwise
//!   - { verb: get, resource: services }   # verbs: get list watch create update delete *
//!                                         # resources: services endpoints grants nodes
//!                                         #            tokens users *
//! ```
//!
//! Both modes return either every object, valid, or the first error found, in document
//! order; nothing is half-applied. Every error names the file, the document (1-based,
//! counting empty documents, as an editor user would count them), the object
//! (`Service "shop/web"`) once its kind, name and namespace are known, the line and
//! column, the field path (`backends[1].weight`) and the offending value.
//!
//! How it works, in three steps:
//! 1. serde-saphyr reads every document into a small tree (`yaml::Node`) in which each
//!    node keeps its line and column (through [`serde_saphyr::Spanned`]). YAML itself
//!    (syntax, duplicate keys, anchors) is checked here. We walk a tree instead of
//!    deriving `Deserialize` for the manifest types because serde's derived errors carry
//!    neither the field path nor, for values we validate ourselves, a position.
//! 2. Each document is validated into an [`Object`] (`document::parse_document`); the
//!    value rules live in [`crate::rules`], shared with API messages ([`crate::wire`]) so the
//!    control service rejects exactly what a manifest would.
//! 3. Rules that span documents are checked here: an object (kind, namespace, name) is
//!    defined once; two services never share an explicit (VIP, port, protocol), in any
//!    namespaces, since VIPs are global.
//!
//! serde-saphyr skips empty documents and does not say which document an error is in, so
//! a first pass with its parser, granit-parser, records the line where each document
//! starts; a line then maps to its document number.
//!
//! Conventions, chosen to keep a manifest unambiguous:
//! * A key given as `null` (`backends:` with nothing after it) counts as absent, so an
//!   optional field takes its default and a required one is reported missing.
//! * `kind` and `protocol` are case-sensitive: exactly `Service`, `TCP`, `UDP`, as in
//!   Kubernetes. A silent default could put a UDP service on TCP.
//! * Values keep their YAML types: `port: "80"` is a string, not a port, and a label
//!   value `version: 2` is an integer, not the string "2".

mod document;
mod error;
mod policy;
mod traffic;
mod yaml;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::Ipv4Addr;
use std::path::Path;

pub use error::{ControlOnly, ManifestError, Mode, Position};

use crate::kind::{Object, ObjectKind, ObjectRef};
use crate::service::{Protocol, Service, ServiceSpec};
use document::{Parsed, parse_document};
use yaml::{Cx, read_documents};

/// Every service of a standalone agent's manifest, in document order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub services: Vec<Service>,
}

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

/// Reads `path` and parses it as a standalone agent's manifest; messages name the file
/// as given.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    parse(&path.display().to_string(), &read(path)?)
}

/// Parses and validates a standalone agent's manifest (Services with a VIP and static
/// backends); `source` names the file in error messages.
pub fn parse(source: &str, text: &str) -> Result<Manifest, ManifestError> {
    let documents = read_documents(source, text)?;
    let services = validate_documents(source, &documents, Mode::Agent)?
        .into_iter()
        .map(|(document, parsed)| standalone(source, document, parsed))
        .collect::<Result<_, _>>()?;
    Ok(Manifest { services })
}

/// Reads `path` and parses it as a control-mode manifest; messages name the file as
/// given.
pub fn load_objects(path: &Path) -> Result<Vec<Object>, ManifestError> {
    parse_objects(&path.display().to_string(), &read(path)?)
}

/// Parses and validates a control-mode manifest (`sluicectl apply -f`): every object, in
/// document order. `source` names the file in error messages.
pub fn parse_objects(source: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let documents = read_documents(source, text)?;
    Ok(validate_documents(source, &documents, Mode::Control)?
        .into_iter()
        .map(|(_, parsed)| parsed.object)
        .collect())
}

fn read(path: &Path) -> Result<String, ManifestError> {
    std::fs::read_to_string(path).map_err(|cause| ManifestError::Read {
        path: path.to_owned(),
        cause,
    })
}

/// Validates each document, then the rules that span documents, one document at a time
/// so that the first error in document order is the one reported.
fn validate_documents<'n>(
    source: &str,
    documents: &'n [(usize, yaml::Node)],
    mode: Mode,
) -> Result<Vec<(usize, Parsed<'n>)>, ManifestError> {
    let mut objects = Vec::with_capacity(documents.len());
    let mut defined: HashMap<ObjectRef, usize> = HashMap::new();
    let mut listeners: HashMap<(Ipv4Addr, u16, Protocol), (String, usize)> = HashMap::new();
    for &(document, ref root) in documents {
        let cx = Cx {
            file: source,
            document,
            object: None,
        };
        let parsed = parse_document(cx, root, mode)?;
        let id = parsed.object.object_ref();
        let cx = Cx {
            object: Some(&id),
            ..cx
        };

        match defined.entry(id.clone()) {
            Entry::Occupied(first) => {
                let at = cx.at(parsed.name_node);
                let first_document = *first.get();
                return Err(match id.kind {
                    ObjectKind::Service => ManifestError::DuplicateService {
                        at,
                        namespace: id.namespace,
                        name: id.name,
                        first_document,
                    },
                    ObjectKind::Endpoint | ObjectKind::Grant | ObjectKind::NetworkPolicy => {
                        ManifestError::DuplicateObject {
                            at,
                            object: id,
                            first_document,
                        }
                    }
                });
            }
            Entry::Vacant(slot) => {
                slot.insert(document);
            }
        }
        // A service without a VIP gets a fresh one from the control service, so it
        // cannot clash here.
        if let Object::Service(ServiceSpec {
            vip: Some(vip),
            ports,
            ..
        }) = &parsed.object
        {
            for (i, (port, node)) in ports.iter().zip(&parsed.port_nodes).enumerate() {
                // Ports are unique within the service (checked in parse_ports), so a
                // clash here is always with an earlier service.
                let key = (*vip, port.port, port.protocol);
                if let Some((other_service, other_document)) = listeners.get(&key) {
                    return Err(ManifestError::ListenerConflict {
                        at: cx.at(node),
                        field: format!("ports[{i}]"),
                        vip: *vip,
                        port: port.port,
                        protocol: port.protocol,
                        other_service: other_service.clone(),
                        other_document: *other_document,
                    });
                }
                listeners.insert(key, (format!("{}/{}", id.namespace, id.name), document));
            }
        }
        objects.push((document, parsed));
    }
    Ok(objects)
}

/// A standalone agent's service. `parse_document` has enforced agent mode already; the
/// errors here restate those rules rather than assume them.
fn standalone(source: &str, document: usize, parsed: Parsed<'_>) -> Result<Service, ManifestError> {
    let id = parsed.object.object_ref();
    let cx = Cx {
        file: source,
        document,
        object: Some(&id),
    };
    let Object::Service(service) = parsed.object else {
        return Err(ManifestError::NeedsControlService {
            at: cx.at(parsed.kind_node),
            field: "kind".to_owned(),
            feature: ControlOnly::Kind { kind: id.kind },
        });
    };
    if !service.selector.is_empty() {
        return Err(ManifestError::NeedsControlService {
            at: cx.at(parsed.root),
            field: "selector".to_owned(),
            feature: ControlOnly::Selector,
        });
    }
    let Some(vip) = service.vip else {
        return Err(ManifestError::MissingField {
            at: cx.at(parsed.root),
            field: "vip".to_owned(),
        });
    };
    Ok(service.with_vip(vip))
}

#[cfg(test)]
mod agent_tests;
#[cfg(test)]
mod control_tests;
#[cfg(test)]
mod defaults_tests;
