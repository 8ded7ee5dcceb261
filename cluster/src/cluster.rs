//! `Cluster`: the handle the rest of the node uses to propose commands and read the applied state.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use tokio::sync::watch;

use crate::command::{Command, Response};
use crate::domain::NodeId;
use crate::network::NetworkFactory;
use crate::state::State;
use crate::store::{Applied, Db, LogStore, OpenError, StateMachineStore, TypeConfig};

/// How long a write may wait to be committed before the caller is told the cluster is unavailable.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a leader keeps trying to confirm its leadership for a linearizable read before it
/// answers that it cannot reach a quorum. openraft gives each confirmation one heartbeat interval
/// (100 ms) for the followers' answers, which a busy machine (a snapshot being written, a burst of
/// calls) can miss with nothing wrong: a 100,000-citizen benchmark once got a 503 on a campaign read
/// that way. A leader really cut off keeps failing and says so after this long.
const CONFIRM_LEADERSHIP_FOR: Duration = Duration::from_secs(1);

/// Why the replicated store failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot start Raft: {0}")]
    Start(String),
    #[error("no Raft leader was elected within {0:?}; check the data directory and the logs")]
    NoLeader(Duration),
    #[error("this node is not the leader{}; send writes to the leader", leader.map(|l| format!(" (node {l} is)")).unwrap_or_default())]
    NotLeader { leader: Option<u64> },
    #[error("the write was not committed within {0:?}: no quorum; it may still be applied later")]
    Timeout(Duration),
    #[error("Raft stopped: {0}")]
    Fatal(String),
    #[error("{0}")]
    NoQuorum(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unsent(String),
    #[error("{0}")]
    Forward(String),
}

/// Voters a cluster grows to as nodes join by default; later nodes stay learners.
pub const MAX_VOTERS: usize = 3;

impl crate::network::MemberHandler for Cluster {
    async fn join(&self, node: u64, raft_addr: String) -> Result<(), String> {
        let status = self.status();
        match status.leader {
            Some(l) if l == self.inner.node_id.0 => {}
            Some(l) => {
                let reply = self
                    .forward(
                        l,
                        &crate::network::RaftRpc::Join {
                            node,
                            raft_addr: raft_addr.clone(),
                        },
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                return serde_json::from_slice::<Result<(), String>>(&reply)
                    .map_err(|e| e.to_string())?;
            }
            None => return Err("no leader yet; try again".into()),
        }
        self.add_learner(NodeId(node), &raft_addr)
            .await
            .map_err(|e| e.to_string())?;
        let voters: Vec<u64> = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        if voters.len() < self.inner.options.voters && !voters.contains(&node) {
            let mut all: Vec<NodeId> = voters.into_iter().map(NodeId).collect();
            all.push(NodeId(node));
            self.change_membership(&all)
                .await
                .map_err(|e| e.to_string())?;
        }
        tracing::info!(node, raft = %raft_addr, "node joined the cluster");
        Ok(())
    }

    async fn write(&self, cmd: Command) -> Result<(Response, u64), String> {
        self.write_indexed(cmd).await.map_err(|e| e.to_string())
    }

    async fn read_index(&self) -> Result<u64, String> {
        self.read_index_here().await.map_err(|e| e.to_string())
    }

    async fn remove(&self, node: u64) -> Result<(), String> {
        self.remove_member_here(NodeId(node))
            .await
            .map_err(|e| e.to_string())
    }
}

/// How a member of a multi-node cluster reaches its peers.
#[derive(Clone)]
pub struct MemberNet {
    /// The QUIC endpoint (see `tls::endpoint`), bound at `raft_addr`.
    pub endpoint: quinn::Endpoint,
    pub raft_addr: std::net::SocketAddr,
    /// Initialise a new cluster if the store is empty.
    pub bootstrap: bool,
}

/// Tuning of log compaction; the defaults suit production.
#[derive(Debug, Clone, Copy)]
pub struct ClusterOptions {
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot (for followers that lag a little).
    pub keep_behind_snapshot: u64,
    /// Purge the log only when at least this many entries can go at once.
    pub purge_batch: u64,
    /// Voters the cluster grows to as nodes join; later nodes stay learners.
    pub voters: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            snapshot_every: 10_000,
            keep_behind_snapshot: 1_000,
            purge_batch: 256,
            voters: MAX_VOTERS,
        }
    }
}

