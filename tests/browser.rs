//! A real browser: headless Chromium loads a page over https and talks
//! wss to the server's echo endpoint. The test certificate is trusted by
//! its key (`--ignore-certificate-errors-spki-list`, nothing wider), and
//! the endpoint allows the page's Origin only. CI installs Chromium and
//! sets CORERELAY_REQUIRE_BROWSER, so there the test cannot pass without
//! running; elsewhere, without Chromium, it says so and returns.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use corerelay::config::Config;
use corerelay::Server;

use crate::support::KillOnDrop;

/// The browser's whole run, start-up included (a first start on a fresh
/// machine is slow).
const BROWSER_WAIT: Duration = Duration::from_secs(60);

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// Serves the page and records `/result?...` requests, each connection on
/// its own thread (the browser opens spare connections it may never use).
fn page_server(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    html: String,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (tls, html, tx) = (tls.clone(), html.clone(), tx.clone());
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(BROWSER_WAIT));
                let Ok(conn) = rustls::ServerConnection::new(tls) else {
                    return;
                };
                let mut s = rustls::StreamOwned::new(conn, stream);
                let mut line = String::new();
                let mut r = BufReader::new(&mut s);
                if r.read_line(&mut line).is_err() {
                    return;
                }
                // The rest of the head (bounded by the read timeout).
                let mut h = String::new();
                while r.read_line(&mut h).is_ok_and(|n| n > 2) {
                    h.clear();
                }
                let target = line.split(' ').nth(1).unwrap_or("").to_owned();
                let (status, body) = if target == "/" {
                    ("200 OK", html.as_str())
                } else if target.starts_with("/result") {
                    let _ = tx.send(target);
                    ("200 OK", "done")
                } else {
                    ("404 Not Found", "")
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.flush();
            });
        }
    });
    rx
}

#[test]
fn chromium_on_an_https_page_echoes_over_wss() {
    use rcgen::PublicKeyData;
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CORERELAY_REQUIRE_BROWSER").is_none(),
            "CORERELAY_REQUIRE_BROWSER is set but no Chromium was found"
        );
        eprintln!("chromium is not installed: the browser test did not run (CI installs it)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("corerelay-browser-{}", std::process::id()));
    let (ck, cert, key) = crate::support::test_cert(&dir);
    let spki = {
        use base64::Engine;
        use sha2::Digest;
        let h = sha2::Sha256::digest(ck.signing_key.subject_public_key_info());
        base64::engine::general_purpose::STANDARD.encode(h)
    };

    let page = TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = format!("https://{}", page.local_addr().unwrap());
    let yaml = format!(
        "workers: 2\npin: false\nrely: {{listen: []}}\nwebsocket:\n  listen: [\"127.0.0.1:0\"]\n  tls: {{cert: \"{}\", key: \"{}\"}}\n  endpoints:\n    - path: /echo\n      on_message: echo\n      allowed_origins: [\"{origin}\"]\n",
        cert.display(),
        key.display()
    );
    let server = Server::start(Config::from_yaml(&yaml, None).expect("config")).expect("starts");
    let ws = server.ws_addrs()[0];
    let html = format!(
        "<!doctype html><title>corerelay</title><p id=out>waiting</p><script>\n\
         const ws = new WebSocket('wss://{ws}/echo');\n\
         ws.onopen = () => ws.send('hello from chromium');\n\
         ws.onmessage = (e) => {{\n\
           document.getElementById('out').textContent = e.data;\n\
           location.href = '/result?echo=' + encodeURIComponent(document.getElementById('out').textContent);\n\
         }};\n\
         ws.onerror = () => {{ location.href = '/result?error'; }};\n\
         </script>"
    );
    let tls = {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = vec![CertificateDer::from(ck.cert.der().to_vec())];
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap()
    };
    let results = page_server(page, Arc::new(tls), html);

    let profile = dir.join("profile");
    let _browser = KillOnDrop(
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                // Nothing beyond loopback: no updates, sync or reporting.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-domain-reliability",
                "--no-first-run",
                "--no-default-browser-check",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--ignore-certificate-errors-spki-list={spki}"))
            .arg(format!("{origin}/"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts"),
    );
    let result = results
        .recv_timeout(BROWSER_WAIT)
        .expect("the page reports within the wait");
    assert_eq!(result, "/result?echo=hello%20from%20chromium");
    assert_eq!(server.metrics().ws_upgrades, 1);
    assert_eq!(server.metrics().tls_errors, 0);
}
