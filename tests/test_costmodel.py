"""The cost model of jaxdist.scaling.costmodel against cases computed by hand (no jax)."""

import math
from dataclasses import replace

import pytest

from jaxdist.scaling.costmodel import (
    INTERCONNECTS,
    ComputeModel,
    Link,
    StepModel,
    fit_compute,
    fit_ring,
    hierarchical_allreduce_seconds,
    largest_count_above,
    parse_interconnect,
    predict,
    prediction_counts,
    ring_allreduce_seconds,
    steps_for_epochs,
    time_to_goal,
)


def test_ring_allreduce_by_hand():
    link = Link(bandwidth=100e9, latency=1e-5)
    # 2 (n-1)/n * bytes / bandwidth + 2 (n-1) * latency
    assert ring_allreduce_seconds(1e9, 4, link) == pytest.approx(1.5e9 / 100e9 + 6e-5)
    assert ring_allreduce_seconds(1e9, 2, link) == pytest.approx(0.01 + 2e-5)
    assert ring_allreduce_seconds(1e9, 1, link) == 0.0
    assert ring_allreduce_seconds(1e9, 8, Link(math.inf, 1e-6)) == pytest.approx(14e-6)


def test_across_hosts_a_ring_inside_around_a_ring_between():
    intra, inter = Link(100e9, 1e-6), Link(12.5e9, 1e-5)
    # 16 devices, 8 per host: ring of 8 over NVLink-like links, ring of 2 hosts over the NIC
    expected = (2 * 7 / 8 * 1e8 / 100e9 + 14e-6) + (2 * 1 / 2 * 1e8 / 12.5e9 + 2e-5)
    assert hierarchical_allreduce_seconds(1e8, 16, 8, intra, inter) == pytest.approx(expected)
    # within one host the network is not used
    assert hierarchical_allreduce_seconds(1e8, 8, 8, intra, inter) == pytest.approx(
        ring_allreduce_seconds(1e8, 8, intra))
    model = StepModel(ComputeModel(0.0, 0.0), intra, 10**8, inter, 8)
    assert model.allreduce_seconds(16) == pytest.approx(expected)


def test_fit_ring_recovers_bandwidth_and_latency():
    truth = Link(2e9, 3e-5)
    points = [(b, n, ring_allreduce_seconds(b, n, truth))
              for b in (1e5, 1e6) for n in (1, 2, 4, 8)]
    fitted = fit_ring(points)
    assert fitted.bandwidth == pytest.approx(truth.bandwidth, rel=1e-9)
    assert fitted.latency == pytest.approx(truth.latency, rel=1e-9)
    # latency only: the bandwidth term is 0, i.e. infinite bandwidth
    assert math.isinf(fit_ring([(1e6, n, 2 * (n - 1) * 1e-4) for n in (2, 4)]).bandwidth)
    with pytest.raises(ValueError, match="2 or more devices"):
        fit_ring([(1e6, 1, 1e-3)])


