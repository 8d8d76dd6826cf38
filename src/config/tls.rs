//! TLS client settings for wss:// sources.

use std::path::Path;

/// The TLS client settings for a wss:// source: rustls with the ring
/// provider, trusting `ca_file` if given, else the Mozilla roots.
pub fn tls_client_config(
    ca_file: Option<&Path>,
) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let certs =
                CertificateDer::pem_file_iter(p).map_err(|e| format!("{}: {e}", p.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("{}: {e}", p.display()))?;
                roots.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no certificate found", p.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// A listener's `tls:` block as written.
#[derive(Debug, serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFile {
    /// PEM certificate chain, leaf first.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<std::path::PathBuf>,
}

/// Validated TLS for a section's listeners: rustls's server settings.
#[derive(Clone)]
pub struct ServerTls {
    /// The certificate file, for logs.
    pub cert: std::path::PathBuf,
    /// What every accepted connection shares.
    pub config: std::sync::Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({})", self.cert.display())
    }
}

impl TlsFile {
    /// Reads and checks the files; errors are (key under `tls.`, message).
    pub fn validate(self) -> Result<ServerTls, (&'static str, String)> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let cert = self
            .cert
            .ok_or(("cert", "set cert (a PEM certificate chain)".to_owned()))?;
        let key = self
            .key
            .ok_or(("key", "set key (a PEM private key)".to_owned()))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .map_err(|e| ("cert", format!("{}: {e}", cert.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| ("cert", format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(("cert", format!("{}: no certificate found", cert.display())));
        }
        let pk = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| ("key", format!("{}: {e}", key.display())))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ("cert", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, pk)
            .map_err(|e| {
                (
                    "key",
                    format!("{} does not fit {}: {e}", key.display(), cert.display()),
                )
            })?;
        Ok(ServerTls {
            cert,
            config: std::sync::Arc::new(config),
        })
    }
}
