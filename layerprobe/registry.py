"""The names of probes and metrics, in one place (configs, the command line, scoring, plots)."""

from __future__ import annotations

PROBES: tuple[str, ...] = ("fbank", "phone", "word")  # the default probes, in plotting order
OPTIONAL_PROBES: tuple[str, ...] = ("word-embedding",)  # needs [probes] word_embeddings
ALL_PROBES: tuple[str, ...] = (*PROBES, *OPTIONAL_PROBES)
SEGMENT_PROBES: tuple[str, ...] = ("phone", "word", "word-embedding")  # items with class labels

CCA_METRICS: tuple[str, ...] = ("pwcca", "pwcca-centred", "mean-cca", "svcca", "cka")
FIT_SHARING_METRICS: tuple[str, ...] = ("pwcca", "pwcca-centred", "mean-cca")  # same fits
MI_METRICS: tuple[str, ...] = ("mi",)
CLASSIFIER_METRICS: tuple[str, ...] = ("linear-accuracy",)  # segment probes with class labels
SEGMENT_METRICS: tuple[str, ...] = (*MI_METRICS, *CLASSIFIER_METRICS)  # need the items kept
ALL_METRICS: tuple[str, ...] = (*CCA_METRICS, *MI_METRICS, *CLASSIFIER_METRICS)
ALL_CHOICE_METRICS: tuple[str, ...] = ("pwcca", "mi")  # what ``--metric all`` means

MI_BACKENDS: tuple[str, ...] = ("torch", "sklearn")


def expand_probes(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Probe names with ``all`` expanded to the default probes, duplicates removed."""
    out = PROBES if "all" in names else tuple(names)
    return tuple(dict.fromkeys(out))


def expand_metrics(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Metric names with ``all`` expanded (pwcca and mi), duplicates removed."""
    out = ALL_CHOICE_METRICS if "all" in names else tuple(names)
    return tuple(dict.fromkeys(out))
