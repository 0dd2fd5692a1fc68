"""The reference model: what every source (HF folder, hub id, GGUF, catalog name)
is turned into before calibration and quantization.

Contract (all sources):
- ``config`` is a Hugging Face / mlx_lm ``config.json`` dict *without* a
  ``quantization`` block; ``model_type`` names an mlx_lm architecture.
- ``tensors()`` returns a fresh dict of **lazy** ``mx.array`` in mlx_lm naming,
  already sanitized (what the model class's ``sanitize()`` would do is done),
  floating point (GGUF quantized tensors come back dequantized to float32).
  Nothing is evaluated until a consumer evaluates it, so a consumer can stream
  layer by layer and never hold more than a layer or two in float32.
- ``tokenizer_dir`` holds ``tokenizer.json`` + ``tokenizer_config.json`` (with
  ``chat_template``) and any other tokenizer files; they are copied verbatim
  into the artifact.
- ``source`` is recorded in the manifest: ``{"kind": "gguf"|"hf_dir"|"hub"|...,
  "id": ..., "revision"|"sha256": ...}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass
class Reference:
    name: str
    config: dict[str, Any]
    tokenizer_dir: Path
    source: dict[str, Any]
    load_tensors: Callable[[], dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # False for a pretrained (base) model, known by a source with no chat template of its own
    # (a GGUF whose metadata has none): the quality gate checks it on completions, not turns.
    chat: bool = True

    def tensors(self) -> dict[str, Any]:
        return self.load_tensors()
