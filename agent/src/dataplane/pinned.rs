//! What an earlier run left pinned: checked before it is reused, collected
//! when no interface is served by it any more, removed by `down`. Pins
//! outlive the agent on purpose (see [`Dataplane`](super::Dataplane)), so
//! nothing else would ever clean them up.

use std::{
    fs, io,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use aya::maps::MapData;
use sluice_common::{
    layout::{LAYOUT_VERSION, map},
    types::{AgentMeta, IfaceMeta, name_str},
};
use tracing::warn;

use super::DataplaneError;
use crate::{
    netdev, objects,
    pins::{LinkPin, PinDir},
    sys,
};

/// Unpinning the last reference to a link detaches it.
pub(super) fn remove_link(pin: &LinkPin) -> Result<(), DataplaneError> {
    match fs::remove_file(&pin.path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataplaneError::Pin {
            op: "removing",
            path: pin.path.clone(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// What [`prepare`] found in the pin directory.
#[derive(Debug, PartialEq, Eq)]
pub enum Prepared {
    /// Nothing pinned: a new data plane.
    Fresh,
    /// A live data plane of an earlier run: reuse it (established flows survive).
    Reuse,
    /// Pins of interfaces that no longer exist were removed; starting fresh.
    Cleaned,
}

/// Checks an existing pin directory before it is reused: the layout must be
/// this agent's, and it must still serve live interfaces. Links whose interface
/// is gone are removed; a directory with no live link left is removed whole
/// (its maps describe interfaces that no longer exist), never silently reused.
pub fn prepare(pins: &PinDir) -> Result<Prepared, DataplaneError> {
    if !pins.exists() {
        return Ok(Prepared::Fresh);
    }
    let live = live_links(pins)?;
    if live == 0 {
        warn!(dir = %pins.path().display(), "pinned data plane serves no live interface; removing it");
        pins.remove_all().map_err(|source| DataplaneError::Pin {
            op: "removing",
            path: pins.path().to_path_buf(),
            source,
        })?;
        return Ok(Prepared::Cleaned);
    }
    check_layout(pins)?;
    Ok(Prepared::Reuse)
}

/// Removes links whose interface is gone (or was replaced: same index, other
/// name) and returns how many live ones remain.
fn live_links(pins: &PinDir) -> Result<usize, DataplaneError> {
    let recorded = recorded_interfaces(pins);
    let mut live = 0;
    for pin in pins.link_pins().map_err(|source| DataplaneError::Pin {
        op: "listing",
        path: pins.links(),
        source,
    })? {
        let alive = link_is_live(&pin, &recorded);
        if alive {
            live += 1;
        } else {
            warn!(link = %pin.path.display(), "removing a pinned link whose interface is gone");
            remove_link(&pin)?;
        }
    }
    Ok(live)
}

fn link_is_live(pin: &LinkPin, recorded: &[IfaceMeta]) -> bool {
    let Ok(target) = sys::pinned_link_target(&pin.path) else {
        return false;
    };
    if target.ifindex == 0 || target.ifindex != pin.ifindex {
        return false;
    }
    // The index must still name the interface it was attached to.
    let recorded_name = recorded
        .iter()
        .find(|m| m.ifindex == pin.ifindex)
        .map(|m| name_str(&m.name).to_string());
    match (netdev::interface_by_index(pin.ifindex), recorded_name) {
        (Ok(now), Some(then)) => now.name == then,
        (Ok(_), None) => true,
        (Err(_), _) => false,
    }
}

fn recorded_interfaces(pins: &PinDir) -> Vec<IfaceMeta> {
    let Ok(data) = MapData::from_pin(pins.map(map::IFACE_META)) else {
        return Vec::new();
    };
    let Ok(array) = aya::maps::Array::<MapData, IfaceMeta>::try_from(aya::maps::Map::Array(data))
    else {
        return Vec::new();
    };
    array
        .iter()
        .filter_map(Result::ok)
        .filter(|m| m.ifindex != 0)
        .collect()
}

/// The layout version a pinned data plane records, if it can be read.
/// `AGENT_META` keeps its shape across versions so that this always can.
pub fn pinned_layout_version(pins: &PinDir) -> Option<u32> {
    let data = MapData::from_pin(pins.map(map::AGENT_META)).ok()?;
    let array =
        aya::maps::Array::<MapData, AgentMeta>::try_from(aya::maps::Map::Array(data)).ok()?;
    array.get(&0, 0).ok().map(|meta| meta.layout_version)
}

/// Pinned maps must be those this agent's programs were built for.
fn check_layout(pins: &PinDir) -> Result<(), DataplaneError> {
    if let Some(found) = pinned_layout_version(pins)
        && found != LAYOUT_VERSION
    {
        return Err(DataplaneError::LayoutVersion {
            dir: pins.path().to_path_buf(),
            found,
            expected: LAYOUT_VERSION,
        });
    }
    let object = aya_obj::Object::parse(objects::DATAPLANE).map_err(DataplaneError::Object)?;
    for name in map::PINNED {
        let path = pins.map(name);
        let Some(def) = object.maps.get(name) else {
            continue;
        };
        let pinned = match MapData::from_pin(&path) {
            Ok(data) => data.info().map_err(|source| DataplaneError::MapInfo {
                path: path.clone(),
                source,
            })?,
            // Missing pins are created at load.
            Err(_) => continue,
        };
        let pinned_type = pinned.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        for (what, pinned, expected) in [
            ("type", pinned_type, def.map_type()),
            ("key size", pinned.key_size(), def.key_size()),
            ("value size", pinned.value_size(), def.value_size()),
        ] {
            if pinned != expected {
                return Err(DataplaneError::MapMismatch {
                    path,
                    what,
                    pinned,
                    expected,
                });
            }
        }
    }
    Ok(())
}

/// Removes pin directories of other namespaces that serve no live interface
/// and are older than `min_age` (younger ones may belong to an agent that is
/// starting right now and has not attached yet).
pub fn collect_garbage(pins: &PinDir, min_age: Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(siblings) = pins.siblings() else {
        return removed;
    };
    for other in siblings {
        let old_enough = fs::metadata(other.path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age >= min_age);
        if !old_enough {
            continue;
        }
        let any_live = other
            .link_pins()
            .unwrap_or_default()
            .iter()
            .any(|pin| sys::pinned_link_target(&pin.path).is_ok_and(|t| t.ifindex != 0));
        if !any_live && other.remove_all().is_ok() {
            removed.push(other.path().to_path_buf());
        }
    }
    removed
}

/// `sluice-agent down`: detaches every link and unpins every map of this
/// namespace's data plane. Returns whether there was anything to remove.
pub fn down(pins: &PinDir) -> Result<bool, DataplaneError> {
    if !pins.exists() {
        return Ok(false);
    }
    for pin in pins.link_pins().map_err(|source| DataplaneError::Pin {
        op: "listing",
        path: pins.links(),
        source,
    })? {
        remove_link(&pin)?;
    }
    pins.remove_all().map_err(|source| DataplaneError::Pin {
        op: "removing",
        path: pins.path().to_path_buf(),
        source,
    })?;
    Ok(true)
}
