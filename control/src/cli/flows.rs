//! `flows`: the cluster's flow log, one line per event (JSON: one object per
//! line), the recent events first, then as they come with `--follow`.

use sluice_model::observe::{self, FlowEvent, FlowFilter};
use sluice_model::view::ServiceRef;

use super::{
    Context,
    args::{FlowKind, FlowVerdict, FlowsArgs, Format},
    error::CliError,
    output::print,
};
use crate::clock;

impl From<FlowVerdict> for observe::FlowVerdict {
    fn from(verdict: FlowVerdict) -> Self {
        match verdict {
            FlowVerdict::Forwarded => Self::Forwarded,
            FlowVerdict::Denied => Self::Denied,
            FlowVerdict::Dropped => Self::Dropped,
        }
    }
}

impl From<FlowKind> for observe::FlowKind {
    fn from(kind: FlowKind) -> Self {
        match kind {
            FlowKind::New => Self::New,
            FlowKind::Close => Self::Close,
            FlowKind::Drop => Self::Drop,
        }
    }
}

pub async fn flows(cx: &Context, args: FlowsArgs) -> Result<(), CliError> {
    let service = args.service.map(|s| match s.split_once('/') {
        Some((namespace, name)) => ServiceRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        },
        None => ServiceRef {
            namespace: args.namespace.or_default().to_owned(),
            name: s,
        },
    });
    let filter = FlowFilter {
        verdict: args.verdict.map(Into::into),
        kind: args.kind.map(Into::into),
        service,
    };
    let client = cx.connect().await?;
    let mut stream = client.watch_flows(&filter, args.follow).await?;
    if matches!(cx.format, Format::Table) {
        print(&table_line(&[
            "TIME", "NODE", "KIND", "VERDICT", "CLIENT", "VIP", "SERVICE", "BACKEND", "PROTO",
            "REASON",
        ]))?;
    }
    while let Some(event) = client.next_flow(&mut stream).await? {
        let line = match cx.format {
            Format::Table => render_line(&event),
            Format::Yaml | Format::Json => format!("{}\n", to_json(&event)),
        };
        print(&line)?;
    }
    Ok(())
}

const WIDTHS: [usize; 9] = [29, 10, 5, 9, 21, 21, 20, 21, 5];

fn table_line(cells: &[&str; 10]) -> String {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(WIDTHS) {
        line.push_str(&format!("{cell:<width$} "));
    }
    line.push_str(cells[9]);
    line.push('\n');
    line
}

/// The event's fields as they are shown; absent ones empty.
struct Shown {
    time: String,
    service: String,
    backend: String,
    reason: String,
    counted_as: String,
}

fn shown(event: &FlowEvent) -> Shown {
    Shown {
        time: clock::rfc3339_ms(clock::from_unix_ms(event.observed_unix_ms)),
        service: event
            .service
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        backend: event.backend.map(|b| b.to_string()).unwrap_or_default(),
        reason: event.reason.to_string(),
        counted_as: event.counted_as.to_string(),
    }
}

/// One table row; the last column says why (a drop's reason, a close's
/// flag) and what counted it under network policy.
fn render_line(event: &FlowEvent) -> String {
    let s = shown(event);
    let why = match (s.reason.as_str(), s.counted_as.as_str()) {
        ("", counted) => counted.to_owned(),
        (reason, "") => reason.to_owned(),
        (reason, counted) => format!("{reason} ({counted})"),
    };
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    table_line(&[
        &s.time,
        &event.node,
        event.kind.as_str(),
        event.verdict.as_str(),
        &event.client.to_string(),
        &event.vip.to_string(),
        &dash(&s.service),
        &dash(&s.backend),
        event.protocol.as_str(),
        &why,
    ])
}

fn to_json(event: &FlowEvent) -> serde_json::Value {
    let s = shown(event);
    serde_json::json!({
        "time": s.time,
        "node": event.node,
        "kind": event.kind.as_str(),
        "verdict": event.verdict.as_str(),
        "reason": s.reason,
        "client": event.client.to_string(),
        "vip": event.vip.to_string(),
        "service": s.service,
        "backend": s.backend,
        "protocol": event.protocol.as_str(),
        "countedAs": s.counted_as,
    })
}

#[cfg(test)]
mod tests {
    use sluice_model::Protocol;
    use sluice_model::observe::{DropReason, FlowReason};
    use sluice_model::policy::compiled::{LabelSet, Slot};

    use super::*;

    fn denied() -> FlowEvent {
        FlowEvent {
            node: "node-2".to_owned(),
            observed_unix_ms: 1_764_504_000_123,
            kind: observe::FlowKind::Drop,
            verdict: observe::FlowVerdict::Denied,
            reason: FlowReason::Drop(DropReason::Policy),
            client: "198.18.2.2:40000".parse().expect("addr"),
            vip: "198.18.0.10:80".parse().expect("addr"),
            service: Some(ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
            }),
            backend: Some("198.19.0.2:8080".parse().expect("addr")),
            protocol: Protocol::Tcp,
            counted_as: Slot::DeniedTo(LabelSet {
                namespace: "shop".into(),
                labels: [("app".to_owned(), "web".to_owned())].into(),
            }),
        }
    }

    #[test]
    fn a_row_names_the_flow_and_why_it_ended_where_it_did() {
        let row = render_line(&denied());
        for part in [
            "node-2",
            "drop",
            "denied",
            "198.18.2.2:40000",
            "198.18.0.10:80",
            "shop/web",
            "TCP",
            "drop_policy (denied to shop:{app=web})",
        ] {
            assert!(row.contains(part), "{part:?} missing from {row:?}");
        }
        let opened = FlowEvent {
            verdict: observe::FlowVerdict::Forwarded,
            kind: observe::FlowKind::New,
            reason: FlowReason::None,
            counted_as: Slot::Unused,
            backend: None,
            ..denied()
        };
        let row = render_line(&opened);
        assert!(
            row.split_whitespace().any(|cell| cell == "-"),
            "no backend shows as -: {row:?}"
        );
    }

    #[test]
    fn json_carries_every_field_under_its_api_name() {
        let value = to_json(&denied());
        assert_eq!(value["kind"], "drop");
        assert_eq!(value["vip"], "198.18.0.10:80");
        assert_eq!(value["service"], "shop/web");
        assert_eq!(value["countedAs"], "denied to shop:{app=web}");
        assert_eq!(value["protocol"], "TCP");
        assert_eq!(value["time"], "2025-11-30T12:00:00.123Z");
    }
}
