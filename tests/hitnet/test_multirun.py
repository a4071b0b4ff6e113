"""Stacked runs equal separate runs: R runs trained in one forward / backward give, for the same
seeds, the logits, losses, gradients and (after SGD steps with per-run clipping and lr) the
weights of R single-run models trained one by one. In float64, so only rounding differs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hitnet.language_model import ModelConfig, RNNLanguageModel, detach_state
from hitnet.lightning_module import Distillation
from hitnet.multirun import (
    StackedSGD,
    clip_grad_norm_per_run_,
    per_run_training_loss,
)
from hitnet.quantizers import QuantConfig, set_activation_noise
from hitnet.recurrent import run_layer
from hitnet.stacked_model import StackedLanguageModel
from hitnet.stacked_recurrent import StackedRecurrence
from tests.hitnet.compiled_checks import assert_compiled_equals_reference

VOCAB, SEQ_LEN, BATCH, TOL = 17, 4, 3, 1e-10
CLIP = 0.12  # these small models' gradient norms lie around 0.1-0.2: some runs clip, some not
TERNARY = QuantConfig(weight="ttq", activation="btq", slope_gradient="unit")
BASE = ModelConfig(vocab_size=VOCAB, embedding_size=6, hidden_size=5, dropout=0.3)
VARIANTS = {
    "plain": {},
    "two layers": {"num_layers": 2},
    "tied, ternary embedding and decoder": {
        "embedding_size": 5,
        "tie_weights": True,
        "ternary_embedding_decoder": True,
    },
    "per-row TTQ": {"quant": replace(TERNARY, ttq_per_row=True)},
    "TTQ activations": {"quant": replace(TERNARY, activation="ttq")},
    "GRU accumulator": {"quant": replace(TERNARY, gru_accumulator=True)},
}


@contextmanager
def float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _config(cell: str, ternary: bool, variant: str) -> ModelConfig:
    quant = TERNARY if ternary else QuantConfig()
    slopes = {"lambda_sigma": 2.0, "lambda_tanh": 1.5} if ternary else {}
    config = replace(BASE, cell=cell, quant=quant, **slopes)
    extra = dict(VARIANTS[variant])
    if not ternary:  # the variant's quantization needs a ternary model
        extra.pop("quant", None)
        extra.pop("ternary_embedding_decoder", None)
    return replace(config, **extra)


def _models(config: ModelConfig, seeds: list[int]) -> list[RNNLanguageModel]:
    models = []
    for seed in seeds:
        torch.manual_seed(seed)  # as a training stage seeds its run before building it
        model = RNNLanguageModel(config)
        # torch's fused kernel draws its between-layer dropout inside, where no generator
        # reaches: several FP layers are compared on the reference loop (the same function)
        model.recurrent.fused_full_precision = config.num_layers == 1
        models.append(model)
    return models


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + seed) for seed in seeds]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= TOL)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_three_distilled_ternary_runs_train_exactly_as_separate_runs(cell):
    _train_stacked_and_separate(3, cell, True, "plain", True, 7, [20.0, 5.0, 1.0])


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(
    runs=st.integers(1, 4),
    cell=st.sampled_from(["lstm", "gru"]),
    ternary=st.booleans(),
    variant=st.sampled_from(sorted(VARIANTS)),
    distilled=st.booleans(),
    seed=st.integers(0, 10_000),
    lrs=st.lists(st.floats(0.5, 30.0), min_size=4, max_size=4),
)
def test_stacked_runs_train_exactly_as_separate_runs(
    runs, cell, ternary, variant, distilled, seed, lrs
):
    _train_stacked_and_separate(runs, cell, ternary, variant, distilled, seed, lrs)


def _train_stacked_and_separate(
    runs: int,
    cell: str,
    ternary: bool,
    variant: str,
    distilled: bool,
    seed: int,
    lrs: list[float],
) -> None:
    """Three windows of training, stacked and one run at a time, compared at every step."""
    with float64():
        config = _config(cell, ternary, variant)
        seeds = [seed + run for run in range(runs)]
        singles = _models(config, seeds)
        stacked = StackedLanguageModel(singles)
        torch.manual_seed(seed)
        teacher = RNNLanguageModel(config.full_precision())
        tokens = torch.randint(VOCAB, (3 * SEQ_LEN + 1, BATCH))
        weight = 0.7 if distilled else 0.0
        teachers = [Distillation(teacher, 2.0) if distilled else None for _ in range(runs + 1)]
        # each single run: its own generator, optimizer, state, distillation state
        generators = _generators(seeds)
        optimizers = [torch.optim.SGD(m.parameters(), lr=lrs[r]) for r, m in enumerate(singles)]
        states = [None] * runs
        lr = torch.tensor(lrs[:runs])
        stacked_optimizer = StackedSGD(stacked.parameters(), lr=lr.clone())
        stacked_generators, stacked_state = _generators(seeds), None

        for window in range(3):
            inputs = tokens[window * SEQ_LEN : (window + 1) * SEQ_LEN]
            targets = tokens[window * SEQ_LEN + 1 : (window + 1) * SEQ_LEN + 1]
            if window == 2:  # a schedule cuts one run's lr only
                optimizers[0].param_groups[0]["lr"] /= 4
                stacked_optimizer.param_groups[0]["lr"][0] /= 4

            logits, stacked_state = stacked(inputs, stacked_state, stacked_generators)
            stacked_state = detach_state(stacked_state)
            loss, cross_entropy = per_run_training_loss(
                logits, inputs, targets, teachers[-1], weight
            )
            loss.sum().backward()

            for run, model in enumerate(singles):
                single_logits, state = model(inputs, states[run], generator=generators[run])
                states[run] = detach_state(state)
                single_ce = F.cross_entropy(single_logits.view(-1, VOCAB), targets.reshape(-1))
                single_loss = single_ce
                if distilled:
                    soft = teachers[run].loss(inputs, single_logits)
                    single_loss = (1 - weight) * single_ce + weight * soft
                single_loss.backward()
                assert _close(logits[run], single_logits)
                assert _close(cross_entropy[run], single_ce)
                assert _close(loss[run], single_loss)
                for name, param in model.named_parameters():
                    assert _close(stacked.get_parameter(name).grad[run], param.grad), name

            stacked_norms = clip_grad_norm_per_run_(stacked.parameters(), CLIP)
            stacked_optimizer.step()
            stacked_optimizer.zero_grad()
            for run, (model, optimizer) in enumerate(zip(singles, optimizers, strict=True)):
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                assert _close(stacked_norms[run], norm)
                optimizer.step()
                optimizer.zero_grad()
                # run r's slice of the stacked model is run r's model, in its own format
                expected = model.state_dict()
                got = stacked.run_state_dict(run)
                assert got.keys() == expected.keys()
                for name, value in expected.items():
                    assert _close(got[name], value), name


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("btq_eval", ["stochastic", "deterministic"])
def test_stacked_evaluation_equals_separate_evaluation(cell, btq_eval):
    """In eval mode (no dropout; BTQ drawn from the eval seed's generator or rounded)."""
    with float64():
        config = replace(BASE, cell=cell, quant=replace(TERNARY, btq_eval=btq_eval))
        singles = _models(config, [3, 4])
        stacked = StackedLanguageModel(singles).eval()
        tokens = torch.randint(VOCAB, (SEQ_LEN, BATCH))
        with torch.no_grad():
            logits, _ = stacked(tokens, generators=_generators([0, 0]))
            for run, model in enumerate(singles):
                expected, _ = model.eval()(tokens, generator=_generators([0])[0])
                assert _close(logits[run], expected)


def test_the_warmup_noise_level_reaches_stacked_runs():
    with float64():
        config = replace(BASE, quant=TERNARY)
        singles = _models(config, [1, 2])
        stacked = StackedLanguageModel(singles)
        for model in [*singles, stacked]:
            set_activation_noise(model, 0.4)
        tokens = torch.randint(VOCAB, (SEQ_LEN, BATCH))
        logits, _ = stacked(tokens, generators=_generators([1, 2]))
        for run, model in enumerate(singles):
            expected, _ = model(tokens, generator=_generators([1, 2])[run])
            assert _close(logits[run], expected)


def test_each_run_is_clipped_on_its_own_norm():
    first = torch.zeros(2, 3, requires_grad=True)
    second = torch.zeros(2, 4, requires_grad=True)
    first.grad = torch.tensor([[3.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    second.grad = torch.tensor([[0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    norms = clip_grad_norm_per_run_([first, second], 0.25)
    assert torch.allclose(norms, torch.tensor([5.0, 0.01]))
    # run 0 scaled to norm 0.25, run 1 (already under the bar) untouched
    assert torch.allclose(first.grad[0], torch.tensor([0.15, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(second.grad[0], torch.tensor([0.0, 0.2, 0.0, 0.0]), atol=1e-6)
    assert torch.equal(first.grad[1], torch.tensor([0.01, 0.0, 0.0]))


def test_stacked_sgd_descends_each_run_by_its_own_lr():
    param = torch.ones(3, 2, requires_grad=True)
    param.grad = torch.ones(3, 2)
    optimizer = StackedSGD([param], lr=torch.tensor([1.0, 0.5, 0.25]))
    optimizer.step()
    assert torch.equal(param.detach()[:, 0], torch.tensor([0.0, 0.5, 0.75]))
    with pytest.raises(ValueError, match="one per run"):
        StackedSGD([param], lr=torch.tensor([1.0, 0.0, 1.0]))


def test_stacking_refuses_what_it_cannot_reproduce():
    lstm, gru = _models(BASE, [0])[0], _models(replace(BASE, cell="gru"), [0])[0]
    with pytest.raises(ValueError, match="one model config"):
        StackedLanguageModel([lstm, gru])
    with pytest.raises(ValueError, match="at least one"):
        StackedLanguageModel([])
    weight_btq = _models(replace(BASE, quant=QuantConfig(weight="btq")), [0])[0]
    with pytest.raises(ValueError, match="weight BTQ"):
        StackedRecurrence([weight_btq.recurrent])
    stacked = StackedLanguageModel(_models(BASE, [0, 1]))
    tokens = torch.randint(VOCAB, (SEQ_LEN, BATCH))
    with pytest.raises(ValueError, match="one generator per run"):
        stacked(tokens, generators=_generators([0]))
    with pytest.raises(ValueError, match="states of shape"):
        stacked(tokens, torch.zeros(1, 2, BATCH + 1, 5))


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead"])
def test_stacked_runs_are_compiled_as_their_single_runs(mode):
    """A stage compiles each single run's recurrence; stacking them must keep that mode, or
    the stacked runs fall back to the eager per-step loop (about 10x slower on a GPU)."""
    models = _models(replace(BASE, quant=TERNARY), [1, 2])
    for model in models:
        model.recurrent.compile_recurrence(mode)
    stacked = StackedLanguageModel(models)
    assert stacked.recurrent.compile_mode == mode
    assert (stacked.recurrent._run_layer is run_layer) == (mode is None)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cell", "quant"),
    [("lstm", TERNARY), ("gru", TERNARY)],
)
def test_compiled_stacked_recurrence_equals_the_eager_one(cell, quant):
    """As tests/hitnet/test_compiled.py checks for one run: the compiled recurrence (the GPU
    fast path) computes the eager one's function, here for three stacked runs."""
    torch._dynamo.reset()  # other tests' compiled shapes must not use up the recompile limit
    config = replace(BASE, cell=cell, quant=quant, num_layers=2, lambda_sigma=2.0)
    reference = StackedRecurrence([m.recurrent for m in _models(config, [1, 2, 3])])
    compiled = StackedRecurrence([m.recurrent for m in _models(config, [1, 2, 3])])
    compiled.compile_recurrence("default")  # inductor; on a GPU the pipeline adds CUDA graphs

    def forward(layer, x, seed):
        return layer(x, generators=_generators([seed, seed + 1, seed + 2]))

    x = torch.randn(SEQ_LEN, 3, BATCH, 6)
    assert_compiled_equals_reference(reference, compiled, x, forward, exact_outputs=False)
