"""Write tiny checkpoints with genuine fairseq 0.12.2, and fairseq's own per-layer outputs.

The files land in ``tests/fixtures/fairseq/`` and are read by ``tests/test_fairseq_real.py``
(the tests never import fairseq). Each checkpoint is built through fairseq's own command-line
parser, config dataclasses, task and model classes, saved in the dict layout fairseq's trainer
writes, then loaded back by fairseq itself (``checkpoint_utils.load_model_ensemble_and_task``);
the reference outputs come from that reloaded model.

Fixtures (2 transformer blocks, dim 32, 2 heads, a 4-layer conv stack of stride 40):

* ``hubert_base_gn.pt``: HuBERT, group-norm extractor, post-LN, ``normalize=false``, ``cfg`` as
  an omegaconf DictConfig (the form of released files);
* ``wav2vec2_large_ln.pt``: wav2vec 2.0, layer-norm extractor, pre-LN, ``normalize=true``,
  ``cfg`` as the plain dict fairseq 0.12's trainer writes;
* ``wav2vec2_legacy_args.pt``: wav2vec 2.0 base style with only a legacy argparse ``args``;
* ``hubert_ctc_ft.pt``: a HuBERT CTC fine-tune as fairseq 0.12's trainer saves it:
  ``cfg.model.w2v_args=None``, ``w2v_path="hubert_base_gn.pt"`` (fairseq resolves it against the
  working directory; the fixtures are built and loaded from inside the output folder). Its weights
  are the pretrained ones moved a little, as fine-tuning would.

Waveforms (float32 .npy, 16 kHz): ``wav_loud.npy`` (RMS 0.1, 4000 samples, DC offset 0.01) and
``wav_quiet.npy`` (RMS 0.003, 3200 samples). For each checkpoint ``C`` and waveform ``W``:

* ``C__W.npy``: ``[L+1, T, D]``, state 0 = the input of block 1 (pre-hook), state i =
  ``layer_results[i-1][0]`` of fairseq's ``TransformerEncoder``;
* ``C__W__default.npy``: ``[T, D]``, fairseq's default ``extract_features`` output (pre-LN
  models: after the encoder's final LayerNorm).

The waveform is preprocessed as fairseq's datasets do: ``F.layer_norm(wav, wav.shape)`` when the
checkpoint's ``task.normalize`` is true, nothing otherwise.

How to run (Python 3.10; not part of CI)::

    ~/.pyenv/versions/3.10.13/bin/python -m venv /work/fairseq-venv
    /work/fairseq-venv/bin/pip install wheel torch==2.1.2 torchaudio==2.1.2 numpy==1.26.4 \\
        hydra-core==1.0.7 omegaconf==2.0.6 cython bitarray sacrebleu regex tqdm cffi scipy
    /work/fairseq-venv/bin/pip download --no-deps --no-binary :all: --no-build-isolation \\
        fairseq==0.12.2 && tar xzf fairseq-0.12.2.tar.gz
    # the sdist lacks fairseq/clib/libbase/balanced_assignment.cpp and libnat/edit_dist.cpp:
    # delete the two cpp_extension.CppExtension blocks (fairseq.libbase, fairseq.libnat and
    # alignment_train_cpu_binding) from fairseq-0.12.2/setup.py, then
    /work/fairseq-venv/bin/pip install --no-build-isolation --no-deps ./fairseq-0.12.2
    /work/fairseq-venv/bin/python scripts/make_fairseq_fixtures.py --out tests/fixtures/fairseq
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

SEED = 1234
TINY = ["--encoder-layers", "2", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--conv-pos", "8", "--conv-pos-groups", "4",
        "--final-dim", "8"]


def conv_layers(dim: int) -> str:
    return f"[({dim}, 10, 5)] + [({dim}, 3, 2)] * 2 + [({dim}, 2, 2)]"


def parse(command_line: list[str]) -> argparse.Namespace:
    """fairseq-train's own parser: the full legacy Namespace of a training run."""
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, input_args=command_line)


def data_dir(root: Path) -> Path:
    """Label dictionaries the tasks read (HuBERT targets and CTC letters, both 'ltr')."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dict.ltr.txt").write_text("".join(f"{c} 1\n" for c in "ABCDE|"))
    return root


def randomise(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Move every parameter (norms included, which fairseq initialises to identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def trainer_payload(cfg, model: torch.nn.Module, *, cfg_form: str) -> dict:
    """The dict fairseq 0.12's Trainer.state_dict() writes, with ``cfg`` in the chosen form."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    payload = {
        "args": None,
        "cfg": container if cfg_form == "dict" else OmegaConf.create(container),
        "model": model.state_dict(),
        "criterion": None,
        "optimizer_history": [{"criterion_name": "HubertCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": None}, "num_updates": 10}],
        "task_state": {},
        "extra_state": {"metrics": {}, "previous_training_time": 1.0},
    }
    return payload


def build(args: argparse.Namespace, seed: int):
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(seed)
    model = task.build_model(cfg.model)
    randomise(model, 0.05, seed)
    return cfg, model.eval()


def core_of(model: torch.nn.Module) -> torch.nn.Module:
    """The HubertModel / Wav2Vec2Model inside a pretrained or CTC fine-tuned fairseq model."""
    return model.w2v_encoder.w2v_model if hasattr(model, "w2v_encoder") else model


