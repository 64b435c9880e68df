//! The embedded store: one redb file. redb is a copy-on-write B-tree whose commits are
//! fsync'd before they return (`Durability::Immediate`) and whose file is always a valid
//! committed state, so a crash at any moment loses nothing acknowledged and needs no log
//! replay: start-up opens the file, whatever the history. Concurrent batches share one
//! commit (group commit on a writer thread), which is what makes durable ingestion fast.
//!
//! Tables: `events` (sequence → event as JSON, the log exported as training data), `event_ids`
//! (id digest → sequence, for idempotent retries), `users` and `items` (the records of
//! `state.rs`), `impressions` (each user's latest), `bundle_stats` (the current bundle's
//! item statistics), `catalog` and `catalog_log` (the run-time catalogue and its change
//! log), `meta` (which seed and which bundle were loaded).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use recsys_proto::v1::{CatalogItem, EventType, UserFeatures};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{
    decode_catalog, decode_names, decode_stats, encode_catalog, encode_names, encode_stats, Appended, BundleItem,
    EventPage, FeatureStore, ItemBatch, ItemRead,
};
use crate::{
    event::id_digest,
    seed,
    state::{unknown_item, unknown_user, Impressions, ItemRecord, UserRecord},
    FeatureError, Result, StoredEvent,
};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const EVENT_IDS: TableDefinition<u128, u64> = TableDefinition::new("event_ids");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Item id → the current bundle's statistics for it (little-endian f32s, aligned with the
/// names in `meta`'s `bundle`).
const BUNDLE_STATS: TableDefinition<&str, &[u8]> = TableDefinition::new("bundle_stats");
/// User id → `Impressions`.
const IMPRESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("impressions");
/// Item id → (revision of its last change, its `CatalogItem` record).
const CATALOG: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("catalog");
/// Revision → the item changed at it; an item's older revisions are removed, so the log
/// holds one entry per item and its last key is the catalogue's revision.
const CATALOG_LOG: TableDefinition<u64, &str> = TableDefinition::new("catalog_log");

/// Events one commit takes at most: bounds a commit's latency under a burst.
const MAX_GROUP_EVENTS: usize = 16_384;
/// Batches waiting for the writer thread at most: beyond it an append waits for room (its
/// caller's deadline bounds the wait), so a burst cannot grow memory without limit.
const MAX_QUEUED_BATCHES: usize = 1_024;

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
    /// `None` only while dropping.
    writer: Option<tokio::sync::mpsc::Sender<WriteJob>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for EmbeddedStore {
    /// Waits for the writer thread to finish its last commit and release the file, so the
    /// store can be opened again at once (tests, restarts in one process).
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

struct WriteJob {
    events: Vec<StoredEvent>,
    reply: oneshot::Sender<Result<Appended>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store at `path`, loading `seed_dir` into it the first time.
    pub fn open(path: &Path, seed_dir: Option<&Path>, max_history: usize) -> Result<Self> {
        let store_error = store_error(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| store_error(error.into()))?;
        }
        let db = Database::create(path).map_err(|error| store_error(error.into()))?;
        let txn = db.begin_write().map_err(|error| store_error(error.into()))?;
        let seeded = {
            // Every table exists from the start, so readers never meet a missing one.
            let created = (|| -> Result<Option<String>, redb::Error> {
                txn.open_table(EVENTS)?;
                txn.open_table(EVENT_IDS)?;
                txn.open_table(USERS)?;
                txn.open_table(ITEMS)?;
                txn.open_table(BUNDLE_STATS)?;
                txn.open_table(IMPRESSIONS)?;
                txn.open_table(CATALOG)?;
                txn.open_table(CATALOG_LOG)?;
                let meta = txn.open_table(META)?;
                let seeded = meta.get("seed")?.map(|value| value.value().to_string());
                Ok(seeded)
            })();
            created.map_err(&store_error)?
        };
        txn.commit().map_err(|error| store_error(error.into()))?;
        let db = Arc::new(db);
        if let Some(dir) = seed_dir {
            match seeded {
                None => load_seed(&db, path, dir, max_history)?,
                Some(loaded) if loaded != dir.display().to_string() => tracing::warn!(
                    store = %path.display(),
                    loaded,
                    configured = %dir.display(),
                    "the store holds another seed; delete the store file to load the configured one"
                ),
                Some(_) => {}
            }
        }
        let (writer, mut jobs) = tokio::sync::mpsc::channel(MAX_QUEUED_BATCHES);
        let writer_db = Arc::clone(&db);
        let writer_path = path.to_path_buf();
        let writer_thread = std::thread::Builder::new()
            .name("feature-store-writer".into())
            .spawn(move || write_groups(&writer_db, &writer_path, &mut jobs, max_history))
            .map_err(|error| store_error(redb::Error::Io(error)))?;
        tracing::info!(store = %path.display(), "embedded feature store opened");
        Ok(Self { db, path: path.to_path_buf(), writer: Some(writer), writer_thread: Some(writer_thread) })
    }

    /// Runs a read on a blocking thread: a batch of thousands of records (or a cold page
    /// cache) must not hold an async worker.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T> {
        let (db, path) = (Arc::clone(&self.db), self.path.clone());
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(|error| store_error(&path)(error.into()))?;
            read(&txn).map_err(store_error(&path))
        })
        .await
        .map_err(|error| FeatureError::Store { store: self.path.display().to_string(), reason: error.to_string() })?
    }
}

