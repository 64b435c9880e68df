//! gRPC surface of recall-svc: validates the request, runs the channels, fuses.

use std::{collections::HashSet, sync::Arc};

use recsys_proto::v1::{
    recall_service_server::{RecallService, RecallServiceServer},
    Candidate, RecallRequest, RecallResponse,
};
use tonic::{Request, Response, Status};

use crate::{fuse_channels, Channel, ChannelList, Config, RecallError, RecallIndex};

const MAX_CANDIDATES: usize = 5_000;

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
    index: Arc<RecallIndex>,
    config: Arc<Config>,
}

impl RecallGrpc {
    pub fn new(index: Arc<RecallIndex>, config: Config) -> Self {
        Self { index, config: Arc::new(config) }
    }

    pub fn into_server(self) -> RecallServiceServer<Self> {
        RecallServiceServer::new(self)
    }

    fn recall_candidates(&self, request: RecallRequest) -> Result<RecallResponse, RecallError> {
        let RecallRequest { user, candidate_count, exclude_item_ids, channel_weights } = request;
        for (name, weight) in &channel_weights {
            if Channel::from_name(name).is_none() {
                return Err(RecallError::InvalidArgument(format!("channel_weights names unknown channel {name:?}")));
            }
            if !(weight.is_finite() && *weight >= 0.0) {
                return Err(RecallError::InvalidArgument(format!("channel_weights[{name:?}] must be finite and >= 0")));
            }
        }
        let user = user.ok_or_else(|| RecallError::InvalidArgument("user is required".into()))?;
        if user.user_id.is_empty() {
            return Err(RecallError::InvalidArgument("user.user_id is empty".into()));
        }
        let limit = match candidate_count as usize {
            0 => self.config.candidate_count,
            n if n > MAX_CANDIDATES => {
                return Err(RecallError::InvalidArgument(format!(
                    "candidate_count {n} exceeds the maximum {MAX_CANDIDATES}"
                )))
            }
            n => n,
        };
        let embeddings = &self.index.embeddings;
        let excluded: HashSet<usize> = user
            .history_item_ids
            .iter()
            .chain(&exclude_item_ids)
            .filter_map(|id| embeddings.item_position(id))
            .collect();
        let lists: Vec<ChannelList> = Channel::ALL
            .iter()
            .map(|&channel| {
                let quota = self.config.channels.quota(channel);
                let _span = tracing::info_span!("recall_channel", channel = channel.name()).entered();
                let list = ChannelList {
                    channel,
                    weight: channel_weights.get(channel.name()).copied().unwrap_or(quota.weight),
                    items: self.index.propose(channel, &user.user_id, &user.history_item_ids, &excluded, quota.quota),
                };
                CHANNEL_CANDIDATES.with_label_values(&[channel.name()]).observe(list.items.len() as f64);
                list
            })
            .collect();
        let fused = fuse_channels(&lists, &excluded, self.config.rrf_k, limit);
        Ok(RecallResponse {
            candidates: fused
                .into_iter()
                .map(|candidate| Candidate {
                    item_id: embeddings.item_ids[candidate.item].clone(),
                    score: candidate.score,
                    channels: candidate.channels.iter().map(|c| c.name().to_string()).collect(),
                })
                .collect(),
            bundle_version: self.index.version.clone(),
        })
    }
}

#[tonic::async_trait]
impl RecallService for RecallGrpc {
    async fn recall(&self, request: Request<RecallRequest>) -> Result<Response<RecallResponse>, Status> {
        let response = self.recall_candidates(request.into_inner())?;
        tracing::debug!(candidates = response.candidates.len(), "recall served");
        Ok(Response::new(response))
    }
}
