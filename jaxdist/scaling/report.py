"""A scaling study's report: one JSON-able dict, and its text and plot.

`build` gathers what was measured, the fitted model, its check against the measured step
times, and the prediction tables (weak and strong scaling, for this machine's fitted links
and for a named interconnect); `text` and `plot` render that dict, so that the printed
report, `scaling.json` and `scaling.png` always say the same.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from jaxdist.scaling.costmodel import (
    ASSUMPTIONS,
    Interconnect,
    StepModel,
    largest_count_above,
    predict,
    prediction_counts,
)
from jaxdist.scaling.study import MODES, Measured, Plan

WIDTH = 92


def counts_for(mode: str, plan: Plan, counts: Sequence[int]) -> list[int]:
    """The counts of `counts` a mode can use: strong scaling needs n to divide its batch."""
    if mode == "weak":
        return list(counts)
    return [n for n in counts if plan.global_batch % n == 0]


def scenario(name: str, model: StepModel, plan: Plan, max_devices: int, target: float,
             goal: dict[str, float], dataset_size: int, fixed_seconds: float,
             link: Interconnect | None = None, inter: Interconnect | None = None
             ) -> dict[str, Any]:
    """The prediction tables of one model (weak and strong) and their largest good count."""
    counts = prediction_counts(max_devices, model.devices_per_host, plan.counts)
    modes = {}
    for mode in MODES:
        batch = plan.per_device_batch if mode == "weak" else plan.global_batch
        rows = predict(model, counts_for(mode, plan, counts), mode, batch,
                       steps=goal.get("steps"), epochs=goal.get("epochs"),
                       dataset_size=dataset_size, fixed_seconds=fixed_seconds)
        curve = predict(model, counts_for(mode, plan, range(1, max_devices + 1)), mode, batch)
        modes[mode] = {"batch": batch, "rows": [asdict(r) for r in rows],
                       "largest_count": largest_count_above(rows, target),
                       "curve": [{"devices": r.devices, "step_seconds": r.step_seconds,
                                  "examples_per_second": r.examples_per_second}
                                 for r in curve]}
    return {"name": name, "model": model.to_json(),
            "interconnect": None if link is None else asdict(link),
            "inter_host": None if inter is None else asdict(inter), "modes": modes}


def measured_rows(measured: Measured, plan: Plan) -> list[dict[str, Any]]:
    """Per measured count and mode: the step, its compute, the all-reduce (JSON-able)."""
    rows = []
    for mode in MODES:
        for n in plan.counts:
            b = plan.batch(mode, n)
            step, compute = measured.step(plan, mode, n), measured.step(plan, mode, n, "compute")
            rows.append({"mode": mode, "devices": n, "per_device_batch": b,
                         "global_batch": b * n, "step": step.to_json(),
                         "compute": compute.to_json(),
                         "allreduce": measured.timing("allreduce", n).to_json(),
                         # what communicating costs inside the step, to set beside allreduce
                         "step_minus_compute_s": step.median - compute.median,
                         "examples_per_second": b * n / step.median})
    return rows


def build(*, command: str, date: str, experiment: str, overrides: Sequence[str],
          measured: Measured, plan: Plan, fitted: StepModel, check: list[dict],
          scenarios: list[dict], target: float, goal: dict[str, float],
          fixed_seconds: float, devices_available: int, versions: dict[str, str]
          ) -> dict[str, Any]:
    """Everything of a study in one JSON-able dict."""
    return {
        "command": command, "date": date, "experiment": experiment,
        "overrides": list(overrides),
        "machine": {"platform": measured.platform, "device_kind": measured.device_kind,
                    "devices_available": devices_available, "cpu_count": measured.cpu_count,
                    **versions},
        "parameters": measured.parameter_count, "gradient_bytes": measured.gradient_bytes,
        "dataset_size": measured.dataset_size, "plan": asdict(plan),
        "measured": measured_rows(measured, plan),
        "fitted": {"fit_counts": list(plan.fit_counts), **fitted.to_json()},
        "check": check, "assumptions": ASSUMPTIONS, "target_efficiency": target,
        "goal": goal, "compile_seconds": fixed_seconds, "scenarios": scenarios,
    }


def _unit(seconds: float) -> tuple[str, float]:
    for unit, scale in (("s", 1.0), ("ms", 1e-3)):
        if abs(seconds) >= scale:
            return unit, scale
    return "us", 1e-6


def _time(seconds: float) -> str:
    """Seconds in the unit that suits them, 3 significant digits."""
    unit, scale = _unit(seconds)
    return f"{seconds / scale:.3g} {unit}"


def _bandwidth(link: dict) -> str:
    bandwidth = link["bandwidth_bytes_per_s"]
    gbs = "no measurable cost per byte" if bandwidth is None else f"{bandwidth / 1e9:.3g} GB/s"
    return f"ring, {gbs} per device and direction, {_time(link['latency_s'])} per ring step"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return [line, *body]


def _spread(timing: dict) -> str:
    unit, scale = _unit(timing["median"])
    return (f"{timing['median'] / scale:.3g} {unit} "
            f"[{timing['q1'] / scale:.3g}-{timing['q3'] / scale:.3g}]")


def text(report: dict[str, Any]) -> str:
    """The report as the command prints it."""
    plan, machine = report["plan"], report["machine"]
    out = [f"{report['experiment']} on {plan['counts'][-1]} of {machine['devices_available']} "
           f"{machine['platform']} device(s) ({machine['device_kind']}), "
           f"{machine['cpu_count']} CPU cores, {report['date']}",
           f"{report['parameters']:,} parameters: the gradient all-reduce carries "
           f"{report['gradient_bytes']:,} bytes; the step's collectives move "
           f"{report['fitted'].get('volume', 1.0):.3f} times what it does (read from the "
           f"compiled step)",
           f"weak scaling: {plan['per_device_batch']} examples per device; strong scaling: "
           f"{plan['global_batch']} examples per step", "",
           f"measured, time per step: median of {plan['rounds']} interleaved rounds of "
           f"{plan['window_steps']} steps [IQR]"]
    by = {(m["mode"], m["devices"]): m for m in report["measured"]}
    rows = [[str(n), _spread(by["weak", n]["step"]), _spread(by["weak", n]["compute"]),
             _spread(by["strong", n]["step"]), _spread(by["strong", n]["compute"]),
             _spread(by["weak", n]["allreduce"]), _time(by["weak", n]["step_minus_compute_s"]),
             f"{by['weak', n]['step']['compile_seconds']:.2f} s"]
            for n in plan["counts"]]
    out += _table(["devices", "weak step", "compute", "strong step", "compute",
                   "all-reduce", "weak step-compute", "compile"], rows)
    fitted = report["fitted"]
    compute = fitted["compute"]
    share = (f" x max(1, n / {compute['cores']:.2f})" if compute["cores"] is not None else "")
    out += ["", f"model fitted on {', '.join(map(str, fitted['fit_counts']))} device(s):",
            f"  compute    = {_time(compute['overhead'])} + {_time(compute['per_example'])} "
            f"x b{share}   (b: examples per device, n: devices)",
            f"  all-reduce = {_bandwidth(fitted['intra'])}",
            "predicted against measured step time (* not fitted):"]
    for c in report["check"]:
        mark = " " if c["fitted"] else "*"
        out.append(f"  {c['mode']:6s} {c['devices']:4d}{mark} measured {_time(c['measured_s'])}, "
                   f"predicted {_time(c['predicted_s'])} ({100 * c['error']:+.1f}%)")
    out += ["", *textwrap.wrap(report["assumptions"], WIDTH, break_on_hyphens=False)]
    goal = report["goal"]
    what = (f"{goal['steps']:g} steps" if "steps" in goal else f"{goal['epochs']:g} epochs")
    target = report["target_efficiency"]
    for s in report["scenarios"]:
        for mode in MODES:
            table = s["modes"][mode]
            per = ("examples per device" if mode == "weak" else "examples per step")
            out += ["", f"predicted, {s['name']}: {mode} scaling, {table['batch']:g} {per}; "
                        f"time to {what} (compile included)"]
            rows = [[str(r["devices"]), str(r["hosts"]), _time(r["step_seconds"]),
                     _time(r["allreduce_seconds"]), f"{r['examples_per_second']:,.0f}",
                     f"{r['speedup']:.2f}", f"{r['efficiency']:.2f}",
                     "-" if r["steps"] is None else f"{r['steps']:,}",
                     "-" if r["hours"] is None else _hours(r["hours"]),
                     "-" if r["device_hours"] is None else f"{r['device_hours']:.3g}"]
                    for r in table["rows"]]
            out += _table(["devices", "hosts", "step", "all-reduce", "examples/s", "speedup",
                           "efficiency", "steps", "time", "device-hours"], rows)
            largest = table["largest_count"]
            out.append(f"largest count with efficiency >= {target:g}: "
                       f"{'none' if largest is None else largest}")
    return "\n".join(out)


def _hours(hours: float) -> str:
    seconds = hours * 3600
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{hours:.1f} h"


def plot(report: dict[str, Any], path: Path) -> Path:
    """Measured points (median, IQR bars) over the predicted curves: step time, throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"weak": "tab:blue", "strong": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    fitted_counts = set(report["fitted"]["fit_counts"])
    for mode in MODES:
        points = [m for m in report["measured"] if m["mode"] == mode]
        for ax, key in zip(axes, ("step", "rate"), strict=True):
            for fitted in (True, False):
                chosen = [m for m in points if (m["devices"] in fitted_counts) == fitted]
                if not chosen:
                    continue
                # Weak and strong points at one count side by side, so neither hides the other.
                nudge = 0.96 if mode == "weak" else 1.04
                x = [m["devices"] * nudge for m in chosen]
                if key == "step":
                    y = [m["step"]["median"] * 1e3 for m in chosen]
                    low = [(m["step"]["median"] - m["step"]["q1"]) * 1e3 for m in chosen]
                    high = [(m["step"]["q3"] - m["step"]["median"]) * 1e3 for m in chosen]
                else:
                    y = [m["examples_per_second"] for m in chosen]
                    low = [m["global_batch"] * (1 / m["step"]["q3"] - 1 / m["step"]["median"])
                           for m in chosen]
                    low = [-v for v in low]
                    high = [m["global_batch"] * (1 / m["step"]["q1"] - 1 / m["step"]["median"])
                            for m in chosen]
                label = f"{mode}, measured" + ("" if fitted else " (not fitted)")
                ax.errorbar(x, y, yerr=[low, high], fmt="o", capsize=3, color=colors[mode],
                            mfc=colors[mode] if fitted else "white", label=label, zorder=3)
        for s, style in zip(report["scenarios"], styles, strict=False):
            curve = s["modes"][mode]["curve"]
            x = [c["devices"] for c in curve]
            axes[0].plot(x, [c["step_seconds"] * 1e3 for c in curve], style,
                         color=colors[mode], alpha=0.8, label=f"{mode}, {s['name']}")
            axes[1].plot(x, [c["examples_per_second"] for c in curve], style,
                         color=colors[mode], alpha=0.8, label=f"{mode}, {s['name']}")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    # Between the powers of ten, label 2 and 5 only, so the labels never overlap.
    some = matplotlib.ticker.FuncFormatter(
        lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")
    for ax, label in zip(axes, ("time per step (ms)", "examples/s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(some)
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['experiment']}: measured (points, IQR bars) and predicted (lines); "
                 f"{report['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
