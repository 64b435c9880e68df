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
        found += len(truth & set(search(graph, vectors, query, 50, 100)))
    assert found / (20 * 50) >= 0.95


def test_int8_codes_approximate_the_vectors_row_by_row():
    vectors = clustered(500, 32)
    codes, scales = ann.quantize(vectors)
    assert codes.dtype == np.int8 and scales.dtype == np.float32
    assert np.abs(codes).max() == 127
    error = np.abs(codes * scales[:, None] - vectors).max(axis=1)
    assert (error <= scales / 2 + 1e-6).all()
    assert ann.quantize(np.zeros((1, 4), dtype=np.float32))[0].tolist() == [[0, 0, 0, 0]]