fn store_error(path: &Path) -> impl Fn(redb::Error) -> FeatureError + '_ {
    move |error| FeatureError::Store { store: path.display().to_string(), reason: error.to_string() }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("records serialise")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, redb::Error> {
    postcard::from_bytes(bytes).map_err(|error| redb::Error::Corrupted(format!("undecodable record: {error}")))
}

#[tonic::async_trait]
impl FeatureStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn user_features(&self, user_id: &str, max_history: usize, as_of_ms: i64) -> Result<UserFeatures> {
        let user_id = user_id.to_string();
        self.read(move |txn| {
            let users = txn.open_table(USERS)?;
            let record = users.get(user_id.as_str())?.map(|bytes| decode::<UserRecord>(bytes.value())).transpose()?;
            let Some(record) = record else { return Ok(unknown_user(&user_id)) };
            let mut features = record.to_features(&user_id, max_history, as_of_ms);
            let impressions = txn.open_table(IMPRESSIONS)?;
            if let Some(bytes) = impressions.get(user_id.as_str())? {
                features.recent_impressions = decode::<Impressions>(bytes.value())?.to_proto();
            }
            Ok(features)
        })
        .await
    }

    async fn item_features(&self, item_ids: &[String], as_of_ms: i64, read: ItemRead) -> Result<ItemBatch> {
        let item_ids = item_ids.to_vec();
        self.read(move |txn| {
            let items = txn.open_table(ITEMS)?;
            let (stats, bundle) = match read {
                ItemRead::Counts => (None, None),
                ItemRead::WithBundleStats => (
                    Some(txn.open_table(BUNDLE_STATS)?),
                    txn.open_table(META)?.get("bundle")?.and_then(|stored| decode_names(stored.value())),
                ),
            };
            let items = item_ids
                .iter()
                .map(|id| {
                    let record =
                        items.get(id.as_str())?.map(|bytes| decode::<ItemRecord>(bytes.value())).transpose()?;
                    let mut features = record.map_or_else(|| unknown_item(id), |item| item.to_features(id, as_of_ms));
                    if let (Some((version, _)), Some(stats)) = (&bundle, &stats) {
                        if let Some(bytes) = stats.get(id.as_str())? {
                            features.bundle_stats = decode_stats(bytes.value());
                            features.bundle_version = version.clone();
                            features.known = true;
                        }
                    }
                    Ok(features)
                })
                .collect::<Result<Vec<_>, redb::Error>>()?;
            Ok(ItemBatch { items, stat_names: bundle.map(|(_, names)| names).unwrap_or_default() })
        })
        .await
    }

    async fn append(&self, events: Vec<StoredEvent>) -> Result<Appended> {
        let (reply, answer) = oneshot::channel();
        let closed = || FeatureError::Store {
            store: self.path.display().to_string(),
            reason: "the writer thread has stopped".into(),
        };
        let writer = self.writer.as_ref().ok_or_else(closed)?;
        writer.send(WriteJob { events, reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    async fn export(&self, cursor: Option<String>, limit: usize) -> Result<EventPage> {
        let after = match cursor {
            None => 0,
            Some(cursor) => cursor.parse::<u64>().map_err(|_| {
                FeatureError::InvalidArgument(format!("cursor {cursor:?} is not an event sequence number"))
            })?,
        };
        self.read(move |txn| {
            let log = txn.open_table(EVENTS)?;
            let mut events = Vec::with_capacity(limit.min(4096));
            let mut last = after;
            for entry in log.range(after + 1..)?.take(limit) {
                let (sequence, bytes) = entry?;
                last = sequence.value();
                let event = serde_json::from_slice(bytes.value()).map_err(|error| {
                    redb::Error::Corrupted(format!("undecodable event {}: {error}", sequence.value()))
                })?;
                events.push(event);
            }
            let next = (events.len() == limit).then(|| last.to_string());
            Ok(EventPage { events, next })
        })
        .await
    }

    async fn bundle_version(&self) -> Result<Option<String>> {
        self.read(|txn| {
            let stored = txn.open_table(META)?.get("bundle")?.map(|stored| stored.value().to_string());
            Ok(stored.and_then(|stored| decode_names(&stored)).map(|(version, _)| version))
        })
        .await
    }

    async fn load_bundle(&self, version: &str, names: Vec<String>, items: Vec<BundleItem>) -> Result<()> {
        let db = Arc::clone(&self.db);
        let bundle = encode_names(version, &names);
        let write = move || -> Result<(), redb::Error> {
            // One commit: the old statistics, the new ones and the version change together.
            let txn = db.begin_write()?;
            txn.delete_table(BUNDLE_STATS)?;
            {
                let mut stats = txn.open_table(BUNDLE_STATS)?;
                for item in &items {
                    stats.insert(item.item_id.as_str(), encode_stats(&item.stats).as_slice())?;
                }
                txn.open_table(META)?.insert("bundle", bundle.as_str())?;
            }
            txn.commit()?;
            Ok(())
        };
        self.write(write).await
    }

    async fn upsert_catalog(&self, items: Vec<CatalogItem>) -> Result<u64> {
        let db = Arc::clone(&self.db);
        self.write(move || {
            let txn = db.begin_write()?;
            let revision = {
                let mut records = txn.open_table(CATALOG)?;
                let mut log = txn.open_table(CATALOG_LOG)?;
                let mut revision = log.last()?.map_or(0, |(revision, _)| revision.value());
                for item in &items {
                    revision += 1;
                    let replaced =
                        records.insert(item.item_id.as_str(), (revision, encode_catalog(item).as_slice()))?;
                    if let Some(previous) = replaced.map(|entry| entry.value().0) {
                        log.remove(previous)?;
                    }
                    log.insert(revision, item.item_id.as_str())?;
                }
                revision
            };
            txn.commit()?;
            Ok(revision)
        })
        .await
    }

    async fn catalog_changes(&self, since: u64, limit: usize) -> Result<(Vec<CatalogItem>, u64)> {
        self.read(move |txn| {
            let records = txn.open_table(CATALOG)?;
            let log = txn.open_table(CATALOG_LOG)?;
            let head = log.last()?.map_or(0, |(revision, _)| revision.value());
            let mut items = Vec::new();
            for entry in log.range(since + 1..)?.take(limit) {
                let (revision, item_id) = entry?;
                let record = records.get(item_id.value())?.ok_or_else(|| {
                    redb::Error::Corrupted(format!("catalogue log names {} without a record", item_id.value()))
                })?;
                let (_, bytes) = record.value();
                let item = decode_catalog(bytes, revision.value()).map_err(|error| {
                    redb::Error::Corrupted(format!("catalogue record {}: {error}", item_id.value()))
                })?;
                items.push(item);
            }
            Ok((items, head))
        })
        .await
    }
}

impl EmbeddedStore {
    /// Runs a write transaction on a blocking thread (redb serialises writers; the event
    /// writer thread's group commits wait their turn like these).
    async fn write<T: Send + 'static>(
        &self,
        write: impl FnOnce() -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || write().map_err(store_error(&path))).await.map_err(|error| {
            FeatureError::Store { store: self.path.display().to_string(), reason: error.to_string() }
        })?
    }
}

