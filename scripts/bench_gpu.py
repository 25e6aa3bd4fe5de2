"""GPT-2 124M through jaxdist on one GPU, next to torch.compile and hand-written JAX, one call.

Everything runs on the same card in the same call, each part in its own process, while the
time budget lasts; the JSON of figures is rewritten after every part, so a call cut short
still reports what it measured:

1. the yardstick, `scripts/gpu_baseline.py` (a copy of `shared/bench/gpu_baseline.py`):
   section C (PyTorch nanoGPT-style model, bf16 autocast, fused AdamW, torch.compile) and
   section B (the same model in hand-written JAX under one `jax.jit`), same batch and
   sequence as jaxdist;
2. jaxdist, as a user runs it: `python -m jaxdist.run gpt_lm model.size=gpt2
   model.vocab_size=50304 train.precision=bf16 data.tokens=FILE ...` through the real
   loader and prefetch, on a synthetic llm.c token file (`scripts/make_tokens.py`), once per
   lever (one change at a time from the first variant, or from the variant it names);
3. the first variant started again on its workdir: the resumed run's first step takes its
   compiled program from the persistent compilation cache;
4. `scripts/bench_step.py` (jaxdist's step vs a hand-written pmap loop, same MLP).

Tokens/s of a jaxdist run: the median over its log windows (the first, which compiles, is
left out) of steps/s x batch x 1024. MFU counts FLOPs as gpu_baseline.py does (nanoGPT's
6N + 12 L d T per token, N without the position embedding) against 989 TFLOP/s.

    python scripts/bench_gpu.py            # on the GPU machine: about 8 minutes
    python scripts/bench_gpu.py --only "cudnn, guard where" "cudnn, XLA flags"  # the rest
    python scripts/bench_gpu.py --smoke    # a CPU check of this script: tiny model, ~3 min

A call runs the yardstick, then as many variants as its budget allows, in the order below;
those it had no time for are listed as skipped, and `--only NAME ...` runs them in a
second call (with the yardstick again, so that every ratio is taken within one call).

Writes `$OUT/bench_gpu.json` (or `--out`; without either, one in a new temporary folder,
whose path it prints) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
import gpu_baseline  # noqa: E402  (the yardstick's own FLOP count)

# name, overrides, extra environment, the variant it changes (None: the first)
GPU_VARIANTS = [
    ("xla attention", [], {}, None),
    ("cudnn attention", ["model.attention=cudnn"], {}, "xla attention"),
    ("cudnn + chunked loss", ["model.attention=cudnn", "model.loss_chunk=2048"], {},
     "cudnn attention"),
    ("cudnn, shard_map", ["model.attention=cudnn", "parallel.backend=shard_map"], {},
     "cudnn attention"),
    ("cudnn, guard where", ["model.attention=cudnn", "train.skip_with=where"], {},
     "cudnn attention"),
    ("cudnn, guard off", ["model.attention=cudnn", "train.skip_nonfinite=false"], {},
     "cudnn attention"),
    ("cudnn, XLA flags", ["model.attention=cudnn"], {"XLA_FLAGS": (
        "--xla_gpu_enable_latency_hiding_scheduler=true "
        "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUDNN")}, "cudnn attention"),
    ("cudnn, prefetch 4", ["model.attention=cudnn", "loader.prefetch=4"], {},
     "cudnn attention"),
    ("cudnn, remat dots", ["model.attention=cudnn", "model.remat=dots"], {},
     "cudnn attention"),
    ("cudnn, saving every 50 steps", ["model.attention=cudnn", "train.checkpoint_every=50"],
     {}, "cudnn attention"),
    ("cudnn, batch 32", ["model.attention=cudnn", "train.batch_size=32"], {},
     "cudnn attention"),
]
SMOKE_VARIANTS = [
    ("xla attention", [], {}, None),
    ("chunked loss", ["model.loss_chunk=512"], {}, "xla attention"),
    ("shard_map", ["parallel.backend=shard_map"], {}, "xla attention"),
    ("guard where", ["train.skip_with=where"], {}, "xla attention"),
    ("remat dots", ["model.remat=dots"], {}, "xla attention"),
]
STEPS_PER_SEC = re.compile(r"^train step (\d+)/\d+ .*?([0-9.]+) steps/s", re.MULTILINE)
FIRST_STEP = re.compile(r"first step \(compiling included\) took ([0-9.]+) s"
                        r"(?:; compilation cache \S+: (\d+) program\(s\) reused, (\d+) compiled)?")
SAVED = re.compile(r"saved step_\d+: ([0-9.]+) s to copy it to the host, then ([0-9.]+) s to "
                   r"write it( in the background)?")
DEFAULT_CHECKPOINT_EVERY = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a quick CPU check: tiny model, no torch, fewer variants")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (16)")
    parser.add_argument("--steps", type=int, default=None, help="jaxdist steps per variant")
    parser.add_argument("--budget", type=float, default=470.0,
                        help="seconds for the whole call; parts not started in time are "
                             "skipped")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these jaxdist variants (by name)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default $OUT/bench_gpu.json, else one in a new temporary "
                             "folder)")
    return parser.parse_args()


class Budget:
    """Seconds left of the call."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds until the deadline."""
        return self.deadline - time.monotonic()


