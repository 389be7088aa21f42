use super::*;
use crate::policy::{EgressRule, IngressRule, PolicyTypes};
use crate::service::Protocol;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn endpoint(ns: &str, name: &str, address: &str, pairs: &[(&str, &str)]) -> Endpoint {
    Endpoint {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(pairs),
        address: address.parse().expect("test address"),
        node: None,
        zone: None,
        weight: 1,
        ready: true,
        draining: false,
    }
}

fn policy(
    ns: &str,
    name: &str,
    selector: &[(&str, &str)],
    ingress: Vec<IngressRule>,
) -> NetworkPolicy {
    NetworkPolicy {
        namespace: ns.into(),
        name: name.into(),
        labels: Labels::new(),
        selector: Some(labels(selector)),
        service: None,
        types: PolicyTypes {
            ingress: true,
            egress: false,
        },
        ingress,
        egress: Vec::new(),
    }
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("test prefix")
}

fn tcp(port: u16) -> PolicyPort {
    PolicyPort {
        port,
        protocol: Protocol::Tcp,
    }
}

fn identity<'a>(view: &'a CompiledPolicy, prefix: &str) -> &'a IdentityEntry {
    view.identities
        .iter()
        .find(|i| i.prefix == cidr(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {view:?}"))
}

#[test]
fn selectors_cidrs_and_excepts_become_identities_and_rules() {
    let endpoints = [
        endpoint("shop", "web-1", "198.19.0.11", &[("app", "web")]),
        endpoint("shop", "web-2", "198.19.0.12", &[("app", "web")]),
        endpoint("shop", "front", "198.19.0.20", &[("app", "frontend")]),
        endpoint("other", "front", "198.19.0.30", &[("app", "frontend")]),
    ];
    let rule = IngressRule {
        from: vec![
            Peer::Endpoints {
                selector: labels(&[("app", "frontend")]),
                namespace: Some("shop".into()),
            },
            Peer::Cidr {
                cidr: cidr("198.18.1.0/24"),
                except: vec![cidr("198.18.1.128/25")],
            },
        ],
        ports: vec![tcp(8080)],
    };
    let policies = [policy("shop", "web-ingress", &[("app", "web")], vec![rule])];
    let view = compile(&policies, [], &endpoints);
    let web = identity(&view, "198.19.0.11/32");
    assert!(web.enforced);
    assert_eq!(
        identity(&view, "198.19.0.12/32").identity,
        web.identity,
        "one label set, one identity"
    );
    let front = identity(&view, "198.19.0.20/32");
    assert!(!front.enforced);
    let elsewhere = identity(&view, "198.19.0.30/32");
    assert_ne!(
        elsewhere.identity, front.identity,
        "another namespace, another identity"
    );
    let range = identity(&view, "198.18.1.0/24");
    let except = identity(&view, "198.18.1.128/25");
    let allowed: BTreeSet<u32> = view.rules.iter().map(|r| r.src).collect();
    assert_eq!(allowed, BTreeSet::from([front.identity, range.identity]));
    assert!(!allowed.contains(&except.identity) && !allowed.contains(&elsewhere.identity));
    assert!(
        view.rules
            .iter()
            .all(|r| r.dst == web.identity && r.port == 8080 && r.protocol == 6)
    );
    assert_eq!(
        view.slot(view.rules[0].stats_slot).to_string(),
        "allowed by shop/web-ingress"
    );
    assert!(
        view.slot(web.stats_slot)
            .to_string()
            .starts_with("denied to shop:")
    );
    // No policy: nothing to enforce, nothing sent.
    assert_eq!(compile([], [], &endpoints), CompiledPolicy::default());
}

#[test]
fn a_service_policy_protects_its_vip_and_no_endpoint() {
    let endpoints = [endpoint("shop", "web-1", "198.19.0.11", &[("app", "web")])];
    let service = Service {
        namespace: "shop".into(),
        name: "web".into(),
        labels: Labels::new(),
        vip: "198.18.100.7".parse().expect("vip"),
        ports: Vec::new(),
        algorithm: Default::default(),
        backends: Vec::new(),
        selector: Labels::new(),
        maglev_table_size: None,
        traffic: Default::default(),
    };
    let mut p = policy(
        "shop",
        "web-vip",
        &[],
        vec![IngressRule {
            from: vec![Peer::Cidr {
                cidr: cidr("198.18.1.0/24"),
                except: Vec::new(),
            }],
            ports: vec![tcp(80)],
        }],
    );
    p.selector = None;
    p.service = Some("web".into());
    let view = compile([&p], [&service], &endpoints);
    let enforced: Vec<String> = view
        .identities
        .iter()
        .filter(|i| i.enforced)
        .map(|i| i.prefix.to_string())
        .collect();
    assert_eq!(enforced, ["198.18.100.7/32"], "{view:?}");
    assert!(
        view.rules
            .iter()
            .all(|r| r.dst >= FIRST_VIP_IDENTITY && r.port == 80)
    );
    assert_eq!(view.rules.len(), 1);
    let vip = identity(&view, "198.18.100.7/32");
    assert_eq!(
        view.slot(vip.stats_slot).to_string(),
        "denied to service shop/web"
    );
}

#[test]
fn egress_policies_restrict_their_sources_only() {
    let endpoints = [
        endpoint("shop", "client", "198.18.1.2", &[("app", "client")]),
        endpoint("shop", "web", "198.19.0.11", &[("app", "web")]),
        endpoint("shop", "db", "198.19.0.13", &[("app", "db")]),
    ];
    let mut p = policy("shop", "client-out", &[("app", "client")], Vec::new());
    p.types = PolicyTypes {
        ingress: false,
        egress: true,
    };
    p.egress = vec![EgressRule {
        to: vec![Peer::Endpoints {
            selector: labels(&[("app", "web")]),
            namespace: None,
        }],
        ports: vec![tcp(8080)],
    }];
    let view = compile([&p], [], &endpoints);
    let client = identity(&view, "198.18.1.2/32");
    assert!(client.egress_enforced && !client.enforced, "{client:?}");
    let web = identity(&view, "198.19.0.11/32");
    assert!(!web.enforced && !web.egress_enforced);
    assert_eq!(view.rules.len(), 1);
    let rule = &view.rules[0];
    assert!(rule.egress && rule.src == client.identity && rule.dst == web.identity);
    assert_eq!((rule.port, rule.protocol), (8080, 6));
    assert!(
        view.slot(client.egress_slot)
            .to_string()
            .starts_with("egress denied from shop:")
    );
}

#[test]
fn an_empty_selector_with_no_rules_denies_the_whole_namespace() {
    let endpoints = [
        endpoint("shop", "a", "198.19.0.11", &[("app", "a")]),
        endpoint("shop", "b", "198.19.0.12", &[("app", "b")]),
        endpoint("open", "c", "198.19.0.13", &[("app", "c")]),
    ];
    let policies = [policy("shop", "deny-all", &[], Vec::new())];
    let view = compile(&policies, [], &endpoints);
    let enforced: Vec<String> = view
        .identities
        .iter()
        .filter(|i| i.enforced)
        .map(|i| i.prefix.to_string())
        .collect();
    assert_eq!(enforced, ["198.19.0.11/32", "198.19.0.12/32"]);
    assert!(view.rules.is_empty());
}

#[test]
fn the_order_of_the_inputs_does_not_matter() {
    let endpoints = [
        endpoint("shop", "a", "198.19.0.11", &[("app", "a")]),
        endpoint("shop", "b", "198.19.0.12", &[("app", "b")]),
    ];
    let policies = [
        policy("shop", "one", &[("app", "a")], Vec::new()),
        policy("shop", "two", &[("app", "b")], Vec::new()),
    ];
    let forward = compile(&policies, [], &endpoints);
    let backward = compile(policies.iter().rev(), [], endpoints.iter().rev());
    assert_eq!(forward, backward);
}
