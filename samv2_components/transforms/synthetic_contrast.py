"""Synthetic contrast from label maps: two unrelated contrasts of one anatomy, with exact correspondence.

CrossSAM must match CT to MR, but no registered CT-MR pair of one subject exists here. An image *synthesised* from
a label map (a random intensity per structure, then a bias field, noise, blur and a random resolution; the idea of
SynthSeg, Billot et al., MedIA 2023) twice from one map gives a pair in two unrelated contrasts whose voxels
correspond exactly: a cross-modal positive pair without registration.

Label maps cover only a few organs, so :class:`TissueClassesd` first gives *every* voxel a class:

* the organ label where the scan has one with a common structure name (harmonised ids,
  :mod:`samv2_components.io.label_vocabulary`), as ``ORGAN_OFFSET + id``; per-source classes (ids >=
  ``SOURCE_ID_BLOCK``, e.g. the AAL atlas' cortical parcels) are regions of one tissue whose borders no image
  shows, so they take the tissue classes below;
* elsewhere a tissue class from the intensity: for CT from Hounsfield bands (air, lung, fat, soft tissue,
  enhanced soft tissue, cancellous and cortical bone); for MR from intensity quantiles inside the body (MR has no
  absolute scale); class 0 is the air around the body in both.

:class:`RandSynthContrastd` then draws, per image and call, one intensity per class present (the air around the
body stays dark, as in CT and MR alike), keeps a randomly signed and scaled part of the real within-class texture
(so edges inside a class and fine structure survive, but the relation *between* classes is arbitrary and not
monotone, as between CT and MR), and applies MONAI's ``RandBiasField``, ``RandGaussianNoise``,
``RandGaussianSmooth`` and ``RandSimulateLowResolution``. Intensities are in the network's input range
[-50, 205] (:mod:`samv2_components.transforms.intensity`). The geometry is never touched.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    MapTransform,
    RandBiasField,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandSimulateLowResolution,
)

from samv2_components.io.image import plain_tensor
from samv2_components.io.label_vocabulary import SOURCE_ID_BLOCK
from samv2_components.modality import check_modality

__all__ = ["TissueClassesd", "RandSynthContrastd", "CT_TISSUE_BANDS_HU", "ORGAN_OFFSET"]

#: upper bounds (HU) of the CT tissue classes 0..6; class 7 is everything above the last bound:
#: air, lung, dense lung / partial volume, fat, soft tissue, enhanced soft tissue / vessels, cancellous bone,
#: cortical bone
CT_TISSUE_BANDS_HU = (-900.0, -500.0, -150.0, -30.0, 80.0, 250.0, 700.0)
#: organ labels become ``ORGAN_OFFSET + harmonised id`` in the class map (tissue classes stay below it)
ORGAN_OFFSET = 100


class TissueClassesd(MapTransform):
    """Add a class map ``(1, D, H, W)`` int32 under ``output_key``: organ labels where given, else tissue classes.

    Args:
        keys: the normalised image key (one), values in ``output_range`` (after
            :class:`~samv2_components.transforms.intensity.NormalizeIntensityByModalityd`).
        label_key: optional organ label map on the same grid (0 = unlabelled); absent keys are fine.
        modality_key: per-sample ``"ct"`` / ``"mr"``.
        mr_classes: number of MR intensity-quantile classes inside the body.
        ct_window, output_range: the CT normalisation, to turn :data:`CT_TISSUE_BANDS_HU` into input values.
        outside: normalised value at or below which a voxel is air around the body (both modalities).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        label_key: str | None = "label",
        output_key: str = "classes",
        modality_key: str = "modality",
        mr_classes: int = 6,
        ct_window: Sequence[float] = (-1024.0, 3071.0),
        output_range: Sequence[float] = (-50.0, 205.0),
        outside: float = -45.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if int(mr_classes) < 2:
            raise ValueError(f"mr_classes must be >= 2, got {mr_classes!r}")
        self.label_key, self.output_key, self.modality_key = label_key, output_key, modality_key
        self.mr_classes = int(mr_classes)
        (w0, w1), (o0, o1) = ct_window, output_range
        self.ct_bands = torch.tensor([(hu - w0) / (w1 - w0) * (o1 - o0) + o0 for hu in CT_TISSUE_BANDS_HU])
        self.outside = float(outside)

    def classes(self, image: torch.Tensor, modality: str, label: torch.Tensor | None = None) -> torch.Tensor:
        """The class map of one normalised image ``(1, ...)`` (see the class docstring)."""
        values = image.float()
        if modality == "ct":
            out = torch.bucketize(values, self.ct_bands.to(values.device))
        else:
            body = values > self.outside
            out = torch.zeros_like(values, dtype=torch.int64)
            if bool(body.any()):
                inside = values[body]
                sample = inside[torch.randperm(inside.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
                edges = torch.quantile(sample, torch.linspace(0, 1, self.mr_classes + 1)[1:-1])
                out[body] = 1 + torch.bucketize(inside, edges)
        out[values <= self.outside] = 0
        if label is not None:
            organ = label.to(torch.int64)
            out = torch.where((organ > 0) & (organ < SOURCE_ID_BLOCK), ORGAN_OFFSET + organ, out)
        return out.to(torch.int32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d.get(self.label_key) if self.label_key else None
            modality = check_modality(d.get(self.modality_key), str(key))
            d[self.output_key] = self.classes(plain_tensor(d[key]), modality, None if label is None else plain_tensor(label))
        return d


class RandSynthContrastd(Randomizable, MapTransform):
    """Replace each image by a synthetic contrast of its class map, with probability ``prob`` per image.

    ``keys`` and ``class_keys`` pair up: ``keys[i]`` (``(1, ...)`` float, network input range) is synthesised from
    ``class_keys[i]`` (same shape, e.g. the ``_a`` / ``_b`` class patches of
    :class:`~samv2_components.transforms.patch_pairs.RandPatchPaird`). Each image gets its own independent draw.

    Args:
        prob: probability that an image is replaced.
        value_range: the network input range; class means are drawn in ``(value_range[0] + 20, value_range[1])``.
        texture_range: the real within-class deviation is kept multiplied by ``U(-t, t)`` (one factor per image).
        bias_coeff: largest coefficient of MONAI's ``RandBiasField`` (degree 3), 0 for none.
        noise_std: largest standard deviation of the Gaussian noise (input units).
        blur_sigma: largest Gaussian blur sigma (voxels).
        low_resolution_prob: probability of MONAI's ``RandSimulateLowResolution`` (zoom ``U(0.4, 1)``).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image_a", "image_b"),
        class_keys: KeysCollection = ("classes_a", "classes_b"),
        prob: float = 0.3,
        value_range: Sequence[float] = (-50.0, 205.0),
        texture_range: float = 1.5,
        bias_coeff: float = 0.4,
        noise_std: float = 3.0,
        blur_sigma: float = 1.0,
        low_resolution_prob: float = 0.3,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.class_keys = tuple(class_keys) if not isinstance(class_keys, str) else (class_keys,)
        if len(self.class_keys) != len(self.keys):
            raise ValueError(f"class_keys must pair with keys: {self.keys} vs {self.class_keys}")
        for name, value, high in (("synth_prob", prob, 1.0), ("synth_low_resolution_prob", low_resolution_prob, 1.0),
                                  ("synth_bias_coeff", bias_coeff, 1.0), ("synth_texture_range", texture_range, 5.0)):
            if not 0.0 <= float(value) <= high:
                raise ValueError(f"{name} must be in [0, {high:g}], got {value!r}")
        for name, value in (("synth_noise_std", noise_std), ("synth_blur_sigma", blur_sigma)):
            if not float(value) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        low, high = (float(v) for v in value_range)
        if not low + 20.0 < high:
            raise ValueError(f"synth value_range must be (low, high) with high > low + 20, got {value_range!r}")
        self.prob, self.low, self.high = float(prob), low, high
        self.texture_range = float(texture_range)
        self._bias = RandBiasField(degree=3, coeff_range=(0.0, float(bias_coeff)), prob=1.0 if bias_coeff > 0 else 0.0)
        self._noise = RandGaussianNoise(prob=1.0 if noise_std > 0 else 0.0, std=float(noise_std), sample_std=True)
        sigma = (0.0, float(blur_sigma))
        self._blur = RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=1.0 if blur_sigma > 0 else 0.0)
        self._low_res = RandSimulateLowResolution(prob=float(low_resolution_prob), zoom_range=(0.4, 1.0))
        self.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed=seed, state=state)
        for t in (self._bias, self._noise, self._blur, self._low_res):
            t.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        pass  # every draw happens in synthesise, per image

    def synthesise(self, image: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """One synthetic contrast ``(1, ...)`` float32 of ``classes`` (``image`` gives the within-class texture)."""
        values = image.float()
        ids, inverse = torch.unique(classes.to(torch.int64), return_inverse=True)
        counts = torch.zeros(len(ids)).index_add_(0, inverse.reshape(-1), torch.ones(inverse.numel()))
        sums = torch.zeros(len(ids)).index_add_(0, inverse.reshape(-1), values.reshape(-1))
        real_means = sums / counts.clamp_min(1.0)
        means = torch.from_numpy(self.R.uniform(self.low + 20.0, self.high, len(ids))).float()
        means[ids == 0] = float(self.R.uniform(self.low, self.low + 10.0))  # air around the body stays dark
        texture = float(self.R.uniform(-self.texture_range, self.texture_range))
        out = means[inverse] + texture * (values - real_means[inverse])
        shift = out.min()
        out = torch.as_tensor(self._bias(out - shift + 1.0)) + shift - 1.0  # multiplicative field on a positive image
        out = torch.as_tensor(self._low_res(out)).float()
        out = torch.as_tensor(self._blur(out)).float()
        out = torch.as_tensor(self._noise(out)).float()
        return out.clamp(self.low, self.high)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, class_key in zip(self.keys, self.class_keys):
            if key not in d or class_key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"key {key if key not in d else class_key!r} is not in the data")
            if self.R.rand() >= self.prob:
                continue
            image = d[key]
            synthetic = self.synthesise(plain_tensor(image), plain_tensor(d[class_key]))
            meta = {k: v for k, v in image.meta.items() if k != "affine"} if isinstance(image, MetaTensor) else None
            d[key] = MetaTensor(synthetic, affine=image.affine, meta=meta) if meta is not None else synthetic
        return d
