"""The semantic_sam training bundle, run as users run it: ``python -m monai.bundle run`` (and ``torchrun``).

Every run is tiny (16x32x32 patches, width 0.25, two iterations per epoch): the tests check the workflow
(checkpoints, resuming, DDP, input errors), not what the network learns. The default suite makes one
single-process run (``first_run``, checked by ``test_training_writes_checkpoints_and_model``) and one torchrun
run continuing it, the DDP smoke test (``test_ddp_two_processes_resume_and_save_once``); every other run (fine
tuning, resuming, input errors on the command line) is ``slow`` (``pytest -m slow``).
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from samv2_components.errors import SAMv2InputError, find_samv2_error
from samv2_components.engines import SAMv2Trainer
from samv2_components.engines.trainer import isotropic_spacing
from samv2_components.io.datalist import load_training_datalist
from samv2_components.networks import SAMv2Net
from samv2_components.networks.weights import load_weights

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUNDLE = os.path.join(ROOT, "bundles", "semantic_sam")
TRAIN = os.path.join("bundles", "semantic_sam", "configs", "train.json")
MULTI_GPU = os.path.join("bundles", "semantic_sam", "configs", "multi_gpu_train.json")
TINY = [
    "--epoch_length", "2",
    "--patch_size", "[16,32,32]",
    "--semantic_crop_size", "[16,32,32]",
    "--network_def#width", "0.25",
    "--warmup_steps", "2",
]  # fmt: skip
# one thread per process: with more threads than free cores (e.g. beside another training run) torch's CPU
# convolutions slow down by an order of magnitude; torchrun sets the same for its workers
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SAVING_HANDLERS = ["AtomicCheckpointSaver", "FinalModelSaver", "StatsHandler", "TensorBoardStatsHandler", "ProgressBar"]


def run_train(output_dir, *overrides, configs=(TRAIN,), nproc=None):
    """Run the training bundle in a subprocess (under ``torchrun`` with ``nproc`` processes if given)."""
    config = configs[0] if len(configs) == 1 else str(list(configs))
    launcher = [sys.executable] if nproc is None else [sys.executable, "-m", "torch.distributed.run"]
    if nproc is not None:
        launcher += [f"--nproc_per_node={nproc}", "--standalone"]
    cmd = [*launcher, "-m", "monai.bundle", "run", "--config_file", config, *TINY, "--output_dir", str(output_dir)]
    return subprocess.run([*cmd, *overrides], cwd=ROOT, env=ENV, capture_output=True, encoding="utf-8", errors="replace", timeout=300)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def save_nifti(path, data, spacing=2.0):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return str(path)


def write_datalist(path, entries):
    path.write_text(json.dumps({"training": entries}))
    return str(path)


def train_parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, TRAIN))
    parser["bundle_root"] = BUNDLE
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Four iterations (two epochs) from scratch on the shipped sample datalist."""
    out = tmp_path_factory.mktemp("train")
    result = run_train(out, "--num_steps", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_fine_tuning_starts_from_given_weights(first_run, tmp_path):
    """``--init_ckpt`` starts a new run from a model.pt (fine-tuning); a fresh folder, so nothing is resumed."""
    init = first_run[0] / "model.pt"
    result = run_train(tmp_path / "tune", "--num_steps", "2", "--init_ckpt", str(init), "--learning_rate", "0.0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded weights from" in result.stdout + result.stderr
    tuned = torch.load(tmp_path / "tune" / "model.pt", map_location="cpu", weights_only=True)
    start = torch.load(init, map_location="cpu", weights_only=True)
    # with a zero learning rate only batch-norm running statistics move: every weight is the initial one
    for key, value in start.items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(tuned[key], value, msg=key)


def test_training_writes_checkpoints_and_model(first_run):
    out, result = first_run
    assert "training from scratch" in result.stderr
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint_checkpoint_epoch=1.pt", "checkpoint_checkpoint_epoch=2.pt"]
    assert len(os.listdir(out / "tensorboard")) == 1
    # log_every defaults to 10: four iterations log no per-iteration line (MONAI logs every one for an int)
    assert "Iter:" not in result.stderr
    checkpoint = load_checkpoint(out / "checkpoints" / "checkpoint_checkpoint_epoch=2.pt")
    assert sorted(checkpoint) == ["lr_scheduler", "model", "optimizer", "trainer"]
    assert checkpoint["trainer"]["iteration"] == 4
    net = SAMv2Net(width=0.25)
    assert load_weights(net, out / "model.pt")
    for key, value in net.state_dict().items():  # model.pt is the final state, the same as the last checkpoint
        torch.testing.assert_close(value, checkpoint["model"][key])


@pytest.mark.slow
def test_resume_continues_iterations_optimizer_and_schedule(first_run, tmp_path):
    out = tmp_path / "train"
    shutil.copytree(first_run[0], out)
    result = run_train(out, "--num_steps", "8", "--log_every", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and "checkpoint_checkpoint_epoch=2.pt" in result.stderr
    # iterations 5..8 ran (epochs 3 and 4); with log_every 3 only iteration 6 (epoch 3, iteration 2) is logged
    iteration_lines = [line for line in result.stderr.splitlines() if "Iter:" in line]
    assert len(iteration_lines) == 1 and "Epoch: 3/4, Iter: 2/2" in iteration_lines[0], iteration_lines
    checkpoint = load_checkpoint(out / "checkpoints" / "checkpoint_checkpoint_epoch=4.pt")
    assert checkpoint["trainer"]["iteration"] == 8
    assert checkpoint["trainer"]["max_epochs"] == 4
    state = checkpoint["optimizer"]["state"]
    n_params = len(list(SAMv2Net(width=0.25).parameters()))
    assert len(state) == n_params and all("momentum_buffer" in s for s in state.values())
    scheduler = checkpoint["lr_scheduler"]
    assert scheduler["last_epoch"] == 8
    assert scheduler["t_total"] == 8  # the new run's schedule, not the 4 steps of the checkpoint it resumed from
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0


def test_multi_gpu_config_splits_handlers_and_seeds_by_rank():
    """Without a process group: rank > 0 builds only the resume, lr and clock handlers (every rank must stop at the
    same iteration); draws differ per rank."""
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, TRAIN), os.path.join(ROOT, MULTI_GPU)])
    handlers = parser["handlers"]
    disabled = [h["_target_"].split(".")[-1] for h in handlers if h.get("_disabled_") == "$dist.get_rank() > 0"]
    assert disabled == SAVING_HANDLERS
    assert [h["_target_"].split(".")[-1] for h in handlers if "_disabled_" not in h] == [
        "ResumeFromLatestCheckpoint",
        "LrScheduleHandler",
        "TrainingClock",
    ]
    assert parser["checkpoint_objects"]["model"] == "@network_def"  # plain SAMv2Net keys, not the DDP wrapper's
    # the step-type draw uses the same seed on every rank, so an iteration is all-appearance or all-semantic
    assert parser["trainer"]["seed"] == "@seed"
    draws, seeds = [], []
    for rank in (0, 1):
        parser["bundle_root"] = BUNDLE
        parser["rank"] = rank
        parser["train_dataset"] = "$list(range(50))"
        parser.parse(reset=True)
        draws.append(list(parser.get_parsed_content("train_loader#sampler")))
        seeds.append(parser.get_parsed_content("rank_seed"))
    assert len(draws[0]) == len(draws[1]) == 100 * 2  # epoch_length * batch_size draws per rank
    assert draws[0] != draws[1] and seeds == [0, 1]


