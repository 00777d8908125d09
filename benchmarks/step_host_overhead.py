"""Host work of one HuBERT pretraining step: the step of a git revision against this tree's.

The Base preset's depth and structure (12 blocks, 12 heads, layer drop, post-norm, 128-tap
positional conv, the conv stack's 7 layers) at a tiny width (embedding 96, feed-forward 192, conv
channels 32, final dim 32) on short audio, so compute is negligible and a step costs what the
host spends dispatching it. For each step it prints, per phase (forward with mask drawing,
backward, clipping + optimizer) the aten ops of torch.profiler: top-level (called from Python
or the autograd engine, not from inside another aten op: the dispatches the host pays for on any
device), all (composite ops' insides included) and leaf (no aten op inside: a proxy for kernels;
on the CPU, foreach and fused optimizer ops fall back to per-tensor loops that a GPU runs as a
few kernels, so the optimizer's all/leaf counts overstate a GPU's), the autograd nodes of the
loss, and CPU ms/step (median over rounds that interleave the steps, so load on a shared machine
hits both alike). ``--preset-width`` uses the
Base width instead (to check that compute did not get slower).

    python benchmarks/step_host_overhead.py                       # baseline: git HEAD
    python benchmarks/step_host_overhead.py --baseline ca5820d --rounds 20
    python benchmarks/step_host_overhead.py --preset-width --batch 1 --seconds 2 --rounds 3
    python benchmarks/step_host_overhead.py --preset-width --block --seconds 2 --rounds 40
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib.util
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import ModuleType

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import make_step  # noqa: E402

import pretraining.model  # noqa: E402

PHASES = ("forward", "backward", "optimizer")
TINY_WIDTH = {"encoder_embed_dim": 96, "encoder_ff_interm_features": 192, "final_dim": 32,
              "extractor_conv_layer_config": [[32, k, s] for k, s in
                                              pretraining.model.CONV_STRIDES]}


def module_at(revision: str) -> ModuleType:
    """``pretraining/model.py`` as it was at a git revision, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:pretraining/model.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"model_at_{revision.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def autograd_nodes(loss: torch.Tensor) -> int:
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(fn for fn, _ in node.next_functions)
    return len(seen)


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def python_calls(step) -> int:
    """Python function calls (cProfile's count, builtins included) of one step."""
    prof = cProfile.Profile()
    prof.enable()
    step()
    prof.disable()
    return pstats.Stats(prof).total_calls


def count_ops(step) -> tuple[dict[str, tuple[int, int]], int, Counter]:
    """({phase: (top-level, all, leaf aten ops)}, autograd nodes, top-level op names) of a step."""
    counts: dict[str, tuple[int, int, int]] = {}
    names: Counter = Counter()

    @contextlib.contextmanager
    def phase(name: str):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        aten = [e for e in prof.events() if e.name.startswith("aten::")]
        top = [e for e in aten if not _inside_aten(e)]
        leaves = [e for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children)]
        counts[name] = (len(top), len(aten), len(leaves))
        names.update(f"{name}: {e.name}" for e in top)

    loss = step(phase)
    return counts, autograd_nodes(loss), names


