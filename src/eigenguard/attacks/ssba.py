"""SSBA (Li, Li, Wu, Li, He & Lyu, "Invisible Backdoor Attack with Sample-Specific Triggers",
ICCV 2021; BackdoorBench's ``ssba``): a StegaStamp-style encoder hides a fixed secret bit string
in each image; the residual it adds, different for every image and near-invisible, is the
trigger. Dirty label: poisoned samples are relabelled to the target.

The trigger: x' = clip(round(x + r), 0, 255) with r = eps · tanh(E(x, s)), the residual of an
encoder E given the image x and the attack's secret s, a fixed string of ``bits`` bits drawn from
the fit seed (stream "ssba-secret"). Every image gets its own residual. |r| < eps, rounding moves
a value by at most 0.5 and clipping only shortens a change, so |x' − x| ≤ eps + 0.5.

Fitting (:meth:`SSBA.fit`). As in StegaStamp, the encoder E and a decoder D (encoded image ->
one logit per bit) are trained together, on the training images only (nothing is downloaded):
``train_size`` images drawn with the seed ("ssba-subset"; all of them when there are fewer),
``steps`` optimiser steps over passes in seeded orders ("ssba-batches"), batches of
``batch_size``, each image with
its own random secret ("ssba-secrets"), Adam at ``lr`` with cosine decay to zero. The loss is
BCE(D(x'), secret) + fidelity_weight · mean((r / 255)²), x' made as the trigger is (clipped and
rounded; the rounding passes gradients straight through, so the decoder learns on quantised
images). Training uses random secrets, as StegaStamp does, not the attack's one: with a single
secret the decoder could output it whatever the image, and the encoder's best reply would be
r = 0. The attack then embeds one secret, as Li et al. embed one string (the target class's
name) in every poisoned image.

A curriculum (``warmup``): over the first ``warmup`` fraction of the steps the training images
fade in from flat grey, 128 + c · (x − 128) with c rising linearly from 0 to 1. In trials on
Fashion-MNIST without the fade, the bit accuracy stayed between 0.50 and 0.58 for the first 400
steps, and with the fidelity term on, the residual shrank to zero before any code was found; on
flat images a code is found within a hundred steps, and the decoder learns to see past the
image as it fades in (0.99 after 600 steps). Each convolution is followed by group
normalisation, without which the residual also collapsed to zero (see :func:`conv`).

Reduced from StegaStamp (Tancik, Mildenhall & Ng, CVPR 2020), which Li et al. use as it is:
there, 400 × 400 colour images, a 100-bit secret spread by a dense layer over a 50 × 50 map
upsampled × 8, a deeper U-Net encoder, a decoder with a spatial transformer, losses L2 + LPIPS +
an adversarial critic + the secret's cross-entropy with ramped weights, distortion layers (blur,
noise, colour, JPEG, perspective) between encoder and decoder, and about 140,000 steps. Here:
the images at their own size (28 × 28 or 32 × 32); 32 bits; a linear map of the secret (as ±1)
to a 4-channel map of a quarter of the image's side, nearest-upsampled and set beside the image;
a two-level U-Net of ``width`` channels (16: about 47,000 weights at 28 × 28); a decoder of
three convolutions and a two-layer head (about 220,000 weights), no spatial transformer; L2 and
cross-entropy only (LPIPS needs a pretrained network, which cannot be downloaded here; no
critic); no distortion layers (the victim sees the exact pixels; only the uint8 rounding is
simulated); an L-inf cap by tanh that StegaStamp does not have; 750 steps of 64 images, with the
fade-in in place of the loss ramps.

Measured (defaults, seed 0, on the first 51,000 Fashion-MNIST training images, on the 2-core
development machine with a training job running beside it, so slower than on an idle one): the
fit takes 100 to 130 s (750 steps at about 0.14 s, one thread; 0.2 to 0.37 s per step when the
machine was busier, so at most about 5 minutes; a 3 × 32 × 32 step costs 1.25 times a
1 × 28 × 28 one). On 1,024 held-out images (not in the training subset): the decoder recovers
99.48% of the secret's bits from the triggered uint8 images (99.53% with random secrets; 49.38%
agree with the secret on clean images, chance); every image's change reaches the L-inf cap of 8
(mean L-inf 8.0); PSNR 34.9 dB (from the mean squared change over all pixels: RMS 4.6 levels).
The trigger is sample-specific: on 300 test images, two images' residuals differ on 70% of the
pixels, by 62% of the residual's mean magnitude on average. Applying it to the 10,000 test
images takes 12 s. As a backdoor (small_cnn of width 16 trained 4 epochs on 20,000 images of
that split, evaluated on the test split): poison ratio 10%: ACC 78.5%, ASR 97.8%; 1%: ACC 80.7%,
ASR 3.7%; no poison: ACC 80.9%, ASR 2.8% (BackdoorBench's CIFAR-10 PreAct-ResNet18 reference:
ASR 97.9% at 10%).

Defaults and why:

- eps = 8 (on 0..255): near-invisible on Fashion-MNIST (PSNR about 35 dB; Li et al. report
  about 27 dB for their triggers on ImageNet), yet enough for the victim to learn the backdoor at
  10% poison;
- fidelity_weight = 30: the trade-off between invisibility and strength, measured with the
  other defaults: 30 gave PSNR 34.9 dB and ASR 97.8% at 10%; 100 gave PSNR 39.2 dB and bit
  accuracy 99.56%, but ASR only 47.4%;
- bits = 32: fewer than StegaStamp's 100 for 784 pixels (a 28 × 28 image has 0.5% of the pixels
  of a 400 × 400 colour one); recovered at 99.5%;
- width = 16, steps = 750, train_size = 16,000, batch_size = 64, lr = 1e-3 (Adam),
  warmup = 0.5: within the 10-minute budget on 2 busy cores with room to spare. The budget is
  counted in steps, not in passes over the subset, so a smaller training set (the gallery's
  2,000 images, a grid's 12,000) gets the same training as the full split: counted in passes,
  the gallery's fit had 94 steps and learned no code (L-inf 1).

Every budget is a setting, so it is recorded in the run's config.

Fit runs with one CPU thread (:func:`eigenguard.attacks.helpers.single_thread`), so it does not
depend on the thread count, and so does :meth:`SSBA.apply`. The networks hold no batch statistics
and apply works in chunks, so an image's trigger does not depend on the batch it comes in.
Initial weights come from the seed's "ssba-init" stream inside ``torch.random.fork_rng``, so the
caller's global RNG is untouched.

In-process cache (:func:`eigenguard.attacks.helpers.cached_fit`): the trained weights, secret and
diagnostics are cached under a hash of the training data, the seed, the device type and every
setting, so fitting the same SSBA twice in one process trains once.

Fitted state (:meth:`SSBA.fitted_state`): ``secret_`` (int64 (bits,)), ``image_shape_`` ((C, H,
W)), ``eps_``, the encoder's weights as ``encoder.<name>_``, and the diagnostics
``bit_accuracy_``, ``random_bit_accuracy_``, ``clean_bit_accuracy_``, ``mean_linf_`` and
``psnr_`` (float64 (1,)). The decoder is not needed for the trigger and is not saved: after
:meth:`fit` it is ``decoder_`` (:meth:`SSBA.decode` reads bits with it); a restored attack has
none. A state restores only into an SSBA created with the settings that made it (bits, eps and
width are checked).
"""
from __future__ import annotations

