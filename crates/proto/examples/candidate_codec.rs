//! Why the recall → rank contract is columnar: the codec cost of 1,000 candidates with
//! six channel columns, as `CandidateColumns` and as the message-per-candidate layout it
//! replaced (re-declared here: `Candidate { item_id, score, channel_scores, position }`).
//!
//! `cargo run --release -p recsys-proto --example candidate_codec`

use std::time::{Duration, Instant};

use prost::Message;
use recsys_proto::v1::{CandidateColumns, ChannelColumn};

const CANDIDATES: u32 = 1_000;
const CHANNELS: i32 = 5;
const ROUNDS: u32 = 2_000;

/// The former row layout, field for field.
#[derive(Clone, PartialEq, Message)]
struct Candidate {
    #[prost(string, tag = "1")]
    item_id: String,
    #[prost(float, tag = "2")]
    score: f32,
    #[prost(message, repeated, tag = "3")]
    channel_scores: Vec<ChannelScore>,
    #[prost(uint32, tag = "4")]
    position: u32,
}

#[derive(Clone, PartialEq, Message)]
struct ChannelScore {
    #[prost(int32, tag = "1")]
    channel: i32,
    #[prost(float, tag = "2")]
    score: f32,
    #[prost(uint32, tag = "3")]
    rank: u32,
}

#[derive(Clone, PartialEq, Message)]
struct Rows {
    #[prost(message, repeated, tag = "1")]
    candidates: Vec<Candidate>,
}

fn item_id(n: u32) -> String {
    format!("item-{}", 100_000 + n * 7)
}

/// Half the channels proposed each item (rank > 0), as in a fused list.
fn rank(n: u32, channel: i32) -> u32 {
    if (n + channel as u32).is_multiple_of(2) {
        n / 2 + 1
    } else {
        0
    }
}

/// Mean time of `work` over the rounds.
fn mean(mut work: impl FnMut()) -> Duration {
    let started = Instant::now();
    for _ in 0..ROUNDS {
        work();
    }
    started.elapsed() / ROUNDS
}

fn measure<M: Message + Default>(name: &str, message: &M) {
    let bytes = message.encode_to_vec();
    let encode = mean(|| drop(std::hint::black_box(message.encode_to_vec())));
    let decode = mean(|| drop(std::hint::black_box(M::decode(bytes.as_slice()).expect("decodes"))));
    println!("{name:<20} {:>8} {:>12.1} {:>12.1}", bytes.len(), encode.as_secs_f64() * 1e6, decode.as_secs_f64() * 1e6);
}

fn main() {
    let rows = Rows {
        candidates: (0..CANDIDATES)
            .map(|n| Candidate {
                item_id: item_id(n),
                score: 1.0 / (n + 1) as f32,
                channel_scores: (1..=CHANNELS)
                    .map(|channel| ChannelScore {
                        channel,
                        score: 0.37 * n as f32 / channel as f32,
                        rank: rank(n, channel),
                    })
                    .collect(),
                position: n * 13 + 1,
            })
            .collect(),
    };
    let columns = CandidateColumns {
        item_ids: (0..CANDIDATES).map(item_id).collect(),
        scores: (0..CANDIDATES).map(|n| 1.0 / (n + 1) as f32).collect(),
        positions: (0..CANDIDATES).map(|n| n * 13 + 1).collect(),
        channels: (1..=CHANNELS)
            .map(|channel| ChannelColumn {
                channel,
                scores: (0..CANDIDATES).map(|n| 0.37 * n as f32 / channel as f32).collect(),
                ranks: (0..CANDIDATES).map(|n| rank(n, channel)).collect(),
            })
            .collect(),
    };
    println!("{CANDIDATES} candidates, {CHANNELS} channels, mean of {ROUNDS} rounds");
    println!("{:<20} {:>8} {:>12} {:>12}", "layout", "bytes", "encode (µs)", "decode (µs)");
    measure("message per row", &rows);
    measure("columns", &columns);
}
