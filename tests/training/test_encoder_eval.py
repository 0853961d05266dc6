"""Retrieval metrics on hand-made similarity matrices, and the committed checkpoint's targets."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.encoder import DualEncoder
from training.encoder_eval import errors_by_kind, evaluate_encoder, pair_accuracy, recall_at_k
from training.scenes import twin_gallery

SIM = np.array(
    [
        [0.9, 0.1, 0.2, 0.0],  # query 0: target 0 ranks 1st
        [0.8, 0.5, 0.1, 0.0],  # query 1: target 1 ranks 2nd
        [0.3, 0.2, 0.1, 0.4],  # query 2: target 2 ranks 4th
        [0.5, 0.1, 0.2, 0.5],  # query 3: tie with item 0 counts against the target
    ]
)


def test_recall_at_k_on_a_hand_made_matrix() -> None:
    targets = np.arange(4)
    assert recall_at_k(SIM, targets, 1) == 0.25
    assert recall_at_k(SIM, targets, 2) == 0.75
    assert recall_at_k(SIM, targets, 3) == 0.75
    assert recall_at_k(SIM, targets, 4) == 1.0
    assert recall_at_k(SIM, np.array([0, 0, 3, 0]), 1) == 0.75


def test_pair_accuracy_is_strict() -> None:
    targets, rivals = np.arange(4), np.array([1, 0, 3, 0])
    # q0 0.9>0.1 yes; q1 0.5>0.8 no; q2 0.1>0.4 no; q3 0.5>0.5 no (a tie is not a win)
    assert pair_accuracy(SIM, targets, rivals) == 0.25


def test_errors_by_kind_names_the_twin_kind() -> None:
    gallery = twin_gallery(4, 7)
    sim = np.eye(4)
    sim[0, 1] = 2.0  # query 0 retrieves its twin
    errors = errors_by_kind(sim, gallery)
    assert errors == {gallery[1].twin_kind: 1}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2026, 7])
def test_committed_checkpoint_meets_the_targets(encoder: DualEncoder, seed: int) -> None:
    metrics = evaluate_encoder(encoder, n=1000, seed=seed)
    assert metrics["t2i_r10"] >= 0.98
    assert metrics["t2i_r1"] >= 0.70
    assert metrics["binding_acc"] > 0.8
