//! `sluicectl dashboard`: a dashboard token, printed as the URL to open.

use std::time::{Duration, SystemTime};

use serde::Serialize;
use sluice_api::v1;

use super::Context;
use super::args::Format;
use super::error::CliError;
use super::output::{fields, json, print, yaml};
use super::tables::relative;

/// What `sluicectl dashboard` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DashboardUrl {
    /// `https://HOST:PORT/#token=…`: the token is in the fragment, which the
    /// browser keeps to itself (the page sends it as a bearer header).
    pub url: String,
    pub token: String,
    /// RFC 3339.
    pub expires: String,
}

/// The host part of `https://HOST:PORT` (brackets kept for IPv6): the
/// dashboard is on the same host as the API this config reaches.
fn host_of(server: &str) -> &str {
    let rest = server
        .strip_prefix("https://")
        .or_else(|| server.strip_prefix("http://"))
        .unwrap_or(server);
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

pub fn dashboard_url(server: &str, response: v1::CreateDashboardTokenResponse) -> DashboardUrl {
    let v1::CreateDashboardTokenResponse {
        token,
        expires,
        port,
    } = response;
    DashboardUrl {
        url: format!("https://{}:{port}/#token={token}", host_of(server)),
        token,
        expires,
    }
}

pub async fn dashboard(cx: &Context, ttl: Duration) -> Result<(), CliError> {
    let client = cx.connect().await?;
    let response = client.create_dashboard_token(ttl).await?;
    let url = dashboard_url(client.server(), response);
    let text = match cx.format {
        Format::Table => text(&url, SystemTime::now()),
        Format::Yaml => yaml(&url)?,
        Format::Json => json(&url)?,
    };
    print(&text)
}

fn text(url: &DashboardUrl, now: SystemTime) -> String {
    let mut out = fields(&[
        ("Dashboard", url.url.clone()),
        (
            "Expires",
            format!("{} ({})", url.expires, relative(&url.expires, now)),
        ),
    ]);
    out.push_str(
        "\nOpen the URL in a browser. It shows what your grants let you see, live, until \
         the token expires; anyone holding the URL sees the same, so do not share it. The \
         page is served with the control service's certificate, issued by the cluster CA \
         (the `ca` of your config file): import that CA into the browser to trust it.\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_uses_the_api_host_and_the_dashboard_port_with_the_token_in_the_fragment() {
        let response = |token: &str| v1::CreateDashboardTokenResponse {
            token: token.into(),
            expires: "2026-11-30T18:00:00Z".into(),
            port: 7444,
        };
        assert_eq!(
            dashboard_url("https://cp.example.net:7443", response("ab12")).url,
            "https://cp.example.net:7444/#token=ab12"
        );
        assert_eq!(
            dashboard_url("https://198.19.0.100:7443/", response("x")).url,
            "https://198.19.0.100:7444/#token=x"
        );
        assert_eq!(
            dashboard_url("https://[fd00::1]:7443", response("x")).url,
            "https://[fd00::1]:7444/#token=x"
        );
    }
}
