//! The embedded store: per-user state in memory, rebuilt at start-up from the seed data
//! and an append-only event log. An event batch is acknowledged only after it is written
//! and synced to the log, so a crash loses nothing that was acknowledged. A batch torn by
//! a crash (never acknowledged) leaves a last line without its newline: it is cut off at
//! start-up, before anything is appended, and a write that fails is cut off at once —
//! otherwise the next acknowledged batch would share a line with the fragment and be
//! skipped with it on the next replay.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::{Mutex, RwLock},
};

use recsys_proto::{
    limits::MAX_ID_BYTES,
    v1::{EventType, UserFeatures, UserProfile},
};
use serde::{Deserialize, Serialize};

use crate::{FeatureError, Result};

const MAX_EXPERIMENTS: usize = 32;

/// One validated feedback event, as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub user_id: String,
    pub item_id: String,
    #[serde(with = "event_name")]
    pub event: EventType,
    pub timestamp_ms: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    #[serde(default)]
    pub value: f32,
    /// Experiment layer → variant of the response the event answers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub experiments: BTreeMap<String, String>,
    /// The client's id of the event, for deduplicating retried batches (may be empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub event_id: String,
}

impl StoredEvent {
    /// Validates one event of a batch; `index` names it in the error.
    pub fn from_proto(index: usize, event: &recsys_proto::v1::Event) -> Result<Self> {
        let invalid = |what: &str| FeatureError::InvalidArgument(format!("events[{index}].{what}"));
        if event.user_id.is_empty() {
            return Err(invalid("user_id is empty"));
        }
        if event.item_id.is_empty() {
            return Err(invalid("item_id is empty"));
        }
        if event.user_id.len() > MAX_ID_BYTES
            || event.item_id.len() > MAX_ID_BYTES
            || event.request_id.len() > MAX_ID_BYTES
            || event.event_id.len() > MAX_ID_BYTES
        {
            return Err(invalid(&format!("ids must be at most {MAX_ID_BYTES} bytes")));
        }
        let event_type = match EventType::try_from(event.r#type) {
            Ok(EventType::Unspecified) | Err(_) => {
                return Err(invalid(&format!("type {} is not a known event type", event.r#type)))
            }
            Ok(event_type) => event_type,
        };
        if event.timestamp_ms <= 0 {
            return Err(invalid("timestamp_ms must be a positive Unix time in milliseconds"));
        }
        if event_type == EventType::Rating && !(event.value.is_finite() && (0.0..=5.0).contains(&event.value)) {
            return Err(invalid("value must be a rating in 0..=5"));
        }
        if event.experiments.len() > MAX_EXPERIMENTS
            || event
                .experiments
                .iter()
                .any(|a| a.layer.is_empty() || a.layer.len() > MAX_ID_BYTES || a.variant.len() > MAX_ID_BYTES)
        {
            return Err(invalid(&format!(
                "experiments must be at most {MAX_EXPERIMENTS} assignments with non-empty layer names of at most {MAX_ID_BYTES} bytes"
            )));
        }
        Ok(Self {
            user_id: event.user_id.clone(),
            item_id: event.item_id.clone(),
            event: event_type,
            timestamp_ms: event.timestamp_ms,
            request_id: event.request_id.clone(),
            value: event.value,
            experiments: event.experiments.iter().map(|a| (a.layer.clone(), a.variant.clone())).collect(),
            event_id: event.event_id.clone(),
        })
    }

    fn is_engagement(&self) -> bool {
        self.event.is_engagement()
    }
}

/// An event type in the log is its name (`click`); logs written before the names were
/// unified say `EVENT_TYPE_CLICK`, which still reads.
mod event_name {
    use recsys_proto::v1::EventType;
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(event: &EventType, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(event.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<EventType, D::Error> {
        let name = String::deserialize(deserializer)?;
        EventType::from_name(&name).ok_or_else(|| D::Error::custom(format!("unknown event type {name:?}")))
    }
}

#[derive(Debug, Default, Clone)]
struct UserState {
    profile: Option<UserProfile>,
    /// (item id, Unix seconds), most recent first, at most `max_history` long.
    history: VecDeque<(String, i64)>,
    event_count: u64,
}

/// Event ids stored most recently, for deduplicating retried batches. Retries come within
/// seconds to minutes, so a window of the latest ids suffices and keeps memory bounded:
/// an id older than the window is not recognised (README, "Feedback").
pub const DEDUP_WINDOW: usize = 1_000_000;

/// The window holds 128-bit digests of the ids, not the ids (up to 128 bytes each): about
/// 50 MB for a million.
#[derive(Default)]
struct RecentIds {
    seen: HashSet<u128>,
    order: VecDeque<u128>,
}

impl RecentIds {
    fn key(id: &str) -> u128 {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(id.as_bytes());
        u128::from_le_bytes(digest[..16].try_into().expect("a sha256 digest has 32 bytes"))
    }

    fn contains(&self, id: &str) -> bool {
        !id.is_empty() && self.seen.contains(&Self::key(id))
    }

    fn insert(&mut self, id: &str) {
        if id.is_empty() {
            return;
        }
        let key = Self::key(id);
        if !self.seen.insert(key) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > DEDUP_WINDOW {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
    }
}

/// What an append did: events stored now, and events whose id was stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub stored: usize,
    pub duplicates: usize,
}

pub struct FeatureStore {
    users: RwLock<HashMap<String, UserState>>,
    log: Mutex<EventLog>,
    /// Guarded by the `log` lock's ordering: ids are checked and recorded under it.
    recent_ids: Mutex<RecentIds>,
    log_path: PathBuf,
    max_history: usize,
}

impl FeatureStore {
    /// Loads the seed data (if any), replays the event log and opens it for appending.
    pub fn open(seed_dir: Option<&Path>, log_path: &Path, max_history: usize) -> Result<Self> {
        let mut users = HashMap::new();
        if let Some(dir) = seed_dir {
            load_seed(dir, &mut users, max_history)?;
        }
        let log_error = |source| FeatureError::EventLog { path: log_path.to_path_buf(), source };
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent).map_err(log_error)?;
        }
        let mut recent_ids = RecentIds::default();
        let replayed = replay_log(log_path, &mut users, &mut recent_ids, max_history).map_err(log_error)?;
        let log = EventLog::open(log_path).map_err(log_error)?;
        tracing::info!(users = users.len(), replayed, log = %log_path.display(), "feature store opened");
        Ok(Self {
            users: RwLock::new(users),
            log: Mutex::new(log),
            recent_ids: Mutex::new(recent_ids),
            log_path: log_path.to_path_buf(),
            max_history,
        })
    }

    pub fn user_features(&self, user_id: &str, max_history: usize) -> UserFeatures {
        let users = self.users.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(state) = users.get(user_id) else {
            return UserFeatures { user_id: user_id.to_string(), ..UserFeatures::default() };
        };
        let take = max_history.min(state.history.len());
        UserFeatures {
            user_id: user_id.to_string(),
            known: true,
            profile: state.profile.clone(),
            history_item_ids: state.history.iter().take(take).map(|(id, _)| id.clone()).collect(),
            history_timestamps: state.history.iter().take(take).map(|(_, ts)| *ts).collect(),
            event_count: state.event_count,
        }
    }

    /// Durably appends `events` — but not those whose `event_id` was stored already (a
    /// retried batch) or appears earlier in the batch — then applies them. Blocking: call
    /// from a blocking thread.
    pub fn append(&self, events: &[StoredEvent]) -> Result<Appended> {
        // The log lock orders batches, so replay applies them in acknowledgement order, and
        // two concurrent tries of one batch cannot both pass the duplicate check.
        let mut log = self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut recent_ids = self.recent_ids.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut in_batch = HashSet::new();
        let fresh: Vec<&StoredEvent> = events
            .iter()
            .filter(|event| {
                event.event_id.is_empty()
                    || (!recent_ids.contains(&event.event_id) && in_batch.insert(event.event_id.as_str()))
            })
            .collect();
        let mut batch = Vec::with_capacity(fresh.len() * 128);
        for event in &fresh {
            serde_json::to_writer(&mut batch, event).expect("events serialise to JSON");
            batch.push(b'\n');
        }
        if !batch.is_empty() {
            log.append(&batch).map_err(|source| FeatureError::EventLog { path: self.log_path.clone(), source })?;
        }
        let mut users = self.users.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        for event in &fresh {
            recent_ids.insert(&event.event_id);
            apply(&mut users, event, self.max_history);
        }
        Ok(Appended { stored: fresh.len(), duplicates: events.len() - fresh.len() })
    }
}

/// The append-only log file and the length of its acknowledged part.
struct EventLog {
    file: File,
    committed: u64,
}

impl EventLog {
    /// Opens the log for appending, first cutting off a torn last line.
    fn open(path: &Path) -> std::io::Result<Self> {
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let length = file.metadata()?.len();
        let committed = complete_lines_length(&mut file, length)?;
        if committed < length {
            tracing::warn!(
                log = %path.display(),
                dropped_bytes = length - committed,
                "cutting off a torn last line (a batch that was never acknowledged)"
            );
            file.set_len(committed)?;
            file.sync_data()?;
        }
        Ok(Self { file, committed })
    }

    /// Writes and syncs `batch` (whole lines); on failure the file is cut back to its
    /// acknowledged part, so no fragment is left for the next batch to join.
    fn append(&mut self, batch: &[u8]) -> std::io::Result<()> {
        match self.file.write_all(batch).and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                self.committed += batch.len() as u64;
                Ok(())
            }
            Err(error) => {
                if let Err(cut) = self.file.set_len(self.committed) {
                    tracing::error!(%cut, "could not cut a failed batch off the event log");
                }
                Err(error)
            }
        }
    }
}

/// The length of `file` up to and including its last newline.
fn complete_lines_length(file: &mut File, length: u64) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const CHUNK: u64 = 64 * 1024;
    let mut end = length;
    let mut buffer = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buffer[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(newline) = chunk.iter().rposition(|&byte| byte == b'\n') {
            return Ok(start + newline as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn apply(users: &mut HashMap<String, UserState>, event: &StoredEvent, max_history: usize) {
    let state = users.entry(event.user_id.clone()).or_default();
    state.event_count += 1;
    if event.is_engagement() {
        record_interaction(state, &event.item_id, event.timestamp_ms / 1000, max_history);
    }
}

/// Moves `item_id` to the front of the history (an item appears once).
fn record_interaction(state: &mut UserState, item_id: &str, timestamp: i64, max_history: usize) {
    if let Some(position) = state.history.iter().position(|(id, _)| id == item_id) {
        state.history.remove(position);
    }
    state.history.push_front((item_id.to_string(), timestamp));
    state.history.truncate(max_history);
}

fn replay_log(
    path: &Path,
    users: &mut HashMap<String, UserState>,
    recent_ids: &mut RecentIds,
    max_history: usize,
) -> std::io::Result<usize> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => return Err(error),
    };
    let mut replayed = 0;
    for (number, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        match serde_json::from_str::<StoredEvent>(&line) {
            // A batch whose failed write could not be cut off may precede its retry.
            Ok(event) if recent_ids.contains(&event.event_id) => {}
            Ok(event) => {
                recent_ids.insert(&event.event_id);
                apply(users, &event, max_history);
                replayed += 1;
            }
            Err(error) => {
                tracing::warn!(line = number + 1, %error, "skipping unreadable event log line (torn write of an unacknowledged batch)");
            }
        }
    }
    Ok(replayed)
}

#[derive(Debug, Deserialize)]
struct SeedInteraction {
    user_id: String,
    item_id: String,
    timestamp: i64,
    #[serde(default)]
    event: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SeedUser {
    user_id: String,
    #[serde(default)]
    age: Option<u32>,
    #[serde(default)]
    gender: Option<String>,
    #[serde(default)]
    occupation: Option<String>,
}

fn load_seed(dir: &Path, users: &mut HashMap<String, UserState>, max_history: usize) -> Result<()> {
    let interactions_path = dir.join("interactions.csv");
    let mut interactions: Vec<SeedInteraction> = read_csv(&interactions_path)?;
    interactions.sort_by_key(|row| row.timestamp);
    for row in interactions {
        let state = users.entry(row.user_id).or_default();
        state.event_count += 1;
        // The seed's event column uses the same names; a missing one is a rating.
        let engaged = row.event.as_deref().and_then(EventType::from_name).is_none_or(EventType::is_engagement);
        if engaged {
            record_interaction(state, &row.item_id, row.timestamp, max_history);
        }
    }
    let users_path = dir.join("users.csv");
    if users_path.exists() {
        for row in read_csv::<SeedUser>(&users_path)? {
            users.entry(row.user_id).or_default().profile = Some(UserProfile {
                age: row.age.unwrap_or(0),
                gender: row.gender.unwrap_or_default(),
                occupation: row.occupation.unwrap_or_default(),
            });
        }
    }
    Ok(())
}

fn read_csv<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let seed_error = |reason: String| FeatureError::Seed { path: path.to_path_buf(), reason };
    let mut reader = csv::Reader::from_path(path).map_err(|error| seed_error(error.to_string()))?;
    reader.deserialize().collect::<Result<Vec<T>, csv::Error>>().map_err(|error| seed_error(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use recsys_proto::v1::Event;

    fn click(user: &str, item: &str, timestamp_ms: i64) -> StoredEvent {
        StoredEvent::from_proto(
            0,
            &Event {
                user_id: user.into(),
                item_id: item.into(),
                r#type: EventType::Click as i32,
                timestamp_ms,
                ..Event::default()
            },
        )
        .unwrap()
    }

    fn with_id(mut event: StoredEvent, id: &str) -> StoredEvent {
        event.event_id = id.into();
        event
    }

    #[test]
    fn a_retried_batch_is_stored_once_also_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        let batch = [with_id(click("u1", "a", 1_000), "e1"), with_id(click("u1", "b", 2_000), "e2")];
        {
            let store = FeatureStore::open(None, &log, 10).unwrap();
            assert_eq!(store.append(&batch).unwrap(), Appended { stored: 2, duplicates: 0 });
            // The retry, and a batch repeating an id within itself.
            assert_eq!(store.append(&batch).unwrap(), Appended { stored: 0, duplicates: 2 });
            let repeated = [with_id(click("u1", "c", 3_000), "e3"), with_id(click("u1", "c", 3_000), "e3")];
            assert_eq!(store.append(&repeated).unwrap(), Appended { stored: 1, duplicates: 1 });
            assert_eq!(store.user_features("u1", 10).event_count, 3);
        }
        let reopened = FeatureStore::open(None, &log, 10).unwrap();
        assert_eq!(reopened.user_features("u1", 10).event_count, 3);
        assert_eq!(reopened.append(&batch).unwrap(), Appended { stored: 0, duplicates: 2 }, "ids replayed");
        // Events without an id are never deduplicated.
        let anonymous = [click("u1", "d", 4_000), click("u1", "d", 4_000)];
        assert_eq!(reopened.append(&anonymous).unwrap(), Appended { stored: 2, duplicates: 0 });
    }

    #[test]
    fn acknowledged_events_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        {
            let store = FeatureStore::open(None, &log, 10).unwrap();
            store.append(&[click("u1", "a", 1_000), click("u1", "b", 2_000)]).unwrap();
        }
        let reopened = FeatureStore::open(None, &log, 10).unwrap();
        let features = reopened.user_features("u1", 10);
        assert!(features.known);
        assert_eq!(features.history_item_ids, vec!["b", "a"]);
        assert_eq!(features.event_count, 2);
    }

    #[test]
    fn torn_last_line_is_skipped_on_replay() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        {
            let store = FeatureStore::open(None, &log, 10).unwrap();
            store.append(&[click("u1", "a", 1_000)]).unwrap();
        }
        let mut file = OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(b"{\"user_id\":\"u1\",\"ite").unwrap();
        let reopened = FeatureStore::open(None, &log, 10).unwrap();
        assert_eq!(reopened.user_features("u1", 10).history_item_ids, vec!["a"]);
    }

    #[test]
    fn a_batch_acknowledged_after_a_torn_write_survives_the_next_restart() {
        // The loss an operator found: kill -9 tears a batch, the restarted store
        // acknowledges the next one, and a second restart must still have it.
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        FeatureStore::open(None, &log, 10).unwrap().append(&[click("u1", "a", 1_000)]).unwrap();
        OpenOptions::new().append(true).open(&log).unwrap().write_all(b"{\"user_id\":\"u1\",\"ite").unwrap();
        FeatureStore::open(None, &log, 10).unwrap().append(&[click("u1", "b", 2_000)]).unwrap();
        let reopened = FeatureStore::open(None, &log, 10).unwrap();
        let features = reopened.user_features("u1", 10);
        assert_eq!(features.history_item_ids, vec!["b", "a"]);
        assert_eq!(features.event_count, 2);
        assert!(std::fs::read_to_string(&log).unwrap().ends_with('\n'));
    }

    #[test]
    fn the_acknowledged_length_is_found_across_read_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut contents = vec![b'x'; 100_000];
        contents[10] = b'\n';
        std::fs::write(&path, &contents).unwrap();
        let mut file = File::open(&path).unwrap();
        assert_eq!(complete_lines_length(&mut file, 100_000).unwrap(), 11);
        std::fs::write(&path, b"no newline at all").unwrap();
        assert_eq!(complete_lines_length(&mut File::open(&path).unwrap(), 17).unwrap(), 0);
        std::fs::write(&path, b"a\nb\n").unwrap();
        assert_eq!(complete_lines_length(&mut File::open(&path).unwrap(), 4).unwrap(), 4);
    }

