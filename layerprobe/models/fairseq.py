"""fairseq HuBERT / wav2vec 2.0 checkpoints, read without fairseq, run as torchaudio modules.

A fairseq checkpoint is a dict with ``"model"`` (state dict) and ``"cfg"`` (new style: a
``{"model": ..., "task": ...}`` omegaconf/dataclass config) or ``"args"`` (old style: an
``argparse.Namespace``). Configs are reduced to plain dicts by :mod:`.safe_pickle`; weights are
renamed with torchaudio's own fairseq key table; the architecture is read from the config
(strides, heads, pre-/post-LN) and from the weight shapes (dimensions, layer count, conv norm
and bias). Pretrained (``hubert``/``wav2vec2``) and fine-tuned (``hubert_ctc``/``wav2vec_ctc``)
checkpoints are accepted; the CTC head is dropped.

Fine-tuned checkpoints written by fairseq 0.12's trainer store ``w2v_args=None``: like fairseq,
the architecture is then read from the pretrained checkpoint at ``cfg.model.w2v_path`` (or from
``pretrained=``, the ``--fairseq-pretrained`` option); the weights always come from the fine-tuned
file. Waveform normalisation follows ``task.normalize`` with fairseq's own formula,
``F.layer_norm(wav, wav.shape)`` (eps 1e-5). Every weight the loader reads must be a tensor of
the expected rank and every config field it reads of the expected type; anything else (e.g. a
foreign object planted in a pickle) is a ValueError naming the key.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchaudio.models import wav2vec2_model
from torchaudio.models.wav2vec2.utils.import_fairseq import _convert_state_dict

from .base import FAIRSEQ_NORMALIZE_EPS
from .safe_pickle import to_plain
from .wav2vec2 import TorchaudioLayerModel

DEFAULT_CONV_LAYERS = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
_PRETRAIN = {"hubert": "hubert", "wav2vec2": "wav2vec2"}
_FINETUNED = {"hubert_ctc": "hubert", "wav2vec_ctc": "wav2vec2", "wav2vec2_ctc": "wav2vec2"}


def is_fairseq_payload(payload: Any) -> bool:
    """A dict with a ``model`` state dict and a ``cfg`` or ``args`` entry."""
    return (isinstance(payload, Mapping) and "model" in payload
            and ("cfg" in payload or "args" in payload))


def parse_conv_layers(spec: str) -> list[tuple[int, int, int]]:
    """Evaluate fairseq's ``conv_feature_layers`` string (list literals joined by + and *)."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List | ast.Tuple):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported syntax {ast.dump(node)[:60]}")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
        out = [(int(c), int(k), int(s)) for c, k, s in layers]
    except (SyntaxError, ValueError, TypeError) as err:
        raise ValueError(f"cannot parse conv_feature_layers {spec!r}: {err}") from err
    if not out:
        raise ValueError(f"conv_feature_layers {spec!r} is empty")
    return out


