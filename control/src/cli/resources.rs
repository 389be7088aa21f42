//! `apply`, `get`, `describe` and `delete`: services, endpoints, grants (and nodes, to
//! read).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use sluice_api::v1;
use sluice_model::manifest;
use sluice_model::{Object, ObjectKind};
use tonic::Code;

use super::Context;
use super::args::{ApplyArgs, DeleteArgs, DescribeArgs, Format, GetArgs};
use super::error::CliError;
use super::model::{Stored, object_path};
use super::output::{json, print, yaml, yaml_documents};
use super::tables;

/// Every object of every file, in order; the first manifest error stops everything.
fn load_all(files: &[PathBuf]) -> Result<Vec<Object>, CliError> {
    let mut objects = Vec::new();
    for file in files {
        objects.extend(manifest::load_objects(file)?);
    }
    Ok(objects)
}

/// The version an update must still match (optimistic concurrency); 0 creates.
fn set_version(object: &mut v1::Object, version: u64) {
    let meta = match &mut object.kind {
        Some(v1::object::Kind::Service(s)) => &mut s.meta,
        Some(v1::object::Kind::Endpoint(e)) => &mut e.meta,
        Some(v1::object::Kind::Grant(g)) => &mut g.meta,
        Some(v1::object::Kind::NetworkPolicy(p)) => &mut p.meta,
        Some(v1::object::Kind::Node(n)) => &mut n.meta,
        None => return,
    };
    meta.get_or_insert_default().resource_version = version;
}

/// Up to this many objects of one kind and namespace are read one by one.
const GET_EACH_UP_TO: usize = 32;

