//! How the state is written in the store, one edge of the domain model:
//! objects as their API messages (protobuf), nodes as JSON records, the view
//! history as API view updates. Values read back are validated as the API
//! validates what it is sent; one that no longer is counts as corrupt.

use std::time::SystemTime;

use prost::Message as _;
use serde::{Deserialize, Serialize};
use sluice_api::v1;
use sluice_model::view::ViewUpdate;
use sluice_model::{Kind, Node};

use super::tables;
use crate::store::{Key, StoreError};

fn corrupt(key: &Key, reason: &'static str) -> StoreError {
    StoreError::Corrupt {
        key: key.clone(),
        reason,
    }
}

pub fn encode_object<K: Kind>(object: &K) -> Vec<u8> {
    object.to_wire().encode_to_vec()
}

pub fn decode_object<K: Kind>(key: &Key, bytes: &[u8]) -> Result<K, StoreError> {
    let wire = K::Wire::decode(bytes).map_err(|_| corrupt(key, "undecodable value"))?;
    K::from_wire(wire).map_err(|_| corrupt(key, "an object that is not valid"))
}

/// A joined node as stored (JSON, RFC 3339 times).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct NodeRecord {
    zone: String,
    serials: Vec<String>,
    certificate_expires: String,
    joined_at: String,
}

pub fn node_key(name: &str) -> Key {
    Key::cluster(tables::NODE, name)
}

pub fn encode_node(node: &Node) -> Vec<u8> {
    let Node {
        name: _,
        zone,
        serials,
        certificate_expires,
        joined_at,
    } = node;
    let record = NodeRecord {
        zone: zone.clone().unwrap_or_default(),
        serials: serials.clone(),
        certificate_expires: super::rfc3339(*certificate_expires),
        joined_at: super::rfc3339(*joined_at),
    };
    // A struct of strings always serializes.
    serde_json::to_vec(&record).unwrap_or_default()
}

pub fn decode_node(key: &Key, bytes: &[u8]) -> Result<Node, StoreError> {
    let record: NodeRecord =
        serde_json::from_slice(bytes).map_err(|_| corrupt(key, "undecodable value"))?;
    let time = |text: &str| -> Result<SystemTime, StoreError> {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .map(SystemTime::from)
            .map_err(|_| corrupt(key, "a time that is not RFC 3339"))
    };
    Ok(Node {
        name: key.name.clone(),
        zone: (!record.zone.is_empty()).then_some(record.zone),
        serials: record.serials,
        certificate_expires: time(&record.certificate_expires)?,
        joined_at: time(&record.joined_at)?,
    })
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct ViewMeta {
    version: u64,
}

pub fn view_meta_key() -> Key {
    Key::cluster(tables::VIEW, "current")
}

pub fn encode_view_meta(version: u64) -> Vec<u8> {
    serde_json::to_vec(&ViewMeta { version }).unwrap_or_default()
}

pub fn decode_view_meta(key: &Key, bytes: &[u8]) -> Result<u64, StoreError> {
    let meta: ViewMeta =
        serde_json::from_slice(bytes).map_err(|_| corrupt(key, "undecodable value"))?;
    Ok(meta.version)
}

pub fn log_key(version: u64) -> Key {
    // Zero-padded so that names sort as numbers.
    Key::cluster(tables::VIEW_LOG, format!("{version:020}"))
}

/// An update and the version it applies to.
pub fn encode_log(from: u64, update: &ViewUpdate) -> Vec<u8> {
    let mut bytes = from.to_le_bytes().to_vec();
    bytes.extend(v1::ViewUpdate::from(update).encode_to_vec());
    bytes
}

pub fn decode_log(key: &Key, bytes: &[u8]) -> Result<(u64, ViewUpdate), StoreError> {
    let undecodable = || corrupt(key, "undecodable value");
    let (from, rest) = bytes.split_at_checked(8).ok_or_else(undecodable)?;
    let from = u64::from_le_bytes(from.try_into().map_err(|_| undecodable())?);
    let message = v1::ViewUpdate::decode(rest).map_err(|_| undecodable())?;
    let update = ViewUpdate::try_from(message).map_err(|_| corrupt(key, "an invalid view"))?;
    Ok((from, update))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn nodes_keep_their_times_to_the_second() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_000_000);
        let node = Node {
            name: "node-1".into(),
            zone: Some("zone-a".into()),
            serials: vec!["0a".into(), "0b".into()],
            certificate_expires: at + Duration::from_secs(86_400),
            joined_at: at,
        };
        let key = node_key("node-1");
        assert_eq!(
            decode_node(&key, &encode_node(&node)).ok(),
            Some(node.clone())
        );
        let zoneless = Node { zone: None, ..node };
        assert_eq!(
            decode_node(&key, &encode_node(&zoneless)).ok(),
            Some(zoneless)
        );
        assert!(decode_node(&key, b"{}").is_err());
    }
}
