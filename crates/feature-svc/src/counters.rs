//! Windowed event counters, computed as of a point in time.
//!
//! Every entity (a user, an item, a user × category) keeps per-bucket counts: minute
//! buckets for the last two hours before its newest event and hour buckets for the last
//! 31 days. A window "as of t" sums the buckets that end with the one holding `t`: the
//! last hour from 60 minute buckets, the day windows from 24·d hour buckets. Counts are
//! therefore exact at bucket resolution; the bucket holding `t` counts whole (up to a
//! minute, or an hour for the day windows, of events after `t`). Replays of old data get
//! the same values they would have had live, because pruning follows the entity's newest
//! event, not the wall clock. The training pipeline computes the same definition
//! (`training/recsys_training/counters.py`); both are checked against
//! `training/tests/data/counters.json`.
//!
//! Both stores keep these buckets: the embedded one inside its records, Redis as hash
//! fields (`m<minute>:<kind>`, `h<hour>:<kind>`) that [`Counters::from_fields`] reads.

use recsys_proto::v1::{EventCounts, EventType, WindowedCounts};
use serde::{Deserialize, Serialize};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;
/// Minute buckets kept behind the newest event (two hours: the last-hour window of any
/// time up to an hour before the newest event is exact).
pub const MINUTES_KEPT: u32 = 120;
/// Hour buckets kept behind the newest event (the 30-day window plus a day of slack).
pub const HOURS_KEPT: u32 = 31 * 24;
/// The smoothed CTR's prior: (clicks + PRIOR_CLICKS) / (impressions + PRIOR_IMPRESSIONS),
/// a 5% CTR worth twenty impressions.
pub const PRIOR_CLICKS: f32 = 1.0;
pub const PRIOR_IMPRESSIONS: f32 = 20.0;

/// The event kinds counted, in the order of [`Bucket::counts`].
pub const COUNTED: [EventType; 4] = [EventType::Impression, EventType::Click, EventType::Like, EventType::Purchase];

/// The position of `event` in [`COUNTED`] (ratings are not counted).
pub fn counted_index(event: EventType) -> Option<usize> {
    COUNTED.iter().position(|&kind| kind == event)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Bucket {
    /// Minutes or hours since the Unix epoch.
    index: u32,
    counts: [u32; 4],
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Ascending by index.
    minutes: Vec<Bucket>,
    hours: Vec<Bucket>,
}

/// Bucket indexes of a Unix-millisecond time (times before 1970 fall in bucket 0).
pub fn minute_of(timestamp_ms: i64) -> u32 {
    (timestamp_ms.max(0) / MINUTE_MS).min(u32::MAX as i64) as u32
}

pub fn hour_of(timestamp_ms: i64) -> u32 {
    (timestamp_ms.max(0) / HOUR_MS).min(u32::MAX as i64) as u32
}

impl Counters {
    /// Counts one event of a counted kind; other kinds are ignored.
    pub fn record(&mut self, event: EventType, timestamp_ms: i64) {
        let Some(kind) = counted_index(event) else { return };
        add(&mut self.minutes, minute_of(timestamp_ms), kind, 1, MINUTES_KEPT);
        add(&mut self.hours, hour_of(timestamp_ms), kind, 1, HOURS_KEPT);
    }

    /// Rebuilds counters from Redis hash fields `m<minute>:<kind>` / `h<hour>:<kind>`;
    /// fields of other shapes are ignored.
    pub fn from_fields<'a>(fields: impl IntoIterator<Item = (&'a str, u32)>) -> Self {
        let mut counters = Self::default();
        for (field, count) in fields {
            let Some((bucket, kind)) = field.split_once(':') else { continue };
            let Ok(kind) = kind.parse::<usize>() else { continue };
            if kind >= COUNTED.len() {
                continue;
            }
            let (buckets, index) = match bucket.split_at_checked(1) {
                Some(("m", index)) => (&mut counters.minutes, index),
                Some(("h", index)) => (&mut counters.hours, index),
                _ => continue,
            };
            let Ok(index) = index.parse::<u32>() else { continue };
            add(buckets, index, kind, count, u32::MAX);
        }
        // What `record` keeps: buckets within reach of the newest (Redis prunes lazily).
        for (buckets, kept) in [(&mut counters.minutes, MINUTES_KEPT), (&mut counters.hours, HOURS_KEPT)] {
            if let Some(newest) = buckets.last().map(|bucket| bucket.index) {
                let stale = buckets.partition_point(|bucket| bucket.index < newest.saturating_sub(kept - 1));
                buckets.drain(..stale);
            }
        }
        counters
    }

    /// The standard windows as of `as_of_ms`.
    pub fn windows(&self, as_of_ms: i64) -> WindowedCounts {
        let minute = minute_of(as_of_ms);
        let hour = hour_of(as_of_ms);
        // The minute buckets cover the last hour exactly unless it starts before the
        // oldest time they still hold; then the hour bucket holding `as_of` stands in.
        let minutes_cover = self
            .minutes
            .last()
            .is_some_and(|newest| minute.saturating_sub(59) >= newest.index.saturating_sub(MINUTES_KEPT - 1));
        let last_hour = if minutes_cover || self.minutes.is_empty() {
            sum(&self.minutes, minute, 60)
        } else {
            sum(&self.hours, hour, 1)
        };
        WindowedCounts {
            last_hour: Some(last_hour),
            last_day: Some(sum(&self.hours, hour, 24)),
            last_7_days: Some(sum(&self.hours, hour, 7 * 24)),
            last_30_days: Some(sum(&self.hours, hour, 30 * 24)),
        }
    }

    /// The buckets as Redis hash fields, the inverse of [`Counters::from_fields`].
    pub fn fields(&self) -> Vec<(String, u32)> {
        let mut fields = Vec::new();
        for (prefix, buckets) in [("m", &self.minutes), ("h", &self.hours)] {
            for bucket in buckets {
                for (kind, &count) in bucket.counts.iter().enumerate().filter(|(_, &count)| count > 0) {
                    fields.push((format!("{prefix}{}:{kind}", bucket.index), count));
                }
            }
        }
        fields
    }
}

