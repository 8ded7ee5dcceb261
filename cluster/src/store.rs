//! openraft storage (v2 API) on sled: the Raft log, the vote and the committed id in their own trees,
//! and the state machine held in memory with its latest snapshot persisted, so a restarted node loads the
//! snapshot and replays only the log after it.
//!
//! Durability: appended entries and votes are flushed to disk before openraft is told they are saved.

// openraft's StorageError is the error type its storage traits require; it is large by design.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend,
    RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::command::{Command, Response};
use crate::state::State;

openraft::declare_raft_types!(
    /// Campanile's Raft types: commands in, responses out, u64 node ids, addresses as strings.
    pub TypeConfig:
        D = Command,
        R = Response,
);

/// Node id type used by openraft.
pub type RaftNodeId = u64;
type StoreResult<T> = Result<T, StorageError<RaftNodeId>>;

/// Marks a sled database as a Campanile Raft store of this format.
pub const FORMAT: &str = "campanile-raft-v1";

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

fn io_err(
    subject: ErrorSubject<RaftNodeId>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<RaftNodeId> {
    StorageIOError::new(subject, verb, AnyError::new(&e)).into()
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<RaftNodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Read, e)
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<RaftNodeId> {
    io_err(ErrorSubject::Store, ErrorVerb::Write, e)
}

fn get_json<T: for<'de> Deserialize<'de>>(tree: &sled::Tree, key: &str) -> StoreResult<Option<T>> {
    match tree.get(key).map_err(read_err)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_err),
    }
}

fn put_json<T: Serialize>(tree: &sled::Tree, key: &str, value: &T) -> StoreResult<()> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    tree.insert(key, bytes).map_err(write_err)?;
    Ok(())
}

/// The sled database of one node, opened once and shared by the log and the state machine.
#[derive(Clone)]
pub struct Db {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    snapshot: sled::Tree,
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the store at {path}: {source}; if the directory is damaged, restore a backup or move it away")]
    Sled { path: String, source: sled::Error },
    #[error("{path} is not a Campanile store ({found}); point --data at a Campanile data directory or an empty one")]
    Foreign { path: String, found: String },
}

impl Db {
    /// Opens or creates the store under `path`, refusing a directory that holds something else.
    pub fn open(path: &std::path::Path) -> Result<Db, OpenError> {
        let display = path.display().to_string();
        if path.exists() && path.is_dir() {
            let has_files = std::fs::read_dir(path)
                .map(|mut d| d.next().is_some())
                .unwrap_or(false);
            if has_files && !path.join("conf").exists() && !path.join("db").exists() {
                return Err(OpenError::Foreign {
                    path: display,
                    found: "it has files but no sled database".into(),
                });
            }
        } else if path.exists() {
            return Err(OpenError::Foreign {
                path: display,
                found: "it is a file, not a directory".into(),
            });
        }
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| OpenError::Sled {
                path: display.clone(),
                source,
            })?;
        let open_tree = |name: &str| {
            db.open_tree(name).map_err(|source| OpenError::Sled {
                path: display.clone(),
                source,
            })
        };
        let store = Db {
            log: open_tree("raft_log")?,
            meta: open_tree("raft_meta")?,
            snapshot: open_tree("snapshot")?,
            db: db.clone(),
        };
        match store
            .meta
            .get(KEY_FORMAT)
            .map_err(|source| OpenError::Sled {
                path: display.clone(),
                source,
            })? {
            Some(v) if v.as_ref() == FORMAT.as_bytes() => {}
            Some(v) => {
                return Err(OpenError::Foreign {
                    path: display,
                    found: format!("format `{}`", String::from_utf8_lossy(&v)),
                })
            }
            None => {
                let others = db.tree_names().len() > 4
                    || !store.log.is_empty()
                    || !store.snapshot.is_empty();
                if others {
                    return Err(OpenError::Foreign {
                        path: display,
                        found: "a sled database without a Campanile format marker".into(),
                    });
                }
                store
                    .meta
                    .insert(KEY_FORMAT, FORMAT.as_bytes())
                    .map_err(|source| OpenError::Sled {
                        path: display.clone(),
                        source,
                    })?;
                db.flush().map_err(|source| OpenError::Sled {
                    path: display,
                    source,
                })?;
            }
        }
        Ok(store)
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    async fn flush(&self) -> StoreResult<()> {
        self.db.flush_async().await.map_err(write_err)?;
        Ok(())
    }
}

/// Why a backup could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("{0} already holds a Raft log or snapshot; restore into an empty data directory")]
    NotEmpty(String),
    #[error("the backup's state is unreadable: {0}")]
    Unreadable(String),
    #[error("cannot write the restored store: {0}")]
    Write(String),
}

