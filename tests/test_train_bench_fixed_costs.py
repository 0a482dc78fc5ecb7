"""The training benchmark splits a short run's wall time into its fixed parts and its steps."""

from __future__ import annotations

import time

import pytest

from benchmarks.train_throughput import fixed_cost_clock, fixed_costs


def test_fixed_costs_put_every_second_of_a_run_in_one_part():
    """Marks on the driver's clock and step rows in Unix time: the parts add up to the run."""
    now_perf, now_unix = time.perf_counter(), time.time()
    started = now_perf - 100.0
    clock = fixed_cost_clock()
    clock.marks = {"fit_in": started + 2.0, "materialize_s": 8.0, "fit_out": started + 95.0}
    unix = now_unix - now_perf  # Unix = perf_counter + this
    # the first step starts 30 s after fit is entered (8 s of which read the corpus), 4 steps
    # of 1 s end at +41 ... +44 s (the first waited 0.5 s for its batch)
    rows = [
        {"step_s": 1.0, "data_s": 0.5 if i == 0 else 0.01, "end_unix": unix + started + 41.0 + i}
        for i in range(4)
    ]
    parts = fixed_costs(clock, rows, started, started + 96.0)
    assert parts == pytest.approx(
        {
            "before_fit_s": 2.0,
            "driver_read_s": 8.0,
            "to_first_step_s": 30.0,
            "first_batch_wait_s": 0.5,
            "steps_s": 4.0,
            "after_last_step_s": 51.0,
            "publish_s": 1.0,
        },
        abs=0.02,
    )
    total = sum(v for k, v in parts.items() if k != "first_batch_wait_s")
    assert total == pytest.approx(96.0, abs=0.05)


def test_the_clock_restores_what_it_times():
    import ray.data

    import mess_ray.train.pretrain as pretrain

    fit, materialize = pretrain.fit, ray.data.Dataset.materialize
    with fixed_cost_clock():
        assert pretrain.fit is not fit and ray.data.Dataset.materialize is not materialize
    assert pretrain.fit is fit and ray.data.Dataset.materialize is materialize
