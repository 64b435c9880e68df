//! The Redis store, for scale-out: every feature-svc replica reads and writes one Redis
//! (a primary with replicas) or a Redis Cluster. Keys, under a configurable prefix, carry a
//! hash tag naming one of 256 user or item buckets (`{u17}`, `{i5}`: FNV-1a of the id), so
//! everything one batch script touches lives in one cluster slot:
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `{uB}:u:<user>` | hash | profile, `events` count | never |
//! | `{uB}:b:<user>` | sorted set | recent behaviour: item → `timestamp_ms·8 + event type`, newest kept | never |
//! | `{uB}:uc:<user>` | hash | counter buckets (`m<minute>:<kind>`, `h<hour>:<kind>`) | 31 days after the last event |
//! | `{uB}:ucc:<user>` | hash | per category: `<category>\|<bucket>` | 31 days after the last event |
//! | `{uB}:x:<user>` | list | latest impressions, newest first: `<timestamp_ms>\|<item>` | 31 days after the last impression |
//! | `{uB}:id:<digest>`, `{iB}:id:<digest>` | string | an event id stored on the user side, the item side | `dedup_ttl_s` |
//! | `{uB}:events` | stream | the event log of the bucket's users (`recsysctl export-events`) | capped at `max_log_events` per bucket |
//! | `{iB}:i:<item>` | hash | `category`, `first_seen` | never |
//! | `{iB}:ic:<item>` | hash | counter buckets | 31 days after the last event |
//! | `{iB}:is:<item>` | string | `<bundle version>\n` + the bundle's statistics as little-endian f32s (read only if the version is `meta`'s `bundle`) | never |
//! | `{catalog}:items` | hash | item → its `CatalogItem` record (proto) | never |
//! | `{catalog}:log` | sorted set | item → revision of its last change | never |
//! | `{catalog}:revision` | string | the catalogue's revision counter | never |
//!
//! A batch is applied by one Lua script per user bucket (id marker, log entry, the user's
//! profile counts, behaviour and per-category counts) and one per item bucket (id marker,
//! first sighting, counts), which Redis runs atomically; each side keeps its own id
//! markers, so a batch retried after a partial failure or a crash is applied exactly once
//! on each side. The scripts of a batch run concurrently, each on the node owning its
//! slot. Durability is Redis's: with `appendfsync always` a script's writes are fsync'd
//! before its reply (README). A user read is one round trip (four keys, one slot); an
//! item batch one round trip per item bucket, all at once (one pipeline on a single Redis).

use std::collections::HashMap;

use futures::future::try_join_all;
use recsys_proto::v1::{CatalogItem, EventType, UserFeatures};
use redis::{aio::ConnectionManager, cluster_async::ClusterConnection, Cmd, RedisFuture, Value};

use super::{
    decode_catalog, decode_names, decode_stats, encode_catalog, encode_names, encode_stats, Appended, BundleItem,
    EventPage, FeatureStore, ItemBatch, ItemRead,
};
use crate::{
    counters::{counted_index, Counters},
    event::id_digest,
    seed,
    state::{unknown_item, unknown_user, Engagement, Impressions, ItemRecord, Profile, UserRecord, RECENT_IMPRESSIONS},
    FeatureError, Result, StoredEvent,
};

