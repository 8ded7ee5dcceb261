//! The cluster's identity and its transport: a cluster CA, one certificate per node, and QUIC with
//! mutual TLS between nodes (rustls 0.23 with the ring provider, TLS 1.3 only, ALPN `campanile-raft/1`).
//!
//! A node's certificate names its node id in a SAN URI (`urn:campanile:node:N`) and its host (DNS name
//! or IP address). Each side of a connection checks the other's certificate against the cluster CA,
//! so a peer with a certificate from another CA, an expired one, or none at all never completes the
//! handshake, and no request is served to it. The peer's node id is read from its certificate, never
//! from what it says.
//!
//! Files (`campanile certs init` / `campanile certs issue`): the CA folder holds `ca.pem` and `ca.key`;
//! a node's folder holds `ca.pem`, `node.pem` and `node.key`. Keys are written with mode 0600.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of node-to-node traffic.
pub const ALPN: &[u8] = b"campanile-raft/1";
/// How long a node certificate is valid.
pub const NODE_CERT_DAYS: i64 = 825;
/// How long the CA is valid.
pub const CA_DAYS: i64 = 3650;

/// Why certificates could not be made or used. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a cluster's keys")]
    Exists(PathBuf),
    #[error("{path} is not a usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("`{0}` is not a host name or IP address")]
    BadHost(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn generate(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// Writes `text` to a new file (never over an existing one), private when `secret`.
fn write_new(path: &Path, text: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TlsError::Exists(path.to_path_buf())
            } else {
                TlsError::Io {
                    path: path.to_path_buf(),
                    source: e,
                }
            }
        })?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// `campanile certs init`: a new cluster CA in `out`.
pub fn init_ca(out: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    for name in ["ca.pem", "ca.key"] {
        if out.join(name).exists() {
            return Err(TlsError::Exists(out.join(name)));
        }
    }
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Campanile cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(CA_DAYS);
    let cert = params.self_signed(&key).map_err(generate)?;
    write_new(&out.join("ca.key"), &key.serialize_pem(), true)?;
    write_new(&out.join("ca.pem"), &cert.pem(), false)
}

/// `campanile certs issue`: node `node_id`'s certificate for `host`, signed by the CA in `ca_dir`,
/// written with the CA certificate into `out`.
pub fn issue(ca_dir: &Path, node_id: u64, host: &str, out: &Path) -> Result<(), TlsError> {
    let now = time::OffsetDateTime::now_utc();
    issue_valid(
        ca_dir,
        node_id,
        host,
        out,
        now - time::Duration::days(1),
        now + time::Duration::days(NODE_CERT_DAYS),
    )
}

/// `issue` with an explicit validity (tests make expired certificates with it).
pub fn issue_valid(
    ca_dir: &Path,
    node_id: u64,
    host: &str,
    out: &Path,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<(), TlsError> {
    let ca_pem_path = ca_dir.join("ca.pem");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = read(&ca_pem_path)?;
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|_| TlsError::Pem {
        path: ca_key_path.clone(),
        what: "private key",
    })?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|_| TlsError::Pem {
        path: ca_pem_path.clone(),
        what: "CA certificate",
    })?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate)?;

    let host_san = match host.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) if is_dns_name(host) => SanType::DnsName(
            host.to_string()
                .try_into()
                .map_err(|_| TlsError::BadHost(host.chars().take(64).collect()))?,
        ),
        Err(_) => return Err(TlsError::BadHost(host.chars().take(64).collect())),
    };
    let key = KeyPair::generate().map_err(generate)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("campanile node {node_id}"));
    params.subject_alt_names = vec![
        host_san,
        SanType::URI(
            node_uri(node_id)
                .try_into()
                .map_err(|e: rcgen::Error| TlsError::Generate(e.to_string()))?,
        ),
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .map_err(generate)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    write_new(&out.join("node.key"), &key.serialize_pem(), true)?;
    write_new(&out.join("node.pem"), &cert.pem(), false)?;
    write_new(&out.join("ca.pem"), &ca_pem, false)
}

