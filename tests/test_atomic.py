"""Atomic writes (``samv2_components.io.atomic``): a file appears complete or not at all, an error leaves the
previous file untouched and no temporary file behind, temporary names never collide, and outputs get the usual
permissions (umask), not ``mkstemp``'s 0600. The package's file writers all go through :func:`atomic_file`."""

from __future__ import annotations

import os
import stat
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from samv2_components.io.atomic import atomic_directory, atomic_file
from samv2_components.io.points import PointSet, write_points
from samv2_components.io.transforms import write_itk_transform, write_transform_json
from samv2_components.transforms.registered_pairs import REGISTERED_KEYS, save_registered_pair


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_file_appears_only_on_success(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with atomic_file(path) as tmp:
        assert os.path.dirname(tmp) == str(path.parent) and os.path.isfile(tmp)  # parent created, temp file ready
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"a": 1}')
        assert not path.exists()
    assert path.read_text(encoding="utf-8") == '{"a": 1}'
    assert sorted(os.listdir(path.parent)) == ["out.json"]
    # overwriting: the old content stays visible until the new file is complete
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write('{"a": 2}')
        assert path.read_text(encoding="utf-8") == '{"a": 1}'
    assert path.read_text(encoding="utf-8") == '{"a": 2}'


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_error_keeps_previous_file_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(b"old")
    with pytest.raises(type(error)):
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise error
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["scan.nii.gz"]
    # nothing at all when there was no previous file
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "new.csv"):
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["scan.nii.gz"]


def test_failed_rename_and_missing_temp_leave_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("old")
    with pytest.raises(FileNotFoundError, match="left no file"):
        with atomic_file(path) as tmp:
            os.remove(tmp)  # a writer that removed its output
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("read-only")))
    with pytest.raises(OSError, match="read-only"):
        with atomic_file(path) as tmp:
            with open(tmp, "w") as f:
                f.write("new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["t.txt"]


def test_content_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    with atomic_file(tmp_path / "x.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"data")
    assert calls == ["fsync", "replace"]


@pytest.mark.parametrize(
    "name, extension",
    [("scan.nii.gz", ".nii.gz"), ("points.mrk.json", ".mrk.json"), ("seg.seg.nrrd", ".seg.nrrd"), ("field.mha", ".mha"),
     ("rigid.tfm", ".tfm"), ("RIGID.TFM", ".tfm"), ("model.pt", ".pt"), ("README", "")],
)  # fmt: skip
def test_temporary_name_keeps_the_extension(tmp_path, name, extension):
    with atomic_file(tmp_path / name) as tmp:
        base = os.path.basename(tmp)
        assert base.startswith(f".{name}.") and base.endswith(f".tmp{extension}"), base
        assert os.path.dirname(tmp) == str(tmp_path)  # same folder: the rename is atomic
    assert (tmp_path / name).is_file()


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_permissions_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    with atomic_file(tmp_path / "out.png") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"png")
    assert _mode(tmp_path / "out.png") == 0o666 & ~mask  # 0o644 under the usual umask, not mkstemp's 0o600
    with atomic_directory(tmp_path, "case") as folder:
        with open(os.path.join(folder, "a.txt"), "w") as f:
            f.write("a")
    assert _mode(tmp_path / "case") == 0o777 & ~mask  # not mkdtemp's 0o700


def test_package_writers_use_the_umask(tmp_path, umask):
    umask(0o022)
    points = PointSet(names=["a"], coords=np.zeros((1, 3)), coordinate_system="LPS")
    write_points(points, tmp_path / "p.csv")
    write_points(points, tmp_path / "p.mrk.json")
    write_transform_json(np.eye(4), tmp_path / "t.json")
    write_itk_transform(np.eye(4), tmp_path / "t.tfm")
    paths = save_registered_pair(_pair(), tmp_path / "pair")
    written = [tmp_path / n for n in ("p.csv", "p.mrk.json", "t.json", "t.tfm")] + list(paths.values())
    assert {str(p): _mode(p) for p in written} == {str(p): 0o644 for p in written}
    assert sorted(os.listdir(tmp_path / "pair")) == sorted(f"{k}.nii.gz" for k in REGISTERED_KEYS)


def test_concurrent_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    path = tmp_path / "shared.txt"
    with atomic_file(path) as first, atomic_file(path) as second:
        assert first != second
        for tmp, text in ((first, "first"), (second, "second")):
            with open(tmp, "w") as f:
                f.write(text)
    assert path.read_text() == "first"  # the last to finish wins, complete
    assert os.listdir(tmp_path) == ["shared.txt"]

    errors, contents = [], {f"writer {i}: " + "x" * 10000 for i in range(8)}

    def write(text):
        try:
            for _ in range(10):
                with atomic_file(path) as tmp, open(tmp, "w") as f:
                    f.write(text)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(text,)) for text in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and path.read_text() in contents
    assert os.listdir(tmp_path) == ["shared.txt"]


