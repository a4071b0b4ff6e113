"""Random test inputs drawn from a seed that hypothesis picks, so that a failing example
replays exactly."""

import torch
from hypothesis import strategies as st

seeds = st.integers(0, 2**31 - 1)


def normal_tensor(seed: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Standard normal values times ``scale``, from ``seed`` alone."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