def run(command: list[str], timeout: float, env: dict[str, str] | None = None
        ) -> tuple[int, str, float]:
    """Run `command` from the repository root; (status, stdout + stderr, seconds)."""
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(timeout, 1), env={**os.environ, **(env or {})})
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        status = 124
        output = ((error.stdout or b"").decode() if isinstance(error.stdout, bytes)
                  else (error.stdout or "")) + "\n(timed out)"
    return status, output, time.monotonic() - started


def model_shape(smoke: bool, batch: int) -> SimpleNamespace:
    """The shape gpu_baseline.py counts FLOPs for, as jaxdist runs it."""
    size = gpu_baseline.SIZES["tiny" if smoke else "gpt2"]
    shape = SimpleNamespace(**size)
    shape.batch = batch
    shape.vocab = 512 if smoke else 50304
    return shape


def jaxdist_command(shape: SimpleNamespace, smoke: bool, tokens: Path, workdir: Path,
                    steps: int, overrides: list[str], cache: Path) -> list[str]:
    """The CLI call of one variant: the yardstick's optimizer (AdamW, no clipping)."""
    keys = {"model.size": "tiny" if smoke else "gpt2", "model.vocab_size": shape.vocab,
            "train.precision": "bf16", "train.batch_size": shape.batch,
            "train.steps": steps, "train.log_every": max(steps // 6, 1),
            "train.eval_every": 0, "data.tokens": tokens, "data.held_out": 0.005,
            "optimizer.name": "adamw", "optimizer.learning_rate": 6e-4,
            "optimizer.weight_decay": 0.1, "optimizer.schedule": "constant",
            "optimizer.warmup_steps": 0, "optimizer.clip_norm": 0}
    keys.update(override.split("=", 1) for override in overrides)
    return [sys.executable, "-m", "jaxdist.run", "gpt_lm",
            *(f"{key}={value}" for key, value in keys.items()),
            "--workdir", str(workdir), "--compilation-cache", str(cache)]


def variant_shape(shape: SimpleNamespace, overrides: list[str]) -> SimpleNamespace:
    """`shape` with the variant's own batch, if it sets one."""
    batch = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("train.batch_size=")]
    return SimpleNamespace(**{**vars(shape), "batch": batch[-1] if batch else shape.batch})


def summarize_run(output: str, shape: SimpleNamespace) -> dict:
    """Tokens/s, MFU, first step and checkpoint seconds from a jaxdist run's console."""
    windows = [float(rate) for _, rate in STEPS_PER_SEC.findall(output)]
    figures: dict = {"steps_per_s_windows": windows}
    if len(windows) >= 2:
        steps_per_s = statistics.median(windows[1:])
        tokens = steps_per_s * shape.batch * shape.seq
        flops = gpu_baseline.flops_per_token(shape) * tokens
        figures.update(steps_per_s=steps_per_s, tokens_per_s=tokens,
                       mfu=flops / gpu_baseline.PEAK_FLOPS)
    first = FIRST_STEP.search(output)
    if first:
        figures["first_step_s"] = float(first[1])
        if first[2] is not None:
            figures["programs_reused"], figures["programs_compiled"] = int(first[2]), int(
                first[3])
    saved = SAVED.findall(output)
    if saved:
        copy, write, background = saved[-1]
        figures.update(checkpoint_copy_s=float(copy), checkpoint_write_s=float(write),
                       checkpoint_background=bool(background))
        if "steps_per_s" in figures:
            # The training time a save costs at the default train.checkpoint_every: the
            # copy to the host, plus the write unless it overlaps training.
            blocking = float(copy) + (0.0 if background else float(write))
            training = DEFAULT_CHECKPOINT_EVERY / figures["steps_per_s"]
            figures["checkpoint_share"] = blocking / (training + blocking)
    return figures


def baseline(smoke: bool, batch: int, out_dir: Path, budget: Budget) -> dict:
    """gpu_baseline.py's sections C and B (B alone in a smoke run), same batch."""
    sections = ["B"] if smoke else ["C", "B"]
    path = out_dir / "gpu_baseline.json"
    seconds = min(budget.left(), 330.0)
    status, output, _ = run([sys.executable, str(SCRIPTS / "gpu_baseline.py"), "--size",
                             "tiny" if smoke else "gpt2", "--batch", str(batch), "--only",
                             *sections, "--out", str(path), "--deadline", str(seconds - 10)],
                            seconds)
    records = json.loads(path.read_text()) if path.exists() else []
    found = {}
    for record in records if isinstance(records, list) else records.get("records", []):
        if record.get("section") in sections and "tokens_per_s" in record:
            found[record["section"]] = {k: record[k] for k in (
                "tokens_per_s", "mfu", "step_ms_median", "first_call_s", "compile_s", "attn")
                if k in record}
    return {"status": status, "sections": found, "tail": output[-1500:]}


