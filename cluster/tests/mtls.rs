//! Issue 4, "let nobody join who does not hold the cluster's certificate": QUIC with mutual TLS
//! between nodes. Two members talk and each learns the other's node id from its certificate; a
//! peer with a certificate from another CA, an expired certificate or none never gets a request served.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use campanile_cluster::tls::{self, NodeIdentity};

struct Cluster {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    root: std::path::PathBuf,
}

fn cluster_ca() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    tls::init_ca(&ca).unwrap();
    Cluster {
        root: dir.path().to_path_buf(),
        ca,
        _dir: dir,
    }
}

fn node(c: &Cluster, id: u64) -> NodeIdentity {
    let out = c.root.join(format!("node{id}"));
    tls::issue(&c.ca, id, "127.0.0.1", &out).unwrap();
    NodeIdentity::load(&out).unwrap()
}

/// A server that answers every request with "<peer id>:<request>" and counts what it served.
fn serve(id: &NodeIdentity) -> (quinn::Endpoint, SocketAddr, Arc<AtomicUsize>) {
    let ep = tls::endpoint("127.0.0.1:0".parse().unwrap(), id).unwrap();
    let addr = ep.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(tls::accept(ep.clone(), move |peer, req| {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            format!("{peer}:{}", String::from_utf8_lossy(&req)).into_bytes()
        }
    }));
    (ep, addr, served)
}

/// Connects and sends one request; the error text when anything fails.
async fn ask(from: &NodeIdentity, to: SocketAddr) -> Result<(Option<u64>, String), String> {
    let ep = tls::endpoint("127.0.0.1:0".parse().unwrap(), from).unwrap();
    let conn = tokio::time::timeout(Duration::from_secs(5), async {
        ep.connect(to, "127.0.0.1")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| "connect timed out".to_string())??;
    let reply = tokio::time::timeout(Duration::from_secs(5), tls::request(&conn, b"ping"))
        .await
        .map_err(|_| "request timed out".to_string())??;
    Ok((
        tls::peer_node_id(&conn),
        String::from_utf8_lossy(&reply).to_string(),
    ))
}

#[tokio::test]
async fn members_talk_and_learn_each_others_node_id_from_the_certificate() {
    let c = cluster_ca();
    let (a, b) = (node(&c, 1), node(&c, 2));
    let (_ep, addr, served) = serve(&a);
    let (server_id, reply) = ask(&b, addr).await.unwrap();
    assert_eq!(server_id, Some(1));
    assert_eq!(
        reply, "2:ping",
        "the server saw the client's id from its certificate"
    );
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_and_nothing_is_served() {
    let ours = cluster_ca();
    let theirs = cluster_ca();
    let (member, stranger) = (node(&ours, 1), node(&theirs, 9));
    let (_ep, addr, served) = serve(&member);
    let err = ask(&stranger, addr).await.unwrap_err();
    assert!(!err.is_empty());
    // And a member does not accept a stranger posing as a server either.
    let (_ep2, stranger_addr, stranger_served) = serve(&stranger);
    assert!(ask(&member, stranger_addr).await.is_err());
    assert_eq!(served.load(Ordering::SeqCst), 0);
    assert_eq!(stranger_served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let c = cluster_ca();
    let member = node(&c, 1);
    let out = c.root.join("expired");
    let now = time::OffsetDateTime::now_utc();
    tls::issue_valid(
        &c.ca,
        3,
        "127.0.0.1",
        &out,
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    )
    .unwrap();
    let expired = NodeIdentity::load(&out).unwrap();
    let (_ep, addr, served) = serve(&member);
    assert!(ask(&expired, addr).await.is_err());
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let c = cluster_ca();
    let member = node(&c, 1);
    let (_ep, addr, served) = serve(&member);
    // A client that trusts our CA but presents no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(c.ca.join("ca.pem")).unwrap();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![tls::ALPN.to_vec()];
    let qcfg = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qcfg)));
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        let conn = ep
            .connect(addr, "127.0.0.1")
            .unwrap()
            .await
            .map_err(|e| e.to_string())?;
        tls::request(&conn, b"ping").await
    })
    .await;
    assert!(
        !matches!(outcome, Ok(Ok(_))),
        "a client without a certificate was served"
    );
    assert_eq!(served.load(Ordering::SeqCst), 0);
}

#[test]
fn keys_are_private_and_existing_keys_are_never_overwritten() {
    use std::os::unix::fs::PermissionsExt;
    let c = cluster_ca();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&c.ca.join("ca.key")), 0o600);
    assert!(matches!(tls::init_ca(&c.ca), Err(tls::TlsError::Exists(_))));
    let out = c.root.join("n1");
    tls::issue(&c.ca, 1, "node1.example.net", &out).unwrap();
    assert_eq!(mode(&out.join("node.key")), 0o600);
    assert!(matches!(
        tls::issue(&c.ca, 1, "node1.example.net", &out),
        Err(tls::TlsError::Exists(_))
    ));
    assert_eq!(NodeIdentity::load(&out).unwrap().node_id, 1);
    let err = tls::issue(&c.ca, 2, "not a host!", &c.root.join("n2")).unwrap_err();
    assert!(err.to_string().contains("not a host"), "{err}");
}
