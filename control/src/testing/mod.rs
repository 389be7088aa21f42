//! Test harnesses shared by this crate's tests and other crates' (feature `test-util`).

pub mod etcd;

pub use etcd::{EtcdCluster, ServerTls};
