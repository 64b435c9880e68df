//! Search of the bundle's HNSW graph (`item_index.safetensors`).
//!
//! The graph is built offline by the training pipeline with hnswlib and stored as flat
//! arrays indexed by graph node (`training/recsys_training/ann.py` documents the layout),
//! so it is memory-mapped and shared between processes like the vectors. The search is
//! the standard one (greedy descent through the upper layers, then a beam of `ef`
//! candidates on the bottom layer) with three choices of ours:
//! - nodes are numbered so that linked nodes lie near each other (`node_items` maps them
//!   to item positions; an index without it numbers nodes by item): the links and codes a
//!   walk reads next then share cache lines and pages instead of being scattered over
//!   the whole catalogue;
//! - the graph is walked with the bundle's int8 copy of the vectors, a quarter of the
//!   memory traffic of f32 (a walk is a chain of cache misses), and only the `ef`
//!   candidates kept are rescored with the f32 vectors;
//! - items the request may not see are walked through but never kept, so exclusions cost
//!   no over-fetching and the answer still has `quota` items.
//!
//! Per request, memory is proportional to `ef`, not the catalogue: the visited marks are
//! catalogue-sized but pooled and reused (a generation counter, cleared once every 65,535
//! searches).

use std::{
    cmp::{Ordering, Reverse},
    collections::BinaryHeap,
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Mutex,
    },
};

use recsys_bundle::{embeddings::dot, BundleError, Column, Manifest, Matrix, TensorFile, ANN_INDEX_FILE};

use crate::ExcludedItems;

pub struct HnswIndex {
    items: usize,
    /// `[items, 1 + degree]`: the neighbour count, then the neighbours.
    level0: Column<u32>,
    level0_width: usize,
    /// Item i's upper layers are rows `upper_offsets[i]..upper_offsets[i + 1]` of `upper`.
    upper_offsets: Column<i64>,
    upper: Column<u32>,
    upper_width: usize,
    entry_point: usize,
    /// How nodes map to items, when they are not numbered by item.
    numbering: Option<NodeNumbering>,
    codes: Column<i8>,
    code_scales: Column<f32>,
    dim: usize,
    expansion: AtomicUsize,
    visited_pool: Mutex<Vec<Visited>>,
}

impl HnswIndex {
    /// Opens the index (checksum verified before it is mapped) and checks every link once,
    /// so that a search never leaves the arrays.
    pub fn load(dir: &Path, manifest: &Manifest, vectors: &Matrix, expansion: usize) -> Result<Self, BundleError> {
        let file = TensorFile::open(dir, ANN_INDEX_FILE, manifest)?;
        let path = dir.join(ANN_INDEX_FILE);
        let malformed = |reason: String| BundleError::Malformed { path: path.clone(), reason };
        let (items, dim) = (vectors.rows, vectors.cols);
        let two_dimensional = |tensor: &str, rows: Option<usize>| -> Result<usize, BundleError> {
            match *file.shape(tensor)? {
                [found, width] if rows.is_none_or(|rows| rows == found) && width >= 1 => Ok(width),
                ref shape => Err(malformed(format!("{tensor} has shape {shape:?}, expected [{items}, width]"))),
            }
        };
        let level0_width = two_dimensional("level0_links", Some(items))?;
        let upper_width = two_dimensional("upper_links", None)?;
        if two_dimensional("item_codes", Some(items))? != dim {
            return Err(malformed(format!("item_codes are not {dim}-dimensional like the item vectors")));
        }
        let numbering = match file.shape("node_items") {
            Ok(&[rows]) if rows == items => {
                let node_items = file.column::<u32>("node_items")?;
                let item_nodes = inverse_permutation(node_items.as_slice())
                    .ok_or_else(|| malformed(format!("node_items is not a permutation of 0..{items}")))?;
                Some(NodeNumbering { node_items, item_nodes })
            }
            Ok(shape) => return Err(malformed(format!("node_items has shape {shape:?}, expected [{items}]"))),
            Err(_) => None,
        };
        let index = Self {
            items,
            level0: file.column("level0_links")?,
            level0_width,
            upper_offsets: file.column("upper_offsets")?,
            upper: file.column("upper_links")?,
            upper_width,
            entry_point: file.column::<u32>("entry_point")?.as_slice().first().map_or(usize::MAX, |&e| e as usize),
            numbering,
            codes: file.column("item_codes")?,
            code_scales: file.column("item_code_scales")?,
            dim,
            expansion: AtomicUsize::new(expansion),
            visited_pool: Mutex::new(Vec::new()),
        };
        index.check_links().map_err(malformed)?;
        Ok(index)
    }

