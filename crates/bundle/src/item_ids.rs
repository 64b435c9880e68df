//! Item ids by position and positions by id, built once at load.
//!
//! A million ids as `String`s in a `Vec` and again as keys of a `HashMap<String, usize>`
//! cost two heap allocations an item and some 100 MB; here they are one arena of bytes,
//! one offset per item and a table from a 64-bit hash of the id to its position (ids
//! whose hashes collide go to a small exact map). The catalogue is read with borrowed
//! strings and only the columns serving needs, so loading leaves no per-item garbage.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    path::Path,
};

use serde::Deserialize;

use crate::{BundleError, Result};

/// Marks a hash shared by several ids (they are looked up in `colliding`).
const SHARED_HASH: u32 = u32::MAX;

pub struct ItemIds {
    arena: String,
    /// Item `n`'s id is `arena[ends[n - 1]..ends[n]]` (from 0 for the first).
    ends: Vec<usize>,
    by_hash: HashMap<u64, u32, KeyIsHash>,
    colliding: HashMap<Box<str>, u32>,
    /// Each item's id hash by position: checking that a position holds an id is one read.
    hashes: Vec<u64>,
}

impl ItemIds {
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut arena = String::new();
        let mut ends = Vec::new();
        for id in ids {
            arena.push_str(id);
            ends.push(arena.len());
        }
        let mut by_hash = HashMap::with_capacity_and_hasher(ends.len(), KeyIsHash);
        let mut colliding = HashMap::new();
        let mut ids = Self { arena, ends, by_hash: HashMap::default(), colliding: HashMap::new(), hashes: Vec::new() };
        ids.hashes = (0..ids.len()).map(|position| hash_id(ids.get(position))).collect();
        for position in 0..ids.len() {
            let id = ids.get(position);
            match by_hash.insert(hash_id(id), position as u32) {
                None => {}
                Some(SHARED_HASH) => {
                    by_hash.insert(hash_id(id), SHARED_HASH);
                    colliding.entry(id.into()).or_insert(position as u32);
                }
                Some(earlier) => {
                    by_hash.insert(hash_id(id), SHARED_HASH);
                    colliding.entry(ids.get(earlier as usize).into()).or_insert(earlier);
                    colliding.entry(id.into()).or_insert(position as u32);
                }
            }
        }
        ids.by_hash = by_hash;
        ids.colliding = colliding;
        ids
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The id of the item at `position` (which must be below `len()`).
    pub fn get(&self, position: usize) -> &str {
        let start = if position == 0 { 0 } else { self.ends[position - 1] };
        &self.arena[start..self.ends[position]]
    }

    /// Whether the item at `position` is `id` (by 64-bit hash, exactly when the catalogue
    /// has ids sharing a hash): the check for a position sent along with an id.
    pub fn holds(&self, position: usize, id: &str) -> bool {
        match self.hashes.get(position) {
            Some(&hash) if hash == hash_id(id) => self.colliding.is_empty() || self.get(position) == id,
            _ => false,
        }
    }

    pub fn position(&self, id: &str) -> Option<usize> {
        match *self.by_hash.get(&hash_id(id))? {
            SHARED_HASH => self.colliding.get(id).map(|&n| n as usize),
            position => (self.get(position as usize) == id).then_some(position as usize),
        }
    }
}

fn hash_id(id: &str) -> u64 {
    // Fixed keys: the table is private to this process and built from trusted bundle
    // data, so the hash needs no per-process randomisation.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    hasher.write(id.as_bytes());
    hasher.finish()
}

/// The keys are hashes already: use them as they are.
#[derive(Default, Clone, Copy)]
struct KeyIsHash;

impl BuildHasher for KeyIsHash {
    type Hasher = KeyIsHashHasher;

    fn build_hasher(&self) -> KeyIsHashHasher {
        KeyIsHashHasher(0)
    }
}

struct KeyIsHashHasher(u64);

impl Hasher for KeyIsHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// What serving needs of each catalogue item, by position.
pub struct ItemColumns {
    pub ids: ItemIds,
    /// Release year, 0 when unknown.
    pub years: Vec<u32>,
    /// Interactions in the training data.
    pub interactions: Vec<u64>,
}

/// Reads `items.json` for ids, years and interaction counts only: strings are borrowed
/// from the file's text and every other field is skipped unparsed.
pub fn read_item_columns(dir: &Path) -> Result<ItemColumns> {
    #[derive(Deserialize)]
    struct Entry<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
        #[serde(default)]
        year: u32,
        #[serde(default)]
        interactions: u64,
    }
    let path = dir.join("items.json");
    let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Io { path: path.clone(), source })?;
    let entries: Vec<Entry<'_>> = serde_json::from_str(&text)
        .map_err(|error| BundleError::Malformed { path: path.clone(), reason: error.to_string() })?;
    Ok(ItemColumns {
        ids: ItemIds::new(entries.iter().map(|entry| entry.id.as_ref())),
        years: entries.iter().map(|entry| entry.year).collect(),
        interactions: entries.iter().map(|entry| entry.interactions).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_map_to_positions_and_back() {
        let ids = ItemIds::new(["a", "bb", "", "ccc"]);
        assert_eq!(ids.len(), 4);
        assert_eq!((ids.get(0), ids.get(1), ids.get(2), ids.get(3)), ("a", "bb", "", "ccc"));
        for position in 0..4 {
            assert_eq!(ids.position(ids.get(position)), Some(position));
            assert!(ids.holds(position, ids.get(position)));
            assert!(!ids.holds(position, "not-an-item"));
        }
        assert_eq!(ids.position("zz"), None);
    }

    #[test]
    fn colliding_hashes_are_resolved_exactly() {
        let mut ids = ItemIds::new(["x", "y", "z"]);
        // Force a collision: every id's hash points at one shared entry.
        let shared = hash_id("x");
        ids.by_hash.clear();
        ids.by_hash.insert(shared, SHARED_HASH);
        for (position, id) in ["x", "y", "z"].iter().enumerate() {
            ids.colliding.insert((*id).into(), position as u32);
        }
        assert_eq!(ids.position("x"), Some(0));
        assert_eq!(ids.position("q"), None);
    }

    #[test]
    fn the_catalogue_is_read_for_the_serving_columns_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("items.json"),
            r#"[{"id":"1","title":"T","genres":["a"],"year":1995,"interactions":7,"stats":{"like_rate":0.5}},
                {"id":"caf\u00e9","title":"U","genres":[]}]"#,
        )
        .unwrap();
        let columns = read_item_columns(dir.path()).unwrap();
        assert_eq!(columns.ids.position("café"), Some(1));
        assert_eq!((columns.years, columns.interactions), (vec![1995, 0], vec![7, 0]));
    }
}
