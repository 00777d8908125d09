"""Pretraining configuration: frozen dataclasses loaded from TOML (see ``pretraining/configs/``).

A config file has the tables ``[schedule]``, ``[model]``, ``[train]``, ``[kmeans]``, ``[data]`` and
``[profile]``; every key is optional and unknown keys are errors. Defaults follow the published
HuBERT Base recipe (fairseq ``examples/hubert``) where one exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerprobe.config import check_types, read_toml
from layerprobe.kmeans import KMeansConfig as LayerprobeKMeansConfig

SCHEDULES = ("original", "uniform", "progressive", "progressive-cluster")
PRESETS = ("tiny", "small", "base")


@dataclass(frozen=True)
class ScheduleConfig:
    """What the plan is built from (see :func:`pretraining.schedules.build_plan`)."""

    name: str = "progressive"
    iterations: int = 3
    total_steps: int = 650_000
    first_layer: int = 6  # supervision layer of iteration 2
    last_layer: int = 9  # supervision layer of iteration N
    first_clusters: int = 100  # iteration 1 (MFCC targets)
    last_clusters: int = 500  # iterations >= 2 (progressive-cluster: iteration N)
    kmeans_fraction: float = 0.1  # fraction of the utterances k-means is fitted on

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"[schedule] name {self.name!r} unknown; choose from "
                             f"{list(SCHEDULES)}")
        if not 0.0 < self.kmeans_fraction <= 1.0:
            raise ValueError("[schedule] kmeans_fraction must be in (0, 1], got "
                             f"{self.kmeans_fraction}")


@dataclass(frozen=True)
class ModelConfig:
    """A preset of :mod:`pretraining.model` and keyword overrides of ``hubert_pretrain_model``."""

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"[model] preset {self.preset!r} unknown; choose from {list(PRESETS)}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule of the learning rate, batching and bookkeeping of the training loop."""

    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_fraction: float = 0.08  # 32k of 400k updates in the published recipe
    grad_clip: float = 10.0
    batch_seconds: float = 87.5  # audio seconds per micro-batch (padding included)
    grad_accum: int = 1
    feature_penalty_weight: float = 10.0
    unmasked_weight: float = 0.0
    init_from_previous: bool = False  # fairseq HuBERT starts every iteration from scratch
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # autocast to bfloat16, CUDA only
    compile: bool = False  # torch.compile the conv stack and blocks (falls back to eager on error)
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    log_every: int = 10
    save_every: int = 500  # steps between resume states (always saved at the end of an iteration)
    max_bad_steps: int = 20  # non-finite steps in a row (updates skipped) before the run stops
    max_oom_batches: int = 5  # out-of-memory batches in a row (skipped) before the run stops

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_seconds <= 0 or self.grad_accum < 1:
            raise ValueError("[train] lr and batch_seconds must be > 0 and grad_accum >= 1")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError("[train] warmup_fraction must be in [0, 1), got "
                             f"{self.warmup_fraction}")
        if self.save_every < 1 or self.log_every < 1:
            raise ValueError("[train] save_every and log_every must be >= 1")
        if self.max_bad_steps < 1 or self.max_oom_batches < 1:
            raise ValueError("[train] max_bad_steps and max_oom_batches must be >= 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError("[train] device must be auto, cpu, cuda or cuda:N, got "
                             f"{self.device!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


@dataclass(frozen=True)
class KMeansConfig(LayerprobeKMeansConfig):
    """layerprobe's k-means settings (:class:`layerprobe.kmeans.KMeansConfig`, the same as MI's)
    with fairseq ``simple_kmeans``'s defaults, and the layer-feature chunk length."""

    max_iter: int = 100
    batch_size: int = 10_000
    tol: float = 0.0
    max_no_improvement: int = 100
    n_init: int = 20
    reassignment_ratio: float = 0.0
    max_chunk_seconds: float = 100.0  # layer features: one utterance at a time, in chunks of this


@dataclass(frozen=True)
class DataConfig:
    """The pretraining audio: a corpus source for ``layerprobe.corpus.load_corpus``."""

    path: str = ""  # empty: the bundled corpus
    max_utterances: int = 0  # 0: all
    min_seconds: float = 0.1  # shorter utterances are skipped
    max_sample_seconds: float = 15.625  # random crop above this (fairseq max_sample_size 250k)

    def __post_init__(self) -> None:
        if self.max_sample_seconds <= self.min_seconds:
            raise ValueError("[data] max_sample_seconds must exceed min_seconds")


@dataclass(frozen=True)
class ProfileConfig:
    """Layerwise scoring of each iteration's checkpoint with ``layerprobe.score``."""

    enabled: bool = True
    corpus: str = ""  # empty: the bundled corpus
    analysis_config: str = ""  # an analysis TOML; empty: layerprobe's defaults
    probes: tuple[str, ...] = ("fbank", "phone", "word")
    # pwcca-centred: its layer ranking and autoencoder index are the most stable across split
    # seeds (README, "Which metric the profile uses"); add "pwcca" to compare with published numbers
    metrics: tuple[str, ...] = ("pwcca-centred",)
    max_utterances: int = 0  # 0: as the analysis config says
    every_steps: int = 0  # also save and profile a checkpoint every N steps (learning curves)
    teacher_quality: bool = True  # phone purity / PNMI of each iteration's targets on the corpus

    def __post_init__(self) -> None:
        object.__setattr__(self, "probes", tuple(self.probes))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        if self.every_steps < 0:
            raise ValueError(f"[profile] every_steps must be >= 0, got {self.every_steps}")


_SECTIONS: dict[str, type] = {
    "schedule": ScheduleConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "kmeans": KMeansConfig,
    "data": DataConfig,
    "profile": ProfileConfig,
}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run depends on besides its output folder."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    data: DataConfig = field(default_factory=DataConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"]["betas"] = list(out["train"]["betas"])
        out["profile"]["probes"] = list(out["profile"]["probes"])
        out["profile"]["metrics"] = list(out["profile"]["metrics"])
        return out

    def with_changes(self, **sections: dict[str, Any]) -> PretrainConfig:
        """A copy with fields of some tables changed: ``with_changes(train={"seed": 1})``."""
        return PretrainConfig.from_dict(_merge(self.to_dict(), sections))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> PretrainConfig:
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"{source}: unknown table(s) {unknown}; expected {sorted(_SECTIONS)}")
        kw = {}
        for name, kind in _SECTIONS.items():
            table = dict(data.get(name, {}))
            known = {f.name for f in dataclasses.fields(kind)}
            bad = sorted(set(table) - known)
            if bad:
                raise ValueError(f"{source}: unknown key(s) {bad} in [{name}]; "
                                 f"known: {sorted(known)}")
            check_types(table, kind, f"{source}: [{name}]")
            try:
                kw[name] = kind(**table)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{source}: {err}") from err
        return cls(**kw)

    @classmethod
    def from_toml(cls, path: str | Path) -> PretrainConfig:
        data = read_toml(path, what="pretraining config")
        return cls.from_dict(data, source=str(path))


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in changes.items():
        if section not in out:
            raise ValueError(f"unknown table {section!r}; expected {sorted(out)}")
        out[section].update(values)
    return out


def config_dir() -> Path:
    """The folder of the bundled configs (``tiny.toml``, ``base.toml``, ``demo.toml``)."""
    return Path(__file__).resolve().parent / "configs"


def resolve_config(name_or_path: str | Path) -> Path:
    """A config path, or the bundled config of that name (``demo`` → ``configs/demo.toml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    bundled = config_dir() / f"{name_or_path}.toml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in config_dir().glob("*.toml"))
    raise FileNotFoundError(f"{name_or_path}: no such config file nor bundled config {known}")
