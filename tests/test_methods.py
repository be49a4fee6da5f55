"""Method policies draw plans of the right structure; bad names and options are refused clearly."""

import dataclasses

import pytest
import torch

from tuner.methods import (
    METHODS, AlignProp, DRaFT, DRaFTLV, DRTune, Plan, ReFL, get_method, last_steps, spaced_steps,
)

DRAWS = 400


def _plans(method, num_steps, seed=0, n=DRAWS):
    g = torch.Generator().manual_seed(seed)
    return [method.plan(num_steps, g) for _ in range(n)]


def test_registry_names():
    assert sorted(METHODS) == ["alignprop", "draft", "draft-lv", "drtune", "refl"]
    for name, cls in METHODS.items():
        assert get_method(name).name == name and isinstance(get_method(name), cls)


def test_unknown_method_lists_names():
    with pytest.raises(ValueError, match="unknown method 'dtrune'.*alignprop.*drtune"):
        get_method("dtrune")


@pytest.mark.parametrize("name,options,match", [
    ("drtune", {"k": 3}, "no option 'k'.*num_trained"),
    ("drtune", {"num_trained": 0}, "num_trained must be a positive integer"),
    ("drtune", {"detach_input": "no"}, "detach_input must be true or false"),
    ("drtune", {"spacing": "first"}, "spacing must be one of"),
    ("refl", {"early_stop_range": -1}, "early_stop_range"),
    ("draft", {"k": 1.5}, "option k"),
    ("draft-lv", {"n": 0}, "option n"),
    ("alignprop", {"min_steps": 5, "max_steps": 2}, "max_steps"),
])
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        get_method(name, **options)


def test_drtune_defaults_and_structure():
    method = get_method("drtune")
    assert (method.num_trained, method.early_stop_range, method.detach_input, method.spacing) == (5, 10, True, "equal")
    T = 50
    plans = _plans(method, T)
    assert {p.stop for p in plans} == set(range(40, 50))  # uniform over the last 10 steps
    for p in plans:
        assert p.predict_x0 and p.detach_input and not p.renoise
        stride = (p.stop + 1) // 5
        assert len(p.trained) == 5 and p.trained[-1] <= p.stop
        assert all(b - a == stride for a, b in zip(p.trained, p.trained[1:]))  # equally spaced
        assert 0 <= p.trained[0] < stride
        assert p.grad_from <= p.trained[0]


def test_drtune_offset_covers_every_value():
    method = DRTune(num_trained=4, early_stop_range=1)  # stop is always T-1 = 19, stride 5
    offsets = {p.trained[0] for p in _plans(method, 20)}
    assert offsets == set(range(5))
    stops = {p.stop for p in _plans(method, 20, n=20)}
    assert stops == {19}


def test_drtune_trains_all_running_steps_when_fewer_than_k():
    method = DRTune(num_trained=5, early_stop_range=4)
    for p in _plans(method, 6, n=100):
        assert p.stop in range(2, 6)
        if p.stop + 1 <= 5:
            assert p.trained == tuple(range(p.stop + 1))
        else:
            assert len(p.trained) == 5


def test_drtune_without_stop_gradient_differs_only_in_the_detach():
    with_sg, without = _plans(DRTune(), 30, seed=2), _plans(DRTune(detach_input=False), 30, seed=2)
    assert all(not p.detach_input for p in without)
    assert [dataclasses.replace(p, detach_input=False) for p in with_sg] == without


def test_drtune_last_k_trains_the_last_steps_that_run():
    plans = _plans(DRTune(num_trained=3, early_stop_range=5, spacing="last"), 20)
    assert {p.stop for p in plans} == set(range(15, 20))
    for p in plans:
        assert p.trained == (p.stop - 2, p.stop - 1, p.stop) and p.grad_from == p.stop - 2 and p.detach_input
    short = _plans(DRTune(num_trained=3, early_stop_range=4, spacing="last"), 4)
    assert {p.stop for p in short} == {0, 1, 2, 3}  # an early stop at step 0 or 1 runs fewer than K steps: all trained
    for p in short:
        assert p.trained == tuple(range(max(0, p.stop - 2), p.stop + 1))


