"""CachedEmbeddingInferer: a hit returns exactly what the inferer computed; any change of input, weights or
numerics is a different entry, and the same weights in another network object are the same entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samv2_components.inference import CachedEmbeddingInferer, SAMv2Inferer
from samv2_components.networks import SAMv2Net


class CountingInferer(SAMv2Inferer):
    calls = 0

    def __call__(self, inputs, network, *args, **kwargs):
        CountingInferer.calls += 1
        return super().__call__(inputs, network, *args, **kwargs)


def _image(seed=0):
    gen = torch.Generator().manual_seed(seed)
    affine = torch.tensor([[-2.0, 0, 0, 10], [0, -2.0, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]], dtype=torch.float64)
    return MetaTensor(torch.rand(1, 1, 8, 32, 32, generator=gen) * 100 - 50, affine=affine)


def test_hit_equals_computed_and_keys_change(tmp_path):
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25).eval()
    inner = CountingInferer(bf16=False, max_tile_voxels=None)
    cached = CachedEmbeddingInferer(inner, tmp_path / "cache")
    CountingInferer.calls = 0
    first = cached(_image(), net)
    second = cached(_image(), net)
    assert CountingInferer.calls == 1 and cached.hits == 1 and cached.misses == 1
    for name in first:
        torch.testing.assert_close(second[name].as_tensor(), first[name].as_tensor(), rtol=0, atol=0)
        np.testing.assert_array_equal(np.asarray(second[name].affine), np.asarray(first[name].affine))
    key = cached.key(_image(), net)
    assert cached.key(_image(seed=1), net) != key  # other content
    moved = _image()
    moved.affine[0, 3] += 1.0
    assert cached.key(moved, net) != key  # same voxels elsewhere in space
    assert CachedEmbeddingInferer(SAMv2Inferer(bf16=True), tmp_path / "cache").key(_image(), net) != key
    other_dtype = "float32" if inner.output_dtype == torch.float16 else "float16"
    other = CachedEmbeddingInferer(CountingInferer(bf16=False, max_tile_voxels=None, output_dtype=other_dtype), tmp_path / "cache")
    assert other.key(_image(), net) != key  # a float32 entry is not served as a float16 one


def test_key_follows_the_weights_not_the_network_object(tmp_path):
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25).eval()
    CountingInferer.calls = 0
    cached = CachedEmbeddingInferer(CountingInferer(bf16=False, max_tile_voxels=None), tmp_path / "cache")
    first = cached(_image(), net)
    key = cached.key(_image(), net)
    # the same weights in another network object: the same entry
    twin = SAMv2Net(width=0.25).eval()
    twin.load_state_dict(net.state_dict())
    assert cached.key(_image(), twin) == key
    again = cached(_image(), twin)
    assert CountingInferer.calls == 1 and cached.hits == 1
    for name in first:
        torch.testing.assert_close(again[name].as_tensor(), first[name].as_tensor(), rtol=0, atol=0)
    # weights changed in place, by an in-place op or through .data (no autograd version bump): a new entry
    with torch.no_grad():
        next(net.parameters()).add_(1e-3)
    changed = cached.key(_image(), net)
    assert changed != key
    next(net.parameters()).data.mul_(2.0)
    assert cached.key(_image(), net) not in (key, changed)
    cached(_image(), net)
    assert CountingInferer.calls == 2 and cached.misses == 2
    # a buffer (batch-norm statistics) is part of the weights too
    buffer = next(b for b in twin.buffers() if b.is_floating_point())
    buffer.add_(1.0)
    assert cached.key(_image(), twin) != key


def test_disabled_cache_passes_through(tmp_path):
    torch.manual_seed(0)
    net = SAMv2Net(width=0.25).eval()
    CountingInferer.calls = 0
    cached = CachedEmbeddingInferer(CountingInferer(bf16=False, max_tile_voxels=None), None)
    cached(_image(), net)
    cached(_image(), net)
    assert CountingInferer.calls == 2


def test_concurrent_writers_of_one_entry_never_leave_a_torn_one(tmp_path):
    """Two processes embed the same scan into one empty cache at the same time, several times over; a reader polling
    the cache meanwhile always loads a complete entry, and at the end there is one entry, no temporary file, equal
    to a fresh computation."""
    import subprocess
    import sys
    import textwrap
    import time

    cache = tmp_path / "cache"
    script = textwrap.dedent(f"""
        import torch
        from monai.data import MetaTensor
        from samv2_components.inference import CachedEmbeddingInferer, SAMv2Inferer
        from samv2_components.networks import SAMv2Net
        torch.manual_seed(0)
        net = SAMv2Net(width=0.25).eval()
        g = torch.Generator().manual_seed(0)
        image = MetaTensor(torch.rand((1, 1, 16, 64, 64), generator=g) * 255 - 50, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
        for _ in range(3):
            for f in {str(cache)!r} and __import__("glob").glob({str(cache / "*.pt")!r}):
                __import__("os").remove(f)  # a miss every round: every round writes the entry again
            CachedEmbeddingInferer(SAMv2Inferer(bf16=False, max_tile_voxels=None), {str(cache)!r})(image, net)
    """)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", script], env=env) for _ in range(2)]
    loads = 0
    while any(w.poll() is None for w in writers):
        for path in cache.glob("*.pt") if cache.exists() else []:
            if path.name.startswith("."):  # a writer's temporary file, not an entry
                continue
            try:
                entry = torch.load(path, weights_only=False)
            except FileNotFoundError:  # removed between the listing and the load by the next round
                continue
            assert set(entry) >= {"fine", "coarse"} and all(e["array"].ndim == 5 for e in entry.values())
            loads += 1
        time.sleep(0.01)
    assert [w.returncode for w in writers] == [0, 0]
    assert len([p for p in cache.glob("*.pt") if not p.name.startswith(".")]) <= 1
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]
    if loads == 0:
        pytest.skip("the writers never overlapped with a read on this machine")
