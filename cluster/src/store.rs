//! openraft storage (v2 API) on a key-value engine (`kv`: sled in production): the Raft log, the vote
//! and the committed id in their own trees,
//! and the state machine held in memory with its latest snapshot persisted, so a restarted node loads the
//! snapshot and replays only the log after it.
//!
//! Durability: appended entries and votes are flushed to disk before openraft is told they are saved.
//!
//! Snapshots are files (`snapshots/` inside the store), streamed: building one serialises the state
//! straight into a file, sending one reads the file in chunks, receiving one writes chunks to an
//! unnamed temporary file, and loading one parses the file through a small buffer. The serialised
//! state is never held in memory beside the state itself. Only the snapshot's metadata and file name
//! live in the engine (one atomic batch), so a crash leaves either the old snapshot or the new one current.

// openraft's StorageError is the error type its storage traits require; it is large by design.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
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
use crate::kv::{KvEngine, KvTree, SledEngine};
use crate::state::State;

openraft::declare_raft_types!(
    /// Campanile's Raft types: commands in, responses out, u64 node ids, addresses as strings.
    pub TypeConfig:
        D = Command,
        R = Response,
        SnapshotData = tokio::fs::File,
);

/// Node id type used by openraft.
pub type RaftNodeId = u64;
type StoreResult<T> = Result<T, StorageError<RaftNodeId>>;

/// Marks a store as a Campanile Raft store of this format.
pub const FORMAT: &str = "campanile-raft-v1";

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
/// Name of the current snapshot's file in the snapshot directory.
const KEY_SNAPSHOT_FILE: &str = "snapshot_file";
/// Where releases before streamed snapshots kept the snapshot itself; moved to a file on open.
const KEY_SNAPSHOT_DATA_V1: &str = "snapshot_data";
/// Buffer for writing and parsing snapshot files.
const SNAPSHOT_BUF: usize = 1 << 20;

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

fn get_json<T: for<'de> Deserialize<'de>>(
    tree: &Arc<dyn KvTree>,
    key: &str,
) -> StoreResult<Option<T>> {
    match tree.get(key.as_bytes()).map_err(read_err)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(read_err),
    }
}

fn put_json<T: Serialize>(tree: &Arc<dyn KvTree>, key: &str, value: &T) -> StoreResult<()> {
    let bytes = serde_json::to_vec(value).map_err(write_err)?;
    tree.insert(key.as_bytes(), bytes).map_err(write_err)?;
    Ok(())
}