@pytest.mark.parametrize("method,option", [(DRTune(num_trained=5), "num_trained=5"), (DRaFT(k=5), "k=5"),
                                           (AlignProp(min_steps=5), "min_steps=5")])
def test_a_plan_that_cannot_fit_the_chain_is_refused(method, option):
    """K trained steps in a chain of fewer steps (FLUX.1-schnell samples in 4) is refused, not silently shrunk."""
    with pytest.raises(ValueError, match=f"{option} needs at least 5 sampling steps.*num_steps=4"):
        method.plan(4, torch.Generator().manual_seed(0))
    method.check_fits(5)
    assert len(method.plan(5, torch.Generator().manual_seed(0)).trained) >= 1


def test_last_steps():
    assert last_steps(10, 3) == (7, 8, 9)
    assert last_steps(2, 5) == (0, 1)


def test_spaced_steps():
    g = torch.Generator().manual_seed(0)
    assert spaced_steps(3, 5, g) == (0, 1, 2)
    assert spaced_steps(5, 5, g) == (0, 1, 2, 3, 4)
    seen = {spaced_steps(11, 2, g) for _ in range(200)}
    assert seen == {(o, o + 5) for o in range(5)}


def test_refl_structure():
    plans = _plans(ReFL(), 40)
    assert {p.stop for p in plans} == set(range(30, 40))  # the ReFL paper's t in [30, 40) of 40
    for p in plans:
        assert p.trained == (p.stop,) and p.predict_x0 and p.grad_from == p.stop


def test_draft_structure():
    assert DRaFT().k == 1
    for k in (1, 3):
        (p,) = _plans(DRaFT(k=k), 50, n=1)
        assert p.trained == tuple(range(50 - k, 50)) and p.grad_from == 50 - k
        assert p.stop == 49 and not p.predict_x0 and not p.detach_input and not p.renoise
    (p,) = _plans(DRaFT(k=4), 4, n=1)
    assert p.trained == (0, 1, 2, 3)


def test_draft_lv_structure():
    (p,) = _plans(DRaFTLV(), 50, n=1)
    assert p.renoise == 2 and p.trained == (49,) and p.stop == 49 and not p.predict_x0


def test_alignprop_suffix_lengths():
    lengths = {len(p.trained) for p in _plans(AlignProp(min_steps=2, max_steps=6), 50)}
    assert lengths == set(range(2, 7))
    for p in _plans(AlignProp(), 8, n=50):
        assert p.trained == tuple(range(8 - len(p.trained), 8)) and p.grad_from == p.trained[0]
        assert p.stop == 7 and not p.detach_input
    assert {len(p.trained) for p in _plans(AlignProp(), 8)} == set(range(1, 9))


def test_plans_are_deterministic_given_the_generator():
    for cls in METHODS.values():
        assert _plans(cls(), 30, seed=3, n=20) == _plans(cls(), 30, seed=3, n=20)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=5, stop=5, predict_x0=False, trained=(4,), detach_input=False, grad_from=4), "stop"),
    (dict(num_steps=5, stop=4, predict_x0=False, trained=(), detach_input=False, grad_from=0), "empty"),
    (dict(num_steps=5, stop=4, predict_x0=False, trained=(3, 1), detach_input=False, grad_from=0), "sorted"),
    (dict(num_steps=5, stop=2, predict_x0=True, trained=(3,), detach_input=True, grad_from=0), "lie in"),
    (dict(num_steps=5, stop=4, predict_x0=False, trained=(1,), detach_input=False, grad_from=2), "lie in"),
    (dict(num_steps=5, stop=4, predict_x0=False, trained=(3,), detach_input=False, grad_from=3, renoise=2), "renoise"),
])
def test_invalid_plans(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Plan(**kwargs)


def test_drtune_first_steps_trains_only_early_steps_and_still_runs_to_the_stop():
    plans = _plans(DRTune(num_trained=2, early_stop_range=3, first_steps=6), 20)
    assert {p.stop for p in plans} == {17, 18, 19}
    assert {p.trained for p in plans} == {(0, 3), (1, 4), (2, 5)}  # stride 3 over steps 0..5, every offset
    assert all(p.grad_from == p.trained[0] and p.detach_input for p in plans)
    with pytest.raises(ValueError, match="first_steps must be a positive integer"):
        get_method("drtune", first_steps=0)