    fn check_links(&self) -> Result<(), String> {
        let items = self.items;
        if self.code_scales.len() != items || self.entry_point >= items {
            return Err(format!("item_code_scales or entry_point do not fit {items} items"));
        }
        let offsets = self.upper_offsets.as_slice();
        let upper_rows = self.upper.len() / self.upper_width;
        if offsets.len() != items + 1
            || offsets[0] != 0
            || offsets[items] as usize != upper_rows
            || offsets.windows(2).any(|pair| pair[1] < pair[0])
        {
            return Err(format!("upper_offsets are not {} ascending offsets ending at {upper_rows}", items + 1));
        }
        let layers = |item: usize| (offsets[item + 1] - offsets[item]) as usize;
        for (item, row) in self.level0.as_slice().chunks_exact(self.level0_width).enumerate() {
            check_row(row, items, |_| true).map_err(|reason| format!("item {item}, layer 0: {reason}"))?;
        }
        for item in (0..items).filter(|&item| layers(item) > 0) {
            for layer in 1..=layers(item) {
                let row = self.upper_row(item, layer);
                check_row(row, items, |neighbour| layers(neighbour) >= layer)
                    .map_err(|reason| format!("item {item}, layer {layer}: {reason}"))?;
            }
        }
        if (0..items).any(|item| layers(item) > layers(self.entry_point)) {
            return Err("the entry point is not on the top layer".to_string());
        }
        Ok(())
    }

    /// Changes the bottom layer's candidate list size (benchmarks sweep it).
    pub fn set_expansion(&self, expansion: usize) {
        self.expansion.store(expansion, Relaxed);
    }

    /// The `quota` items with the largest inner product with `query` the walk finds, best
    /// first, none of them in `excluded`.
    pub fn search(&self, vectors: &Matrix, query: &[f32], excluded: &ExcludedItems, quota: usize) -> Vec<usize> {
        if quota == 0 || query.len() != self.dim {
            return Vec::new();
        }
        let expansion = self.expansion.load(Relaxed).max(quota);
        let (query_codes, _) = quantize(query);
        let (codes, scales) = (self.codes.as_slice(), self.code_scales.as_slice());
        let walk = Walk { query: &query_codes, codes, scales, dim: self.dim };
        let score = |item: usize| walk.score(item);

        let mut nearest = Scored { score: score(self.entry_point), item: self.entry_point as u32 };
        let offsets = self.upper_offsets.as_slice();
        let top_layer = (offsets[self.entry_point + 1] - offsets[self.entry_point]) as usize;
        for layer in (1..=top_layer).rev() {
            loop {
                let from = nearest.item as usize;
                for &neighbour in links(self.upper_row(from, layer)) {
                    let candidate = Scored { score: score(neighbour as usize), item: neighbour };
                    if candidate > nearest {
                        nearest = candidate;
                    }
                }
                if nearest.item as usize == from {
                    break;
                }
            }
        }

        let excluded_nodes: ExcludedItems;
        let excluded = match &self.numbering {
            None => excluded,
            Some(numbering) => {
                excluded_nodes = excluded
                    .iter()
                    .filter_map(|&item| numbering.item_nodes.get(item))
                    .map(|&node| node as usize)
                    .collect();
                &excluded_nodes
            }
        };
        let pooled = self.visited_pool.lock().ok().and_then(|mut pool| pool.pop());
        let mut visited = pooled.unwrap_or_else(|| Visited::new(self.items));
        visited.clear();
        let kept = self.walk_bottom_layer(nearest, expansion, excluded, &mut visited, &walk);
        if let Ok(mut pool) = self.visited_pool.lock() {
            pool.push(visited);
        }

        let items: Vec<usize> = kept.into_iter().map(|Reverse(kept)| self.item_of(kept.item as usize)).collect();
        for &item in &items {
            vectors.row(item).chunks(16).for_each(|line| prefetch(&line[0]));
        }
        let mut rescored: Vec<(f32, usize)> =
            items.into_iter().map(|item| (dot(query, vectors.row(item)), item)).collect();
        crate::nearest::top_by_score(&mut rescored, quota)
    }