/// The store of one node, opened once and shared by the log and the state machine.
#[derive(Clone)]
pub struct Db {
    engine: Arc<dyn KvEngine>,
    log: Arc<dyn KvTree>,
    meta: Arc<dyn KvTree>,
    snapshot: Arc<dyn KvTree>,
    /// Snapshot files.
    dir: PathBuf,
    /// Serialises snapshot commits (a build may finish while a received snapshot is installed).
    commit_lock: Arc<tokio::sync::Mutex<()>>,
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the store at {path}: {source}; if the directory is damaged, restore a backup or move it away")]
    Engine {
        path: String,
        source: std::io::Error,
    },
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
        let engine = SledEngine::open(path).map_err(|e| OpenError::Engine {
            path: display.clone(),
            source: std::io::Error::other(e),
        })?;
        // sled keeps one default tree beside ours.
        Db::on_engine(Arc::new(engine), path.join("snapshots"), &display, 4)
    }

    /// The store on `engine`, with snapshot files in `snapshot_dir`. `own_trees` is how many trees a
    /// Campanile store of this engine has (more means the engine holds someone else's data).
    pub fn on_engine(
        engine: Arc<dyn KvEngine>,
        snapshot_dir: PathBuf,
        display: &str,
        own_trees: usize,
    ) -> Result<Db, OpenError> {
        let engine_err = |source: std::io::Error| OpenError::Engine {
            path: display.to_string(),
            source,
        };
        let store = Db {
            log: engine.open_tree("raft_log").map_err(engine_err)?,
            meta: engine.open_tree("raft_meta").map_err(engine_err)?,
            snapshot: engine.open_tree("snapshot").map_err(engine_err)?,
            engine: engine.clone(),
            dir: snapshot_dir,
            commit_lock: Arc::default(),
        };
        match store.meta.get(KEY_FORMAT.as_bytes()).map_err(engine_err)? {
            Some(v) if v == FORMAT.as_bytes() => {}
            Some(v) => {
                return Err(OpenError::Foreign {
                    path: display.to_string(),
                    found: format!("format `{}`", String::from_utf8_lossy(&v)),
                })
            }
            None => {
                let others = engine.tree_count() > own_trees
                    || !store.log.is_empty()
                    || !store.snapshot.is_empty();
                if others {
                    return Err(OpenError::Foreign {
                        path: display.to_string(),
                        found: "a database without a Campanile format marker".into(),
                    });
                }
                store
                    .meta
                    .insert(KEY_FORMAT.as_bytes(), FORMAT.as_bytes().to_vec())
                    .map_err(engine_err)?;
                engine.flush_blocking().map_err(engine_err)?;
            }
        }
        std::fs::create_dir_all(&store.dir).map_err(|source| OpenError::Engine {
            path: store.dir.display().to_string(),
            source,
        })?;
        Ok(store)
    }

    /// Bytes the store occupies on disk: the database and the current snapshot file.
    pub fn size_on_disk(&self) -> u64 {
        let files: u64 = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        self.engine.size_on_disk() + files
    }

    /// The current snapshot's metadata and file, if there is one.
    fn current_snapshot(
        &self,
    ) -> StoreResult<Option<(SnapshotMeta<RaftNodeId, BasicNode>, PathBuf)>> {
        let meta: Option<SnapshotMeta<RaftNodeId, BasicNode>> =
            get_json(&self.snapshot, KEY_SNAPSHOT_META)?;
        let file: Option<String> = get_json(&self.snapshot, KEY_SNAPSHOT_FILE)?;
        Ok(match (meta, file) {
            (Some(meta), Some(file)) => Some((meta, self.dir.join(file))),
            _ => None,
        })
    }

    /// A new, unused path in the snapshot directory for a snapshot up to `index`; `.tmp` until it is
    /// complete and on disk.
    fn new_snapshot_path(&self, index: u64) -> PathBuf {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.dir
            .join(format!("snapshot-{index:020}-{nanos}-{seq}.json.tmp"))
    }

    /// Makes the complete file at `tmp` (already synced) the current snapshot and removes the older
    /// snapshot files. A built snapshot (`Newer`) is dropped if one at least as recent is current
    /// already; an installed one (`Always`) replaces whatever is current, as openraft asks. Answers
    /// the current snapshot's file.
    async fn commit_snapshot(
        &self,
        meta: &SnapshotMeta<RaftNodeId, BasicNode>,
        tmp: &Path,
        when: Replace,
    ) -> StoreResult<PathBuf> {
        let _guard = self.commit_lock.lock().await;
        let path = tmp.with_extension("");
        if let Some((current, current_path)) = self.current_snapshot()? {
            if when == Replace::Newer
                && current.last_log_id >= meta.last_log_id
                && current_path.exists()
            {
                let _ = std::fs::remove_file(tmp);
                return Ok(current_path);
            }
        }
        std::fs::rename(tmp, &path).map_err(write_err)?;
        sync_dir(&self.dir).map_err(write_err)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.snapshot
            .apply_batch(vec![
                (
                    KEY_SNAPSHOT_META.as_bytes().to_vec(),
                    Some(serde_json::to_vec(meta).map_err(write_err)?),
                ),
                (
                    KEY_SNAPSHOT_FILE.as_bytes().to_vec(),
                    Some(serde_json::to_vec(&name).map_err(write_err)?),
                ),
            ])
            .map_err(write_err)?;
        self.flush().await?;
        self.remove_stale_snapshot_files(&path, false);
        Ok(path)
    }

    /// Removes complete snapshot files other than `keep`, and unfinished ones (`.tmp`) too when
    /// nothing can be writing them (at open, after a crash).
    fn remove_stale_snapshot_files(&self, keep: &Path, unfinished: bool) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            let is_tmp = path.extension().is_some_and(|x| x == "tmp");
            if path != keep && (unfinished || !is_tmp) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    async fn flush(&self) -> StoreResult<()> {
        self.engine.flush().await.map_err(write_err)
    }
}