def card_name() -> str:
    """The accelerator as nvidia-smi (or the CPU) names it."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "CPU"


def print_table(report: dict) -> None:
    torch = report["baseline"]["sections"].get("C", {}).get("tokens_per_s")
    hand = report["baseline"]["sections"].get("B", {}).get("tokens_per_s")
    print(f"\n{report['card']}, {report['date']}, batch {report['batch']} x {report['seq']}")
    for name, key in (("torch.compile (C)", "C"), ("hand-written JAX jit (B)", "B")):
        rec = report["baseline"]["sections"].get(key)
        if rec:
            print(f"  {name:28s} {rec['tokens_per_s']:12,.0f} tokens/s  "
                  f"MFU {rec.get('mfu', float('nan')):.1%}")
    for v in report["variants"]:
        if "tokens_per_s" not in v:
            print(f"  {v['name']:28s} failed or cut short (status {v['status']})")
            continue
        ratios = []
        if torch:
            ratios.append(f"{v['tokens_per_s'] / torch:.3f}x torch")
        if hand:
            ratios.append(f"{v['tokens_per_s'] / hand:.3f}x hand-written")
        if v.get("batch") != report["batch"]:
            ratios = [f"(batch {v['batch']}: not comparable)"]
        print(f"  {v['name']:28s} {v['tokens_per_s']:12,.0f} tokens/s  MFU {v['mfu']:.1%}  "
              f"{'  '.join(ratios)}  first step {v.get('first_step_s', float('nan')):.1f} s"
              + (f"  checkpoint {v['checkpoint_share']:.2%} of training"
                 if "checkpoint_share" in v else ""))
    second = report.get("second_start")
    if second:
        print(f"  second start (resumed): first step {second.get('first_step_s')} s, "
              f"{second.get('programs_reused')} program(s) from the compilation cache")


def default_out(environ: dict[str, str]) -> Path:
    """`$OUT/bench_gpu.json`, or (no $OUT) one in a new temporary folder, never the checkout."""
    folder = environ.get("OUT") or tempfile.mkdtemp(prefix="bench_gpu-out-")
    return Path(folder) / "bench_gpu.json"


def main() -> None:
    args = parse_args()
    budget = Budget(args.budget)
    batch = args.batch or (4 if args.smoke else 16)
    steps = args.steps or (60 if args.smoke else 180)
    out = Path(args.out) if args.out else default_out(os.environ)
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = model_shape(args.smoke, batch)
    work = Path(tempfile.mkdtemp(prefix="bench_gpu-"))
    report = {"card": card_name(), "date": datetime.date.today().isoformat(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "batch": batch,
              "seq": shape.seq, "steps": steps, "variants": []}

    def save() -> None:
        out.write_text(json.dumps(report, indent=1) + "\n")

    tokens = work / "tokens.bin"
    status, output, _ = run([sys.executable, str(SCRIPTS / "make_tokens.py"), str(tokens),
                             "--tokens", str(2_000_000 if args.smoke else 20_000_000),
                             "--vocab", str(min(shape.vocab, 50257)), "--format", "llmc"], 120)
    if status:
        raise SystemExit(f"make_tokens.py failed:\n{output[-2000:]}")

    report["baseline"] = baseline(args.smoke, batch, out.parent, budget)
    save()
    cache = work / "xla-cache"
    variants = SMOKE_VARIANTS if args.smoke else GPU_VARIANTS
    for name, overrides, env, base in variants:
        if args.only is not None and name not in args.only:
            continue
        if budget.left() < 60:
            report["variants"].append({"name": name, "status": "skipped: out of time"})
            continue
        workdir = work / f"run-{len(report['variants'])}"
        command = jaxdist_command(shape, args.smoke, tokens, workdir, steps, overrides, cache)
        status, output, seconds = run(command, min(budget.left() - 20, 200), env)
        own = variant_shape(shape, overrides)
        record = {"name": name, "changes": base, "overrides": overrides, "env": env,
                  "batch": own.batch, "status": status, "seconds": round(seconds, 1),
                  **summarize_run(output, own)}
        if status:
            record["tail"] = output[-1500:]
        report["variants"].append(record)
        save()
        if base is None and status == 0 and budget.left() > 60:
            again = jaxdist_command(shape, args.smoke, tokens, workdir, steps + 20, overrides,
                                    cache)
            status, output, _ = run(again, min(budget.left() - 20, 150), env)
            report["second_start"] = {"status": status, **summarize_run(output, shape)}
            save()
    if budget.left() > 40:
        status, output, _ = run([sys.executable, str(SCRIPTS / "bench_step.py"), "--windows",
                                 "11"], min(budget.left() - 10, 120))
        report["bench_step"] = {"status": status, "output": output[-2500:]}
        save()
    print_table(report)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
