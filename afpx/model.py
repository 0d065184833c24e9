"""The network of Ryan, Lengyel & Shatruk (2018), as torch modules.

A convolutional variational autoencoder (VAE) turns the 12 × 256 atomic
fingerprint (AFP; the 12 perspectives are the channels of a 1-D convolution
along the radial bins) into a 64-d latent. A sigmoid classifier reads the
latent and ``dmin_ratio`` and gives, for each of the 118 elements, the
likelihood that the element sits on the site. An auxiliary softmax classifier
reads the sigmoid outputs and ``r0`` and predicts one element; it helps
training and gives an error rate, and is not used for prediction.

Everything is built from one frozen :class:`ModelConfig`, saved with the
weights (see :mod:`afpx.train`). This module holds torch modules and their
loss terms only: no I/O, no xarray, no zarr.

What counts as a layer
----------------------
:func:`count_layers` counts the modules that carry a weight matrix or kernel
and map their input to a new output: ``Conv1d``, ``ConvTranspose1d`` and
``Linear``. Activations, dropout, batch normalisation, reshapes and the
learned input standardisation are not layers in this count. The ``paper``
preset's VAE has 42 layers: an encoder of 20 convolutions and one linear head
(giving the mean and log-variance of the latent together), and a decoder of
one linear layer and 20 (transposed) convolutions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from afpx import AfpxError
from afpx.schema import N_BINS, N_ELEMENTS, N_PERSPECTIVES, config_from_dict

PRESETS = ("paper", "small", "context")
ARCHITECTURES = ("vae", "mlp")
PERSPECTIVE_INPUTS = ("all", "mean", "first")
DESCRIPTOR_INPUTS = ("dmin", "dmin_r0", "context", "context_relative", "context_shell")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the network; defaults are the ``paper`` preset.

    Parameters
    ----------
    preset : str
        Name of the preset this configuration came from (informational).
    n_perspectives, n_bins : int
        Shape of one AFP (channels, length).
    latent_dim : int
        Size of the VAE latent (paper: 64).
    encoder_channels : tuple of int
        Output channels of each encoder stage; every stage halves the length
        (its last convolution has ``stride`` 2), so
        ``n_bins / 2**len(encoder_channels)`` bins remain before the linear head.
    convs_per_stage : int
        Convolutions in each encoder (and decoder) stage.
    kernel_size : int
        Kernel of the stride-1 convolutions (odd).
    first_stride : int
        Stride of the very first encoder convolution and of the last decoder
        up-sampling (1 for the paper preset; 2 or 4 makes a cheap first layer).
    classifier_hidden : int
        Width of the hidden layers of both classifiers.
    classifier_layers : int
        Linear layers in each classifier, output layer included (paper: 5).
    dropout : float
        Dropout probability after every hidden layer (paper: 0.05).
    vae_dropout : float or None
        Dropout after the VAE's hidden layers, if different from ``dropout``
        (None: the same). Dropout on convolutional feature maps costs ~15 % of
        a CPU training step of the ``small`` preset.
    classifier_input : {"sample", "mean"}
        What the sigmoid classifier reads in training: the reparameterised
        sample of the latent (paper) or its mean μ (no sampling noise). In
        evaluation it always reads μ.
    n_elements : int
        Number of output classes (elements Z = 1..118).
    architecture : {"vae", "mlp"}
        ``vae``: the paper's network (:class:`AFPNet`): convolutional VAE,
        sigmoid classifier on the latent, softmax classifier on the sigmoid
        outputs and r0. ``mlp``: :class:`SiteNet`, one MLP trunk of
        ``classifier_layers - 1`` hidden layers on the fingerprint and the
        descriptors, with a sigmoid head and a softmax head side by side; no
        decoder, no KL term.
    perspective_input : {"all", "mean", "first"}
        What a ``mlp`` network reads of the 12 × 256 AFP: all of it
        (flattened), the mean over the perspectives, or the first perspective.
    descriptor_input : {"dmin", "dmin_r0", "context", "context_relative", "context_shell"}
        Descriptors a ``mlp`` network reads beside the AFP: ``dmin_ratio``
        only (as the paper's sigmoid classifier), ``dmin_ratio`` and ``log
        r0``, or the template context of :mod:`afpx.features` (descriptors and
        structure AFP); ``context_relative`` drops its three absolute sizes
        (log r0 and the structure's smallest and largest r0);
        ``context_shell`` adds the coordination shell (the mean descriptors
        and AFP of the sites around the site).
    layer_norm : bool
        Layer normalisation after every hidden linear layer of a ``mlp`` network.
    activation : {"elu", "gelu"}
        Activation of the hidden layers of a ``mlp`` network (the paper: ELU).
    likelihood_head : {"sigmoid", "softmax"}
        Where a ``mlp`` network's site likelihoods come from: a sigmoid head
        beside the softmax head (one-vs-rest, the paper's kind), or the softmax
        head itself, so that the likelihoods of a site are the probabilities
        P(element | site) summing to 1 (``sigmoid_logits`` then hold their
        logits, ``log p - log(1 - p)``, so ``sigmoid(sigmoid_logits)`` is the
        likelihood either way).
    """

    preset: str = "paper"
    n_perspectives: int = N_PERSPECTIVES
    n_bins: int = N_BINS
    latent_dim: int = 64
    encoder_channels: tuple[int, ...] = (32, 64, 128, 128, 256)
    convs_per_stage: int = 4
    kernel_size: int = 3
    first_stride: int = 1
    classifier_hidden: int = 256
    classifier_layers: int = 5
    dropout: float = 0.05
    vae_dropout: float | None = None
    classifier_input: str = "sample"
    n_elements: int = N_ELEMENTS
    architecture: str = "vae"
    perspective_input: str = "all"
    descriptor_input: str = "dmin"
    layer_norm: bool = False
    activation: str = "elu"
    likelihood_head: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.kernel_size % 2 != 1:
            raise AfpxError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.convs_per_stage < 1 or self.classifier_layers < 1 or not self.encoder_channels:
            raise AfpxError("convs_per_stage, classifier_layers and encoder_channels must be >= 1")
        if self.n_bins % self.reduction() != 0:
            raise AfpxError(
                f"n_bins={self.n_bins} is not divisible by the encoder's reduction "
                f"{self.reduction()} (2**stages x first_stride)"
            )
        if self.first_stride < 1 or (self.first_stride > 1 and self.first_stride % 2):
            raise AfpxError(f"first_stride must be 1 or even, got {self.first_stride}")
        if self.classifier_input not in ("sample", "mean"):
            raise AfpxError(
                f"classifier_input must be 'sample' or 'mean', got {self.classifier_input!r}"
            )
        for name, value, allowed in (
            ("activation", self.activation, ("elu", "gelu")),
            ("likelihood_head", self.likelihood_head, ("sigmoid", "softmax")),
            ("architecture", self.architecture, ARCHITECTURES),
            ("perspective_input", self.perspective_input, PERSPECTIVE_INPUTS),
            ("descriptor_input", self.descriptor_input, DESCRIPTOR_INPUTS),
        ):
            if value not in allowed:
                raise AfpxError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        for p in (self.dropout, self.vae_dropout):
            if p is not None and not 0.0 <= p < 1.0:
                raise AfpxError(f"dropout must be in [0, 1), got {p}")

    def reduction(self) -> int:
        """Factor by which the encoder shortens the bin axis."""
        return int(2 ** len(self.encoder_channels) * self.first_stride)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        d = asdict(self)
        d["encoder_channels"] = list(self.encoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys and wrong types raise :class:`AfpxError`."""
        return config_from_dict(cls, d, what="model configuration")

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> ModelConfig:
        """The configuration of a named preset, with optional overrides.

        ``paper`` is the 42-layer VAE with five-layer classifiers; ``small`` is
        a CPU-friendly network of the same shape (a 10-layer VAE with strided
        convolutions, the same five-layer classifiers); ``context`` is the
        shipped default: a 4 × 1024 MLP on the perspective-averaged AFP and the
        template context, sigmoid and softmax heads side by side (see
        docs/model.md for the measurements behind it).
        """
        if name == "paper":
            base = cls()
        elif name == "small":
            base = cls(
                preset="small",
                encoder_channels=(32, 64, 64),
                convs_per_stage=1,
                kernel_size=5,
                first_stride=4,
                classifier_hidden=256,
                vae_dropout=0.0,
            )
        elif name == "context":
            base = cls(
                preset="context",
                architecture="mlp",
                perspective_input="mean",
                descriptor_input="context_shell",
                classifier_hidden=1024,
                classifier_layers=5,
                dropout=0.1,
                layer_norm=True,
                activation="gelu",
                likelihood_head="softmax",
            )
        else:
            raise AfpxError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**base.to_dict(), **overrides}) if overrides else base


class Standardize(nn.Module):
    """Learned per-dimension offset β and scale γ: ``(x - β) / γ`` and back.

    β and γ are initialised from the mean and standard deviation of a sample
    of training examples (:meth:`initialise`), kept as frozen buffers
    ``ref_offset`` and ``ref_scale``, and learned in relative units::

        β = ref_offset + ref_scale · shift        γ = ref_scale · exp(log_gain)

    with the parameters ``shift`` and ``log_gain`` starting at 0, so that every
    dimension learns at the same pace whatever its scale. Reconstruction errors
    are measured in units of the frozen ``ref_scale``, so that learning γ cannot
    shrink the reconstruction loss by itself.

    Parameters
    ----------
    shape : tuple of int
        Shape of one example (e.g. ``(12, 256)`` or ``(1,)``).
    """

    ref_offset: torch.Tensor
    ref_scale: torch.Tensor

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(shape))
        self.log_gain = nn.Parameter(torch.zeros(shape))
        self.register_buffer("ref_offset", torch.zeros(shape))
        self.register_buffer("ref_scale", torch.ones(shape))

    @property
    def offset(self) -> torch.Tensor:
        """β, shape ``shape``."""
        return self.ref_offset + self.ref_scale * self.shift

    @property
    def scale(self) -> torch.Tensor:
        """γ, shape ``shape``."""
        return self.ref_scale * torch.exp(self.log_gain)

    @torch.no_grad()
    def initialise(self, x: torch.Tensor, *, floor: float = 0.05) -> None:
        """Set β, γ from examples ``x`` of shape (n, *shape).

        Standard deviations below ``floor`` × their mean (bins that are empty in
        almost every example) are raised to it, so no dimension is blown up.
        """
        x = x.double()
        mean = x.mean(0)
        std = x.std(0) if x.shape[0] > 1 else torch.ones_like(mean)
        positive = std[std > 0]
        typical = positive.mean() if positive.numel() else torch.tensor(1.0, dtype=std.dtype)
        std = torch.clamp(std, min=float(floor * typical))
        self.ref_offset.copy_(mean.float())
        self.ref_scale.copy_(std.float())
        self.shift.zero_()
        self.log_gain.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) / self.scale

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """De-standardise: ``x γ + β``."""
        return x * self.scale + self.offset

    def reference_units(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in units of the frozen initial standard deviation (for losses)."""
        return x / self.ref_scale


def _act(cfg: ModelConfig, *, vae: bool = False) -> list[nn.Module]:
    """Activation (ELU, or GELU where configured) and dropout that follow every hidden layer."""
    p = cfg.vae_dropout if vae and cfg.vae_dropout is not None else cfg.dropout
    mods: list[nn.Module] = [nn.GELU() if cfg.activation == "gelu" else nn.ELU()]
    if p > 0:
        mods.append(nn.Dropout(p))
    return mods


def _conv(c_in: int, c_out: int, *, kernel: int, stride: int) -> nn.Module:
    """A length-preserving (stride 1) or length-dividing (stride s) convolution.

    Stride 1 uses the odd ``kernel`` with same padding; stride s > 1 uses
    kernel 2s and padding s/2, so that the output has exactly L/s bins.
    """
    if stride == 1:
        return nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2)
    return nn.Conv1d(c_in, c_out, 2 * stride, stride=stride, padding=stride // 2)


def _upconv(c_in: int, c_out: int, *, stride: int) -> nn.Module:
    """Transposed convolution (kernel 2s, stride s) that multiplies the length by s."""
    return nn.ConvTranspose1d(c_in, c_out, 2 * stride, stride=stride, padding=stride // 2)


class Encoder(nn.Module):
    """Convolutional encoder: AFP (n, 12, 256) → latent mean and log-variance (n, d).

    Stage s has ``convs_per_stage`` convolutions to ``encoder_channels[s]``
    channels; the last one of each stage has stride 2 (and the very first
    convolution of the network a further ``first_stride``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = cfg.n_perspectives
        for stage, c_out in enumerate(cfg.encoder_channels):
            for i in range(cfg.convs_per_stage):
                stride = (cfg.first_stride if stage == 0 and i == 0 else 1) * (
                    2 if i == cfg.convs_per_stage - 1 else 1
                )
                layers += [
                    _conv(c_in, c_out, kernel=cfg.kernel_size, stride=stride),
                    *_act(cfg, vae=True),
                ]
                c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.length = cfg.n_bins // cfg.reduction()
        self.head = nn.Linear(c_in * self.length, 2 * cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.convs(x).flatten(1)
        mu, logvar = self.head(h).chunk(2, dim=1)
        # bounded so that exp(logvar) stays finite in float32
        return mu, logvar.clamp(-30.0, 20.0)


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`: latent (n, d) → standardised AFP (n, 12, 256).

    A linear layer to the shortest feature map, then per stage one transposed
    convolution that doubles the length (the last stage's also multiplies by
    ``first_stride``) followed by ``convs_per_stage - 1`` convolutions. The
    final layer maps to the 12 perspectives with no activation.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        channels = list(reversed(cfg.encoder_channels))
        self.length = cfg.n_bins // cfg.reduction()
        self.c0 = channels[0]
        self.head = nn.Sequential(
            nn.Linear(cfg.latent_dim, self.c0 * self.length), *_act(cfg, vae=True)
        )
        layers: list[nn.Module] = []
        targets = [*channels[1:], channels[-1]]
        c_in = self.c0
        for stage, c_stage in enumerate(targets):
            last_stage = stage == len(targets) - 1
            for i in range(cfg.convs_per_stage):
                final = last_stage and i == cfg.convs_per_stage - 1
                c_out = cfg.n_perspectives if final else c_stage
                if i == 0:
                    stride = 2 * (cfg.first_stride if last_stage else 1)
                    layer = _upconv(c_in, c_out, stride=stride)
                else:
                    layer = _conv(c_in, c_out, kernel=cfg.kernel_size, stride=1)
                layers += [layer] if final else [layer, *_act(cfg, vae=True)]
                c_in = c_out
        self.convs = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.head(z).view(z.shape[0], self.c0, self.length)
        return self.convs(h)


def _mlp(n_in: int, n_out: int, cfg: ModelConfig) -> nn.Sequential:
    """``classifier_layers`` linear layers, ELU + dropout between them, none after the last."""
    layers: list[nn.Module] = []
    width = n_in
    for _ in range(cfg.classifier_layers - 1):
        layers += [nn.Linear(width, cfg.classifier_hidden), *_act(cfg)]
        width = cfg.classifier_hidden
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


class ModelOutput(NamedTuple):
    """Everything one forward pass gives (batch of n sites).

    Attributes
    ----------
    reconstruction : Tensor of shape (n, 12, 256)
        De-standardised reconstruction of the AFP (same units as the input).
    mu, logvar : Tensor of shape (n, latent_dim)
        Mean and log-variance of the latent distribution.
    latent : Tensor of shape (n, latent_dim)
        The latent fed to the decoder (a sample in training, ``mu`` in evaluation);
        the classifier reads it too unless ``classifier_input == "mean"``.
    sigmoid_logits : Tensor of shape (n, 118)
        Logits of the sigmoid classifier; ``sigmoid`` of them is the site likelihood.
    softmax_logits : Tensor of shape (n, 118)
        Logits of the auxiliary softmax classifier.
    """

    reconstruction: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    latent: torch.Tensor
    sigmoid_logits: torch.Tensor
    softmax_logits: torch.Tensor


class AFPNet(nn.Module):
    """VAE + sigmoid classifier + auxiliary softmax classifier.

    Parameters
    ----------
    config : ModelConfig
        The architecture.

    Notes
    -----
    Forward pass for a site with fingerprint ``x``, ``r0`` and ``dmin_ratio``::

        x̃ = (x - β) / γ                       learned standardisation
        μ, log σ² = encoder(x̃)
        h = μ + σ ε  (training)   or  μ  (evaluation)
        x̂ = decoder(h) γ + β                  de-standardised reconstruction
        s = sigmoid_classifier([h, d̃min])     118 logits, likelihood = sigmoid(s)
        t = softmax_classifier(BN([sigmoid(s), r̃0]))   118 logits
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.afp_norm = Standardize((config.n_perspectives, config.n_bins))
        self.r0_norm = Standardize((1,))
        self.dmin_norm = Standardize((1,))
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.sigmoid_classifier = _mlp(config.latent_dim + 1, config.n_elements, config)
        self.softmax_norm = nn.BatchNorm1d(config.n_elements + 1)
        self.softmax_classifier = _mlp(config.n_elements + 1, config.n_elements, config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases for every layer."""
        for m in self.modules():
            if isinstance(m, nn.Conv1d | nn.ConvTranspose1d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def initialise_standardisation(
        self,
        afp: torch.Tensor,
        r0: torch.Tensor,
        dmin_ratio: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> None:
        """Initialise β and γ from training examples.

        Parameters
        ----------
        afp : Tensor of shape (n, 12, 256)
        r0, dmin_ratio : Tensor of shape (n,)
        context : ignored
        """
        self.afp_norm.initialise(afp)
        self.r0_norm.initialise(r0.reshape(-1, 1))
        self.dmin_norm.initialise(dmin_ratio.reshape(-1, 1))

    def forward(
        self,
        afp: torch.Tensor,
        r0: torch.Tensor,
        dmin_ratio: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the network.

        Parameters
        ----------
        afp : Tensor of shape (n, 12, 256)
        r0, dmin_ratio : Tensor of shape (n,)
        context : ignored
            The paper's network reads no template context (accepted so that
            every architecture is called alike).

        Returns
        -------
        ModelOutput
        """
        x = self.afp_norm(afp)
        mu, logvar = self.encoder(x)
        # reparameterised sample in training, the mean in evaluation
        latent = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if self.training else mu
        reconstruction = self.afp_norm.inverse(self.decoder(latent))
        d = self.dmin_norm(dmin_ratio.reshape(-1, 1))
        features = mu if self.config.classifier_input == "mean" else latent
        sigmoid_logits = self.sigmoid_classifier(torch.cat([features, d], dim=1))
        r = self.r0_norm(r0.reshape(-1, 1))
        soft_in = self.softmax_norm(torch.cat([torch.sigmoid(sigmoid_logits), r], dim=1))
        softmax_logits = self.softmax_classifier(soft_in)
        return ModelOutput(reconstruction, mu, logvar, latent, sigmoid_logits, softmax_logits)

    def loss_terms(
        self, out: ModelOutput, afp: torch.Tensor, z: torch.Tensor, *, pos_weight: float = 118.0
    ) -> dict[str, torch.Tensor]:
        """The four loss terms, each a mean over the batch of a per-site sum.

        Parameters
        ----------
        out : ModelOutput
            The forward pass on this batch.
        afp : Tensor of shape (n, 12, 256)
            The input fingerprints.
        z : Tensor of shape (n,), int
            Atomic numbers 1..118 on the sites.
        pos_weight : float
            Weight of the positive class in the sigmoid cross-entropy (paper: 118).

        Returns
        -------
        dict of str to scalar Tensor
            ``reconstruction``: ½ Σ over (perspective, bin) of the squared error
            in units of the initial per-bin standard deviation (a unit-variance
            Gaussian log-likelihood up to a constant); ``kl``: KL divergence of
            the latent from N(0, 1), summed over latent dimensions;
            ``sigmoid_bce``: binary cross-entropy summed over the 118 outputs,
            positive class weighted by ``pos_weight``; ``softmax_ce``: the
            cross-entropy of the softmax classifier.
        """
        target = (z.long() - 1).clamp(0, self.config.n_elements - 1)
        err = self.afp_norm.reference_units(out.reconstruction - afp)
        reconstruction = 0.5 * err.pow(2).flatten(1).sum(1).mean()
        kl = (-0.5 * (1 + out.logvar - out.mu.pow(2) - out.logvar.exp()).sum(1)).mean()
        sigmoid_bce = _sigmoid_bce(out.sigmoid_logits, target, pos_weight)
        softmax_ce = F.cross_entropy(out.softmax_logits, target)
        return {
            "reconstruction": reconstruction,
            "kl": kl,
            "sigmoid_bce": sigmoid_bce,
            "softmax_ce": softmax_ce,
        }

    def l2_penalty(self) -> torch.Tensor:
        """Σ w² over the weights of every layer (biases, norms and β/γ excluded)."""
        total = torch.zeros((), device=self.afp_norm.shift.device)
        for m in self.modules():
            if isinstance(m, nn.Conv1d | nn.ConvTranspose1d | nn.Linear):
                total = total + m.weight.pow(2).sum()
        return total


#: Columns of :data:`afpx.features.DESCRIPTORS` that are absolute sizes (Å).
_ABSOLUTE_DESCRIPTORS = (0, 7, 8)


class SiteNet(nn.Module):
    """One MLP trunk on the fingerprint and descriptors; sigmoid and softmax heads side by side.

    Parameters
    ----------
    config : ModelConfig
        With ``architecture == "mlp"``.

    Notes
    -----
    For a site with fingerprint ``x`` (12 × 256), ``r0``, ``dmin_ratio`` and
    template context ``c`` (:func:`afpx.features.site_context`)::

        a = x, mean_p x or x[0]                 (perspective_input)
        d = [dmin], [dmin, log r0] or c         (descriptor_input)
        h = trunk([(a - β)/γ, (d - β')/γ'])     hidden layers: Linear, [LN], ELU, dropout
        s = W_s h + b_s    likelihood = sigmoid(s)
        t = W_t h + b_t    softmax classifier (error rate, confusion matrix)

    Both heads read the same features, so the likelihoods that ranking
    multiplies see everything the softmax classifier sees (in the paper's
    network, r0 reaches only the softmax classifier).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.architecture != "mlp":
            raise AfpxError(f"SiteNet needs architecture 'mlp', got {config.architecture!r}")
        from afpx.features import N_DESCRIPTORS, context_width

        self.config = config
        afp_shape = (
            (config.n_perspectives * config.n_bins,)
            if config.perspective_input == "all"
            else (config.n_bins,)
        )
        n_desc = {
            "dmin": 1,
            "dmin_r0": 2,
            "context": N_DESCRIPTORS + config.n_bins,
            "context_relative": N_DESCRIPTORS - len(_ABSOLUTE_DESCRIPTORS) + config.n_bins,
            "context_shell": context_width(config.n_bins, shell=True),
        }[config.descriptor_input]
        self.afp_norm = Standardize(afp_shape)
        self.descriptor_norm = Standardize((n_desc,))
        layers: list[nn.Module] = []
        width = afp_shape[0] + n_desc
        for _ in range(config.classifier_layers - 1):
            layers.append(nn.Linear(width, config.classifier_hidden))
            if config.layer_norm:
                layers.append(nn.LayerNorm(config.classifier_hidden))
            layers += _act(config)
            width = config.classifier_hidden
        self.trunk = nn.Sequential(*layers)
        self.sigmoid_head = (
            nn.Linear(width, config.n_elements) if config.likelihood_head == "sigmoid" else None
        )
        self.softmax_head = nn.Linear(width, config.n_elements)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def needs_context(self) -> bool:
        """Whether :meth:`forward` needs the template context."""
        return self.config.descriptor_input.startswith("context")

    @property
    def needs_shell(self) -> bool:
        """Whether the context must carry the coordination-shell columns."""
        return self.config.descriptor_input == "context_shell"

    def afp_input(self, afp: torch.Tensor) -> torch.Tensor:
        """What the trunk reads of the AFP (n, 12, 256), before standardisation."""
        if self.config.perspective_input == "mean":
            return afp.mean(1)
        if self.config.perspective_input == "first":
            return afp[:, 0]
        return afp.flatten(1)

    def descriptors(
        self, r0: torch.Tensor, dmin_ratio: torch.Tensor, context: torch.Tensor | None
    ) -> torch.Tensor:
        """The descriptor block (n, k), before standardisation."""
        d = dmin_ratio.reshape(-1, 1)
        kind = self.config.descriptor_input
        if kind == "dmin":
            return d
        if kind == "dmin_r0":
            return torch.cat([d, torch.log(r0.reshape(-1, 1))], dim=1)
        if context is None:
            raise AfpxError(
                "this model reads the template context (descriptor_input "
                f"{kind!r}); compute it with afpx.features.site_context"
            )
        if kind == "context_relative":
            keep = [i for i in range(context.shape[1]) if i not in _ABSOLUTE_DESCRIPTORS]
            return context[:, keep]
        return context

    @torch.no_grad()
    def initialise_standardisation(
        self,
        afp: torch.Tensor,
        r0: torch.Tensor,
        dmin_ratio: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> None:
        """Initialise the input offsets and scales from training examples."""
        self.afp_norm.initialise(self.afp_input(afp))
        self.descriptor_norm.initialise(self.descriptors(r0, dmin_ratio, context))

    def forward(
        self,
        afp: torch.Tensor,
        r0: torch.Tensor,
        dmin_ratio: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the network; ``reconstruction``, ``mu``, ``logvar`` and ``latent`` are empty."""
        a = self.afp_norm(self.afp_input(afp))
        d = self.descriptor_norm(self.descriptors(r0, dmin_ratio, context))
        h = self.trunk(torch.cat([a, d], dim=1))
        empty = h.new_zeros((h.shape[0], 0))
        softmax_logits = self.softmax_head(h)
        if self.config.likelihood_head == "softmax":
            # logit of the softmax probability: sigmoid() of it gives the probability back
            log_p = torch.log_softmax(softmax_logits, dim=1)
            sigmoid_logits = log_p - torch.log1p(-torch.exp(log_p).clamp(max=1 - 1e-7))
        else:
            assert self.sigmoid_head is not None
            sigmoid_logits = self.sigmoid_head(h)
        return ModelOutput(afp.new_zeros((0,)), empty, empty, h, sigmoid_logits, softmax_logits)

    def loss_terms(
        self, out: ModelOutput, afp: torch.Tensor, z: torch.Tensor, *, pos_weight: float = 118.0
    ) -> dict[str, torch.Tensor]:
        """As :meth:`AFPNet.loss_terms`; ``reconstruction`` and ``kl`` are 0 (no VAE)."""
        target = (z.long() - 1).clamp(0, self.config.n_elements - 1)
        zero = out.sigmoid_logits.new_zeros(())
        return {
            "reconstruction": zero,
            "kl": zero,
            # with likelihood_head "softmax" there is no sigmoid head to train
            "sigmoid_bce": (
                zero
                if self.config.likelihood_head == "softmax"
                else _sigmoid_bce(out.sigmoid_logits, target, pos_weight)
            ),
            "softmax_ce": F.cross_entropy(out.softmax_logits, target),
        }

    def l2_penalty(self) -> torch.Tensor:
        """Σ w² over the weights of the linear layers."""
        return sum(
            (m.weight.pow(2).sum() for m in self.modules() if isinstance(m, nn.Linear)),
            start=self.softmax_head.weight.new_zeros(()),
        )


def _sigmoid_bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Binary cross-entropy summed over the elements, positive class weighted."""
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    pw = torch.full((logits.shape[1],), float(pos_weight), device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, pos_weight=pw, reduction="none")
    return bce.sum(1).mean()


def build_net(config: ModelConfig) -> AFPNet | SiteNet:
    """The network of ``config.architecture``."""
    return AFPNet(config) if config.architecture == "vae" else SiteNet(config)


def needs_context(net: nn.Module) -> bool:
    """Whether ``net`` reads the template context of :mod:`afpx.features`."""
    return bool(getattr(net, "needs_context", False))


def needs_shell(net: nn.Module) -> bool:
    """Whether ``net``'s template context includes the coordination shell."""
    return bool(getattr(net, "needs_shell", False))


def count_layers(module: nn.Module) -> int:
    """Number of layers in ``module``: its ``Conv1d``, ``ConvTranspose1d`` and ``Linear`` modules.

    See the module docstring for why these, and only these, are counted.
    """
    return sum(isinstance(m, nn.Conv1d | nn.ConvTranspose1d | nn.Linear) for m in module.modules())


def vae_layers(net: AFPNet) -> int:
    """Layers of the VAE (encoder + decoder) of ``net``."""
    return count_layers(net.encoder) + count_layers(net.decoder)


def n_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
