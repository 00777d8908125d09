"""HuBERT pretraining model presets (torchaudio's ``hubert_pretrain_model``) and checkpoints.

Presets are complete keyword sets of ``torchaudio.models.hubert_pretrain_model``; they are stored
verbatim as ``model_args`` in checkpoints so that a loader can rebuild the model.

- ``base``: the published HuBERT Base architecture and masking (torchaudio's
  ``hubert_pretrain_base``).
- ``small``: the same strides with 64 channels, 6 blocks of width 128 (4 heads, feed-forward 512),
  no dropout nor layer drop, conv gradients unscaled: 1.4 M parameters, the scale of the schedule
  study (``configs/study.toml``; a 32-channel conv stack measured 0.06 lower on the phone proxy).
- ``tiny``: the same convolutional strides (so 50 Hz frames and a 400-sample receptive field) with
  32 channels, 4 transformer blocks of width 64, no dropout nor layer drop; for CPU tests and demos.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchaudio.models import HuBERTPretrainModel, hubert_pretrain_model

from layerprobe.models import ConvStack
from layerprobe.models import load_checkpoint as read_checkpoint
from layerprobe.models.native import FORMAT, save_native_checkpoint

CONV_STRIDES = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # (kernel, stride) of HuBERT's conv stack


def _conv_config(channels: int) -> list[list[int]]:
    return [[channels, k, s] for k, s in CONV_STRIDES]


_COMMON: dict[str, Any] = {
    "extractor_mode": "group_norm",
    "extractor_conv_bias": False,
    "encoder_layer_norm_first": False,
    "mask_prob": 0.8,
    "mask_selection": "static",
    "mask_other": 0.0,
    "mask_length": 10,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "mask_channel_prob": 0.0,
    "mask_channel_selection": "static",
    "mask_channel_other": 0.0,
    "mask_channel_length": 10,
    "no_mask_channel_overlap": False,
    "mask_channel_min_space": 1,
    "skip_masked": False,
    "skip_nomask": False,
    "feature_grad_mult": 0.1,
}

PRESETS: dict[str, dict[str, Any]] = {
    "base": {
        **_COMMON,
        "extractor_conv_layer_config": _conv_config(512),
        "encoder_embed_dim": 768,
        "encoder_projection_dropout": 0.1,
        "encoder_pos_conv_kernel": 128,
        "encoder_pos_conv_groups": 16,
        "encoder_num_layers": 12,
        "encoder_num_heads": 12,
        "encoder_attention_dropout": 0.1,
        "encoder_ff_interm_features": 3072,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.1,
        "encoder_layer_drop": 0.05,
        "final_dim": 256,
    },
    "small": {
        **_COMMON,
        "extractor_conv_layer_config": _conv_config(64),
        "feature_grad_mult": 1.0,
        "encoder_embed_dim": 128,
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": 32,
        "encoder_pos_conv_groups": 8,
        "encoder_num_layers": 6,
        "encoder_num_heads": 4,
        "encoder_attention_dropout": 0.0,
        "encoder_ff_interm_features": 512,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_drop": 0.0,
        "final_dim": 64,
    },
    "tiny": {
        **_COMMON,
        "extractor_conv_layer_config": _conv_config(32),
        "encoder_embed_dim": 64,
        "encoder_projection_dropout": 0.0,
        "encoder_pos_conv_kernel": 16,
        "encoder_pos_conv_groups": 4,
        "encoder_num_layers": 4,
        "encoder_num_heads": 4,
        "encoder_attention_dropout": 0.0,
        "encoder_ff_interm_features": 128,
        "encoder_ff_interm_dropout": 0.0,
        "encoder_dropout": 0.0,
        "encoder_layer_drop": 0.0,
        "final_dim": 32,
    },
}


def model_args(preset: str, num_classes: int, overrides: dict[str, Any] | None = None) -> dict:
    """The full JSON-able kwargs of ``hubert_pretrain_model`` for a preset."""
    if preset not in PRESETS:
        raise ValueError(f"model preset {preset!r} unknown; choose from {sorted(PRESETS)}")
    args = {**PRESETS[preset], **(overrides or {}), "num_classes": int(num_classes)}
    unknown = sorted(set(args) - set(PRESETS["base"]) - {"num_classes"})
    if unknown:
        raise ValueError(f"unknown hubert_pretrain_model argument(s) {unknown} "
                         "in [model] overrides")
    if args["extractor_conv_layer_config"] is not None:
        args["extractor_conv_layer_config"] = [list(c) for c in args["extractor_conv_layer_config"]]
    return args


def build_model(args: dict[str, Any]) -> HuBERTPretrainModel:
    """``hubert_pretrain_model(**args)`` with conv configs turned back into tuples."""
    kw = dict(args)
    if kw.get("feature_grad_mult") == 1.0:  # no scaling; torchaudio accepts only (0, 1) or None
        kw["feature_grad_mult"] = None
    if kw.get("extractor_conv_layer_config") is not None:
        kw["extractor_conv_layer_config"] = [tuple(c) for c in kw["extractor_conv_layer_config"]]
    return hubert_pretrain_model(**kw)


def conv_stack(args: dict[str, Any]) -> ConvStack:
    """Kernels and strides of the model's conv stack (frame arithmetic shared with scoring)."""
    conv = args.get("extractor_conv_layer_config") or _conv_config(512)
    return ConvStack(tuple(int(k) for _, k, _ in conv), tuple(int(s) for _, _, s in conv))


