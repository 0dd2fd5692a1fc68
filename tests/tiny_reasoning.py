"""A tiny reasoning model whose greedy output is known: for routing tests of thinking sections.

A Qwen3-shaped model (random shapes, hand-set weights) that is a bigram machine:
attention and MLP outputs are zero, so the last position's logits depend on its own
token only, and the untied output head maps each token of ``SCRIPT`` to the next.
Greedy decoding after the generation prompt ``<|im_start|>assistant\\n`` therefore
writes::

    <think>Let me think.</think>\\n\\nThe answer is 42!<|im_end|>

and after a prompt that closed the section (``enable_thinking=False`` writes
``<think>\\n\\n</think>\\n\\n``) it writes the answer alone. The tokenizer is byte-level
BPE with the script's words as whole tokens, ``<think>``, ``</think>``, ``<tool_call>``,
``</tool_call>`` as added (non-special) tokens, as in Qwen3, and the chat template is a
Qwen3-style one written for this test (``enable_thinking`` switch, tools rendered
natively with ``<tools>`` / ``<tool_call>``, earlier reasoning dropped from history).
An output constraint (tool calls, JSON) shapes the answer after the section; the
script only decides the free parts. Float32, not quantized: structure tests only.
"""

from __future__ import annotations

import json
from pathlib import Path

ANSWER = "The answer is 42!"
THOUGHT = "Let me think."
# The greedy chain after "\n" (the last token of the generation prompt).
SCRIPT = ["\n", "<think>", "Let", " me", " think", ".", "</think>", "\n\n", "The", " answer", " is", " 42", "!",
          "<|im_end|>"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>"]

TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
You may call functions. Their signatures are inside <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Call one by replying <tool_call>{"name": <name>, "arguments": <object>}</tool_call>.<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'user' %}<|im_start|>user
{{ m.content }}<|im_end|>
{% elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.content %}{{ m.content }}{% endif %}
{%- for c in m.tool_calls or [] %}
<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""


def _write_tokenizer(path: Path) -> dict[str, int]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ["Let", " me", " think", "The", " answer", " is", " 42", " weather", " unit", "name", "arguments"]
    corpus = [THOUGHT + "\n\n" + ANSWER, "user\nassistant\nsystem\n", "\n\n".join(words)] * 50
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": TEMPLATE,
        "model_max_length": 4096,
    }))
    ids = []
    for piece in SCRIPT:
        enc = tok.encode(piece, add_special_tokens=False).ids
        assert len(enc) == 1, f"script piece {piece!r} is not one token: {enc}"
        ids.append(enc[0])
    assert len(set(ids)) == len(ids), "the script must not repeat a token (a bigram chain)"
    return {"vocab": tok.get_vocab_size(), "eos": ids[-1], "chain": ids}


def make_reasoning_model(path: Path, *, hidden: int = 128, seed: int = 0) -> Path:
    """Write the model folder (config.json, model.safetensors, tokenizer) at ``path``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    path.mkdir(parents=True, exist_ok=True)
    info = _write_tokenizer(path)
    vocab = info["vocab"]
    config = {
        "model_type": "qwen3", "hidden_size": hidden, "num_hidden_layers": 2, "intermediate_size": 256,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden // 4, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "vocab_size": vocab,
        "tie_word_embeddings": False, "eos_token_id": info["eos"],
    }
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    embed = mx.random.normal((vocab, hidden))
    embed = embed / mx.linalg.norm(embed, axis=-1, keepdims=True) * (hidden ** 0.5)  # unit RMS rows
    head = mx.zeros((vocab, hidden))
    chain = info["chain"]
    rows = mx.array(chain[1:])
    head[rows] = embed[mx.array(chain[:-1])] * (50.0 / hidden)  # logit ~50 for the next script token
    for k in list(weights):
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            weights[k] = mx.zeros_like(weights[k])  # the residual stream is the token's embedding
        elif k.endswith("norm.weight"):
            weights[k] = mx.ones_like(weights[k])
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config))
    return path