/// Whether a snapshot being committed replaces a current one that is at least as recent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replace {
    Newer,
    Always,
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

/// Makes a new store under `path` whose state is `state_json` (a backup's state, read as a stream), as
/// if this node had applied it and compacted its log: a snapshot at log index 1 of a cluster whose only
/// voter is `node` at `raft_addr`. The node then starts normally and leads; others join it.
pub fn restore(
    path: &std::path::Path,
    node: RaftNodeId,
    raft_addr: &str,
    state_json: impl Read,
) -> Result<u64, RestoreError> {
    let existed = path.exists();
    let result = restore_into(path, node, raft_addr, state_json);
    if result.is_err() && !existed {
        // Leave nothing behind, so the same command can be run again.
        let _ = std::fs::remove_dir_all(path);
    }
    result
}

fn restore_into(
    path: &std::path::Path,
    node: RaftNodeId,
    raft_addr: &str,
    mut state_json: impl Read,
) -> Result<u64, RestoreError> {
    let db = Db::open(path)?;
    let empty = db.log.is_empty()
        && db.snapshot.is_empty()
        && db.meta.get(KEY_VOTE.as_bytes()).ok().flatten().is_none();
    if !empty {
        return Err(RestoreError::NotEmpty(path.display().to_string()));
    }
    let write = |e: std::io::Error| RestoreError::Write(e.to_string());
    let tmp = db.new_snapshot_path(1);
    let mut file = std::fs::File::create(&tmp).map_err(write)?;
    std::io::copy(&mut state_json, &mut file).map_err(write)?;
    file.sync_all().map_err(write)?;
    let state = read_state_file(&tmp).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RestoreError::Unreadable(e.to_string())
    })?;
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
    block_on_store(db.commit_snapshot(&meta, &tmp, Replace::Always)).map_err(w)?;
    put_json(&db.meta, KEY_PURGED, &Some(log_id)).map_err(w)?;
    put_json(&db.meta, KEY_COMMITTED, &Some(log_id)).map_err(w)?;
    db.engine
        .flush_blocking()
        .map_err(|e| RestoreError::Write(e.to_string()))?;
    Ok(state.subscriber_count() as u64)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn byte_bound(b: Bound<&u64>) -> Bound<Vec<u8>> {
    match b {
        Bound::Included(i) => Bound::Included(index_key(*i).to_vec()),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i).to_vec()),
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
        let items = self
            .db
            .log
            .range(
                byte_bound(range.start_bound()),
                byte_bound(range.end_bound()),
            )
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let mut out = Vec::with_capacity(items.len());
        for (_, v) in items {
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
        let mut batch = Vec::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry)
                .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            batch.push((index_key(entry.log_id.index).to_vec(), Some(bytes)));
        }
        self.db
            .log
            .apply_batch(batch)
            .map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e))?;
        // Entries are acknowledged only once they are on disk.
        let flushed = self.db.engine.flush().await;
        callback.log_io_completed(flushed);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<RaftNodeId>) -> StoreResult<()> {
        self.remove_log(Bound::Included(log_id.index), Bound::Unbounded)?;
        self.db.flush().await
    }

    async fn purge(&mut self, log_id: LogId<RaftNodeId>) -> StoreResult<()> {
        // Record the purge point first, so a crash in between never leaves a hole unexplained.
        put_json(&self.db.meta, KEY_PURGED, &log_id)?;
        self.db.flush().await?;
        self.remove_log(Bound::Unbounded, Bound::Included(log_id.index))
    }
}

