//! What an API call can fail with, and the gRPC status each becomes. Handlers
//! return `ApiError`; the conversion to `tonic::Status` happens once, here.

use tonic::{Code, Status};

use sluice_pki::PkiError;

use sluice_model::kind::KindVisitor;
use sluice_model::{Kind, ObjectKind};

use crate::{rbac::Denied, server::state::tables, store::StoreError, vip::VipError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request names an object or field wrongly.
    #[error("{message}")]
    Invalid { message: String },
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} \"{name}\" already exists{hint}")]
    AlreadyExists {
        kind: &'static str,
        name: String,
        hint: &'static str,
    },
    /// Optimistic concurrency: the object changed since the caller read it.
    #[error(
        "conflict: {kind} \"{name}\" is at resource version {actual}, the request expected \
         {expected}; read it again and retry"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        expected: u64,
        actual: String,
    },
    #[error("{reason}")]
    Unauthenticated { reason: String },
    #[error("join token refused: {reason}")]
    Token { reason: String },
    #[error(transparent)]
    Vip(#[from] VipError),
    #[error("certificate: {0}")]
    Pki(#[from] PkiError),
    #[error("storage: {0}")]
    Store(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict {
                key,
                expected,
                actual,
            } => Self::Conflict {
                kind: kind_name(&key.kind),
                name: if key.namespace.is_empty() {
                    key.name
                } else {
                    format!("{}/{}", key.namespace, key.name)
                },
                expected: match expected {
                    crate::store::Expect::Version(v) => v,
                    _ => 0,
                },
                actual: actual.map_or_else(|| "absent".to_string(), |v| v.to_string()),
            },
            other => Self::Store(other),
        }
    }
}

/// What a store table holds, as errors name it.
fn kind_name(table: &str) -> &'static str {
    struct Named<'a>(&'a str);
    impl KindVisitor for Named<'_> {
        type Output = Option<&'static str>;
        fn visit<K: Kind>(self) -> Option<&'static str> {
            (K::TABLE == self.0).then_some(K::KIND.as_str())
        }
    }
    match table {
        tables::NODE => "Node",
        tables::TOKEN => "join token",
        table => ObjectKind::ALL
            .iter()
            .find_map(|kind| kind.visit(Named(table)))
            .unwrap_or("object"),
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::Invalid { .. } | ApiError::Pki(_) => Code::InvalidArgument,
            ApiError::Vip(VipError::Exhausted { .. }) => Code::ResourceExhausted,
            ApiError::Vip(_) => Code::InvalidArgument,
            ApiError::Denied(_) => Code::PermissionDenied,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::Conflict { .. } => Code::Aborted,
            // Another control-service replica committed first: retrying is correct.
            ApiError::Store(StoreError::Raced { .. }) => Code::Aborted,
            ApiError::Unauthenticated { .. } | ApiError::Token { .. } => Code::Unauthenticated,
            // etcd without a quorum, or out of reach: the service is there,
            // its store is not; retrying later is right.
            ApiError::Store(
                StoreError::Backend {
                    source: crate::store::BackendError::Etcd(etcd),
                    ..
                }
                | StoreError::CommitFailed {
                    source: crate::store::BackendError::Etcd(etcd),
                },
            ) if etcd.unanswered() => Code::Unavailable,
            ApiError::Store(StoreError::Backend {
                source: crate::store::BackendError::Etcd(etcd),
                ..
            }) if etcd.too_large() => Code::ResourceExhausted,
            ApiError::Store(_) => Code::Internal,
        };
        let message = match &e {
            ApiError::Store(StoreError::Backend {
                source: crate::store::BackendError::Etcd(etcd),
                ..
            }) if etcd.too_large() => format!(
                "{}; an etcd transaction holds at most --max-txn-ops operations (128 by default, \
                 one per object) and --max-request-bytes (1.5 MiB): apply fewer objects at a \
                 time, or raise those limits of etcd",
                sluice_model::error_chain(&e)
            ),
            // The causes too: "store commit failed" alone says nothing of why.
            ApiError::Store(_) => sluice_model::error_chain(&e),
            _ => e.to_string(),
        };
        Status::new(code, message)
    }
}