/// Makes a new store under `path` whose state is `state_json` (a backup's state), as if this node had
/// applied it and compacted its log: a snapshot at log index 1 of a cluster whose only voter is
/// `node` at `raft_addr`. The node then starts normally and leads; others join it.
pub fn restore(
    path: &std::path::Path,
    node: RaftNodeId,
    raft_addr: &str,
    state_json: &[u8],
) -> Result<u64, RestoreError> {
    let mut state: State =
        serde_json::from_slice(state_json).map_err(|e| RestoreError::Unreadable(e.to_string()))?;
    state.rebuild_indexes();
    let db = Db::open(path)?;
    let empty = db.log.is_empty()
        && db.snapshot.is_empty()
        && db.meta.get(KEY_VOTE).ok().flatten().is_none();
    if !empty {
        return Err(RestoreError::NotEmpty(path.display().to_string()));
    }
    let log_id = LogId::new(openraft::CommittedLeaderId::new(1, node), 1);
    let mut nodes = std::collections::BTreeMap::new();
    nodes.insert(node, BasicNode::new(raft_addr));
    let voters: std::collections::BTreeSet<RaftNodeId> = [node].into_iter().collect();
    let membership = openraft::Membership::new(vec![voters], nodes);
    let meta: SnapshotMeta<RaftNodeId, BasicNode> = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), membership),
        snapshot_id: "restored-1".into(),
    };
    let w = |e: StorageError<RaftNodeId>| RestoreError::Write(e.to_string());
    put_json(&db.snapshot, KEY_SNAPSHOT_META, &meta).map_err(w)?;
    db.snapshot
        .insert(KEY_SNAPSHOT_DATA, state_json)
        .map_err(|e| RestoreError::Write(e.to_string()))?;
    put_json(&db.meta, KEY_PURGED, &Some(log_id)).map_err(w)?;
    put_json(&db.meta, KEY_COMMITTED, &Some(log_id)).map_err(w)?;
    db.db
        .flush()
        .map_err(|e| RestoreError::Write(e.to_string()))?;
    Ok(state.subscriber_count() as u64)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn byte_bound(b: Bound<&u64>) -> Bound<[u8; 8]> {
    match b {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    }
}

/// The Raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
}