impl LogStore {
    /// Removes the log entries between two indexes, in one batch.
    fn remove_log(&self, from: Bound<u64>, to: Bound<u64>) -> StoreResult<()> {
        let keys = self
            .db
            .log
            .keys(byte_bound(from.as_ref()), byte_bound(to.as_ref()))
            .map_err(write_err)?;
        let batch = keys.into_iter().map(|k| (k, None)).collect();
        self.db.log.apply_batch(batch).map_err(write_err)
    }
}

/// Runs a store future to completion from synchronous code (opening a store, the offline restore),
/// on a thread of its own so that it works inside or outside an async runtime.
fn block_on_store<T: Send>(
    f: impl std::future::Future<Output = StoreResult<T>> + Send,
) -> StoreResult<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .map_err(write_err)?
                .block_on(f)
        })
        .join()
    })
    .unwrap_or_else(|_| Err(write_err(std::io::Error::other("a store task panicked"))))
}

/// Makes a directory's entries (a rename into it) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Parses a state from a JSON stream through a buffer and rebuilds the indexes serde skips.
fn read_state(reader: impl Read) -> std::io::Result<State> {
    let mut state: State = serde_json::from_reader(BufReader::with_capacity(SNAPSHOT_BUF, reader))?;
    state.rebuild_indexes();
    Ok(state)
}

fn read_state_file(path: &Path) -> std::io::Result<State> {
    read_state(std::fs::File::open(path)?)
}

/// Serialises `state` into a new file at `path` through a buffer, and syncs it.
fn write_state_file(state: &State, path: &Path) -> std::io::Result<std::fs::File> {
    let mut w = BufWriter::with_capacity(SNAPSHOT_BUF, std::fs::File::create(path)?);
    serde_json::to_writer(&mut w, state)?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())
}

fn snapshot_err(
    meta: &SnapshotMeta<RaftNodeId, BasicNode>,
    verb: ErrorVerb,
    e: impl std::error::Error + 'static,
) -> StorageError<RaftNodeId> {
    io_err(ErrorSubject::Snapshot(Some(meta.signature())), verb, e)
}

/// Runs blocking file work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// What the state machine holds in memory.
#[derive(Debug, Default)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId<RaftNodeId>>,
    pub last_membership: StoredMembership<RaftNodeId, BasicNode>,
}

