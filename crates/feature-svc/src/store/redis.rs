//! The Redis store, for scale-out: every feature-svc replica reads and writes one Redis
//! (or a primary with replicas). Keys, under a configurable prefix:
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `u:<user>` | hash | profile, `events` count | never |
//! | `b:<user>` | sorted set | recent behaviour: item → `timestamp_ms·8 + event type`, newest kept | never |
//! | `uc:<user>` | hash | counter buckets (`m<minute>:<kind>`, `h<hour>:<kind>`) | 31 days after the last event |
//! | `ucc:<user>` | hash | per category: `<category>\|<bucket>` | 31 days after the last event |
//! | `i:<item>` | hash | `category`, `first_seen` | never |
//! | `ic:<item>` | hash | counter buckets | 31 days after the last event |
//! | `id:<digest>` | string | an event id already stored | `dedup_ttl_s` |
//! | `events` | stream | the event log (`recsysctl export-events`) | capped at `max_log_events` |
//!
//! A batch is applied by one Lua script, which Redis runs atomically: an event's id
//! marker, its log entry and its counts are written together or not at all, so a retried
//! batch is never double-counted, even across a crash. Durability is Redis's: with
//! `appendfsync always` the script's writes are fsync'd before the reply (README).
//! A read is one pipelined round trip: four commands for a user, two per item.

use std::collections::HashMap;

use recsys_proto::v1::{EventType, ItemFeatures, UserFeatures};
use redis::{aio::ConnectionManager, AsyncCommands};

use super::{Appended, EventPage, FeatureStore};
use crate::{
    counters::{counted_index, Counters},
    event::id_digest,
    seed::{self, SeedRow},
    state::{unknown_item, unknown_user, Engagement, ItemRecord, Profile, UserRecord},
    FeatureError, Result, StoredEvent,
};

/// Counter keys live this long after their last event: the longest window plus a day.
const COUNTER_TTL_S: u64 = 31 * 24 * 3600;
/// Counter hashes are pruned of buckets older than kept once they hold this many fields.
const PRUNE_AT_FIELDS: u64 = 4_000;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `unix:///path`).
    pub url: String,
    /// Prepended to every key, so several clusters can share one Redis.
    pub key_prefix: String,
    /// How long a stored event id is remembered for deduplicating retries.
    pub dedup_ttl_s: u64,
    /// The event log stream is trimmed (approximately) to this many events: export more
    /// often than it fills.
    pub max_log_events: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: "recsys:".into(),
            dedup_ttl_s: 7 * 24 * 3600,
            max_log_events: 50_000_000,
        }
    }
}

pub struct RedisStore {
    connection: ConnectionManager,
    config: RedisConfig,
    max_history: usize,
    apply: redis::Script,
}

/// Applies one batch. ARGV: prefix, max_history, dedup_ttl_s, counter_ttl_s,
/// max_log_events, prune threshold, then seven per event: id digest (or ""), user, item,
/// counted kind (or ""), behaviour score (or "" for an impression), timestamp_ms, the
/// logged event. Returns 1 (stored) or 0 (duplicate) per event.
const APPLY_BATCH: &str = r#"
local prefix, max_history, dedup_ttl, counter_ttl, max_log = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local prune_at = tonumber(ARGV[6])
local function prune(key, ts)
  local oldest_minute = math.floor(ts / 60000) - 119
  local oldest_hour = math.floor(ts / 3600000) - 743
  for _, field in ipairs(redis.call('HKEYS', key)) do
    local bucket = string.match(field, '([mh]%d+):%d$')
    if bucket then
      local index = tonumber(string.sub(bucket, 2))
      local oldest = (string.sub(bucket, 1, 1) == 'm') and oldest_minute or oldest_hour
      if index < oldest then redis.call('HDEL', key, field) end
    end
  end
end
local function count(key, field_prefix, minute, hour, ts)
  redis.call('HINCRBY', key, field_prefix .. minute, 1)
  redis.call('HINCRBY', key, field_prefix .. hour, 1)
  redis.call('EXPIRE', key, counter_ttl)
  if redis.call('HLEN', key) > prune_at then prune(key, ts) end