@torch.no_grad()
def fairseq_outputs(model: torch.nn.Module, wav: np.ndarray, normalize: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(states [L+1, T, D], default extract_features output [T, D]) as fairseq computes them."""
    core = core_of(model)
    source = torch.from_numpy(wav).float()
    if normalize:  # fairseq/data/audio/raw_audio_dataset.py postprocess()
        source = F.layer_norm(source, source.shape)
    captured: dict[str, object] = {}
    pre = core.encoder.layers[0].register_forward_pre_hook(
        lambda mod, inputs: captured.__setitem__("input", inputs[0].detach().clone()))
    post = core.encoder.register_forward_hook(
        lambda mod, inputs, output: captured.__setitem__("layer_results", output[1]))
    try:
        if hasattr(core, "label_embs_concat"):  # HubertModel
            default, _ = core.extract_features(source[None], padding_mask=None, mask=False)
        else:
            default = core.extract_features(source[None], padding_mask=None, mask=False)["x"]
    finally:
        pre.remove()
        post.remove()
    states = [captured["input"]] + [r[0] for r in captured["layer_results"]]  # T x B x C
    stacked = torch.stack([s[:, 0] for s in states]).numpy().astype(np.float32)
    return stacked, default[0].numpy().astype(np.float32)


def waveforms() -> dict[str, np.ndarray]:
    g = np.random.default_rng(SEED)
    t = np.arange(4000) / 16000.0
    loud = (np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.5 * np.sin(2 * np.pi * 1250 * t) + 0.3 * g.standard_normal(t.shape))
    loud = 0.1 * loud / np.sqrt(np.mean(loud ** 2)) + 0.01
    t = np.arange(3200) / 16000.0
    quiet = np.sin(2 * np.pi * 180 * t) + 0.4 * g.standard_normal(t.shape)
    quiet = 0.003 * quiet / np.sqrt(np.mean(quiet ** 2))
    return {"loud": loud.astype(np.float32), "quiet": quiet.astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/fairseq"))
    out = parser.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="fairseq-fixtures-"))
    data = str(data_dir(tmp / "data"))
    os.chdir(out)  # w2v_path is stored relative, and fairseq resolves it from here

    hubert_cmd = [data, "--task", "hubert_pretraining", "--labels", "['ltr']",
                  "--label-rate", "400", "--arch", "hubert", *TINY,
                  "--conv-feature-layers", conv_layers(24), "--extractor-mode", "default"]
    w2v_large_cmd = [data, "--task", "audio_pretraining", "--normalize", "--arch", "wav2vec2",
                     *TINY, "--conv-feature-layers", conv_layers(32), "--conv-bias",
                     "--extractor-mode", "layer_norm", "--layer-norm-first", "--latent-vars", "4",
                     "--latent-groups", "2", "--latent-dim", "8"]
    w2v_base_cmd = [data, "--task", "audio_pretraining", "--arch", "wav2vec2", *TINY,
                    "--conv-feature-layers", conv_layers(16), "--extractor-mode", "default",
                    "--latent-vars", "4", "--latent-groups", "2", "--latent-dim", "8"]
    ctc_cmd = [data, "--task", "audio_finetuning", "--labels", "ltr", "--arch", "hubert_ctc",
               "--w2v-path", "hubert_base_gn.pt"]

    written: dict[str, bool] = {}  # checkpoint -> task.normalize
    cfg, model = build(parse(hubert_cmd), SEED)
    torch.save(trainer_payload(cfg, model, cfg_form="dictconfig"), "hubert_base_gn.pt")
    written["hubert_base_gn"] = False

    cfg, model = build(parse(w2v_large_cmd), SEED + 1)
    torch.save(trainer_payload(cfg, model, cfg_form="dict"), "wav2vec2_large_ln.pt")
    written["wav2vec2_large_ln"] = True

    legacy_args = parse(w2v_base_cmd)
    _, model = build(copy.deepcopy(legacy_args), SEED + 2)
    legacy = {"args": legacy_args, "model": model.state_dict(),
              "optimizer_history": [{"criterion_name": "Wav2vecCriterion",
                                     "optimizer_name": "FairseqAdam",
                                     "lr_scheduler_state": {"best": None}, "num_updates": 10}],
              "extra_state": {"epoch": 1}}
    torch.save(legacy, "wav2vec2_legacy_args.pt")
    written["wav2vec2_legacy_args"] = False

    ctc_args = parse(ctc_cmd)
    cfg, model = build(ctc_args, SEED + 3)  # reads hubert_base_gn.pt through w2v_path
    randomise(model, 0.02, SEED + 4)  # fine-tuning moves the weights
    saved_cfg = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    saved_cfg["model"]["w2v_args"] = None  # as fairseq 0.12.2's trainer leaves it
    payload = trainer_payload(cfg, model, cfg_form="dict")
    payload["cfg"] = saved_cfg
    torch.save(payload, "hubert_ctc_ft.pt")
    written["hubert_ctc_ft"] = False

    wavs = waveforms()
    for name, wav in wavs.items():
        np.save(f"wav_{name}.npy", wav)
    for ckpt, normalize in written.items():
        # fairseq itself reads the file back; the references come from that model
        models, loaded_cfg, _ = checkpoint_utils.load_model_ensemble_and_task(
            [f"{ckpt}.pt"], arg_overrides={"data": data})
        fairseq_model = models[0].eval()
        assert bool(loaded_cfg.task.normalize) == normalize, ckpt
        if ckpt == "hubert_ctc_ft":
            assert loaded_cfg.model.w2v_args is None or "w2v_args" in loaded_cfg.model
        for name, wav in wavs.items():
            states, default = fairseq_outputs(fairseq_model, wav, normalize)
            np.save(f"{ckpt}__{name}.npy", states)
            np.save(f"{ckpt}__{name}__default.npy", default)
        print(f"{ckpt}: states {states.shape}, {os.path.getsize(f'{ckpt}.pt')} bytes")


if __name__ == "__main__":
    main()