def _pair(value: float = 0.0) -> dict:
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    pair = {key: MetaTensor(torch.full((1, 4, 5, 6), value), affine=affine) for key in ("image_a", "image_b")}
    mask = torch.ones(1, 4, 5, 6, dtype=torch.bool)
    pair.update({key: MetaTensor(mask, affine=affine) for key in ("valid_b", "body_a")})
    return pair


def test_two_writers_of_one_registered_pair_do_not_collide(tmp_path, monkeypatch):
    """A second writer of the same pair folder runs in the middle of the first (e.g. two rounds' workers): with a
    fixed temporary name it would overwrite and move away the first writer's temporary file."""
    folder = tmp_path / "pair"
    real_save, temporaries = nib.save, []

    def save(image, filename, *args, **kwargs):
        real_save(image, filename, *args, **kwargs)
        temporaries.append(os.fspath(filename))
        if len(temporaries) == 1:  # first file of the first writer written, not yet renamed
            save_registered_pair(_pair(2.0), folder)

    monkeypatch.setattr(nib, "save", save)
    paths = save_registered_pair(_pair(1.0), folder)
    assert len(temporaries) == 2 * len(REGISTERED_KEYS) and len(set(temporaries)) == len(temporaries)
    assert all(t.endswith(".nii.gz") and os.path.basename(t).startswith(".") for t in temporaries)
    assert sorted(os.listdir(folder)) == sorted(f"{k}.nii.gz" for k in REGISTERED_KEYS)
    # the first writer finished last: its volumes are in place, complete
    assert np.all(np.asarray(nib.load(paths["image_a"]).dataobj) == 1.0)
    assert np.all(np.asarray(nib.load(paths["image_b"]).dataobj) == 1.0)


class _StateDict:
    """An object a checkpoint saves: its state is ``state`` (``torch.save`` fails on a lambda in it)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state = state


def _run_with_saver(saver_cls, folder, state, epochs=1, **kwargs):
    from ignite.engine import Engine

    engine = Engine(lambda engine, batch: None)
    kwargs = {"save_interval": 1, "epoch_level": True, "file_prefix": "checkpoint", **kwargs}
    saver_cls(save_dir=str(folder), save_dict={"model": _StateDict(state)}, **kwargs).attach(engine)
    engine.run([0], max_epochs=epochs)


def test_checkpoints_appear_complete_or_not_at_all(tmp_path, umask):
    """MONAI's CheckpointSaver writes in place: a save that fails half-way leaves a torn file under the checkpoint's
    name, from which the next run of the command would resume. The training bundles' saver leaves nothing."""
    from monai.handlers import CheckpointSaver

    from samv2_components.engines import AtomicCheckpointSaver, FinalModelSaver

    unpicklable = {"w": torch.zeros(1000), "f": lambda: 0}
    with pytest.raises(AttributeError, match="pickle"):
        _run_with_saver(CheckpointSaver, tmp_path / "monai", unpicklable)
    assert os.listdir(tmp_path / "monai") == ["checkpoint_model_epoch=1.pt"]  # the torn file this guards against
    with pytest.raises(AttributeError, match="pickle"):
        _run_with_saver(AtomicCheckpointSaver, tmp_path / "atomic", unpicklable)
    assert os.listdir(tmp_path / "atomic") == []
    with pytest.raises(AttributeError, match="pickle"):
        _run_with_saver(FinalModelSaver, tmp_path / "final", unpicklable, save_interval=0)
    assert os.listdir(tmp_path / "final") == []

    # a good run: complete, loadable files with the usual permissions; old ones still removed (n_saved)
    umask(0o022)
    _run_with_saver(AtomicCheckpointSaver, tmp_path / "good", {"w": torch.arange(5.0)}, epochs=3, n_saved=2)
    names = sorted(os.listdir(tmp_path / "good"))
    assert names == ["checkpoint_model_epoch=2.pt", "checkpoint_model_epoch=3.pt"]
    loaded = torch.load(tmp_path / "good" / names[-1], weights_only=True)
    assert torch.equal(loaded["w"] if "w" in loaded else loaded["model"]["w"], torch.arange(5.0))
    assert stat.S_IMODE(os.stat(tmp_path / "good" / names[-1]).st_mode) == 0o644