/// A summary of Raft's view on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: u64,
    /// Index of the last snapshot, if any.
    pub snapshot_index: Option<u64>,
    /// Index up to which the log was purged, if any.
    pub purged_index: Option<u64>,
}

struct Inner {
    node_id: NodeId,
    raft: Raft<TypeConfig>,
    applied: Arc<RwLock<Applied>>,
    applied_index: watch::Receiver<u64>,
    db: Db,
    net: Option<MemberNet>,
    options: ClusterOptions,
    /// The last probes of each other member's clock (`probe_clocks`).
    clocks: std::sync::Mutex<BTreeMap<u64, crate::clock::ClockFilter>>,
}

/// The replicated state of this node.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl Cluster {
    /// Opens (or creates) the store under `data_dir/raft`, starts Raft, initialises a single-voter
    /// cluster if the store is new, and waits until this node leads.
    pub async fn open(node_id: NodeId, data_dir: &Path) -> Result<Cluster, ClusterError> {
        Cluster::open_with(node_id, data_dir, ClusterOptions::default()).await
    }

    /// `open` with explicit compaction settings.
    pub async fn open_with(
        node_id: NodeId,
        data_dir: &Path,
        options: ClusterOptions,
    ) -> Result<Cluster, ClusterError> {
        Cluster::start(node_id, data_dir, options, None).await
    }

    /// Opens a member of a multi-node cluster: Raft RPCs go over QUIC with mutual TLS from `net`,
    /// whose certificates prove who every peer is. With `bootstrap` and an empty store, this node
    /// initialises a one-voter cluster at `net.raft_addr`; otherwise it waits to be added by the
    /// leader (`add_learner`, `change_membership`). Returns without waiting for a leader.
    pub async fn open_member(
        node_id: NodeId,
        data_dir: &Path,
        options: ClusterOptions,
        net: MemberNet,
    ) -> Result<Cluster, ClusterError> {
        Cluster::start(node_id, data_dir, options, Some(net)).await
    }

    async fn start(
        node_id: NodeId,
        data_dir: &Path,
        options: ClusterOptions,
        net: Option<MemberNet>,
    ) -> Result<Cluster, ClusterError> {
        let db = Db::open(&data_dir.join("raft"))?;
        let mut log = LogStore::new(db.clone());
        let sm =
            StateMachineStore::open(db.clone()).map_err(|e| ClusterError::Start(e.to_string()))?;
        let fresh = log
            .get_log_state()
            .await
            .map_err(|e| ClusterError::Start(e.to_string()))?
            .last_log_id
            .is_none()
            && log
                .read_vote()
                .await
                .map_err(|e| ClusterError::Start(e.to_string()))?
                .is_none();
        let config = Config {
            cluster_name: "campanile".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(options.snapshot_every),
            max_in_snapshot_log_to_keep: options.keep_behind_snapshot,
            purge_batch_size: options.purge_batch,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Start(e.to_string()))?;
        let applied = sm.applied();
        let applied_index = sm.applied_index();
        let factory = match &net {
            None => NetworkFactory::Local,
            Some(n) => NetworkFactory::Quic(n.endpoint.clone()),
        };
        let raft = Raft::new(node_id.0, Arc::new(config), factory, log, sm)
            .await
            .map_err(|e| ClusterError::Start(e.to_string()))?;
        match &net {
            None => {
                if fresh {
                    let mut members = BTreeMap::new();
                    members.insert(node_id.0, BasicNode::new("local"));
                    raft.initialize(members)
                        .await
                        .map_err(|e| ClusterError::Start(e.to_string()))?;
                    tracing::info!(node = %node_id, "initialised a new single-node cluster");
                }
                let timeout = Duration::from_secs(10);
                raft.wait(Some(timeout))
                    .metrics(|m| m.current_leader == Some(node_id.0), "this node leads")
                    .await
                    .map_err(|_| ClusterError::NoLeader(timeout))?;
            }
            Some(n) => {
                if fresh && n.bootstrap {
                    let mut members = BTreeMap::new();
                    members.insert(node_id.0, BasicNode::new(n.raft_addr.to_string()));
                    raft.initialize(members)
                        .await
                        .map_err(|e| ClusterError::Start(e.to_string()))?;
                    tracing::info!(node = %node_id, raft = %n.raft_addr, "initialised a new cluster");
                }
            }
        }
        let cluster = Cluster {
            inner: Arc::new(Inner {
                node_id,
                raft: raft.clone(),
                applied,
                applied_index,
                db,
                net: net.clone(),
                options,
                clocks: Default::default(),
            }),
        };
        if let Some(n) = &net {
            tokio::spawn(crate::network::serve(
                n.endpoint.clone(),
                raft,
                cluster.clone(),
            ));
        }
        Ok(cluster)
    }

    /// Proposes `cmd` and waits until it is committed and applied; returns what the state machine said.
    /// On a follower of a multi-node cluster the write is forwarded to the leader.
    pub async fn write(&self, cmd: Command) -> Result<Response, ClusterError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        loop {
            let result = match self.write_here(cmd.clone()).await {
                Err(ClusterError::NotLeader {
                    leader: Some(leader),
                }) if self.inner.net.is_some() => self.forward_write(leader, cmd.clone()).await,
                // An election is under way: wait for its winner.
                Err(e @ ClusterError::NotLeader { leader: None }) if self.inner.net.is_some() => {
                    Err(e)
                }
                other => return other,
            };
            match result {
                // The leader we knew is gone and the write never reached it: ask again who leads,
                // until the deadline. A write that may have arrived is never sent twice, and
                // nothing is acknowledged without the leader's answer.
                Err(ClusterError::Unsent(_) | ClusterError::NotLeader { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    self.await_other_leader().await;
                }
                other => return other,
            }
        }
    }

    /// `write` without forwarding: this node must lead.
    pub async fn write_here(&self, cmd: Command) -> Result<Response, ClusterError> {
        self.write_indexed(cmd).await.map(|(r, _)| r)
    }

    /// `write_here`, also returning the log index the command was applied at.
    async fn write_indexed(&self, cmd: Command) -> Result<(Response, u64), ClusterError> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.inner.raft.client_write(cmd)).await {
            Err(_) => Err(ClusterError::Timeout(WRITE_TIMEOUT)),
            Ok(Ok(r)) => Ok((r.data, r.log_id.index)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(ClusterError::NotLeader {
                    leader: f.leader_id,
                })
            }
            Ok(Err(e)) => Err(ClusterError::Fatal(e.to_string())),
        }
    }

    /// The raft address of member `node`, from the membership this node knows.
    fn member_addr(&self, node: u64) -> Option<std::net::SocketAddr> {
        let m = self.inner.raft.metrics().borrow().clone();
        let addr = m
            .membership_config
            .membership()
            .nodes()
            .find(|(id, _)| **id == node)
            .map(|(_, n)| n.addr.clone())?;
        addr.parse().ok()
    }

    async fn forward(
        &self,
        leader: u64,
        rpc: &crate::network::RaftRpc,
    ) -> Result<Vec<u8>, ClusterError> {
        let (Some(net), Some(addr)) = (&self.inner.net, self.member_addr(leader)) else {
            return Err(ClusterError::NotLeader {
                leader: Some(leader),
            });
        };
        tokio::time::timeout(
            WRITE_TIMEOUT,
            crate::network::request_addr(&net.endpoint, addr, rpc),
        )
        .await
        .map_err(|_| ClusterError::Timeout(WRITE_TIMEOUT))?
        .map_err(|e| match e {
            crate::network::ForwardError::NotSent(why) => ClusterError::Unsent(format!(
                "forwarding to the leader (node {leader}): {why}"
            )),
            crate::network::ForwardError::Unknown(why) => ClusterError::Forward(format!(
                "forwarding to the leader (node {leader}): {why}; the write may or may not have been applied"
            )),
        })
    }

    async fn forward_write(&self, leader: u64, cmd: Command) -> Result<Response, ClusterError> {
        let reply = self
            .forward(leader, &crate::network::RaftRpc::Write(cmd))
            .await?;
        let r: Result<(Response, u64), String> = serde_json::from_slice(&reply)
            .map_err(|e| ClusterError::Forward(format!("leader's reply unreadable: {e}")))?;
        let (response, index) = r.map_err(ClusterError::Forward)?;
        // Read your writes: return once this node has applied the entry too.
        let mut applied = self.applied();
        tokio::time::timeout(WRITE_TIMEOUT, applied.wait_for(|a| *a >= index))
            .await
            .map_err(|_| ClusterError::Timeout(WRITE_TIMEOUT))?
            .map_err(|_| ClusterError::Fatal("Raft stopped".into()))?;
        Ok(response)
    }

    /// Asks the member at `seed` (any member) to add this node: as a learner, then as a voter while
    /// the cluster has fewer than `MAX_VOTERS`.
    pub async fn join(&self, seed: std::net::SocketAddr) -> Result<(), ClusterError> {
        let net = self.inner.net.as_ref().ok_or_else(|| {
            ClusterError::Start("a single-node store cannot join a cluster".into())
        })?;
        let rpc = crate::network::RaftRpc::Join {
            node: self.inner.node_id.0,
            raft_addr: net.raft_addr.to_string(),
        };
        let reply = crate::network::request_addr(&net.endpoint, seed, &rpc)
            .await
            .map_err(|e| ClusterError::Start(format!("joining through {seed}: {e}")))?;
        let r: Result<(), String> = serde_json::from_slice(&reply).map_err(|e| {
            ClusterError::Start(format!("{seed}'s reply to join is unreadable: {e}"))
        })?;
        r.map_err(|e| ClusterError::Start(format!("joining through {seed}: {e}")))
    }

    /// Waits until a read on this node is linearizable: it reflects every write acknowledged anywhere
    /// before this call began (Raft read index: the leader confirms with a quorum that it still leads;
    /// a follower asks the leader for that index and waits to apply it). Fails with `NotLeader`-like
    /// errors when no leader can confirm, within `WRITE_TIMEOUT`.
    pub async fn linearizable(&self) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        loop {
            let index = match self.read_index_here().await {
                Ok(i) => i,
                Err(ClusterError::NotLeader {
                    leader: Some(leader),
                }) if self.inner.net.is_some() => {
                    match self
                        .forward(leader, &crate::network::RaftRpc::ReadIndex)
                        .await
                    {
                        Ok(reply) => serde_json::from_slice::<Result<u64, String>>(&reply)
                            .map_err(|e| {
                                ClusterError::Forward(format!("leader's reply unreadable: {e}"))
                            })?
                            .map_err(ClusterError::Forward)?,
                        // A read may safely be asked again: retry until the deadline.
                        Err(ClusterError::Unsent(_) | ClusterError::Forward(_))
                            if tokio::time::Instant::now() < deadline =>
                        {
                            self.await_other_leader().await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(ClusterError::NotLeader { leader: None })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                // A read has no leader to be sent to: say what is wrong, not "send writes".
                Err(ClusterError::NotLeader { leader: None }) => {
                    return Err(ClusterError::NoQuorum(format!(
                        "no Raft leader was known to confirm this read within {WRITE_TIMEOUT:?} \
                         (an election under way, or no quorum); try again"
                    )))
                }
                Err(e) => return Err(e),
            };
            let mut applied = self.applied();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            return tokio::time::timeout(left, applied.wait_for(|a| *a >= index))
                .await
                .map_err(|_| ClusterError::Timeout(WRITE_TIMEOUT))?
                .map(|_| ())
                .map_err(|_| ClusterError::Fatal("Raft stopped".into()));
        }
    }

    /// After a request could not reach the leader this node knows: waits (at most a second) until
    /// this node knows a leader other than that one, instead of knocking again at a dead door. An
    /// election after a leader dies takes a few hundred milliseconds.
    async fn await_other_leader(&self) {
        let failed = self.status().leader;
        let _ = self
            .inner
            .raft
            .wait(Some(Duration::from_secs(1)))
            .metrics(
                |m| m.current_leader.is_some() && m.current_leader != failed,
                "another leader",
            )
            .await;
    }

    /// The read index when this node leads (after confirming leadership with a quorum).
    async fn read_index_here(&self) -> Result<u64, ClusterError> {
        use openraft::error::CheckIsLeaderError;
        let give_up = tokio::time::Instant::now() + CONFIRM_LEADERSHIP_FOR;
        loop {
            match tokio::time::timeout(WRITE_TIMEOUT, self.inner.raft.get_read_log_id()).await {
                Err(_) => return Err(ClusterError::Timeout(WRITE_TIMEOUT)),
                Ok(Ok((read, _applied))) => return Ok(read.map(|l| l.index).unwrap_or(0)),
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    return Err(ClusterError::NotLeader {
                        leader: f.leader_id,
                    })
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                    if tokio::time::Instant::now() >= give_up {
                        return Err(ClusterError::NoQuorum(format!(
                            "this leader cannot reach a quorum: {q}"
                        )));
                    }
                    tracing::debug!(%q, "leadership not confirmed in time for a read; asking again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Err(e)) => return Err(ClusterError::Fatal(e.to_string())),
            }
        }
    }

    /// Writes a consistent copy of the applied state (what a snapshot holds, tokens by hash only) to
    /// `out`, streamed, after the bytes `header(applied index, subscriber count)` returns. Taken under
    /// the state machine's read lock, so no command is half-applied; blocking.
    pub fn backup_to<W: std::io::Write>(
        &self,
        out: W,
        header: impl FnOnce(u64, u64) -> Vec<u8>,
    ) -> std::io::Result<W> {
        let a = self.inner.applied.read().unwrap_or_else(|p| p.into_inner());
        use std::io::Write as _;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, out);
        w.write_all(&header(
            a.last_applied.map(|l| l.index).unwrap_or(0),
            a.state.subscriber_count() as u64,
        ))?;
        serde_json::to_writer(&mut w, &a.state)?;
        w.into_inner().map_err(|e| e.into_error())
    }

    /// True while this node is the Raft leader.
    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow().current_leader == Some(self.inner.node_id.0)
    }

    /// On the leader: its term, and the members in touch with it: itself and those that have
    /// answered its replication since it was elected (a new leader's progress starts with no
    /// match for anyone; openraft fills it in from their answers). `None` on a node that does not
    /// lead.
    pub fn leadership(&self) -> Option<(u64, std::collections::BTreeSet<NodeId>)> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        if m.current_leader != Some(self.inner.node_id.0) {
            return None;
        }
        let term = m.current_term;
        let mut reached: std::collections::BTreeSet<NodeId> = m
            .replication
            .iter()
            .flatten()
            .filter(|(_, matched)| matched.is_some())
            .map(|(id, _)| NodeId(*id))
            .collect();
        reached.insert(self.inner.node_id);
        Some((term, reached))
    }

    /// Runs `f` on the applied state.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        let a = self.inner.applied.read().unwrap_or_else(|p| p.into_inner());
        f(&a.state)
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node_id
    }

    /// Last applied log index, updated after every apply.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.inner.applied_index.clone()
    }

    /// Raft's view on this node.
    pub fn status(&self) -> ClusterStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        ClusterStatus {
            node_id: self.inner.node_id,
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
        }
    }

    /// Bytes the store occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk()
    }

    /// Asks Raft to build a snapshot now (and purge the log behind it).
    pub async fn snapshot_now(&self) -> Result<(), ClusterError> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ClusterError::Fatal(e.to_string()))
    }

    /// Adds `node` (reachable at `raft_addr`) as a learner and waits until it has caught up.
    pub async fn add_learner(&self, node: NodeId, raft_addr: &str) -> Result<(), ClusterError> {
        self.inner
            .raft
            .add_learner(node.0, BasicNode::new(raft_addr), true)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Fatal(e.to_string()))
    }

    /// Makes exactly `voters` the voting members (they must be members already).
    pub async fn change_membership(&self, voters: &[NodeId]) -> Result<(), ClusterError> {
        let ids: std::collections::BTreeSet<u64> = voters.iter().map(|n| n.0).collect();
        self.inner
            .raft
            .change_membership(ids, false)
            .await
            .map(|_| ())
            .map_err(|e| ClusterError::Fatal(e.to_string()))
    }

    /// Removes `node` from the cluster (voter or learner) on the leader, forwarding when this node
    /// does not lead. When a voter goes and a learner is waiting, the learner is promoted so the
    /// cluster keeps its number of voters. The last voter cannot be removed.
    pub async fn remove_member(&self, node: NodeId) -> Result<(), ClusterError> {
        let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
        loop {
            let result = match self.remove_member_here(node).await {
                Err(ClusterError::NotLeader {
                    leader: Some(leader),
                }) if self.inner.net.is_some() => {
                    let reply = self
                        .forward(leader, &crate::network::RaftRpc::Remove { node: node.0 })
                        .await;
                    match reply {
                        Ok(bytes) => serde_json::from_slice::<Result<(), String>>(&bytes)
                            .map_err(|e| {
                                ClusterError::Forward(format!("leader's reply unreadable: {e}"))
                            })?
                            .map_err(ClusterError::Refused),
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            match result {
                Err(ClusterError::Unsent(_) | ClusterError::NotLeader { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    self.await_other_leader().await;
                }
                other => return other,
            }
        }
    }

    async fn remove_member_here(&self, node: NodeId) -> Result<(), ClusterError> {
        let status = self.status();
        if status.leader != Some(self.inner.node_id.0) {
            return Err(ClusterError::NotLeader {
                leader: status.leader,
            });
        }
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let all: std::collections::BTreeSet<u64> = membership.nodes().map(|(id, _)| *id).collect();
        if !all.contains(&node.0) {
            return Err(ClusterError::Refused(format!(
                "node {} is not a member of this cluster",
                node.0
            )));
        }
        if voters.contains(&node.0) {
            let mut next: std::collections::BTreeSet<u64> =
                voters.iter().copied().filter(|v| *v != node.0).collect();
            if next.is_empty() {
                return Err(ClusterError::Refused(format!(
                    "node {} is the cluster's last voter and cannot be removed",
                    node.0
                )));
            }
            if let Some(learner) = all.iter().find(|id| !voters.contains(id) && **id != node.0) {
                next.insert(*learner);
            }
            self.inner
                .raft
                .change_membership(next, false)
                .await
                .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        } else {
            let mut gone = std::collections::BTreeSet::new();
            gone.insert(node.0);
            self.inner
                .raft
                .change_membership(openraft::ChangeMembers::RemoveNodes(gone), false)
                .await
                .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        }
        Ok(())
    }

    /// The members as this node knows them: (id, raft address, voter?, matched log index as the
    /// leader sees it — known only on the leader, and for itself its applied index).
    pub fn members(&self) -> Vec<(u64, String, bool, Option<u64>)> {
        let m = self.inner.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        membership
            .nodes()
            .map(|(id, node)| {
                let matched = if *id == self.inner.node_id.0 {
                    m.last_applied.map(|l| l.index)
                } else {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(id).cloned().flatten())
                        .map(|l| l.index)
                };
                (*id, node.addr.clone(), voters.contains(id), matched)
            })
            .collect()
    }

    /// Probes every other member's wall clock once (`clock::probe`, all at the same time) and
    /// returns, per member, the estimate from its last few probes, or why this round's failed.
    /// Nothing for a node that runs alone.
    pub async fn probe_clocks(&self) -> Vec<(u64, Result<crate::clock::ClockSample, String>)> {
        let Some(net) = &self.inner.net else {
            return Vec::new();
        };
        let mut probes = tokio::task::JoinSet::new();
        for (id, addr, _, _) in self.members() {
            if id == self.inner.node_id.0 {
                continue;
            }
            let endpoint = net.endpoint.clone();
            probes.spawn(async move {
                let sample = match addr.parse::<std::net::SocketAddr>() {
                    Ok(a) => crate::clock::probe(&endpoint, id, a).await,
                    Err(_) => Err(format!(
                        "node {id}'s raft address `{addr}` is not host:port"
                    )),
                };
                (id, sample)
            });
        }
        let mut results = Vec::new();
        while let Some(done) = probes.join_next().await {
            if let Ok(r) = done {
                results.push(r);
            }
        }
        let mut clocks = self.inner.clocks.lock().unwrap_or_else(|e| e.into_inner());
        // Members that left are forgotten.
        clocks.retain(|id, _| results.iter().any(|(r, _)| r == id));
        let mut estimates: Vec<_> = results
            .into_iter()
            .map(|(id, sample)| match sample {
                Ok(s) => {
                    let filter = clocks.entry(id).or_default();
                    filter.push(s);
                    (id, Ok(filter.best().unwrap_or(s)))
                }
                Err(why) => {
                    // Unreachable now: its estimate goes (it may come back with another clock).
                    clocks.remove(&id);
                    (id, Err(why))
                }
            })
            .collect();
        estimates.sort_by_key(|(id, _)| *id);
        estimates
    }

    /// Each other member's clock as estimated by the last `probe_clocks` that reached it (none for
    /// a member the last round could not reach).
    pub fn clock_offsets(&self) -> BTreeMap<u64, crate::clock::ClockSample> {
        let clocks = self.inner.clocks.lock().unwrap_or_else(|e| e.into_inner());
        clocks
            .iter()
            .filter_map(|(id, f)| Some((*id, f.best()?)))
            .collect()
    }

    /// Waits (at most `timeout`) until some node leads; returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, ClusterError> {
        let m = self
            .inner
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader")
            .await
            .map_err(|_| ClusterError::NoLeader(timeout))?;
        m.current_leader.ok_or(ClusterError::NoLeader(timeout))
    }

    /// Stops Raft and flushes the store.
    pub async fn shutdown(&self) -> Result<(), ClusterError> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| ClusterError::Fatal(e.to_string()))?;
        Ok(())
    }
}
