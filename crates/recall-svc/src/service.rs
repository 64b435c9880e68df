//! gRPC surface of recall-svc: the cheap self-protecting checks, the channels, fusion,
//! and the candidates with every channel's score (the recall → rank contract).

use std::{sync::Arc, time::Duration};

use recsys_bundle::Registry;
use recsys_proto::{
    limits::{MAX_CANDIDATES, MAX_EXCLUDED_ITEMS, MAX_HISTORY},
    v1::{
        recall_service_server::{RecallService, RecallServiceServer},
        CandidateColumns, CatalogItem, ChannelColumn, ChannelWeight, RecallRequest, RecallResponse,
    },
};
use recsys_runtime::catalog::Catalog;
use tonic::{Request, Response, Status};

use crate::{
    fuse_channels, propose_concurrently, Channel, ChannelJob, ChannelList, Config, ExcludedItems, FusedCandidate,
    RecallError, RecallIndex, UserSignals,
};

static CHANNEL_CANDIDATES: std::sync::LazyLock<prometheus::HistogramVec> = std::sync::LazyLock::new(|| {
    prometheus::register_histogram_vec!(
        "recsys_recall_channel_candidates",
        "Items proposed by each recall channel per request",
        &["channel"],
        prometheus::exponential_buckets(1.0, 2.0, 12).expect("valid buckets")
    )
    .expect("metric registers once")
});

#[derive(Clone)]
pub struct RecallGrpc {
    registry: Arc<Registry<RecallIndex>>,
    /// Items changed at run time; the unservable ones are excluded like the user's history.
    catalog: Arc<Catalog>,
    config: Arc<Config>,
}

impl RecallGrpc {
    pub fn new(registry: Arc<Registry<RecallIndex>>, catalog: Arc<Catalog>, config: Config) -> Self {
        Self { registry, catalog, config: Arc::new(config) }
    }

    pub fn into_server(self) -> RecallServiceServer<Self> {
        RecallServiceServer::new(self)
    }