def test_ddp_two_processes_resume_and_save_once(first_run, tmp_path):
    """torchrun with two gloo processes on CPU continues the single-process run for two iterations."""
    out = tmp_path / "ddp"
    shutil.copytree(first_run[0], out)
    shutil.rmtree(out / "tensorboard")
    result = run_train(out, "--num_steps", "6", configs=(TRAIN, MULTI_GPU), nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count("resuming from") == 2  # every rank loads the checkpoint
    assert len(os.listdir(out / "tensorboard")) == 1  # rank 1 built no TensorBoard writer
    assert "checkpoint_checkpoint_epoch=3.pt" in os.listdir(out / "checkpoints")
    checkpoint = load_checkpoint(out / "checkpoints" / "checkpoint_checkpoint_epoch=3.pt")
    assert checkpoint["trainer"]["iteration"] == 6
    expected = set(SAMv2Net(width=0.25).state_dict())
    assert set(checkpoint["model"]) == expected
    assert set(torch.load(out / "model.pt", map_location="cpu", weights_only=True)) == expected


# -- bad inputs ---------------------------------------------------------------------------------------------------


def test_empty_datalist(tmp_path):
    with pytest.raises(SAMv2InputError, match="no 'training' entries"):
        load_training_datalist(write_datalist(tmp_path / "empty.json", []))


def test_missing_file_is_named(tmp_path):
    path = write_datalist(tmp_path / "list.json", [{"image": "nowhere.nii.gz", "modality": "ct"}])
    with pytest.raises(SAMv2InputError, match="nowhere.nii.gz: file not found"):
        load_training_datalist(path)


def test_label_on_another_grid_is_named(tmp_path):
    rng = np.random.default_rng(0)
    save_nifti(tmp_path / "scan.nii.gz", rng.normal(0, 100, (20, 20, 20)))
    save_nifti(tmp_path / "labels.nii.gz", np.zeros((20, 20, 18)))
    path = write_datalist(tmp_path / "list.json", [{"image": "scan.nii.gz", "label": "labels.nii.gz", "modality": "ct"}])
    with pytest.raises(SAMv2InputError, match="labels.nii.gz: label map is not on the grid"):
        load_training_datalist(path)


def test_patch_larger_than_twice_the_scan_names_the_file(tmp_path):
    """Through the bundle's own transforms, whose cached tensors carry no file name."""
    scan = save_nifti(tmp_path / "small.nii.gz", np.random.default_rng(0).normal(0, 100, (10, 10, 8)))
    (item,) = load_training_datalist(write_datalist(tmp_path / "list.json", [{"image": scan, "modality": "ct"}]))
    transforms = train_parser().get_parsed_content("train_transforms")  # default patch 32x96x96
    with pytest.raises(Exception) as info:
        transforms(item)
    error = find_samv2_error(info.value)
    assert error is not None and error.source == scan and "smaller than half the training patch" in str(error)


def test_scan_without_foreground_warns_with_its_name(tmp_path, caplog):
    air = save_nifti(tmp_path / "air.nii.gz", np.random.default_rng(0).normal(-1000, 10, (40, 40, 20)))
    (item,) = load_training_datalist(write_datalist(tmp_path / "list.json", [{"image": air, "modality": "ct"}]))
    transforms = train_parser(patch_size=[16, 32, 32]).get_parsed_content("train_transforms")
    with caplog.at_level(logging.WARNING, logger="samv2_components"):
        pairs = [transforms(dict(item)) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if "no voxel above the foreground threshold" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(air)  # once per file
    assert all(p["image_a"].shape == (1, 16, 32, 32) for p in pairs)


@pytest.mark.slow
def test_cli_training_continues_on_a_scan_without_foreground(tmp_path):
    air = save_nifti(tmp_path / "air.nii.gz", np.random.default_rng(0).normal(-1000, 10, (40, 40, 20)))
    datalist = write_datalist(tmp_path / "list.json", [{"image": air, "modality": "ct"}])
    result = run_train(tmp_path / "out", "--datalist_file", datalist, "--num_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{air}: no voxel above the foreground threshold" in result.stderr
    assert os.path.isfile(tmp_path / "out" / "model.pt")


@pytest.mark.parametrize("case", ["missing", "too_small"])
@pytest.mark.slow
def test_cli_input_error_is_one_line(tmp_path, case):
    if case == "missing":
        culprit, problem = str(tmp_path / "missing.nii.gz"), "file not found"
    else:
        culprit = save_nifti(tmp_path / "small.nii.gz", np.random.default_rng(0).normal(0, 100, (10, 10, 8)))
        problem = "smaller than half the training patch"
    datalist = write_datalist(tmp_path / "list.json", [{"image": culprit, "modality": "ct"}])
    result = run_train(tmp_path / "out", "--datalist_file", datalist, "--num_steps", "2", "--patch_size", "[32,96,96]")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ERROR: {culprit}: ") and problem in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("config", [TRAIN, "bundles/crosssam_registration/configs/train.json"])
@pytest.mark.parametrize("num_steps, epoch_length, num_epochs", [(20, 20, 1), (100, 100, 1), (250, 100, 2), (20000, 100, 200)])
def test_num_steps_below_one_epoch_runs_that_many_steps(config, num_steps, epoch_length, num_epochs):
    """Checkpoints come every 100 iterations, but a short run (a smoke test) is not stretched to 100."""
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, config))
    parser["num_steps"] = num_steps
    parser.parse(reset=True)
    assert parser.get_parsed_content("epoch_length") == epoch_length
    assert parser.get_parsed_content("num_epochs") == num_epochs


@pytest.mark.parametrize("config", [TRAIN, "bundles/crosssam_registration/configs/train.json"])
def test_non_isotropic_spacing_is_refused_by_name(config, monkeypatch, tmp_path):
    """The trainer measures the losses' radii with one voxel size: ``spacing_mm`` [2, 2, 3] is refused, not cut to 2."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize installs the one-line error hook
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, config))
    assert parser["trainer"]["volume_spacing"] == "@spacing_mm"  # the whole spacing, not its first value
    parser["spacing_mm"] = [2.0, 2.0, 3.0]
    parser["output_dir"] = str(tmp_path)  # (the output folder is checked first; run from the repository it resolves)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("initialize")  # before the datasets are loaded
    error = find_samv2_error(info.value)
    assert error is not None and error.source == "spacing_mm" and "must be isotropic" in str(error), info.value


def test_trainer_takes_an_isotropic_spacing_only():
    assert isotropic_spacing(2.0) == 2.0 and isotropic_spacing([1.5, 1.5, 1.5]) == 1.5
    assert isotropic_spacing((2, 2.0, 2.0000000001)) == 2.0
    for bad in ([2.0, 2.0], [0.0, 0.0, 0.0], "2", [2.0, "x", 2.0]):
        with pytest.raises(SAMv2InputError, match="spacing_mm: must be a positive voxel size"):
            isotropic_spacing(bad)
    with pytest.raises(SAMv2InputError, match=r"spacing_mm: must be isotropic .*\[1\.0, 1\.0, 2\.5\]"):
        SAMv2Trainer(device="cpu", max_epochs=1, train_data_loader=[], network=torch.nn.Linear(1, 1), optimizer=None,
                     fine_loss=None, coarse_loss=None, volume_spacing=[1.0, 1.0, 2.5])


@pytest.mark.slow
def test_cli_non_isotropic_spacing_is_one_line(tmp_path):
    result = run_train(tmp_path / "out", "--num_steps", "2", "--spacing_mm", "[2.0,2.0,3.0]")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: spacing_mm: must be isotropic"), result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert not os.path.exists(tmp_path / "out" / "model.pt")


@pytest.mark.slow
def test_an_interrupted_run_writes_no_model_and_resumes_to_the_same_weights(tmp_path):
    """SIGTERM once the first epoch checkpoint is written: no ``model.pt`` (a half-trained model that looks
    finished), exit status != 0; the same command again resumes from that checkpoint and ends with exactly the
    weights of the uninterrupted run (every epoch's draws are seeded by the epoch number: ``data_seed``)."""
    import signal
    import time

    steps = ["--num_steps", "6"]  # three epochs of two iterations
    reference = run_train(tmp_path / "reference", *steps)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", TRAIN, *TINY, "--output_dir", str(out), *steps]
    process = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / "checkpoints" / "checkpoint_checkpoint_epoch=1.pt"
    start = time.monotonic()
    while not first.exists():
        assert process.poll() is None and time.monotonic() - start < 300, "the run ended before it was interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "ERROR: interrupted" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert not (out / "model.pt").exists()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith("tmp")]

    resumed = run_train(out, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    expected = torch.load(tmp_path / "reference" / "model.pt", map_location="cpu", weights_only=True)
    got = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def _autograd_node_names(tensor: torch.Tensor) -> set[str]:
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_heads_model_runs_a_metatensor_as_its_plain_tensor():
    """A collated batch is a MetaTensor: the heads are the same values as for its plain tensor, plain tensors
    themselves, and the graph holds no CopySlices / alias nodes (the network's in-place ReLUs and residual sums
    on MetaTensor views recorded one each, and each copied a whole activation in the backward pass)."""
    from monai.data import MetaTensor

    from samv2_components.engines import HeadsModel

    torch.manual_seed(0)
    model = HeadsModel(SAMv2Net(width=0.25)).train()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        from_meta = model(MetaTensor(x.clone(), affine=torch.eye(4)), heads=("fine", "coarse"))
        from_plain = model(x, heads=("fine", "coarse"))
    for name in ("fine", "coarse"):
        assert type(from_meta[name]) is torch.Tensor
        torch.testing.assert_close(from_meta[name], from_plain[name], rtol=0, atol=0)
    nodes = _autograd_node_names(from_meta["fine"].float().sum())
    assert "ConvolutionBackward0" in nodes
    assert not {"CopySlices", "AliasBackward0", "AsStridedBackward0"} & nodes


@pytest.mark.slow
def test_compiled_heads_model_gives_the_eager_heads_and_gradients():
    """torch.compile (inductor) of the training network: same heads and parameter gradients as the eager pass up to
    float32 rounding, the same state-dict keys, and a second input shape gets its own graph."""
    from samv2_components.engines import HeadsModel
    from samv2_components.engines.trainer import cpp_compiler_available

    if not cpp_compiler_available():
        pytest.skip("no C++ compiler for inductor")
    torch.manual_seed(0)
    compiled = HeadsModel(SAMv2Net(width=0.25), compile=True).train()
    eager = HeadsModel(SAMv2Net(width=0.25)).train()
    eager.load_state_dict(compiled.state_dict())
    assert compiled.compiled and list(compiled.state_dict()) == list(eager.state_dict())
    for shape, heads in (((2, 1, 16, 32, 32), ("fine", "coarse")), ((1, 1, 16, 48, 32), ("semantic",))):
        x = torch.randn(shape)
        out_c, out_e = compiled(x, heads=heads), eager(x, heads=heads)
        for name in heads:
            torch.testing.assert_close(out_c[name], out_e[name], rtol=1e-4, atol=1e-4)
        weights = {name: torch.randn_like(out_e[name]) for name in heads}
        compiled.zero_grad(), eager.zero_grad()
        sum((out_c[n] * weights[n]).sum() for n in heads).backward()
        sum((out_e[n] * weights[n]).sum() for n in heads).backward()
        for (name, p_c), p_e in zip(compiled.named_parameters(), eager.parameters()):
            if p_e.grad is not None:  # a whole layer's gradient sums over every voxel: compared as a norm
                error = float((p_c.grad - p_e.grad).norm() / p_e.grad.norm().clamp_min(1e-12))
                assert error < 1e-3, (name, error)


def test_heads_model_without_a_cpp_compiler_warns_and_runs_eagerly(monkeypatch, caplog):
    """compile=True where inductor cannot build kernels: one warning, and the model is the eager one; the setting
    is read as a yes/no word."""
    from samv2_components.engines import HeadsModel
    from samv2_components.engines import trainer as trainer_module

    monkeypatch.setattr(trainer_module.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="samv2_components"):
        model = HeadsModel(SAMv2Net(width=0.25), compile=True)
    assert not model.compiled and model._compiled_call_impl is None
    assert any("no C++ compiler" in r.getMessage() for r in caplog.records)
    out = model(torch.randn(1, 1, 16, 32, 32), heads=("fine",))
    assert out["fine"].shape == (1, 128, 8, 16, 16)
    # the command line's "--compile false" is a string, not a true value; a word that is neither is refused
    assert not HeadsModel(SAMv2Net(width=0.25), compile="false").compiled
    with pytest.raises(SAMv2InputError, match="compile"):
        HeadsModel(SAMv2Net(width=0.25), compile="sometimes")
