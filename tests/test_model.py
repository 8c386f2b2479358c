"""The BI-R model's sizes, gates, prior sampling and the conv layers (ALGORITHM.md 2, 3, 8)."""

from pathlib import Path

import pytest
import torch

from tune_bir.errors import ConfigError
from tune_bir.model import BIRModel, ModelSpec
from tune_bir.nets import ConvLayers, load_conv_layers

PUBLISHED_CONV = Path(__file__).resolve().parents[2] / "shared" / "pretrained" / "C3-5x16-bn"


def n_trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def bir_model(in_shape, n_classes, fc_units, dg_prop=0.8, output="sigmoid", seed=0) -> BIRModel:
    spec = ModelSpec(in_shape, n_classes, fc_units, gmm_prior=True, dg_prop=dg_prop, output=output)
    return BIRModel(spec, torch.Generator().manual_seed(seed))


def test_parameter_counts_match_the_reference_models():
    assert n_trainable(bir_model((1, 28, 28), 10, 400)) == 1_075_694
    assert n_trainable(bir_model((256, 2, 2), 100, 2000, dg_prop=0.6, output="linear")) == 12_925_224
    assert n_trainable(ConvLayers()) == 393_088


@pytest.mark.parametrize("size", [32, 24])
def test_conv_layers_give_256x2x2_features(size):
    assert ConvLayers()(torch.zeros(2, 3, size, size)).shape == (2, 256, 2, 2)


def test_gate_masks_have_the_requested_proportion_and_differ_by_class():
    model = bir_model((1, 28, 28), 10, 400, dg_prop=0.8)
    for layer in [model.fromZ, *model.fcD_hidden]:
        mask = layer.mask
        assert mask.shape == (10, 400)
        n = mask.numel()
        gated = (mask == 0).float().mean().item()
        assert abs(gated - 0.8) < 4 * (0.8 * 0.2 / n) ** 0.5
        assert not torch.equal(mask[0], mask[1])


def test_gate_with_one_hot_input_is_the_class_row_of_the_mask():
    model = bir_model((1, 28, 28), 10, 400)
    one_hot = torch.nn.functional.one_hot(torch.tensor([3]), 10).float()
    z = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    layer = model.fromZ
    assert torch.equal(layer(z, one_hot), torch.relu(layer.linear(z) * layer.mask[3]))


def test_gate_masks_are_part_of_the_state_dict():
    a, b = bir_model((1, 28, 28), 10, 400, seed=1), bir_model((1, 28, 28), 10, 400, seed=2)
    assert not torch.equal(a.fromZ.mask, b.fromZ.mask)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.fromZ.mask, b.fromZ.mask)
    assert torch.equal(a.fcD_hidden[0].mask, b.fcD_hidden[0].mask)


def test_latent_samples_come_from_the_modes_of_the_requested_classes():
    model = bir_model((1, 28, 28), 10, 400)
    with torch.no_grad():
        model.z_class_logvars.fill_(-20.0)  # near-deterministic: z equals the class mode
    classes = torch.tensor([0, 3, 3, 7])
    z = model.sample_latent(classes, torch.Generator().manual_seed(0))
    assert torch.allclose(z, model.z_class_means[classes].detach(), atol=1e-3)


def test_decoder_output_shape_and_range():
    model = bir_model((1, 28, 28), 10, 400)
    out = model.generate(torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 28, 28)
    assert out.min() >= 0 and out.max() <= 1


def test_sampling_does_not_change_the_training_mode():
    model = bir_model((1, 28, 28), 10, 400)
    model.train()
    model.generate(torch.tensor([0]), torch.Generator().manual_seed(0))
    assert model.training


def test_frozen_conv_layers_stay_in_eval_mode(tmp_path):
    path = tmp_path / "conv.pt"
    torch.save({"state": ConvLayers().state_dict()}, path)
    conv = load_conv_layers(path, torch.device("cpu"))
    conv.train()
    assert not conv.training and not conv.convLayer1.bn.training
    assert not any(p.requires_grad for p in conv.parameters())
    stats = conv.convLayer1.bn.running_mean.clone()
    conv(torch.randn(4, 3, 32, 32))
    assert torch.equal(stats, conv.convLayer1.bn.running_mean)


def test_conv_file_that_is_not_a_matching_state_dict_is_a_clear_error(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"state": {"convLayer1.conv.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(ConfigError, match="does not match"):
        load_conv_layers(wrong, torch.device("cpu"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a torch state dict"):
        load_conv_layers(garbage, torch.device("cpu"))
    with pytest.raises(ConfigError, match="tune_bir.pretrain"):
        load_conv_layers(tmp_path / "missing.pt", torch.device("cpu"))


@pytest.mark.skipif(not PUBLISHED_CONV.is_file(), reason="published conv layers not beside the checkout")
def test_conv_layers_published_with_the_original_code_load():
    conv = load_conv_layers(PUBLISHED_CONV, torch.device("cpu"))
    assert sum(p.numel() for p in conv.parameters()) == 393_088
    features = conv(torch.randn(2, 3, 32, 32))
    assert features.shape == (2, 256, 2, 2) and torch.isfinite(features).all()
    assert conv.convLayer1.bn.running_var.abs().sum() > 0
