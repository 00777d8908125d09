"""A HuBERT-Base-size model scored on a CPU, as a researcher with a laptop would: memory and time.

The case: a randomly initialised HuBERT Base (transformers' default ``HubertConfig``, 13 states
of 768) scored with ``layerprobe score MODEL --data CORPUS --probe all --metric pwcca --metric
mi`` on ``--minutes`` of synthetic speech with a 600-word vocabulary (so the word probe has the
published 500-word one-hot targets; built once with festival into ``--cache``). Each command runs
in a fresh process, this tree's code and, with ``--baseline REV``, a git revision's (checked out
into a temporary worktree) in the same run, and the script prints per-stage seconds (read,
forward, statistics, CCA fits, MI), the peak resident memory, the fits / forward ratio, the
memory estimate the run printed, and how far the two revisions' scores are apart.

    python benchmarks/score_base_cpu.py --minutes 17 --baseline 3a1ffd9
    python benchmarks/score_base_cpu.py --minutes 17 --large          # 25 states of 1024
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LEXICON = Path("/usr/share/festival/dicts/cmu/cmudict-0.4.out")
SECONDS_PER_SENTENCE = 4.4  # kal_diphone reading 6-11 of these words (measured)


def vocabulary(size: int, seed: int) -> list[str]:
    """``size`` words of 3-8 letters from festival's CMU lexicon (seeded)."""
    if not LEXICON.is_file():
        raise SystemExit(f"{LEXICON} not found: install festlex-cmu "
                         "(scripts/install_synth_deps.sh)")
    entry = re.compile(r'^\("([a-z]{3,8})" ')
    words = sorted({m.group(1) for line in LEXICON.read_text(errors="replace").splitlines()
                    if (m := entry.match(line))})
    return random.Random(seed).sample(words, size)


def write_sentences(path: Path, n: int, seed: int = 0) -> None:
    """Sentences of 6-11 words drawn from a 600-word vocabulary with Zipf-like frequencies."""
    words = vocabulary(600, seed)
    weights = [1.0 / (rank + 10) for rank in range(len(words))]
    rng = random.Random(seed + 1)
    lines = [" ".join(rng.choices(words, weights, k=rng.randint(6, 11))).capitalize() + "."
             for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")


def corpus(cache: Path, minutes: float) -> Path:
    """The benchmark corpus (kal_diphone reading the sentences), built once."""
    out = cache / f"rich_vocab_{minutes:g}min"
    if (out / "synth.json").is_file():
        return out
    sentences = cache / f"rich_vocab_{minutes:g}min.txt"
    write_sentences(sentences, int(minutes * 60 / SECONDS_PER_SENTENCE))
    subprocess.run([sys.executable, "-m", "layerprobe", "synth", "--out", str(out), "--voices",
                    "kal_diphone", "--sentences", str(sentences), "--no-progress"], check=True)
    return out


def random_hubert(cache: Path, large: bool) -> Path:
    """A seeded random transformers HuBERT (Base: the default config; Large: 24 x 1024)."""
    out = cache / ("hubert_large_random" if large else "hubert_base_random")
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    config = HubertConfig() if not large else HubertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        do_stable_layer_norm=True, feat_extract_norm="layer")
    HubertModel(config).save_pretrained(out)
    return out


CHILD = r"""
import json, resource, sys, time
from layerprobe.cli import main
tic = time.time()
code = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"code": code, "wall": time.time() - tic, "peak_bytes": peak}))
"""


def score(source: Path, model: Path, data: Path, out: Path, extra: list[str]) -> dict:
    """One ``layerprobe score`` in a fresh process with ``source`` first on the path."""
    argv = ["score", str(model), "--data", str(data), "--probe", "all", "--metric", "pwcca",
            "--metric", "mi", "--out", str(out), "--no-progress", *extra]
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                          env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"})
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    record = json.loads(last) if last.startswith("{") else {"code": proc.returncode}
    record["stderr"] = proc.stderr
    record["memory_line"] = next((line for line in proc.stderr.splitlines()
                                  if "memory:" in line), "")
    if out.is_file():
        results = json.loads(out.read_text())["results"]
        record["timings"] = results[0]["meta"]["timings"]
        record["scores"] = {f"{r['probe']}/{r['metric']}": r["scores"] for r in results}
    return record


def report(name: str, r: dict) -> None:
    t = r.get("timings", {})
    fits = t.get("cca", float("nan"))
    forward = t.get("forward", float("nan"))
    print(f"{name}: exit {r.get('code')}, wall {r.get('wall', float('nan')):.0f} s, peak RSS "
          f"{r.get('peak_bytes', 0) / 1024**3:.2f} GB")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if v))
    print(f"  fits / forward: {fits / forward:.2f}")
    if r.get("memory_line"):
        print(f"  {r['memory_line'].strip()}")
    if r.get("code") not in (0, None):
        print("  " + r["stderr"][-1500:].replace("\n", "\n  "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=17.0)
    parser.add_argument("--baseline", help="a git revision to measure in the same run")
    parser.add_argument("--large", action="store_true", help="24 blocks of 1024 (HuBERT Large)")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, help="the new code's memory budget")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    data = corpus(args.cache, args.minutes)
    model = random_hubert(args.cache, args.large)
    extra = ["--threads", str(args.threads)]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            tree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree),
                            args.baseline], check=True, capture_output=True)
            try:
                runs[f"baseline {args.baseline}"] = score(tree, model, data,
                                                          Path(tmp) / "old.json", extra)
            finally:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False, capture_output=True)
        new_extra = extra + (["--memory-gb", str(args.memory_gb)] if args.memory_gb else [])
        runs["this tree"] = score(ROOT, model, data, Path(tmp) / "new.json", new_extra)
    print(f"{'HuBERT Large' if args.large else 'HuBERT Base'} (random), {args.minutes:g} min, "
          f"probes fbank/phone/word, pwcca + mi, {args.threads} threads")
    for name, r in runs.items():
        report(name, r)
    if len(runs) == 2:
        old, new = runs.values()
        worst = {k: max(abs(a - b) for a, b in zip(old["scores"][k], new["scores"][k],
                                                   strict=True))
                 for k in old.get("scores", {}) if k in new.get("scores", {})}
        print("largest |score difference| per probe/metric: "
              + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
        print(f"ratios this tree / baseline: peak RSS "
              f"{new['peak_bytes'] / old['peak_bytes']:.2f}, fits "
              f"{new['timings']['cca'] / old['timings']['cca']:.2f}, wall "
              f"{new['wall'] / old['wall']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
