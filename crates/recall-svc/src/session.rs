//! The real-time channel's session: which of the user's latest events say what they want
//! now, and how much each says (the article's "Real-Time Behavior Recall"). The history
//! comes from the feature store with every request, so an event of a second ago counts.

use recsys_proto::v1::EventType;
use serde::{Deserialize, Serialize};

/// Without event times the session is the latest this many items, equally weighted.
const UNTIMED_ITEMS: usize = 5;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Events within this many minutes before the user's latest event make the session
    /// (the latest event is the anchor: recall is not told the request's time, and a
    /// replayed or returning user's last session is still their clearest intent).
    pub window_minutes: f64,
    /// An event's weight halves every this many minutes before the latest one.
    pub half_life_minutes: f64,
    /// At most this many events count.
    pub max_items: usize,
    /// Weight of each kind of event (the article's view 1 / click 2 / share 3 /
    /// purchase 5; a rating or an event of unknown kind counts as a view).
    pub click: f32,
    pub like: f32,
    pub purchase: f32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self { window_minutes: 30.0, half_life_minutes: 10.0, max_items: 20, click: 2.0, like: 3.0, purchase: 5.0 }
    }
}

impl SessionConfig {
    /// The checks `Config` runs once at start.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |value: f64| value.is_finite() && value > 0.0;
        if !positive(self.window_minutes) || !positive(self.half_life_minutes) {
            return Err("realtime.window_minutes and realtime.half_life_minutes must be positive".into());
        }
        if self.max_items == 0 {
            return Err("realtime.max_items must be at least 1".into());
        }
        if [self.click, self.like, self.purchase].iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err("realtime event weights must be finite and >= 0".into());
        }
        Ok(())
    }

    fn event_weight(&self, event: Option<EventType>) -> f32 {
        match event {
            Some(EventType::Click) => self.click,
            Some(EventType::Like) => self.like,
            Some(EventType::Purchase) => self.purchase,
            Some(EventType::Rating | EventType::Impression | EventType::Unspecified) | None => 1.0,
        }
    }

    /// The weight of each of the session's events: entry n of the result belongs to the
    /// history's entry n (most recent first); the history beyond the result's length is
    /// outside the session. `timestamps` (Unix seconds) and `events` are aligned with the
    /// history or empty (checked by the service).
    pub fn weights(&self, history_len: usize, timestamps: &[i64], events: &[i32]) -> Vec<f32> {
        let Some(&latest) = timestamps.first() else {
            return vec![1.0; history_len.min(UNTIMED_ITEMS)];
        };
        let event = |n: usize| events.get(n).and_then(|&kind| EventType::try_from(kind).ok());
        timestamps
            .iter()
            .take(history_len.min(self.max_items))
            .enumerate()
            .map_while(|(n, &at)| {
                // Seconds before the latest event; a clock that went backwards counts as now.
                let minutes = (latest - at).max(0) as f64 / 60.0;
                (minutes <= self.window_minutes)
                    .then(|| self.event_weight(event(n)) * 0.5f64.powf(minutes / self.half_life_minutes) as f32)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_is_the_latest_events_within_the_window_weighted_by_kind_and_recency() {
        let config = SessionConfig::default();
        let minute = 60;
        let latest = 1_000_000;
        // Most recent first: now, 10 and 20 minutes before, then an hour before.
        let timestamps = [latest, latest - 10 * minute, latest - 20 * minute, latest - 60 * minute];
        let events = [EventType::Click as i32, EventType::Rating as i32, EventType::Purchase as i32, 2];
        let weights = config.weights(4, &timestamps, &events);
        assert_eq!(weights.len(), 3, "the hour-old event is outside the 30-minute session");
        assert!((weights[0] - 2.0).abs() < 1e-6, "a click now: {weights:?}");
        assert!((weights[1] - 0.5).abs() < 1e-6, "a rating one half-life ago: {weights:?}");
        assert!((weights[2] - 1.25).abs() < 1e-6, "a purchase two half-lives ago: {weights:?}");
    }

    #[test]
    fn without_times_the_latest_five_count_alike_and_the_cap_holds() {
        let config = SessionConfig { max_items: 2, ..SessionConfig::default() };
        assert_eq!(config.weights(8, &[], &[]), vec![1.0; 5]);
        assert_eq!(config.weights(3, &[], &[]), vec![1.0; 3]);
        assert_eq!(config.weights(4, &[7, 7, 7, 7], &[]).len(), 2);
        // Unknown event kinds count as a view.
        assert_eq!(config.weights(1, &[7], &[99]), vec![1.0]);
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(SessionConfig::default().validate().is_ok());
        assert!(SessionConfig { half_life_minutes: 0.0, ..SessionConfig::default() }.validate().is_err());
        assert!(SessionConfig { max_items: 0, ..SessionConfig::default() }.validate().is_err());
        assert!(SessionConfig { purchase: f32::NAN, ..SessionConfig::default() }.validate().is_err());
    }
}
