//! The key-value engine under the Raft store: named trees of byte keys in order, atomic batches within
//! a tree, and a durable flush. The store (`store.rs`) reaches its engine only through these traits, so
//! the engine can change later (RocksDB, redb, fjall...) without touching Raft or the domain. sled
//! implements them today; the tests also run the openraft storage suite on an in-memory engine to keep
//! the store honest about using nothing else.

use std::future::Future;
use std::io;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;

/// A key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// One ordered tree of an engine.
pub trait KvTree: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>>;
    fn insert(&self, key: &[u8], value: Vec<u8>) -> io::Result<()>;
    fn remove(&self, key: &[u8]) -> io::Result<()>;
    fn is_empty(&self) -> bool;
    /// The entry with the greatest key.
    fn last(&self) -> io::Result<Option<KvPair>>;
    /// The entries whose keys fall between `from` and `to`, in key order.
    fn range(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> io::Result<Vec<KvPair>>;
    /// The keys between `from` and `to`, in order (without reading the values into a vector).
    fn keys(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> io::Result<Vec<Vec<u8>>>;
    /// Inserts (`Some`) and removals (`None`), applied all or nothing.
    fn apply_batch(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> io::Result<()>;
}

/// A durable flush in progress.
pub type Flush<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

/// A storage engine: trees by name and durability.
pub trait KvEngine: Send + Sync + 'static {
    fn open_tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>>;
    /// How many trees exist (a store of another program has others).
    fn tree_count(&self) -> usize;
    /// Everything written so far is on disk when this resolves.
    fn flush(&self) -> Flush<'_>;
    /// `flush`, blocking the calling thread.
    fn flush_blocking(&self) -> io::Result<()>;
    /// Bytes on disk.
    fn size_on_disk(&self) -> u64;
}

fn sled_err(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        other => io::Error::other(other),
    }
}

/// How long opening a store waits for its file lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// sled: the engine in production.
pub struct SledEngine {
    db: sled::Db,
}

impl SledEngine {
    /// Opens the database, waiting up to [`LOCK_WAIT`] for its file lock: sled finishes writing on
    /// background threads that may still hold the file for a moment after the previous holder in
    /// this process was dropped (a restart in place, an offline restore). Another process holding
    /// it keeps it past the wait and gets sled's "could not acquire lock" error.
    pub fn open(path: &std::path::Path) -> Result<SledEngine, sled::Error> {
        let until = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => return Ok(SledEngine { db }),
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < until =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

struct SledTree(sled::Tree);

fn pair((k, v): (sled::IVec, sled::IVec)) -> KvPair {
    (k.to_vec(), v.to_vec())
}

impl KvTree for SledTree {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.0.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> io::Result<()> {
        self.0.insert(key, value).map_err(sled_err)?;
        Ok(())
    }

    fn remove(&self, key: &[u8]) -> io::Result<()> {
        self.0.remove(key).map_err(sled_err)?;
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn last(&self) -> io::Result<Option<KvPair>> {
        Ok(self.0.last().map_err(sled_err)?.map(pair))
    }

    fn range(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> io::Result<Vec<KvPair>> {
        self.0
            .range::<Vec<u8>, _>((from, to))
            .map(|r| r.map(pair).map_err(sled_err))
            .collect()
    }

    fn keys(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> io::Result<Vec<Vec<u8>>> {
        self.0
            .range::<Vec<u8>, _>((from, to))
            .keys()
            .map(|r| r.map(|k| k.to_vec()).map_err(sled_err))
            .collect()
    }

    fn apply_batch(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for (k, v) in ops {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        self.0.apply_batch(batch).map_err(sled_err)
    }
}

impl KvEngine for SledEngine {
    fn open_tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>> {
        Ok(Arc::new(SledTree(
            self.db.open_tree(name).map_err(sled_err)?,
        )))
    }

    fn tree_count(&self) -> usize {
        self.db.tree_names().len()
    }

    fn flush(&self) -> Flush<'_> {
        Box::pin(async move {
            self.db.flush_async().await.map_err(sled_err)?;
            Ok(())
        })
    }

    fn flush_blocking(&self) -> io::Result<()> {
        self.db.flush().map_err(sled_err)?;
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// An engine in memory, for tests: proof that the store needs nothing but these traits.
#[cfg(test)]
pub mod memory {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct MemoryEngine {
        trees: Mutex<BTreeMap<String, Arc<MemoryTree>>>,
    }

    #[derive(Default)]
    pub struct MemoryTree(Mutex<BTreeMap<Vec<u8>, Vec<u8>>>);

    impl MemoryTree {
        fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl KvTree for MemoryTree {
        fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
            Ok(self.map().get(key).cloned())
        }
        fn insert(&self, key: &[u8], value: Vec<u8>) -> io::Result<()> {
            self.map().insert(key.to_vec(), value);
            Ok(())
        }
        fn remove(&self, key: &[u8]) -> io::Result<()> {
            self.map().remove(key);
            Ok(())
        }
        fn is_empty(&self) -> bool {
            self.map().is_empty()
        }
        fn last(&self) -> io::Result<Option<KvPair>> {
            Ok(self
                .map()
                .iter()
                .next_back()
                .map(|(k, v)| (k.clone(), v.clone())))
        }
        fn range(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> io::Result<Vec<KvPair>> {
            Ok(self
                .map()
                .range((from, to))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
        fn keys(&self, from: Bound<Vec<u8>>, to: Bound<Vec<u8>>) -> io::Result<Vec<Vec<u8>>> {
            Ok(self
                .map()
                .range((from, to))
                .map(|(k, _)| k.clone())
                .collect())
        }
        fn apply_batch(&self, ops: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> io::Result<()> {
            let mut m = self.map();
            for (k, v) in ops {
                match v {
                    Some(v) => m.insert(k, v),
                    None => m.remove(&k),
                };
            }
            Ok(())
        }
    }

    impl KvEngine for MemoryEngine {
        fn open_tree(&self, name: &str) -> io::Result<Arc<dyn KvTree>> {
            let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
            Ok(trees.entry(name.to_string()).or_default().clone())
        }
        fn tree_count(&self) -> usize {
            self.trees.lock().map(|t| t.len()).unwrap_or(0)
        }
        fn flush(&self) -> Flush<'_> {
            Box::pin(async { Ok(()) })
        }
        fn flush_blocking(&self) -> io::Result<()> {
            Ok(())
        }
        fn size_on_disk(&self) -> u64 {
            0
        }
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_store_released_during_the_wait_opens_and_one_held_throughout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = SledEngine::open(dir.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            // Released only once the second open is already waiting for the lock.
            rx.recv().unwrap();
            drop(first);
        });
        let path = dir.path().to_path_buf();
        let opener = std::thread::spawn(move || SledEngine::open(&path));
        tx.send(()).unwrap();
        holder.join().unwrap();
        let second = opener.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());

        let held = second.unwrap();
        let err = SledEngine::open(dir.path()).err().expect("held elsewhere");
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
        drop(held);
    }
}
