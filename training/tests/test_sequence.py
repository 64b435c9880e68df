import numpy as np
import onnxruntime
import torch

from recsys_training.sequence import (
    INPUT_NAMES, OUTPUT_NAME, SequenceConfig, chronological_windows, encoder_inputs, export_encoder, future_targets,
    queries, train_sequence_encoder,
)


def test_windows_cover_each_sequence_from_its_end_with_padding_in_front():
    windows = chronological_windows([[0, 1, 2, 3, 4, 5, 6], [7], [8, 9]], length=4, future=1)
    # 1-based positions; the first window ends at the sequence's end, the next overlaps by one.
    assert windows.tolist() == [[3, 4, 5, 6, 7], [0, 0, 1, 2, 3], [0, 0, 0, 9, 10]]


def test_each_position_predicts_one_of_the_next_items():
    windows = np.array([[0, 0, 1, 2, 3, 4, 5]])
    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = future_targets(windows, length=4, future=3, rng=rng)[0]
        # Inputs are positions 0..3 (0, 0, 1, 2); targets come from the items after each.
        assert targets[2] in (2, 3, 4) and targets[3] in (3, 4, 5)
        assert targets[0] == targets[1] == 0  # padding inputs predict nothing


def test_the_encoder_learns_what_follows_and_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items, dim = 30, 8
    vectors = rng.normal(size=(items, dim)).astype(np.float32)
    # Every user walks the catalogue in order from a random start: item n is followed by n + 1.
    sequences = [[(start + step) % items for step in range(12)] for start in rng.integers(0, items, 300)]
    config = SequenceConfig(length=6, width=16, blocks=1, heads=2, dropout=0.0, epochs=40, batch=64, lr=3e-3,
                            future_window=1)
    model = train_sequence_encoder(sequences, vectors, config, rng, log=lambda _: None)
    histories = [[(start + step) % items for step in range(5)] for start in range(items)]
    found = queries(model, histories, vectors) @ vectors.T
    following = np.array([(history[-1] + 1) % items for history in histories])
    assert (found.argmax(axis=1) == following).mean() >= 0.9
    # Left padding is ignored: a short history gives the same query however it is padded.
    short = [[3, 4]]
    padded, mask = encoder_inputs(short, vectors, config.length)
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1]]
    path = tmp_path / "sequence_encoder.onnx"
    assert export_encoder(model, vectors, histories, path) <= 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == INPUT_NAMES
    assert [o.name for o in session.get_outputs()] == [OUTPUT_NAME]
    noisy = padded.copy()
    noisy[0, :4] = 7.0  # whatever sits in masked positions does not matter
    one = session.run([OUTPUT_NAME], {"history_vectors": padded, "history_mask": mask})[0]
    other = session.run([OUTPUT_NAME], {"history_vectors": noisy, "history_mask": mask})[0]
    np.testing.assert_allclose(one, other, atol=1e-5)