/// Adds `count` to bucket `index`, keeping the buckets sorted and at most `kept` behind
/// the newest.
fn add(buckets: &mut Vec<Bucket>, index: u32, kind: usize, count: u32, kept: u32) {
    match buckets.binary_search_by_key(&index, |bucket| bucket.index) {
        Ok(position) => buckets[position].counts[kind] = buckets[position].counts[kind].saturating_add(count),
        Err(position) => {
            let newest = buckets.last().map_or(index, |bucket| bucket.index.max(index));
            if index < newest.saturating_sub(kept - 1) {
                return; // older than anything kept
            }
            let mut counts = [0; 4];
            counts[kind] = count;
            buckets.insert(position, Bucket { index, counts });
            let oldest_kept = newest.saturating_sub(kept - 1);
            let stale = buckets.partition_point(|bucket| bucket.index < oldest_kept);
            buckets.drain(..stale);
        }
    }
}

/// The counts of the `width` buckets ending with `last` (inclusive), as a window.
fn sum(buckets: &[Bucket], last: u32, width: u32) -> EventCounts {
    let first = last.saturating_sub(width - 1);
    let start = buckets.partition_point(|bucket| bucket.index < first);
    let mut totals = [0u32; 4];
    for bucket in buckets[start..].iter().take_while(|bucket| bucket.index <= last) {
        for (total, count) in totals.iter_mut().zip(bucket.counts) {
            *total = total.saturating_add(count);
        }
    }
    let [impressions, clicks, likes, purchases] = totals;
    EventCounts {
        impressions,
        clicks,
        likes,
        purchases,
        ctr: (impressions > 0).then(|| (clicks as f32 + PRIOR_CLICKS) / (impressions as f32 + PRIOR_IMPRESSIONS)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    fn counts(window: Option<EventCounts>) -> [u32; 4] {
        let window = window.unwrap();
        [window.impressions, window.clicks, window.likes, window.purchases]
    }

    #[test]
    fn windows_end_with_the_bucket_holding_the_time() {
        let mut counters = Counters::default();
        counters.record(EventType::Impression, T0 - 2 * HOUR_MS);
        counters.record(EventType::Impression, T0 - 30 * MINUTE_MS);
        counters.record(EventType::Click, T0 - 30 * MINUTE_MS);
        counters.record(EventType::Purchase, T0 - 3 * 24 * HOUR_MS);
        counters.record(EventType::Rating, T0);
        let now = counters.windows(T0);
        assert_eq!(counts(now.last_hour), [1, 1, 0, 0]);
        assert_eq!(counts(now.last_day), [2, 1, 0, 0]);
        assert_eq!(counts(now.last_7_days), [2, 1, 0, 1]);
        // As of an hour and a half ago: the later impression and click had not happened.
        let earlier = counters.windows(T0 - 90 * MINUTE_MS);
        assert_eq!(counts(earlier.last_day), [1, 0, 0, 0]);
        assert_eq!(counts(earlier.last_hour), [1, 0, 0, 0]);
        assert_eq!(counters.windows(T0 - 10 * 24 * HOUR_MS).last_hour.unwrap().ctr, None, "no impressions, no CTR");
        let ctr = now.last_hour.unwrap().ctr.unwrap();
        assert!((ctr - 2.0 / 21.0).abs() < 1e-6, "{ctr}");
    }

    #[test]
    fn buckets_behind_the_newest_event_are_pruned_and_late_events_ignored() {
        let mut counters = Counters::default();
        counters.record(EventType::Click, T0 - 40 * 24 * HOUR_MS);
        counters.record(EventType::Click, T0);
        assert_eq!(counters.hours.len(), 1, "the 40-day-old bucket is gone");
        counters.record(EventType::Click, T0 - 35 * 24 * HOUR_MS);
        assert_eq!(counts(counters.windows(T0).last_30_days), [0, 1, 0, 0]);
        // A last hour older than the minute buckets reach is read from its hour bucket.
        counters.record(EventType::Like, T0 - 5 * HOUR_MS);
        assert_eq!(counts(counters.windows(T0 - 5 * HOUR_MS).last_hour), [0, 0, 1, 0]);
    }

    /// The fixture the training pipeline's `counters.py` is checked against too.
    #[test]
    fn counts_match_the_fixture_shared_with_training() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../training/tests/data/counters.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut counters = Counters::default();
        for event in fixture["events"].as_array().unwrap() {
            let kind = EventType::from_name(event["event"].as_str().unwrap()).unwrap();
            counters.record(kind, event["timestamp_ms"].as_i64().unwrap());
        }
        for query in fixture["queries"].as_array().unwrap() {
            let as_of = query["as_of_ms"].as_i64().unwrap();
            let windows = counters.windows(as_of);
            for (name, window) in [
                ("last_hour", windows.last_hour),
                ("last_day", windows.last_day),
                ("last_7_days", windows.last_7_days),
                ("last_30_days", windows.last_30_days),
            ] {
                let expected: Vec<u32> =
                    query[name].as_array().unwrap().iter().map(|count| count.as_u64().unwrap() as u32).collect();
                assert_eq!(counts(window).to_vec(), expected, "as of {as_of}: {name}");
            }
            let ctr = windows.last_hour.unwrap().ctr;
            match query["last_hour_ctr"].as_f64() {
                None => assert_eq!(ctr, None, "as of {as_of}"),
                Some(expected) => assert!((f64::from(ctr.unwrap()) - expected).abs() < 1e-6, "as of {as_of}: {ctr:?}"),
            }
        }
    }

    #[test]
    fn redis_fields_read_back_as_the_same_counters() {
        let mut recorded = Counters::default();
        recorded.record(EventType::Click, T0);
        recorded.record(EventType::Click, T0 + 1);
        recorded.record(EventType::Impression, T0 + HOUR_MS);
        let (minute, hour) = (minute_of(T0), hour_of(T0));
        let (minute2, hour2) = (minute_of(T0 + HOUR_MS), hour_of(T0 + HOUR_MS));
        let fields = [
            (format!("m{minute}:1"), 2),
            (format!("h{hour}:1"), 2),
            (format!("m{minute2}:0"), 1),
            (format!("h{hour2}:0"), 1),
            ("category".to_string(), 7),
            ("m12:9".to_string(), 1),
        ];
        let read = Counters::from_fields(fields.iter().map(|(field, count)| (field.as_str(), *count)));
        assert_eq!(read, recorded);
        // Buckets Redis has not pruned yet read as `record` would have kept them.
        let stale = [(format!("m{}:1", minute - 500), 1), (format!("m{minute}:1"), 2), (format!("h{hour}:1"), 2)];
        let pruned = Counters::from_fields(stale.iter().map(|(field, count)| (field.as_str(), *count)));
        assert_eq!(pruned.minutes.len(), 1);
        let written = recorded.fields();
        assert_eq!(Counters::from_fields(written.iter().map(|(field, count)| (field.as_str(), *count))), recorded);
    }
}
