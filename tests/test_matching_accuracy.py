"""With the shipped model, on a real CT against a known random transform of itself (exact ground truth), fixed-point
matching is at least as accurate as nearest-neighbour matching and both are accurate to a few millimetres.

The scan is the shipped sample CT (small, so the test is quick); ``scripts/benchmark_matching.py`` runs the same
comparison on a held-out chest CT for the documented numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUNDLE = os.path.join(ROOT, "bundles", "samv2_matching")
MODEL = os.path.join(BUNDLE, "models", "model.pt")


@pytest.mark.skipif(not os.path.isfile(MODEL), reason="needs the shipped model")
def test_fixed_point_at_least_as_accurate_as_nn(tmp_path):
    from samv2_components.inference import BundlePipeline
    from samv2_components.io.image import load_scan
    from samv2_components.matching import SAMv2Matcher
    from samv2_components.metrics import summarize_errors
    from samv2_components.sample_data import sample_path
    from samv2_components.transforms import known_transform as known

    image = sample_path("ct_abdomen")
    template = load_scan(image)
    transform = known.random_transform(0, known.grid_centre_lps(template), max_rotation_deg=8.0, max_translation_mm=15.0)
    query, _ = known.resample_query(template, transform)
    points = known.sample_template_points(template, 120, 0, border_mm=12.0)
    truth = transform.template_to_query(points)
    pipe = BundlePipeline(BUNDLE)
    matcher = SAMv2Matcher(**pipe.settings("matcher"))
    template_scan = matcher.prepare(pipe.embed(image))
    query_scan = matcher.prepare(pipe.embed(known.save_nifti(query, str(tmp_path / "query.nii"))))
    nn = summarize_errors(matcher.match(template_scan, query_scan, points, method="nearest_neighbour").points_lps, truth)
    fp = summarize_errors(matcher.match(template_scan, query_scan, points, method="fixed_point").points_lps, truth)
    assert fp["med"] <= nn["med"] + 0.1, (fp, nn)
    assert fp["cpm"] >= nn["cpm"] - 1.0, (fp, nn)
    assert fp["median"] < 4.0 and fp["cpm"] > 80.0, fp
    assert np.isfinite(nn["med"]) and nn["median"] < 5.0, nn