    async fn recall_candidates(&self, request: RecallRequest) -> Result<RecallResponse, RecallError> {
        let RecallRequest { user, candidate_count, exclude_item_ids, channel_weights } = request;
        let invalid = |message: String| Err(RecallError::InvalidArgument(message));
        let user = user.ok_or_else(|| RecallError::InvalidArgument("user is required".into()))?;
        if user.user_id.is_empty() {
            return invalid("user.user_id is empty".into());
        }
        if user.history_item_ids.len() > MAX_HISTORY as usize || exclude_item_ids.len() > MAX_EXCLUDED_ITEMS {
            return invalid(format!(
                "at most {MAX_HISTORY} history items and {MAX_EXCLUDED_ITEMS} exclusions are accepted"
            ));
        }
        for (name, len) in [
            ("history_timestamps", user.history_timestamps.len()),
            ("history_event_types", user.history_event_types.len()),
        ] {
            if len != 0 && len != user.history_item_ids.len() {
                return invalid(format!(
                    "{name} has {len} entries for {} history items (aligned, or empty)",
                    user.history_item_ids.len()
                ));
            }
        }
        let weights = channel_weight_overrides(&channel_weights)?;
        let limit = match candidate_count as usize {
            0 => self.config.candidate_count,
            n if n > MAX_CANDIDATES => {
                return invalid(format!("candidate_count {n} exceeds the maximum {MAX_CANDIDATES}"))
            }
            n => n,
        };
        // Recall chooses the request's bundle version (the current one); the services after
        // it are pinned to it, and this request finishes on it whatever changes meanwhile.
        let (_, index) = self.registry.current();
        let request_index = Arc::clone(&index);
        let unservable = self.catalog.unservable();
        // A channel's weight is the request's (an experiment's) or the configured one; a
        // channel with no quota or weight 0 is off, and its request-time work is skipped.
        let weight_of =
            |channel: Channel| weights[channel as usize].unwrap_or(self.config.channels.quota(channel).weight);
        let is_on = |channel: Channel| self.config.channels.quota(channel).quota > 0 && weight_of(channel) > 0.0;
        let newest = (is_on(Channel::ColdStart) && self.config.new_items > 0).then(|| self.catalog.newest());
        let sequence_on = is_on(Channel::Sequence);
        let (new_count, new_since_ms) = (self.config.new_items, new_items_since_ms(self.config.new_item_days));
        let session = self.config.realtime.weights(
            user.history_item_ids.len(),
            &user.history_timestamps,
            &user.history_event_types,
        );
        // The user's signals (vectors, item-to-item scores) and what to leave out, computed
        // once off the async workers and shared by every channel.
        let request = tokio::task::spawn_blocking(move || {
            let index = request_index;
            let embeddings = &index.embeddings;
            // The one place the request path removes seen, excluded and unservable items.
            let excluded: ExcludedItems = user
                .history_item_ids
                .iter()
                .chain(&exclude_item_ids)
                .chain(unservable.iter())
                .filter_map(|id| embeddings.item_position(id))
                .collect();
            // New items no bundle knows yet, for the cold-start channel (unseen, not
            // excluded): the newest `RUNTIME_ITEMS_SCANNED`, the best `new_count` for the user.
            let eligible: Vec<Arc<CatalogItem>> = newest
                .iter()
                .flat_map(|newest| newest.iter())
                .take_while(|item| item.publish_time_ms >= new_since_ms)
                .filter(|item| embeddings.item_position(&item.item_id).is_none())
                .filter(|item| {
                    !user.history_item_ids.contains(&item.item_id) && !exclude_item_ids.contains(&item.item_id)
                })
                .take(if new_count == 0 { 0 } else { RUNTIME_ITEMS_SCANNED.max(new_count) })
                .cloned()
                .collect();
            let signals = index.signals_with(
                &user.user_id,
                &user.history_item_ids,
                &user.history_timestamps,
                &session,
                sequence_on,
            );
            let new_items = index.order_runtime_items(&signals, &eligible, new_count);
            Arc::new(UserRequest { signals, excluded, new_items })
        })
        .await
        .map_err(|error| RecallError::Internal(format!("preparing the request failed: {error}")))?;
        // The costly channels run at once, each within its budget; the cheap ones here.
        let (costly, cheap): (Vec<Channel>, Vec<Channel>) =
            Channel::ALL.iter().partition(|&&channel| index.is_costly(channel));
        let jobs = costly
            .into_iter()
            .map(|channel| {
                let quota = self.config.channels.quota(channel);
                let (index, request) = (Arc::clone(&index), Arc::clone(&request));
                ChannelJob {
                    channel,
                    budget: Duration::from_millis(quota.budget_ms),
                    propose: Box::new(move || index.propose(channel, &request.signals, &request.excluded, quota.quota)),
                }
            })
            .collect();
        let mut proposals = propose_concurrently(jobs).await;
        for channel in cheap {
            let quota = self.config.channels.quota(channel).quota;
            proposals.push((channel, index.propose(channel, &request.signals, &request.excluded, quota)));
        }
        let lists: Vec<ChannelList> = proposals
            .into_iter()
            .map(|(channel, items)| {
                CHANNEL_CANDIDATES.with_label_values(&[channel.name()]).observe(items.len() as f64);
                let weight = weight_of(channel);
                // A channel weighted 0 (an ablation, an experiment switching it off) keeps nothing.
                ChannelList { channel, weight, items, keeps_first: channel == Channel::ColdStart && weight > 0.0 }
            })
            .collect();
        // New run-time items take the last places of the list, proposed by the cold-start
        // channel; position 0 says no bundle holds them.
        let fused_limit = limit.saturating_sub(request.new_items.len());
        let fused = fuse_channels(&lists, &request.excluded, self.config.rrf_k, fused_limit);
        let candidates = candidate_columns(&index, &request.signals, &fused, &request.new_items);
        Ok(RecallResponse { candidates: Some(candidates), bundle_version: index.version.clone() })
    }
}

/// The fused candidates as the recall → rank contract's columns: every channel that can
/// score this user scores every candidate; new run-time items (`new_items`, with their
/// cold-start scores) come last, at position 0, with a score in the cold-start column only.
fn candidate_columns(
    index: &RecallIndex,
    signals: &UserSignals,
    fused: &[FusedCandidate],
    new_items: &[(String, f32)],
) -> CandidateColumns {
    let count = fused.len() + new_items.len();
    let mut columns = CandidateColumns {
        item_ids: Vec::with_capacity(count),
        scores: Vec::with_capacity(count),
        positions: Vec::with_capacity(count),
        channels: Vec::new(),
    };
    for candidate in fused {
        columns.item_ids.push(index.embeddings.item_ids.get(candidate.item).to_string());
        columns.scores.push(candidate.score);
        columns.positions.push(candidate.item as u32 + 1);
    }
    for &channel in &Channel::ALL {
        // Whether a channel can score depends on the user's signals, not on the item.
        let scores: Option<Vec<f32>> =
            fused.iter().map(|candidate| index.score(channel, signals, candidate.item)).collect();
        let scores = match scores {
            Some(scores) => scores,
            None if channel == Channel::ColdStart && !new_items.is_empty() => vec![0.0; fused.len()],
            None => continue,
        };
        let ranks = fused
            .iter()
            .map(|candidate| candidate.channels.iter().find(|(c, _)| *c == channel).map_or(0, |&(_, rank)| rank))
            .collect();
        columns.channels.push(ChannelColumn { channel: channel as i32, scores, ranks });
    }
    for column in &mut columns.channels {
        let cold_start = column.channel() == Channel::ColdStart;
        for (n, (_, score)) in new_items.iter().enumerate() {
            column.scores.push(if cold_start { *score } else { 0.0 });
            column.ranks.push(if cold_start { n as u32 + 1 } else { 0 });
        }
    }
    for (item_id, _) in new_items {
        columns.item_ids.push(item_id.clone());
        columns.scores.push(0.0);
        columns.positions.push(0);
    }
    columns
}