impl LogStore {
    pub fn new(db: Db) -> LogStore {
        LogStore { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry<TypeConfig>>> {
        let range = (
            byte_bound(range.start_bound()),
            byte_bound(range.end_bound()),
        );
        let mut out = Vec::new();
        for item in self.db.log.range::<[u8; 8], _>(range) {
            let (_, v) = item.map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            let entry: Entry<TypeConfig> = serde_json::from_slice(&v)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<RaftNodeId>> = get_json(&self.db.meta, KEY_PURGED)?;
        let last = match self.db.log.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftNodeId>) -> StoreResult<()> {
        put_json(&self.db.meta, KEY_VOTE, vote).map_err(|_| {
            io_err(
                ErrorSubject::Vote,
                ErrorVerb::Write,
                std::io::Error::other("vote write"),
            )
        })?;
        // A vote must be on disk before it is acted on.
        self.db.flush().await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<RaftNodeId>>> {
        get_json(&self.db.meta, KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<RaftNodeId>>) -> StoreResult<()> {
        put_json(&self.db.meta, KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<RaftNodeId>>> {
        Ok(get_json::<Option<LogId<RaftNodeId>>>(&self.db.meta, KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.db
            .log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        // Entries are acknowledged only once they are on disk.
        let flushed = self.db.db.flush_async().await;
        callback.log_io_completed(flushed.map(|_| ()).map_err(std::io::Error::other));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<RaftNodeId>) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.db.log.range(index_key(log_id.index)..) {
            let (k, _) = item.map_err(write_err)?;
            batch.remove(k);
        }
        self.db.log.apply_batch(batch).map_err(write_err)?;
        self.db.flush().await
    }

    async fn purge(&mut self, log_id: LogId<RaftNodeId>) -> StoreResult<()> {
        // Record the purge point first, so a crash in between never leaves a hole unexplained.
        put_json(&self.db.meta, KEY_PURGED, &log_id)?;
        self.db.flush().await?;
        let mut batch = sled::Batch::default();
        for item in self.db.log.range(..=index_key(log_id.index)) {
            let (k, _) = item.map_err(write_err)?;
            batch.remove(k);
        }
        self.db.log.apply_batch(batch).map_err(write_err)?;
        Ok(())
    }
}

/// Reads a snapshot's state and rebuilds the indexes serde skips.
fn decode_snapshot(meta: &SnapshotMeta<RaftNodeId, BasicNode>, data: &[u8]) -> StoreResult<State> {
    let mut state: State = serde_json::from_slice(data).map_err(|e| {
        io_err(
            ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Read,
            e,
        )
    })?;
    state.rebuild_indexes();
    Ok(state)
}

/// What the state machine holds in memory.
#[derive(Debug, Default)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId<RaftNodeId>>,
    pub last_membership: StoredMembership<RaftNodeId, BasicNode>,
}

/// The domain state machine with snapshots in sled.
#[derive(Clone)]
pub struct StateMachineStore {
    db: Db,
    applied: Arc<RwLock<Applied>>,
    applied_index: watch::Sender<u64>,
    snapshot_seq: Arc<std::sync::atomic::AtomicU64>,
}

fn read_lock(a: &RwLock<Applied>) -> std::sync::RwLockReadGuard<'_, Applied> {
    a.read().unwrap_or_else(|p| p.into_inner())
}

fn write_lock(a: &RwLock<Applied>) -> std::sync::RwLockWriteGuard<'_, Applied> {
    a.write().unwrap_or_else(|p| p.into_inner())
}

impl StateMachineStore {
    /// Loads the latest persisted snapshot, if any.
    pub fn open(db: Db) -> StoreResult<StateMachineStore> {
        let mut applied = Applied::default();
        let meta: Option<SnapshotMeta<RaftNodeId, BasicNode>> =
            get_json(&db.snapshot, KEY_SNAPSHOT_META)?;
        if let (Some(meta), Some(data)) =
            (meta, db.snapshot.get(KEY_SNAPSHOT_DATA).map_err(read_err)?)
        {
            applied.state = decode_snapshot(&meta, &data)?;
            applied.last_applied = meta.last_log_id;
            applied.last_membership = meta.last_membership.clone();
        }
        let index = applied.last_applied.map(|l| l.index).unwrap_or(0);
        Ok(StateMachineStore {
            db,
            applied: Arc::new(RwLock::new(applied)),
            applied_index: watch::channel(index).0,
            snapshot_seq: Arc::default(),
        })
    }

    /// Shared handle on the applied state, for reads.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    /// Last applied index, updated after every batch.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied_index.subscribe()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let (data, last_applied, last_membership) = {
            let a = read_lock(&self.applied);
            let data = serde_json::to_vec(&a.state)
                .map_err(|e| io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
            (data, a.last_applied, a.last_membership.clone())
        };
        let seq = self
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id: format!("{}-{seq}", last_applied.map(|l| l.index).unwrap_or(0)),
        };
        put_json(&self.db.snapshot, KEY_SNAPSHOT_META, &meta)?;
        self.db
            .snapshot
            .insert(KEY_SNAPSHOT_DATA, data.clone())
            .map_err(write_err)?;
        self.db.flush().await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> StoreResult<(
        Option<LogId<RaftNodeId>>,
        StoredMembership<RaftNodeId, BasicNode>,
    )> {
        let a = read_lock(&self.applied);
        Ok((a.last_applied, a.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let last = {
            let mut a = write_lock(&self.applied);
            for entry in entries {
                a.last_applied = Some(entry.log_id);
                let r = match entry.payload {
                    EntryPayload::Blank => Response::Ok,
                    EntryPayload::Normal(cmd) => a.state.apply(&cmd),
                    EntryPayload::Membership(m) => {
                        a.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::Ok
                    }
                };
                responses.push(r);
            }
            a.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.applied_index.send_replace(last);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftNodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let state = decode_snapshot(meta, &data)?;
        put_json(&self.db.snapshot, KEY_SNAPSHOT_META, meta)?;
        self.db
            .snapshot
            .insert(KEY_SNAPSHOT_DATA, data)
            .map_err(write_err)?;
        self.db.flush().await?;
        let index = {
            let mut a = write_lock(&self.applied);
            a.state = state;
            a.last_applied = meta.last_log_id;
            a.last_membership = meta.last_membership.clone();
            meta.last_log_id.map(|l| l.index).unwrap_or(0)
        };
        self.applied_index.send_replace(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        let meta: Option<SnapshotMeta<RaftNodeId, BasicNode>> =
            get_json(&self.db.snapshot, KEY_SNAPSHOT_META)?;
        let data = self.db.snapshot.get(KEY_SNAPSHOT_DATA).map_err(read_err)?;
        Ok(match (meta, data) {
            (Some(meta), Some(data)) => Some(Snapshot {
                meta,
                snapshot: Box::new(Cursor::new(data.to_vec())),
            }),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Builder {
        dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
    }

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, ()> for Builder {
        async fn build(&self) -> StoreResult<((), LogStore, StateMachineStore)> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let db = Db::open(&dir.path().join("raft")).map_err(write_err)?;
            self.dirs.lock().unwrap().push(dir);
            Ok(((), LogStore::new(db.clone()), StateMachineStore::open(db)?))
        }
    }

    #[test]
    fn openraft_storage_suite_passes() {
        openraft::testing::Suite::test_all(Builder {
            dirs: Default::default(),
        })
        .unwrap();
    }

    #[test]
    fn a_foreign_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a database").unwrap();
        let err = Db::open(dir.path()).err().unwrap();
        assert!(matches!(err, OpenError::Foreign { .. }), "{err}");
        let file = dir.path().join("notes.txt");
        assert!(matches!(Db::open(&file), Err(OpenError::Foreign { .. })));
    }
}