def num_frames(args: dict[str, Any], n_samples: int) -> int:
    """Output frames of the conv stack for ``n_samples`` of audio (0 if too short)."""
    return conv_stack(args).num_frames(n_samples)


def receptive_field(args: dict[str, Any]) -> tuple[int, int]:
    """(receptive field, hop) in samples of the conv stack."""
    stack = conv_stack(args)
    return stack.receptive_field, stack.stride


def reset_prediction_head(model: HuBERTPretrainModel, num_classes: int, seed: int) -> None:
    """Re-initialise ``final_proj`` and ``label_embeddings`` (for ``num_classes`` classes).

    Cluster ids of a new k-means have no relation to the previous ones, so a model continued from
    the previous iteration keeps its encoder and mask embedding but gets a fresh head. Initialised
    as torchaudio does (uniform label embeddings, default ``nn.Linear``), from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    head = model.logit_generator
    final_dim = head.final_proj.out_features
    device = head.final_proj.weight.device
    emb = torch.rand(num_classes, final_dim, generator=gen)
    head.label_embeddings = torch.nn.Parameter(emb.to(device))
    fan_in = head.final_proj.in_features
    bound = 1.0 / fan_in**0.5
    with torch.no_grad():
        w = (torch.rand(head.final_proj.weight.shape, generator=gen) * 2 - 1) * bound
        head.final_proj.weight.copy_(w)
        head.final_proj.bias.copy_((torch.rand(final_dim, generator=gen) * 2 - 1) * bound)


def save_checkpoint(path: str | Path, args: dict[str, Any], state_dict: dict,
                    meta: dict[str, Any]) -> Path:
    """Write a ``layerprobe-hubert-v1`` checkpoint atomically (read by ``layerprobe.models``)."""
    cpu_state = {k: v.detach().cpu() for k, v in state_dict.items()}
    return save_native_checkpoint(path, args, cpu_state, meta)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu"
                    ) -> tuple[HuBERTPretrainModel, dict[str, Any], dict[str, Any]]:
    """(model in eval mode, model_args, meta) from a ``layerprobe-hubert-v1`` checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    payload = read_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    model = build_model(payload["model_args"])
    model.load_state_dict(payload["model"])
    return model.to(device).eval(), payload["model_args"], payload.get("meta", {})


# ---------------------------------------------------------------------------------------------
# the fast training step: torchaudio's modules (same parameter names), our own forward and loss

