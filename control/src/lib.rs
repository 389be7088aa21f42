//! Sluice's control service as a library; `sluice-control` and `sluicectl`
//! (src/bin) are thin shells around it.
//!
//! | module | what it does |
//! |---|---|
//! | [`server`] | the gRPC services, the in-memory state, commits, watch streams |
//! | [`store`] | durable storage (redb, or etcd when replicated) behind the `Store` trait |
//! | [`rbac`] | who may do what (pure) |
//! | [`sealing`] | secrets at rest: the key file, sealing and opening |
//! | [`vip`] | VIP allocation (pure) |
//! | [`rates`] | live rates from the counters nodes report (dashboard, `sluicectl top`) |
//! | [`clock`] | times as RFC 3339 and as the API's Unix milliseconds |
//! | [`client_config`] | the admin config file `sluicectl` reads |
//! | [`error`] | API errors and their gRPC status codes |
//! | `testing` | with feature `test-util` (and in this crate's tests): an etcd cluster for tests |
//!
//! The cluster CA, certificates, join tokens and the server TLS are the
//! `sluice-pki` crate's (its `ca` feature).

pub mod cli;
pub mod client_config;
pub mod clock;
pub mod error;
pub mod rates;
pub mod rbac;
pub mod sealing;
pub mod server;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod vip;
