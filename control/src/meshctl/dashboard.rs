//! `meshctl dashboard`: the URL of the control plane's live service graph, checked
//! to answer first (so a wrong `--control-admin`, or a control plane too old to
//! serve it, is said here rather than in a browser), and with `--open` handed to
//! the desktop's browser.

use std::time::Duration;

use serde::Serialize;

use super::{
    error::{MeshctlError, Target},
    http::BaseUrl,
};

/// The page's path on the control plane's admin endpoint.
pub const PATH: &str = "/dashboard";

/// What `meshctl dashboard` found.
#[derive(Debug, Serialize)]
pub struct Dashboard {
    pub url: String,
    /// With `--open`: `None` if the browser was started, else why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_error: Option<String>,
    pub opened: bool,
}

/// Checks that `control` serves the dashboard; with `open`, starts `xdg-open` on it.
pub async fn gather(control: &BaseUrl, timeout: Duration, open: bool) -> Result<Dashboard, MeshctlError> {
    let (status, body) = control.get(Target::ControlAdmin, PATH, timeout).await?;
    if !status.is_success() {
        return Err(MeshctlError::Status {
            target: Target::ControlAdmin,
            url: control.url.clone(),
            path: PATH.into(),
            status: status.to_string(),
            body: format!(
                "{} (a control plane older than this meshctl serves no dashboard)",
                String::from_utf8_lossy(&body).trim()
            ),
        });
    }
    let url = format!("{}{PATH}", control.url);
    let open_error = if open { xdg_open(&url).err() } else { None };
    Ok(Dashboard { opened: open && open_error.is_none(), open_error, url })
}

/// Starts the desktop's browser on `url` without waiting for it.
fn xdg_open(url: &str) -> Result<(), String> {
    std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("xdg-open: {e}"))
}

pub fn render(d: &Dashboard) -> String {
    let mut out = format!("{}\n", d.url);
    if d.opened {
        out.push_str("opened in the browser (xdg-open)\n");
    }
    if let Some(e) = &d.open_error {
        out.push_str(&format!("could not open a browser ({e}); open the URL above yourself\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot admin endpoint answering `status` to one request.
    async fn serve_once(status: &'static str) -> BaseUrl {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let body = "page";
            let reply = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            let _ = s.write_all(reply.as_bytes()).await;
        });
        BaseUrl::parse("--control-admin", &format!("http://{addr}")).unwrap()
    }

    #[tokio::test]
    async fn prints_the_url_once_the_page_answers() {
        let base = serve_once("200 OK").await;
        let d = gather(&base, Duration::from_secs(5), false).await.unwrap();
        assert_eq!(d.url, format!("{}/dashboard", base.url));
        assert_eq!(render(&d), format!("{}\n", d.url));
    }

    #[tokio::test]
    async fn names_the_address_when_the_page_is_missing_or_nothing_answers() {
        let base = serve_once("404 Not Found").await;
        let e = gather(&base, Duration::from_secs(5), false).await.unwrap_err().to_string();
        assert!(e.contains(&base.url) && e.contains("404") && e.contains("older"), "{e}");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let closed = BaseUrl::parse("--control-admin", &format!("http://127.0.0.1:{port}")).unwrap();
        let e = gather(&closed, Duration::from_secs(5), false).await.unwrap_err().to_string();
        assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("--control-admin"), "{e}");
    }
}