/// What every channel of one request reads.
struct UserRequest {
    signals: UserSignals,
    excluded: ExcludedItems,
    /// Run-time catalogue items no bundle knows, in the cold-start channel's order, with
    /// its score.
    new_items: Vec<(String, f32)>,
}

/// The cold-start channel scores at most this many run-time new items per request (the
/// newest): each costs one small matrix product.
const RUNTIME_ITEMS_SCANNED: usize = 1_000;

/// The oldest publish time a new run-time item may have, in Unix ms.
fn new_items_since_ms(days: u32) -> i64 {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    now_ms - i64::from(days) * 86_400_000
}

/// Weight overrides indexed by the channel's wire value (0 is `Unspecified`): one slot per
/// real channel and one for it.
const CHANNEL_SLOTS: usize = Channel::ALL.len() + 1;

/// Fusion weight overrides by channel number. The orchestrator checked them when its
/// configuration was loaded; this only protects recall from other callers.
fn channel_weight_overrides(weights: &[ChannelWeight]) -> Result<[Option<f32>; CHANNEL_SLOTS], RecallError> {
    let mut overrides = [None; CHANNEL_SLOTS];
    for (index, ChannelWeight { channel, weight }) in weights.iter().enumerate() {
        let known = Channel::try_from(*channel).ok().filter(|&c| c != Channel::Unspecified);
        let Some(channel) = known else {
            return Err(RecallError::InvalidArgument(format!("channel_weights[{index}] names no channel ({channel})")));
        };
        if !(weight.is_finite() && *weight >= 0.0) {
            return Err(RecallError::InvalidArgument(format!(
                "channel_weights[{index}] ({}) must be finite and >= 0",
                channel.name()
            )));
        }
        // A wire value this build knows but does not serve gets a clear refusal, not a panic.
        let Some(slot) = overrides.get_mut(channel as usize) else {
            return Err(RecallError::InvalidArgument(format!("channel_weights[{index}] names no served channel")));
        };
        *slot = Some(*weight);
    }
    Ok(overrides)
}

#[tonic::async_trait]
impl RecallService for RecallGrpc {
    async fn recall(&self, request: Request<RecallRequest>) -> Result<Response<RecallResponse>, Status> {
        let response = self.recall_candidates(request.into_inner()).await?;
        tracing::debug!(candidates = response.candidates.as_ref().map_or(0, CandidateColumns::len), "recall served");
        Ok(Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_overrides_must_name_a_channel_and_be_non_negative() {
        let weight = |channel: i32, weight: f32| ChannelWeight { channel, weight };
        let overrides = channel_weight_overrides(&[weight(Channel::ItemCf as i32, 2.0)]).unwrap();
        assert_eq!(overrides[Channel::ItemCf as usize], Some(2.0));
        assert_eq!(overrides[Channel::Popular as usize], None);
        let unspecified = channel_weight_overrides(&[weight(0, 1.0)]).unwrap_err().to_string();
        assert_eq!(unspecified, "channel_weights[0] names no channel (0)");
        assert!(channel_weight_overrides(&[weight(42, 1.0)]).is_err());
        let negative = channel_weight_overrides(&[weight(Channel::Popular as i32, -1.0)]).unwrap_err();
        assert!(negative.to_string().contains("popular"), "{negative}");
        // Every channel has its slot, the newest included.
        let all: Vec<ChannelWeight> = Channel::ALL.iter().map(|&channel| weight(channel as i32, 0.5)).collect();
        let overrides = channel_weight_overrides(&all).unwrap();
        assert!(Channel::ALL.iter().all(|&channel| overrides[channel as usize] == Some(0.5)));
    }
}
