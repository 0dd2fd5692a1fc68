"""Random-weight Squish artifacts with the exact shapes of real models, built in seconds.

Memory and speed depend on shapes, dtypes and bit widths, not on the values of the
weights, so a memory benchmark needs no calibration and no download. This module
writes an artifact that ``squish serve`` and ``mlx_lm.server`` load like any other:

- the tensor names and shapes mlx_lm's own model class has for the config (the
  class is instantiated lazily only to read them: no float weights are made);
- the recipe a Squish build uses: every linear at ``bits`` (group 64), the token
  embedding and an untied ``lm_head`` at 8 bits (``squish.quant.quantize``'s
  ``MixedPolicy``), scales, biases and norms in ``dtype`` (float32 on MLX's CPU
  backend, half precision on Metal / CUDA, as ``squish quantize`` chooses);
- packed weights drawn uniformly, scales and biases centred so every dequantized
  weight lies in about [-0.02, 0.02]: finite activations through every layer;
- a byte-level BPE tokenizer with the real vocabulary size (151,643 tokens for the
  Qwen shapes; its merges are learnt from English prose, then padded with synthetic
  merges), so the tokenizer's share of a server's memory is realistic, and a
  ChatML chat template that renders tools natively (``<tool_call>`` JSON, as
  mlx_lm's ``json_tools`` parser reads them);
- ``squish.json`` says ``source.kind = "random"`` and ``source.shape`` names the
  model whose shape it has; the quality report says it was not measured.

    .venv/bin/python -m benchmarks.random_artifact qwen2.5:1.5b --bits 4 [--dtype float32] [--out DIR]

Artifacts are cached under ``~/.cache/squish-bench/artifacts`` (or ``--out``): a
second call with the same arguments returns the existing folder.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DIR = Path.home() / ".cache" / "squish-bench" / "artifacts"
GROUP_SIZE = 64
EMBED_BITS = 8
TOKENIZER_VERSION = 1  # bump when the tokenizer below changes (cached artifacts are rebuilt)

SHAPES: dict[str, dict] = {
    "qwen2.5:1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    },
    "qwen3:8b": {
        "model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
    },
}
TOKENIZER_VOCAB = 151643  # regular tokens; the three special tokens follow them
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>"]

# ChatML with natively rendered tools, written for these benchmarks.
TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
You may call one or more functions. Their signatures are inside <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
For each call, reply <tool_call>{"name": <name>, "arguments": <object>}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.content %}{{ m.content }}{% endif %}
{%- for tool_call in m.tool_calls or [] %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {% if tool_call.function.arguments is string %}\
{{ tool_call.function.arguments }}{% else %}{{ tool_call.function.arguments | tojson }}{% endif %}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def _corpus() -> list[str]:
    from benchmarks.baseline import prompts

    words = " ".join(prompts._SUBJECTS + prompts._VERBS + prompts._OBJECTS + prompts._TAILS)
    extra = ("Write a long story about a lighthouse keeper who finds a message in a bottle. "
             "Read this text and then summarise it in detail. Which places does the text mention? "
             "The weather in Paris is sunny and warm today, with a light wind from the west. "
             "system user assistant tool function name arguments city unit celsius fahrenheit "
             "search query results file path read write list directory")
    return [words, extra, TEMPLATE] * 20


def write_tokenizer(path: Path, vocab_size: int = TOKENIZER_VOCAB, seed: int = 0) -> None:
    """A byte-level BPE with ``vocab_size`` regular tokens: merges learnt from English
    prose first (so prose tokenizes as with a real BPE, ~1.3 tokens per word), then
    synthetic merges of random token pairs until the vocabulary is full."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    rng = random.Random(seed)
    pieces = list(vocab)
    while len(vocab) < vocab_size:
        a, b = rng.choice(pieces), rng.choice(pieces)
        s = a + b
        if len(s) > 12 or s in vocab:
            continue
        vocab[s] = len(vocab)
        merges.append([a, b])
        pieces.append(s)
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": TEMPLATE,
        "model_max_length": 32768,
    }, indent=1))