    /// The beam search of the bottom layer from `start`: the best `expansion` allowed items
    /// found, as a min-heap.
    fn walk_bottom_layer(
        &self,
        start: Scored,
        expansion: usize,
        excluded: &ExcludedItems,
        visited: &mut Visited,
        walk: &Walk<'_>,
    ) -> BinaryHeap<Reverse<Scored>> {
        let mut candidates = BinaryHeap::with_capacity(4 * expansion);
        let mut kept: BinaryHeap<Reverse<Scored>> = BinaryHeap::with_capacity(expansion + 1);
        visited.insert(start.item as usize);
        candidates.push(start);
        if !excluded.contains(&(start.item as usize)) {
            kept.push(Reverse(start));
        }
        let nothing_excluded = excluded.is_empty();
        let level0 = self.level0.as_slice();
        let codes = walk.codes;
        while let Some(candidate) = candidates.pop() {
            let worst_kept = kept.peek().map_or(f32::NEG_INFINITY, |Reverse(worst)| worst.score);
            if kept.len() >= expansion && candidate.score < worst_kept {
                break;
            }
            let item = candidate.item as usize;
            let row = &level0[item * self.level0_width..(item + 1) * self.level0_width];
            let neighbours = links(row);
            for &neighbour in neighbours {
                prefetch(&codes[neighbour as usize * self.dim]);
                visited.prefetch(neighbour as usize);
            }
            for &id in neighbours {
                let neighbour = id as usize;
                if !visited.insert(neighbour) {
                    continue;
                }
                let found = Scored { score: walk.score(neighbour), item: id };
                let worst_kept = kept.peek().map_or(f32::NEG_INFINITY, |Reverse(worst)| worst.score);
                if kept.len() < expansion || found.score > worst_kept {
                    candidates.push(found);
                    prefetch(&level0[neighbour * self.level0_width]);
                    if nothing_excluded || !excluded.contains(&neighbour) {
                        kept.push(Reverse(found));
                        if kept.len() > expansion {
                            kept.pop();
                        }
                    }
                }
            }
        }
        kept
    }

    fn item_of(&self, node: usize) -> usize {
        self.numbering.as_ref().map_or(node, |numbering| numbering.node_items.as_slice()[node] as usize)
    }

    fn upper_row(&self, item: usize, layer: usize) -> &[u32] {
        let row = self.upper_offsets.as_slice()[item] as usize + layer - 1;
        &self.upper.as_slice()[row * self.upper_width..(row + 1) * self.upper_width]
    }
}

/// Nodes numbered apart from items: each node's item, and each item's node.
struct NodeNumbering {
    node_items: Column<u32>,
    item_nodes: Vec<u32>,
}

/// What the walk scores items with: the query's int8 codes against the items'.
struct Walk<'a> {
    query: &'a [i8],
    codes: &'a [i8],
    scales: &'a [f32],
    dim: usize,
}

