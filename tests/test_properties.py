"""Property-based: random shapes and options, every fast CPU backend against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_close, cpu_backends, make_problem, run


@st.composite
def cases(draw):
    loss = draw(st.sampled_from(["sft", "dft", "psft", "asft"]))
    nd = draw(st.integers(0, 3))
    batch = tuple(draw(st.lists(st.integers(1, 6), min_size=nd, max_size=nd)))
    problem = dict(
        batch=batch, D=draw(st.integers(1, 40)), V=draw(st.integers(1, 300)), bias=draw(st.booleans()),
        ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])), logit_scale=draw(st.sampled_from([0.1, 2.0, 30.0])),
        seed=draw(st.integers(0, 2**16)), ref=loss == "asft", old=draw(st.sampled_from(["perturbed", "none"])),
    )
    if loss == "psft":
        problem["advantages"] = draw(st.sampled_from([None, 1.0, -0.5, 0.0]))
    options = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        temperature=draw(st.sampled_from([1.0, 0.5, 2.0])),
        softcap=draw(st.sampled_from([None, 1.0, 10.0])),
        entropy_coef=draw(st.sampled_from([0.0, 0.05, -0.2])),
        num_items_in_batch=draw(st.sampled_from([None, 5])),
        chunk_size=draw(st.sampled_from([None, 1, 4, 17])),
    )
    if options["reduction"] == "none":  # num_items_in_batch divides a sum: refused with "none"
        options["num_items_in_batch"] = None
    if loss == "psft":
        options.update(eps_low=draw(st.sampled_from([0.0, 0.2])), eps_high=draw(st.sampled_from([0.0, 0.28, 3.0])))
    if loss == "asft":
        options.update(kl_direction=draw(st.sampled_from(["forward", "reverse"])), kl_coef=draw(st.sampled_from([0.0, 0.3])))
    return loss, problem, options


@pytest.mark.parametrize("backend", cpu_backends())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_cases_match_reference(backend, case):
    loss, problem, options = case
    p = make_problem(**problem)
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    expected = run(loss, "reference", p, **ref_options)
    actual = run(loss, backend, p, **options)
    assert_close(actual, expected, rtol=1e-9, atol=1e-11, what=f"{loss} {problem} {options}")
