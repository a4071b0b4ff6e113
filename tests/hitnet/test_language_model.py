"""Language model: shapes, weight tying, FP checkpoint into a ternary model, config round trip."""

import pytest
import torch

from hitnet.language_model import ModelConfig, RNNLanguageModel, detach_state
from hitnet.quantizers import QuantConfig

TERNARY = QuantConfig(weight="ttq", activation="btq")


DETERMINISTIC_GRU_ACCUMULATOR = QuantConfig(
    weight="ttq", activation="btq", btq_eval="deterministic", gru_accumulator=True
)


@pytest.mark.parametrize(
    ("cell", "quant"),
    [("lstm", QuantConfig()), ("gru", QuantConfig()), ("gru", DETERMINISTIC_GRU_ACCUMULATOR)],
)
def test_forward_shapes_and_state_carry(cell, quant):
    config = ModelConfig(vocab_size=50, cell=cell, embedding_size=8, hidden_size=8, quant=quant)
    model = RNNLanguageModel(config)
    assert isinstance(model.initial_state(3), tuple) == (cell == "lstm" or quant.gru_accumulator)
    tokens = torch.randint(0, 50, (7, 3))
    logits, _ = model(tokens, model.initial_state(3))
    assert logits.shape == (7, 3, 50)
    model.eval()
    # Running two halves with the carried state equals running the whole sequence.
    whole, _ = model(tokens)
    first, mid = model(tokens[:4])
    second, _ = model(tokens[4:], detach_state(mid))
    assert torch.allclose(whole, torch.cat([first, second]), atol=1e-6)


def test_tied_weights_share_one_tensor_and_untied_do_not():
    tied = RNNLanguageModel(
        ModelConfig(vocab_size=20, embedding_size=6, hidden_size=6, tie_weights=True)
    )
    untied = RNNLanguageModel(ModelConfig(vocab_size=20, embedding_size=6, hidden_size=6))
    assert tied.decoder.weight is tied.embedding.weight
    assert untied.decoder.weight is not untied.embedding.weight


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_full_precision_checkpoint_loads_into_ternary_model_unchanged(cell):
    fp = RNNLanguageModel(ModelConfig(vocab_size=30, cell=cell, embedding_size=6, hidden_size=6))
    ternary = RNNLanguageModel(
        ModelConfig(
            vocab_size=30,
            cell=cell,
            embedding_size=6,
            hidden_size=6,
            quant=TERNARY,
            lambda_sigma=2.0,
        )
    )
    ternary.load_state_dict(fp.state_dict())  # strict: same keys, same shapes
    for name, value in fp.state_dict().items():
        assert torch.equal(value, ternary.state_dict()[name])


def test_ternary_embedding_decoder_switch_ternarizes_their_weights():
    config = ModelConfig(
        vocab_size=30,
        embedding_size=6,
        hidden_size=6,
        dropout=0.0,
        quant=QuantConfig(ttq_scaled=False),
        ternary_embedding_decoder=True,
    )
    model = RNNLanguageModel(config)
    seen = []
    model.recurrent.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    model(torch.randint(0, 30, (4, 2)))
    assert set(seen[0].unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_config_round_trips_through_plain_dict():
    config = ModelConfig(vocab_size=10, cell="gru", quant=TERNARY, lambda_tanh=3.0)
    assert ModelConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cell": "rnn"}, "cell must be one of 'lstm', 'gru', got 'rnn'"),
        ({"tie_weights": True, "embedding_size": 4, "hidden_size": 5}, "tie_weights needs"),
        ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
        ({"hidden_size": 0}, "hidden_size must be >= 1, got 0"),
        ({"lambda_tanh": 0.0}, "lambda_tanh must be > 0, got 0.0"),
    ],
)
def test_bad_model_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError) as error:
        ModelConfig(vocab_size=10, **kwargs)
    assert message in str(error.value)


def test_full_precision_config_is_the_same_model_unquantized():
    config = ModelConfig(
        vocab_size=50,
        cell="gru",
        embedding_size=8,
        hidden_size=8,
        dropout=0.3,
        quant=TERNARY,
        lambda_sigma=2.0,
        lambda_tanh=3.0,
        ternary_embedding_decoder=True,
    )
    fp = config.full_precision()
    assert (fp.quant, fp.lambda_sigma, fp.lambda_tanh) == (QuantConfig(), 1.0, 1.0)
    assert not fp.ternary_embedding_decoder
    assert (fp.cell, fp.hidden_size, fp.dropout) == ("gru", 8, 0.3)
    assert RNNLanguageModel(fp).recurrent.uses_fused_kernel