/// The writer thread: takes every batch waiting, commits them together, answers each.
fn write_groups(db: &Database, path: &Path, jobs: &mut tokio::sync::mpsc::Receiver<WriteJob>, max_history: usize) {
    while let Some(first) = jobs.blocking_recv() {
        let mut group = vec![first];
        let mut events = group[0].events.len();
        while events < MAX_GROUP_EVENTS {
            match jobs.try_recv() {
                Ok(job) => {
                    events += job.events.len();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        match commit_group(db, &group, max_history) {
            Ok(appended) => {
                for (job, appended) in group.into_iter().zip(appended) {
                    let _ = job.reply.send(Ok(appended));
                }
            }
            Err(error) => {
                tracing::error!(store = %path.display(), %error, "event commit failed; the batches are not acknowledged");
                for job in group {
                    let _ = job.reply.send(Err(store_error(path)(redb::Error::Corrupted(error.to_string()))));
                }
            }
        }
    }
}

fn commit_group(db: &Database, group: &[WriteJob], max_history: usize) -> Result<Vec<Appended>, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate).map_err(|error| redb::Error::Corrupted(error.to_string()))?;
    let mut results = Vec::with_capacity(group.len());
    {
        let mut log = txn.open_table(EVENTS)?;
        let mut ids = txn.open_table(EVENT_IDS)?;
        let mut records = Records::new(txn.open_table(USERS)?, txn.open_table(ITEMS)?);
        let mut impressions = Loaded::<Impressions>::new(txn.open_table(IMPRESSIONS)?);
        let mut next = log.last()?.map_or(1, |(sequence, _)| sequence.value() + 1);
        for job in group {
            let mut appended = Appended::default();
            for event in &job.events {
                if !event.event_id.is_empty() {
                    let digest = id_digest(&event.event_id);
                    if ids.get(digest)?.is_some() {
                        appended.duplicates += 1;
                        continue;
                    }
                    ids.insert(digest, next)?;
                }
                // JSON, as everywhere the log leaves the store (postcard cannot skip
                // empty optional fields).
                log.insert(next, serde_json::to_vec(event).expect("events serialise").as_slice())?;
                next += 1;
                records.apply(event, max_history)?;
                if event.event == EventType::Impression {
                    impressions.get_mut(&event.user_id)?.record(&event.item_id, event.timestamp_ms);
                }
                appended.stored += 1;
            }
            results.push(appended);
        }
        records.write_back()?;
        impressions.write_back()?;
    }
    txn.commit()?;
    Ok(results)
}

/// The records of one table a commit touches, each read once (or started from its
/// default) and written once: users, items and impression lists alike.
struct Loaded<'txn, T> {
    table: redb::Table<'txn, &'static str, &'static [u8]>,
    records: HashMap<String, T>,
}