from typing import ClassVar

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageSet
from ..seeding import generator, stream_seed
from .base import Attack, check_images, is_integer, is_real
from .helpers import cached_fit, data_fingerprint, single_thread
from .registry import register_attack

#: channels of the coarse map the secret is spread into before it meets the image
SECRET_CHANNELS = 4
#: groups of the group normalisation after each convolution (fewer where channels are fewer)
GROUPS = 4
#: images encoded per chunk in apply (bounds the working memory)
CHUNK = 1024
#: held-out images the fit's diagnostics are measured on
CHECK_SAMPLE = 1024
#: prefixes of the network weights in the fitted state (and the fit cache)
ENCODER, DECODER = "encoder.", "decoder."
#: the diagnostics fit measures, kept in the fitted state
DIAGNOSTICS = ("bit_accuracy_", "random_bit_accuracy_", "clean_bit_accuracy_", "mean_linf_",
               "psnr_")


def coarse(size: int) -> int:
    """The side after two stride-2 convolutions with padding 1: ceil(size / 4)."""
    return (size + 3) // 4


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Pixels on 0..255 -> the networks' input range, -0.5..0.5."""
    return images / 255 - 0.5


def conv(inputs: int, outputs: int, stride: int = 1) -> nn.Module:
    """A 3x3 convolution and group normalisation. Without a normalisation the fidelity term
    wins before a code is found (the residual shrinks to zero, bits at chance); group rather
    than batch normalisation keeps each image's trigger independent of its batch and the same
    in training as in :meth:`SSBA.apply`, with no running statistics to estimate."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(math.gcd(GROUPS, outputs), outputs))


class Encoder(nn.Module):
    """(image, secret) -> unbounded residual logits: a two-level U-Net whose input is the image
    beside a coarse map of the secret upsampled to the image (StegaStamp's layout, scaled down).
    The residual on 0..255 is eps · tanh(logits), so its L-inf norm never exceeds eps."""

    def __init__(self, channels: int, height: int, width: int, bits: int, net_width: int):
        super().__init__()
        self.size = (height, width)
        self.grid = (coarse(height), coarse(width))
        w = net_width
        self.secret_map = nn.Linear(bits, SECRET_CHANNELS * self.grid[0] * self.grid[1])
        self.inc = conv(channels + SECRET_CHANNELS, w)
        self.down1 = conv(w, 2 * w, stride=2)
        self.down2 = conv(2 * w, 2 * w, stride=2)
        self.up2 = conv(4 * w, 2 * w)
        self.up1 = conv(3 * w, w)
        self.out = nn.Conv2d(w, channels, 1)

    def forward(self, x: torch.Tensor, secrets: torch.Tensor) -> torch.Tensor:
        spread = self.secret_map(2 * secrets - 1).view(len(x), SECRET_CHANNELS, *self.grid)
        spread = F.interpolate(spread, size=self.size, mode="nearest")
        e0 = F.relu(self.inc(torch.cat([x, spread], 1)))
        e1 = F.relu(self.down1(e0))
        e2 = F.relu(self.down2(e1))
        d1 = F.relu(self.up2(torch.cat([upsample(e2, e1), e1], 1)))
        d0 = F.relu(self.up1(torch.cat([upsample(d1, e0), e0], 1)))
        return self.out(d0)


def upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


class Decoder(nn.Module):
    """Encoded image -> one logit per secret bit: three convolutions, two of stride 2, and a
    two-layer head (StegaStamp's decoder without its spatial transformer)."""

    def __init__(self, channels: int, height: int, width: int, bits: int, net_width: int):
        super().__init__()
        w = net_width
        self.features = nn.Sequential(
            conv(channels, w), nn.ReLU(), conv(w, 2 * w, stride=2), nn.ReLU(),
            conv(2 * w, 2 * w, stride=2), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(
            nn.Linear(2 * w * coarse(height) * coarse(width), 8 * w), nn.ReLU(),
            nn.Linear(8 * w, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def residual(encoder: Encoder, images: torch.Tensor, secrets: torch.Tensor,
             eps: float) -> torch.Tensor:
    """The residual on the 0..255 scale, |r| <= eps, for float images on 0..255."""
    return eps * torch.tanh(encoder(to_unit(images), secrets))


def encode(images: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """clip(round(x + r), 0, 255) as a float tensor; the rounding passes gradients straight
    through, so training sees the quantisation the trigger will have."""
    encoded = (images + r).clamp(0, 255)
    return encoded + (encoded.round() - encoded).detach()


def fade(images: torch.Tensor, contrast: float) -> torch.Tensor:
    """Images on 0..255 pulled towards mid-grey: 128 + contrast · (x − 128).

    A curriculum: on flat images the pair learns a code within a hundred steps, while on full
    Fashion-MNIST images from the start it stays near chance for hundreds of steps (the image
    drowns the small residual); fading the images in lets the decoder learn to see past them."""
    if contrast >= 1:
        return images
    return 128 + contrast * (images - 128)


def bit_accuracy(logits: torch.Tensor, secrets: torch.Tensor) -> float:
    return float(((logits > 0).to(secrets.dtype) == secrets).double().mean())


@register_attack("ssba")
@dataclass
class SSBA(Attack):
    """x' = clip(round(x + eps · tanh(E(x, s))), 0, 255): the residual of an encoder E trained
    with a decoder to hide secrets in images, applied with one fixed secret s; dirty label."""

    needs_fit = True

    bits: int = 32
    eps: float = 8.0
    fidelity_weight: float = 30.0
    width: int = 16
    #: StegaStamp's training steps (:mod:`eigenguard.budgets`: the report marks runs below them)
    paper_budget: ClassVar[dict] = {"steps": 140000}
    steps: int = 750
    train_size: int = 16000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: float = 0.5

    def __post_init__(self):
        self._check_counts()
        self._check_numbers()
        self.bits, self.width, self.steps = int(self.bits), int(self.width), int(self.steps)
        self.train_size, self.batch_size = int(self.train_size), int(self.batch_size)
        self.eps, self.fidelity_weight = float(self.eps), float(self.fidelity_weight)
        self.lr, self.warmup = float(self.lr), float(self.warmup)
        self._clear()

    def _check_counts(self) -> None:
        counts = (("bits", "the length of the hidden secret; 16 to 32 suit 28x28 images"),
                  ("width", "channels of the encoder's and decoder's first convolution"),
                  ("steps", "optimiser steps of the encoder/decoder training"),
                  ("train_size", "the most training images the encoder/decoder learn from"),
                  ("batch_size", "images per optimiser step"))
        for name, meaning in counts:
            value = getattr(self, name)
            if not is_integer(value) or value < 1:
                raise ValueError(f"SSBA {name} must be an integer >= 1 ({meaning}), got "
                                 f"{value!r}")

    def _check_numbers(self) -> None:
        if not is_real(self.eps) or not 0 < self.eps <= 255:
            raise ValueError(f"SSBA eps must be a number in (0, 255] (the L-inf bound of the "
                             f"residual on the 0..255 scale; 8 keeps it near-invisible), got "
                             f"{self.eps!r}")
        if not is_real(self.fidelity_weight) or self.fidelity_weight < 0:
            raise ValueError(f"SSBA fidelity_weight must be a number >= 0 (the weight of the "
                             f"residual's mean square, on the 0..1 scale, against the bit "
                             f"loss; 0 turns it off), got {self.fidelity_weight!r}")
        if not is_real(self.warmup) or not 0 <= self.warmup <= 1:
            raise ValueError(f"SSBA warmup must be a number in [0, 1] (the fraction of the "
                             f"optimiser steps over which the training images fade in from "
                             f"flat grey; 0 turns the fade off), got {self.warmup!r}")
        if not is_real(self.lr) or self.lr <= 0:
            raise ValueError(f"SSBA lr must be a number > 0 (Adam's learning rate), got "
                             f"{self.lr!r}")

    def _clear(self) -> None:
        self.encoder_ = None
        self.decoder_ = None
        self._applier = None
        for name in DIAGNOSTICS:
            self.__dict__.pop(name, None)

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, train: ImageSet, *, seed: int = 0,
            device: str | torch.device = "cpu") -> "SSBA":
        """Train the encoder and decoder on a seeded subset of ``train`` (cached in-process)
        and draw the secret from ``seed``."""
        if len(train) == 0:
            raise ValueError("SSBA trains its encoder on the training set, which is empty")
        key = ("ssba", data_fingerprint(train), int(seed), torch.device(device).type,
               self.bits, self.eps, self.fidelity_weight, self.width, self.steps,
               self.train_size, self.batch_size, self.lr, self.warmup)
        with single_thread():
            state = cached_fit(key, lambda: self._train(train, seed, device))
        self._set_state(state, keep_decoder=True)
        return self

    def _train(self, train: ImageSet, seed: int, device) -> dict[str, torch.Tensor]:
        order = torch.randperm(len(train), generator=generator(seed, "ssba-subset"))
        chosen = order[:self.train_size].sort().values
        held_out = order[self.train_size:][:CHECK_SAMPLE]
        if len(held_out) == 0:  # everything was trained on: measure on training images
            held_out = chosen[:CHECK_SAMPLE]
        encoder, decoder = self._build(train.images.shape[1:], seed)
        encoder.to(device).train()
        decoder.to(device).train()
        self._optimise(encoder, decoder, train.images[chosen], seed, device)
        secret = torch.randint(0, 2, (self.bits,), generator=generator(seed, "ssba-secret"))
        state = {"secret_": secret,
                 "image_shape_": torch.tensor(tuple(train.images.shape[1:])),
                 **prefixed(ENCODER, encoder), **prefixed(DECODER, decoder)}
        state.update(self._diagnose(encoder.cpu().eval(), decoder.cpu().eval(), secret,
                                    train.images[held_out], seed))
        return state

    def _build(self, shape, seed: int) -> tuple[Encoder, Decoder]:
        """Both networks with seeded initial weights; the caller's global RNG is untouched."""
        channels, height, width = (int(n) for n in shape)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, "ssba-init"))
            encoder = Encoder(channels, height, width, self.bits, self.width)
            decoder = Decoder(channels, height, width, self.bits, self.width)
        return encoder, decoder

    def _optimise(self, encoder: Encoder, decoder: Decoder, images: torch.Tensor, seed: int,
                  device) -> None:
        """Adam on bit recovery (BCE) + fidelity_weight · mean((r / 255)²), random secrets per
        image, ``steps`` batches over passes in seeded orders, cosine learning-rate decay, images
        faded in from grey over the first ``warmup`` of the steps (:func:`fade`)."""
        parameters = list(encoder.parameters()) + list(decoder.parameters())
        optimiser = torch.optim.Adam(parameters, lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, self.steps)
        fade_steps = self.warmup * self.steps
        order_stream = generator(seed, "ssba-batches")
        secret_stream = generator(seed, "ssba-secrets")
        step = 0
        while step < self.steps:
            order = torch.randperm(len(images), generator=order_stream)
            for start in range(0, len(images), self.batch_size):
                if step == self.steps:
                    break
                step += 1
                contrast = min(1.0, step / fade_steps) if fade_steps > 0 else 1.0
                x = fade(images[order[start:start + self.batch_size]].to(device).float(),
                         contrast)
                secrets = torch.randint(0, 2, (len(x), self.bits), generator=secret_stream)
                loss = self._loss(encoder, decoder, x, secrets.float().to(device))
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()

    def _loss(self, encoder: Encoder, decoder: Decoder, x: torch.Tensor,
              secrets: torch.Tensor) -> torch.Tensor:
        r = residual(encoder, x, secrets, self.eps)
        logits = decoder(to_unit(encode(x, r)))
        fidelity = (r / 255).pow(2).mean()
        return F.binary_cross_entropy_with_logits(logits, secrets) + self.fidelity_weight * fidelity

    def _diagnose(self, encoder: Encoder, decoder: Decoder, secret: torch.Tensor,
                  images: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """How well the trained pair works on held-out images: bit accuracy with the attack's
        secret (through the uint8 trigger), with random secrets, and on clean images (chance
        is 0.5); the triggered images' mean L-inf change and PSNR."""
        with torch.no_grad():
            triggered = apply_encoder(encoder, images, secret, self.eps)
            wanted = secret.float().expand(len(images), -1)
            randoms = torch.randint(0, 2, (len(images), self.bits),
                                    generator=generator(seed, "ssba-check")).float()
            x = images.float()
            random_encoded = encode(x, residual(encoder, x, randoms, self.eps))
            change = triggered.double() - images.double()
            mse = float(change.pow(2).mean())
            accuracy = {
                "bit_accuracy_": bit_accuracy(decoder(to_unit(triggered.float())), wanted),
                "random_bit_accuracy_": bit_accuracy(decoder(to_unit(random_encoded)), randoms),
                "clean_bit_accuracy_": bit_accuracy(decoder(to_unit(x)), wanted)}
        return {
            **{name: tensor1(value) for name, value in accuracy.items()},
            "mean_linf_": tensor1(float(change.abs().amax(dim=(1, 2, 3)).mean())),
            "psnr_": tensor1(10 * math.log10(255 ** 2 / mse) if mse > 0 else math.inf)}

    # -- fitted state --------------------------------------------------------------------------

    def _set_state(self, state: dict[str, torch.Tensor], keep_decoder: bool) -> None:
        self._clear()
        self.secret_ = state["secret_"].to(torch.int64)
        self.image_shape_ = state["image_shape_"].to(torch.int64)
        self._check_state_matches()
        encoder, decoder = self._build(self.image_shape_.tolist(), 0)
        load_weights(encoder, unprefixed(ENCODER, state), "encoder", self.width)
        self.encoder_ = encoder.eval()
        if keep_decoder:
            load_weights(decoder, unprefixed(DECODER, state), "decoder", self.width)
            self.decoder_ = decoder.eval()
        for name in DIAGNOSTICS:
            if name in state:
                setattr(self, name, state[name].to(torch.float64))

    def _check_state_matches(self) -> None:
        if self.secret_.dim() != 1 or len(self.secret_) != self.bits:
            raise ValueError(f"this SSBA state hides a {len(self.secret_.flatten())}-bit "
                             f"secret, but the attack was created with bits = {self.bits}: "
                             "create it with the settings of the run that fitted it")
        if self.image_shape_.shape != (3,):
            raise ValueError("SSBA fitted state: image_shape_ must hold (C, H, W), got "
                             f"{self.image_shape_.tolist()}")

    @property
    def is_fitted(self) -> bool:
        return self.encoder_ is not None

    def fitted_state(self) -> dict[str, torch.Tensor]:
        """The secret, the image shape, the encoder's weights (``encoder.<name>_``, so every key
        ends in ``_``) and the fit's diagnostics. The decoder is not needed for the trigger and
        is left out."""
        if self.encoder_ is None:
            return {}
        state = {"secret_": self.secret_, "image_shape_": self.image_shape_,
                 "eps_": torch.tensor([self.eps], dtype=torch.float64)}
        state.update(prefixed(ENCODER, self.encoder_))
        state.update({name: getattr(self, name) for name in DIAGNOSTICS if hasattr(self, name)})
        return state

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> "SSBA":
        """Restore an encoder and secret saved by :meth:`fitted_state`; the restored attack has
        no decoder (``decoder_`` is None)."""
        for name in ("secret_", "image_shape_", "eps_"):
            if name not in state:
                raise ValueError(f"SSBA fitted state lacks {name!r}: pass the state saved by "
                                 "SSBA.fitted_state()")
        known = {"secret_", "image_shape_", "eps_", *DIAGNOSTICS}
        for name in state:
            if name not in known and not (name.startswith(ENCODER) and name.endswith("_")):
                raise ValueError(f"SSBA: unexpected fitted-state entry {name!r}")
        saved_eps = float(state["eps_"].flatten()[0])
        if not math.isclose(saved_eps, self.eps):
            raise ValueError(f"this SSBA state was fitted with eps = {saved_eps:g}, but the "
                             f"attack was created with eps = {self.eps:g}: create it with the "
                             "settings of the run that fitted it")
        self._set_state(state, keep_decoder=False)
        return self

    # -- the trigger ---------------------------------------------------------------------------

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        self.check_fitted()
        shape = tuple(self.image_shape_.tolist())
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"SSBA was fitted on images of shape {shape} (C, H, W) and cannot "
                             f"encode images of shape {tuple(images.shape[1:])}: fit it on "
                             "images of that shape")
        if self._applier is None or self._applier[0] != images.device:
            self._applier = (images.device, copy.deepcopy(self.encoder_).to(images.device))
        with single_thread():
            return apply_encoder(self._applier[1], images, self.secret_, self.eps)

    def decode(self, images: torch.Tensor) -> torch.Tensor:
        """The decoder's bits (int64, (N, bits)) for a uint8 batch; only after :meth:`fit` (a
        restored attack has no decoder)."""
        check_images(images)
        if self.decoder_ is None:
            raise ValueError("this SSBA has no decoder: it was restored from a saved state, "
                             "which keeps the encoder only; fit it to get one")
        decoder = copy.deepcopy(self.decoder_).to(images.device)
        with torch.no_grad():
            return (decoder(to_unit(images.float())) > 0).to(torch.int64)


def apply_encoder(encoder: Encoder, images: torch.Tensor, secret: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """clip(round(x + eps · tanh(E(x, s))), 0, 255) for a uint8 batch, in chunks, in float32;
    a new uint8 tensor."""
    out = torch.empty_like(images)
    with torch.no_grad():
        for start in range(0, len(images), CHUNK):
            x = images[start:start + CHUNK].float()
            secrets = secret.to(images.device, torch.float32).expand(len(x), -1)
            r = residual(encoder, x, secrets, eps)
            out[start:start + CHUNK] = (x + r).round().clamp(0, 255).to(torch.uint8)
    return out


def tensor1(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's weights as fitted-state entries: ``prefix + name + "_"``."""
    return {f"{prefix}{name}_": tensor.detach().cpu().clone()
            for name, tensor in module.state_dict().items()}


def unprefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len(prefix):-1]: tensor for name, tensor in state.items()
            if name.startswith(prefix) and name.endswith("_")}


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor], what: str,
                 width: int) -> None:
    """Load saved weights, turning a shape mismatch into an error that names the fix."""
    try:
        module.load_state_dict({k: v.float() for k, v in weights.items()})
    except RuntimeError as error:
        raise ValueError(f"this SSBA state's {what} does not fit an SSBA of width {width} "
                         "(or its weights are missing): create the attack with the settings of "
                         f"the run that fitted it ({error})") from None
