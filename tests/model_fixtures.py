"""Tiny models written in every source layout, for tests/test_models.py and tests/test_extract.py.

The same random weights are written as a Hugging Face folder, as our native checkpoint and as a
fairseq checkpoint (fairseq key layout, config pickled with fake fairseq/omegaconf classes that
are removed from ``sys.modules`` before anything is loaded).
"""

from __future__ import annotations

import argparse
import enum
import re
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torchaudio.models import hubert_pretrain_model
from torchaudio.models.wav2vec2.utils import import_huggingface_model
from torchaudio.models.wav2vec2.utils.import_huggingface import _get_config
from transformers import (
    Data2VecAudioConfig,
    Data2VecAudioModel,
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from layerprobe.models import save_native_checkpoint

CONV = {"conv_dim": (16, 16, 16), "conv_kernel": (10, 3, 3), "conv_stride": (5, 4, 2)}
# receptive field 10 + (3-1)*5 + (3-1)*20 = 60 samples; stride 5*4*2 = 40 (frames overlap)
RECEPTIVE_FIELD = 60
STRIDE = 40
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
         "intermediate_size": 48, "num_conv_pos_embeddings": 8,
         "num_conv_pos_embedding_groups": 2, **CONV}


def tiny_hf_model(kind: str = "hubert", *, stable: bool = False, seed: int = 0,
                  conv_bias: bool = False) -> torch.nn.Module:
    """Random tiny HF model; ``stable`` = pre-LN with layer-norm convs, else post-LN group-norm.

    ``conv_bias`` (as in wav2vec 2.0 Large): without it the first conv's norm makes the features
    blind to the input's scale, hiding any error in waveform normalisation.
    """
    norm = "layer" if stable else "group"
    torch.manual_seed(seed)
    if kind == "hubert":
        model = HubertModel(HubertConfig(**SMALL, do_stable_layer_norm=stable,
                                         feat_extract_norm=norm, conv_bias=conv_bias))
    elif kind == "wav2vec2":
        model = Wav2Vec2Model(Wav2Vec2Config(**SMALL, do_stable_layer_norm=stable,
                                             feat_extract_norm=norm, conv_bias=conv_bias))
    elif kind == "wavlm":
        model = WavLMModel(WavLMConfig(**SMALL, do_stable_layer_norm=stable,
                                       feat_extract_norm=norm, num_buckets=16,
                                       max_bucket_distance=40))
    elif kind == "data2vec-audio":
        small = {k: v for k, v in SMALL.items() if k != "num_conv_pos_embeddings"}
        model = Data2VecAudioModel(Data2VecAudioConfig(**small, num_conv_pos_embeddings=2,
                                                       conv_pos_kernel_size=5))
    else:
        raise ValueError(kind)
    # Randomise the norms and conv biases too (HF initialises them to identity / zero) so
    # mapping errors show up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("conv.bias"):
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def save_hf_folder(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


PRETRAIN_EXTRAS = {
    "mask_prob": 0.8, "mask_selection": "static", "mask_other": 0.0, "mask_length": 10,
    "no_mask_overlap": False, "mask_min_space": 1, "mask_channel_prob": 0.0,
    "mask_channel_selection": "static", "mask_channel_other": 0.0, "mask_channel_length": 10,
    "no_mask_channel_overlap": False, "mask_channel_min_space": 1, "skip_masked": False,
    "skip_nomask": False, "num_classes": 7, "final_dim": 8, "feature_grad_mult": 0.1,
}


def save_native_from_hf(model: torch.nn.Module, path: Path, *, normalize: bool = False) -> Path:
    """The HF weights, through torchaudio's importer, in our ``layerprobe-hubert-v1`` format."""
    imported = import_huggingface_model(model)
    args = _get_config(model.config)
    args["extractor_conv_layer_config"] = [list(c) for c in args["extractor_conv_layer_config"]]
    args.update(PRETRAIN_EXTRAS)
    pretrain = hubert_pretrain_model(**args)
    pretrain.wav2vec2.load_state_dict(imported.state_dict())
    return save_native_checkpoint(path, args, pretrain.state_dict(),
                                  {"iteration": 1, "step": 5, "schedule": "test",
                                   "normalize_waveform": normalize})


# torchaudio key -> fairseq key (the inverse of torchaudio's import_fairseq._map_key).
_TO_FAIRSEQ = [
    (r"feature_extractor\.conv_layers\.0\.layer_norm\.(weight|bias)$",
     r"feature_extractor.conv_layers.0.2.\1", "group"),
    (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.(weight|bias)$",
     r"feature_extractor.conv_layers.\1.2.1.\2", "layer"),
    (r"feature_extractor\.conv_layers\.(\d+)\.conv\.(weight|bias)$",
     r"feature_extractor.conv_layers.\1.0.\2", None),
    (r"encoder\.feature_projection\.projection\.(weight|bias)$", r"post_extract_proj.\1", None),
    (r"encoder\.feature_projection\.layer_norm\.(weight|bias)$", r"layer_norm.\1", None),
    (r"encoder\.transformer\.pos_conv_embed\.conv\.bias$", "encoder.pos_conv.0.bias", None),
    (r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original0$",
     "encoder.pos_conv.0.weight_g", None),
    (r"encoder\.transformer\.pos_conv_embed\.conv\.parametrizations\.weight\.original1$",
     "encoder.pos_conv.0.weight_v", None),
    (r"encoder\.transformer\.layer_norm\.(weight|bias)$", r"encoder.layer_norm.\1", None),
    (r"encoder\.transformer\.layers\.(\d+)\.attention\.(k_proj|v_proj|q_proj|out_proj)\.(\w+)$",
     r"encoder.layers.\1.self_attn.\2.\3", None),
    (r"encoder\.transformer\.layers\.(\d+)\.layer_norm\.(\w+)$",
     r"encoder.layers.\1.self_attn_layer_norm.\2", None),
    (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.intermediate_dense\.(\w+)$",
     r"encoder.layers.\1.fc1.\2", None),
    (r"encoder\.transformer\.layers\.(\d+)\.feed_forward\.output_dense\.(\w+)$",
     r"encoder.layers.\1.fc2.\2", None),
    (r"encoder\.transformer\.layers\.(\d+)\.final_layer_norm\.(\w+)$",
     r"encoder.layers.\1.final_layer_norm.\2", None),
]


def fairseq_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF weights in fairseq's key layout, plus fairseq-only entries the loader must ignore."""
    imported = import_huggingface_model(model)
    mode = "group" if model.config.feat_extract_norm == "group" else "layer"
    out: dict[str, torch.Tensor] = {}
    for key, value in imported.state_dict().items():
        for pattern, repl, only in _TO_FAIRSEQ:
            if re.match(pattern, key) and (only is None or only == mode):
                out[re.sub(pattern, repl, key)] = value.clone()
                break
        else:
            raise KeyError(f"no fairseq name for {key}")
    dim = model.config.hidden_size
    out["mask_emb"] = torch.randn(dim)
    out["label_embs_concat"] = torch.randn(7, 8)
    out["final_proj.weight"] = torch.randn(8, dim)
    out["final_proj.bias"] = torch.randn(8)
    return out


def fairseq_model_cfg(model: torch.nn.Module, name: str) -> dict[str, Any]:
    c = model.config
    layers = " + ".join(f"[({d}, {k}, {s})]" for d, k, s in
                        zip(c.conv_dim, c.conv_kernel, c.conv_stride, strict=True))
    return {
        "_name": name, "extractor_mode": "default" if c.feat_extract_norm == "group"
        else "layer_norm", "encoder_layers": c.num_hidden_layers,
        "encoder_embed_dim": c.hidden_size, "encoder_ffn_embed_dim": c.intermediate_size,
        "encoder_attention_heads": c.num_attention_heads, "conv_feature_layers": layers,
        "conv_pos": c.num_conv_pos_embeddings, "conv_pos_groups": c.num_conv_pos_embedding_groups,
        "layer_norm_first": bool(c.do_stable_layer_norm), "conv_bias": bool(c.conv_bias),
        "dropout": 0.1, "label_rate": 50,
    }


@contextmanager
def fake_fairseq_modules():
    """Temporarily importable fake ``fairseq``/``omegaconf`` modules (removed on exit)."""
    names = ["fairseq", "fairseq.dataclass", "fairseq.dataclass.configs",
             "fairseq.dataclass.constants", "omegaconf", "omegaconf.dictconfig", "omegaconf.nodes",
             "omegaconf.base"]
    mods = {n: types.ModuleType(n) for n in names}

    class ContainerMetadata:  # omegaconf.base.ContainerMetadata
        def __init__(self) -> None:
            self.ref_type = Any
            self.object_type = dict
            self.optional = True
            self.key = None
            self.flags = {}

    class AnyNode:  # omegaconf.nodes.AnyNode
        def __init__(self, value: Any, parent: Any = None) -> None:
            self._val = value
            self._parent = parent
            self._metadata = ContainerMetadata()

    class DictConfig:  # omegaconf.dictconfig.DictConfig
        def __init__(self, content: dict[str, Any], parent: Any = None) -> None:
            self._metadata = ContainerMetadata()
            self._parent = parent
            self._flags_cache = None
            self._content = {k: (DictConfig(v, self) if isinstance(v, dict) else AnyNode(v, self))
                             for k, v in content.items()}

        def __getstate__(self) -> dict[str, Any]:
            state = dict(self.__dict__)
            state.pop("_flags_cache")
            return state

    class FairseqConfig:  # fairseq.dataclass.configs.FairseqConfig (a dataclass)
        def __init__(self, **fields: Any) -> None:
            self.__dict__.update(fields)

    class ChoiceEnum(enum.Enum):  # fairseq.dataclass.constants.*
        TRANSFORMER = "transformer"

    for cls, mod in ((ContainerMetadata, "omegaconf.base"), (AnyNode, "omegaconf.nodes"),
                     (DictConfig, "omegaconf.dictconfig"),
                     (FairseqConfig, "fairseq.dataclass.configs"),
                     (ChoiceEnum, "fairseq.dataclass.constants")):
        cls.__module__ = mod
        cls.__qualname__ = cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    sys.modules.update(mods)
    try:
        yield types.SimpleNamespace(DictConfig=DictConfig, FairseqConfig=FairseqConfig,
                                    ChoiceEnum=ChoiceEnum)
    finally:
        for n in names:
            sys.modules.pop(n, None)


def save_fairseq_from_hf(model: torch.nn.Module, path: Path, *, style: str = "cfg",
                         name: str = "hubert", normalize: bool = False) -> Path:
    """Write ``model``'s weights as a fairseq checkpoint (new ``cfg`` or old ``args`` style)."""
    state = fairseq_state(model)
    model_cfg = fairseq_model_cfg(model, name)
    with fake_fairseq_modules() as fake:
        if style == "cfg":
            model_cfg["layer_type"] = fake.ChoiceEnum.TRANSFORMER
            cfg = fake.DictConfig({"model": model_cfg, "task": {"_name": "hubert_pretraining",
                                                                "sample_rate": 16000,
                                                                "normalize": normalize}})
            payload = {"cfg": cfg, "model": state, "optimizer_history": [],
                       "extra_state": fake.FairseqConfig(epoch=3, note="extra")}
        elif style == "args":
            args = argparse.Namespace(**{("arch" if k == "_name" else k): v
                                         for k, v in model_cfg.items()})
            args.task_cfg = fake.FairseqConfig(sample_rate=16000)
            args.normalize = normalize
            payload = {"args": args, "model": state}
        else:
            raise ValueError(style)
        torch.save(payload, path)
    assert "omegaconf" not in sys.modules and "fairseq" not in sys.modules
    return path


def random_waveforms(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.5 * torch.randn(n, generator=g) for n in lengths]
