"""Teacher quality of an iteration's targets, measured on the probe corpus's phone alignments.

The iteration's actual targets (its k-means centroids on its features: MFCC for iteration 1,
layer ``l`` of the previous checkpoint after) label every utterance of the probe corpus; the
labels are compared frame by frame with the phones (:mod:`layerprobe.label_quality`: phone
purity, cluster purity, PNMI). The probe corpus is the profile's (``[profile] corpus``), so for a
study it is the held-out voice that pretraining never saw.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from layerprobe.corpus import Corpus, load_audio
from layerprobe.label_quality import frame_phones, label_quality
from pretraining.config import KMeansConfig
from pretraining.model import receptive_field
from pretraining.schedules import Iteration
from pretraining.targets import Labels, label_utterances, target_extractor


def teacher_quality(labels: Labels, iteration: Iteration, model_args: dict[str, Any],
                    config: KMeansConfig, corpus: Corpus, *, previous_ckpt: Path | None,
                    device: str = "cpu", log: Callable[[str], None] = print
                    ) -> dict[str, Any]:
    """Phone purity, cluster purity and PNMI of ``labels``' targets on ``corpus`` (every frame of
    every readable utterance), with the counts they come from."""
    if not any(u.phones for u in corpus.utterances):
        first = corpus.utterances[0].alignment_path if corpus.utterances else corpus.root
        raise ValueError(f"{first}: the probe corpus {corpus.name!r} has no phone alignments, "
                         "which the teacher quality needs")
    field, hop = receptive_field(model_args)
    extractor = target_extractor(iteration, previous_ckpt, config, device)
    ids = [u.id for u in corpus.utterances]
    skipped: list[str] = []
    phones, targets = [], []
    for i, frame_labels in label_utterances(
            range(len(ids)), lambda i: load_audio(corpus.utterances[i].audio_path), ids,
            model_args, extractor, labels.centroids, config, skipped):
        phones.append(frame_phones(corpus.utterances[i], int(frame_labels.numel()), hop=hop,
                                   field=field))
        targets.append(frame_labels.numpy())
    if not phones:
        raise ValueError(f"probe corpus {corpus.name!r}: no readable utterance to measure the "
                         "teacher quality on")
    quality = label_quality(np.concatenate(phones), np.concatenate(targets))
    quality.update(corpus=corpus.name, utterances=len(phones), skipped=skipped,
                   silence="frames outside every phone interval form one class, SIL")
    log(f"iteration {iteration.index}: targets ({iteration.target_name}, {labels.clusters} "
        f"clusters) on {corpus.name}: phone purity {quality['phone_purity']:.3f}, cluster purity "
        f"{quality['cluster_purity']:.3f}, PNMI {quality['pnmi']:.3f}")
    return quality
