//! The command line, as clap parses it. Nothing here talks to the network.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;
use sluice_api::v1;
use sluice_model::ObjectKind;

use super::duration::parse_duration;

const AFTER_HELP: &str = "\
The config file holds the server address, the cluster CA and your certificate and key.
Without --config (or SLUICECTL_CONFIG), the first existing of these is used:
  ~/.config/sluice/config
  /etc/sluice/admin.conf (written by sluice-control for the first admin)

Exit status: 0 success, 1 other errors, 2 usage, 3 not found, 4 permission denied or
not authenticated, 5 conflict (changed concurrently, or already exists), 6 control
service unreachable.";

#[derive(Debug, Parser)]
#[command(
    name = "sluicectl",
    version,
    about = "Administer a Sluice cluster through its control service",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Config file to use (see below for the default).
    #[arg(long, global = true, env = "SLUICECTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    pub output: Format,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns, for people.
    Table,
    /// Manifests `sluicectl apply -f` takes back (nodes: their own shape).
    Yaml,
    /// The same objects as JSON.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or update the objects of manifest files, all of them or none.
    ///
    /// Objects that exist are sent with the resource version just read, so an update
    /// made by someone else in between fails with a conflict instead of being lost.
    Apply(ApplyArgs),
    /// List objects, or show one.
    Get(GetArgs),
    /// Show a service: its VIP, ports, resolved backends and state on each node.
    Describe(DescribeArgs),
    /// Move a service's new flows between backend versions (canary, blue-green).
    ///
    /// Backends carry a version (`version:` on a static backend, the `version` label
    /// on an endpoint). `--to v2 --percent 1` gives version v2 exactly 1% of new flows
    /// and the other versions the rest; `--percent 100` completes a blue-green switch;
    /// `--undo` sends every new flow back to the other versions at once. Established
    /// flows stay where they are.
    Rollout(RolloutArgs),
    /// Delete one object, or every object of manifest files.
    ///
    /// Nodes are removed with `sluicectl node remove`, which also revokes them.
    Delete(DeleteArgs),
    /// Join tokens, with which new nodes join the cluster.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Admin users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Nodes of the cluster.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// The flow log, cluster-wide: flows the nodes opened, closed and dropped
    /// (a sample, as each agent's --flow-log-sample says; every refusal by
    /// network policy). The recent ones, then with --follow each new one as
    /// it is reported. One line each; -o json gives one JSON object per line.
    Flows(FlowsArgs),
    /// Live traffic rates per service and backend, summed over the nodes,
    /// refreshed in place (the nodes report their counters every few seconds).
    Top(TopArgs),
    /// Show who the control service takes you for.
    Whoami,
    /// Print the URL of the web dashboard, with a short-lived token bound to you.
    ///
    /// The dashboard shows what your grants let you see (checked again on every
    /// request, so a revoked grant takes effect at once), updated live. Anyone
    /// holding the URL sees the same until the token expires: do not share it.
    Dashboard {
        /// How long the token is valid (at most 12h).
        #[arg(long, value_parser = parse_duration, default_value = "15m")]
        ttl: Duration,
    },
    /// Print a shell completion script to stdout.
    Completion {
        /// The shell to complete for.
        shell: Shell,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A manifest (YAML: Service, Endpoint and Grant documents); repeat for several.
    #[arg(short = 'f', long = "filename", value_name = "FILE", required = true)]
    pub files: Vec<PathBuf>,
    /// Validate on the server and report what would change; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// What to get: services (svc), endpoints (ep), nodes (no) or grants; singular
    /// names work too. Nodes have no namespace.
    pub kind: ListKind,
    /// One object by name; all of them when omitted.
    pub name: Option<String>,
    #[command(flatten)]
    pub namespace: NamespaceArg,
    /// Every namespace you may list (not with NAME).
    #[arg(
        short = 'A',
        long,
        conflicts_with_all = ["namespace", "name"]
    )]
    pub all_namespaces: bool,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// What to describe: service (svc).
    pub kind: DescribeKind,
    /// The service's name.
    pub name: String,
    #[command(flatten)]
    pub namespace: NamespaceArg,
}

#[derive(Debug, Args)]
pub struct RolloutArgs {
    /// The service's name.
    pub name: String,
    #[command(flatten)]
    pub namespace: NamespaceArg,
    /// The version that receives the share.
    #[arg(long, value_name = "VERSION", required_unless_present = "undo")]
    pub to: Option<String>,
    /// Its share of new flows, 0 to 100.
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(0..=100),
        required_unless_present = "undo"
    )]
    pub percent: Option<u32>,
    /// Roll back: no new flows to the version rolled out to.
    #[arg(long, conflicts_with_all = ["to", "percent"])]
    pub undo: bool,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// What to delete: service (svc), endpoint (ep) or grant; or use -f.
    #[arg(
        required_unless_present = "files",
        conflicts_with = "files",
        requires = "name"
    )]
    pub kind: Option<ObjectKindArg>,
    /// The object's name.
    pub name: Option<String>,
    /// Delete every object of this manifest (repeat for several); missing ones are
    /// reported and skipped.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "namespace"
    )]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub namespace: NamespaceArg,
}

