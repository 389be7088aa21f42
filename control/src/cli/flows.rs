//! `flows`: the cluster's flow log, one line per event (JSON: one object per
//! line), the recent events first, then as they come with `--follow`.

use sluice_api::v1;

use super::{
    Context,
    args::{FlowsArgs, Format},
    error::CliError,
    output::print,
};

pub async fn flows(cx: &Context, args: FlowsArgs) -> Result<(), CliError> {
    let service = match args.service {
        Some(s) if s.contains('/') => s,
        Some(s) => format!("{}/{s}", args.namespace.or_default()),
        None => String::new(),
    };
    let request = v1::WatchFlowsRequest {
        verdict: args
            .verdict
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default(),
        follow: args.follow,
        service,
        kind: args.kind.map(|k| k.as_str().to_owned()).unwrap_or_default(),
    };
    let client = cx.connect().await?;
    let mut stream = client.watch_flows(request).await?;
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

fn protocol(event: &v1::FlowEvent) -> &'static str {
    v1::Protocol::try_from(event.protocol).map_or("?", |p| match p {
        v1::Protocol::Tcp => "TCP",
        v1::Protocol::Udp => "UDP",
        v1::Protocol::Unspecified => "?",
    })
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

/// One table row; the last column says why (a drop's reason, a close's
/// flag) and what counted it under network policy.
fn render_line(event: &v1::FlowEvent) -> String {
    let why = match (event.reason.as_str(), event.counted_as.as_str()) {
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
        &event.time,
        &event.node,
        &event.kind,
        &event.verdict,
        &event.client,
        &event.vip,
        &dash(&event.service),
        &dash(&event.backend),
        protocol(event),
        &why,
    ])
}

fn to_json(event: &v1::FlowEvent) -> serde_json::Value {
    serde_json::json!({
        "time": event.time,
        "node": event.node,
        "kind": event.kind,
        "verdict": event.verdict,
        "reason": event.reason,
        "client": event.client,
        "vip": event.vip,
        "service": event.service,
        "backend": event.backend,
        "protocol": protocol(event),
        "countedAs": event.counted_as,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied() -> v1::FlowEvent {
        v1::FlowEvent {
            time: "2026-11-30T12:00:00.123Z".to_owned(),
            node: "node-2".to_owned(),
            verdict: "denied".to_owned(),
            reason: "drop_policy".to_owned(),
            client: "198.18.2.2:40000".to_owned(),
            service: "shop/web".to_owned(),
            backend: "198.19.0.2:8080".to_owned(),
            protocol: v1::Protocol::Tcp as i32,
            counted_as: "denied to shop:{app=web}".to_owned(),
            kind: "drop".to_owned(),
            vip: "198.18.0.10:80".to_owned(),
            observed_unix_ms: 0,
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
        let opened = v1::FlowEvent {
            verdict: "forwarded".to_owned(),
            kind: "new".to_owned(),
            reason: String::new(),
            counted_as: String::new(),
            backend: String::new(),
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
    }
}
