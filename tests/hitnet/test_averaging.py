"""Polyak averaging of weights: the mean it keeps and the swap in and out of a module."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hitnet.averaging import WeightAverage


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 12))
def test_mean_is_the_arithmetic_mean_of_every_state_seen(seed, steps):
    torch.manual_seed(seed)
    module = nn.Linear(5, 3)
    seen = [module.weight.detach().clone()]
    average = WeightAverage(module)
    for _ in range(steps):
        with torch.no_grad():
            module.weight.add_(torch.randn(3, 5))
        seen.append(module.weight.detach().clone())
        average.update()
    assert average.count == steps + 1
    assert torch.allclose(average.mean["weight"], torch.stack(seen).mean(0), atol=1e-5)


def test_swap_puts_the_mean_in_and_a_second_swap_restores_the_weights_exactly():
    torch.manual_seed(0)
    module = nn.Linear(4, 4)
    average = WeightAverage(module)
    with torch.no_grad():
        module.weight.mul_(3.0)
    average.update()
    trained = {name: p.detach().clone() for name, p in module.named_parameters()}
    expected_mean = (trained["weight"] / 3.0 + trained["weight"]) / 2

    before = average.state()
    average.swap()
    assert average.applied
    assert torch.allclose(module.weight, expected_mean)
    assert not torch.allclose(module.weight, trained["weight"])
    during = average.state()  # the same (mean, training weights) while the mean is applied
    average.swap()
    assert not average.applied
    for name, p in module.named_parameters():
        assert torch.equal(p, trained[name])
    for mean, training in (before, during):
        assert torch.allclose(mean["weight"], expected_mean)
        assert all(torch.equal(training[name], trained[name]) for name in trained)


def test_a_mean_of_other_parameters_is_rejected():
    with pytest.raises(ValueError, match="exactly the module's parameters"):
        WeightAverage(nn.Linear(2, 2), mean={"weight": torch.zeros(2, 2)})