/// `-n`: services, endpoints and grants live in a namespace; nodes do not.
#[derive(Debug, Args)]
pub struct NamespaceArg {
    /// Namespace [default: default].
    #[arg(short, long)]
    pub namespace: Option<String>,
}

impl NamespaceArg {
    pub fn or_default(&self) -> &str {
        self.namespace
            .as_deref()
            .unwrap_or(sluice_model::DEFAULT_NAMESPACE)
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use join token and print the command that joins a node with it.
    Create {
        /// How long the token is valid (at most 24h).
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user: a new key (it never leaves this machine), a certificate for it
    /// signed by the cluster CA, and a config file holding both.
    Create {
        /// The user's name, as grants name it (`subject: { user: NAME }`).
        name: String,
        /// A group the user belongs to (`subject: { group: G }`); repeat for several.
        #[arg(long = "group", value_name = "G")]
        groups: Vec<String>,
        /// How long the certificate is valid.
        #[arg(long, value_parser = parse_duration, default_value = "365d")]
        ttl: Duration,
        /// Where to write the new user's config file (mode 0600; must not exist).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Remove a node: its certificate is revoked and its agent disconnected.
    Remove { name: String },
}

/// The kinds `get` lists: plural, singular or short names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListKind {
    #[value(name = "services", aliases = ["service", "svc"])]
    Services,
    #[value(name = "endpoints", aliases = ["endpoint", "ep"])]
    Endpoints,
    #[value(name = "nodes", aliases = ["node", "no"])]
    Nodes,
    #[value(name = "grants", aliases = ["grant"])]
    Grants,
    #[value(name = "networkpolicies", aliases = ["networkpolicy", "netpol"])]
    NetworkPolicies,
}

impl ListKind {
    /// The object kind, or `None` for nodes (not an object one applies).
    pub fn object_kind(self) -> Option<ObjectKind> {
        match self {
            Self::Services => Some(ObjectKind::Service),
            Self::Endpoints => Some(ObjectKind::Endpoint),
            Self::Grants => Some(ObjectKind::Grant),
            Self::NetworkPolicies => Some(ObjectKind::NetworkPolicy),
            Self::Nodes => None,
        }
    }

    pub fn proto(self) -> v1::Kind {
        self.object_kind().map_or(v1::Kind::Node, v1::Kind::from)
    }

    /// As messages say it: "services".
    pub fn plural(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::Endpoints => "endpoints",
            Self::Nodes => "nodes",
            Self::Grants => "grants",
            Self::NetworkPolicies => "networkpolicies",
        }
    }
}

/// The kinds `delete` takes: singular, plural or short names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObjectKindArg {
    #[value(name = "service", aliases = ["services", "svc"])]
    Service,
    #[value(name = "endpoint", aliases = ["endpoints", "ep"])]
    Endpoint,
    #[value(name = "grant", aliases = ["grants"])]
    Grant,
    #[value(name = "networkpolicy", aliases = ["networkpolicies", "netpol"])]
    NetworkPolicy,
}

