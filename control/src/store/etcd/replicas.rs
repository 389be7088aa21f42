//! Replicas find each other here: each keeps `<prefix>replicas/<id>` (its
//! API address) under an etcd lease it renews every [`RENEW`], so the key
//! goes when the replica goes — a clean stop or a `kill -9`, in at most
//! [`LEASE_TTL`]. The keys are live state, not desired state: they are not
//! versioned objects, the follower skips them, and no write transaction
//! reads them.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{GetOptions, PutOptions};
use tokio::sync::watch;

use super::EtcdStore;

/// How long a replica's key outlives its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);
/// How often a replica renews its lease and reads the others' keys.
pub const RENEW: Duration = Duration::from_secs(1);

impl EtcdStore {
    /// Registers replica `id` reachable at `address` until the store is
    /// dropped, and follows the registered replicas (this one included):
    /// id → address. While etcd does not answer, the last known set stays.
    pub(super) fn announce_replica(
        &self,
        id: &str,
        address: &str,
    ) -> watch::Receiver<BTreeMap<String, String>> {
        let (tx, rx) = watch::channel(BTreeMap::new());
        let prefix = self.layout.replicas();
        let key = [prefix.as_slice(), id.as_bytes()].concat();
        let address = address.to_owned();
        let client = self.client.clone();
        let Some(runtime) = self.runtime.0.as_ref() else {
            return rx;
        };
        runtime.spawn(async move {
            let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(5);
            let mut lease = client.lease_client();
            let mut kv = client.kv_client();
            loop {
                // (Re)register: a lease lost while etcd was away is granted anew.
                let granted = async {
                    let id = lease.grant(ttl, None).await?.id();
                    kv.put(
                        key.clone(),
                        address.clone(),
                        Some(PutOptions::new().with_lease(id)),
                    )
                    .await?;
                    let (keeper, responses) = lease.keep_alive(id).await?;
                    Ok::<_, etcd_client::Error>((keeper, responses))
                }
                .await;
                let (mut keeper, mut responses) = match granted {
                    Ok(kept) => kept,
                    Err(e) => {
                        tracing::debug!("registering this replica in etcd: {e}");
                        tokio::time::sleep(RENEW).await;
                        continue;
                    }
                };
                loop {
                    let renewed = async {
                        keeper.keep_alive().await?;
                        let alive = responses.message().await?.is_some_and(|r| r.ttl() > 0);
                        Ok::<_, etcd_client::Error>(alive)
                    };
                    match tokio::time::timeout(RENEW * 3, renewed).await {
                        Ok(Ok(true)) => {}
                        Ok(Ok(false)) => {
                            tracing::warn!("this replica's etcd lease expired; registering again");
                            break;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!("renewing this replica's etcd lease: {e}");
                            break;
                        }
                        Err(_) => break,
                    }
                    let listed = kv
                        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                        .await;
                    if let Ok(listed) = listed {
                        let replicas: BTreeMap<String, String> = listed
                            .kvs()
                            .iter()
                            .filter_map(|kv| {
                                let id = kv.key().strip_prefix(prefix.as_slice())?;
                                Some((
                                    String::from_utf8(id.to_vec()).ok()?,
                                    String::from_utf8(kv.value().to_vec()).ok()?,
                                ))
                            })
                            .collect();
                        tx.send_if_modified(|known| {
                            let changed = *known != replicas;
                            *known = replicas;
                            changed
                        });
                    }
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(RENEW).await;
                }
                tokio::time::sleep(RENEW).await;
            }
        });
        rx
    }
}