def _quant_params(cfg: dict, bits: int) -> list[tuple[str, tuple[int, ...], str, int | None]]:
    """(name, shape, kind, bits) of every stored tensor, from mlx_lm's model class."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))  # lazy: nothing below evaluates a weight

    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if path in ("model.embed_tokens", "lm_head"):
            return {"group_size": GROUP_SIZE, "bits": EMBED_BITS}
        return True

    nn.quantize(model, group_size=GROUP_SIZE, bits=bits, class_predicate=predicate)
    out = []
    for name, v in tree_flatten(model.parameters()):
        module = name.rsplit(".", 1)[0]
        b = EMBED_BITS if module in ("model.embed_tokens", "lm_head") else bits
        kind = name.rsplit(".", 1)[1]
        if kind == "weight" and v.dtype.size == 4 and "uint" in str(v.dtype):
            kind = "packed"
        out.append((name, tuple(v.shape), kind, b))
    return out


def _tensor(name: str, shape: tuple[int, ...], kind: str, bits: int, dtype, key, seed: int):
    import mlx.core as mx

    if kind == "packed":  # uint32 words of uniformly random codes
        import numpy as np

        return mx.array(np.random.default_rng(seed).integers(0, 2**32, shape, dtype=np.uint32))
    if kind in ("scales", "biases"):
        # A dequantized weight is scale * code + bias, code in [0, 2^bits - 1]: span ~0.04, centred.
        step = 0.04 / (2**bits - 1)
        scales = step * mx.random.uniform(0.5, 1.5, shape, key=key)
        return (scales if kind == "scales" else -scales * (2**bits - 1) / 2).astype(dtype)
    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=dtype)
    return mx.zeros(shape, dtype=dtype)  # linear biases (qwen2 q/k/v)


def build(shape: str, bits: int, dtype: str = "float32", out_dir: Path = DEFAULT_DIR, seed: int = 0,
          quiet: bool = False) -> Path:
    """The artifact folder (built now unless an identical one is cached)."""
    import mlx.core as mx

    from squish.artifact import read_manifest
    from squish.quant.writer import ArtifactWriter

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    name = f"random-{shape.replace(':', '-')}-int{bits}-{dtype}"
    target = Path(out_dir) / name
    recipe = {"bits": bits, "group_size": GROUP_SIZE, "embed_bits": EMBED_BITS, "dtype": dtype,
              "seed": seed, "tokenizer_version": TOKENIZER_VERSION}
    if target.exists():
        manifest = read_manifest(target) or {}
        if manifest.get("source", {}).get("recipe") == recipe:
            return target
        raise SystemExit(f"{target} exists but was built differently; remove it first")
    cfg = dict(SHAPES[shape])
    quant = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for module in ("model.embed_tokens", "lm_head"):
        if module == "model.embed_tokens" or not cfg["tie_word_embeddings"]:
            quant[module] = {"group_size": GROUP_SIZE, "bits": EMBED_BITS, "mode": "affine"}
    params = _quant_params(cfg, bits)
    target.parent.mkdir(parents=True, exist_ok=True)
    mx_dtype = getattr(mx, dtype)
    with ArtifactWriter(target) as w:
        for i, (pname, shp, kind, b) in enumerate(params):
            t = _tensor(pname, shp, kind, b, mx_dtype, mx.random.key(seed * 1_000_003 + i), seed * 1_000_003 + i)
            mx.eval(t)
            w.add(pname, t)
            if not quiet and i % 50 == 0:
                print(f"  {name}: {i}/{len(params)} tensors", file=sys.stderr, flush=True)
        write_tokenizer(w.staging_dir)
        w.write_config({**cfg, "eos_token_id": TOKENIZER_VOCAB + 2, "quantization": quant,
                        "quantization_config": quant})
        w.close_weights()
        target = w.commit({
            "name": name,
            "quantization": {"bits": bits, "group_size": GROUP_SIZE, "dtype": dtype,
                             "experimental": bits == 3, "recipe": {"embed_bits": EMBED_BITS}},
            "source": {"kind": "random", "shape": shape, "recipe": recipe},
            "quality": {"passed": None, "note": "random weights: quality not measured (memory/speed only)"},
        })
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--bits", type=int, default=4, choices=(3, 4, 8))
    ap.add_argument("--dtype", default=None, help="scales/norms dtype (default: what `squish quantize` picks here)")
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    a = ap.parse_args(argv)
    from squish.hardware import default_build_dtype

    print(build(a.shape, a.bits, a.dtype or default_build_dtype(), a.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