end
local results = {}
for i = 7, #ARGV, 7 do
  local id, user, item, kind, score, ts, logged = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4], ARGV[i+5], ARGV[i+6]
  local fresh = true
  if id ~= '' then
    fresh = redis.call('SET', prefix .. 'id:' .. id, '1', 'NX', 'EX', dedup_ttl)
  end
  if fresh then
    redis.call('XADD', prefix .. 'events', 'MAXLEN', '~', max_log, '*', 'e', logged)
    local user_key, item_key = prefix .. 'u:' .. user, prefix .. 'i:' .. item
    redis.call('HINCRBY', user_key, 'events', 1)
    local tsn = tonumber(ts)
    local seen = tonumber(redis.call('HGET', item_key, 'first_seen') or '0')
    if seen == 0 or tsn < seen then redis.call('HSET', item_key, 'first_seen', ts) end
    if kind ~= '' then
      local minute = 'm' .. math.floor(tsn / 60000) .. ':' .. kind
      local hour = 'h' .. math.floor(tsn / 3600000) .. ':' .. kind
      count(prefix .. 'uc:' .. user, '', minute, hour, tsn)
      count(prefix .. 'ic:' .. item, '', minute, hour, tsn)
      local category = redis.call('HGET', item_key, 'category')
      if category and category ~= '' then
        count(prefix .. 'ucc:' .. user, category .. '|', minute, hour, tsn)
      end
    end
    if score ~= '' then
      local behaviour = prefix .. 'b:' .. user
      local old = redis.call('ZSCORE', behaviour, item)
      if not old or tonumber(old) <= tonumber(score) then
        redis.call('ZADD', behaviour, score, item)
        redis.call('ZREMRANGEBYRANK', behaviour, 0, -(max_history + 1))
      end
    end
    table.insert(results, 1)
  else
    table.insert(results, 0)
  end
end
return results
"#;

/// The keys one user read touches, in the order it reads them: hash, behaviour, counters,
/// category counters (public so `bench-features` reads the same keys raw).
pub fn user_keys(prefix: &str, user_id: &str) -> [String; 4] {
    ["u:", "b:", "uc:", "ucc:"].map(|kind| format!("{prefix}{kind}{user_id}"))
}

/// The keys one item read touches: its hash and its counters.
pub fn item_keys(prefix: &str, item_id: &str) -> [String; 2] {
    ["i:", "ic:"].map(|kind| format!("{prefix}{kind}{item_id}"))
}

/// An engagement's behaviour score: the time, with the event type in the low three bits
/// (exact in a double until the year 30,000).
fn behaviour_score(event: EventType, timestamp_ms: i64) -> f64 {
    (timestamp_ms.max(0) * 8 + event as i64) as f64
}

fn engagement_of(item_id: String, score: f64) -> Engagement {
    let score = score as i64;
    Engagement {
        item_id,
        event: EventType::try_from((score & 7) as i32).unwrap_or(EventType::Unspecified),
        timestamp_ms: score >> 3,
    }
}

