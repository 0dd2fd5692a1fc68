"""The artifact loader: loads exactly what is stored, refuses every kind of bad artifact."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.errors import InputError  # noqa: E402
from squish.runtime.loader import load_artifact  # noqa: E402


@pytest.fixture
def artifact(tmp_path):
    return make_tiny_artifact(tmp_path / "tiny-4bit")


def test_loads_and_generates_finite_logits(artifact):
    import mlx.core as mx

    loaded = load_artifact(artifact)
    assert loaded.manifest["format_version"] == 1
    assert loaded.load_seconds > 0
    logits = loaded.model(mx.array([[1, 5, 7]]))
    assert logits.shape == (1, 3, loaded.config["vocab_size"])
    assert bool(mx.all(mx.isfinite(logits)))


def test_no_transform_at_load(artifact):
    """Every parameter the model holds is bit-identical, same dtype and shape, to the file."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    stored = mx.load(str(artifact / "model.safetensors"))
    params = dict(tree_flatten(load_artifact(artifact).model.parameters()))
    assert set(params) == set(stored)
    for k, v in params.items():
        assert v.dtype == stored[k].dtype and v.shape == stored[k].shape, k
        assert mx.array_equal(v, stored[k]).item(), k
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32


def test_sharded_artifact_loads(tmp_path):
    path = make_tiny_artifact(tmp_path / "sharded", shard_bytes=64 << 10)
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    assert not (path / "model.safetensors").exists()
    load_artifact(path)


def test_missing_shard_refused(tmp_path):
    path = make_tiny_artifact(tmp_path / "sharded", shard_bytes=64 << 10)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InputError, match=f"{victim.name}.*missing"):
        load_artifact(path)


def test_truncated_weights_refused(artifact):
    f = artifact / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="model.safetensors.*(truncated|size)"):
        load_artifact(artifact)


def test_truncated_weights_without_manifest_refused(artifact):
    (artifact / "squish.json").unlink()
    f = artifact / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(InputError, match="model.safetensors: truncated"):
        load_artifact(artifact)


def test_unknown_format_version_refused(artifact):
    mf = artifact / "squish.json"
    manifest = json.loads(mf.read_text())
    manifest["format_version"] = 99
    mf.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format_version 99 is not supported"):
        load_artifact(artifact)


def _rewrite_tensor(artifact: Path, name: str, fn) -> None:
    """Change one tensor and re-record the file in the manifest, as a buggy build would:
    only the content checks can catch it."""
    import mlx.core as mx

    from squish.artifact import sha256_file

    f = artifact / "model.safetensors"
    weights = mx.load(str(f))
    weights[name] = fn(weights[name])
    mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    mf = artifact / "squish.json"
    manifest = json.loads(mf.read_text())
    manifest["files"]["model.safetensors"] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    mf.write_text(json.dumps(manifest))


def test_nan_scales_refused(artifact):
    import mlx.core as mx

    name = "model.layers.1.mlp.down_proj.scales"
    _rewrite_tensor(artifact, name, lambda a: mx.where(mx.arange(a.size).reshape(a.shape) == 3, mx.nan, a))
    with pytest.raises(InputError, match=f"NaN/Inf .*{name}"):
        load_artifact(artifact)


def test_inf_norm_refused(artifact):
    import mlx.core as mx

    name = "model.norm.weight"
    _rewrite_tensor(artifact, name, lambda a: a + mx.inf)
    with pytest.raises(InputError, match="NaN/Inf"):
        load_artifact(artifact)


def test_hash_mismatch_refused_by_verify(artifact):
    f = artifact / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + 10] ^= 0xFF  # flip bits inside the tensor data: same size, valid header
    f.write_bytes(bytes(data))
    load_artifact(artifact)  # the fast path checks sizes and headers only
    with pytest.raises(InputError, match="sha256 does not match"):
        load_artifact(artifact, verify_hashes=True)


def test_missing_config_refused(artifact):
    (artifact / "config.json").unlink()
    with pytest.raises(InputError, match="config.json"):
        load_artifact(artifact)


def test_plain_mlx_lm_folder_loads_with_warning(artifact):
    (artifact / "squish.json").unlink()
    loaded = load_artifact(artifact)
    assert loaded.manifest is None
    assert any("no quality report" in w for w in loaded.warnings)


def test_experimental_flag(tmp_path):
    loaded = load_artifact(make_tiny_artifact(tmp_path / "tiny-3bit", bits=3))
    assert loaded.experimental
    assert any("experimental" in w for w in loaded.warnings)


def test_not_a_folder(tmp_path):
    with pytest.raises(InputError, match="no such model folder"):
        load_artifact(tmp_path / "nope")