/// Counter keys live this long after their last event: the longest window plus a day.
const COUNTER_TTL_S: u64 = 31 * 24 * 3600;
/// Counter hashes are pruned of buckets older than kept once they hold this many fields.
const PRUNE_AT_FIELDS: u64 = 4_000;
/// Users and items are each spread over this many hash-tag buckets.
pub const BUCKETS: u64 = 256;
/// Commands per pipeline when loading the seed.
const SEED_PIPELINE: usize = 4_096;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `unix:///path`) of a single Redis.
    pub url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port` each); when set, `url` is not used.
    pub cluster_nodes: Vec<String>,
    /// Prepended to every key, so several clusters can share one Redis (no braces).
    pub key_prefix: String,
    /// How long a stored event id is remembered for deduplicating retries.
    pub dedup_ttl_s: u64,
    /// Each bucket's event log stream is trimmed (approximately) to this many events:
    /// export more often than they fill.
    pub max_log_events: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster_nodes: Vec::new(),
            key_prefix: "recsys:".into(),
            dedup_ttl_s: 7 * 24 * 3600,
            max_log_events: 1_000_000,
        }
    }
}

/// A single Redis or a cluster, behind the one connection interface commands use.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
        }
    }
}

pub struct RedisStore {
    connection: Connection,
    config: RedisConfig,
    /// What errors name: the URL or the cluster's seed nodes.
    name: String,
    max_history: usize,
    user_side: redis::Script,
    item_side: redis::Script,
    catalog_upsert: redis::Script,
}

/// The bucket of an id: FNV-1a, stable across processes and languages.
pub fn bucket_of(id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash % BUCKETS
}

/// The keys one user read touches, in the order it reads them: hash, behaviour, counters,
/// category counters, impressions (public so `bench-features` reads the same keys raw).
pub fn user_keys(prefix: &str, user_id: &str) -> [String; 5] {
    let tag = bucket_of(user_id);
    ["u", "b", "uc", "ucc", "x"].map(|kind| format!("{prefix}{{u{tag}}}:{kind}:{user_id}"))
}

/// The keys one item read touches: its hash, its counters (both hashes) and its bundle
/// statistics (a string).
pub fn item_keys(prefix: &str, item_id: &str) -> [String; 3] {
    let tag = bucket_of(item_id);
    ["i", "ic", "is"].map(|kind| format!("{prefix}{{i{tag}}}:{kind}:{item_id}"))
}

/// Shared by both scripts: counter increments with expiry and pruning. Pruning keeps what
/// `Counters::record` keeps — per field prefix (a category), minute buckets within 120 of
/// the newest and hour buckets within 744 — and runs at most once an hour per key, once
/// the hash is large; readers drop what is older still (`Counters::from_fields`).
const COUNT_FUNCTIONS: &str = r#"
local counter_ttl, prune_at = ARGV[1], tonumber(ARGV[2])
local function prune(key)
  local fields = redis.call('HKEYS', key)
  local newest = {}
  for _, field in ipairs(fields) do
    local prefix, granularity, index = string.match(field, '^(.-)([mh])(%d+):%d$')
    if prefix then
      local group, n = prefix .. granularity, tonumber(index)
      if not newest[group] or n > newest[group] then newest[group] = n end
    end
  end
  for _, field in ipairs(fields) do
    local prefix, granularity, index = string.match(field, '^(.-)([mh])(%d+):%d$')
    if prefix then
      local kept = (granularity == 'm') and 119 or 743
      if tonumber(index) < newest[prefix .. granularity] - kept then redis.call('HDEL', key, field) end
    end
  end
end
local function count(key, field_prefix, minute, hour, ts)
  redis.call('HINCRBY', key, field_prefix .. minute, 1)
  redis.call('HINCRBY', key, field_prefix .. hour, 1)
  redis.call('EXPIRE', key, counter_ttl)
  if redis.call('HLEN', key) > prune_at then
    local this_hour = math.floor(ts / 3600000)
    if tonumber(redis.call('HGET', key, 'pruned_hour') or '0') < this_hour then
      prune(key)
      redis.call('HSET', key, 'pruned_hour', this_hour)
    end
  end
end
local function fresh(marker, dedup_ttl)
  if marker == '' then return true end
  return redis.call('SET', marker, '1', 'NX', 'EX', dedup_ttl)
end
"#;

/// The user side of one bucket's events. KEYS[1]: the bucket's log stream (routes the
/// call). ARGV: counter_ttl, prune_at, key prefix with the bucket's tag, max_history,
/// dedup_ttl, max_log, max_impressions, then nine per event: id digest (or ""), user,
/// item, the item's category (or ""), counted kind (or ""), behaviour score (or ""),
/// timestamp_ms, the logged event, "1" for an impression (or ""). Returns 1 (stored) or 0
/// (duplicate) per event.
const USER_SIDE: &str = r#"
local tagged, max_history, dedup_ttl, max_log = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local max_impressions = tonumber(ARGV[7])
local results = {}
for i = 8, #ARGV, 9 do
  local id, user, item, category = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local kind, score, ts, logged, shown = ARGV[i+4], ARGV[i+5], ARGV[i+6], ARGV[i+7], ARGV[i+8]
  if fresh(id ~= '' and (tagged .. 'id:' .. id) or '', dedup_ttl) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', max_log, '*', 'e', logged)
    redis.call('HINCRBY', tagged .. 'u:' .. user, 'events', 1)
    local tsn = tonumber(ts)
    if kind ~= '' then
      local minute = 'm' .. math.floor(tsn / 60000) .. ':' .. kind
      local hour = 'h' .. math.floor(tsn / 3600000) .. ':' .. kind
      count(tagged .. 'uc:' .. user, '', minute, hour, tsn)
      if category ~= '' then count(tagged .. 'ucc:' .. user, category .. '|', minute, hour, tsn) end
    end
    if score ~= '' then
      local behaviour = tagged .. 'b:' .. user
      local old = redis.call('ZSCORE', behaviour, item)
      if not old or tonumber(old) <= tonumber(score) then
        redis.call('ZADD', behaviour, score, item)
        redis.call('ZREMRANGEBYRANK', behaviour, 0, -(max_history + 1))
      end
    end
    if shown ~= '' then
      local impressions = tagged .. 'x:' .. user
      redis.call('LPUSH', impressions, ts .. '|' .. item)
      redis.call('LTRIM', impressions, 0, max_impressions - 1)
      redis.call('EXPIRE', impressions, ARGV[1])
    end
    table.insert(results, 1)
  else
    table.insert(results, 0)
  end
end
return results
"#;

/// The item side of one bucket's events. KEYS[1]: any key of the bucket (routes the
/// call). ARGV: counter_ttl, prune_at, key prefix with the bucket's tag, dedup_ttl, then
/// four per event: id digest (or ""), item, counted kind (or ""), timestamp_ms.
const ITEM_SIDE: &str = r#"
local tagged, dedup_ttl = ARGV[3], ARGV[4]
for i = 5, #ARGV, 4 do
  local id, item, kind, ts = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  if fresh(id ~= '' and (tagged .. 'id:' .. id) or '', dedup_ttl) then
    local item_key, tsn = tagged .. 'i:' .. item, tonumber(ts)
    local seen = tonumber(redis.call('HGET', item_key, 'first_seen') or '0')
    if seen == 0 or tsn < seen then redis.call('HSET', item_key, 'first_seen', ts) end
    if kind ~= '' then
      local minute = 'm' .. math.floor(tsn / 60000) .. ':' .. kind
      local hour = 'h' .. math.floor(tsn / 3600000) .. ':' .. kind
      count(tagged .. 'ic:' .. item, '', minute, hour, tsn)
    end
  end
end
return 1
"#;

/// Catalogue records, each under the next revision. KEYS: the records hash, the change log,
/// the revision counter (one slot: `{catalog}`). ARGV: item id, encoded record, per item.
/// Returns the revision after the write.
const CATALOG_UPSERT: &str = r#"
local revision = tonumber(redis.call('GET', KEYS[3]) or '0')
for i = 1, #ARGV, 2 do
  revision = redis.call('INCR', KEYS[3])
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1])
  redis.call('ZADD', KEYS[2], revision, ARGV[i])
end
return revision
"#;

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
    /// Connects (reconnecting in the background if Redis restarts) and loads `seed_dir`
    /// the first time this prefix is used.
    pub async fn open(config: RedisConfig, seed_dir: Option<&std::path::Path>, max_history: usize) -> Result<Self> {
        let name = if config.cluster_nodes.is_empty() { config.url.clone() } else { config.cluster_nodes.join(",") };
        let unreachable =
            |error: redis::RedisError| FeatureError::Store { store: name.clone(), reason: error.to_string() };
        if config.key_prefix.contains(['{', '}']) {
            return Err(FeatureError::Store { store: name, reason: "key_prefix must not contain braces".into() });
        }
        if config.dedup_ttl_s == 0 || config.max_log_events == 0 {
            return Err(FeatureError::Store {
                store: name,
                reason: "dedup_ttl_s and max_log_events must be positive".into(),
            });
        }
        let connection = if config.cluster_nodes.is_empty() {
            let client = redis::Client::open(config.url.as_str()).map_err(unreachable)?;
            Connection::Single(ConnectionManager::new(client).await.map_err(unreachable)?)
        } else {
            let client = redis::cluster::ClusterClient::new(config.cluster_nodes.clone()).map_err(unreachable)?;
            Connection::Cluster(client.get_async_connection().await.map_err(unreachable)?)
        };
        let scripts = |side: &str| redis::Script::new(&format!("{COUNT_FUNCTIONS}{side}"));
        let store = Self {
            connection,
            config: config.clone(),
            name: name.clone(),
            max_history,
            user_side: scripts(USER_SIDE),
            item_side: scripts(ITEM_SIDE),
            catalog_upsert: redis::Script::new(CATALOG_UPSERT),
        };
        if let Some(dir) = seed_dir {
            match store.seeded().await? {
                None => store.load_seed_once(dir).await?,
                Some(loaded) if loaded != dir.display().to_string() => tracing::warn!(
                    redis = %name,
                    loaded,
                    configured = %dir.display(),
                    "Redis holds another seed under this prefix; flush it to load the configured one"
                ),
                Some(_) => {}
            }
        }
        tracing::info!(redis = %name, prefix = %config.key_prefix, "Redis feature store connected");
        store.warn_unless_durable().await;
        Ok(store)
    }

    /// Says at start-up what an acknowledgement is worth on this Redis: only `appendonly
    /// yes` with `appendfsync always` keeps every acknowledged event through a crash of the
    /// server (README, *Feature store*). On a cluster this reads the node the command is
    /// routed to.
    async fn warn_unless_durable(&self) {
        let settings: redis::RedisResult<HashMap<String, String>> =
            redis::cmd("CONFIG").arg("GET").arg("append*").query_async(&mut self.connection.clone()).await;
        match settings {
            Ok(settings) => {
                let setting = |key: &str| settings.get(key).map_or("?", String::as_str);
                let (appendonly, appendfsync) = (setting("appendonly"), setting("appendfsync"));
                if appendonly == "yes" && appendfsync == "always" {
                    tracing::info!(redis = %self.name, "Redis fsyncs every write: acknowledged events survive a crash");
                } else {
                    tracing::warn!(
                        redis = %self.name,
                        appendonly,
                        appendfsync,
                        "Redis does not fsync every write: a crash of the server can lose acknowledged events \
                         (set appendonly yes and appendfsync always)"
                    );
                }
            }
            Err(error) => tracing::warn!(
                redis = %self.name,
                %error,
                "could not read Redis's persistence settings (CONFIG disabled?): durability unknown"
            ),
        }
    }

    /// The catalogue's keys: records, change log, revision counter (one hash tag).
    fn catalog_keys(&self) -> [String; 3] {
        ["items", "log", "revision"].map(|kind| format!("{}{{catalog}}:{kind}", self.config.key_prefix))
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.config.key_prefix)
    }

    /// The prefix of every key of a bucket: `recsys:{u17}:`.
    fn tagged(&self, side: char, bucket: u64) -> String {
        format!("{}{{{side}{bucket}}}:", self.config.key_prefix)
    }

    fn error(&self, error: redis::RedisError) -> FeatureError {
        FeatureError::Store { store: self.name.clone(), reason: error.to_string() }
    }

    /// Runs commands, each tagged with its bucket, and answers in their order: one
    /// pipeline on a single Redis; on a cluster one pipeline per bucket (a pipeline must
    /// stay in one slot), all at once.
    async fn run_grouped(&self, commands: Vec<(String, Cmd)>) -> Result<Vec<Value>> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        if let Connection::Single(_) = self.connection {
            let mut pipe = redis::pipe();
            for (_, command) in &commands {
                pipe.add_command(command.clone());
            }
            return pipe.query_async(&mut self.connection.clone()).await.map_err(|error| self.error(error));
        }
        let mut groups: HashMap<&str, (Vec<usize>, redis::Pipeline)> = HashMap::new();
        for (position, (tag, command)) in commands.iter().enumerate() {
            let (positions, pipe) = groups.entry(tag.as_str()).or_insert_with(|| (Vec::new(), redis::pipe()));
            positions.push(position);
            pipe.add_command(command.clone());
        }
        let answers = try_join_all(groups.into_values().map(|(positions, pipe)| {
            let mut connection = self.connection.clone();
            async move {
                let values: Vec<Value> = pipe.query_async(&mut connection).await?;
                Ok::<_, redis::RedisError>(positions.into_iter().zip(values))
            }
        }))
        .await
        .map_err(|error| self.error(error))?;
        let mut ordered = vec![Value::Nil; commands.len()];
        for (position, value) in answers.into_iter().flatten() {
            ordered[position] = value;
        }
        Ok(ordered)
    }

    /// Which seed this prefix was loaded with, if any.
    async fn seeded(&self) -> Result<Option<String>> {
        redis::cmd("HGET")
            .arg(self.key("meta"))
            .arg("seed")
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|error| self.error(error))
    }

    /// Loads the seed unless another replica is loading it (then waits for it): two
    /// loads could overwrite counts of events acknowledged in between.
    async fn load_seed_once(&self, dir: &std::path::Path) -> Result<()> {
        const LOAD_TIMEOUT_S: u64 = 1800;
        let claimed: Option<String> = redis::cmd("SET")
            .arg(self.key("seeding"))
            .arg(std::process::id())
            .arg("NX")
            .arg("EX")
            .arg(LOAD_TIMEOUT_S)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|error| self.error(error))?;
        if claimed.is_some() {
            return self.load_seed(dir).await;
        }
        tracing::info!(redis = %self.name, "another replica is loading the seed; waiting for it");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(LOAD_TIMEOUT_S);
        while self.seeded().await?.is_none() {
            if std::time::Instant::now() > deadline {
                return Err(FeatureError::Store {
                    store: self.name.clone(),
                    reason: "the seed load of another replica did not finish".into(),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        Ok(())
    }

    /// Writes the seed's records with grouped pipelines of a few thousand commands, and
    /// marks the prefix seeded only once all of them succeeded.
    async fn load_seed(&self, dir: &std::path::Path) -> Result<()> {
        let started = std::time::Instant::now();
        let (users, items) = seed::records(dir, self.max_history)?;
        let prefix = &self.config.key_prefix;
        let mut commands: Vec<(String, Cmd)> = Vec::new();
        for (id, user) in &users {
            let [user_key, behaviour_key, counters_key, categories_key, _] = user_keys(prefix, id);
            let tag = format!("u{}", bucket_of(id));
            let mut hash = redis::cmd("HSET");
            hash.arg(&user_key).arg("events").arg(user.event_count);
            if let Some(profile) = &user.profile {
                hash.arg("age").arg(profile.age).arg("gender").arg(&profile.gender);
                hash.arg("occupation").arg(&profile.occupation);
            }
            commands.push((tag.clone(), hash));
            if !user.behaviour.is_empty() {
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(&behaviour_key);
                for entry in &user.behaviour {
                    zadd.arg(behaviour_score(entry.event, entry.timestamp_ms)).arg(&entry.item_id);
                }
                commands.push((tag.clone(), zadd));
            }
            commands.extend(counters_command(&counters_key, "", &user.counters).map(|command| (tag.clone(), command)));
            for (category, counters) in &user.categories {
                let prefixed = format!("{category}|");
                commands.extend(
                    counters_command(&categories_key, &prefixed, counters).map(|command| (tag.clone(), command)),
                );
            }
            if commands.len() >= SEED_PIPELINE {
                self.run_grouped(std::mem::take(&mut commands)).await?;
            }
        }
        for (id, item) in &items {
            let [item_key, counters_key, _] = item_keys(prefix, id);
            let tag = format!("i{}", bucket_of(id));
            let mut hash = redis::cmd("HSET");
            hash.arg(&item_key).arg("category").arg(&item.category).arg("first_seen").arg(item.first_seen_ms);
            commands.push((tag.clone(), hash));
            commands.extend(counters_command(&counters_key, "", &item.counters).map(|command| (tag.clone(), command)));
            if commands.len() >= SEED_PIPELINE {
                self.run_grouped(std::mem::take(&mut commands)).await?;
            }
        }
        self.run_grouped(commands).await?;
        let mut meta = redis::cmd("HSET");
        meta.arg(self.key("meta")).arg("seed").arg(dir.display().to_string());
        self.run_grouped(vec![("meta".into(), meta)]).await?;
        tracing::info!(
            users = users.len(),
            items = items.len(),
            seconds = started.elapsed().as_secs_f64(),
            "seed loaded into Redis"
        );
        Ok(())
    }

    /// The categories of a batch's items (static catalogue data the user side needs).
    async fn categories(&self, events: &[StoredEvent]) -> Result<HashMap<String, String>> {
        let mut items: Vec<&str> = events.iter().map(|event| event.item_id.as_str()).collect();
        items.sort_unstable();
        items.dedup();
        let commands = items
            .iter()
            .map(|item| {
                let [item_key, _, _] = item_keys(&self.config.key_prefix, item);
                let mut command = redis::cmd("HGET");
                command.arg(item_key).arg("category");
                (format!("i{}", bucket_of(item)), command)
            })
            .collect();
        let values = self.run_grouped(commands).await?;
        Ok(items
            .into_iter()
            .zip(values)
            .filter_map(|(item, value)| {
                Some((item.to_string(), redis::from_redis_value::<Option<String>>(value).ok()??))
            })
            .collect())
    }
}

fn counters_command(key: &str, field_prefix: &str, counters: &Counters) -> Option<Cmd> {
    let fields = counters.fields();
    if fields.is_empty() {
        return None;
    }
    let mut command = redis::cmd("HSET");
    command.arg(key);
    for (field, count) in fields {
        command.arg(format!("{field_prefix}{field}")).arg(count);
    }
    Some(command)
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
        let last = max_history.min(self.max_history).max(1) as isize - 1;
        type UserRead = (
            HashMap<String, String>,
            Vec<(String, f64)>,
            HashMap<String, String>,
            HashMap<String, String>,
            Vec<String>,
        );
        let [user_key, behaviour_key, counters_key, categories_key, impressions_key] =
            user_keys(&self.config.key_prefix, user_id);
        // One slot: one pipeline, also on a cluster.
        let (user, behaviour, counters, categories, shown): UserRead = redis::pipe()
            .hgetall(user_key)
            .zrevrange_withscores(behaviour_key, 0, last)
            .hgetall(counters_key)
            .hgetall(categories_key)
            .lrange(impressions_key, 0, -1)
            .query_async(&mut self.connection.clone())
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
        let mut features = record.to_features(user_id, max_history, as_of_ms);
        // Pushed in arrival order; sorted by time like the embedded store's list.
        let mut impressions = Impressions::default();
        for entry in shown.iter().rev() {
            if let Some((timestamp_ms, item)) =
                entry.split_once('|').and_then(|(ts, item)| Some((ts.parse().ok()?, item)))
            {
                impressions.record(item, timestamp_ms);
            }
        }
        features.recent_impressions = impressions.to_proto();
        Ok(features)
    }

    async fn item_features(&self, item_ids: &[String], as_of_ms: i64, read: ItemRead) -> Result<ItemBatch> {
        let with_stats = read == ItemRead::WithBundleStats;
        let mut commands = Vec::with_capacity(3 * item_ids.len() + 1);
        if with_stats {
            let mut bundle = redis::cmd("HGET");
            bundle.arg(self.key("meta")).arg("bundle");
            commands.push(("meta".to_string(), bundle));
        }
        for id in item_ids {
            let tag = format!("i{}", bucket_of(id));
            let [item_key, counters_key, stats_key] = item_keys(&self.config.key_prefix, id);
            let stats = with_stats.then_some(("GET", stats_key));
            for (verb, key) in [("HGETALL", item_key), ("HGETALL", counters_key)].into_iter().chain(stats) {
                let mut command = redis::cmd(verb);
                command.arg(key);
                commands.push((tag.clone(), command));
            }
        }
        let store_error = |reason: String| FeatureError::Store { store: self.name.clone(), reason };
        let missing = || store_error("missing replies".into());
        let mut values = self.run_grouped(commands).await?.into_iter();
        let bundle = if with_stats {
            values
                .next()
                .map(redis::from_redis_value::<Option<String>>)
                .transpose()
                .map_err(|error| store_error(error.to_string()))?
                .flatten()
                .and_then(|stored| decode_names(&stored))
        } else {
            None
        };
        let items = item_ids
            .iter()
            .map(|id| {
                let (Some(item), Some(counters)) = (values.next(), values.next()) else {
                    return Err(missing());
                };
                let parse_error = |error: redis::ParsingError| store_error(format!("item {id}: {error}"));
                let item: HashMap<String, String> = redis::from_redis_value(item).map_err(parse_error)?;
                let counters: HashMap<String, String> = redis::from_redis_value(counters).map_err(parse_error)?;
                let stats: Option<Vec<u8>> = if with_stats {
                    redis::from_redis_value(values.next().ok_or_else(missing)?).map_err(parse_error)?
                } else {
                    None
                };
                // Statistics of another bundle version (an item the current one dropped) are not read.
                let current = match (&bundle, &stats) {
                    (Some((version, _)), Some(stats)) => stats
                        .strip_prefix(version.as_bytes())
                        .and_then(|rest| rest.strip_prefix(b"\n"))
                        .map(|values| (version, decode_stats(values))),
                    _ => None,
                };
                if item.is_empty() && counters.is_empty() && current.is_none() {
                    return Ok(unknown_item(id));
                }
                let mut features = ItemRecord {
                    category: item.get("category").cloned().unwrap_or_default(),
                    first_seen_ms: item.get("first_seen").and_then(|ms| ms.parse().ok()).unwrap_or(0),
                    counters: parse_counters(&counters),
                }
                .to_features(id, as_of_ms);
                if let Some((version, stats)) = current {
                    features.bundle_stats = stats;
                    features.bundle_version = version.clone();
                }
                Ok(features)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ItemBatch { items, stat_names: bundle.map(|(_, names)| names).unwrap_or_default() })
    }

    async fn append(&self, events: Vec<StoredEvent>) -> Result<Appended> {
        let categories = self.categories(&events).await?;
        let digests: Vec<String> =
            events
                .iter()
                .map(|event| {
                    if event.event_id.is_empty() {
                        String::new()
                    } else {
                        format!("{:032x}", id_digest(&event.event_id))
                    }
                })
                .collect();
        // Events by user bucket (in batch order within each) and by item bucket.
        let mut user_groups: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut item_groups: HashMap<u64, Vec<usize>> = HashMap::new();
        for (position, event) in events.iter().enumerate() {
            user_groups.entry(bucket_of(&event.user_id)).or_default().push(position);
            item_groups.entry(bucket_of(&event.item_id)).or_default().push(position);
        }
        let kind = |event: &StoredEvent| counted_index(event.event).map(|kind| kind.to_string()).unwrap_or_default();
        let user_calls = user_groups.iter().map(|(&bucket, positions)| {
            let tagged = self.tagged('u', bucket);
            let mut invocation = self.user_side.prepare_invoke();
            invocation
                .key(format!("{tagged}events"))
                .arg(COUNTER_TTL_S)
                .arg(PRUNE_AT_FIELDS)
                .arg(&tagged)
                .arg(self.max_history)
                .arg(self.config.dedup_ttl_s)
                .arg(self.config.max_log_events)
                .arg(RECENT_IMPRESSIONS);
            for &position in positions {
                let event = &events[position];
                let score = if event.event.is_engagement() {
                    behaviour_score(event.event, event.timestamp_ms).to_string()
                } else {
                    String::new()
                };
                invocation
                    .arg(&digests[position])
                    .arg(&event.user_id)
                    .arg(&event.item_id)
                    .arg(categories.get(&event.item_id).map_or("", String::as_str))
                    .arg(kind(event))
                    .arg(score)
                    .arg(event.timestamp_ms)
                    .arg(serde_json::to_string(event).expect("events serialise to JSON"))
                    .arg(if event.event == EventType::Impression { "1" } else { "" });
            }
            let mut connection = self.connection.clone();
            async move {
                let stored: Vec<i64> = invocation.invoke_async(&mut connection).await?;
                Ok::<_, redis::RedisError>(stored.into_iter().filter(|&flag| flag == 1).count())
            }
        });
        let item_calls = item_groups.iter().map(|(&bucket, positions)| {
            let tagged = self.tagged('i', bucket);
            let mut invocation = self.item_side.prepare_invoke();
            invocation
                .key(format!("{tagged}meta"))
                .arg(COUNTER_TTL_S)
                .arg(PRUNE_AT_FIELDS)
                .arg(&tagged)
                .arg(self.config.dedup_ttl_s);
            for &position in positions {
                let event = &events[position];
                invocation.arg(&digests[position]).arg(&event.item_id).arg(kind(event)).arg(event.timestamp_ms);
            }
            let mut connection = self.connection.clone();
            async move {
                invocation.invoke_async::<()>(&mut connection).await?;
                Ok::<_, redis::RedisError>(0)
            }
        });
        // Both sides at once; a failure anywhere fails the batch, and its retry completes
        // whichever side is missing (each side has its own id markers).
        let (user_side, item_side) = futures::future::join(try_join_all(user_calls), try_join_all(item_calls)).await;
        item_side.map_err(|error| self.error(error))?;
        let stored: usize = user_side.map_err(|error| self.error(error))?.into_iter().sum();
        Ok(Appended { stored, duplicates: events.len() - stored })
    }

    async fn bundle_version(&self) -> Result<Option<String>> {
        let stored: Option<String> = redis::cmd("HGET")
            .arg(self.key("meta"))
            .arg("bundle")
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|error| self.error(error))?;
        Ok(stored.and_then(|stored| decode_names(&stored)).map(|(version, _)| version))
    }

    /// Each item's statistics are replaced whole (with the version they belong to), then
    /// the version is recorded; readers ignore statistics of any other version.
    async fn load_bundle(&self, version: &str, names: Vec<String>, items: Vec<BundleItem>) -> Result<()> {
        let mut commands = Vec::new();
        for item in &items {
            let [_, _, stats_key] = item_keys(&self.config.key_prefix, &item.item_id);
            let mut value = format!("{version}\n").into_bytes();
            value.extend(encode_stats(&item.stats));
            let mut write = redis::cmd("SET");
            write.arg(&stats_key).arg(value);
            commands.push((format!("i{}", bucket_of(&item.item_id)), write));
            if commands.len() >= SEED_PIPELINE {
                self.run_grouped(std::mem::take(&mut commands)).await?;
            }
        }
        self.run_grouped(commands).await?;
        let mut meta = redis::cmd("HSET");
        meta.arg(self.key("meta")).arg("bundle").arg(encode_names(version, &names));
        self.run_grouped(vec![("meta".into(), meta)]).await?;
        Ok(())
    }

    async fn upsert_catalog(&self, items: Vec<CatalogItem>) -> Result<u64> {
        let [records, log, revision] = self.catalog_keys();
        let mut invocation = self.catalog_upsert.prepare_invoke();
        invocation.key(records).key(log).key(revision);
        for item in &items {
            invocation.arg(&item.item_id).arg(encode_catalog(item));
        }
        invocation.invoke_async(&mut self.connection.clone()).await.map_err(|error| self.error(error))
    }

    async fn catalog_changes(&self, since: u64, limit: usize) -> Result<(Vec<CatalogItem>, u64)> {
        let [records, log, revision] = self.catalog_keys();
        // One slot: one pipeline, also on a cluster.
        let (changed, head): (Vec<(String, u64)>, Option<u64>) = redis::pipe()
            .cmd("ZRANGEBYSCORE")
            .arg(&log)
            .arg(format!("({since}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .get(&revision)
            .query_async(&mut self.connection.clone())
            .await
            .map_err(|error| self.error(error))?;
        let head = head.unwrap_or(0);
        if changed.is_empty() {
            return Ok((Vec::new(), head));
        }
        let mut read = redis::cmd("HMGET");
        read.arg(&records);
        for (item, _) in &changed {
            read.arg(item);
        }
        // A record written after the log was read is newer than its revision says: the
        // follower applies it now and again at its next revision, which is harmless.
        let stored: Vec<Option<Vec<u8>>> =
            read.query_async(&mut self.connection.clone()).await.map_err(|error| self.error(error))?;
        changed
            .into_iter()
            .zip(stored)
            .map(|((item, revision), bytes)| {
                let corrupt = |reason: String| FeatureError::Store {
                    store: self.name.clone(),
                    reason: format!("catalogue record {item}: {reason}"),
                };
                let bytes = bytes.ok_or_else(|| corrupt("logged without a record".into()))?;
                decode_catalog(&bytes, revision).map_err(|error| corrupt(error.to_string()))
            })
            .collect::<Result<Vec<_>>>()
            .map(|items| (items, head))
    }

    /// Pages through the user buckets' logs in bucket order, each oldest first. The cursor
    /// is `<bucket>/<last stream id>`.
    async fn export(&self, cursor: Option<String>, limit: usize) -> Result<EventPage> {
        let invalid =
            |cursor: &str| FeatureError::InvalidArgument(format!("cursor {cursor:?} is not <bucket>/<stream id>"));
        let (mut bucket, mut start) = match &cursor {
            None => (0, "-".to_string()),
            Some(cursor) => {
                let (bucket, id) = cursor.split_once('/').ok_or_else(|| invalid(cursor))?;
                (bucket.parse::<u64>().map_err(|_| invalid(cursor))?, format!("({id}"))
            }
        };
        let mut events = Vec::new();
        while bucket < BUCKETS {
            let log = format!("{}events", self.tagged('u', bucket));
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(&log)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(limit - events.len())
                .query_async(&mut self.connection.clone())
                .await
                .map_err(|error| self.error(error))?;
            let mut last = None;
            for entry in reply.ids {
                let logged: String = entry.get("e").ok_or_else(|| FeatureError::Store {
                    store: self.name.clone(),
                    reason: format!("event log entry {} has no event", entry.id),
                })?;
                events.push(serde_json::from_str(&logged).map_err(|error| FeatureError::Store {
                    store: self.name.clone(),
                    reason: format!("event log entry {}: {error}", entry.id),
                })?);
                last = Some(entry.id);
            }
            if events.len() == limit {
                let next = last.map(|id| format!("{bucket}/{id}"));
                return Ok(EventPage { events, next });
            }
            bucket += 1;
            start = "-".to_string();
        }
        Ok(EventPage { events, next: None })
    }
}