LOGIT_TEMPERATURE = 0.1  # torchaudio's (and fairseq's) logit_temp
MIN_MASKS = 2  # torchaudio's MaskGenerator and fairseq HuBERT: at least two spans per utterance
IGNORED = -100  # the target of unmasked frames in the step's cross-entropy


def span_mask(batch: int, frames: int, *, mask_prob: float, mask_length: int,
              host: torch.Generator, device_gen: torch.Generator,
              device: torch.device | str = "cpu", min_masks: int = MIN_MASKS) -> torch.Tensor:
    """HuBERT's span mask (fairseq ``compute_mask_indices``, static lengths, overlaps allowed,
    ``require_same_masks``) for an unpadded batch, drawn with torch on ``device``: [B, T] bool.

    ``num_mask = max(min_masks, int(mask_prob * T / mask_length + u))`` span starts per row are
    drawn without replacement from ``T - mask_length`` positions; spans cover ``mask_length``
    frames (cut at ``T``); every row then keeps a random subset of its masked frames of the size
    of the least-masked row. Only ``u`` is drawn on the host (``host``), so no device sync.
    """
    if batch < 1 or frames < 1 or mask_length < 1 or not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"span_mask: batch={batch}, frames={frames}, mask_length={mask_length}"
                         f", mask_prob={mask_prob}: all must be positive (mask_prob <= 1)")
    u = float(torch.rand((), generator=host))
    num_mask = max(min_masks, int(mask_prob * frames / float(mask_length) + u))
    min_len = mask_length
    if frames - min_len <= num_mask:
        min_len = frames - num_mask - 1
    starts_range = frames - min_len  # >= num_mask + 1
    order = torch.rand(batch, starts_range, generator=device_gen, device=device).argsort(dim=1)
    starts = order[:, :num_mask]  # a random choice without replacement per row
    positions = (starts[:, :, None] + torch.arange(mask_length, device=device)).reshape(batch, -1)
    mask = torch.zeros(batch, frames + mask_length, dtype=torch.bool, device=device)
    mask.scatter_(1, positions, True)
    mask = mask[:, :frames]
    keep = mask.sum(dim=1).min()
    scores = torch.where(mask, torch.rand(batch, frames, generator=device_gen, device=device),
                         torch.full((), 2.0, device=device))
    rank = scores.argsort(dim=1).argsort(dim=1)
    return mask & (rank < keep)


def layer_keep(num_layers: int, layer_drop: float, host: torch.Generator) -> list[bool]:
    """Which transformer blocks run this step (torchaudio: a block is skipped if u <= p)."""
    if layer_drop <= 0:
        return [True] * num_layers
    return (torch.rand(num_layers, generator=host) > layer_drop).tolist()


