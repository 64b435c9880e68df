//! Inputs built from fuzzer bytes: structured requests through `arbitrary::Unstructured`
//! (so every input is reproducible from its bytes), biased towards the values that sit on
//! a limit — empty and over-long ids, 0 and huge counts, NaN and infinite scores — and a
//! byte mutator for the targets that read files.

use std::{cell::Cell, collections::HashMap};

use arbitrary::{Result, Unstructured};
use recsys_proto::v1::{
    CandidateColumns, CatalogItem, ChannelColumn, ChannelWeight, Event, ExperimentAssignment, GetItemFeaturesRequest,
    GetUserFeaturesRequest, Impression, LogEventsRequest, RankRequest, RecallRequest, RecommendRequest,
    RerankCandidate, RerankRequest, UpsertItemsRequest, UserFeatures, UserProfile,
};

/// splitmix64: the fuzzer's own source of bytes, seeded per run.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Random bytes of a length skewed towards short inputs (most requests are small;
    /// some are large enough to cross the limits).
    pub fn bytes(&mut self) -> Vec<u8> {
        let len = match self.below(10) {
            0..=5 => self.below(256),
            6..=8 => self.below(2_048),
            _ => self.below(16_384),
        };
        let mut bytes = Vec::with_capacity(len + 8);
        while bytes.len() < len {
            bytes.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        bytes.truncate(len);
        bytes
    }
}

thread_local! {
    static HOSTILE: Cell<bool> = const { Cell::new(true) };
}

/// Each request is either hostile (values on and past every limit) or benign (values a
/// real caller sends, so that the deep paths run too rather than only the checks), chosen
/// per request from its bytes; the value generators below read the choice.
struct Mode;

impl Mode {
    fn choose(u: &mut Unstructured) -> Result<Self> {
        let hostile = u.ratio(1, 2)?;
        HOSTILE.with(|mode| mode.set(hostile));
        Ok(Mode)
    }
}

impl Drop for Mode {
    fn drop(&mut self) {
        HOSTILE.with(|mode| mode.set(true));
    }
}

fn hostile() -> bool {
    HOSTILE.with(Cell::get)
}

/// Ids and keys on either side of the limits, or that the cluster knows.
const IDS: [&str; 14] = ["", "196", "50", "1", "0", "-1", "1682", "9999999", " ", "é", "\0", "a/b", "NaN", "u-404"];

fn id(u: &mut Unstructured) -> Result<String> {
    if !hostile() {
        // Users and items of the default bundle, and some it does not know.
        return Ok(match u.int_in_range(0..=9)? {
            0 => "u-404".to_string(),
            1 => format!("fuzz-{}", u.int_in_range(0..=20u32)?),
            _ => u.int_in_range(1..=1_682u32)?.to_string(),
        });
    }
    Ok(match u.int_in_range(0..=9)? {
        0..=5 => IDS[u.choose_index(IDS.len())?].to_string(),
        6 => "u".repeat(u.int_in_range(100..=300)?),
        _ => u.arbitrary()?,
    })
}

fn count(u: &mut Unstructured) -> Result<u32> {
    if !hostile() {
        return u.int_in_range(1..=200);
    }
    const COUNTS: [u32; 10] = [0, 1, 2, 10, 50, 200, 201, 1_000, 1_001, u32::MAX];
    Ok(if u.ratio(3, 4)? { COUNTS[u.choose_index(COUNTS.len())?] } else { u.arbitrary()? })
}

fn score(u: &mut Unstructured) -> Result<f32> {
    if !hostile() {
        return Ok(u.int_in_range(0..=1_000u32)? as f32 / 1_000.0);
    }
    const SCORES: [f32; 8] = [0.0, -0.0, 1.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30];
    Ok(if u.ratio(1, 2)? { SCORES[u.choose_index(SCORES.len())?] } else { u.arbitrary()? })
}

fn time_ms(u: &mut Unstructured) -> Result<i64> {
    if !hostile() {
        // Within the MovieLens years, and around now.
        let base = if u.arbitrary()? { 874_724_710_000 } else { 1_764_547_200_000 };
        return Ok(base + i64::from(u.int_in_range(0..=200_000_000u32)?));
    }
    const TIMES: [i64; 7] = [0, -1, 1, 893_286_638_000, 1_764_547_200_000, i64::MAX, i64::MIN];
    Ok(if u.ratio(3, 4)? { TIMES[u.choose_index(TIMES.len())?] } else { u.arbitrary()? })
}

