"""CrossSAM's iterative cross-modal training (SAMv2 paper Sec. III-C, steps (2)-(4)): the command line of
:class:`samv2_components.registration.crosssam_rounds.CrossSAMRounds`.

Starting from AggSAM weights (``bundles/crosssam_registration/configs/train.json``), each round ``k``:

a. embeds every CT-MR pair of the datalist with the current weights and registers it with AdaReg (rigid; the
   ``adareg``, ``preprocessing`` and ``inferer`` sections of ``bundles/crosssam_registration/configs/inference.json``,
   without its ``DivisiblePadd``: the inferer pads internally, and the registered volumes must not contain padding);
   a pair whose registration fails is skipped and reported;
b. builds the registered pairs (:func:`samv2_components.transforms.registered_pair`): the small-FOV scan resampled
   onto the large-FOV scan, cropped to the small scan's body box dilated by this round's margin
   (``margins_mm``, default 40, 25, 15 mm: smaller each round), written as NIfTI under
   ``round_<k>/pairs/<pair>/`` (``image_a``, ``image_b``, ``valid_b``, ``body_a``: open ``image_b`` over
   ``image_a`` in 3D Slicer to check a registration);
c. trains :class:`~samv2_components.engines.CrossSAMTrainer` for ``steps_per_round`` steps from the current
   weights: a bundle run of ``train.json`` + ``crosssam_round.json`` (the AggSAM settings: SGD lr 0.02, momentum
   0.9, weight decay 1e-4, warm-up + cosine schedule, batch 2, 32x96x96 patches, aggressive intensity
   augmentation; plus cross-modal steps with probability ``cross_prob``), run in this process;
d. writes ``round_<k>/model.pt`` (the bundle's final checkpoint) and ``round_<k>/report.json``: per pair the
   registration outcome (success, reason, small FOV, inliers, inlier fraction, RMS residual, crop), and the
   training losses (mean per step type, and every iteration's values).

Resuming: a round with ``model.pt`` and a completed ``report.json`` is skipped (``model.pt`` alone is not proof:
MONAI's final-checkpoint handler also writes it when training is interrupted by an exception); an interrupted
round reuses its registrations (``registration.json``) and resumes training from its checkpoints. The final
weights are those of the last round, also listed in ``<output_dir>/summary.json``.

The datalist (JSON; relative paths are resolved against its folder)::

    {"pairs": [{"fixed": "ct1.nii.gz", "moving": "mr1.nii.gz", "fixed_modality": "ct", "moving_modality": "mr"}],
     "training": [{"image": "ct1.nii.gz", "modality": "ct"}, {"image": "mr1.nii.gz", "modality": "mr"}, ...]}

``training`` lists single scans for the intra-modality steps (optionally with ``label`` for semantic steps), as
the AggSAM datalist.

Example::

    python scripts/train_crosssam.py --datalist pairs.json --init_ckpt bundles/crosssam_registration/models/model.pt \\
        --output_dir runs/crosssam --rounds 3 --margins_mm "[40,25,15]" --steps_per_round 2000

``--overrides '{"batch_size": 4, "network_def#width": 1.0}'`` sets keys of the training config (``train.json`` +
``crosssam_round.json``); ``--adareg_overrides '{"min_inliers": 20}'`` sets AdaReg arguments.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import fire

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, ROOT)

from samv2_components.registration.crosssam_rounds import CrossSAMRounds  # noqa: E402

BUNDLE = os.path.join(ROOT, "bundles", "crosssam_registration")


def main(
    datalist: str,
    init_ckpt: str,
    output_dir: str,
    rounds: int = 3,
    margins_mm: Sequence[float] = (40.0, 25.0, 15.0),
    steps_per_round: int = 2000,
    cross_prob: float = 0.5,
    overrides: Any = None,
    adareg_overrides: Any = None,
    min_registered_pairs: int = 1,
    seed: int = 0,
) -> str:
    """Run the CrossSAM rounds (module docstring); returns (fire prints) the final model path.

    Args:
        datalist: JSON with ``pairs`` (CT-MR pairs to register) and ``training`` (single scans).
        init_ckpt: the AggSAM ``model.pt`` the first round starts from.
        output_dir: receives ``round_<k>/`` (model.pt, report.json, registration.json, pairs/, checkpoints/) and
            ``summary.json``.
        rounds: number of register-then-train rounds.
        margins_mm: crop margin per round (the last one repeats if fewer are given).
        steps_per_round: training iterations per round.
        cross_prob: probability of a cross-modal step (else an intra-modality step).
        overrides: training-config keys to set (dict or JSON string), e.g. ``{"batch_size": 4}``.
        adareg_overrides: AdaReg arguments to set (dict or JSON string), e.g. ``{"min_inliers": 20}``.
        min_registered_pairs: fewer registered pairs in a round stop the run (with the round's report written).
        seed: base seed (round k uses seed + k - 1).
    """
    from samv2_components.errors import install_cli_error_handler

    install_cli_error_handler()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    final = CrossSAMRounds(
        datalist, init_ckpt, output_dir, rounds, margins_mm, steps_per_round, cross_prob,
        overrides, adareg_overrides, min_registered_pairs, seed, bundle_root=BUNDLE,
    ).run()
    return final


if __name__ == "__main__":
    fire.Fire(main)
