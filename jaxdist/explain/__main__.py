"""`python -m jaxdist.explain WORKDIR`: attributions of a trained run's predictions.

Restores the workdir's newest (or `--checkpoint best`) checkpoint through the experiment
its `config.json` names, explains the first `--examples` examples of a split on every
device, and writes `WORKDIR/explain/attributions.npz` (inputs, attributions, predictions,
targets, scores, the method and its settings) and `WORKDIR/explain/attributions.png`.
Exit status 0, or 2 with one line for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from jaxdist.base.cli import OneLineParser, print_paths
from jaxdist.base.errors import UserError, at_least
from jaxdist.base.files import output_folder, replace_inside
from jaxdist.explain import (
    METHODS,
    RULES,
    Method,
    check_baseline,
    explain,
    features_shape,
    mean_features,
)

MEAN_ROWS = 2048  # training rows averaged for the "mean" baseline


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = OneLineParser(prog="python -m jaxdist.explain",
                            description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("workdir", type=Path, help="the --workdir of a jaxdist run")
    parser.add_argument("--examples", type=int, default=8, metavar="N",
                        help="explain the first N examples of the split (default: 8)")
    parser.add_argument("--method", default="ig", help=f"{' | '.join(METHODS)} (default: ig)")
    parser.add_argument("--split", choices=("eval", "train"), default="eval")
    parser.add_argument("--checkpoint", choices=("newest", "best"), default="newest")
    parser.add_argument("--experiment", metavar="NAME|FILE.py",
                        help="the experiment to build the model with (default: the bundled "
                             "one the workdir's config.json names; an experiment file is run "
                             "only when named here, or with --trust-workdir)")
    parser.add_argument("--trust-workdir", action="store_true",
                        help="run the experiment file the workdir's config.json names, if its "
                             "sha256 is the one recorded when the run was trained")
    parser.add_argument("--steps", type=int, default=64, help="ig: integration points")
    parser.add_argument("--rule", default="riemann", help=f"ig: {' | '.join(RULES)}")
    parser.add_argument("--baseline", default="zeros",
                        help="ig: zeros, mean (of the training data) or a .npy file of one "
                             "example's features (that shape, or one that broadcasts to it, "
                             "e.g. a single value; numbers, finite)")
    parser.add_argument("--base", default="saliency",
                        help="smoothgrad: the method it averages (saliency, grad_x_input, ig)")
    parser.add_argument("--samples", type=int, default=16, help="smoothgrad: noisy copies")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="smoothgrad: noise std as a fraction of the value range")
    parser.add_argument("--target", default="predicted",
                        help="a classifier's class to explain: predicted, label, or a class "
                             "number from 0 to the number of classes - 1")
    parser.add_argument("--backend", choices=("pmap", "shard_map"),
                        help="default: the run's parallel.backend")
    parser.add_argument("--cpu-devices", type=int, metavar="N",
                        help="on a CPU-only machine, split the CPU into N devices")
    return parser


def run(argv: list[str] | None = None) -> list[Path]:
    """Explain as `argv` says; return the paths written."""
    args = build_parser().parse_args(argv)
    if args.cpu_devices is not None:
        from jaxdist.parallel.devices import use_cpu_devices

        use_cpu_devices(args.cpu_devices)
    method = Method(args.method, steps=args.steps, rule=args.rule, base=args.base,
                    noise=args.noise, samples=args.samples)
    method.check()
    target = _target(args.target)
    if args.examples < 1:
        raise UserError(at_least(f"--examples {args.examples}", 1))

    from jaxdist.data import as_source
    from jaxdist.loop.restore import restore_run
    from jaxdist.parallel.backends import make_backend

    restored = restore_run(args.workdir, args.checkpoint, experiment=args.experiment,
                           trust_workdir=args.trust_workdir)
    experiment, spec = restored.experiment, restored.experiment.explain
    if spec is None:
        raise UserError(f"experiment {experiment.name} does not say what its input is: give "
                        f"its Experiment an explain=ExplainSpec(input=..., output=...)")
    data = experiment.eval_data if args.split == "eval" else experiment.train_data
    if data is None:
        raise UserError("the experiment has no eval split; use --split train")
    source = as_source(data, f"the {args.split} split")
    if args.examples > len(source):
        raise UserError(f"--examples {args.examples}, but the {args.split} split has "
                        f"{len(source)} examples; ask for at most {len(source)}")
    rows = source.get_batch(np.arange(args.examples))
    baseline = _baseline(args.baseline, spec, restored, experiment, rows)
    backend = make_backend(args.backend or restored.config.parallel.backend)
    result = explain(spec, restored.params, restored.model_state, rows, backend, method,
                     baseline, target)
    return _write(args, spec, restored, rows, result, method)


def _target(text: str) -> str | int:
    """`--target`: predicted, label or a class number (its range is checked by the model)."""
    if text in ("predicted", "label"):
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--target {text} is not predicted, label or a class number") from None


def _baseline(choice: str, spec, restored, experiment, rows) -> object:
    """`--baseline`: "zeros", the training mean, or a checked array from a .npy file."""
    if choice == "zeros":
        return "zeros"
    if choice == "mean":
        from jaxdist.data import as_source

        train = as_source(experiment.train_data, "the training data")
        sample = train.get_batch(np.arange(min(len(train), MEAN_ROWS)))
        return mean_features(spec, restored.params, sample)
    path = Path(choice)
    if path.suffix != ".npy" or not path.is_file():
        raise UserError(f"--baseline {choice} is not zeros, mean or an existing .npy file")
    shape = features_shape(spec, restored.params, rows)
    baseline = _read_npy(path, shape)
    check_baseline(baseline, shape, f"--baseline {path}")
    return baseline


def _read_npy(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The array of a .npy file, never unpickling: one line for anything else."""
    from numpy.lib import format as npy

    wanted = f"save one example's features, shape {shape}, with numpy.save"
    try:
        with path.open("rb") as f:
            version = npy.read_magic(f)
            header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            dtype = header(f)[2]
    except OSError as error:
        raise UserError(f"could not read --baseline {path} ({error.strerror})") from None
    except ValueError:
        raise UserError(f"--baseline {path} is not a .npy array (it lacks the .npy header); "
                        f"{wanted}") from None
    if dtype.hasobject:
        raise UserError(f"--baseline {path} holds pickled Python objects (dtype {dtype}), "
                        f"which are not read; {wanted}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"--baseline {path} is a damaged .npy ({error}); {wanted}") from None


def _write(args, spec, restored, rows, result, method) -> list[Path]:
    from jaxdist.explain import pictures

    out = output_folder(args.workdir, "explain")
    attributions = result.attributions
    if spec.kind == "text":  # one number per token: summed over the embedding
        attributions = attributions.reshape(*attributions.shape[:2], -1).sum(axis=-1)
    labels = np.asarray(rows[spec.label]).reshape(-1) if spec.label else None
    settings = {**asdict(method), "split": args.split, "baseline": args.baseline,
                "target": args.target, "checkpoint": str(restored.checkpoint),
                "step": restored.step}
    arrays = {"inputs": np.asarray(rows[spec.input]), "attributions": attributions,
              "predictions": result.predictions, "targets": result.targets,
              "scores": result.scores, "baseline_scores": result.baseline_scores,
              "method": np.array(json.dumps(settings))}
    if labels is not None:
        arrays["labels"] = labels
    if spec.kind != "text":
        arrays["features"] = result.features
    npz = replace_inside(out, "attributions.npz", lambda tmp: np.savez(tmp, **arrays))
    title = (f"{restored.experiment.name}: {method.name} on {len(attributions)} "
             f"{args.split} examples, step {restored.step}")
    if spec.kind == "image":
        def draw(tmp: Path) -> None:
            pictures.images(result.features, attributions, result.predictions, labels, title,
                            tmp)
    elif spec.kind == "text":
        def draw(tmp: Path) -> None:
            pictures.text(np.asarray(rows[spec.input]), attributions, result.predictions,
                          title, tmp)
    else:
        count = attributions.shape[1]
        names = list(spec.feature_names) or [f"feature {i}" for i in range(count)]
        coefficients = (np.asarray(spec.coefficients(restored.params))
                        if spec.coefficients is not None else None)

        def draw(tmp: Path) -> None:
            pictures.tabular(attributions.reshape(len(attributions), -1), coefficients, names,
                             title, tmp)
    png = replace_inside(out, "attributions.png", draw)
    return [npz, png]


def main(argv: list[str] | None = None) -> int:
    """Entry point: explain, or one line on stderr and exit status 2 for bad input."""
    return print_paths(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
