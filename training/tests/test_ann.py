import heapq

import numpy as np

from recsys_training import ann


def clustered(rows: int, dim: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    vectors = centres[np.arange(rows) % 20] + 0.4 * rng.normal(size=(rows, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def links(row: np.ndarray) -> list[int]:
    return row[1:1 + row[0]].tolist()


def search(graph: dict[str, np.ndarray], vectors: np.ndarray, query: np.ndarray, k: int, ef: int) -> list[int]:
    """The HNSW search recall-svc runs (greedy down the upper layers, a beam on the bottom
    one), written plainly over the converted tensors."""
    offsets, upper = graph["upper_offsets"], graph["upper_links"]
    current = int(graph["entry_point"][0])
    for layer in range(offsets[current + 1] - offsets[current], 0, -1):
        improved = True
        while improved:
            improved = False
            for neighbour in links(upper[offsets[current] + layer - 1]):
                if vectors[neighbour] @ query > vectors[current] @ query:
                    current, improved = neighbour, True
    visited = {current}
    candidates = [(-(vectors[current] @ query), current)]
    best = [(vectors[current] @ query, current)]
    while candidates:
        distance, item = heapq.heappop(candidates)
        if len(best) >= ef and -distance < best[0][0]:
            break
        for neighbour in links(graph["level0_links"][item]):
            if neighbour in visited:
                continue
            visited.add(neighbour)
            score = vectors[neighbour] @ query
            if len(best) < ef or score > best[0][0]:
                heapq.heappush(candidates, (-score, neighbour))
                heapq.heappush(best, (score, neighbour))
                if len(best) > ef:
                    heapq.heappop(best)
    return [item for _, item in sorted(best, reverse=True)[:k]]


def test_the_converted_graph_is_well_formed_and_searchable_by_item_position():
    vectors = clustered(4_000, 16)
    graph = ann.bundle_tensors(ann.build(vectors, connectivity=8, expansion_add=100, threads=2), vectors)
    node_items = graph["node_items"].astype(np.int64)
    assert sorted(node_items.tolist()) == list(range(4_000)), "node_items is a permutation of the items"
    assert (graph["item_codes"] == ann.quantize(vectors[node_items])[0]).all(), "codes follow the node order"
    level0, offsets, upper = graph["level0_links"], graph["upper_offsets"], graph["upper_links"]
    assert level0.shape == (4_000, 17) and level0.dtype == np.uint32
    assert offsets.shape == (4_001,) and offsets[-1] == len(upper) and upper.shape[1] == 9
    assert (level0[:, 0] <= 16).all() and (level0[:, 0] > 0).all() and (upper[:, 0] <= 8).all()
    assert level0[:, 1:].max() < 4_000 and (upper.size == 0 or upper[:, 1:].max() < 4_000)
    entry = int(graph["entry_point"][0])
    assert offsets[entry + 1] - offsets[entry] == np.diff(offsets).max(), "the entry point is on the top layer"
    # Every upper-layer neighbour lives on that layer too.
    for item in np.flatnonzero(np.diff(offsets)):
        for layer in range(offsets[item + 1] - offsets[item]):
            for neighbour in links(upper[offsets[item] + layer]):
                assert offsets[neighbour + 1] - offsets[neighbour] > layer

    found = 0
    for query_row in range(0, 4_000, 200):
        query = vectors[query_row]
        truth = set(np.argsort(-(vectors @ query))[:50].tolist())
        found += len(truth & set(node_items[search(graph, vectors[node_items], query, 50, 100)].tolist()))
    assert found / (20 * 50) >= 0.95


def test_renumbering_keeps_the_graph_and_brings_linked_nodes_close():
    vectors = clustered(3_000, 16)
    index = ann.build(vectors, connectivity=8, expansion_add=100, threads=2)
    by_item = ann.read_hnswlib(_saved(index)) | dict(zip(("item_codes", "item_code_scales"), ann.quantize(vectors)))
    order = ann.locality_order(by_item["level0_links"], int(by_item["entry_point"][0]))
    by_node = ann.renumber(by_item, order)
    node_items = by_node["node_items"].astype(np.int64)
    assert (node_items == order).all()
    assert by_node["entry_point"][0] == 0 and node_items[0] == by_item["entry_point"][0], "the walk starts at node 0"
    for node in range(0, 3_000, 7):
        item = node_items[node]
        assert node_items[links(by_node["level0_links"][node])].tolist() == links(by_item["level0_links"][item])
        offsets = by_item["upper_offsets"]
        node_offsets = by_node["upper_offsets"]
        assert node_offsets[node + 1] - node_offsets[node] == offsets[item + 1] - offsets[item]
        for layer in range(offsets[item + 1] - offsets[item]):
            assert (node_items[links(by_node["upper_links"][node_offsets[node] + layer])].tolist()
                    == links(by_item["upper_links"][offsets[item] + layer]))

    def mean_link_length(level0):
        return np.mean([abs(n - m) for n in range(len(level0)) for m in links(level0[n])])

    # Items are numbered in cluster rotation (item i is in cluster i % 20): linked items are
    # far apart by item position, close by node.
    assert mean_link_length(by_node["level0_links"]) < 0.75 * mean_link_length(by_item["level0_links"])


def _saved(index) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "index.bin"
        index.save_index(str(path))
        return path.read_bytes()


def test_int8_codes_approximate_the_vectors_row_by_row():
    vectors = clustered(500, 32)
    codes, scales = ann.quantize(vectors)
    assert codes.dtype == np.int8 and scales.dtype == np.float32
    assert np.abs(codes).max() == 127
    error = np.abs(codes * scales[:, None] - vectors).max(axis=1)
    assert (error <= scales / 2 + 1e-6).all()
    assert ann.quantize(np.zeros((1, 4), dtype=np.float32))[0].tolist() == [[0, 0, 0, 0]]