class PretrainStep(torch.nn.Module):
    """Masked-prediction loss of a ``HuBERTPretrainModel`` on an unpadded batch.

    The objective of torchaudio's forward + fairseq's criterion, computed without padding masks
    (the batch is cropped to equal lengths, so attention runs without a mask and SDPA may pick
    flash attention): conv features (gradient × ``feature_grad_mult``), feature penalty
    ``mean(features²)``, projection, mask embedding at ``mask``, positional conv, the blocks of
    ``keep`` (:func:`block_forward` on ``[B * T, D]`` frames), cosine-similarity logits / 0.1
    against the label embeddings (``[N, K]`` matmul, in float32), cross-entropy averaged over
    masked frames. Returns tensors only (no host sync):
    ``(loss, ce_masked, acc_masked, feature_pen)``.

    ``compile_blocks()`` compiles the conv stack and each block's :func:`block_forward` with
    ``torch.compile``; layer drop stays in Python between the compiled pieces. :meth:`use_eager`
    drops the compiled pieces.
    """

    def __init__(self, model: HuBERTPretrainModel, feature_penalty_weight: float):
        super().__init__()
        self.model = model
        self.feature_penalty_weight = float(feature_penalty_weight)
        self._compiled: dict[str, Any] = {}

    def compile_blocks(self, **options: Any) -> None:
        w2v = self.model.wav2vec2
        self._compiled = {"conv": torch.compile(w2v.feature_extractor, **options)}
        for i, block in enumerate(w2v.encoder.transformer.layers):
            self._compiled[f"block{i}"] = torch.compile(partial(block_forward, block), **options)

    def use_eager(self) -> None:
        self._compiled = {}

    @property
    def compiled(self) -> bool:
        return bool(self._compiled)

    def forward(self, waveforms: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                keep: list[bool] | None = None) -> tuple[torch.Tensor, ...]:
        from torchaudio.models.wav2vec2.components import GradMultiply

        if waveforms.dim() != 2 or labels.shape != mask.shape or labels.shape[0] != \
                waveforms.shape[0]:
            raise ValueError(f"PretrainStep: waveforms {tuple(waveforms.shape)}, labels "
                             f"{tuple(labels.shape)} and mask {tuple(mask.shape)} do not match")
        model, w2v = self.model, self.model.wav2vec2
        transformer = w2v.encoder.transformer
        conv = self._compiled.get("conv", w2v.feature_extractor)
        x, _ = conv(waveforms, None)
        if x.shape[1] != labels.shape[1]:
            raise ValueError(f"PretrainStep: {labels.shape[1]} label frames, the model gives "
                             f"{x.shape[1]}")
        mult = model.feature_grad_mult
        if mult is not None and mult < 1.0:
            x = GradMultiply.apply(x, mult)
        feature_pen = x.float().pow(2).mean()
        x = w2v.encoder.feature_projection(x)
        x = torch.where(mask[..., None], model.mask_generator.mask_embedding.to(x.dtype), x)
        x = x + positional_conv(x, transformer.pos_conv_embed)  # transformer._preprocess
        if transformer.layer_norm_first:
            x = transformer.layer_norm(x)
        x = transformer.dropout(x)
        keep = keep if keep is not None else [True] * len(transformer.layers)
        if len(keep) != len(transformer.layers):
            raise ValueError(f"PretrainStep: keep has {len(keep)} entries for "
                             f"{len(transformer.layers)} blocks")
        batch = x.shape[0]
        x = x.flatten(0, 1)  # [B * T, D]: the blocks' linears run on 2-D inputs
        for i, (block, run) in enumerate(zip(transformer.layers, keep, strict=True)):
            if run:
                compiled = self._compiled.get(f"block{i}")
                x = compiled(x, batch) if compiled else block_forward(block, x, batch)
        if not transformer.layer_norm_first:
            x = transformer.layer_norm(x)
        head = model.logit_generator
        proj = head.final_proj(x)
        with torch.autocast(proj.device.type, enabled=False):
            logits = masked_logits(proj.float(), head.label_embeddings.float())
            # unmasked frames get the ignored target: no weights to multiply in and out
            target = torch.where(mask.flatten(), labels.flatten(), IGNORED)
            n_masked = mask.sum().clamp(min=1)
            ce_masked = F.cross_entropy(logits, target, ignore_index=IGNORED,
                                        reduction="sum") / n_masked
            acc = (logits.detach().argmax(dim=-1) == target).sum() / n_masked
            loss = ce_masked + self.feature_penalty_weight * feature_pen
        return loss, ce_masked.detach(), acc, feature_pen.detach()


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)`` (L2) in five
    dispatched ops: torch's moves each of the ~200 per-tensor norms with ``.to(device)`` (one
    dispatch each, a tenth of the Base step's host ops). Parameters without a gradient are
    skipped; gradients on several devices or dtypes go to torch's function. Returns the total
    norm (a tensor: no host sync)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
    return total


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, True) if training and p > 0 else x


