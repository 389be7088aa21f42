#![expect(clippy::unwrap_used, reason = "tests panic on failure")]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;

use super::*;

fn key_file(dir: &Path, lines: &[String], mode: u32) -> PathBuf {
    let path = dir.join("kek");
    fs::write(&path, lines.join("\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn sealed_values_open_and_do_not_contain_the_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ring = Keyring::load(&key_file(dir.path(), &[new_key_line().unwrap()], 0o600)).unwrap();
    let secret = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----\n";
    let sealed = ring.seal("pki/ca", secret).unwrap();
    assert!(is_sealed(&sealed));
    assert!(!sealed.windows(11).any(|w| w == b"PRIVATE KEY"));
    assert!(!sealed.windows(8).any(|w| w == b"MIGHAgEA"));
    assert_eq!(
        ring.open("pki/ca", &sealed).unwrap(),
        (secret.to_vec(), false)
    );
    // A fresh nonce every time: two seals of one value differ.
    assert_ne!(ring.seal("pki/ca", secret).unwrap(), sealed);
}

#[test]
fn a_value_moved_to_another_record_or_altered_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    let ring = Keyring::load(&key_file(dir.path(), &[new_key_line().unwrap()], 0o600)).unwrap();
    let sealed = ring.seal("pki/ca", b"secret").unwrap();
    let moved = ring.open("pki/other", &sealed).unwrap_err();
    assert!(matches!(moved, SealError::Tampered { .. }), "{moved}");
    let mut altered = sealed.clone();
    *altered.last_mut().unwrap() ^= 1;
    assert!(matches!(
        ring.open("pki/ca", &altered),
        Err(SealError::Tampered { .. })
    ));
    let truncated = &sealed[..MAGIC.len() + 6];
    assert!(matches!(
        ring.open("pki/ca", truncated),
        Err(SealError::Tampered { .. })
    ));
    assert!(matches!(
        ring.open("pki/ca", b"{\"cert_pem\":\"\"}"),
        Err(SealError::NotSealed { .. })
    ));
}

#[test]
fn rotation_old_keys_open_the_new_key_seals() {
    let dir = tempfile::tempdir().unwrap();
    let old = new_key_line().unwrap();
    let new = new_key_line().unwrap();
    let before = Keyring::load(&key_file(dir.path(), std::slice::from_ref(&old), 0o600)).unwrap();
    let sealed_before = before.seal("pki/ca", b"secret").unwrap();

    let after = Keyring::load(&key_file(dir.path(), &[new.clone(), old], 0o600)).unwrap();
    // Readable, and flagged for sealing again with the new key.
    assert_eq!(
        after.open("pki/ca", &sealed_before).unwrap(),
        (b"secret".to_vec(), true)
    );
    let sealed_after = after.seal("pki/ca", b"secret").unwrap();
    assert!(!after.open("pki/ca", &sealed_after).unwrap().1);

    // Once the old key is dropped, what it sealed names the missing key.
    let only_new = Keyring::load(&key_file(dir.path(), &[new], 0o600)).unwrap();
    let e = only_new.open("pki/ca", &sealed_before).unwrap_err();
    assert!(matches!(e, SealError::UnknownKey { .. }), "{e}");
    assert!(e.to_string().contains(&before.sealing_key_id()), "{e}");
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o644, 0o640, 0o604] {
        let path = key_file(dir.path(), &[new_key_line().unwrap()], mode);
        let e = Keyring::load(&path).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, SealError::Exposed { .. }), "{text}");
        assert!(
            text.contains(&format!("{mode:04o}")) && text.contains("chmod 600"),
            "{text}"
        );
    }
}

#[test]
fn bad_key_files_name_the_line_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 4] = [
        (&["abcd"], "line 1: expected 64 hex digits"),
        (&["# only a comment", ""], "holds no key"),
        (&["# first", &"zz".repeat(32)], "line 2"),
        (&[&"ab".repeat(33)], "66 characters"),
    ];
    for (lines, expected) in cases {
        let lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        let e = Keyring::load(&key_file(dir.path(), &lines, 0o600)).unwrap_err();
        assert!(e.to_string().contains(expected), "{e} lacks {expected:?}");
    }
    // Comments after a key are allowed.
    let line = format!("{} # added 2026-12-04", new_key_line().unwrap());
    assert!(Keyring::load(&key_file(dir.path(), &[line], 0o600)).is_ok());
}

#[test]
fn a_generated_key_file_is_owner_only_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(GENERATED_KEY_FILE);
    let first = Keyring::load_or_generate(&path).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = Keyring::load_or_generate(&path).unwrap();
    assert_eq!(first.key_ids(), again.key_ids());
    let sealed = first.seal("k", b"v").unwrap();
    assert_eq!(again.open("k", &sealed).unwrap().0, b"v");
}
