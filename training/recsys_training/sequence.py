"""The sequence channel's encoder (recall-svc's `sequence` channel): self-attention over the
user's latest items, in the SASRec style (Kang & McAuley, 2018), turned into one query
vector at request time and searched against the bundle's item vectors.

Its inputs are the history's *item vectors* (the bundle's retrieval space, frozen), not
item ids: the exported model holds no per-item table, so its size does not grow with the
catalogue. Training is SASRec's: causal attention over chronological windows, every
position predicting the next item by a softmax over the whole catalogue's vectors (the
same inner product the channel's search ranks by)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# The ONNX contract of recall-svc's sequence channel (crates/recall-svc/src/sequence.rs).
FILE = "sequence_encoder.onnx"
# Histories and the query vectors PyTorch computed for them: recall-svc's parity test.
FIXTURE = "sequence_fixture.json"
INPUT_NAMES = ["history_vectors", "history_mask"]
OUTPUT_NAME = "query"


@dataclass
class SequenceConfig:
    # Latest items the encoder reads; a longer history is cut to its newest `length`.
    length: int = 50
    width: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2
    epochs: int = 20
    batch: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # Each position learns to predict an item drawn from the next `future_window` (drawn
    # again every epoch: PinnerFormer's dense all-action objective); 1 is SASRec's
    # next item. Longer-term interest serves a recall channel better than the very next
    # click, and holds up on a random split as well as a temporal one.
    future_window: int = 10
    # Temperature of the softmax over the catalogue's inner products (learned scale: its
    # starting value).
    initial_scale: float = 4.0


class Block(nn.Module):
    """Pre-norm causal self-attention and a position-wise feed-forward layer."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attention = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_feed = nn.LayerNorm(width)
        self.feed = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Dropout(dropout), nn.Linear(width, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        head_width = width // self.heads
        q, k, v = self.qkv(self.norm_attention(x)).chunk(3, dim=-1)
        def by_head(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, length, self.heads, head_width).transpose(1, 2)

        q, k, v = by_head(q), by_head(k), by_head(v)
        scores = q @ k.transpose(-1, -2) / head_width ** 0.5
        # A large negative rather than -inf: a padding position that sees only padding
        # still gets a finite (uniform) softmax.
        scores = scores.masked_fill(blocked, -1e9)
        attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + self.dropout(self.out(attended))
        return x + self.dropout(self.feed(self.norm_feed(x)))


class SequenceEncoder(nn.Module):
    """History item vectors `[batch, length, dim]` (oldest first, padding — zeros with mask
    0 — at the front) → one query vector per position `[batch, length, dim]`; the exported
    model returns the last position's, the query for what comes next."""

    def __init__(self, dim: int, config: SequenceConfig) -> None:
        super().__init__()
        self.length = config.length
        self.project_in = nn.Linear(dim, config.width)
        self.positions = nn.Parameter(torch.randn(config.length, config.width) * 0.02)
        self.blocks = nn.ModuleList(Block(config.width, config.heads, config.dropout) for _ in range(config.blocks))
        self.norm = nn.LayerNorm(config.width)
        self.project_out = nn.Linear(config.width, dim)
        self.scale = nn.Parameter(torch.tensor(float(config.initial_scale)))
        self.dropout = nn.Dropout(config.dropout)

    def forward_all(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = vectors.shape[1]
        x = self.dropout(self.project_in(vectors) + self.positions[-length:]) * mask.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=vectors.device).triu(1)
        # Blocked: a later position, or a padding key.
        blocked = causal.unsqueeze(0) | (mask < 0.5).unsqueeze(1)
        blocked = blocked.unsqueeze(1)
        for block in self.blocks:
            x = block(x, blocked)
        return self.project_out(self.norm(x))

    def forward(self, history_vectors: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
        return self.forward_all(history_vectors, history_mask)[:, -1, :]


def chronological_windows(sequences: list[list[int]], length: int, future: int) -> np.ndarray:
    """Training windows of `length + future` items (each position's inputs, then the
    `future` items after the last one), taken from each sequence's end backwards and
    overlapping by `future`; positions are 1-based, 0 is padding at the front."""
    span = length + future
    windows = []
    for items in sequences:
        if len(items) < 2:
            continue
        end = len(items)
        while True:
            start = max(0, end - span)
            window = items[start:end]
            windows.append([0] * (span - len(window)) + [n + 1 for n in window])
            if start == 0:
                break
            end = start + future
    return np.array(windows, dtype=np.int64).reshape(-1, span)


def future_targets(windows: np.ndarray, length: int, future: int, rng: np.random.Generator) -> np.ndarray:
    """For each input position, one of the next `future` items; 0 (no loss) at a padding
    position."""
    offsets = rng.integers(1, future + 1, size=(len(windows), length))
    columns = np.arange(length)[None, :] + offsets
    targets = np.take_along_axis(windows, columns, axis=1)
    return np.where(windows[:, :length] > 0, targets, 0)


def train_sequence_encoder(sequences: list[list[int]], item_vectors: np.ndarray, config: SequenceConfig,
                           rng: np.random.Generator, log=print) -> SequenceEncoder:
    """Fits the encoder on each user's chronological item positions (into `item_vectors`)."""
    num_items, dim = item_vectors.shape
    windows = chronological_windows(sequences, config.length, config.future_window)
    inputs = windows[:, :config.length]
    # Row 0 is padding: a zero vector.
    table = torch.as_tensor(np.vstack([np.zeros((1, dim), dtype=np.float32), item_vectors.astype(np.float32)]))
    catalogue = table[1:]
    model = SequenceEncoder(dim, config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    inputs_t = torch.as_tensor(inputs)
    log(f"sequence encoder: {len(inputs)} windows of {config.length}, {config.blocks} blocks of width {config.width}")
    for epoch in range(config.epochs):
        model.train()
        order = torch.as_tensor(rng.permutation(len(inputs)))
        targets_t = torch.as_tensor(future_targets(windows, config.length, config.future_window, rng))
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch):
            batch = order[start:start + config.batch]
            positions, next_items = inputs_t[batch], targets_t[batch]
            mask = (positions > 0).float()
            queries = model.forward_all(table[positions], mask)
            real = next_items > 0
            if not real.any():  # only histories shorter than the window's future: nothing to learn
                continue
            logits = model.scale * (queries[real] @ catalogue.T)
            loss = nn.functional.cross_entropy(logits, next_items[real] - 1)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * int(real.sum())
            count += int(real.sum())
        if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == config.epochs:
            log(f"sequence encoder epoch {epoch + 1}/{config.epochs}: next-item loss {total / max(count, 1):.4f}")
    model.eval()
    return model


def encoder_inputs(histories: list[list[int]], item_vectors: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The served inputs for histories given oldest first: the newest `length` items'
    vectors, padded at the front, and their mask."""
    dim = item_vectors.shape[1]
    vectors = np.zeros((len(histories), length, dim), dtype=np.float32)
    mask = np.zeros((len(histories), length), dtype=np.float32)
    for row, items in enumerate(histories):
        kept = items[-length:]
        if kept:
            vectors[row, length - len(kept):] = item_vectors[kept]
            mask[row, length - len(kept):] = 1.0
    return vectors, mask


def queries(model: SequenceEncoder, histories: list[list[int]], item_vectors: np.ndarray) -> np.ndarray:
    vectors, mask = encoder_inputs(histories, item_vectors, model.length)
    with torch.no_grad():
        return model(torch.as_tensor(vectors), torch.as_tensor(mask)).numpy()


def export_encoder(model: SequenceEncoder, item_vectors: np.ndarray, histories: list[list[int]], path: Path) -> float:
    """Writes the encoder as ONNX (batch dimension dynamic) and returns the largest
    |PyTorch − onnxruntime| over the query vectors of `histories`."""
    import onnxruntime

    vectors, mask = encoder_inputs(histories, item_vectors, model.length)
    example = (torch.as_tensor(vectors), torch.as_tensor(mask))
    torch.onnx.export(model, example, str(path), input_names=INPUT_NAMES, output_names=[OUTPUT_NAME],
                      dynamic_axes={name: {0: "batch"} for name in [*INPUT_NAMES, OUTPUT_NAME]}, opset_version=17,
                      dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = session.run([OUTPUT_NAME], {"history_vectors": vectors, "history_mask": mask})[0]
    with torch.no_grad():
        expected = model(*example).numpy()
    return float(np.abs(served - expected).max())
