"""How one model is split over several ranks, with mlx_lm's own sharding.

mlx_lm gives an architecture up to two ways to be split (``mlx_lm.utils.sharded_load``
reads the same two): tensor parallelism (the model class defines ``shard(group)``:
every attention and MLP projection is cut across the ranks, with an ``all_sum`` after
the output projections) and pipeline parallelism (the inner model defines
``pipeline(group)``: each rank runs a contiguous slice of the layers and passes the
hidden state on). Squish picks tensor parallelism when the shapes allow it (every
rank does the same share of every step), else the pipeline, else refuses.

``plan`` decides from ``config.json`` alone, before any weight is read, and a refusal
names the reason and the rank counts that would work. ``shard_model`` applies the
plan to a lazily built model inside the loader (``load_artifact(shard=...)``): the
model is cut before any weight is read, then evaluated one layer at a time, so a
rank keeps only its own share of each tensor (a whole tensor is in memory only
while it is being cut) and never holds another rank's layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from squish.errors import InputError

TENSOR, PIPELINE = "tensor", "pipeline"
MAX_RANKS_LISTED = 16  # rank counts searched when a refusal lists the ones that work
_WIDTHS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")


@dataclass(frozen=True)
class Capabilities:
    """What mlx_lm's implementation of an architecture can do."""

    model_type: str
    tensor: bool  # the model class defines ``shard``
    pipeline: bool  # its inner model defines ``pipeline``
    layers: int


def _text_config(config: dict) -> dict:
    """The language model's own settings (vision-language configs nest them)."""
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def capabilities(config: dict) -> Capabilities:
    """Build the model lazily (no weights are read or allocated) and look at what it defines."""
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config=config)
    model = model_cls(args_cls.from_dict(config))
    inner = getattr(model, "model", None)
    layers = len(getattr(model, "layers", None) or getattr(inner, "layers", None) or [])
    return Capabilities(str(config.get("model_type")), hasattr(model, "shard"),
                        inner is not None and hasattr(inner, "pipeline"), layers)


def tensor_problems(config: dict, ranks: int) -> list[str]:
    """Why tensor parallelism cannot split this model over ``ranks`` (empty: it can).

    Every rank gets ``heads / ranks`` attention heads and ``kv_heads / ranks`` KV heads
    (mlx_lm divides the counts without checking), and a slice of every MLP width. In a
    quantized model the slices of the inputs of the output projections must also be whole
    quantization groups."""
    c = _text_config(config)
    out = []
    heads = c.get("num_attention_heads")
    kv = c.get("num_key_value_heads") or heads
    if heads and heads % ranks:
        out.append(f"its {heads} attention heads do not divide by {ranks}")
    if kv and kv % ranks and kv != heads:
        out.append(f"its {kv} KV heads do not divide by {ranks}")
    group = (config.get("quantization") or {}).get("group_size")
    head_dim = c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None)
    widths = [(k, c[k]) for k in _WIDTHS if isinstance(c.get(k), int)]
    for key, width in widths:
        if width % ranks:
            out.append(f"its {key} {width} does not divide by {ranks}")
    if group and not out:
        if heads and head_dim and (heads * head_dim // ranks) % group:
            out.append(f"a 1/{ranks} slice of the attention output ({heads * head_dim // ranks} "
                       f"columns) is not a whole number of {group}-wide quantization groups")
        for key, width in widths:
            if (width // ranks) % group:
                out.append(f"a 1/{ranks} slice of {key} ({width // ranks}) is not a whole number of "
                           f"{group}-wide quantization groups")
    return out


def _mode(config: dict, caps: Capabilities, ranks: int) -> str | None:
    if caps.tensor and not tensor_problems(config, ranks):
        return TENSOR
    if caps.pipeline and ranks <= caps.layers:
        return PIPELINE
    return None


def plan(config: dict, ranks: int, caps: Capabilities | None = None) -> str:
    """``"tensor"`` or ``"pipeline"`` for ``ranks`` ranks, or an InputError naming why not
    and which rank counts would work."""
    caps = caps or capabilities(config)
    mode = _mode(config, caps, ranks)
    if mode is not None:
        return mode
    what = f"this {caps.model_type} model"
    if not caps.tensor and not caps.pipeline:
        raise InputError(f"{what} cannot be split over several machines: mlx_lm's {caps.model_type} "
                         "defines neither tensor-parallel `shard` nor pipeline `pipeline`; serve it "
                         "on one machine (drop --hosts / --hostfile)")
    reasons = []
    if caps.tensor:
        reasons.append("tensor parallelism: " + "; ".join(tensor_problems(config, ranks)))
    else:
        reasons.append(f"mlx_lm's {caps.model_type} has no tensor-parallel `shard`")
    if caps.pipeline:
        reasons.append(f"pipeline: {ranks} ranks for {caps.layers} layers")
    else:
        reasons.append(f"mlx_lm's {caps.model_type} has no pipeline split")
    works = [n for n in range(2, MAX_RANKS_LISTED + 1) if _mode(config, caps, n)]
    hint = (f"rank counts that work: {', '.join(map(str, works))}" if works
            else f"no rank count up to {MAX_RANKS_LISTED} works")
    raise InputError(f"{what} cannot be split over {ranks} ranks ({'; '.join(reasons)}); {hint} "
                     "(or 1: serve it on one machine without --hosts)")


def shard_model(model, group, mode: str) -> None:
    """Cut a lazily loaded model with mlx_lm's own methods, then read this rank's share
    of the weights one layer at a time (peak: the share plus one layer's tensors)."""
    import mlx.core as mx

    if mode == TENSOR:
        model.shard(group)
        layers = getattr(model, "layers", None) or model.model.layers
    else:
        model.model.pipeline(group)
        layers = model.model.pipeline_layers
    for layer in layers:
        mx.eval(layer.parameters())
        mx.clear_cache()
    mx.eval(model.parameters())  # embeddings, final norm and head (every rank keeps them)
    mx.clear_cache()