/// A list of up to `max` elements, most of them short.
fn list<T>(
    u: &mut Unstructured,
    max: usize,
    mut element: impl FnMut(&mut Unstructured) -> Result<T>,
) -> Result<Vec<T>> {
    let len = if hostile() && u.ratio(1, 20)? { u.int_in_range(0..=max)? } else { u.int_in_range(0..=max.min(12))? };
    (0..len).map(|_| element(u)).collect()
}

fn string_map(u: &mut Unstructured, keys: &[&str]) -> Result<HashMap<String, String>> {
    if !hostile() {
        let mut map = HashMap::new();
        for key in keys {
            if u.ratio(1, 3)? {
                let value = match *key {
                    "request_time" => (874_724_710 + u.int_in_range(0..=20_000_000u32)?).to_string(),
                    "user_age" => u.int_in_range(10..=80u32)?.to_string(),
                    "region" | "regions" => ["US", "DE", "FR"][u.choose_index(3)?].to_string(),
                    _ => id(u)?,
                };
                map.insert(key.to_string(), value);
            }
        }
        return Ok(map);
    }
    let pairs = list(u, 64, |u| {
        let key = if u.ratio(2, 3)? { keys[u.choose_index(keys.len())?].to_string() } else { id(u)? };
        let value = if u.ratio(1, 2)? { u.int_in_range(-5..=200i64)?.to_string() } else { id(u)? };
        Ok((key, value))
    })?;
    Ok(pairs.into_iter().collect())
}

fn experiments(u: &mut Unstructured) -> Result<Vec<ExperimentAssignment>> {
    list(u, 20, |u| Ok(ExperimentAssignment { layer: id(u)?, variant: id(u)? }))
}

fn enum_value(u: &mut Unstructured, known: i32) -> Result<i32> {
    if !hostile() {
        return u.int_in_range(1..=known);
    }
    Ok(if u.ratio(7, 8)? { u.int_in_range(0..=known)? } else { u.arbitrary()? })
}

/// Empty (the default scene or version) unless hostile, and then only sometimes.
fn rarely_set(u: &mut Unstructured) -> Result<String> {
    Ok(if hostile() && u.ratio(1, 5)? { id(u)? } else { String::new() })
}

pub fn recommend(u: &mut Unstructured) -> Result<RecommendRequest> {
    let _mode = Mode::choose(u)?;
    Ok(RecommendRequest {
        user_id: id(u)?,
        top_k: count(u)?,
        scene: rarely_set(u)?,
        context: string_map(u, &["request_time", "region", "user_age", "device"])?,
        exclude_item_ids: list(u, 1_100, id)?,
        debug: u.arbitrary()?,
    })
}

fn event(u: &mut Unstructured) -> Result<Event> {
    Ok(Event {
        user_id: id(u)?,
        item_id: id(u)?,
        r#type: enum_value(u, 5)?,
        timestamp_ms: time_ms(u)?,
        request_id: id(u)?,
        value: score(u)?,
        experiments: experiments(u)?,
        event_id: id(u)?,
    })
}

pub fn log_events(u: &mut Unstructured) -> Result<LogEventsRequest> {
    let _mode = Mode::choose(u)?;
    Ok(LogEventsRequest { events: list(u, 1_100, event)? })
}

fn user(u: &mut Unstructured) -> Result<UserFeatures> {
    let history = list(u, 600, id)?;
    Ok(UserFeatures {
        user_id: id(u)?,
        known: u.arbitrary()?,
        profile: if u.ratio(1, 2)? {
            Some(UserProfile { age: count(u)?, gender: id(u)?, occupation: id(u)? })
        } else {
            None
        },
        history_timestamps: list(u, history.len() + 2, time_ms)?,
        history_event_types: list(u, history.len() + 2, |u| enum_value(u, 5))?,
        history_item_ids: history,
        event_count: u.arbitrary()?,
        counts: None,
        category_counts: Vec::new(),
        recent_impressions: list(u, 300, |u| Ok(Impression { item_id: id(u)?, timestamp_ms: time_ms(u)? }))?,
    })
}

pub fn recall(u: &mut Unstructured) -> Result<RecallRequest> {
    let _mode = Mode::choose(u)?;
    Ok(RecallRequest {
        user: if u.ratio(9, 10)? { Some(user(u)?) } else { None },
        candidate_count: count(u)?,
        exclude_item_ids: list(u, 1_100, id)?,
        channel_weights: list(u, 8, |u| Ok(ChannelWeight { channel: enum_value(u, 6)?, weight: score(u)? }))?,
    })
}

