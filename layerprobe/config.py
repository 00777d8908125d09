"""Analysis configuration: a frozen dataclass loaded from TOML (see ``analysis_configs/``)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerprobe.kmeans import KMeansConfig
from layerprobe.probes import ProbeConfig
from layerprobe.registry import ALL_METRICS, CCA_METRICS, PROBES

DEFAULT_PROBES = PROBES
__all__ = ["ALL_METRICS", "CCA_METRICS", "DEFAULT_PROBES", "AnalysisConfig", "check_types",
           "read_toml"]


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything that decides a score besides the model: corpus, probes, protocol, hardware."""

    corpus: str = ""  # empty: the bundled corpus
    word_tier: str = "words"
    phone_tier: str = "phones"
    max_utterances: int = 0  # 0: all
    strict: bool = False  # the first bad utterance is an error instead of a skip + warning
    probes: tuple[str, ...] = DEFAULT_PROBES
    metrics: tuple[str, ...] = ("pwcca",)
    probe_config: ProbeConfig = field(default_factory=ProbeConfig)
    n_trials: int = 3
    n_seeds: int = 3  # spread: CCA re-deals items into splits, MI re-seeds k-means
    exact_sums: bool = True  # compensated float64 moments: scores independent of the rank count
    phone_clusters: int = 0  # 0: chosen from the data (layerprobe.score.auto_clusters)
    word_clusters: int = 0
    mi_kmeans: KMeansConfig = field(default_factory=KMeansConfig)  # [mi] k-means settings
    linear_probes: tuple[str, ...] = ("phone",)  # [linear] probes: the linear proxy's probes
    batch_seconds: float = 60.0
    max_chunk_seconds: float = 30.0
    device: str = "auto"
    bf16: bool = False
    memory_gb: float = 0.0  # [model] memory budget of a CPU run; 0: 90 % of the available
    fairseq_pretrained: str = ""  # pretrained checkpoint for fairseq fine-tunes without w2v_args

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}")
        if not self.probes:
            raise ValueError("at least one probe is needed")
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}")
        if self.phone_clusters < 0 or self.word_clusters < 0:
            raise ValueError("phone_clusters and word_clusters must be >= 0 (0: from the data), "
                             f"got {self.phone_clusters}, {self.word_clusters}")
        if self.memory_gb < 0:
            raise ValueError(f"memory_gb must be >= 0 (0: the memory available), got "
                             f"{self.memory_gb}")
        if self.n_seeds < 1:
            raise ValueError(f"n_seeds must be >= 1, got {self.n_seeds}")
        if self.n_seeds > 1 and self.probe_config.shards_per_split < 2:
            raise ValueError(f"n_seeds = {self.n_seeds} re-deals shards into splits: it needs "
                             f"[probes] shards_per_split >= 2 (got "
                             f"{self.probe_config.shards_per_split}), or n_seeds = 1")
        object.__setattr__(self, "linear_probes", tuple(self.linear_probes))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def seed(self) -> int:
        """The one seed of an analysis (sampling, splits, trials, k-means): ``[probes] seed``."""
        return self.probe_config.seed

    def replace(self, **changes: Any) -> AnalysisConfig:
        """A copy with some fields changed (``probe_config`` fields, and ``mi_`` + a
        :class:`KMeansConfig` field, e.g. ``mi_backend``, may be passed too)."""
        probe_fields = {f.name for f in dataclasses.fields(ProbeConfig)}
        probe_changes = {k: changes.pop(k) for k in list(changes) if k in probe_fields}
        if probe_changes:
            changes["probe_config"] = dataclasses.replace(self.probe_config, **probe_changes)
        kmeans_fields = {f"mi_{f.name}" for f in dataclasses.fields(KMeansConfig)}
        kmeans_changes = {k[3:]: changes.pop(k) for k in list(changes) if k in kmeans_fields}
        if kmeans_changes:
            changes["mi_kmeans"] = dataclasses.replace(self.mi_kmeans, **kmeans_changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["probe_config"] = {
            k: (str(v) if isinstance(v, Path) else v) for k, v in data["probe_config"].items()
        }
        return data

    @classmethod
    def from_toml(cls, path: str | Path) -> AnalysisConfig:
        """Load ``[corpus]``, ``[probes]``, ``[cca]``, ``[mi]``, ``[linear]`` and ``[model]``
        tables."""
        path = Path(path)
        data = read_toml(path, what="analysis config")
        try:
            return cls.from_dict(data, base_dir=path.parent)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: Path | None = None) -> AnalysisConfig:
        known = {"corpus", "probes", "cca", "mi", "linear", "model"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown section(s) {unknown}; expected {sorted(known)}")
        kw: dict[str, Any] = {}
        corpus = dict(data.get("corpus", {}))
        _take(corpus, kw, {"path": "corpus", "word_tier": "word_tier", "phone_tier": "phone_tier",
                           "max_utterances": "max_utterances", "strict": "strict"},
              "corpus")
        if kw.get("corpus") and base_dir is not None and not Path(kw["corpus"]).is_absolute():
            candidate = (base_dir / kw["corpus"]).resolve()
            kw["corpus"] = str(candidate) if candidate.exists() else kw["corpus"]
        probes = dict(data.get("probes", {}))
        if "names" in probes:
            kw["probes"] = tuple(probes.pop("names"))
        kw["probe_config"] = ProbeConfig.from_dict(probes)
        cca = dict(data.get("cca", {}))
        if "metric" in cca:
            kw["metrics"] = (cca.pop("metric"),)
        if "metrics" in cca:
            kw["metrics"] = tuple(cca.pop("metrics"))
        _take(cca, kw, {"n_trials": "n_trials", "n_seeds": "n_seeds", "exact_sums": "exact_sums"},
              "cca")
        mi = dict(data.get("mi", {}))
        kmeans_fields = {f.name for f in dataclasses.fields(KMeansConfig)}
        kmeans = {k: mi.pop(k) for k in list(mi) if k in kmeans_fields}
        check_types(kmeans, KMeansConfig, "[mi]")
        kw["mi_kmeans"] = KMeansConfig(**kmeans)
        _take(mi, kw, {"phone_clusters": "phone_clusters", "word_clusters": "word_clusters"},
              "mi")
        _take(dict(data.get("linear", {})), kw, {"probes": "linear_probes"}, "linear")
        _take(dict(data.get("model", {})), kw, {"batch_seconds": "batch_seconds",
                                                "max_chunk_seconds": "max_chunk_seconds",
                                                "device": "device", "bf16": "bf16",
                                                "memory_gb": "memory_gb"}, "model")
        check_types(kw, cls, "analysis config")
        return cls(**kw)


def read_toml(path: str | Path, *, what: str) -> dict[str, Any]:
    """Parse a TOML file; errors name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {what}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML ({err})") from err


def check_types(values: dict[str, Any], kind: type, where: str) -> None:
    """Each value has the type of its dataclass field's default (true/false for a bool, an integer
    for an int, any number for a float, a string, a list for a tuple); else a ValueError naming
    ``where``, the key and the value. Fields without such a default are not checked."""
    expected = ((bool, (bool,), "true or false"), (int, (int,), "an integer"),
                (float, (int, float), "a number"), (str, (str,), "a string"),
                (tuple, (list, tuple), "a list"))
    for f in dataclasses.fields(kind):
        if f.name not in values:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        value = values[f.name]
        for field_type, accepted, words in expected:
            if isinstance(default, field_type):
                if not isinstance(value, accepted) or \
                        (field_type is not bool and isinstance(value, bool)):
                    raise ValueError(f"{where}: {f.name} = {value!r} must be {words}")
                break


def _take(table: dict[str, Any], out: dict[str, Any], names: dict[str, str], section: str) -> None:
    for key, attr in names.items():
        if key in table:
            out[attr] = table.pop(key)
    if table:
        raise ValueError(f"unknown key(s) {sorted(table)} in [{section}]")
