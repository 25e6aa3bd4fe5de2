"""How long a data-parallel step takes on n devices: a cost model and its fit to measurements.

Pure arithmetic (numpy only, no jax), so that it can be tested by hand. A step is its
compute plus one all-reduce of the gradient:

    t(n) = t_compute(per-device batch, n) + t_allreduce(bytes, n)
    t_compute(b, n) = overhead + per_example * b * max(1, n / cores)   (cores: CPU devices only)
    t_allreduce(bytes, n) = 2 (n - 1) / n * bytes / bandwidth + 2 (n - 1) * latency   (a ring)

`ASSUMPTIONS` says in one paragraph what this takes for granted; `INTERCONNECTS` holds the
links a user can name, with the figures used and where they come from. All times are in
seconds, sizes in bytes, bandwidths in bytes per second.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

GB = 1e9

ASSUMPTIONS = (
    "Assumptions: a step is its compute followed by one all-reduce of the gradient, nothing "
    "overlapped; the batches are on the devices already (the input pipeline keeps up) and "
    "the all-reduce of the few scalar metrics costs nothing. A device's compute is a fixed "
    "overhead plus a cost per example of its batch; real accelerators compute independently "
    "of how many there are, but fake CPU devices share the host's cores, so on a CPU the "
    "per-example part is multiplied by max(1, n / k), n the devices on one host and k (how "
    "many devices' worth of work its cores do at once) fitted between 1 and its core count. "
    "The all-reduce is a ring, "
    "2 (n - 1) / n x bytes / bandwidth + 2 (n - 1) x latency, with the bandwidth (per device "
    "and direction) and the latency (per ring step) fitted to the all-reduce benchmark (on a "
    "CPU they include launching and synchronizing the devices), or taken from the "
    "interconnect table, whose latencies are assumed orders of magnitude, not datasheet "
    "figures. Across hosts of D devices the all-reduce is a ring inside each host (reduce-"
    "scatter, then all-gather) around a ring across the hosts, whose network the host's D "
    "devices share. For a named interconnect each device computes as fast as one device "
    "measured here alone. The time to a number of steps adds the compile time measured at "
    "the largest count; an epoch is the training set over the global batch (weak scaling: n "
    "x the per-device batch; strong: fixed).")


@dataclass(frozen=True)
class Link:
    """A link in the ring: bandwidth per device and direction, latency per ring step."""

    bandwidth: float  # bytes/s; math.inf: bytes cost nothing
    latency: float  # seconds


@dataclass(frozen=True)
class Interconnect:
    """A named interconnect: the figures the model uses and the figure as its source lists it."""

    name: str
    description: str
    bandwidth_gbs: float  # GB/s per device and direction, as used
    latency_us: float  # microseconds per ring step, assumed
    listed: str  # the figure as the source gives it
    source: str

    @property
    def link(self) -> Link:
        """The figures as a `Link` (bytes/s, seconds)."""
        return Link(self.bandwidth_gbs * GB, self.latency_us * 1e-6)


_NVIDIA_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_GOOGLE_V5E = "Google Cloud TPU v5e documentation, system architecture table"
INTERCONNECTS: dict[str, Interconnect] = {i.name: i for i in (
    Interconnect("nvlink4", "NVLink 4 (H100 SXM, through NVSwitch)", 450, 1,
                 "900 GB/s per GPU, both directions", f"{_NVIDIA_H100}, H100 SXM column"),
    Interconnect("pcie5", "PCIe 5.0 x16", 64, 2,
                 "128 GB/s per GPU, both directions (32 GT/s x 16 lanes)",
                 f"{_NVIDIA_H100}; PCI-SIG PCIe 5.0 base specification"),
    Interconnect("ethernet-100g", "100 Gb/s Ethernet, one NIC", 12.5, 10,
                 "100 Gb/s per direction", "IEEE 802.3 (100GBASE line rate)"),
    Interconnect("ethernet-400g", "400 Gb/s Ethernet, one NIC", 50, 10,
                 "400 Gb/s per direction", "IEEE 802.3bs (400GBASE line rate)"),
    Interconnect("infiniband-100g", "InfiniBand EDR, one HCA", 12.5, 2,
                 "100 Gb/s per port and direction", "InfiniBand Trade Association, EDR rate"),
    Interconnect("infiniband-400g", "InfiniBand NDR, one HCA", 50, 2,
                 "400 Gb/s per port and direction", "NVIDIA ConnectX-7 datasheet (NDR)"),
    Interconnect("tpu-v5e-ici", "TPU v5e inter-chip interconnect (2-D torus, 4 ports)", 200, 1,
                 "400 GB/s per chip, both directions", _GOOGLE_V5E),
)}


def parse_interconnect(text: str) -> Interconnect:
    """A name of `INTERCONNECTS`, or `GB/S[:LATENCY_US]` for a link of your own.

    Raises ValueError naming the choices for anything else.
    """
    if text in INTERCONNECTS:
        return INTERCONNECTS[text]
    bandwidth, _, latency = text.partition(":")
    try:
        gbs, us = float(bandwidth), float(latency) if latency else 5.0
    except ValueError:
        gbs = us = math.nan
    if not (math.isfinite(gbs) and gbs > 0 and math.isfinite(us) and us >= 0):
        raise ValueError(f"{text} is not a known interconnect; choose one of: "
                         f"{', '.join(INTERCONNECTS)}, or give GB/s per device and direction "
                         f"(optionally :latency in microseconds), e.g. 25 or 25:5")
    return Interconnect(text, f"{gbs:g} GB/s, {us:g} us per step", gbs, us, "given", "given")


def ring_allreduce_seconds(nbytes: float, devices: int, link: Link) -> float:
    """A ring all-reduce of `nbytes` over `devices`: 2(n-1)/n bytes/bandwidth + 2(n-1) latency."""
    if devices <= 1:
        return 0.0
    steps = 2 * (devices - 1)
    moved = steps / devices * nbytes
    return (0.0 if math.isinf(link.bandwidth) else moved / link.bandwidth) + steps * link.latency


def hosts_for(devices: int, per_host: int | None) -> int:
    """How many hosts of `per_host` devices hold `devices` (1 without hosts)."""
    return 1 if not per_host else math.ceil(devices / per_host)


def hierarchical_allreduce_seconds(nbytes: float, devices: int, per_host: int | None,
                                   intra: Link, inter: Link | None) -> float:
    """An all-reduce over hosts of `per_host` devices: a ring inside, a ring across hosts.

    Inside a host: reduce-scatter and all-gather (together one ring all-reduce of `nbytes`
    over the host's devices). Across hosts: each device all-reduces its 1/D share over the
    hosts, the D shares together crossing the host's network, which the `inter` link is.
    """
    hosts = hosts_for(devices, per_host)
    if hosts == 1 or inter is None:
        return ring_allreduce_seconds(nbytes, devices, intra)
    return (ring_allreduce_seconds(nbytes, per_host, intra)
            + ring_allreduce_seconds(nbytes, hosts, inter))


@dataclass(frozen=True)
class ComputeModel:
    """A device's compute time per step: overhead + per_example * b * max(1, n / cores)."""

    overhead: float
    per_example: float
    cores: float | None = None  # None: devices compute independently (accelerators)

    def seconds(self, per_device_batch: float, devices: int) -> float:
        """Compute seconds of one step with `per_device_batch` examples on each of `devices`."""
        share = 1.0 if self.cores is None else max(1.0, devices / self.cores)
        return self.overhead + self.per_example * per_device_batch * share


@dataclass(frozen=True)
class StepModel:
    """t(n) = compute + all-reduce of the gradient's bytes, optionally over several hosts.

    `volume` is the step's collective traffic as a multiple of one all-reduce of the
    gradient: 1 for `parallel.shard=none` (an all-reduce), `optimizer` and `gradients` (a
    reduce-scatter of the gradient and an all-gather of the parameters: the same bytes);
    more for `params` when the backward pass gathers the parameters again.
    """

    compute: ComputeModel
    intra: Link
    gradient_bytes: int
    inter: Link | None = None
    devices_per_host: int | None = None
    volume: float = 1.0

    def allreduce_seconds(self, devices: int) -> float:
        """The step's gradient reduction (and parameter gathers) over `devices`."""
        return hierarchical_allreduce_seconds(self.gradient_bytes * self.volume, devices,
                                              self.devices_per_host, self.intra, self.inter)

    def compute_seconds(self, per_device_batch: float, devices: int) -> float:
        """The compute of one step; devices share cores with those of their own host only."""
        on_host = devices if not self.devices_per_host else min(devices, self.devices_per_host)
        return self.compute.seconds(per_device_batch, on_host)

    def step_seconds(self, per_device_batch: float, devices: int) -> float:
        """One step with `per_device_batch` examples on each of `devices`."""
        return self.compute_seconds(per_device_batch, devices) + self.allreduce_seconds(devices)

    def to_json(self) -> dict:
        """JSON-able parameters (an infinite bandwidth is written as null)."""
        def link(value: Link | None) -> dict | None:
            if value is None:
                return None
            return {"bandwidth_bytes_per_s": None if math.isinf(value.bandwidth)
                    else value.bandwidth, "latency_s": value.latency}

        return {"compute": asdict(self.compute), "intra": link(self.intra),
                "inter": link(self.inter), "devices_per_host": self.devices_per_host,
                "gradient_bytes": self.gradient_bytes, "volume": self.volume}


def _nonnegative_least_squares(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """The x >= 0 that minimizes |a x - y|^2 (a few columns: every active set is tried)."""
    columns = a.shape[1]
    best, best_error = np.zeros(columns), float(np.sum(y ** 2))
    for mask in range(1, 2 ** columns):
        chosen = [j for j in range(columns) if mask >> j & 1]
        solution, *_ = np.linalg.lstsq(a[:, chosen], y, rcond=None)
        if np.any(solution < 0):
            continue
        x = np.zeros(columns)
        x[chosen] = solution
        error = float(np.sum((a @ x - y) ** 2))
        if error < best_error - 1e-30:
            best, best_error = x, error
    return best, best_error


def fit_compute(points: Sequence[tuple[float, int, float]], max_cores: float | None = None,
                grid: int = 400) -> ComputeModel:
    """Fit `ComputeModel` to `(per_device_batch, devices, seconds)` points.

    With `max_cores` (a CPU host's core count) the cores are fitted too, on a fine grid over
    [1, max_cores]; without, devices compute independently. Each point counts by its relative
    error, so that fast and slow settings weigh alike; overhead and per-example cost >= 0.
    """
    b, n, t = (np.asarray(column, float) for column in zip(*points, strict=True))
    if max_cores is None:
        candidates: list[float | None] = [None]
    else:
        candidates = list(np.linspace(1.0, max(1.0, float(max_cores)), grid))
    best: tuple[float, ComputeModel] | None = None
    for cores in candidates:
        share = np.ones_like(n) if cores is None else np.maximum(1.0, n / cores)
        a = np.stack([np.ones_like(b), b * share], axis=1) / t[:, None]
        (overhead, per_example), error = _nonnegative_least_squares(a, np.ones_like(t))
        if best is None or error < best[0] - 1e-15:
            best = (error, ComputeModel(float(overhead), float(per_example),
                                        None if cores is None else float(cores)))
    return best[1]


def fit_ring(points: Sequence[tuple[float, int, float]]) -> Link:
    """Fit a ring's bandwidth and latency to `(bytes, devices, seconds)` all-reduce points.

    Points with fewer than 2 devices (nothing to reduce) are left out; each point counts by
    its relative error; both figures >= 0 (a bandwidth with no measurable cost is inf).
    """
    used = [(m, n, t) for m, n, t in points if n >= 2]
    if not used:
        raise ValueError("fitting a ring needs all-reduce times on 2 or more devices")
    m, n, t = (np.asarray(column, float) for column in zip(*used, strict=True))
    a = np.stack([2 * (n - 1) / n * m, 2 * (n - 1)], axis=1) / t[:, None]
    (seconds_per_byte, latency), _ = _nonnegative_least_squares(a, np.ones_like(t))
    bandwidth = math.inf if seconds_per_byte <= 0 else 1.0 / float(seconds_per_byte)
    return Link(bandwidth, float(latency))


@dataclass(frozen=True)
class Row:
    """One device count of a prediction table."""

    devices: int
    hosts: int
    per_device_batch: float
    global_batch: float
    step_seconds: float
    compute_seconds: float
    allreduce_seconds: float
    examples_per_second: float
    speedup: float
    efficiency: float
    steps: int | None = None  # to the goal (--steps or --epochs), if one was given
    hours: float | None = None
    device_hours: float | None = None


def speedup_and_efficiency(devices: int, examples_per_second: float,
                           examples_per_second_one: float) -> tuple[float, float]:
    """Throughput relative to one device, and that divided by the device count."""
    speedup = examples_per_second / examples_per_second_one
    return speedup, speedup / devices


def steps_for_epochs(epochs: float, dataset_size: int, global_batch: float) -> int:
    """Steps to see `epochs` times `dataset_size` examples in batches of `global_batch`."""
    return math.ceil(epochs * dataset_size / global_batch)


def time_to_goal(steps: int, step_seconds: float, devices: int,
                 fixed_seconds: float = 0.0) -> tuple[float, float]:
    """Hours to run `steps` steps (plus `fixed_seconds`, e.g. compiling), and device-hours."""
    hours = (fixed_seconds + steps * step_seconds) / 3600
    return hours, hours * devices


def predict(model: StepModel, counts: Sequence[int], mode: str, batch: float,
            steps: int | None = None, epochs: float | None = None,
            dataset_size: int | None = None, fixed_seconds: float = 0.0) -> list[Row]:
    """The prediction table of `model` at `counts` devices.

    `mode` "weak": `batch` is the per-device batch, the same at every count; "strong":
    `batch` is the global batch, split over the devices. The first row's count is the
    reference of speedup and efficiency, so `counts` should start at 1. With `steps` or
    `epochs` (and `dataset_size`), each row also gets the steps, hours and device-hours
    to get there.
    """
    if mode not in ("weak", "strong"):
        raise ValueError(f"mode must be 'weak' or 'strong', not {mode!r}")
    rows: list[Row] = []
    for n in counts:
        per_device = batch if mode == "weak" else batch / n
        global_batch = per_device * n
        compute = model.compute_seconds(per_device, n)
        allreduce = model.allreduce_seconds(n)
        step = compute + allreduce
        rate = global_batch / step
        speedup, efficiency = speedup_and_efficiency(
            n, rate, rows[0].examples_per_second if rows else rate / n)
        goal = steps if epochs is None else (
            None if dataset_size is None else steps_for_epochs(epochs, dataset_size,
                                                               global_batch))
        hours = device_hours = None
        if goal is not None:
            hours, device_hours = time_to_goal(goal, step, n, fixed_seconds)
        rows.append(Row(n, hosts_for(n, model.devices_per_host), per_device, global_batch,
                        step, compute, allreduce, rate, speedup, efficiency, goal, hours,
                        device_hours))
    return rows


def largest_count_above(rows: Sequence[Row], target: float) -> int | None:
    """The largest count up to which every row's efficiency is >= `target` (None: not even 1)."""
    largest = None
    for row in sorted(rows, key=lambda r: r.devices):
        if row.efficiency < target:
            break
        largest = row.devices
    return largest


def prediction_counts(max_devices: int, per_host: int | None = None,
                      extra: Sequence[int] = ()) -> list[int]:
    """1, 2, 4, ... up to `max_devices`, plus `max_devices` and `extra`, sorted.

    With hosts of `per_host` devices, counts beyond one host are whole hosts.
    """
    counts = {1, max_devices, *[n for n in extra if n <= max_devices]}
    n = 2
    while n < max_devices:
        counts.add(n)
        n *= 2
    if per_host:
        counts = {c for c in counts if c <= per_host or c % per_host == 0}
        counts.update(per_host * h for h in (1, 2) if per_host * h <= max_devices)
    return sorted(counts)