@pytest.mark.parametrize("truth,max_cores", [
    (ComputeModel(1e-3, 5e-5, 1.5), 3.0),  # CPU devices sharing 1.5 cores' worth
    (ComputeModel(2e-4, 1e-6, None), None),  # accelerators: independent of n
])
def test_fit_compute_recovers_known_parameters(truth, max_cores):
    points = [(b, n, truth.seconds(b, n)) for n in (1, 2, 4, 8) for b in (16, 128 // n)]
    fitted = fit_compute(points, max_cores, grid=401)  # 1.5 lies on the grid
    assert fitted.overhead == pytest.approx(truth.overhead, rel=1e-6)
    assert fitted.per_example == pytest.approx(truth.per_example, rel=1e-6)
    if truth.cores is None:
        assert fitted.cores is None
    else:
        assert fitted.cores == pytest.approx(truth.cores, rel=1e-9)


def test_contention_term():
    model = ComputeModel(overhead=1.0, per_example=0.5, cores=2.0)
    assert model.seconds(4, 1) == 3.0  # max(1, 1/2) = 1
    assert model.seconds(4, 2) == 3.0
    assert model.seconds(4, 8) == 1.0 + 0.5 * 4 * 4
    # devices share the cores of their own host only
    hosts = StepModel(model, Link(1e9, 0.0), 0, Link(1e9, 0.0), devices_per_host=4)
    assert hosts.compute_seconds(4, 16) == hosts.compute_seconds(4, 4) == model.seconds(4, 4)


# 1 ms per example, no overhead, 1 ms per ring step, bytes free: t(n) = b ms + 2 (n-1) ms.
HAND = StepModel(ComputeModel(0.0, 1e-3), Link(math.inf, 1e-3), gradient_bytes=1000)


def test_weak_scaling_speedup_and_efficiency_by_hand():
    rows = predict(HAND, [1, 2, 4], "weak", 10)
    assert [r.step_seconds for r in rows] == pytest.approx([0.010, 0.012, 0.016])
    assert [r.examples_per_second for r in rows] == pytest.approx([1000, 20 / 0.012, 2500])
    assert [r.speedup for r in rows] == pytest.approx([1, 1.2 / 0.72, 2.5])
    assert [r.efficiency for r in rows] == pytest.approx([1, 0.6 / 0.72, 0.625])
    assert [r.global_batch for r in rows] == [10, 20, 40]


def test_strong_scaling_speedup_and_efficiency_by_hand():
    rows = predict(HAND, [1, 2, 4], "strong", 40)
    assert [r.per_device_batch for r in rows] == [40, 20, 10]
    assert [r.step_seconds for r in rows] == pytest.approx([0.040, 0.022, 0.016])
    assert [r.speedup for r in rows] == pytest.approx([1, 40 / 22, 2.5])
    assert [r.efficiency for r in rows] == pytest.approx([1, 20 / 22, 0.625])


def test_largest_count_whose_efficiency_stays_above_target():
    rows = predict(HAND, [1, 2, 4], "weak", 10)  # efficiencies 1, 0.833, 0.625
    assert largest_count_above(rows, 0.8) == 2
    assert largest_count_above(rows, 0.9) == 1
    assert largest_count_above(rows, 0.5) == 4
    assert largest_count_above(rows, 1.0) == 1
    # "stays above": a later count that recovers does not count
    dipping = [rows[0], *[replace(r, efficiency=e)
                          for r, e in zip(rows[1:], (0.7, 0.85), strict=True)]]
    assert largest_count_above(dipping, 0.8) == 1


def test_time_and_device_hours_to_a_goal():
    assert time_to_goal(3600, 0.012, 2) == pytest.approx((0.012, 0.024))
    assert time_to_goal(3600, 0.012, 2, fixed_seconds=36) == pytest.approx((0.022, 0.044))
    assert steps_for_epochs(2, 1000, 20) == 100
    assert steps_for_epochs(1, 1000, 300) == 4  # a last, partial batch is a step
    weak = predict(HAND, [1, 2], "weak", 10, epochs=2, dataset_size=1000)
    assert [r.steps for r in weak] == [200, 100]
    assert weak[1].hours == pytest.approx(100 * 0.012 / 3600)
    assert weak[1].device_hours == pytest.approx(2 * 100 * 0.012 / 3600)
    strong = predict(HAND, [1, 4], "strong", 40, steps=1000, fixed_seconds=3.6)
    assert [r.steps for r in strong] == [1000, 1000]
    assert strong[1].hours == pytest.approx((3.6 + 1000 * 0.016) / 3600)
    assert strong[1].device_hours == pytest.approx(4 * strong[1].hours)
    assert predict(HAND, [1], "weak", 10)[0].hours is None


def test_interconnects_parse_and_carry_their_sources():
    assert parse_interconnect("nvlink4").bandwidth_gbs == 450  # 900 GB/s both ways / 2
    assert parse_interconnect("tpu-v5e-ici").link.bandwidth == 200e9
    own = parse_interconnect("25:2").link
    assert (own.bandwidth, own.latency) == pytest.approx((25e9, 2e-6))
    default = parse_interconnect("25").link
    assert (default.bandwidth, default.latency) == pytest.approx((25e9, 5e-6))
    for bad in ("warp-drive", "0", "-3", "nan", "25:x"):
        with pytest.raises(ValueError, match="not a known interconnect.*nvlink4"):
            parse_interconnect(bad)
    for name, link in INTERCONNECTS.items():
        assert link.name == name and link.bandwidth_gbs > 0 and link.source and link.listed
    assert {"nvlink4", "pcie5", "ethernet-100g", "ethernet-400g", "infiniband-100g",
            "infiniband-400g", "tpu-v5e-ici"} <= set(INTERCONNECTS)


def test_prediction_counts():
    assert prediction_counts(64) == [1, 2, 4, 8, 16, 32, 64]
    assert prediction_counts(12, extra=[3, 99]) == [1, 2, 3, 4, 8, 12]
    assert prediction_counts(64, per_host=8) == [1, 2, 4, 8, 16, 32, 64]
    assert prediction_counts(24, per_host=6) == [1, 2, 4, 6, 12, 24]


def test_the_readme_states_the_assumptions_and_the_table_the_code_uses():
    from pathlib import Path

    from jaxdist.scaling.costmodel import ASSUMPTIONS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    quoted = " ".join(line[2:] for line in readme.splitlines() if line.startswith("> "))
    assert ASSUMPTIONS in quoted
    for link in INTERCONNECTS.values():
        row = (f"| `{link.name}` | {link.description} | {link.listed} | "
               f"{link.bandwidth_gbs:g} | {link.latency_us:g} | {link.source} |")
        assert row in readme, row


def test_the_volume_of_a_split_step_scales_its_communication():
    link = Link(bandwidth=1e9, latency=0.0)
    compute = ComputeModel(overhead=0.0, per_example=0.0)
    base = StepModel(compute, link, 1_000_000)
    again = StepModel(compute, link, 1_000_000, volume=1.5)
    for devices in (2, 8):
        assert again.allreduce_seconds(devices) == pytest.approx(
            ring_allreduce_seconds(1_500_000, devices, link))
        assert again.allreduce_seconds(devices) == pytest.approx(
            1.5 * base.allreduce_seconds(devices))
