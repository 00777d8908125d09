"""Teacher quality of frame labels: phone purity, cluster purity, PNMI (HuBERT's definitions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from layerprobe.corpus import Segment, Utterance
from layerprobe.label_quality import PHONE_CLASSES, frame_phones, label_quality


def reference(phones: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """fairseq measure_teacher_quality.py's formulas, written out directly."""
    ps, ls = np.unique(phones), np.unique(labels)
    joint = np.array([[np.sum((phones == p) & (labels == c)) for c in ls] for p in ps], float)
    joint /= joint.sum()
    px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.where(joint > 0, np.log(joint / (px @ py)), 0.0)
    mi = (joint * pmi).sum()
    h = -(px[px > 0] * np.log(px[px > 0])).sum()
    return {"phone_purity": joint.max(0).sum(), "cluster_purity": joint.max(1).sum(),
            "pnmi": mi / h}


def test_labels_equal_to_phones_are_pure_and_fully_informative() -> None:
    phones = np.random.default_rng(0).integers(0, 40, 5000)
    q = label_quality(phones, phones + 100)  # renamed classes: the same partition
    assert q["phone_purity"] == pytest.approx(1.0) and q["cluster_purity"] == pytest.approx(1.0)
    assert q["pnmi"] == pytest.approx(1.0)


def test_independent_labels_carry_almost_no_phone_information() -> None:
    rng = np.random.default_rng(1)
    phones, labels = rng.integers(0, 40, 200_000), rng.integers(0, 50, 200_000)
    q = label_quality(phones, labels)
    assert q["pnmi"] < 0.01
    # purity of independent labels is the majority phone's share, far below 1
    assert q["phone_purity"] < 0.05


def test_measures_match_a_direct_computation() -> None:
    rng = np.random.default_rng(2)
    phones = rng.integers(0, 12, 3000)
    labels = (phones * 3 + rng.integers(0, 4, 3000)) % 17  # partly informative
    ours, ref = label_quality(phones, labels), reference(phones, labels)
    for key in ("phone_purity", "cluster_purity", "pnmi"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-12)
    assert 0.2 < ours["pnmi"] < 0.95


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="one length"):
        label_quality(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="no frames"):
        label_quality(np.zeros(0, int), np.zeros(0, int))
    with pytest.raises(ValueError, match="undefined"):
        label_quality(np.zeros(5, int), np.arange(5))


def test_frame_phones_take_the_phone_at_each_frame_centre() -> None:
    utt = Utterance("u", Path("u.wav"), None, None, None, 1.0, (),
                    (Segment("AA", 0.10, 0.30), Segment("B", 0.30, 0.35)))
    # HuBERT frames: hop 320, field 400 -> centres at 12.5 ms + 20 ms * t
    out = frame_phones(utt, 20, hop=320, field=400)
    centres = 0.0125 + 0.02 * np.arange(20)
    expected = np.where((centres >= 0.10) & (centres < 0.30), PHONE_CLASSES.index("AA"),
                        np.where((centres >= 0.30) & (centres < 0.35), PHONE_CLASSES.index("B"),
                                 PHONE_CLASSES.index("SIL")))
    assert out.tolist() == expected.tolist()
    assert out[0] == PHONE_CLASSES.index("SIL") and out[5] == PHONE_CLASSES.index("AA")