fn candidates(u: &mut Unstructured) -> Result<CandidateColumns> {
    let item_ids = list(u, 1_100, id)?;
    let count = item_ids.len();
    Ok(CandidateColumns {
        item_ids,
        scores: column(u, count, score)?,
        positions: column(u, count, self::count)?,
        channels: list(u, 8, |u| {
            Ok(ChannelColumn {
                channel: enum_value(u, 6)?,
                scores: column(u, count, score)?,
                ranks: column(u, count, self::count)?,
            })
        })?,
    })
}

/// A column of `count` entries, as the contract has it; when hostile, sometimes one of any
/// length (empty is "not given").
fn column<T>(
    u: &mut Unstructured,
    count: usize,
    mut element: impl FnMut(&mut Unstructured) -> Result<T>,
) -> Result<Vec<T>> {
    if hostile() && u.ratio(1, 8)? {
        return list(u, 1_100, element);
    }
    (0..count).map(|_| element(u)).collect()
}

pub fn rank(u: &mut Unstructured) -> Result<RankRequest> {
    let _mode = Mode::choose(u)?;
    Ok(RankRequest {
        user: if u.ratio(9, 10)? { Some(user(u)?) } else { None },
        candidates: if u.ratio(19, 20)? { Some(candidates(u)?) } else { None },
        coarse_keep: count(u)?,
        fine_keep: count(u)?,
        request_time: if u.arbitrary()? { Some(time_ms(u)? / 1000) } else { None },
        bundle_version: rarely_set(u)?,
    })
}

pub fn rerank(u: &mut Unstructured) -> Result<RerankRequest> {
    let _mode = Mode::choose(u)?;
    Ok(RerankRequest {
        candidates: list(u, 1_100, |u| {
            Ok(RerankCandidate { item_id: id(u)?, score: score(u)?, counts: None, cold_start: u.arbitrary()? })
        })?,
        top_k: count(u)?,
        relevance_weight: if u.arbitrary()? { Some(score(u)?) } else { None },
        bundle_version: rarely_set(u)?,
        scene: rarely_set(u)?,
        experiments: if hostile() { experiments(u)? } else { Vec::new() },
        context: string_map(u, &["region", "user_age"])?,
        request_time: time_ms(u)?,
        recent_impressions: list(u, 300, |u| Ok(Impression { item_id: id(u)?, timestamp_ms: time_ms(u)? }))?,
        debug: u.arbitrary()?,
    })
}

pub fn user_features(u: &mut Unstructured) -> Result<GetUserFeaturesRequest> {
    let _mode = Mode::choose(u)?;
    Ok(GetUserFeaturesRequest { user_id: id(u)?, max_history: count(u)?, as_of_ms: time_ms(u)? })
}

pub fn item_features(u: &mut Unstructured) -> Result<GetItemFeaturesRequest> {
    let _mode = Mode::choose(u)?;
    Ok(GetItemFeaturesRequest { item_ids: list(u, 1_100, id)?, as_of_ms: time_ms(u)?, counts_only: u.arbitrary()? })
}

pub fn upsert_items(u: &mut Unstructured) -> Result<UpsertItemsRequest> {
    let _mode = Mode::choose(u)?;
    let item = |u: &mut Unstructured| {
        Ok(CatalogItem {
            // Own ids, so that the fuzzer never retires or hides the items other targets serve.
            item_id: format!("fuzz-{}", id(u)?),
            availability: enum_value(u, 2)?,
            promoted: u.arbitrary()?,
            publish_time_ms: time_ms(u)?,
            category: id(u)?,
            attributes: string_map(u, &["seller", "regions", "age_rating", "price"])?,
            retired: u.arbitrary()?,
            revision: u.arbitrary()?,
        })
    };
    Ok(UpsertItemsRequest { items: list(u, 1_100, item)? })
}

/// `seed` changed by one to eight edits chosen from `rng`: bit flips, interesting bytes,
/// deletions, duplications, insertions, truncation.
pub fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(7) {
            0 if !bytes.is_empty() => {
                let at = at.min(bytes.len() - 1);
                bytes[at] ^= 1 << rng.below(8);
            }
            1 if !bytes.is_empty() => {
                const INTERESTING: [u8; 8] = [0, 0xff, 0x7f, 0x80, b'"', b'[', b'\n', b'9'];
                let at = at.min(bytes.len() - 1);
                bytes[at] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => {
                let end = (at + rng.below(64)).min(bytes.len());
                bytes.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(64)).min(bytes.len());
                let copy = bytes[at..end].to_vec();
                let to = rng.below(bytes.len() + 1);
                bytes.splice(to..to, copy);
            }
            4 => {
                let insert: Vec<u8> = (0..rng.below(16)).map(|_| rng.next_u64() as u8).collect();
                bytes.splice(at..at, insert);
            }
            5 => bytes.truncate(at),
            _ => {}
        }
    }
    bytes
}
