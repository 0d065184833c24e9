"""The torch modules: shapes, gradients, layer count, standardisation, configuration."""

from __future__ import annotations

import pytest
import torch
from _model_helpers import tiny_model_config

from afpx import AfpxError
from afpx.model import AFPNet, ModelConfig, count_layers, vae_layers

torch.set_num_threads(1)


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    afp = torch.rand(n, 12, 256, generator=g) * 5
    r0 = 2 + torch.rand(n, generator=g)
    dmin = 0.8 + 0.2 * torch.rand(n, generator=g)
    z = torch.randint(1, 119, (n,), generator=g)
    return afp, r0, dmin, z


@pytest.mark.parametrize("preset", ["paper", "small"])
def test_shapes_and_gradients_reach_every_parameter(preset: str) -> None:
    net = AFPNet(ModelConfig.preset_config(preset))
    afp, r0, dmin, z = _batch()
    net.initialise_standardisation(afp, r0, dmin)
    out = net(afp, r0, dmin)
    assert out.reconstruction.shape == afp.shape
    assert out.mu.shape == out.logvar.shape == out.latent.shape == (6, 64)
    assert out.sigmoid_logits.shape == out.softmax_logits.shape == (6, 118)
    terms = net.loss_terms(out, afp, z)
    assert set(terms) == {"reconstruction", "kl", "sigmoid_bce", "softmax_ce"}
    loss = sum(terms.values()) + 5e-4 * net.l2_penalty()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.startswith("r0_norm."):
            continue  # r0 enters through batch normalisation, which undoes its offset and scale
        assert p.grad.abs().sum() > 0, name


def test_paper_preset_vae_has_42_layers_and_five_layer_classifiers() -> None:
    net = AFPNet(ModelConfig.preset_config("paper"))
    assert vae_layers(net) == 42
    assert count_layers(net.encoder) == 21  # 20 convolutions + the (mu, logvar) head
    assert count_layers(net.decoder) == 21  # the latent's linear layer + 20 (transposed) convs
    assert count_layers(net.sigmoid_classifier) == 5
    assert count_layers(net.softmax_classifier) == 5
    # the sigmoid classifier reads latent + dmin_ratio, the softmax one 118 outputs + r0
    assert net.sigmoid_classifier[0].in_features == 65
    assert net.softmax_classifier[0].in_features == 119
    assert net.softmax_norm.num_features == 119


def test_count_layers_counts_only_weight_layers() -> None:
    seq = torch.nn.Sequential(
        torch.nn.Conv1d(2, 2, 3),
        torch.nn.ELU(),
        torch.nn.Dropout(0.1),
        torch.nn.BatchNorm1d(2),
        torch.nn.ConvTranspose1d(2, 2, 2),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 4),
    )
    assert count_layers(seq) == 3


def test_dropout_only_between_hidden_layers() -> None:
    net = AFPNet(ModelConfig.preset_config("paper"))
    for mlp in (net.sigmoid_classifier, net.softmax_classifier):
        assert isinstance(mlp[-1], torch.nn.Linear)  # no activation or dropout on the output
        assert sum(isinstance(m, torch.nn.Dropout) for m in mlp) == 4
        assert all(m.p == 0.05 for m in mlp if isinstance(m, torch.nn.Dropout))
    assert isinstance(net.decoder.convs[-1], torch.nn.ConvTranspose1d | torch.nn.Conv1d)
    assert sum(isinstance(m, torch.nn.ELU) for m in net.modules()) > 40


def test_vae_dropout_can_differ_from_the_classifiers() -> None:
    net = AFPNet(ModelConfig.preset_config("paper", vae_dropout=0.0))
    vae = [*net.encoder.modules(), *net.decoder.modules()]
    assert not any(isinstance(m, torch.nn.Dropout) for m in vae)
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.sigmoid_classifier) == 4


def test_xavier_initialisation() -> None:
    net = AFPNet(tiny_model_config())
    lin = net.sigmoid_classifier[0]
    bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
    assert lin.weight.abs().max() <= bound
    assert lin.weight.abs().max() > 0.8 * bound
    assert (lin.bias == 0).all()


def test_standardisation_round_trip_and_initial_statistics() -> None:
    net = AFPNet(tiny_model_config())
    afp, r0, dmin, _ = _batch(200)
    net.initialise_standardisation(afp, r0, dmin)
    x = net.afp_norm(afp)
    assert x.mean(0).abs().max() < 1e-4
    assert (x.std(0) - 1).abs().max() < 1e-3
    torch.testing.assert_close(net.afp_norm.inverse(x), afp, rtol=1e-5, atol=1e-5)
    # offset and scale are learned parameters, the references frozen buffers
    names = dict(net.named_parameters())
    assert "afp_norm.shift" in names and "afp_norm.log_gain" in names
    assert "afp_norm.ref_scale" in dict(net.named_buffers())


