"""Model Zoo conformance of every bundle under ``bundles/``: metadata, logging config, docs and licence files.

All checks are offline: metadata is validated against the schema vendored in ``samv2_components/bundle_schema``.
"""

from __future__ import annotations

import configparser
import copy
import hashlib
import json
import logging
import logging.config
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # the package need not be installed to run the tests from a checkout
    sys.path.insert(0, str(REPO_ROOT))

from samv2_components.bundle_schema import META_SCHEMA_PATH, META_SCHEMA_SHA256, META_SCHEMA_URL  # noqa: E402

jsonschema = pytest.importorskip("jsonschema")

BUNDLES_DIR = REPO_ROOT / "bundles"
BUNDLES = sorted(p for p in BUNDLES_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
    "large_files.yml",
)
#: the bundle whose network the others reuse, so their network_data_format must be identical
NETWORK_BUNDLE = "semantic_sam"


def _ids(paths):
    return [p.name for p in paths]


def _schema() -> dict:
    with open(META_SCHEMA_PATH) as f:
        return json.load(f)


def _metadata(bundle: Path) -> dict:
    with open(bundle / "configs" / "metadata.json") as f:
        return json.load(f)


def _validator():
    schema = _schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a network connection fail loudly."""

    def _refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    import monai.apps.utils as monai_apps_utils

    monkeypatch.setattr(monai_apps_utils, "urlretrieve", _refuse, raising=False)
    monkeypatch.setattr(monai_apps_utils, "urlopen", _refuse, raising=False)


def test_bundles_found():
    assert BUNDLES, f"no bundle directories under {BUNDLES_DIR}"
    assert NETWORK_BUNDLE in {b.name for b in BUNDLES}


def test_vendored_schema():
    path = Path(META_SCHEMA_PATH)
    assert path.is_absolute() and path.is_file()
    assert path.name == META_SCHEMA_URL.rsplit("/", 1)[-1]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == META_SCHEMA_SHA256, "vendored schema was modified"
    schema = _schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert "network_data_format" in schema["required"]


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_required_files_exist(bundle):
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    assert not missing, f"{bundle.name}: missing {missing}"
    assert "Apache License" in (bundle / "LICENSE").read_text()


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_metadata_validates_with_jsonschema(bundle):
    meta = _metadata(bundle)
    errors = sorted(_validator().iter_errors(meta), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    assert meta["schema"] == META_SCHEMA_URL


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_verify_metadata_offline(bundle, no_network):
    from monai.bundle import verify_metadata

    # verify_metadata downloads the schema URL only when `filepath` does not exist; the vendored file exists
    verify_metadata(
        meta_file=str(bundle / "configs" / "metadata.json"),
        filepath=META_SCHEMA_PATH,
        hash_val=META_SCHEMA_SHA256,
        hash_type="sha256",
    )


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_version_in_changelog(bundle):
    meta = _metadata(bundle)
    assert isinstance(meta.get("changelog"), dict) and meta["changelog"], f"{bundle.name}: empty changelog"
    assert meta["version"] in meta["changelog"], f"{bundle.name}: version {meta['version']} not in changelog"


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_network_data_format_consistent(bundle):
    """Every bundle runs the semantic_sam network, so it declares the same network I/O."""
    meta = _metadata(bundle)
    ref = _metadata(BUNDLES_DIR / NETWORK_BUNDLE)
    assert meta["network_data_format"] == ref["network_data_format"]
    out = next(iter(meta["network_data_format"]["outputs"].values()))
    assert out["num_channels"] == 384


@pytest.mark.parametrize("field", _schema()["required"])
@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_missing_required_field_fails(bundle, field):
    meta = copy.deepcopy(_metadata(bundle))
    del meta[field]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(instance=meta, schema=_schema())


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_verify_metadata_rejects_incomplete_copy(bundle, tmp_path, no_network):
    from monai.bundle import verify_metadata

    meta = _metadata(bundle)
    del meta["network_data_format"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        verify_metadata(
            meta_file=str(broken), filepath=META_SCHEMA_PATH, hash_val=META_SCHEMA_SHA256, hash_type="sha256"
        )


@pytest.fixture
def restore_logging():
    """Snapshot the logging configuration and put it back after the test."""
    manager = logging.Logger.manager
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers), root.disabled)
    saved = {
        name: (lg.level, lg.propagate, lg.disabled, list(lg.handlers))
        for name, lg in list(manager.loggerDict.items())
        if isinstance(lg, logging.Logger)
    }
    try:
        yield
    finally:
        for name, lg in list(manager.loggerDict.items()):
            if not isinstance(lg, logging.Logger):
                continue
            level, propagate, disabled, handlers = saved.get(name, (logging.NOTSET, True, False, []))
            for h in list(lg.handlers):
                if h not in handlers:
                    lg.removeHandler(h)
                    h.close()
            lg.setLevel(level)
            lg.propagate, lg.disabled = propagate, disabled
            lg.handlers[:] = handlers
        level, handlers, disabled = saved_root
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
        root.handlers[:] = handlers
        root.disabled = disabled


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_logging_conf(bundle, restore_logging):
    conf = bundle / "configs" / "logging.conf"

    # stdlib classes only (a bundle's logging.conf is loaded before any project module is importable)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(conf)
    for section in parser.sections():
        cls = parser[section].get("class")
        if cls is not None:
            assert "." not in cls or cls.startswith("logging."), f"{conf}: [{section}] class={cls} is not stdlib"

    logging.config.fileConfig(str(conf), disable_existing_loggers=False)

    root = logging.getLogger()
    assert root.level == logging.INFO
    stream_handlers = [h for h in root.handlers if type(h) is logging.StreamHandler]
    assert stream_handlers and stream_handlers[0].stream is sys.stderr  # stdout carries the results only
    assert stream_handlers[0].formatter._fmt == "%(asctime)s - %(name)s - %(levelname)s - %(message)s"

    ignite_logger = logging.getLogger("ignite.engine.engine")
    assert ignite_logger.level == logging.CRITICAL and not ignite_logger.propagate
    assert ignite_logger.handlers, "the ignite logger keeps the console handler for CRITICAL messages"
    # ignite's engines log through children named ignite.engine.engine.<EngineClass>
    engine_logger = logging.getLogger("ignite.engine.engine.SupervisedEvaluator")
    assert not engine_logger.isEnabledFor(logging.ERROR)
    assert engine_logger.isEnabledFor(logging.CRITICAL)
    assert logging.getLogger("samv2_components").isEnabledFor(logging.INFO)


#: the Model Zoo README template's sections, in order
ZOO_README_SECTIONS = ("## Model Overview", "## Data", "## Training", "## Performance", "## MONAI Bundle Commands", "## References", "# License")


@pytest.mark.parametrize("bundle", BUNDLES, ids=_ids(BUNDLES))
def test_readme_follows_the_zoo_template(bundle):
    text = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    positions = []
    for heading in ZOO_README_SECTIONS:
        assert heading in lines, f"{bundle.name}/docs/README.md lacks the section {heading!r}"
        positions.append(lines.index(heading))
    assert positions == sorted(positions), f"{bundle.name}/docs/README.md: sections out of the template's order"
    assert "ckpt_export" in text and "large_files.yml" in text, "export and weights commands missing"
