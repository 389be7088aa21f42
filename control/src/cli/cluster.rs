//! `token create`, `user create`, `node remove` and `whoami`.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sluice_api::v1;
use sluice_pki as pki;

use super::Context;
use super::args::Format;
use super::error::CliError;
use super::model::{Identity, JoinToken, NewUser};
use super::output::{fields, json, print, yaml};
use super::tables::{relative, rfc3339};
use crate::client_config::ClientConfig;

pub async fn create_token(cx: &Context, ttl: Duration) -> Result<(), CliError> {
    let client = cx.connect().await?;
    let response = client.create_join_token(ttl).await?;
    let token = JoinToken::new(response, client.server());
    let text = match cx.format {
        Format::Table => token_text(&token, SystemTime::now()),
        Format::Yaml => yaml(&token)?,
        Format::Json => json(&token)?,
    };
    print(&text)
}

fn token_text(token: &JoinToken, now: SystemTime) -> String {
    let JoinToken {
        token: secret,
        expires,
        ca_hash,
        join_command,
    } = token;
    let mut out = fields(&[
        ("Token", secret.clone()),
        ("Expires", format!("{expires} ({})", relative(expires, now))),
        ("CA hash", ca_hash.clone()),
    ]);
    out.push_str(
        "\nThe token joins one node and is shown only now. On the new node, run \
         (with its name and interfaces):\n\n",
    );
    out.push_str(&format!("  {join_command}\n"));
    out
}

pub async fn create_user(
    cx: &Context,
    name: String,
    groups: Vec<String>,
    ttl: Duration,
    out: PathBuf,
) -> Result<(), CliError> {
    // Refuse early, before a certificate is issued for nothing.
    let invalid = |source| CliError::Pki {
        op: "create the user",
        source,
    };
    pki::validate_name("user", &name).map_err(invalid)?;
    for group in &groups {
        pki::validate_group(group).map_err(invalid)?;
    }
    if out.exists() {
        return Err(CliError::OutputExists { path: out });
    }
    let client = cx.connect().await?;

    // The key is made here and never sent: the control service signs the CSR.
    let key = pki::new_key_and_csr(&name).map_err(|source| CliError::Pki {
        op: "generate a key",
        source,
    })?;
    let response = client
        .create_user(v1::CreateUserRequest {
            name: name.clone(),
            groups: groups.clone(),
            csr_pem: key.csr_pem,
            ttl_seconds: ttl.as_secs(),
        })
        .await?;
    let v1::CreateUserResponse {
        certificate_pem,
        ca_pem,
    } = response;
    let expires = pki::parse_cert(&certificate_pem)
        .map_err(|source| CliError::Pki {
            op: "read the certificate the control service issued",
            source,
        })?
        .not_after;
    let config = ClientConfig {
        server: client.server().to_owned(),
        ca: ca_pem,
        certificate: certificate_pem,
        key: key.key_pem,
    };
    config.save(&out)?;

    let user = NewUser {
        name,
        groups,
        config: out.display().to_string(),
        server: config.server,
        certificate_expires: rfc3339(expires),
    };
    let text = match cx.format {
        Format::Table => user_text(&user),
        Format::Yaml => yaml(&user)?,
        Format::Json => json(&user)?,
    };
    print(&text)
}

fn user_text(user: &NewUser) -> String {
    let NewUser {
        name,
        groups,
        config,
        server,
        certificate_expires,
    } = user;
    let groups = if groups.is_empty() {
        "none".to_owned()
    } else {
        groups.join(", ")
    };
    let mut out = format!(
        "Wrote {config} (mode 0600: it holds the private key, which was generated here \
         and never sent).\n\n"
    );
    out.push_str(&fields(&[
        ("User", name.clone()),
        ("Groups", groups),
        ("Server", server.clone()),
        ("Expires", certificate_expires.clone()),
    ]));
    out.push_str(&format!(
        "\nWhat {name} may do is decided by Grants naming them (subject: {{ user: {name} }}) \
         or one of their groups; without one, nothing. They use: sluicectl --config {config}\n"
    ));
    out
}

pub async fn remove_node(cx: &Context, name: &str) -> Result<(), CliError> {
    let client = cx.connect().await?;
    client.remove_node(name).await?;
    print(&format!(
        "node/{name} removed: its certificate is revoked and its agent disconnected; \
         it needs a new join token to come back\n"
    ))
}

pub async fn whoami(cx: &Context) -> Result<(), CliError> {
    let client = cx.connect().await?;
    let identity = client.whoami().await?;
    let text = match cx.format {
        Format::Table => identity_text(&identity, client.server()),
        Format::Yaml => yaml(&identity)?,
        Format::Json => json(&identity)?,
    };
    print(&text)
}

fn identity_text(identity: &Identity, server: &str) -> String {
    let Identity { kind, name, groups } = identity;
    let groups = if groups.is_empty() {
        "none".to_owned()
    } else {
        groups.join(", ")
    };
    fields(&[
        ("Kind", kind.clone()),
        ("Name", name.clone()),
        ("Groups", groups),
        ("Server", server.to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_comes_with_its_join_command() {
        let token = JoinToken::new(
            v1::CreateJoinTokenResponse {
                token: "abc.def".to_owned(),
                expires: "2025-01-01T12:10:00Z".to_owned(),
                ca_hash: "sha256:00ff".to_owned(),
            },
            "https://10.0.0.1:7443",
        );
        let now = time::OffsetDateTime::parse(
            "2025-01-01T12:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .expect("RFC 3339")
        .into();
        assert_eq!(
            token_text(&token, now),
            "\
Token:    abc.def
Expires:  2025-01-01T12:10:00Z (in 10m)
CA hash:  sha256:00ff

The token joins one node and is shown only now. On the new node, run (with its name and interfaces):

  sluice-agent join --control https://10.0.0.1:7443 --token abc.def --ca-hash sha256:00ff --node <NAME> --interface <IF>
"
        );
    }

    #[test]
    fn whoami_names_the_server() {
        let identity = Identity {
            kind: "user".to_owned(),
            name: "admin".to_owned(),
            groups: vec!["admins".to_owned()],
        };
        assert_eq!(
            identity_text(&identity, "https://c:7443"),
            "Kind:    user\nName:    admin\nGroups:  admins\nServer:  https://c:7443\n"
        );
    }
}
