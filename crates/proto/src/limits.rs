//! Size limits of the request path, defined once. The orchestrator checks a request
//! against them at the edge; each leaf keeps the same numbers as cheap self-protection
//! against a caller that is not the orchestrator (a debugging grpcurl, a bad deploy).

/// Largest `top_k` a caller may ask for.
pub const MAX_TOP_K: u32 = 200;
/// Longest user or item id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest scene name, in bytes.
pub const MAX_SCENE_BYTES: usize = 64;
/// Most context entries on one request.
pub const MAX_CONTEXT_ENTRIES: usize = 32;
/// Longest context value, in bytes.
pub const MAX_CONTEXT_VALUE_BYTES: usize = 256;
/// Most items a caller may exclude on one request.
pub const MAX_EXCLUDED_ITEMS: usize = 1_000;
/// History read from the feature store and handed to recall and rank.
pub const MAX_HISTORY: u32 = 1_000;
/// Most candidates recall returns, and rank or rerank accepts, on one request.
pub const MAX_CANDIDATES: usize = 5_000;
/// Most events in one `LogEvents` / `AppendEvents` call.
pub const MAX_EVENTS_PER_CALL: usize = 10_000;
/// Most catalogue records in one `UpsertItems` / `RetireItems` call or changes page.
pub const MAX_CATALOG_ITEMS_PER_CALL: usize = 1_000;
/// Most attributes on one catalogue record.
pub const MAX_ITEM_ATTRIBUTES: usize = 32;
