"""The convolutions of a HuBERT-Base training step, one at a time, on CUDA (bf16 autocast).

Times forward + backward of each conv layer of the feature extractor and of the positional conv
at the step's shapes (``--batch`` x ``--seconds``), with cuDNN's heuristic algorithm choice and
with ``torch.backends.cudnn.benchmark`` (autotuned per shape; the cost of tuning a new shape is
printed), and against the other forms: the first layer (one input channel) as an unfold +
matmul, the positional conv module (grouped, kernel 128, on the step's ``[B, T, D]`` layout) as
``pretraining.model.positional_conv`` (FFT). Prints ms per layer and the sums.

    python benchmarks/conv_kernels.py [--batch 8 --seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pretraining.model import build_model, model_args, positional_conv


def timed(fn, steps: int = 10) -> float:
    """Median ms of ``fn`` (forward + backward) after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def fwd_bwd(forward, x: torch.Tensor):
    x = x.detach().requires_grad_(True)

    def run() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = forward(x)
        y.float().sum().backward()

    return run


def first_layer_matmul(conv: torch.nn.Conv1d):
    """Conv1d(1, C, k, stride s) as frames x weights: [B, 1, N] → [B, C, T]."""
    k, s = conv.kernel_size[0], conv.stride[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        frames = x[:, 0].unfold(-1, k, s)  # [B, T, k] (a view)
        return (frames @ conv.weight[:, 0].T).transpose(1, 2)

    return forward


def positional_fft(module: torch.nn.Module):
    """The positional conv module's forward by FFT: [B, T, D] → [B, T, D]."""
    return lambda x: positional_conv(x, module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    a = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(model_args("base", 500)).to(device)
    convs = [block.conv for block in model.wav2vec2.feature_extractor.conv_layers]
    pos = model.wav2vec2.encoder.transformer.pos_conv_embed
    n = int(a.seconds * 16_000)
    inputs = [torch.randn(a.batch, 1, n, device=device)]
    with torch.no_grad():
        for conv in convs[:-1]:
            inputs.append(torch.randn_like(conv(inputs[-1])))
        frames = convs[-1](inputs[-1]).shape[-1]
    pos_in = torch.randn(a.batch, frames, 768, device=device)
    cases = {f"conv{i}": (conv, x) for i, (conv, x) in enumerate(zip(convs, inputs, strict=True))}
    cases["pos_conv"] = (pos, pos_in)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; batch {a.batch} x "
          f"{a.seconds:g} s; forward + backward, bf16 autocast, ms (median of 10)")
    print(f"{'layer':<9} {'shape in':<20} {'heuristic':>10} {'benchmark':>10} {'tune new':>9} "
          f"{'other':>8}")
    totals = {"heuristic": 0.0, "benchmark": 0.0, "matmul": 0.0}
    for name, (conv, x) in cases.items():
        torch.backends.cudnn.benchmark = False
        heuristic = timed(fwd_bwd(conv, x))
        torch.backends.cudnn.benchmark = True
        shape = list(x.shape)
        shape[1 if name == "pos_conv" else -1] += 7  # another length: a shape to tune
        other = torch.randn(*shape, device=device)
        start = time.perf_counter()
        fwd_bwd(conv, other)()
        torch.cuda.synchronize()
        tune = 1e3 * (time.perf_counter() - start)
        bench = timed(fwd_bwd(conv, x))
        torch.backends.cudnn.benchmark = False
        alt = {"conv0": first_layer_matmul,
               "pos_conv": positional_fft}.get(name)
        matmul = float("nan")
        if alt is not None:
            forward = alt(conv)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                ref, got = conv(x), forward(x)
                err = float((got.float() - ref.float()).norm() / ref.float().norm())
            matmul = timed(fwd_bwd(forward, x))
            totals["matmul"] += matmul
            name = f"{name}*"
            print(f"  ({name} other form: relative difference to the module {err:.1e})")
        else:
            totals["matmul"] += bench
        totals["heuristic"] += heuristic
        totals["benchmark"] += bench
        print(f"{name:<9} {str(tuple(x.shape)):<20} {heuristic:>10.2f} {bench:>10.2f} "
              f"{tune:>9.1f} {matmul:>8.2f}")
    print(f"{'total':<30} {totals['heuristic']:>10.2f} {totals['benchmark']:>10.2f} "
          f"{'':>9} {totals['matmul']:>8.2f}  (* the other form; others: benchmark)")


if __name__ == "__main__":
    main()
