//! `rollout`: moves a service's new flows between backend versions.
//!
//! `--to v2 --percent 1` gives the backends labelled `version: v2` exactly 1% of
//! new flows and the other backends the rest; `--percent 100` completes a
//! blue-green switch; `--undo` sends every new flow back to the other versions
//! at once. Established flows stay where they are. It is a read-modify-write of
//! the service's `rollout` field, sent with the version just read: a concurrent
//! change fails with a conflict rather than being overwritten.

use std::collections::BTreeSet;

use sluice_api::v1;
use sluice_model::traffic::Rollout;
use sluice_model::{Object, ObjectKind, ServiceSpec, VERSION_LABEL};

use super::Context;
use super::args::{Format, RolloutArgs};
use super::client::Client;
use super::error::CliError;
use super::model::object_path;
use super::output::{json, print, yaml};

pub async fn rollout(cx: &Context, args: RolloutArgs) -> Result<(), CliError> {
    let RolloutArgs {
        name,
        namespace,
        to,
        percent,
        undo,
    } = args;
    let namespace = namespace.or_default();
    let client = cx.connect().await?;
    let stored = client.get(ObjectKind::Service, namespace, &name).await?;
    let Object::Service(mut service) = stored.object else {
        return Err(CliError::IncompleteResponse { what: "service" });
    };
    let path = object_path(ObjectKind::Service, namespace, &name);
    let fail = |problem: String| CliError::Rollout {
        service: path.clone(),
        problem,
    };

    let rollout = if undo {
        let Some(current) = service.traffic.rollout.take() else {
            return Err(fail("has no rollout to undo".to_owned()));
        };
        Rollout {
            percent: 0,
            ..current
        }
    } else {
        // clap requires both without --undo.
        let (Some(to), Some(percent)) = (to, percent) else {
            return Err(fail(
                "give --to VERSION and --percent N, or --undo".to_owned(),
            ));
        };
        sluice_model::traffic::validate_version(&to)
            .map_err(|problem| fail(format!("--to: {problem}")))?;
        let versions = versions(&client, &service).await?;
        if percent > 0 && !versions.contains(to.as_str()) {
            let known = if versions.is_empty() {
                "none carries a version".to_owned()
            } else {
                format!(
                    "versions present: {}",
                    versions.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(fail(format!(
                "no backend carries version {to:?} ({known}); label its endpoints \
                 `{VERSION_LABEL}: {to}` or set `version` on its backends first"
            )));
        }
        Rollout { to, percent }
    };
    service.traffic.rollout = Some(rollout.clone());

    let mut message = v1::Object::from(&Object::Service(service.clone()));
    if let Some(v1::object::Kind::Service(s)) = &mut message.kind {
        s.meta.get_or_insert_default().resource_version = stored.version;
    }
    client.apply(vec![message], false).await?;

    let Rollout { to, percent } = &rollout;
    let text = match cx.format {
        Format::Table if undo => {
            format!("{path} rolled back: no new flows to version {to}, all to the other versions\n")
        }
        Format::Table => format!(
            "{path}: {percent}% of new flows to version {to}, {}% to the other versions\n",
            100 - percent
        ),
        Format::Yaml => yaml(&rollout)?,
        Format::Json => json(&rollout)?,
    };
    print(&text)
}

/// The versions among the service's serving backends.
async fn versions(client: &Client, service: &ServiceSpec) -> Result<BTreeSet<String>, CliError> {
    if service.selector.is_empty() {
        return Ok(service
            .backends
            .iter()
            .filter(|b| !b.draining)
            .filter_map(|b| b.version.clone())
            .collect());
    }
    let endpoints = client
        .list(ObjectKind::Endpoint, Some(&service.namespace))
        .await?;
    Ok(endpoints
        .into_iter()
        .filter_map(|stored| match stored.object {
            Object::Endpoint(e) => Some(e),
            _ => None,
        })
        .filter(|e| e.ready && !e.draining)
        .filter(|e| {
            service
                .selector
                .iter()
                .all(|(k, v)| e.labels.get(k) == Some(v))
        })
        .filter_map(|e| e.labels.get(VERSION_LABEL).cloned())
        .collect())
}