/// The stored version of each object `objects` names (absent: not stored).
/// One `List` per kind and namespace rather than a `Get` per object, so that
/// applying thousands of objects does not cost thousands of round trips; a
/// caller who may get but not list falls back to `Get`s.
async fn current_versions<'a>(
    client: &super::client::Client,
    objects: &'a [Object],
) -> Result<HashMap<(ObjectKind, &'a str, &'a str), u64>, CliError> {
    let mut groups: BTreeMap<(ObjectKind, &str), Vec<&Object>> = BTreeMap::new();
    for object in objects {
        groups
            .entry((object.kind(), object.namespace()))
            .or_default()
            .push(object);
    }
    let mut versions = HashMap::new();
    for ((kind, namespace), members) in groups {
        // A few objects: a Get each beats listing a large namespace.
        let listed = if members.len() > GET_EACH_UP_TO {
            Some(client.list(kind, Some(namespace)).await)
        } else {
            None
        };
        match listed {
            Some(Ok(stored)) => {
                let wanted: HashMap<&str, &Object> =
                    members.iter().map(|o| (o.name(), *o)).collect();
                for s in stored {
                    if let Some(object) = wanted.get(s.object.name()) {
                        versions.insert((kind, namespace, object.name()), s.version);
                    }
                }
            }
            Some(Err(e)) if e.code() != Some(Code::PermissionDenied) => return Err(e),
            // Not listed, or not allowed to list.
            _ => {
                for object in members {
                    match client.get(kind, namespace, object.name()).await {
                        Ok(stored) => {
                            versions.insert((kind, namespace, object.name()), stored.version);
                        }
                        Err(e) if e.code() == Some(Code::NotFound) => {}
                        // A caller who may update but not read sends no
                        // version: the server still checks `update`, without
                        // the concurrency check.
                        Err(e) if e.code() == Some(Code::PermissionDenied) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
    Ok(versions)
}

pub async fn apply(cx: &Context, args: ApplyArgs) -> Result<(), CliError> {
    let ApplyArgs { files, dry_run } = args;
    let objects = load_all(&files)?;
    let client = cx.connect().await?;

    let versions = current_versions(&client, &objects).await?;
    let mut messages = Vec::with_capacity(objects.len());
    for object in &objects {
        let key = (object.kind(), object.namespace(), object.name());
        let version = versions.get(&key).copied().unwrap_or(0);
        let mut message = v1::Object::from(object);
        set_version(&mut message, version);
        messages.push(message);
    }
    let applied = client.apply(messages, dry_run).await?;

    let text = match cx.format {
        Format::Table => {
            let suffix = if dry_run { " (dry run)" } else { "" };
            applied
                .iter()
                .map(|a| {
                    let object = &a.stored.object;
                    let path = object_path(object.kind(), object.namespace(), object.name());
                    format!("{path} {}{suffix}\n", a.outcome.as_str())
                })
                .collect()
        }
        Format::Yaml => {
            let stored: Vec<&Object> = applied.iter().map(|a| &a.stored.object).collect();
            yaml_documents(&stored)?
        }
        Format::Json => {
            let stored: Vec<&Object> = applied.iter().map(|a| &a.stored.object).collect();
            json(&stored)?
        }
    };
    print(&text)
}

pub async fn get(cx: &Context, args: GetArgs) -> Result<(), CliError> {
    let GetArgs {
        kind,
        name,
        namespace,
        all_namespaces,
    } = args;
    let client = cx.connect().await?;
    let Some(object_kind) = kind.object_kind() else {
        let nodes = match &name {
            Some(name) => vec![client.get_node(name).await?],
            None => client.list_nodes().await?,
        };
        let text = match (cx.format, &name, nodes.as_slice()) {
            (Format::Table, None, []) => {
                eprintln!("No nodes have joined.");
                String::new()
            }
            (Format::Table, ..) => tables::nodes(&nodes, SystemTime::now()).render(),
            (Format::Yaml, Some(_), [node]) => yaml(node)?,
            (Format::Yaml, ..) => yaml_documents(&nodes)?,
            (Format::Json, Some(_), [node]) => json(node)?,
            (Format::Json, ..) => json(&nodes)?,
        };
        return print(&text);
    };

    let namespace = namespace.or_default();
    let items = match &name {
        Some(name) => vec![client.get(object_kind, namespace, name).await?],
        None => {
            let scope = (!all_namespaces).then_some(namespace);
            client.list(object_kind, scope).await?
        }
    };
    let objects: Vec<&Object> = items.iter().map(|s: &Stored| &s.object).collect();
    let text = match (cx.format, &name, objects.as_slice()) {
        (Format::Table, None, []) => {
            if all_namespaces {
                eprintln!("No {} found in the namespaces you may list.", kind.plural());
            } else {
                eprintln!("No {} found in namespace {namespace:?}.", kind.plural());
            }
            String::new()
        }
        (Format::Table, ..) => tables::objects(object_kind, &items).render(),
        (Format::Yaml, ..) => yaml_documents(&objects)?,
        (Format::Json, Some(_), [object]) => json(object)?,
        (Format::Json, ..) => json(&objects)?,
    };
    print(&text)
}

pub async fn describe(cx: &Context, args: DescribeArgs) -> Result<(), CliError> {
    let DescribeArgs {
        kind: _,
        name,
        namespace,
    } = args;
    let client = cx.connect().await?;
    let described = client
        .describe_service(namespace.or_default(), &name)
        .await?;
    let text = match cx.format {
        Format::Table => tables::describe(&described),
        Format::Yaml => yaml(&described)?,
        Format::Json => json(&described)?,
    };
    print(&text)
}

pub async fn delete(cx: &Context, args: DeleteArgs) -> Result<(), CliError> {
    let DeleteArgs {
        kind,
        name,
        files,
        namespace,
    } = args;
    if let (Some(kind), Some(name)) = (kind, name) {
        let kind = kind.into();
        let namespace = namespace.or_default();
        let client = cx.connect().await?;
        client.delete(kind, namespace, &name).await?;
        return print(&format!(
            "{} deleted\n",
            object_path(kind, namespace, &name)
        ));
    }

    let objects = load_all(&files)?;
    let client = cx.connect().await?;
    let mut failed = 0;
    for object in &objects {
        let path = object_path(object.kind(), object.namespace(), object.name());
        match client
            .delete(object.kind(), object.namespace(), object.name())
            .await
        {
            Ok(()) => print(&format!("{path} deleted\n"))?,
            Err(e) if e.code() == Some(Code::NotFound) => {
                print(&format!("{path} not found, skipped\n"))?;
            }
            Err(e) => {
                eprintln!(
                    "sluicectl: error: {path}: {}",
                    sluice_model::error_chain(&e)
                );
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(CliError::DeletesFailed {
            failed,
            total: objects.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use sluice_model::manifest::parse_objects;

    use super::*;
    use crate::cli::model::NodeInfo;

    /// Every kind, every optional field set or left out, and values YAML could
    /// mistake for other types (`"*"`, `"true"`, `"2"`, `"null"`, `"0x10"`).
    const MANIFEST: &str = "\
kind: Service
namespace: shop
name: web
labels: { tier: frontend, version: \"2\" }
vip: 198.18.0.10
ports:
  - { port: 80, protocol: TCP, targetPort: 8080 }
  - { port: 53, protocol: UDP }
algorithm: weighted-least-connections
selector: { app: web, canary: \"true\" }
---
kind: Service
name: db
ports: [{ port: 5432, protocol: TCP }]
backends: [{ address: 198.19.1.2 }, { address: 198.19.1.3, weight: 3 }]
---
kind: Service
name: empty
ports: [{ port: 9, protocol: UDP }]
---
kind: Endpoint
namespace: shop
name: web-1
labels: { app: web, canary: \"null\", hex: \"0x10\" }
address: 198.19.1.2
node: 10.0.0.1
zone: \"1\"
weight: 7
ready: false
---
kind: Endpoint
name: bare
address: 198.19.1.9
---
kind: Grant
namespace: shop
name: alice
subject: { user: alice }
role: editor
scope: shop
---
kind: Grant
name: readers
labels: { team: \"yes\" }
subject: { group: dev }
role: custom
scope: \"*\"
permissions: [{ verb: get, resource: services }, { verb: \"*\", resource: \"*\" }]
";

    #[test]
    fn printed_yaml_parses_back_to_the_same_objects() {
        let objects = parse_objects("in.yaml", MANIFEST).expect("valid manifest");
        assert_eq!(objects.len(), 7);
        let refs: Vec<&Object> = objects.iter().collect();
        let printed = yaml_documents(&refs).expect("serializes");
        let again = parse_objects("printed.yaml", &printed)
            .unwrap_or_else(|e| panic!("{e}\n--- printed:\n{printed}"));
        assert_eq!(again, objects, "printed:\n{printed}");

        // One document at a time, as `get KIND NAME -o yaml` prints them.
        for object in &objects {
            let printed = yaml_documents(&[object]).expect("serializes");
            let again = parse_objects("one.yaml", &printed).expect("parses");
            assert_eq!(again, std::slice::from_ref(object), "printed:\n{printed}");
        }
    }

    #[test]
    fn yaml_documents_carry_their_kind() {
        let objects = parse_objects(
            "in.yaml",
            "kind: Endpoint\nname: e\naddress: 198.19.1.2\n---\nkind: Grant\nname: g\n\
             subject: { user: bob }\nrole: viewer\nscope: default\n",
        )
        .expect("valid manifest");
        let refs: Vec<&Object> = objects.iter().collect();
        assert_eq!(
            yaml_documents(&refs).expect("serializes"),
            "\
kind: Endpoint
namespace: default
name: e
address: \"198.19.1.2\"
weight: 1
ready: true
---
kind: Grant
namespace: default
name: g
subject:
  user: bob
role: viewer
scope: default
"
        );
    }

    #[test]
    fn json_is_an_array_of_the_same_objects() {
        let objects = parse_objects(
            "in.yaml",
            "kind: Service\nname: s\nports: [{ port: 80, protocol: TCP }]\n",
        )
        .expect("valid manifest");
        let refs: Vec<&Object> = objects.iter().collect();
        let value: serde_json::Value =
            serde_json::from_str(&json(&refs).expect("serializes")).expect("JSON");
        assert_eq!(
            value,
            serde_json::json!([{
                "kind": "Service",
                "namespace": "default",
                "name": "s",
                "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 80 }],
                "algorithm": "round-robin",
            }])
        );
    }

    #[test]
    fn nodes_print_their_own_shape() {
        let node = NodeInfo::from(v1::Node {
            meta: Some(v1::ObjectMeta {
                name: "node-1".to_owned(),
                resource_version: 4,
                ..Default::default()
            }),
            zone: "eu-1a".to_owned(),
            certificate_serial: "0a".to_owned(),
            // 2025-01-02T00:00:00Z and 2025-01-01T00:00:00Z.
            certificate_expires_unix_ms: 1_735_776_000_000,
            joined_unix_ms: 1_735_689_600_000,
            status: Some(v1::NodeStatus {
                applied_version: 9,
                desired_version: 9,
                last_report_unix_ms: 0,
                connected: true,
                counters: vec![v1::FrontendCounters {
                    service: Some(v1::ObjectName {
                        namespace: "shop".to_owned(),
                        name: "web".to_owned(),
                    }),
                    vip: vec![198, 18, 0, 10],
                    port: 80,
                    protocol: v1::Protocol::Tcp.into(),
                    counters: Some(v1::TrafficCounters {
                        packets: 10,
                        bytes: 1000,
                        new_flows: 2,
                        active_connections: 1,
                    }),
                    backends: Vec::new(),
                }],
                policy_counters: Default::default(),
            }),
        });
        let value: serde_json::Value =
            serde_json::from_str(&json(&[node]).expect("serializes")).expect("JSON");
        assert_eq!(
            value,
            serde_json::json!([{
                "name": "node-1",
                "zone": "eu-1a",
                "connected": true,
                "appliedVersion": 9,
                "desiredVersion": 9,
                "joinedAt": "2025-01-01T00:00:00Z",
                "certificateSerial": "0a",
                "certificateExpires": "2025-01-02T00:00:00Z",
                "resourceVersion": 4,
                "traffic": [{
                    "service": "shop/web",
                    "vip": "198.18.0.10",
                    "port": 80,
                    "protocol": "TCP",
                    "packets": 10,
                    "bytes": 1000,
                    "newFlows": 2,
                    "activeConnections": 1,
                }],
            }])
        );
    }

    #[test]
    fn versions_go_into_the_message_meta() {
        let objects = parse_objects("in.yaml", "kind: Endpoint\nname: e\naddress: 198.19.1.2\n")
            .expect("valid manifest");
        let mut message = v1::Object::from(&objects[0]);
        set_version(&mut message, 12);
        let Some(v1::object::Kind::Endpoint(endpoint)) = message.kind else {
            panic!("an endpoint");
        };
        assert_eq!(endpoint.meta.map(|m| m.resource_version), Some(12));
    }
}