/// Letters, digits and hyphens in dot-separated labels of 1 to 63 characters (RFC 1123).
fn is_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn node_uri(node_id: u64) -> String {
    format!("urn:campanile:node:{node_id}")
}

/// The node id a certificate names, if it names exactly one.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<u64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u
            .strip_prefix("urn:campanile:node:")
            .and_then(|id| id.parse().ok()),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// A node's certificates, loaded from its `--certs` folder.
pub struct NodeIdentity {
    pub node_id: u64,
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NodeIdentity {{ node_id: {}, key: <redacted> }}",
            self.node_id
        )
    }
}

impl NodeIdentity {
    pub fn load(dir: &Path) -> Result<NodeIdentity, TlsError> {
        let pem =
            |name: &str, what: &'static str| -> Result<Vec<CertificateDer<'static>>, TlsError> {
                let path = dir.join(name);
                let text = read(&path)?;
                let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|_| TlsError::Pem {
                        path: path.clone(),
                        what,
                    })?;
                if certs.is_empty() {
                    return Err(TlsError::Pem { path, what });
                }
                Ok(certs)
            };
        let ca = pem("ca.pem", "CA certificate")?.remove(0);
        let chain = pem("node.pem", "node certificate")?;
        let key_path = dir.join("node.key");
        let key = PrivateKeyDer::from_pem_slice(read(&key_path)?.as_bytes()).map_err(|_| {
            TlsError::Pem {
                path: key_path,
                what: "private key",
            }
        })?;
        let node_id = node_id_of(&chain[0]).ok_or(TlsError::Pem {
            path: dir.join("node.pem"),
            what: "node certificate with a campanile node id",
        })?;
        Ok(NodeIdentity {
            node_id,
            ca,
            chain,
            key,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.ca.clone())
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(roots)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(5)).ok());
    Arc::new(t)
}

/// A QUIC endpoint that accepts only cluster members and connects to them with its own certificate.
pub fn endpoint(bind: SocketAddr, id: &NodeIdentity) -> Result<quinn::Endpoint, TlsError> {
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(id.roots()?),
        provider(),
    )
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(cfg)?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
    server.transport_config(transport_config());

    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg)?
        .with_root_certificates(id.roots()?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(cfg)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client));
    client.transport_config(transport_config());

    let mut endpoint = quinn::Endpoint::server(server, bind).map_err(|e| TlsError::Io {
        path: PathBuf::from(bind.to_string()),
        source: e,
    })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The node id in the certificate the other side of `conn` presented.
pub fn peer_node_id(conn: &quinn::Connection) -> Option<u64> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().and_then(node_id_of)
}

/// Largest request or response on a stream.
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Sends one request on a new stream of `conn` and reads the whole response.
pub async fn request(conn: &quinn::Connection, body: &[u8]) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(body).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    recv.read_to_end(MAX_MESSAGE)
        .await
        .map_err(|e| e.to_string())
}

/// Serves every stream of an accepted connection with `handler(peer node id, request) -> response`.
pub async fn serve_connection<F, Fut>(conn: quinn::Connection, handler: F)
where
    F: Fn(u64, Vec<u8>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Vec<u8>> + Send,
{
    let Some(peer) = peer_node_id(&conn) else {
        tracing::warn!(remote = %conn.remote_address(), "cluster peer's certificate names no node id; closing");
        conn.close(quinn::VarInt::from_u32(1), b"no node id in certificate");
        return;
    };
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let Ok(req) = recv.read_to_end(MAX_MESSAGE).await else {
                return;
            };
            let resp = handler(peer, req).await;
            let _ = send.write_all(&resp).await;
            let _ = send.finish();
        });
    }
}

/// Accepts cluster connections on `endpoint` until it closes, serving each with `handler`. A handshake
/// that fails (no certificate, another CA's, an expired one) is logged with the peer's address and
/// never reaches the handler.
pub async fn accept<F, Fut>(endpoint: quinn::Endpoint, handler: F)
where
    F: Fn(u64, Vec<u8>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Vec<u8>> + Send,
{
    while let Some(incoming) = endpoint.accept().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, handler).await,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a cluster connection")
                }
            }
        });
    }
}