def test_learned_scale_cannot_shrink_reconstruction_loss() -> None:
    # the reconstruction error is measured in the frozen initial units: blowing
    # up the learned scale gives no free reduction of the loss
    torch.manual_seed(0)
    net = AFPNet(tiny_model_config()).eval()
    afp, r0, dmin, z = _batch(32)
    net.initialise_standardisation(afp, r0, dmin)
    base = net.loss_terms(net(afp, r0, dmin), afp, z)["reconstruction"]
    with torch.no_grad():
        net.afp_norm.log_gain.add_(4.6)  # γ x 100
    scaled = net.loss_terms(net(afp, r0, dmin), afp, z)["reconstruction"]
    assert scaled > base


def test_sigmoid_loss_weights_the_positive_class() -> None:
    net = AFPNet(tiny_model_config()).eval()
    afp, r0, dmin, z = _batch(4)
    out = net(afp, r0, dmin)
    out = out._replace(sigmoid_logits=torch.zeros_like(out.sigmoid_logits))
    # logits 0: every output costs log 2; the true one 118 log 2
    bce = net.loss_terms(out, afp, z, pos_weight=118.0)["sigmoid_bce"]
    torch.testing.assert_close(bce, torch.tensor((117 + 118) * 0.6931472))


def test_eval_mode_is_deterministic() -> None:
    net = AFPNet(tiny_model_config(dropout=0.2)).eval()
    afp, r0, dmin, _ = _batch(8)
    a, b = net(afp, r0, dmin), net(afp, r0, dmin)
    torch.testing.assert_close(a.sigmoid_logits, b.sigmoid_logits)
    torch.testing.assert_close(a.latent, a.mu)


def test_config_round_trip() -> None:
    for name in ("paper", "small"):
        cfg = ModelConfig.preset_config(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.preset_config("small", latent_dim=32).latent_dim == 32
    assert ModelConfig() == ModelConfig.preset_config("paper")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"convs_per_stage": 0}, "must be >= 1"),
        ({"encoder_channels": ()}, "must be >= 1"),
        ({"n_bins": 100}, "not divisible"),
        (
            {"first_stride": 3, "encoder_channels": (4,), "n_bins": 24},
            "first_stride must be 1 or even",
        ),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"vae_dropout": -0.1}, "dropout must be in"),
        ({"classifier_input": "z"}, "classifier_input must be 'sample' or 'mean'"),
    ],
)
def test_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(AfpxError, match=match):
        ModelConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_preset_and_keys() -> None:
    with pytest.raises(AfpxError, match="unknown model preset 'huge'"):
        ModelConfig.preset_config("huge")
    with pytest.raises(AfpxError, match="unknown model configuration keys: colour"):
        ModelConfig.from_dict({"colour": 1})


def test_context_preset_likelihoods_are_softmax_probabilities() -> None:
    from afpx.model import ModelConfig, SiteNet, build_net

    cfg = ModelConfig.preset_config("context")
    net = build_net(cfg)
    assert isinstance(net, SiteNet) and net.sigmoid_head is None
    assert net.needs_context and net.needs_shell  # the default reads the coordination shell
    assert any(isinstance(m, torch.nn.GELU) for m in net.modules())
    net.eval()
    x = torch.rand(6, 12, 256)
    out = net(x, torch.rand(6) + 1.0, torch.rand(6) + 0.5, torch.rand(6, 10 + 256 + 4 + 256))
    p = torch.sigmoid(out.sigmoid_logits)
    torch.testing.assert_close(p, torch.softmax(out.softmax_logits, dim=1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(p.sum(1), torch.ones(6), atol=1e-4, rtol=0)
    terms = net.loss_terms(out, x, torch.tensor([1, 8, 26, 3, 11, 79]))
    assert float(terms["sigmoid_bce"].detach()) == 0.0 and float(terms["softmax_ce"].detach()) > 0
    sig = build_net(ModelConfig.preset_config("context", likelihood_head="sigmoid"))
    assert isinstance(sig, SiteNet) and sig.sigmoid_head is not None
    with pytest.raises(AfpxError, match="likelihood_head must be one of"):
        ModelConfig.preset_config("context", likelihood_head="tanh")
    with pytest.raises(AfpxError, match="activation must be one of"):
        ModelConfig.preset_config("context", activation="relu")
