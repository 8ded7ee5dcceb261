//! Raft's network. A single-node cluster needs none (`NetworkFactory::Local`: every RPC reports the
//! peer unreachable). A multi-node cluster sends Raft RPCs over QUIC with mutual TLS (`tls`): one
//! connection per peer, one bidirectional stream per RPC, JSON bodies, and the peer's node id checked
//! against its certificate on every new connection.

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::{Deserialize, Serialize};

use crate::store::{RaftNodeId, TypeConfig};
use crate::tls;

/// One request between members on the wire.
#[derive(Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<RaftNodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A new node asks to join (forwarded to the leader by whoever receives it).
    Join {
        node: RaftNodeId,
        raft_addr: String,
    },
    /// A write received by a follower, forwarded to the leader.
    Write(crate::Command),
    /// A follower asks the leader for a read index: the leader confirms it still leads (a heartbeat
    /// round to a quorum) and answers its commit index; the follower serves the read once it has
    /// applied that far. Answer: `Result<u64, String>`.
    ReadIndex,
    /// Remove a member (sent to the leader). Answer: `Result<(), String>`.
    Remove {
        node: RaftNodeId,
    },
    /// Asks for the member's wall clock (`clock`). Answer: microseconds since the Unix epoch.
    Clock,
}

/// How long a forwarded request waits for a connection to the leader.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Sends one request to whoever listens at `addr`, as long as its certificate is the cluster's.
pub async fn request_addr(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    rpc: &RaftRpc,
) -> Result<Vec<u8>, ForwardError> {
    let body = serde_json::to_vec(rpc).map_err(|e| ForwardError::NotSent(e.to_string()))?;
    let conn = connect_addr(endpoint, addr).await?;
    let reply = tls::request(&conn, &body)
        .await
        .map_err(|e| ForwardError::Unknown(format!("{addr}: {e}")));
    conn.close(quinn::VarInt::from_u32(0), b"done");
    reply
}

/// A new connection to whoever listens at `addr`, as long as its certificate is the cluster's.
pub async fn connect_addr(
    endpoint: &quinn::Endpoint,
    addr: std::net::SocketAddr,
) -> Result<quinn::Connection, ForwardError> {
    // A dead peer never answers the handshake: give up on it fast, the caller retries elsewhere.
    let connecting = endpoint
        .connect(addr, &addr.ip().to_string())
        .map_err(|e| ForwardError::NotSent(e.to_string()))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            ForwardError::NotSent(format!("{addr}: no answer within {CONNECT_TIMEOUT:?}"))
        })?
        .map_err(|e| ForwardError::NotSent(format!("{addr}: {e}")))
}

/// Why a forwarded request has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// Nothing reached the peer: safe to send again (to whoever leads now).
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request left; whether it was applied is unknown, so it must not be sent again blindly.
    #[error("sent, no answer: {0}")]
    Unknown(String),
}

/// Creates a client per peer.
#[derive(Clone)]
pub enum NetworkFactory {
    /// Single-node: no peers to reach.
    Local,
    /// Peers over QUIC/mTLS from this endpoint.
    Quic(quinn::Endpoint),
}

/// A client for one peer.
pub struct PeerClient {
    target: RaftNodeId,
    addr: String,
    endpoint: Option<quinn::Endpoint>,
    conn: Option<quinn::Connection>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: RaftNodeId, node: &BasicNode) -> Self::Network {
        PeerClient {
            target,
            addr: node.addr.clone(),
            endpoint: match self {
                NetworkFactory::Local => None,
                NetworkFactory::Quic(e) => Some(e.clone()),
            },
            conn: None,
        }
    }
}

fn unreachable<E: std::error::Error>(why: String) -> RPCError<RaftNodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)))
}

