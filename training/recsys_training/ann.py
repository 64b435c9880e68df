"""The HNSW index recall-svc searches: a graph built with hnswlib, stored as flat arrays.

hnswlib (PyPI) builds the graph: it is the fastest of the HNSW libraries measured on this
project's benchmark (``make bench-recall``), and its saved index is a plain documented
layout. We convert that layout here into tensors of our own bundle format, indexed by
graph node, so recall-svc memory-maps them like every other array and needs no C++
library at serving time:

- ``node_items`` u32 [items]: the item position of each node. Nodes are numbered in the
  order a breadth-first walk of the bottom layer from the entry point reaches them, so
  that linked nodes get nearby numbers: the links and codes a search reads one after
  another then share cache lines and pages instead of being scattered over the whole
  catalogue (hnswlib numbers nodes in insertion order). The items no walk reaches on the
  bottom layer (with inner products, low-norm items that no other item links to) come
  last, out of the way. Without this tensor, nodes are numbered by item position;
- ``level0_links`` u32 [items, 1 + 2M]: each node's bottom-layer neighbour count, then
  its neighbours (unused slots are 0);
- ``upper_offsets`` i64 [items + 1] and ``upper_links`` u32 [rows, 1 + M]: node i's
  layers 1, 2, ... are rows ``upper_offsets[i]..upper_offsets[i + 1]`` of
  ``upper_links``, each a count then neighbours;
- ``entry_point`` u32 [1]: the node every search starts from (the only one on the top
  layer);
- ``item_codes`` i8 [items, dim] and ``item_code_scales`` f32 [items]: the int8 copy of
  each node's item vector the search walks the graph with (a quarter of the memory
  traffic of f32); the candidates it keeps are rescored with the f32 item vectors.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np

#: hnswlib's saved header: offsetLevel0, max_elements, cur_element_count,
#: size_data_per_element, label_offset, offsetData (size_t), maxlevel (int),
#: enterpoint_node (u32), maxM, maxM0, M (size_t), mult (double), ef_construction (size_t).
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8 codes: ``vector ≈ codes * scale``."""
    largest = np.abs(vectors).max(axis=1)
    scales = np.where(largest > 0, largest / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(vectors / scales[:, None]), -127, 127).astype(np.int8)
    return codes, scales


def build(vectors: np.ndarray, connectivity: int, expansion_add: int, threads: int, seed: int = 100):
    """An inner-product hnswlib index of ``vectors`` labelled by position (M =
    ``connectivity``, efConstruction = ``expansion_add``)."""
    import hnswlib

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = hnswlib.Index(space="ip", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=connectivity, ef_construction=expansion_add, random_seed=seed)
    index.add_items(vectors, np.arange(len(vectors)), num_threads=threads)
    return index


def bundle_tensors(index, vectors: np.ndarray) -> dict[str, np.ndarray]:
    """The tensors of the bundle's index file: ``index``'s graph and the int8 codes, nodes
    numbered in locality order."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "hnswlib.bin"
        index.save_index(str(path))
        tensors = read_hnswlib(path.read_bytes())
    codes, scales = quantize(vectors)
    order = locality_order(tensors["level0_links"], int(tensors["entry_point"][0]))
    return renumber(tensors | {"item_codes": codes, "item_code_scales": scales}, order)


def locality_order(level0_links: np.ndarray, entry_point: int) -> np.ndarray:
    """Item positions in the order a breadth-first walk of the bottom layer's links from
    the entry point reaches them, then the items it never reaches (by position)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order

    items = len(level0_links)
    counts = level0_links[:, 0].astype(np.int64)
    used = np.arange(level0_links.shape[1] - 1)[None, :] < counts[:, None]
    neighbours = level0_links[:, 1:][used].astype(np.int32)
    graph = csr_matrix((np.ones(len(neighbours), dtype=np.int8), neighbours, np.concatenate(([0], np.cumsum(counts)))),
                       shape=(items, items))
    reached = breadth_first_order(graph, entry_point, directed=True, return_predecessors=False)
    unreached = np.ones(items, dtype=bool)
    unreached[reached] = False
    return np.concatenate((reached, np.flatnonzero(unreached))).astype(np.int64)