/// The domain state machine with snapshots in files.
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
    /// Loads the latest persisted snapshot, if any, and removes snapshot files a crash left behind.
    pub fn open(db: Db) -> StoreResult<StateMachineStore> {
        migrate_v1_snapshot(&db)?;
        let mut applied = Applied::default();
        match db.current_snapshot()? {
            Some((meta, path)) => {
                applied.state =
                    read_state_file(&path).map_err(|e| snapshot_err(&meta, ErrorVerb::Read, e))?;
                applied.last_applied = meta.last_log_id;
                applied.last_membership = meta.last_membership.clone();
                db.remove_stale_snapshot_files(&path, true);
            }
            None => db.remove_stale_snapshot_files(Path::new(""), true),
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

/// Moves a snapshot kept inside sled by an earlier release into a snapshot file.
fn migrate_v1_snapshot(db: &Db) -> StoreResult<()> {
    let Some(data) = db
        .snapshot
        .get(KEY_SNAPSHOT_DATA_V1.as_bytes())
        .map_err(read_err)?
    else {
        return Ok(());
    };
    if db.current_snapshot()?.is_none() {
        let meta: Option<SnapshotMeta<RaftNodeId, BasicNode>> =
            get_json(&db.snapshot, KEY_SNAPSHOT_META)?;
        if let Some(meta) = meta {
            let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
            let tmp = db.new_snapshot_path(index);
            let mut f = std::fs::File::create(&tmp).map_err(write_err)?;
            f.write_all(&data)
                .and_then(|_| f.sync_all())
                .map_err(write_err)?;
            block_on_store(db.commit_snapshot(&meta, &tmp, Replace::Always))?;
        }
    }
    db.snapshot
        .remove(KEY_SNAPSHOT_DATA_V1.as_bytes())
        .map_err(write_err)?;
    db.engine.flush_blocking().map_err(write_err)?;
    Ok(())
}

impl StateMachineStore {
    async fn open_snapshot(
        meta: SnapshotMeta<RaftNodeId, BasicNode>,
        path: &Path,
    ) -> StoreResult<Snapshot<TypeConfig>> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| snapshot_err(&meta, ErrorVerb::Read, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    /// Serialises the applied state straight into a new file under the state machine's read lock
    /// (so no command is half-applied in it), off the async workers.
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let applied = self.applied.clone();
        let index = read_lock(&applied)
            .last_applied
            .map(|l| l.index)
            .unwrap_or(0);
        let tmp = self.db.new_snapshot_path(index);
        let path = tmp.clone();
        let (last_applied, last_membership) = blocking(move || {
            let (file, last_applied, last_membership) = {
                let a = read_lock(&applied);
                let file = write_state_file(&a.state, &path)?;
                (file, a.last_applied, a.last_membership.clone())
            };
            file.sync_all()?;
            Ok((last_applied, last_membership))
        })
        .await
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e)
        })?;
        let seq = self
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id: format!("{}-{seq}", last_applied.map(|l| l.index).unwrap_or(0)),
        };
        let path = self.db.commit_snapshot(&meta, &tmp, Replace::Newer).await?;
        // If a received snapshot at least as recent became current meanwhile, that one it is.
        match self.db.current_snapshot()? {
            Some((current, current_path)) if current_path == path => {
                Self::open_snapshot(current, &path).await
            }
            _ => Self::open_snapshot(meta, &path).await,
        }
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

    /// Chunks from the leader go to an unnamed file in the snapshot directory: nothing to clean up
    /// if the transfer is abandoned.
    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<tokio::fs::File>> {
        let dir = self.db.dir.clone();
        let file = blocking(move || tempfile::tempfile_in(dir))
            .await
            .map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    /// Copies the received file into a snapshot file, parses it, makes it current and replaces the
    /// applied state. The old state stays readable until the new one is ready.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftNodeId, BasicNode>,
        snapshot: Box<tokio::fs::File>,
    ) -> StoreResult<()> {
        let mut received = snapshot.into_std().await;
        let tmp = self
            .db
            .new_snapshot_path(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        let path = tmp.clone();
        let state = blocking(move || {
            received.seek(SeekFrom::Start(0))?;
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            std::io::copy(&mut received, &mut file)?;
            file.sync_all()?;
            file.seek(SeekFrom::Start(0))?;
            read_state(file)
        })
        .await
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            snapshot_err(meta, ErrorVerb::Write, e)
        })?;
        self.db.commit_snapshot(meta, &tmp, Replace::Always).await?;
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
        match self.db.current_snapshot()? {
            Some((meta, path)) => Ok(Some(Self::open_snapshot(meta, &path).await?)),
            None => Ok(None),
        }
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

    fn subscribers(n: usize) -> Command {
        Command::CreateSubscribers {
            at_ms: 1,
            subscribers: (0..n)
                .map(|i| crate::NewSubscriber {
                    tenant: crate::default_tenant(),
                    phone: crate::PhoneNumber::parse(&format!("+39347{i:07}")).unwrap(),
                    name: Some("Maria Rossi".into()),
                    language: "it".into(),
                    zone: None,
                    verified: true,
                    consent: None,
                })
                .collect(),
        }
    }

    fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    fn snapshot_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_snapshot_is_one_file_that_a_restart_loads_and_older_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft");
        {
            let mut sm = StateMachineStore::open(Db::open(&path).unwrap()).unwrap();
            sm.apply([entry(1, subscribers(300))]).await.unwrap();
            sm.build_snapshot().await.unwrap();
            sm.apply([entry(2, subscribers(500))]).await.unwrap();
            let snap = sm.build_snapshot().await.unwrap();
            assert_eq!(snap.meta.last_log_id.map(|l| l.index), Some(2));
            // The current snapshot reads back as the state it was built from.
            let mut data = Vec::new();
            let mut file = *sm.get_current_snapshot().await.unwrap().unwrap().snapshot;
            tokio::io::AsyncReadExt::read_to_end(&mut file, &mut data)
                .await
                .unwrap();
            let state: State = serde_json::from_slice(&data).unwrap();
            assert_eq!(state.subscriber_count(), 500);
        }
        assert_eq!(
            snapshot_files(&path).len(),
            1,
            "{:?}",
            snapshot_files(&path)
        );
        // A half-written file from a crash is removed at the next open.
        std::fs::write(path.join("snapshots/snapshot-9-9-9.json.tmp"), b"{").unwrap();
        let sm = StateMachineStore::open(Db::open(&path).unwrap()).unwrap();
        let a = read_lock(&sm.applied);
        assert_eq!(a.state.subscriber_count(), 500);
        assert_eq!(a.last_applied.map(|l| l.index), Some(2));
        assert_eq!(
            snapshot_files(&path).len(),
            1,
            "{:?}",
            snapshot_files(&path)
        );
    }

    #[tokio::test]
    async fn a_snapshot_kept_in_sled_by_an_earlier_release_moves_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft");
        {
            let db = Db::open(&path).unwrap();
            let mut state = State::default();
            state.apply(&subscribers(40));
            let log_id = LogId::new(openraft::CommittedLeaderId::new(1, 1), 7);
            let meta: SnapshotMeta<RaftNodeId, BasicNode> = SnapshotMeta {
                last_log_id: Some(log_id),
                last_membership: StoredMembership::default(),
                snapshot_id: "7-0".into(),
            };
            put_json(&db.snapshot, KEY_SNAPSHOT_META, &meta).unwrap();
            db.snapshot
                .insert(
                    KEY_SNAPSHOT_DATA_V1.as_bytes(),
                    serde_json::to_vec(&state).unwrap(),
                )
                .unwrap();
            db.engine.flush_blocking().unwrap();
        }
        let db = Db::open(&path).unwrap();
        let mut sm = StateMachineStore::open(db.clone()).unwrap();
        assert_eq!(read_lock(&sm.applied).state.subscriber_count(), 40);
        assert!(db
            .snapshot
            .get(KEY_SNAPSHOT_DATA_V1.as_bytes())
            .unwrap()
            .is_none());
        assert_eq!(snapshot_files(&path).len(), 1);
        let snap = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(snap.meta.snapshot_id, "7-0");
    }

    #[test]
    fn a_restore_streams_the_state_into_a_snapshot_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = State::default();
        state.apply(&subscribers(25));
        let json = serde_json::to_vec(&state).unwrap();
        let n = restore(&dir.path().join("a"), 1, "127.0.0.1:1", &json[..]).unwrap();
        assert_eq!(n, 25);
        let sm = StateMachineStore::open(Db::open(&dir.path().join("a")).unwrap()).unwrap();
        assert_eq!(read_lock(&sm.applied).state.subscriber_count(), 25);
        let err = restore(&dir.path().join("b"), 1, "127.0.0.1:1", &b"{\"subscri"[..]).unwrap_err();
        assert!(matches!(err, RestoreError::Unreadable(_)), "{err}");
        assert!(!dir.path().join("b").exists());
    }

    /// The same suite on an in-memory engine: the store uses its engine only through `kv`'s traits,
    /// so the engine can change.
    struct MemoryBuilder {
        dirs: std::sync::Mutex<Vec<tempfile::TempDir>>,
    }

    impl openraft::testing::StoreBuilder<TypeConfig, LogStore, StateMachineStore, ()>
        for MemoryBuilder
    {
        async fn build(&self) -> StoreResult<((), LogStore, StateMachineStore)> {
            let dir = tempfile::tempdir().map_err(write_err)?;
            let engine = Arc::new(crate::kv::memory::MemoryEngine::default());
            let db = Db::on_engine(engine, dir.path().join("snapshots"), "memory", 3)
                .map_err(write_err)?;
            self.dirs.lock().unwrap().push(dir);
            Ok(((), LogStore::new(db.clone()), StateMachineStore::open(db)?))
        }
    }

    #[test]
    fn openraft_storage_suite_passes_on_another_engine() {
        openraft::testing::Suite::test_all(MemoryBuilder {
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
