"""CrossSAM's iterative cross-modal training (SAMv2 paper Sec. III-C, steps (2)-(4)): register the CT-MR pairs with
AdaReg, build registered pairs, train a round, repeat with a smaller crop margin. ``scripts/train_crosssam.py`` is
its command line.

Starting from AggSAM weights (the ``crosssam_registration`` bundle's ``configs/train.json``), each round ``k``:

a. embeds every CT-MR pair of the datalist with the current weights and registers it with AdaReg (rigid; the
   ``adareg``, ``preprocessing`` and ``inferer`` sections of the bundle's ``configs/inference.json`` through
   :class:`~samv2_components.inference.BundlePipeline`, without its ``DivisiblePadd``: the inferer pads internally,
   and the registered volumes must not contain padding); a pair whose registration fails is skipped and reported;
b. builds the registered pairs (:func:`samv2_components.transforms.registered_pair`): the small-FOV scan resampled
   onto the large-FOV scan, cropped to the small scan's body box dilated by this round's margin (``margins_mm``:
   smaller each round), written as NIfTI under ``round_<k>/pairs/<pair>/`` (``image_a``, ``image_b``,
   ``valid_b``, ``body_a``); the pairs' list goes to ``round_<k>/registration.json`` (``registered``), with per
   pair the fixed -> moving rigid transform (4x4, world **LPS mm**: a physical point of the fixed scan -> the
   moving scan);
c. trains :class:`~samv2_components.engines.CrossSAMTrainer` for ``steps_per_round`` steps from the current
   weights: a bundle run of ``train.json`` + ``crosssam_round.json`` with cross-modal steps (probability
   ``cross_prob``) on the registered pairs, in this process;
d. writes ``round_<k>/model.pt`` (the bundle's final checkpoint) and ``round_<k>/report.json``: per pair the
   registration outcome, and the training losses (mean per step type, and every iteration's values).

Resuming: a round with ``model.pt`` and a completed ``report.json`` is skipped (``model.pt`` alone is not proof:
MONAI's final-checkpoint handler also writes it when training is interrupted by an exception); an interrupted
round reuses its registrations (``registration.json``) and resumes training from its checkpoints. The final
weights are those of the last round, also listed in ``<output_dir>/summary.json``.

The datalist (JSON; relative paths are resolved against its folder)::

    {"pairs": [{"fixed": "ct1.nii.gz", "moving": "mr1.nii.gz", "fixed_modality": "ct", "moving_modality": "mr"}],
     "training": [{"image": "ct1.nii.gz", "modality": "ct"}, {"image": "mr1.nii.gz", "modality": "mr"}, ...]}
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from samv2_components.errors import RegistrationFailed, SAMv2Error, SAMv2InputError
from samv2_components.inference import BundlePipeline, read_bundle_config
from samv2_components.io.atomic import atomic_file
from samv2_components.io.embeddings import case_name
from samv2_components.registration.orientation import register_rigid_with_orientation_search
from samv2_components.transforms import check_modality, registered_pair, save_registered_pair

__all__ = ["CrossSAMRounds", "load_pairs", "training_parser"]

logger = logging.getLogger("samv2_components.crosssam")


def _write_json(path: str, record: Mapping[str, Any]) -> None:
    """Write JSON atomically (a half-written report must never look complete)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _as_dict(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise SAMv2InputError(name, f"must be a dict (JSON object), got {value!r}")
    return dict(value)


def load_pairs(datalist: str) -> list[dict]:
    """The checked ``pairs`` of a CrossSAM datalist (absolute paths, modalities ``ct``/``mr``)."""
    datalist = os.fspath(datalist)
    record = _read_json(datalist)
    if record is None:
        raise SAMv2InputError(datalist, "datalist not found or not JSON")
    pairs = record.get("pairs")
    if not pairs:
        raise SAMv2InputError(datalist, "datalist has no 'pairs' (CT-MR pairs to register)")
    base = os.path.dirname(os.path.abspath(datalist))
    checked = []
    for i, entry in enumerate(pairs):
        where = f"{datalist} pair {i + 1}"
        if not isinstance(entry, Mapping) or "fixed" not in entry or "moving" not in entry:
            raise SAMv2InputError(where, "a pair needs 'fixed' and 'moving'")
        item = dict(entry)
        for key in ("fixed", "moving"):
            item[key] = os.path.normpath(os.path.join(base, item[key]))
            if not os.path.exists(item[key]):
                raise SAMv2InputError(item[key], f"file not found (listed in {where})")
            item[f"{key}_modality"] = check_modality(item.get(f"{key}_modality"), f"{where} {key}_modality")
        item["name"] = f"{i:03d}_{case_name(item['fixed'])}__{case_name(item['moving'])}"
        checked.append(item)
    return checked


def training_parser(
    datalist: str, output_dir: str, overrides: Mapping[str, Any], train_config: str, round_config: str, bundle_root: str
):
    """The ``ConfigParser`` of a round's training: ``train_config`` + ``round_config`` of the bundle at
    ``bundle_root``, with the datalist, the output folder and ``overrides`` set."""
    settings = {"datalist_file": os.path.abspath(datalist), "output_dir": os.path.abspath(output_dir), **overrides}
    return read_bundle_config(bundle_root, [train_config, round_config], settings)


class CrossSAMRounds:
    """The iterative loop (module docstring); ``run()`` returns the path of the final weights."""

    def __init__(
        self,
        datalist: str,
        init_ckpt: str,
        output_dir: str,
        rounds: int = 3,
        margins_mm: Sequence[float] = (40.0, 25.0, 15.0),
        steps_per_round: int = 2000,
        cross_prob: float = 0.5,
        overrides: Mapping[str, Any] | None = None,
        adareg_overrides: Mapping[str, Any] | None = None,
        min_registered_pairs: int = 1,
        seed: int = 0,
        bundle_root: str | None = None,
        train_config: str | None = None,
        round_config: str | None = None,
        inference_config: str | None = None,
    ):
        self.datalist, self.output_dir = os.path.abspath(datalist), os.path.abspath(output_dir)
        self.init_ckpt = os.path.abspath(init_ckpt)
        if not os.path.isfile(self.init_ckpt):
            raise SAMv2InputError(init_ckpt, "initial (AggSAM) checkpoint not found")
        self.rounds, self.steps_per_round = int(rounds), int(steps_per_round)
        if self.rounds < 1 or self.steps_per_round < 1:
            raise ValueError(f"rounds and steps_per_round must be >= 1, got {rounds}, {steps_per_round}")
        margins = [float(m) for m in (margins_mm if isinstance(margins_mm, Sequence) else [margins_mm])]
        if not margins or min(margins) < 0:
            raise ValueError(f"margins_mm must be non-negative numbers, got {margins_mm!r}")
        # fewer margins than rounds: the last one is kept for the remaining rounds
        self.margins = [margins[min(k, len(margins) - 1)] for k in range(self.rounds)]
        self.cross_prob = float(cross_prob)
        self.overrides = _as_dict(overrides, "overrides")
        self.adareg_overrides = _as_dict(adareg_overrides, "adareg_overrides")
        self.min_registered_pairs, self.seed = int(min_registered_pairs), int(seed)
        if bundle_root is None and train_config is None:
            raise ValueError("CrossSAMRounds needs the crosssam_registration bundle folder (bundle_root)")
        self.bundle_root = os.path.abspath(bundle_root or os.path.dirname(os.path.dirname(os.path.abspath(train_config))))
        configs = os.path.join(self.bundle_root, "configs")
        self.train_config = train_config or os.path.join(configs, "train.json")
        self.round_config = round_config or os.path.join(configs, "crosssam_round.json")
        self.inference_config = inference_config or os.path.join(configs, "inference.json")
        self.pairs = load_pairs(self.datalist)
        from samv2_components.io.datalist import load_training_datalist

        load_training_datalist(self.datalist)  # the intra-modality scans: fail now, not after registration

    # -- (a) + (b): registration -----------------------------------------------------------------------------

    def _registration_tools(self, weights: str, margin: float) -> tuple[BundlePipeline, Any, str]:
        """The inference pipeline (preprocessing without ``DivisiblePadd``: the inferer pads internally, and the
        registered volumes must not contain padding; inferer; the training config's network with ``weights``),
        AdaReg with this round's crop margin, and the orientation-search mode."""
        train = training_parser(
            self.datalist, self.output_dir, self.overrides, self.train_config, self.round_config, self.bundle_root
        )
        overrides = {"adareg#crop_margin_mm": margin, **{f"adareg#{k}": v for k, v in self.adareg_overrides.items()}}
        pipeline = BundlePipeline(
            self.bundle_root, ckpt=weights, device=train.get_parsed_content("device"), overrides=overrides,
            network=train.get_parsed_content("network_def"), config_file=self.inference_config,
            inferer_key="inferer", drop_preprocessing=("DivisiblePadd",),
        )
        return pipeline, pipeline.parsed("adareg"), pipeline.parser.get("orientation_search", "auto")

    def register(self, k: int, weights: str, round_dir: str) -> dict:
        """Register every pair with ``weights``; cached in ``round_<k>/registration.json``."""
        path = os.path.join(round_dir, "registration.json")
        margin = self.margins[k - 1]
        cached = _read_json(path)
        if cached and cached.get("weights") == weights and cached.get("margin_mm") == margin:
            logger.info("round %d: reusing the registrations in %s", k, path)
            return cached
        pipeline, adareg, orientation = self._registration_tools(weights, margin)
        embed = pipeline.embed_image

        records, registered = [], []
        for pair in self.pairs:
            t0 = time.perf_counter()
            record: dict[str, Any] = {"name": pair["name"], "fixed": pair["fixed"], "moving": pair["moving"]}
            try:
                images, heads = {}, {}
                for role in ("fixed", "moving"):
                    images[role] = pipeline.preprocess(pair[role], pair[f"{role}_modality"])
                    heads[role] = embed(images[role])
                rigid = register_rigid_with_orientation_search(
                    adareg, embed, images["fixed"], heads["fixed"], images["moving"], heads["moving"], mode=orientation
                )
                summary = rigid.summary
                record.update(
                    {
                        "success": bool(rigid.success),
                        "reason": rigid.reason,
                        "small_fov": rigid.small_fov,
                        "n_inliers": summary.get("n_inliers"),
                        "inlier_fraction": summary.get("inlier_fraction"),
                        "rms_residual_mm": summary.get("rms_residual_mm"),
                        "fixed_to_moving_lps": rigid.fixed_to_moving.tolist() if rigid.success else None,
                        "confidence": summary,
                    }
                )
                if rigid.success:
                    built = registered_pair(
                        images["fixed"], images["moving"], rigid.fixed_to_moving, margin, rigid.small_fov,
                        body_threshold=adareg.body_threshold, small_body_corners=rigid.small_body_corners,
                    )
                    files = save_registered_pair(built, os.path.join(round_dir, "pairs", pair["name"]))
                    large, small = built["large"], built["small"]
                    record.update(
                        {
                            "large_fov": large,
                            "crop_start": built["crop_start"],
                            "crop_stop": built["crop_stop"],
                            "overlap_fraction": round(float(built["valid_b"].float().mean()), 4),
                        }
                    )
                    registered.append(
                        {
                            **{key: os.path.relpath(p, round_dir) for key, p in files.items()},
                            "name": pair["name"],
                            "modality_a": pair[f"{large}_modality"],
                            "modality_b": pair[f"{small}_modality"],
                        }
                    )
            except SAMv2Error as exc:  # a bad scan or an unusable registration: skip the pair, say why
                record.update({"success": False, "reason": str(exc)})
            record["seconds"] = round(time.perf_counter() - t0, 2)
            level = logging.INFO if record["success"] else logging.WARNING
            logger.log(level, "round %d: %s: %s", k, pair["name"], "registered" if record["success"] else record["reason"])
            records.append(record)
        result = {
            "round": k,
            "weights": weights,
            "margin_mm": margin,
            "coordinate_system": "LPS",
            "convention": "fixed_to_moving_lps maps a physical point of the fixed scan to the moving scan",
            "pairs": records,
            "registered": registered,
        }
        os.makedirs(round_dir, exist_ok=True)
        _write_json(path, result)
        return result

    # -- (c): training ---------------------------------------------------------------------------------------

    def train(self, k: int, weights: str, round_dir: str) -> dict:
        from ignite.engine import Events

        # the training config's values for this round (they may be expressions of num_steps, e.g. epoch_length)
        config = training_parser(
            self.datalist, round_dir, {"num_steps": self.steps_per_round, **self.overrides}, self.train_config,
            self.round_config, self.bundle_root,
        )

        def configured(key: str, default: int) -> int:
            return int(config.get_parsed_content(key)) if key in config else default

        epoch_length = int(self.overrides.get("epoch_length", configured("epoch_length", 100)))
        if "epoch_length" not in self.overrides:  # the largest divisor of the round's steps up to the config's value,
            # so that num_epochs * epoch_length == steps_per_round (train.json: num_epochs = num_steps // epoch_length)
            cap = max(1, min(epoch_length, self.steps_per_round))
            epoch_length = max(d for d in range(1, cap + 1) if self.steps_per_round % d == 0)
        warmup = int(self.overrides.get("warmup_steps", configured("warmup_steps", 500)))
        settings = {
            "registered_pairs_file": os.path.join(round_dir, "registration.json"),
            "init_ckpt": weights,
            "num_steps": self.steps_per_round,
            "epoch_length": epoch_length,
            "warmup_steps": min(warmup, max(1, self.steps_per_round // 10)),  # the schedule must fit in the round
            "cross_prob": self.cross_prob,
            "seed": self.seed + k - 1,
        }
        parser = training_parser(
            self.datalist, round_dir, {**settings, **self.overrides}, self.train_config, self.round_config, self.bundle_root
        )
        parser["init_ckpt"] = weights  # never overridden: round k starts from round k-1
        history: list[dict] = []
        t0 = time.perf_counter()
        parser.get_parsed_content("initialize")
        trainer = parser.get_parsed_content("trainer")

        @trainer.on(Events.ITERATION_COMPLETED)
        def _record(engine) -> None:
            out = engine.state.output
            entry = {"iteration": int(engine.state.iteration), "step_type": out.get("step_type")}
            entry.update({key: round(float(v), 5) for key, v in out.items() if key != "step_type"})
            history.append(entry)

        parser.get_parsed_content("run")
        means: dict[str, dict[str, float]] = {}
        for step_type in sorted({h["step_type"] for h in history}):
            rows = [h for h in history if h["step_type"] == step_type]
            terms = sorted({key for h in rows for key in h if key not in ("iteration", "step_type")})
            means[step_type] = {t: round(sum(h[t] for h in rows if t in h) / len(rows), 5) for t in terms}
            means[step_type]["count"] = len(rows)
        return {
            "steps": int(trainer.state.iteration),
            "steps_this_run": len(history),  # fewer than "steps" when the round was resumed
            "epoch_length": epoch_length,
            "learning_rate": parser["learning_rate"],
            "cross_prob": self.cross_prob,
            "seconds": round(time.perf_counter() - t0, 1),
            "loss_means": means,
            "history": history,
        }

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> str:
        os.makedirs(self.output_dir, exist_ok=True)
        weights = self.init_ckpt
        summary: dict[str, Any] = {"datalist": self.datalist, "init_ckpt": self.init_ckpt, "rounds": []}
        for k in range(1, self.rounds + 1):
            round_dir = os.path.join(self.output_dir, f"round_{k}")
            model = os.path.join(round_dir, "model.pt")
            report_path = os.path.join(round_dir, "report.json")
            report = _read_json(report_path)
            if os.path.isfile(model) and report and report.get("completed"):
                logger.info("round %d: done already (%s), skipped", k, model)
            else:
                t0 = time.perf_counter()
                registration = self.register(k, weights, round_dir)
                n_ok = len(registration["registered"])
                report = {
                    "round": k,
                    "completed": False,
                    "margin_mm": self.margins[k - 1],
                    "weights_in": weights,
                    "n_pairs": len(self.pairs),
                    "n_registered": n_ok,
                    "pairs": [{key: v for key, v in r.items() if key != "confidence"} for r in registration["pairs"]],
                }
                if n_ok < self.min_registered_pairs:
                    report["error"] = f"only {n_ok} of {len(self.pairs)} pairs registered (need {self.min_registered_pairs})"
                    _write_json(report_path, report)
                    raise RegistrationFailed(f"round {k}: {report['error']}; see {report_path}")
                report["training"] = self.train(k, weights, round_dir)
                report.update({"completed": True, "weights_out": model, "seconds": round(time.perf_counter() - t0, 1)})
                report["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                _write_json(report_path, report)
            weights = model
            summary["rounds"].append(
                {
                    "round": k,
                    "margin_mm": report.get("margin_mm"),
                    "n_registered": report.get("n_registered"),
                    "n_pairs": report.get("n_pairs"),
                    "loss_means": report.get("training", {}).get("loss_means"),
                    "model": model,
                }
            )
        summary["final_model"] = weights
        _write_json(os.path.join(self.output_dir, "summary.json"), summary)
        return weights