def plain_config(payload: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(model config as a plain dict, model name) of a fairseq payload."""
    cfg = to_plain(payload.get("cfg"))
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        model_cfg = dict(cfg["model"])
    elif payload.get("args") is not None:
        model_cfg = to_plain(payload["args"])
        if not isinstance(model_cfg, dict):
            raise ValueError(f"'args' is a {type(payload['args']).__name__}, not a Namespace")
    else:
        raise ValueError("neither cfg['model'] nor args holds a model configuration")
    name = str(model_cfg.get("_name") or model_cfg.get("arch") or "")
    return model_cfg, name


def _section(parent: Any, key: str) -> dict[str, Any]:
    value = parent.get(key) if isinstance(parent, dict) else None
    return value if isinstance(value, dict) else {}


def task_normalize(payload: Mapping[str, Any]) -> bool:
    """fairseq's ``task.normalize`` (new ``cfg``, old ``args``, nested ``w2v_args``, or the
    fine-tuning model's own ``normalize`` field, which fairseq ties to ``task.normalize``)."""
    cfg = to_plain(payload.get("cfg"))
    found: list[Any] = []
    if isinstance(cfg, dict):
        found.append(_section(cfg, "task").get("normalize"))
        found.append(_section(cfg, "model").get("normalize"))
        w2v = _section(_section(cfg, "model"), "w2v_args")
        found.append(_section(w2v, "task").get("normalize"))
    args = to_plain(payload.get("args"))
    if isinstance(args, dict):
        found.append(args.get("normalize"))
        w2v = _section(args, "w2v_args")
        found.append(w2v.get("normalize"))
        found.append(_section(w2v, "task").get("normalize"))
    return any(v is True for v in found)


def _nested_pretrain_config(model_cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The pretraining model config nested in a fine-tuned config's ``w2v_args`` (or None)."""
    nested = to_plain(model_cfg.get("w2v_args"))
    if not isinstance(nested, dict):
        return None
    return dict(nested["model"]) if isinstance(nested.get("model"), dict) else dict(nested)


def pretrained_candidates(w2v_path: str, checkpoint: Path) -> list[Path]:
    """Where to look for ``w2v_path``: as fairseq reads it (absolute, or relative to the working
    directory), then relative to the fine-tuned checkpoint's folder, then its file name there."""
    stored = Path(w2v_path).expanduser()
    found = [stored] if stored.is_absolute() else [stored, checkpoint.parent / stored]
    found.append(checkpoint.parent / stored.name)
    return list(dict.fromkeys(found))


def _pretrained_payload(model_cfg: dict[str, Any], path: Path, name: str,
                        pretrained: Path | None) -> tuple[Mapping[str, Any], Path]:
    """The pretrained checkpoint a ``w2v_args=None`` fine-tune needs, and where it was found."""
    from . import load_checkpoint

    if pretrained is not None:
        where, looked = pretrained, [pretrained]
    else:
        w2v_path = model_cfg.get("w2v_path")
        looked = pretrained_candidates(w2v_path, path) if isinstance(w2v_path, str) and w2v_path \
            else []
        where = next((c for c in looked if c.is_file()), None)
    if where is None or not where.is_file():
        raise ValueError(
            f"{path}: fine-tuned fairseq {name} checkpoint has w2v_args=None (no pretraining "
            f"config); fairseq reads it from the pretrained checkpoint at "
            f"w2v_path={model_cfg.get('w2v_path')!r}, which was not found (looked for: "
            f"{', '.join(map(str, looked)) or 'nothing'}); pass the pretrained checkpoint with "
            f"--fairseq-pretrained PATH (load(..., fairseq_pretrained=PATH))")
    payload = load_checkpoint(where)
    if not is_fairseq_payload(payload):
        raise ValueError(f"{path}: pretrained checkpoint {where} is not a fairseq checkpoint")
    return payload, where


def _pretrain_config(model_cfg: dict[str, Any], path: Path, name: str, pretrained: Path | None
                     ) -> tuple[dict[str, Any], Path | None, Mapping[str, Any] | None]:
    """(pretraining model config, pretrained file read or None, its payload or None)."""
    nested = _nested_pretrain_config(model_cfg)
    if nested is not None:
        return nested, None, None
    payload, where = _pretrained_payload(model_cfg, path, name, pretrained)
    try:
        pre_cfg, pre_name = plain_config(payload)
    except ValueError as err:
        raise ValueError(f"{path}: pretrained checkpoint {where}: {err}") from err
    if pre_name not in _PRETRAIN:
        raise ValueError(f"{path}: pretrained checkpoint {where} is a fairseq {pre_name!r} "
                         f"model, not one of {sorted(_PRETRAIN)}")
    return pre_cfg, where, payload


def _cfg_int(cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config field {key}={value!r} is not an integer")
    return value


def _cfg_bool(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config field {key}={value!r} is not a boolean")
    return value


def tensor_state(raw: Any) -> dict[str, torch.Tensor]:
    """The ``model`` state dict with fine-tuning prefixes stripped; every entry must be a tensor.

    A foreign object where a weight belongs (a hostile or corrupt pickle) is a ValueError
    naming its key, before anything reads it.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"'model' is a {type(raw).__name__}, not a state dict")
    bad = [(k, v) for k, v in raw.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        listed = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"'model' entries that are not tensors: {listed}{more}")
    state = {re.sub(r"^w2v_encoder\.", "", k): v for k, v in raw.items()}
    return {re.sub(r"^w2v_model\.", "", k): v for k, v in state.items()}


def _weight(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    value = state.get(key)
    if value is None:
        raise ValueError(f"no weight {key}")
    if value.ndim != ndim or not value.is_floating_point():
        raise ValueError(f"weight {key} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                         f"expected a {ndim}-d floating-point tensor")
    return value


def _layer_count(state: Mapping[str, torch.Tensor]) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"encoder layers {sorted(ids)} are not 0..L-1")
    return len(ids)


def wav2vec2_kwargs(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``torchaudio.models.wav2vec2_model`` kwargs from a fairseq config and its weights."""
    conv = parse_conv_layers(str(cfg.get("conv_feature_layers") or DEFAULT_CONV_LAYERS))
    n_conv = len({m.group(1) for k in state
                  if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight", k))})
    if n_conv != len(conv):
        raise ValueError(f"config lists {len(conv)} conv layers, weights have {n_conv}")
    group_norm = "feature_extractor.conv_layers.0.2.weight" in state
    layer_norm = "feature_extractor.conv_layers.0.2.1.weight" in state
    mode = {"default": "group_norm", "layer_norm": "layer_norm"}.get(
        str(cfg.get("extractor_mode", "default")))
    if mode is None or (mode == "group_norm") != group_norm or (mode == "layer_norm") != layer_norm:
        raise ValueError(f"extractor_mode {cfg.get('extractor_mode')!r} does not match the weights")
    if "encoder.pos_conv.0.weight_v" not in state:
        raise ValueError("no encoder.pos_conv.0.weight_v: not a one-layer positional conv model")
    pos = _weight(state, "encoder.pos_conv.0.weight_v", 3)
    embed = int(pos.shape[0])
    heads = _cfg_int(cfg, "encoder_attention_heads", 12)
    if heads < 1 or embed % heads:
        raise ValueError(f"encoder dim {embed} not divisible by {heads} heads")
    return {
        "extractor_mode": mode,
        "extractor_conv_layer_config": conv,
        "extractor_conv_bias": "feature_extractor.conv_layers.0.0.bias" in state,
        "encoder_embed_dim": embed,
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": int(pos.shape[2]),
        "encoder_pos_conv_groups": embed // int(pos.shape[1]),
        "encoder_num_layers": _layer_count(state),
        "encoder_num_heads": heads,
        "encoder_attention_dropout": 0.0,
        "encoder_ff_interm_features": int(_weight(state, "encoder.layers.0.fc1.weight", 2)
                                          .shape[0]),
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_norm_first": _cfg_bool(cfg, "layer_norm_first", False),
        "encoder_layer_drop": 0.0,
        "aux_num_out": None,
    }


def fairseq_layer_model(payload: Mapping[str, Any], path: Path, *,
                        pretrained: Path | None = None) -> TorchaudioLayerModel:
    """Build the LayerModel of a fairseq checkpoint payload read from ``path``.

    ``pretrained``: the pretrained checkpoint to read the architecture from when a fine-tuned
    ``path`` has ``w2v_args=None`` (default: its ``w2v_path``, found as fairseq does); unused
    otherwise.
    """
    try:
        model_cfg, name = plain_config(payload)
    except ValueError as err:
        raise ValueError(f"{path}: fairseq checkpoint: {err}") from err
    family = _PRETRAIN.get(name) or _FINETUNED.get(name)
    if family is None:
        known = sorted(_PRETRAIN) + sorted(_FINETUNED)
        raise ValueError(f"{path}: unknown fairseq architecture {name!r}; supported: {known}")
    normalize = task_normalize(payload)
    pretrained_from = None
    if name in _FINETUNED:
        model_cfg, pretrained_from, pre_payload = _pretrain_config(model_cfg, path, name,
                                                                   pretrained)
        if pre_payload is not None:
            normalize = normalize or task_normalize(pre_payload)
    try:
        layer_type = model_cfg.get("layer_type", "transformer")
        pos_conv_depth = _cfg_int(model_cfg, "pos_conv_depth", 1)
        state = tensor_state(payload["model"])
    except ValueError as err:
        raise ValueError(f"{path}: fairseq {name} checkpoint: {err}") from err
    if layer_type not in (None, "transformer") or pos_conv_depth != 1:
        raise ValueError(f"{path}: unsupported fairseq {name} variant: layer_type={layer_type!r}, "
                         f"pos_conv_depth={pos_conv_depth}")
    try:
        kwargs = wav2vec2_kwargs(model_cfg, state)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{path}: fairseq {name} checkpoint: {err}") from err
    model = wav2vec2_model(**kwargs)
    if "post_extract_proj.weight" not in state:  # fairseq skips it when conv dim == embed dim
        dim = kwargs["encoder_embed_dim"]
        state["post_extract_proj.weight"] = torch.eye(dim)
        state["post_extract_proj.bias"] = torch.zeros(dim)
    try:
        converted = _convert_state_dict(state)
    except ValueError as err:
        raise ValueError(f"{path}: fairseq {name} checkpoint: {err}") from err
    wanted = set(model.state_dict())
    wanted |= {k.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v") for k in wanted}
    converted = {k: v for k, v in converted.items() if k in wanted}
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: fairseq {name} weights do not fit: {err}") from err
    layer_model = TorchaudioLayerModel(model, name=path.stem, source="fairseq")
    layer_model.normalize_waveform = normalize
    layer_model.normalize_eps = FAIRSEQ_NORMALIZE_EPS
    layer_model.meta = {"fairseq_arch": name, "family": family,
                        "layer_norm_first": kwargs["encoder_layer_norm_first"],
                        "normalize_waveform": normalize,
                        "waveform_preprocessing": ("fairseq F.layer_norm(wav, wav.shape), eps 1e-5"
                                                   if normalize else "none")}
    if pretrained_from is not None:
        layer_model.meta["pretrained_config_from"] = str(pretrained_from)
    return layer_model