    #[test]
    fn the_log_names_event_types_once_and_still_reads_the_old_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("events.jsonl");
        FeatureStore::open(None, &log, 10).unwrap().append(&[click("u1", "a", 1_000)]).unwrap();
        assert!(std::fs::read_to_string(&log).unwrap().contains(r#""event":"click""#));
        OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"{\"user_id\":\"u1\",\"item_id\":\"b\",\"event\":\"EVENT_TYPE_LIKE\",\"timestamp_ms\":2000}\n")
            .unwrap();
        let reopened = FeatureStore::open(None, &log, 10).unwrap();
        assert_eq!(reopened.user_features("u1", 10).history_item_ids, vec!["b", "a"]);
    }

    #[test]
    fn history_is_most_recent_first_without_duplicates_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeatureStore::open(None, &dir.path().join("e.jsonl"), 2).unwrap();
        store
            .append(&[click("u", "a", 1_000), click("u", "b", 2_000), click("u", "a", 3_000), click("u", "c", 4_000)])
            .unwrap();
        assert_eq!(store.user_features("u", 10).history_item_ids, vec!["c", "a"]);
    }

    #[test]
    fn impressions_count_but_do_not_enter_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = FeatureStore::open(None, &dir.path().join("e.jsonl"), 10).unwrap();
        let mut impression = click("u", "a", 1_000);
        impression.event = EventType::Impression;
        store.append(&[impression]).unwrap();
        let features = store.user_features("u", 10);
        assert_eq!(features.event_count, 1);
        assert!(features.history_item_ids.is_empty());
    }

    #[test]
    fn seed_data_gives_profiles_and_time_ordered_history() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("interactions.csv"),
            "user_id,item_id,timestamp,event,rating\n7,10,200,rating,4\n7,11,100,rating,3\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("users.csv"), "user_id,age,gender,occupation\n7,30,F,artist\n").unwrap();
        let store = FeatureStore::open(Some(dir.path()), &dir.path().join("e.jsonl"), 10).unwrap();
        let features = store.user_features("7", 10);
        assert_eq!(features.history_item_ids, vec!["10", "11"]);
        assert_eq!(features.profile.unwrap().occupation, "artist");
        assert!(!store.user_features("unknown", 10).known);
    }

    #[test]
    fn malformed_seed_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("interactions.csv"), "user_id,item_id,timestamp\n7,10,notanumber\n").unwrap();
        let error = FeatureStore::open(Some(dir.path()), &dir.path().join("e.jsonl"), 10).err().unwrap();
        assert!(error.to_string().contains("interactions.csv"), "{error}");
    }

    #[test]
    fn invalid_events_name_the_offending_field() {
        let event = Event { user_id: "u".into(), r#type: EventType::Click as i32, timestamp_ms: 1, ..Event::default() };
        let error = StoredEvent::from_proto(3, &event).unwrap_err();
        assert_eq!(error.to_string(), "events[3].item_id is empty");
        let unspecified = Event { item_id: "i".into(), r#type: 0, ..event };
        assert!(StoredEvent::from_proto(0, &unspecified).unwrap_err().to_string().contains("type"));
    }
}
