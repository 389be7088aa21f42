//! The same services as each balancer takes them: the agent's manifest,
//! iptables rules and nftables rules in the shapes kube-proxy writes, so that
//! the comparison is with what a cluster would really run.

use std::{fmt::Write as _, net::Ipv4Addr};

use super::{CLUSTER_CIDR, TCP_PORT, TCP_TARGET, UDP_PORT, UDP_TARGET};

/// One service of the generated configurations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vip: Ipv4Addr,
    pub udp: bool,
    pub endpoints: Vec<Ipv4Addr>,
}

/// Service `i` of `n`: VIPs from 198.18.64.0 (not on any interface; the
/// client reaches them through the node); the last one also has a UDP port.
pub fn services(n: usize, endpoints: &[Ipv4Addr]) -> Vec<Service> {
    assert!(
        (1..=16_384).contains(&n),
        "1..=16,384 services fit 198.18.64.0/18"
    );
    (0..n)
        .map(|i| Service {
            name: format!("svc-{i}"),
            vip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + i as u32),
            udp: i == n - 1,
            endpoints: endpoints.to_vec(),
        })
        .collect()
}

/// kube-proxy names chains by the first 16 base32 characters of a SHA-256 of
/// the service port's name; two FNV-1a hashes give names of the same shape
/// (the kernel only compares them while loading).
fn chain_hash(text: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        text.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let bits =
        (u128::from(fnv(0xcbf2_9ce4_8422_2325)) << 64) | u128::from(fnv(0x6c62_272e_07bb_0142));
    (0..16)
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// The service's ports as (protocol, port, target port).
fn ports(s: &Service) -> Vec<(&'static str, u16, u16)> {
    let mut p = vec![("tcp", TCP_PORT, TCP_TARGET)];
    if s.udp {
        p.push(("udp", UDP_PORT, UDP_TARGET));
    }
    p
}

/// `iptables-restore` input for the nat table, as kube-proxy's iptables mode
/// writes it (pkg/proxy/iptables/proxier.go): one `KUBE-SERVICES` rule per
/// service port, walked in order, jumping to the port's `KUBE-SVC-` chain,
/// which picks an endpoint with `statistic --mode random --probability
/// 1/(n-i)` and jumps to its `KUBE-SEP-` chain, which DNATs.
pub fn iptables_rules(services: &[Service]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for chain in [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
        "KUBE-NODEPORTS",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    rules.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    let mut per_service = String::new();
    for s in services {
        for (proto, port, target) in ports(s) {
            let port_name = format!("default/{}:{proto}", s.name);
            let svc = format!("KUBE-SVC-{}", chain_hash(&format!("{port_name}{proto}")));
            let _ = writeln!(chains, ":{svc} - [0:0]");
            let _ = writeln!(
                rules,
                "-A KUBE-SERVICES -m comment --comment \"{port_name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {port} -j {svc}",
                s.vip
            );
            let _ = writeln!(
                per_service,
                "-A {svc} -m comment --comment \"{port_name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
                s.vip
            );
            let n = s.endpoints.len();
            for (i, ep) in s.endpoints.iter().enumerate() {
                let sep = format!(
                    "KUBE-SEP-{}",
                    chain_hash(&format!("{port_name}{proto}{ep}:{target}"))
                );
                let _ = writeln!(chains, ":{sep} - [0:0]");
                let pick = if i + 1 < n {
                    format!(
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / (n - i) as f64
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    per_service,
                    "-A {svc} -m comment --comment \"{port_name} -> {ep}:{target}\"{pick} -j {sep}"
                );
                let _ = writeln!(
                    per_service,
                    "-A {sep} -m comment --comment {port_name} -s {ep}/32 -j KUBE-MARK-MASQ\n\
                     -A {sep} -m comment --comment {port_name} -m {proto} -p {proto} -j DNAT --to-destination {ep}:{target}"
                );
            }
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    format!("*nat\n{chains}{rules}{per_service}COMMIT\n")
}

/// `nft -f` input as kube-proxy's nftables mode writes it
/// (pkg/proxy/nftables/proxier.go): the `service-ips` verdict map of
/// address . protocol . port → the port's chain, which picks an endpoint
/// with `numgen random mod n` and goes to its chain, which DNATs.
pub fn nftables_rules(services: &[Service]) -> String {
    let (chains, elements) = nft_services(services);
    let mut out = nft_base();
    // The map and base chains first; the services' chains inside the same
    // table; the map's elements, which name the chains, after the table (as
    // kube-proxy adds them: `add element`).
    out.push_str(&chains);
    let _ = writeln!(
        out,
        "}}\nadd element ip kube-proxy service-ips {{\n\t{}\n}}",
        elements.join(",\n\t")
    );
    out
}

/// [`nftables_rules`] as several `nft -f` transactions: the table and its
/// base chains, then `batch` services at a time. One transaction of 10,000
/// services takes `nft` about 90 s here, batches of 500 a fifth of that.
pub fn nftables_batches(services: &[Service], batch: usize) -> Vec<String> {
    let mut out = vec![format!("{}}}\n", nft_base())];
    for chunk in services.chunks(batch.max(1)) {
        let (chains, elements) = nft_services(chunk);
        out.push(format!(
            "table ip kube-proxy {{\n{chains}}}\nadd element ip kube-proxy service-ips {{\n\t{}\n}}\n",
            elements.join(",\n\t")
        ));
    }
    out
}

/// The table up to its services' chains (left open): masquerading, the
/// `service-ips` map and the chains that consult it.
fn nft_base() -> String {
    String::from(
        "table ip kube-proxy {\n\
         \tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}\n\
         \tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n\
         \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tjump services\n\t}\n\
         \tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\
         \t\tjump services\n\t}\n\
         \tchain mark-for-masquerade {\n\t\tmark set mark or 0x4000\n\t}\n\
         \tchain masquerading {\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmark and 0x4000 == 0 return\n\
         \t\tmark set mark xor 0x4000\n\
         \t\tmasquerade fully-random\n\
         \t}\n",
    )
}

/// The services' port and endpoint chains, and their `service-ips` elements.
fn nft_services(services: &[Service]) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut elements = Vec::new();
    for s in services {
        for (proto, port, target) in ports(s) {
            let port_name = format!("default/{}/{proto}/p{port}", s.name);
            let svc = format!(
                "service-{}-{}",
                &chain_hash(&port_name)[..8],
                sanitize(&port_name)
            );
            elements.push(format!("{} . {proto} . {port} : goto {svc}", s.vip));
            let mut picks = Vec::new();
            let mut endpoint_chains = String::new();
            for (i, ep) in s.endpoints.iter().enumerate() {
                let name = format!("{port_name}__{ep}/{target}");
                let chain = format!("endpoint-{}-{}", &chain_hash(&name)[..8], sanitize(&name));
                picks.push(format!("{i} : goto {chain}"));
                let _ = writeln!(
                    endpoint_chains,
                    "\tchain {chain} {{\n\t\tip saddr {ep} jump mark-for-masquerade\n\
                     \t\tmeta l4proto {proto} dnat to {ep}:{target}\n\t}}"
                );
            }
            let _ = writeln!(
                out,
                "\tchain {svc} {{\n\t\tip daddr {} {proto} dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade\n\
                 \t\tnumgen random mod {} vmap {{ {} }}\n\t}}\n{endpoint_chains}",
                s.vip,
                s.endpoints.len(),
                picks.join(", ")
            );
        }
    }
    (out, elements)
}

/// Chain names keep letters, digits, `-` and `_` (kube-proxy keeps `/` and
/// `.` too, which `nft` then wants quoted).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The agent's manifest for the same services.
pub fn sluice_manifest(services: &[Service]) -> String {
    let mut out = String::new();
    for s in services {
        let _ = writeln!(
            out,
            "---\nkind: Service\nname: {}\nvip: {}\nports:\n  - {{ port: {TCP_PORT}, protocol: TCP, targetPort: {TCP_TARGET} }}",
            s.name, s.vip
        );
        if s.udp {
            let _ = writeln!(
                out,
                "  - {{ port: {UDP_PORT}, protocol: UDP, targetPort: {UDP_TARGET} }}"
            );
        }
        out.push_str("algorithm: round-robin\nbackends:\n");
        for ep in &s.endpoints {
            let _ = writeln!(out, "  - {{ address: {ep} }}");
        }
    }
    out
}

/// The legacy (x_tables) `iptables-restore` where there is one, else the
/// default: Debian's default, the nf_tables-backed one, took minutes to load
/// the 10,000-service rules here (80,000 rules with `comment` and
/// `statistic` matches), the legacy one about a second.
pub fn iptables_restore() -> &'static str {
    let legacy = [
        "/usr/sbin/iptables-legacy-restore",
        "/sbin/iptables-legacy-restore",
    ];
    if legacy.iter().any(|p| std::path::Path::new(p).exists()) {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> Vec<Service> {
        services(
            2,
            &[Ipv4Addr::new(198, 19, 1, 2), Ipv4Addr::new(198, 19, 2, 2)],
        )
    }

    #[test]
    fn services_number_their_vips_and_the_last_has_udp() {
        let s = two();
        assert_eq!(s[0].vip, Ipv4Addr::new(198, 18, 64, 0));
        assert_eq!(s[1].vip, Ipv4Addr::new(198, 18, 64, 1));
        assert!(!s[0].udp && s[1].udp);
        assert_eq!(services(300, &[])[299].vip, Ipv4Addr::new(198, 18, 65, 43));
    }

    #[test]
    fn chain_names_are_kube_proxy_shaped_and_distinct() {
        let a = chain_hash("default/svc-0:tcptcp");
        assert_eq!(a.len(), 16);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
        assert_ne!(a, chain_hash("default/svc-1:tcptcp"));
        assert_eq!(a, chain_hash("default/svc-0:tcptcp"));
    }

    #[test]
    fn iptables_rules_walk_services_then_pick_and_dnat() {
        let text = iptables_rules(&two());
        assert!(text.starts_with("*nat\n") && text.ends_with("COMMIT\n"));
        // One KUBE-SERVICES rule per service port, plus the nodeports rule.
        assert_eq!(text.matches("-A KUBE-SERVICES ").count(), 3 + 1);
        assert_eq!(text.matches("--probability 0.5000000000").count(), 3);
        assert_eq!(
            text.matches("-j DNAT --to-destination 198.19.2.2:8080")
                .count(),
            2
        );
        assert_eq!(
            text.matches("-j DNAT --to-destination 198.19.1.2:9090")
                .count(),
            1
        );
        // Every chain jumped to is declared.
        for jump in text.split("-j ").skip(1) {
            let target = jump.split_whitespace().next().unwrap_or_default();
            if target.starts_with("KUBE-") {
                assert!(text.contains(&format!(":{target} - [0:0]")), "{target}");
            }
        }
        // The nodeports rule stays last in KUBE-SERVICES.
        let services: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert!(
            services
                .last()
                .is_some_and(|l| l.contains("KUBE-NODEPORTS"))
        );
    }

    #[test]
    fn nftables_rules_map_every_port_and_define_every_chain() {
        let text = nftables_rules(&two());
        assert!(text.contains("198.18.64.1 . udp . 5353 : goto service-"));
        assert_eq!(text.matches(" . tcp . 80 : goto ").count(), 2);
        assert_eq!(text.matches("numgen random mod 2 vmap").count(), 3);
        for goto in text.split("goto ").skip(1) {
            let chain: String = goto
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect();
            assert!(text.contains(&format!("chain {chain} {{")), "{chain}");
        }
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn the_manifest_parses() {
        let text = sluice_manifest(&two());
        let objects = sluice_model::manifest::parse_objects("m.yaml", &text).expect("valid");
        assert_eq!(objects.len(), 2);
        assert!(text.contains("protocol: UDP, targetPort: 9090"));
    }
}
