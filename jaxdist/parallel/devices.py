"""Devices: which ones a run uses, in which order, and splitting a CPU into several.

JAX fixes its devices the first time anything touches one; `use_cpu_devices` must come
before that, and `devices_ready` says whether it has happened.
"""

from __future__ import annotations

import jax

from jaxdist.base.errors import UserError


def devices_ready() -> bool:
    """Whether JAX has set up its devices already (after which their number is fixed)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


# Enough to rehearse a large slice on one CPU; each fake device costs host memory and
# start-up time, growing with the count, before the first step.
MAX_CPU_DEVICES = 1024


def use_cpu_devices(count: int) -> None:
    """Split the CPU into `count` devices, to try data parallelism without an accelerator.

    JAX fixes its devices the first time anything touches one, so call this first (in a
    notebook: in the first cell, or after restarting the kernel); later it is refused with
    one line, unless the devices already are `count` CPUs.
    """
    if not 1 <= count <= MAX_CPU_DEVICES:
        raise UserError(f"--cpu-devices {count} must be between 1 and {MAX_CPU_DEVICES} (each "
                        f"fake device costs the host memory and start-up time)")
    if devices_ready():
        devices = jax.devices()
        if devices[0].platform == "cpu" and len(devices) == count:
            return
        raise UserError(f"JAX has set up its devices already ({len(devices)} "
                        f"{devices[0].platform}); the CPU can be split into {count} only "
                        f"before that: restart the process (the notebook's kernel) and ask "
                        f"for {count} CPU devices before anything else uses JAX")
    jax.config.update("jax_num_cpu_devices", count)


def select_devices(count: int = 0) -> list[jax.Device]:
    """Return the first `count` local devices, or all of them when `count` is 0."""
    devices = jax.local_devices()
    if count == 0:
        return devices
    if count > len(devices):
        raise UserError(
            f"parallel.devices={count} but only {len(devices)} "
            f"{devices[0].platform} device(s) are available; use parallel.devices=all or <= "
            f"{len(devices)}" + (f", or split the CPU into {count} devices with --cpu-devices "
                                 f"{count} (jaxdist.use_cpu_devices({count}) in Python)"
                                 if devices[0].platform == "cpu" else ""))
    return devices[:count]


def global_devices(local_count: int) -> list[jax.Device]:
    """The first `local_count` devices of every process, process by process.

    This order puts process p's devices at positions `[p*local_count, (p+1)*local_count)` of
    the `batch` axis, where the loader's slice p of each global batch goes.
    """
    by_process: dict[int, list[jax.Device]] = {}
    for device in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
        by_process.setdefault(device.process_index, []).append(device)
    return [d for p in sorted(by_process) for d in by_process[p][:local_count]]


def free_memory_per_device(devices: list[jax.Device]) -> int | None:
    """Bytes free on each of `devices` (the least of them), or None if unknown.

    An accelerator reports its own memory; CPU devices share the host's, whose available
    memory (`MemAvailable`) is divided among them.
    """
    if devices[0].platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024 // len(devices)
        except (OSError, KeyError, ValueError):
            return None
    free = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return min(free)