def block_forward(block: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """torchaudio's ``EncoderLayer`` forward (no mask) with its own weights, on frames flattened
    to ``[batch * T, D]``: one matmul over the concatenated q/k/v weights, one
    ``scaled_dot_product_attention``, 2-D linears (no reshapes around them), functional calls
    (no submodule calls), dropout only where p > 0 in training. Fewer dispatched ops, autograd
    nodes and Python calls than the module's forward; the same function and dropout placement."""
    attn, ff = block.attention, block.feed_forward
    n, d = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    if d != attn.embed_dim or n % batch:
        raise ValueError(f"block_forward: x {tuple(x.shape)} is not [batch={batch} * T, "
                         f"{attn.embed_dim}]")
    training = block.training
    norm1, norm2 = block.layer_norm, block.final_layer_norm

    def layer_norm(h: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
        return F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def feed_forward(h: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(h, ff.intermediate_dense.weight, ff.intermediate_dense.bias))
        h = _dropout(h, ff.intermediate_dropout.p, training)
        h = F.linear(h, ff.output_dense.weight, ff.output_dense.bias)
        return _dropout(h, ff.output_dropout.p, training)

    residual = x
    if block.layer_norm_first:
        x = layer_norm(x, norm1)
    weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    q, k, v = F.linear(x, weight, bias).view(batch, n // batch, 3, heads, head_dim) \
        .permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, head_dim]
    y = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if training else 0.0)
    y = F.linear(y.transpose(1, 2).reshape(n, d), attn.out_proj.weight, attn.out_proj.bias)
    x = residual + _dropout(y, block.dropout.p, training)
    if block.layer_norm_first:
        return x + feed_forward(layer_norm(x, norm2))
    x = layer_norm(x, norm1)
    return layer_norm(x + feed_forward(x), norm2)


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes the FFT libraries are fast at)."""
    best = 1 << max(n - 1, 0).bit_length()
    p3 = 1
    while p3 < best:
        p35 = p3
        while p35 < best:
            size = p35
            while size < n:
                size *= 2
            best = min(best, size)
            p35 *= 5
        p3 *= 3
    return best


def positional_conv(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """torchaudio's ``ConvolutionalPositionalEmbedding`` (grouped conv, 'same' padding, last
    frame dropped for an even kernel, GELU) with the convolution computed by FFT in float32:
    ``[B, T, D] → [B, T, D]``. cuDNN runs this grouped 128-tap conv at a few TFLOP/s (15-25 ms of
    a 41 ms Base step on an H200); as a product of spectra it is a small batched matmul."""
    conv = module.conv
    groups, k, pad = conv.groups, conv.kernel_size[0], conv.padding[0]
    b, t, d = x.shape
    c = d // groups
    n = _fft_size(t + k - 1)
    with torch.autocast(x.device.type, enabled=False):
        spec_x = torch.fft.rfft(x.float().transpose(1, 2).reshape(b, groups, c, t), n=n)
        weight = conv.weight.float().flip(-1).reshape(groups, c, c, k)  # [g, out, in, k]
        spec_w = torch.fft.rfft(weight, n=n)
        y = torch.fft.irfft(torch.einsum("bgcf,gocf->bgof", spec_x, spec_w), n=n)
        start = k - 1 - pad  # (x * reversed w)[t + k - 1 - pad] = sum_j w[j] x[t + j - pad]
        y = y[..., start:start + t].reshape(b, d, t) + conv.bias.float()[:, None]
        return F.gelu(y).transpose(1, 2)


def masked_logits(proj: torch.Tensor, label_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity / temperature of every frame with every class: [..., D], [K, D] → [..., K].

    Equals torchaudio's ``_compute_logits`` after dropping its duplicate target column (column 0
    holds the target's similarity and the target's own column is -inf, so the cross-entropy with
    target 0 there is the cross-entropy with the label here).
    """
    x = F.normalize(proj, dim=-1, eps=1e-8)
    e = F.normalize(label_embeddings, dim=-1, eps=1e-8)
    return x @ e.T / LOGIT_TEMPERATURE
