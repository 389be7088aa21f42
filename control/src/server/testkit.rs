//! What the control service's unit tests share: applying a manifest as the
//! first admin, waiting for another replica to catch up, a key file.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;

use sluice_api::v1;
use sluice_model::manifest;

use super::Control;
use crate::rbac::{ADMIN_GROUP, Caller};
use crate::sealing;

/// Applies the manifest `text` as a member of the admin group.
pub async fn apply(control: &Arc<Control>, text: &str) {
    let admin = Caller {
        name: "admin".into(),
        groups: vec![ADMIN_GROUP.into()],
    };
    let objects = manifest::parse_objects("t.yaml", text)
        .unwrap()
        .iter()
        .map(v1::Object::from)
        .collect();
    control.apply(&admin, objects, false).await.unwrap();
}

/// Polls `check` until it holds; panics naming `what` after 15 s.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh key-encryption key file `<dir>/kek`, mode 0600.
pub fn key_file(dir: &std::path::Path) {
    let path = dir.join("kek");
    std::fs::write(&path, sealing::new_key_line().unwrap()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
