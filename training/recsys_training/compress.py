"""Smaller fine models for serving, the article's "distill -> prune -> quantize": a student
distilled from the teacher (narrower embeddings, trunk and attention), optionally
magnitude-pruned, and a dynamically quantised INT8 copy of the teacher (onnxruntime's
quantisation tool). Each is one more ONNX file in the bundle with the teacher's inputs and
output, selected by rank-svc's ``models.fine_variant``; the manifest records its held-out
AUC next to the teacher's, measured through onnxruntime on the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

INT8_FILE = "ranker.int8.onnx"
STUDENT_FILE = "ranker.student.onnx"


@dataclass(frozen=True)
class StudentShape:
    """The student's widths against the teacher's (embedding ``dim``, trunk 128/64,
    attention 32)."""
    dim_divisor: int = 2
    trunk: tuple[int, int] = (32, 16)
    attention: int = 8
    # Weight of the teacher's soft click targets against the labels.
    soft_weight: float = 0.7
    # Fraction of each trunk/head weight matrix zeroed by magnitude (0 = no pruning).
    prune: float = 0.0


def onnx_predict(path: Path, names: list[str], inputs: tuple[torch.Tensor, ...], chunk: int = 8192) -> np.ndarray:
    """Scores ``inputs`` with the ONNX model at ``path`` on one thread, as rank-svc runs it."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    n = len(inputs[0])
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([
        session.run(["score"], {name: t[s:s + chunk].numpy() for name, t in zip(names, inputs)})[0]
        for s in range(0, n, chunk)
    ])


def quantize_int8(teacher: Path, out: Path) -> None:
    """Dynamic quantisation: INT8 weights, activations quantised per run (no calibration
    data needed, which suits models whose inputs drift with the catalogue)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as scratch:
        # Shape inference and graph optimisation first, as onnxruntime recommends: the
        # quantiser can then tell which MatMuls have constant weights.
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(teacher), str(prepared))
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("base."))


def prune_magnitude(model: nn.Module, fraction: float) -> None:
    """Zeroes the smallest ``fraction`` of each linear layer's weights (the frozen coarse
    base is left alone); the zeros are baked in, so the exported graph is plain."""
    from torch.nn.utils import prune

    if fraction <= 0:
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.startswith("base"):
            prune.l1_unstructured(module, "weight", amount=fraction)
            prune.remove(module, "weight")


def teacher_targets(teacher, inputs: tuple[torch.Tensor, ...], chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's click and like probabilities per row: the student's soft targets."""
    teacher.eval()
    clicks, likes = [], []
    with torch.no_grad():
        for s in range(0, len(inputs[0]), chunk):
            click, like = teacher.logits(*(t[s:s + chunk] for t in inputs))
            clicks.append(torch.sigmoid(click))
            likes.append(torch.sigmoid(like))
    return torch.cat(clicks), torch.cat(likes)


def distillation_loss(soft_weight: float, like_loss_weight: float):
    """Click: the teacher's probabilities mixed with the labels; like: the teacher's
    probabilities on every row (it has seen them all)."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def loss(model, feed, targets):
        clicks, soft_clicks, soft_likes = targets
        click_logit, like_logit = model.logits(*feed)
        total = soft_weight * bce(click_logit, soft_clicks) + (1 - soft_weight) * bce(click_logit, clicks)
        if like_loss_weight > 0:
            total = total + like_loss_weight * bce(like_logit, soft_likes)
        return total
    return loss
