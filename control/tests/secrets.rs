//! Secrets at rest, checked on the bytes: a fresh data directory is
//! owner-only and holds no private key in plain text; a key file others can
//! read is refused; a CA record from before sealing is sealed at start;
//! `sluice-control rotate-key` seals again with a new key, and the CA (so
//! every certificate it issued) stays the same.

#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_control::sealing::{self, Keyring};
use sluice_control::server::{Control, Options};
use sluice_control::store::{Expect, Key, RedbStore, StoreExt as _};
use sluice_pki::ClusterCa;

fn options(dir: &Path) -> Options {
    Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        vip_cidr: "198.18.0.0/28".into(),
        advertise: vec!["127.0.0.1".into()],
        node_cert_ttl: Duration::from_secs(3600),
        user_cert_ttl: Duration::from_secs(3600),
        admin_config: dir.join("admin.conf"),
        encryption_key_file: None,
        store: Default::default(),
    }
}

fn ca_key() -> Key {
    Key::cluster("pki", "ca")
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The places a private key could hide in: its PEM armour, any line of its
/// base64 body, and a window of its DER bytes.
fn leaks(bytes: &[u8], key_pem: &str) -> Option<String> {
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    if contains(b"PRIVATE KEY") {
        return Some("a PEM private key marker".into());
    }
    let parsed = pem::parse(key_pem).unwrap();
    for line in key_pem.lines().filter(|l| !l.starts_with("-----")) {
        if line.len() >= 16 && contains(line.as_bytes()) {
            return Some(format!("the key's base64 line {line:?}"));
        }
    }
    // The secret scalar sits in the DER's tail; any 16 bytes of it suffice.
    let der = parsed.contents();
    for window in der[der.len() / 2..].chunks(16).filter(|c| c.len() == 16) {
        if contains(window) {
            return Some("16 bytes of the key's DER".into());
        }
    }
    None
}

#[test]
fn a_fresh_data_dir_is_owner_only_and_holds_no_private_key_in_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let control = Control::open(opts.clone()).unwrap();
    let key_pem = control.ca().key_pem();
    drop(control);

    let data = &opts.data_dir;
    assert_eq!(mode(data), 0o700, "the data directory");
    let found = files(data);
    let names: Vec<_> = found
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.contains(&"state.redb".to_owned()), "{names:?}");
    assert!(
        names.contains(&sealing::GENERATED_KEY_FILE.to_owned()),
        "{names:?}"
    );
    for file in &found {
        assert_eq!(mode(file), 0o600, "{} is not owner-only", file.display());
        if let Some(leak) = leaks(&fs::read(file).unwrap(), &key_pem) {
            panic!("{} holds {leak}", file.display());
        }
    }
    // The admin's credentials live outside, owner-only.
    assert_eq!(mode(&opts.admin_config), 0o600);
    assert!(!data.join("admin.conf").exists());

    // The store's CA record is sealed, and opens with the generated key.
    let store = RedbStore::open(data.join("state.redb")).unwrap();
    let (record, _) = store.read(|tx| tx.get(&ca_key())).unwrap();
    let record = record.unwrap();
    assert!(sealing::is_sealed(&record.value));
    let keyring = Keyring::load(&data.join(sealing::GENERATED_KEY_FILE)).unwrap();
    let (plain, stale) = keyring.open("pki/ca", &record.value).unwrap();
    assert!(!stale);
    assert!(String::from_utf8(plain).unwrap().contains("PRIVATE KEY"));
}

#[test]
fn a_key_file_others_can_read_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("kek");
    fs::write(&key_file, sealing::new_key_line().unwrap()).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
    let mut opts = options(dir.path());
    opts.encryption_key_file = Some(key_file.clone());
    let error = Control::open(opts.clone()).err().unwrap().to_string();
    assert!(
        error.contains("readable by others")
            && error.contains("0644")
            && error.contains(&key_file.display().to_string()),
        "{error}"
    );
    // Nothing was created with the refused key.
    assert!(!opts.data_dir.join("state.redb").exists());

    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    Control::open(opts.clone()).unwrap();
    // A given key file: none is generated in the data directory.
    assert!(!opts.data_dir.join(sealing::GENERATED_KEY_FILE).exists());
}

#[test]
fn a_ca_record_from_before_sealing_is_sealed_at_start_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    fs::create_dir_all(&opts.data_dir).unwrap();
    let ca = ClusterCa::generate().unwrap();
    {
        let store = RedbStore::open(opts.data_dir.join("state.redb")).unwrap();
        let plain = serde_json::json!({ "cert_pem": ca.cert_pem(), "key_pem": ca.key_pem() });
        store
            .write(|tx| tx.put(&ca_key(), plain.to_string().as_bytes(), Expect::Absent))
            .unwrap();
    }
    let control = Control::open(opts.clone()).unwrap();
    assert_eq!(control.ca().pin(), ca.pin(), "the same CA");
    drop(control);
    let store = RedbStore::open(opts.data_dir.join("state.redb")).unwrap();
    let (record, _) = store.read(|tx| tx.get(&ca_key())).unwrap();
    let value = record.unwrap().value;
    assert!(sealing::is_sealed(&value));
    assert_eq!(leaks(&value, &ca.key_pem()), None);
}

fn rotate_key(data_dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sluice-control"))
        .arg("rotate-key")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn rotate_key_seals_again_with_a_new_key_and_the_ca_stays() {
    let dir = tempfile::tempdir().unwrap();
    let opts = options(dir.path());
    let key_file = opts.data_dir.join(sealing::GENERATED_KEY_FILE);
    let control = Control::open(opts.clone()).unwrap();
    let pin = control.ca().pin();
    let old = Keyring::load(&key_file).unwrap();

    // While the control service holds the store, nothing changes.
    let refused = rotate_key(&opts.data_dir, &[]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("stop the control service first"),
        "{stderr}"
    );
    assert_eq!(Keyring::load(&key_file).unwrap().key_ids(), old.key_ids());
    drop(control);

    let rotated = rotate_key(&opts.data_dir, &[]);
    let stdout = String::from_utf8_lossy(&rotated.stdout);
    assert!(
        rotated.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let new = Keyring::load(&key_file).unwrap();
    assert_eq!(new.key_ids().len(), 1, "the old key is dropped");
    assert_ne!(new.key_ids(), old.key_ids());
    assert!(stdout.contains(&new.sealing_key_id()), "{stdout}");
    assert_eq!(mode(&key_file), 0o600);

    let store = RedbStore::open(opts.data_dir.join("state.redb")).unwrap();
    let (record, _) = store.read(|tx| tx.get(&ca_key())).unwrap();
    let value = record.unwrap().value;
    assert!(new.open("pki/ca", &value).is_ok());
    assert!(
        old.open("pki/ca", &value).is_err(),
        "sealed with the new key only"
    );
    drop(store);

    // With --keep-old the previous key stays readable, second in line.
    let kept = rotate_key(&opts.data_dir, &["--keep-old"]);
    assert!(kept.status.success());
    let both = Keyring::load(&key_file).unwrap();
    assert_eq!(both.key_ids()[1], new.sealing_key_id());

    let control = Control::open(opts).unwrap();
    assert_eq!(control.ca().pin(), pin, "the same CA after two rotations");
}