def compare_block(overrides: dict, frames: int, rounds: int, *, batch: int = 1,
                  n_blocks: int = 1, device: torch.device | None = None,
                  bf16: bool = False) -> None:
    """ms of ``n_blocks`` blocks' forward + backward (train mode): torchaudio's ``EncoderLayer``
    against :func:`pretraining.model.block_forward`, interleaved, medians; on CUDA (synchronised),
    optionally under bf16 autocast as the training step runs them."""
    device = device or torch.device("cpu")
    args = pretraining.model.model_args("base", 10,
                                        {**overrides, "encoder_num_layers": n_blocks})
    torch.manual_seed(0)
    blocks = pretraining.model.build_model(args).wav2vec2.encoder.transformer.layers
    blocks = blocks.to(device).train()
    x = torch.randn(batch, frames, args["encoder_embed_dim"], device=device, requires_grad=True)

    def torchaudio_blocks() -> torch.Tensor:
        h = x
        for block in blocks:
            h = block(h, None)[0]
        return h

    def our_blocks() -> torch.Tensor:
        h = x.flatten(0, 1)
        for block in blocks:
            h = pretraining.model.block_forward(block, h, batch)
        return h

    kinds = {"torchaudio block": torchaudio_blocks, "block_forward": our_blocks}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for round_ in range(rounds + 2):
        for name, run in kinds.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = run()
            out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= 2:  # 2 warm-up rounds
                times[name].append(time.perf_counter() - tic)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"{n_blocks} block(s) fwd+bwd, {batch} x {frames} frames, train mode, {device}"
          f"{', bf16 autocast' if bf16 else ''}: "
          + ", ".join(f"{name} {v:.2f} ms" for name, v in ms.items())
          + f"; ratio {ms['block_forward'] / ms['torchaudio block']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision of the current step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset-width", action="store_true", help="Base width, not tiny")
    parser.add_argument("--top", type=int, default=0,
                        help="print the most frequent top-level ops")
    parser.add_argument("--block", action="store_true",
                        help="only --n-blocks blocks' forward + backward: torchaudio's vs ours")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast (on the CPU), to count the casts it adds as on CUDA")
    parser.add_argument("--n-blocks", type=int, default=1, help="blocks timed by --block")
    parser.add_argument("--device", default="cpu", help="device of --block (cpu or cuda)")
    parser.add_argument("--no-attention-dropout", action="store_true",
                        help="attention dropout 0, so that SDPA on the CPU takes its fused kernel "
                             "as CUDA's flash attention does with dropout (math path otherwise)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    overrides = {} if a.preset_width else dict(TINY_WIDTH)
    if a.no_attention_dropout:
        overrides["encoder_attention_dropout"] = 0.0
    if a.block:
        frames = pretraining.model.num_frames(pretraining.model.model_args("base", 10),
                                              int(a.seconds * 16_000))
        compare_block(overrides, frames, a.rounds, batch=a.batch, n_blocks=a.n_blocks,
                      device=torch.device(a.device), bf16=a.bf16)
        return
    if a.device != "cpu":
        raise SystemExit("--device cuda is for --block (the op counts are the host's)")
    impls = {f"baseline ({a.baseline})": module_at(a.baseline), "this tree": pretraining.model}
    print(f"torch {torch.__version__}, CPU {a.threads} thread(s); base depth, "
          f"{'base' if a.preset_width else 'tiny'} width, batch {a.batch} x {a.seconds:g} s"
          + (", attention dropout 0" if a.no_attention_dropout else "")
          + (", bf16 autocast" if a.bf16 else ""))
    steps = {}
    for name, impl in impls.items():
        steps[name] = make_step("base", "new", batch=a.batch, seconds=a.seconds, device=device,
                                bf16=a.bf16, overrides=overrides, impl=impl)
        steps[name]()  # warm-up
        steps[name]()
    totals, calls = {}, {}
    for name, step in steps.items():
        counts, nodes, names = count_ops(step)
        totals[name] = tuple(sum(c[i] for c in counts.values()) for i in range(3))
        parts = ", ".join(f"{p} {'/'.join(map(str, counts[p]))}" for p in PHASES)
        calls[name] = python_calls(step)
        print(f"{name:<22} aten ops (top-level/all/leaf): {parts}; total "
              f"{'/'.join(map(str, totals[name]))}; autograd nodes {nodes}; "
              f"Python calls {calls[name]}")
        for op, n in names.most_common(a.top):
            print(f"    {n:5d}  {op}")
    times: dict[str, dict[str, list[float]]] = {name: {p: [] for p in ("step", *PHASES)}
                                                for name in steps}
    for _ in range(a.rounds):
        for name, step in steps.items():

            @contextlib.contextmanager
            def timed(phase: str, into=times[name]):
                tic = time.perf_counter()
                yield
                into[phase].append(time.perf_counter() - tic)

            with timed("step"):
                step(timed)
    ms = {name: {p: statistics.median(t) * 1e3 for p, t in ts.items()}
          for name, ts in times.items()}
    for name in steps:
        print(f"{name:<22} {ms[name]['step']:8.2f} ms/step ("
              + ", ".join(f"{p} {ms[name][p]:.2f}" for p in PHASES)
              + f"; medians of {a.rounds} interleaved rounds)")
    base, ours = list(steps)
    print("ratio this tree / baseline: " + ", ".join(
        f"{kind} aten ops {totals[ours][i] / totals[base][i]:.3f}"
        for i, kind in enumerate(("top-level", "all", "leaf"))) +
        f", Python calls {calls[ours] / calls[base]:.3f}" +
        f", ms/step {ms[ours]['step'] / ms[base]['step']:.3f}")


if __name__ == "__main__":
    main()
