"""How well frame labels (e.g. a HuBERT iteration's k-means targets) follow the phones.

HuBERT's teacher-quality measures (Hsu et al. 2021; fairseq ``examples/hubert/
measure_teacher_quality.py``), from the joint distribution ``p(phone, cluster)`` of frames:

* ``phone_purity`` = sum over clusters of max over phones of ``p(phone, cluster)``: the frame
  accuracy of labelling each cluster with its most frequent phone;
* ``cluster_purity`` = sum over phones of max over clusters of ``p(phone, cluster)``;
* ``pnmi`` = I(phone; cluster) / H(phone): the fraction of the phone's uncertainty a cluster
  label removes (1 when the labels determine the phone, 0 when independent).

Frames follow the model's conv stack: frame ``t`` covers samples ``[t * hop, t * hop + field)``
and takes the phone whose interval contains its centre; frames in no phone interval (silence,
pauses) are one more class, ``SIL``, as in the forced alignments the HuBERT paper measured on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from layerprobe.corpus import Utterance
from layerprobe.phones import ARPABET39

__all__ = ["PHONE_CLASSES", "frame_phones", "label_quality"]

PHONE_CLASSES: tuple[str, ...] = (*ARPABET39, "SIL")
SILENCE = len(ARPABET39)
SAMPLE_RATE = 16000


def frame_phones(utterance: Utterance, n_frames: int, *, hop: int, field: int) -> np.ndarray:
    """Phone class (index into :data:`PHONE_CLASSES`) of each of ``n_frames`` model frames."""
    if n_frames < 0 or hop < 1 or field < 1:
        raise ValueError(f"frame_phones: n_frames={n_frames}, hop={hop}, field={field}")
    index = {p: i for i, p in enumerate(ARPABET39)}
    centres = (np.arange(n_frames) * hop + field / 2) / SAMPLE_RATE
    out = np.full(n_frames, SILENCE, dtype=np.int64)
    for seg in utterance.phones:
        if seg.label not in index:
            continue
        out[(centres >= seg.start) & (centres < seg.end)] = index[seg.label]
    return out


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def label_quality(phones: np.ndarray | Sequence[int], labels: np.ndarray | Sequence[int]
                  ) -> dict[str, float | int]:
    """Phone purity, cluster purity and PNMI of frame ``labels`` against frame ``phones``
    (both ``[n]`` ints), with the entropies (nats) and counts they come from."""
    ph, lab = np.asarray(phones), np.asarray(labels)
    if ph.ndim != 1 or ph.shape != lab.shape:
        raise ValueError(f"label_quality: phones and labels must be [n] arrays of one length, got "
                         f"{ph.shape} and {lab.shape}")
    if ph.size == 0:
        raise ValueError("label_quality: no frames")
    _, pi = np.unique(ph, return_inverse=True)
    _, li = np.unique(lab, return_inverse=True)
    n_p, n_l = int(pi.max()) + 1, int(li.max()) + 1
    joint = np.bincount(pi * n_l + li, minlength=n_p * n_l).reshape(n_p, n_l).astype(np.float64)
    joint /= joint.sum()
    p_phone, p_label = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(p_phone, p_label)[nz])).sum())
    h_phone, h_label = _entropy(p_phone), _entropy(p_label)
    if h_phone <= 0:
        raise ValueError("label_quality: every frame has the same phone (PNMI is undefined)")
    return {"phone_purity": float(joint.max(axis=0).sum()),
            "cluster_purity": float(joint.max(axis=1).sum()),
            "pnmi": max(mi, 0.0) / h_phone,
            "mutual_info": max(mi, 0.0), "h_phone": h_phone, "h_labels": h_label,
            "n_frames": int(ph.size), "n_phones": n_p, "n_labels": n_l}