impl RedisStore {
    /// Connects (retrying in the background if Redis restarts) and loads `seed_dir` the
    /// first time this prefix is used.
    pub async fn open(config: RedisConfig, seed_dir: Option<&std::path::Path>, max_history: usize) -> Result<Self> {
        let unreachable =
            |error: redis::RedisError| FeatureError::Store { store: config.url.clone(), reason: error.to_string() };
        let client = redis::Client::open(config.url.as_str()).map_err(unreachable)?;
        let connection = ConnectionManager::new(client).await.map_err(unreachable)?;
        let store = Self { connection, config: config.clone(), max_history, apply: redis::Script::new(APPLY_BATCH) };
        if let Some(dir) = seed_dir {
            let mut connection = store.connection.clone();
            let loaded: Option<String> =
                connection.hget(store.key("meta"), "seed").await.map_err(|error| store.error(error))?;
            match loaded {
                None => store.load_seed(dir).await?,
                Some(loaded) if loaded != dir.display().to_string() => tracing::warn!(
                    redis = %config.url,
                    loaded,
                    configured = %dir.display(),
                    "Redis holds another seed under this prefix; flush it to load the configured one"
                ),
                Some(_) => {}
            }
        }
        tracing::info!(redis = %config.url, prefix = %config.key_prefix, "Redis feature store connected");
        Ok(store)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.config.key_prefix)
    }

    fn error(&self, error: redis::RedisError) -> FeatureError {
        FeatureError::Store { store: self.config.url.clone(), reason: error.to_string() }
    }

    /// Writes the seed's records with pipelines of a few thousand commands.
    async fn load_seed(&self, dir: &std::path::Path) -> Result<()> {
        let started = std::time::Instant::now();
        let mut users: HashMap<String, UserRecord> = HashMap::new();
        let mut items: HashMap<String, ItemRecord> = HashMap::new();
        seed::read(dir, |row| match row {
            SeedRow::Item { item_id, category, release_ms } => {
                let item = items.entry(item_id).or_default();
                item.category = category;
                item.first_seen_ms = release_ms;
            }
            SeedRow::User { user_id, profile } => users.entry(user_id).or_default().profile = Some(profile),
            SeedRow::Event(event) => {
                let item = items.entry(event.item_id.clone()).or_default();
                item.apply(&event);
                users.entry(event.user_id.clone()).or_default().apply(&event, &item.category, self.max_history);
            }
        })?;
        let mut connection = self.connection.clone();
        let mut pipe = redis::pipe();
        let mut queued = 0;
        for (id, user) in &users {
            let user_key = self.key(&format!("u:{id}"));
            pipe.hset(&user_key, "events", user.event_count).ignore();
            if let Some(profile) = &user.profile {
                pipe.hset_multiple(
                    &user_key,
                    &[
                        ("age", profile.age.to_string()),
                        ("gender", profile.gender.clone()),
                        ("occupation", profile.occupation.clone()),
                    ],
                )
                .ignore();
            }
            if !user.behaviour.is_empty() {
                let scored: Vec<(f64, &str)> = user
                    .behaviour
                    .iter()
                    .map(|entry| (behaviour_score(entry.event, entry.timestamp_ms), entry.item_id.as_str()))
                    .collect();
                pipe.zadd_multiple(self.key(&format!("b:{id}")), &scored).ignore();
            }
            write_counters(&mut pipe, &self.key(&format!("uc:{id}")), "", &user.counters);
            for (category, counters) in &user.categories {
                write_counters(&mut pipe, &self.key(&format!("ucc:{id}")), &format!("{category}|"), counters);
            }
            queued += 1;
            if queued % 2_000 == 0 {
                pipe.query_async::<()>(&mut connection).await.map_err(|error| self.error(error))?;
                pipe = redis::pipe();
            }
        }
        for (id, item) in &items {
            pipe.hset_multiple(
                self.key(&format!("i:{id}")),
                &[("category", item.category.clone()), ("first_seen", item.first_seen_ms.to_string())],
            )
            .ignore();
            write_counters(&mut pipe, &self.key(&format!("ic:{id}")), "", &item.counters);
            queued += 1;
            if queued % 2_000 == 0 {
                pipe.query_async::<()>(&mut connection).await.map_err(|error| self.error(error))?;
                pipe = redis::pipe();
            }
        }
        pipe.hset(self.key("meta"), "seed", dir.display().to_string()).ignore();
        pipe.query_async::<()>(&mut connection).await.map_err(|error| self.error(error))?;
        tracing::info!(
            users = users.len(),
            items = items.len(),
            seconds = started.elapsed().as_secs_f64(),
            "seed loaded into Redis"
        );
        Ok(())
    }
}

fn write_counters(pipe: &mut redis::Pipeline, key: &str, field_prefix: &str, counters: &Counters) {
    let fields: Vec<(String, u32)> =
        counters.fields().into_iter().map(|(field, count)| (format!("{field_prefix}{field}"), count)).collect();
    if !fields.is_empty() {
        pipe.hset_multiple(key, &fields).ignore();
    }
}

fn parse_counters<'a>(fields: impl IntoIterator<Item = (&'a String, &'a String)>) -> Counters {
    Counters::from_fields(fields.into_iter().filter_map(|(field, count)| Some((field.as_str(), count.parse().ok()?))))
}