impl Walk<'_> {
    /// The approximate inner product of the query with `item` (up to the query's scale,
    /// which ranks nothing differently).
    #[inline(always)]
    fn score(&self, item: usize) -> f32 {
        dot_i8(self.query, &self.codes[item * self.dim..(item + 1) * self.dim]) as f32 * self.scales[item]
    }
}

/// The inverse of a permutation of `0..len` (`None` when `order` is not one).
fn inverse_permutation(order: &[u32]) -> Option<Vec<u32>> {
    let mut inverse = vec![u32::MAX; order.len()];
    for (position, &value) in order.iter().enumerate() {
        let slot = inverse.get_mut(value as usize)?;
        if *slot != u32::MAX {
            return None;
        }
        *slot = position as u32;
    }
    Some(inverse)
}

/// A link row: its neighbours (the first word is their count).
fn links(row: &[u32]) -> &[u32] {
    &row[1..1 + row[0] as usize]
}

fn check_row(row: &[u32], items: usize, neighbour_ok: impl Fn(usize) -> bool) -> Result<(), String> {
    let count = row[0] as usize;
    if count >= row.len() {
        return Err(format!("{count} neighbours in a row of {}", row.len() - 1));
    }
    match row[1..=count].iter().find(|&&n| n as usize >= items || !neighbour_ok(n as usize)) {
        Some(neighbour) => Err(format!("neighbour {neighbour} is not an item of this layer")),
        None => Ok(()),
    }
}

/// Per-row symmetric int8 codes, `vector ≈ codes * scale` (as the training pipeline
/// quantizes the item vectors).
pub fn quantize(vector: &[f32]) -> (Vec<i8>, f32) {
    let largest = vector.iter().fold(0f32, |largest, v| largest.max(v.abs()));
    let scale = if largest > 0.0 { largest / 127.0 } else { 1.0 };
    (vector.iter().map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8).collect(), scale)
}

/// Sixteen independent sums, so the compiler vectorises the loop.
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let mut sums = [0i32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: i32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(&x, &y)| x as i32 * y as i32).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..16 {
            sums[lane] += x[lane] as i32 * y[lane] as i32;
        }
    }
    sums.iter().sum::<i32>() + tail
}

/// Asks the CPU to start loading `value`'s cache line: the walk knows which vectors it
/// will read next, and hiding those misses is most of its speed.
#[allow(unsafe_code)]
#[inline(always)]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that never faults, and the address is of a live value.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((value as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[derive(Clone, Copy, Debug)]
struct Scored {
    score: f32,
    item: u32,
}

impl PartialEq for Scored {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score)
    }
}

/// Which items this search has scored: a mark per item, equal to the search's
/// generation when visited, so starting a search is O(1).
struct Visited {
    marks: Vec<u16>,
    generation: u16,
}

impl Visited {
    fn new(items: usize) -> Self {
        Self { marks: vec![0; items], generation: 0 }
    }