impl PeerClient {
    /// The open connection to the peer, after checking its certificate names the node we want.
    async fn connection(&mut self) -> Result<quinn::Connection, String> {
        if let Some(c) = self.conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let Some(endpoint) = &self.endpoint else {
            return Err(format!(
                "node {} cannot be reached: this node runs alone",
                self.target
            ));
        };
        let addr: std::net::SocketAddr = self.addr.parse().map_err(|_| {
            format!(
                "node {}'s raft address `{}` is not host:port",
                self.target, self.addr
            )
        })?;
        let conn = endpoint
            .connect(addr, &addr.ip().to_string())
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("node {} at {addr}: {e}", self.target))?;
        match tls::peer_node_id(&conn) {
            Some(id) if id == self.target => {}
            other => {
                conn.close(quinn::VarInt::from_u32(2), b"wrong node");
                return Err(format!(
                    "{addr} presented node {other:?}'s certificate, not node {}'s",
                    self.target
                ));
            }
        }
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    async fn call<R, E>(
        &mut self,
        rpc: RaftRpc,
    ) -> Result<R, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, E>>>
    where
        R: for<'de> Deserialize<'de>,
        E: std::error::Error + for<'de> Deserialize<'de>,
    {
        let body =
            serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let conn = self.connection().await.map_err(unreachable)?;
        let reply = match tls::request(&conn, &body).await {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                return Err(unreachable(format!("node {}: {e}", self.target)));
            }
        };
        let result: Result<R, RaftError<RaftNodeId, E>> =
            serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        AppendEntriesResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>,
    > {
        self.call(RaftRpc::AppendEntries(rpc)).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftNodeId>,
        RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId, InstallSnapshotError>>,
    > {
        self.call(RaftRpc::InstallSnapshot(rpc)).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftNodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<RaftNodeId>, RPCError<RaftNodeId, BasicNode, RaftError<RaftNodeId>>>
    {
        self.call(RaftRpc::Vote(rpc)).await
    }
}

/// What a member does with the requests that are not Raft's own.
pub trait MemberHandler: Send + Sync + 'static {
    fn join(
        &self,
        node: RaftNodeId,
        raft_addr: String,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
    fn write(
        &self,
        cmd: crate::Command,
    ) -> impl std::future::Future<Output = Result<(crate::Response, u64), String>> + Send;
    fn read_index(&self) -> impl std::future::Future<Output = Result<u64, String>> + Send;
    fn remove(
        &self,
        node: RaftNodeId,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Serves requests from authenticated peers on `endpoint` until it closes.
pub async fn serve<H: MemberHandler>(endpoint: quinn::Endpoint, raft: Raft<TypeConfig>, member: H) {
    let raft = Arc::new(raft);
    let member = Arc::new(member);
    tls::accept(endpoint, move |peer, body| {
        let (raft, member) = (raft.clone(), member.clone());
        async move {
            let reply = match serde_json::from_slice::<RaftRpc>(&body) {
                Ok(RaftRpc::AppendEntries(r)) => serde_json::to_vec(&raft.append_entries(r).await),
                Ok(RaftRpc::Vote(r)) => serde_json::to_vec(&raft.vote(r).await),
                Ok(RaftRpc::InstallSnapshot(r)) => {
                    serde_json::to_vec(&raft.install_snapshot(r).await)
                }
                Ok(RaftRpc::Join { node, raft_addr }) => {
                    serde_json::to_vec(&member.join(node, raft_addr).await)
                }
                Ok(RaftRpc::Write(cmd)) => serde_json::to_vec(&member.write(cmd).await),
                Ok(RaftRpc::ReadIndex) => serde_json::to_vec(&member.read_index().await),
                Ok(RaftRpc::Remove { node }) => serde_json::to_vec(&member.remove(node).await),
                Ok(RaftRpc::Clock) => serde_json::to_vec(&crate::clock::wall_us()),
                Err(e) => {
                    tracing::warn!(peer, error = %e, "unreadable request from a cluster peer");
                    Ok(Vec::new())
                }
            };
            reply.unwrap_or_default()
        }
    })
    .await
}