#[tonic::async_trait]
impl FeatureStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn user_features(&self, user_id: &str, max_history: usize, as_of_ms: i64) -> Result<UserFeatures> {
        let mut connection = self.connection.clone();
        let last = max_history.min(self.max_history).max(1) as isize - 1;
        type UserRead = (HashMap<String, String>, Vec<(String, f64)>, HashMap<String, String>, HashMap<String, String>);
        let [user_key, behaviour_key, counters_key, categories_key] = user_keys(&self.config.key_prefix, user_id);
        let (user, behaviour, counters, categories): UserRead = redis::pipe()
            .hgetall(user_key)
            .zrevrange_withscores(behaviour_key, 0, last)
            .hgetall(counters_key)
            .hgetall(categories_key)
            .query_async(&mut connection)
            .await
            .map_err(|error| self.error(error))?;
        if user.is_empty() {
            return Ok(unknown_user(user_id));
        }
        let mut by_category: HashMap<&str, Vec<(&str, u32)>> = HashMap::new();
        for (field, count) in &categories {
            if let (Some((category, bucket)), Ok(count)) = (field.rsplit_once('|'), count.parse()) {
                by_category.entry(category).or_default().push((bucket, count));
            }
        }
        let profile = user.contains_key("occupation").then(|| Profile {
            age: user.get("age").and_then(|age| age.parse().ok()).unwrap_or(0),
            gender: user.get("gender").cloned().unwrap_or_default(),
            occupation: user.get("occupation").cloned().unwrap_or_default(),
        });
        let record = UserRecord {
            profile,
            event_count: user.get("events").and_then(|count| count.parse().ok()).unwrap_or(0),
            behaviour: behaviour.into_iter().map(|(item, score)| engagement_of(item, score)).collect(),
            counters: parse_counters(&counters),
            categories: by_category
                .into_iter()
                .map(|(category, fields)| (category.to_string(), Counters::from_fields(fields)))
                .collect(),
        };
        Ok(record.to_features(user_id, max_history, as_of_ms))
    }

    async fn item_features(&self, item_ids: &[String], as_of_ms: i64) -> Result<Vec<ItemFeatures>> {
        if item_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in item_ids {
            let [item_key, counters_key] = item_keys(&self.config.key_prefix, id);
            pipe.hgetall(item_key).hgetall(counters_key);
        }
        let mut connection = self.connection.clone();
        let hashes: Vec<HashMap<String, String>> =
            pipe.query_async(&mut connection).await.map_err(|error| self.error(error))?;
        Ok(item_ids
            .iter()
            .zip(hashes.chunks_exact(2))
            .map(|(id, pair)| {
                let (item, counters) = (&pair[0], &pair[1]);
                if item.is_empty() && counters.is_empty() {
                    return unknown_item(id);
                }
                ItemRecord {
                    category: item.get("category").cloned().unwrap_or_default(),
                    first_seen_ms: item.get("first_seen").and_then(|ms| ms.parse().ok()).unwrap_or(0),
                    counters: parse_counters(counters),
                }
                .to_features(id, as_of_ms)
            })
            .collect())
    }

    async fn append(&self, events: Vec<StoredEvent>) -> Result<Appended> {
        let mut invocation = self.apply.prepare_invoke();
        invocation
            .arg(&self.config.key_prefix)
            .arg(self.max_history)
            .arg(self.config.dedup_ttl_s)
            .arg(COUNTER_TTL_S)
            .arg(self.config.max_log_events)
            .arg(PRUNE_AT_FIELDS);
        for event in &events {
            let digest =
                if event.event_id.is_empty() { String::new() } else { format!("{:032x}", id_digest(&event.event_id)) };
            let kind = counted_index(event.event).map(|kind| kind.to_string()).unwrap_or_default();
            let score = if event.event.is_engagement() {
                behaviour_score(event.event, event.timestamp_ms).to_string()
            } else {
                String::new()
            };
            let logged = serde_json::to_string(event).expect("events serialise to JSON");
            invocation
                .arg(digest)
                .arg(&event.user_id)
                .arg(&event.item_id)
                .arg(kind)
                .arg(score)
                .arg(event.timestamp_ms)
                .arg(logged);
        }
        let mut connection = self.connection.clone();
        let stored: Vec<i64> = invocation.invoke_async(&mut connection).await.map_err(|error| self.error(error))?;
        let fresh = stored.iter().filter(|&&flag| flag == 1).count();
        Ok(Appended { stored: fresh, duplicates: events.len() - fresh })
    }

    async fn export(&self, cursor: Option<String>, limit: usize) -> Result<EventPage> {
        let start = cursor.map_or_else(|| "-".to_string(), |cursor| format!("({cursor}"));
        let mut connection = self.connection.clone();
        let reply: redis::streams::StreamRangeReply =
            connection.xrange_count(self.key("events"), start, "+", limit).await.map_err(|error| self.error(error))?;
        let mut events = Vec::with_capacity(reply.ids.len());
        let mut last = None;
        for entry in reply.ids {
            let logged: String = entry.get("e").ok_or_else(|| FeatureError::Store {
                store: self.config.url.clone(),
                reason: format!("event log entry {} has no event", entry.id),
            })?;
            events.push(serde_json::from_str(&logged).map_err(|error| FeatureError::Store {
                store: self.config.url.clone(),
                reason: format!("event log entry {}: {error}", entry.id),
            })?);
            last = Some(entry.id);
        }
        let next = if events.len() == limit { last } else { None };
        Ok(EventPage { events, next })
    }
}