impl<'txn, T: serde::Serialize + serde::de::DeserializeOwned + Default> Loaded<'txn, T> {
    fn new(table: redb::Table<'txn, &'static str, &'static [u8]>) -> Self {
        Self { table, records: HashMap::new() }
    }

    fn get_mut(&mut self, id: &str) -> Result<&mut T, redb::Error> {
        if !self.records.contains_key(id) {
            let stored = self.table.get(id)?.map(|bytes| decode(bytes.value())).transpose()?;
            self.records.insert(id.to_string(), stored.unwrap_or_default());
        }
        Ok(self.records.get_mut(id).expect("just inserted"))
    }

    fn write_back(mut self) -> Result<(), redb::Error> {
        for (id, record) in &self.records {
            self.table.insert(id.as_str(), encode(record).as_slice())?;
        }
        Ok(())
    }
}

/// The user and item records a commit touches.
struct Records<'txn> {
    users: Loaded<'txn, UserRecord>,
    items: Loaded<'txn, ItemRecord>,
}

impl<'txn> Records<'txn> {
    fn new(
        users_table: redb::Table<'txn, &'static str, &'static [u8]>,
        items_table: redb::Table<'txn, &'static str, &'static [u8]>,
    ) -> Self {
        Self { users: Loaded::new(users_table), items: Loaded::new(items_table) }
    }

    fn apply(&mut self, event: &StoredEvent, max_history: usize) -> Result<(), redb::Error> {
        let item = self.items.get_mut(&event.item_id)?;
        item.apply(event);
        let user = self.users.get_mut(&event.user_id)?;
        user.apply(event, &item.category, max_history);
        Ok(())
    }

    fn write_back(self) -> Result<(), redb::Error> {
        self.users.write_back()?;
        self.items.write_back()
    }
}

/// Loads the seed into an empty store in one commit: records are built in memory, then
/// written once each.
fn load_seed(db: &Database, path: &Path, dir: &Path, max_history: usize) -> Result<()> {
    let started = std::time::Instant::now();
    let (users, items) = seed::records(dir, max_history)?;
    let (user_count, item_count) = (users.len(), items.len());
    let write = || -> Result<(), redb::Error> {
        let txn = db.begin_write()?;
        {
            let mut records = Records::new(txn.open_table(USERS)?, txn.open_table(ITEMS)?);
            records.users.records = users;
            records.items.records = items;
            records.write_back()?;
            txn.open_table(META)?.insert("seed", dir.display().to_string().as_str())?;
        }
        txn.commit()?;
        Ok(())
    };
    write().map_err(store_error(path))?;
    tracing::info!(
        users = user_count,
        items = item_count,
        seconds = started.elapsed().as_secs_f64(),
        "seed loaded into the embedded store"
    );
    Ok(())
}