def renumber(tensors: dict[str, np.ndarray], order: np.ndarray) -> dict[str, np.ndarray]:
    """``tensors`` (nodes numbered by item position) with node ``n`` being item
    ``order[n]``, and ``node_items`` recording it."""
    node_of = np.empty(len(order), dtype=np.int64)
    node_of[order] = np.arange(len(order))
    levels = np.diff(tensors["upper_offsets"])
    starts = tensors["upper_offsets"][:-1]
    upper_rows = np.concatenate([np.arange(starts[i], starts[i] + levels[i]) for i in order if levels[i]]
                                or [np.zeros(0, np.int64)])
    return {
        "node_items": order.astype("<u4"),
        "level0_links": _relabel(tensors["level0_links"][order], node_of),
        "upper_offsets": np.concatenate(([0], np.cumsum(levels[order]))).astype(np.int64),
        "upper_links": _relabel(tensors["upper_links"][upper_rows], node_of),
        "entry_point": node_of[tensors["entry_point"]].astype("<u4"),
        "item_codes": tensors["item_codes"][order],
        "item_code_scales": tensors["item_code_scales"][order],
    }


def read_hnswlib(raw: bytes) -> dict[str, np.ndarray]:
    """The graph of an index hnswlib saved, renumbered from hnswlib's internal ids to the
    labels it was built with (item positions 0..n)."""
    (_, _, count, block_size, label_offset, _, max_level, entry, max_m, max_m0, _, _, _) = _HEADER.unpack_from(raw, 0)
    start = _HEADER.size
    blocks = np.frombuffer(raw, dtype=np.uint8, count=count * block_size, offset=start).reshape(count, block_size)
    level0 = blocks[:, : 4 * (1 + max_m0)].copy().view("<u4")
    labels = blocks[:, label_offset:label_offset + 8].copy().view("<u8").ravel().astype(np.int64)
    if not np.array_equal(np.sort(labels), np.arange(count)):
        raise ValueError("hnswlib index labels are not the positions 0..n")

    # Upper layers: per internal id, a byte count and then that many bytes of link rows.
    row_words = 1 + max_m
    position = start + count * block_size
    upper_rows: list[np.ndarray] = []
    levels = np.zeros(count, dtype=np.int64)
    for internal in range(count):
        (size,) = struct.unpack_from("<I", raw, position)
        position += 4
        if size:
            rows = np.frombuffer(raw, dtype="<u4", count=size // 4, offset=position).reshape(-1, row_words)
            levels[internal] = len(rows)
            upper_rows.append(rows)
            position += size
    if position != len(raw):
        raise ValueError(f"hnswlib index has {len(raw) - position} trailing bytes")

    by_label = np.argsort(labels)  # internal id of each label
    upper_by_internal = np.concatenate(upper_rows) if upper_rows else np.zeros((0, row_words), dtype="<u4")
    starts = np.concatenate(([0], np.cumsum(levels)))
    order = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in by_label if levels[i]] or [np.zeros(0, np.int64)])
    upper_offsets = np.concatenate(([0], np.cumsum(levels[by_label]))).astype(np.int64)
    if levels[entry] != max_level:
        raise ValueError(f"hnswlib entry point has {levels[entry]} upper layers, expected {max_level}")
    return {
        "level0_links": _relabel(level0[by_label], labels),
        "upper_offsets": upper_offsets,
        "upper_links": _relabel(upper_by_internal[order], labels),
        "entry_point": np.array([labels[entry]], dtype="<u4"),
    }


def _relabel(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Link rows (count in the low 16 bits of the first word, as hnswlib and our layout
    both have it, then neighbours) with each neighbour ``n`` renamed ``labels[n]`` and the
    unused slots zeroed."""
    counts = rows[:, 0] & 0xFFFF
    used = np.arange(rows.shape[1] - 1)[None, :] < counts[:, None]
    neighbours = np.where(used, labels[np.where(used, rows[:, 1:], 0)], 0)
    return np.column_stack((counts, neighbours)).astype("<u4")
