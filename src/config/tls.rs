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

/// The certificate a TLS listener presents, swappable while running: a
/// SIGHUP reads the files again and later handshakes get the new one
/// (connections already open keep their session). The lock is held for a
/// pointer copy on either side, never across I/O.
#[derive(Debug)]
pub struct ReloadableCert(std::sync::RwLock<std::sync::Arc<rustls::sign::CertifiedKey>>);

impl rustls::server::ResolvesServerCert for ReloadableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        self.0.read().ok().map(|k| k.clone())
    }
}

/// Validated TLS for a section's listeners: rustls's server settings.
#[derive(Clone)]
pub struct ServerTls {
    /// The certificate file, for logs.
    pub cert: std::path::PathBuf,
    /// The key file.
    pub key: std::path::PathBuf,
    /// What every accepted connection shares.
    pub config: std::sync::Arc<rustls::ServerConfig>,
    /// The certificate it presents (replaced by [`ServerTls::reload`]).
    pub current: std::sync::Arc<ReloadableCert>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServerTls({}, {})",
            self.cert.display(),
            self.key.display()
        )
    }
}

/// Reads a chain and its key into what rustls signs with; errors are (key
/// under `tls.`, message).
fn certified_key(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<rustls::sign::CertifiedKey, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ("cert", format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ("cert", format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(("cert", format!("{}: no certificate found", cert.display())));
    }
    let pk = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ("key", format!("{}: {e}", key.display())))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&pk)
        .map_err(|e| ("key", format!("{}: {e}", key.display())))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        (
            "key",
            format!("{} does not fit {}: {e}", key.display(), cert.display()),
        )
    })?;
    Ok(ck)
}

impl ServerTls {
    /// Reads the files again (`cert` and `key` as now configured) and
    /// presents them from the next handshake on. On error the old
    /// certificate stays.
    pub fn reload(&self, cert: &std::path::Path, key: &std::path::Path) -> Result<(), String> {
        let ck = certified_key(cert, key).map_err(|(_, m)| m)?;
        let mut cur = self
            .current
            .0
            .write()
            .map_err(|_| "certificate lock poisoned".to_owned())?;
        *cur = std::sync::Arc::new(ck);
        Ok(())
    }
}

impl TlsFile {
    /// Reads and checks the files; errors are (key under `tls.`, message).
    pub fn validate(self) -> Result<ServerTls, (&'static str, String)> {
        let cert = self
            .cert
            .ok_or(("cert", "set cert (a PEM certificate chain)".to_owned()))?;
        let key = self
            .key
            .ok_or(("key", "set key (a PEM private key)".to_owned()))?;
        let ck = certified_key(&cert, &key)?;
        let current = std::sync::Arc::new(ReloadableCert(std::sync::RwLock::new(
            std::sync::Arc::new(ck),
        )));
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ("cert", e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        Ok(ServerTls {
            cert,
            key,
            config: std::sync::Arc::new(config),
            current,
        })
    }
}
