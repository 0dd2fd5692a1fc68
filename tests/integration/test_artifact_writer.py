"""The writer: atomic commit, nothing left behind on failure, sharding, models/rm/verify."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.quant.writer import ArtifactWriter  # noqa: E402
from squish.cli.main import main  # noqa: E402
from squish.config import models_dir  # noqa: E402
from squish.errors import InputError  # noqa: E402


def test_exception_leaves_nothing(tmp_path):
    import mlx.core as mx

    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(target) as w:
            w.add("a", mx.zeros((4,)))
            w.close_weights()
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_uncommitted_writer_leaves_nothing(tmp_path):
    import mlx.core as mx

    with ArtifactWriter(tmp_path / "out") as w:
        w.add("a", mx.zeros((4,)))
    assert list(tmp_path.iterdir()) == []


def test_existing_target_refused_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="already exists"):
        ArtifactWriter(tmp_path / "out")


def test_manifest_records_every_file(tmp_path):
    path = make_tiny_artifact(tmp_path / "a")
    manifest = json.loads((path / "squish.json").read_text())
    on_disk = {p.name for p in path.iterdir()} - {"squish.json"}
    assert set(manifest["files"]) == on_disk
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= on_disk
    for name, meta in manifest["files"].items():
        assert (path / name).stat().st_size == meta["size"]
        assert len(meta["sha256"]) == 64


def test_mlx_lm_loads_artifact_unchanged(tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    path = make_tiny_artifact(tmp_path / "a")
    model, tokenizer = load(str(path))
    assert model(mx.array([[1, 2, 3]])).shape[-1] == 384
    assert tokenizer.encode("hello")


def test_models_rm_verify_cycle(capsys):
    make_tiny_artifact(models_dir() / "tiny-4bit")
    make_tiny_artifact(models_dir() / "tiny-3bit", bits=3)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny-4bit" in out and "tiny-3bit" in out and "experimental" in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["bits"] for r in rows} == {"tiny-3bit": 3, "tiny-4bit": 4}
    assert main(["verify", "tiny-4bit"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["rm", "tiny-4bit", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert not (models_dir() / "tiny-4bit").exists()


def test_verify_detects_corruption(capsys):
    path = make_tiny_artifact(models_dir() / "tiny-4bit")
    f = path / "tokenizer.json"
    f.write_text(f.read_text().replace("<|im_end|>", "<|im_xnd|>"))
    assert main(["verify", "tiny-4bit"]) == 1
    assert "tokenizer.json: sha256 does not match" in capsys.readouterr().err