    fn clear(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.marks.fill(0);
            self.generation = 1;
        }
    }

    fn prefetch(&self, item: usize) {
        prefetch(&self.marks[item]);
    }

    /// True when `item` was not visited yet.
    fn insert(&mut self, item: usize) -> bool {
        let fresh = self.marks[item] != self.generation;
        self.marks[item] = self.generation;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use recsys_bundle::FileEntry;
    use safetensors::{tensor::TensorView, Dtype};

    use super::*;
    use crate::nearest::exact;

    /// Clustered unit vectors, like trained item embeddings (a deterministic generator, so
    /// the test needs no random-number crate).
    fn clustered(rows: usize, cols: usize) -> Matrix {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        let centres: Vec<Vec<f32>> = (0..20).map(|_| (0..cols).map(|_| next()).collect()).collect();
        let mut values = Vec::with_capacity(rows * cols);
        for row in 0..rows {
            let vector: Vec<f32> = centres[row % centres.len()].iter().map(|c| c + 0.3 * next()).collect();
            let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
            values.extend(vector.iter().map(|v| v / norm));
        }
        Matrix::owned(rows, cols, values)
    }

    type Tensors = HashMap<&'static str, (Dtype, Vec<usize>, Vec<u8>)>;

    fn link_rows(rows: &[Vec<usize>], width: usize) -> Vec<u8> {
        let mut words = Vec::new();
        for row in rows {
            words.push(row.len() as u32);
            words.extend(row.iter().map(|&n| n as u32));
            words.resize(words.len() + width - 1 - row.len(), 0);
        }
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// A navigable two-layer graph in the bundle's layout (what hnswlib builds, by simpler
    /// means): on the bottom layer each item links to its 12 nearest items and to 4 items
    /// scattered over the catalogue; every 7th item is also on layer 1, linked to its 6
    /// nearest such items and 2 scattered ones; the search starts from item 0. Nodes are
    /// numbered by item.
    fn graph(vectors: &Matrix) -> Tensors {
        graph_in_order(vectors, None)
    }

    /// The same graph with node `n` being item `order[n]` (and `node_items` saying so).
    fn graph_in_order(vectors: &Matrix, order: Option<&[usize]>) -> Tensors {
        let items = vectors.rows;
        let scattered = |item: usize, step: usize, among: usize| {
            let mixed =
                ((item * 8 + step) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            (mixed >> 33) as usize % among
        };
        let nearest_of = |item: usize, among: &dyn Fn(usize) -> bool, count: usize| -> Vec<usize> {
            let excluded: ExcludedItems = (0..items).filter(|&n| n == item || !among(n)).collect();
            exact(vectors, vectors.row(item), &excluded, count)
        };
        let bottom: Vec<Vec<usize>> = (0..items)
            .map(|item| {
                let mut row = nearest_of(item, &|_| true, 12);
                row.extend((1..=4).map(|step| scattered(item, step, items)));
                row
            })
            .collect();
        let on_layer_1 = |item: usize| item.is_multiple_of(7);
        let upper: Vec<Vec<usize>> = (0..items)
            .filter(|&item| on_layer_1(item))
            .map(|item| {
                let mut row = nearest_of(item, &on_layer_1, 6);
                row.extend((1..=2).map(|step| 7 * scattered(item, step, items.div_ceil(7))));
                row
            })
            .collect();
        let identity: Vec<usize> = (0..items).collect();
        let node_items = order.unwrap_or(&identity);
        let mut item_nodes = vec![0; items];
        node_items.iter().enumerate().for_each(|(node, &item)| item_nodes[item] = node);
        let renamed = |row: &Vec<usize>| row.iter().map(|&item| item_nodes[item]).collect::<Vec<_>>();
        let bottom: Vec<Vec<usize>> = node_items.iter().map(|&item| renamed(&bottom[item])).collect();
        let upper: Vec<Vec<usize>> =
            node_items.iter().filter(|&&item| on_layer_1(item)).map(|&item| renamed(&upper[item / 7])).collect();
        let mut offsets = vec![0i64];
        offsets.extend(node_items.iter().scan(0i64, |rows, &item| {
            *rows += i64::from(on_layer_1(item));
            Some(*rows)
        }));
        let (codes, scales): (Vec<Vec<i8>>, Vec<f32>) =
            node_items.iter().map(|&item| quantize(vectors.row(item))).unzip();
        let words = |values: &mut dyn Iterator<Item = usize>| -> Vec<u8> {
            values.flat_map(|value| (value as u32).to_le_bytes()).collect()
        };
        let mut tensors = HashMap::from([
            ("level0_links", (Dtype::U32, vec![items, 17], link_rows(&bottom, 17))),
            ("upper_offsets", (Dtype::I64, vec![items + 1], offsets.iter().flat_map(|o| o.to_le_bytes()).collect())),
            ("upper_links", (Dtype::U32, vec![upper.len(), 9], link_rows(&upper, 9))),
            ("entry_point", (Dtype::U32, vec![1], words(&mut std::iter::once(item_nodes[0])))),
            ("item_codes", (Dtype::I8, vec![items, vectors.cols], codes.concat().iter().map(|&c| c as u8).collect())),
            ("item_code_scales", (Dtype::F32, vec![items], scales.iter().flat_map(|s| s.to_le_bytes()).collect())),
        ]);
        if order.is_some() {
            tensors.insert("node_items", (Dtype::U32, vec![items], words(&mut node_items.iter().copied())));
        }
        tensors
    }

    /// Writes `tensors` as the bundle's index file and returns a manifest listing it.
    fn write_index(dir: &Path, tensors: &Tensors, items: usize, dim: usize) -> Manifest {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, (dtype, shape, data))| (*name, TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        let path = dir.join(ANN_INDEX_FILE);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        let entry = FileEntry {
            sha256: recsys_bundle::tensors::sha256_file(&path).unwrap(),
            bytes: std::fs::metadata(&path).unwrap().len(),
        };
        serde_json::from_value(serde_json::json!({
            "format": recsys_bundle::FORMAT_VERSION, "version": "t", "created_at": "", "training_data_sha256": "",
            "embedding_dim": dim, "num_users": 0, "num_items": items, "files": {ANN_INDEX_FILE: entry},
            "feature_config": {"fine_model": "din", "coarse_model": "mlp", "embedding_dim": 2, "history_length": 1,
                               "user": [], "item": [], "cross": []},
        }))
        .unwrap()
    }

    #[test]
    fn the_index_finds_what_exact_search_finds_and_skips_excluded_items() {
        let dir = tempfile::tempdir().unwrap();
        let vectors = clustered(2_000, 16);
        let manifest = write_index(dir.path(), &graph(&vectors), 2_000, 16);
        let index = HnswIndex::load(dir.path(), &manifest, &vectors, 200).unwrap();
        let (mut found, mut total) = (0usize, 0usize);
        for query_row in (7..2_000).step_by(100) {
            let query = vectors.row(query_row);
            let truth = exact(&vectors, query, &ExcludedItems::default(), 100);
            let excluded: ExcludedItems = truth.iter().copied().step_by(3).collect();
            let approximate = index.search(&vectors, query, &excluded, 100);
            assert!(approximate.iter().all(|n| !excluded.contains(n)), "an excluded item was returned");
            assert_eq!(approximate.len(), 100, "excluded items do not shrink the answer");
            let allowed_truth: HashSet<usize> = exact(&vectors, query, &excluded, 100).into_iter().collect();
            found += approximate.iter().filter(|n| allowed_truth.contains(n)).count();
            total += 100;
            // Rescored with the f32 vectors: best first, by exact inner product.
            let scores: Vec<f32> = approximate.iter().map(|&n| dot(query, vectors.row(n))).collect();
            assert!(scores.windows(2).all(|pair| pair[0] >= pair[1]));
        }
        let recall = found as f64 / total as f64;
        assert!(recall >= 0.95, "recall@100 {recall}");
    }

    #[test]
    fn nodes_numbered_apart_from_items_find_the_same_items() {
        let vectors = clustered(1_500, 16);
        // A shuffle: node n is item (n * 7 + 3) mod 1500 (7 and 1500 are coprime).
        let order: Vec<usize> = (0..1_500).map(|node| (node * 7 + 3) % 1_500).collect();
        let load = |tensors: &Tensors| {
            let dir = tempfile::tempdir().unwrap();
            let manifest = write_index(dir.path(), tensors, 1_500, 16);
            HnswIndex::load(dir.path(), &manifest, &vectors, 120).unwrap()
        };
        let (by_item, by_node) = (load(&graph(&vectors)), load(&graph_in_order(&vectors, Some(&order))));
        assert!(by_item.numbering.is_none() && by_node.numbering.is_some());
        for query_row in (11..1_500).step_by(150) {
            let query = vectors.row(query_row);
            let excluded: ExcludedItems = [query_row, (query_row + 1) % 1_500].into_iter().collect();
            let found = by_node.search(&vectors, query, &excluded, 50);
            assert_eq!(found, by_item.search(&vectors, query, &excluded, 50), "the same walk, renamed");
            assert!(!found.contains(&query_row), "exclusions are by item, whatever the node numbers");
        }
    }

    #[test]
    fn a_graph_that_leaves_its_arrays_is_refused_at_load() {
        let vectors = clustered(300, 8);
        let refused = |change: &dyn Fn(&mut Tensors)| -> String {
            let dir = tempfile::tempdir().unwrap();
            let mut tensors = graph(&vectors);
            change(&mut tensors);
            let manifest = write_index(dir.path(), &tensors, 300, 8);
            HnswIndex::load(dir.path(), &manifest, &vectors, 64).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert_eq!(refused(&|_| {}), "", "the unchanged graph loads");
        let neighbour_out_of_range =
            refused(&|t| t.get_mut("level0_links").unwrap().2[4..8].copy_from_slice(&300u32.to_le_bytes()));
        assert!(neighbour_out_of_range.contains("item 0, layer 0: neighbour 300"), "{neighbour_out_of_range}");
        let count_too_large =
            refused(&|t| t.get_mut("upper_links").unwrap().2[..4].copy_from_slice(&9u32.to_le_bytes()));
        assert!(count_too_large.contains("item 0, layer 1: 9 neighbours in a row of 8"), "{count_too_large}");
        let not_on_the_layer =
            refused(&|t| t.get_mut("upper_links").unwrap().2[4..8].copy_from_slice(&1u32.to_le_bytes()));
        assert!(not_on_the_layer.contains("neighbour 1 is not an item of this layer"), "{not_on_the_layer}");
        let entry_below_top = refused(&|t| t.get_mut("entry_point").unwrap().2.copy_from_slice(&1u32.to_le_bytes()));
        assert!(entry_below_top.contains("not on the top layer"), "{entry_below_top}");
        let other_dimensions = refused(&|t| {
            let codes = t.get_mut("item_codes").unwrap();
            codes.1 = vec![600, 4];
        });
        assert!(other_dimensions.contains("item_codes has shape [600, 4]"), "{other_dimensions}");
        let repeated_item = refused(&|t| {
            let (dtype, shape, _) = t["level0_links"].clone();
            let words: Vec<u8> = (0..300u32).map(|n| n.min(298)).flat_map(u32::to_le_bytes).collect();
            assert_eq!((dtype, shape[0]), (Dtype::U32, 300));
            t.insert("node_items", (Dtype::U32, vec![300], words));
        });
        assert!(repeated_item.contains("node_items is not a permutation of 0..300"), "{repeated_item}");
    }

    #[test]
    fn a_truncated_index_is_refused_before_it_is_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let vectors = clustered(300, 8);
        let manifest = write_index(dir.path(), &graph(&vectors), 300, 8);
        let path = dir.path().join(ANN_INDEX_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let error = HnswIndex::load(dir.path(), &manifest, &vectors, 64).err().unwrap().to_string();
        assert!(error.contains("truncated"), "{error}");
    }

    #[test]
    fn quantized_dot_products_follow_the_vectors() {
        let (codes, scale) = quantize(&[0.5, -1.0, 0.25]);
        assert_eq!(codes, vec![64, -127, 32]);
        assert!((scale - 1.0 / 127.0).abs() < 1e-9);
        assert_eq!(quantize(&[0.0; 3]).0, vec![0, 0, 0]);
        let long: Vec<i8> = (0..37).map(|n| (n % 11) as i8 - 5).collect();
        let expected: i32 = long.iter().map(|&v| v as i32 * v as i32).sum();
        assert_eq!(dot_i8(&long, &long), expected);
    }
}
