"""fairseq HuBERT / wav2vec 2.0 checkpoints, read without fairseq, run as torchaudio modules.

A fairseq checkpoint is a dict with ``"model"`` (state dict) and ``"cfg"`` (new style: a
``{"model": ..., "task": ...}`` omegaconf/dataclass config) or ``"args"`` (old style: an
``argparse.Namespace``). Configs are reduced to plain dicts by :mod:`.safe_pickle`; weights are
renamed with torchaudio's own fairseq key table; the architecture is read from the config
(strides, heads, pre-/post-LN) and from the weight shapes (dimensions, layer count, conv norm
and bias). Pretrained (``hubert``/``wav2vec2``) and fine-tuned (``hubert_ctc``/``wav2vec_ctc``)
checkpoints are accepted; the CTC head is dropped.
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


def task_normalize(payload: Mapping[str, Any]) -> bool:
    """fairseq's ``task.normalize`` (new ``cfg``, old ``args``, or nested ``w2v_args``)."""
    cfg = to_plain(payload.get("cfg"))
    found: list[Any] = []
    if isinstance(cfg, dict):
        found.append((cfg.get("task") or {}).get("normalize"))
        w2v = (cfg.get("model") or {}).get("w2v_args")
        if isinstance(w2v, dict):
            found.append((w2v.get("task") or {}).get("normalize"))
    args = to_plain(payload.get("args"))
    if isinstance(args, dict):
        found.append(args.get("normalize"))
        w2v = args.get("w2v_args")
        if isinstance(w2v, dict):
            found.append(w2v.get("normalize"))
    return any(v is True for v in found)


def _pretrain_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """For fine-tuned checkpoints, the pretraining model config nested in ``w2v_args``."""
    nested = to_plain(model_cfg.get("w2v_args"))
    if isinstance(nested, dict):
        inner = nested.get("model") if isinstance(nested.get("model"), dict) else nested
        merged = dict(inner)
        return merged
    return model_cfg


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
    pos = state.get("encoder.pos_conv.0.weight_v")
    if pos is None:
        raise ValueError("no encoder.pos_conv.0.weight_v: not a one-layer positional conv model")
    embed = int(pos.shape[0])
    heads = int(cfg.get("encoder_attention_heads") or 12)
    if embed % heads:
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
        "encoder_ff_interm_features": int(state["encoder.layers.0.fc1.weight"].shape[0]),
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_norm_first": bool(cfg.get("layer_norm_first", False)),
        "encoder_layer_drop": 0.0,
        "aux_num_out": None,
    }


def fairseq_layer_model(payload: Mapping[str, Any], path: Path) -> TorchaudioLayerModel:
    """Build the LayerModel of a fairseq checkpoint payload read from ``path``."""
    try:
        model_cfg, name = plain_config(payload)
    except ValueError as err:
        raise ValueError(f"{path}: fairseq checkpoint: {err}") from err
    family = _PRETRAIN.get(name) or _FINETUNED.get(name)
    if family is None:
        known = sorted(_PRETRAIN) + sorted(_FINETUNED)
        raise ValueError(f"{path}: unknown fairseq architecture {name!r}; supported: {known}")
    if name in _FINETUNED:
        model_cfg = _pretrain_config(model_cfg)
    layer_type = model_cfg.get("layer_type", "transformer")
    if layer_type not in (None, "transformer") or int(model_cfg.get("pos_conv_depth") or 1) != 1:
        raise ValueError(f"{path}: unsupported fairseq {name} variant: layer_type={layer_type!r}, "
                         f"pos_conv_depth={model_cfg.get('pos_conv_depth')}")
    raw = payload["model"]
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: 'model' is a {type(raw).__name__}, not a state dict")
    state = {re.sub(r"^w2v_encoder\.", "", k): v for k, v in raw.items()}
    state = {re.sub(r"^w2v_model\.", "", k): v for k, v in state.items()}
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
    layer_model.normalize_waveform = task_normalize(payload)
    layer_model.meta = {"fairseq_arch": name, "family": family,
                        "layer_norm_first": kwargs["encoder_layer_norm_first"],
                        "normalize_waveform": layer_model.normalize_waveform}
    return layer_model