impl From<ObjectKindArg> for ObjectKind {
    fn from(kind: ObjectKindArg) -> Self {
        match kind {
            ObjectKindArg::Service => Self::Service,
            ObjectKindArg::Endpoint => Self::Endpoint,
            ObjectKindArg::Grant => Self::Grant,
            ObjectKindArg::NetworkPolicy => Self::NetworkPolicy,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlowVerdict {
    /// Balanced and passed on (opened or closed).
    Forwarded,
    /// Refused by network policy.
    Denied,
    /// Dropped for any other reason (no backend, unknown port, fragment...).
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlowKind {
    New,
    Close,
    Drop,
}

#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Only this service's flows: NAME (in -n's namespace) or NAMESPACE/NAME.
    #[arg(long, value_name = "SERVICE")]
    pub service: Option<String>,
    #[command(flatten)]
    pub namespace: NamespaceArg,
    /// Only flows with this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<FlowVerdict>,
    /// Only events of this kind.
    #[arg(long, value_enum)]
    pub kind: Option<FlowKind>,
    /// Keep streaming new events until interrupted.
    #[arg(short, long)]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub interval: u64,
    /// Stop after this many refreshes (default: until interrupted). With it,
    /// each refresh is printed below the last instead of in place.
    #[arg(long, value_name = "N")]
    pub count: Option<u32>,
    /// Only services of this namespace (default: every namespace).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
}

/// `describe` knows services only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DescribeKind {
    #[value(name = "service", aliases = ["services", "svc"])]
    Service,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("sluicectl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kinds_take_plural_singular_and_short_names() {
        let cases = [
            ("services", ListKind::Services),
            ("service", ListKind::Services),
            ("svc", ListKind::Services),
            ("endpoints", ListKind::Endpoints),
            ("endpoint", ListKind::Endpoints),
            ("ep", ListKind::Endpoints),
            ("nodes", ListKind::Nodes),
            ("node", ListKind::Nodes),
            ("no", ListKind::Nodes),
            ("grants", ListKind::Grants),
            ("grant", ListKind::Grants),
        ];
        for (name, kind) in cases {
            assert_eq!(ListKind::from_str(name, false), Ok(kind), "{name}");
            let Command::Get(get) = parse(&["get", name]).command else {
                panic!("{name}: not a get");
            };
            assert_eq!(get.kind, kind, "{name}");
        }
        assert!(ListKind::from_str("svcs", false).is_err());
        assert!(ListKind::from_str("Service", false).is_err());

        for (name, kind) in [
            ("service", ObjectKind::Service),
            ("svc", ObjectKind::Service),
            ("endpoints", ObjectKind::Endpoint),
            ("ep", ObjectKind::Endpoint),
            ("grant", ObjectKind::Grant),
        ] {
            let parsed = ObjectKindArg::from_str(name, false).map(ObjectKind::from);
            assert_eq!(parsed, Ok(kind), "{name}");
        }
        assert!(ObjectKindArg::from_str("node", false).is_err());
        assert_eq!(
            DescribeKind::from_str("svc", false),
            Ok(DescribeKind::Service)
        );
        assert_eq!(ListKind::Nodes.proto(), v1::Kind::Node);
        assert_eq!(ListKind::Grants.proto(), v1::Kind::Grant);
    }

    #[test]
    fn get_takes_a_namespace_or_all_of_them() {
        let Command::Get(get) = parse(&["get", "svc", "web", "-n", "shop"]).command else {
            panic!("not a get");
        };
        assert_eq!(get.name.as_deref(), Some("web"));
        assert_eq!(get.namespace.or_default(), "shop");
        let Command::Get(get) = parse(&["get", "ep", "-A", "-o", "yaml"]).command else {
            panic!("not a get");
        };
        assert!(get.all_namespaces);
        assert_eq!(get.namespace.or_default(), "default");
        let conflicting = [
            &["get", "svc", "-A", "-n", "shop"][..],
            &["get", "svc", "web", "-A"][..],
        ];
        for args in conflicting {
            let full = std::iter::once("sluicectl").chain(args.iter().copied());
            assert!(Cli::try_parse_from(full).is_err(), "{args:?}");
        }
    }

    #[test]
    fn delete_takes_a_kind_and_name_or_files() {
        let Command::Delete(delete) = parse(&["delete", "svc", "web"]).command else {
            panic!("not a delete");
        };
        assert_eq!(delete.kind, Some(ObjectKindArg::Service));
        let Command::Delete(delete) = parse(&["delete", "-f", "a.yaml", "-f", "b.yaml"]).command
        else {
            panic!("not a delete");
        };
        assert_eq!(delete.files.len(), 2);
        for args in [
            &["delete"][..],
            &["delete", "svc"][..],
            &["delete", "svc", "web", "-f", "a.yaml"][..],
            &["delete", "node", "n1"][..],
            &["delete", "-f", "a.yaml", "-n", "shop"][..],
        ] {
            let full = std::iter::once("sluicectl").chain(args.iter().copied());
            assert!(Cli::try_parse_from(full).is_err(), "{args:?}");
        }
    }

    #[test]
    fn ttls_are_durations() {
        let Command::Token {
            command: TokenCommand::Create { ttl },
        } = parse(&["token", "create"]).command
        else {
            panic!("not token create");
        };
        assert_eq!(ttl, Duration::from_secs(600));
        let Command::User {
            command: UserCommand::Create { ttl, groups, .. },
        } = parse(&[
            "user", "create", "bob", "--group", "dev", "--group", "ops", "--ttl", "30d", "--out",
            "bob.conf",
        ])
        .command
        else {
            panic!("not user create");
        };
        assert_eq!(ttl, Duration::from_secs(30 * 86_400));
        assert_eq!(groups, ["dev", "ops"]);
        let full = ["sluicectl", "token", "create", "--ttl", "10"];
        assert!(Cli::try_parse_from(full).is_err());
    }
}
