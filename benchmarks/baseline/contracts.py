"""Performance contracts (``benchmarks/contracts.toml``): load and check them.

Pure logic: ``evaluate`` takes the hardware description and the measured
metrics and returns one verdict per (contract, model):

- ``pass`` / ``FAIL``: the contract applies here and was measured;
- ``not measured here``: the hardware is not what the contract is about;
- ``not measured in this run``: the hardware matches, the contract's model was
  not benchmarked in this run;
- ``inconclusive``: a ratio contract whose ratio misses the bound while the
  paired difference is not significant (Wilcoxon p >= 0.05, or too few pairs
  to test): the run cannot tell a violation from noise;
- a contract that applies but whose metric is missing is a ``FAIL`` naming why.

``FAIL`` makes ``--check`` exit non-zero; with ``--strict`` so does ``inconclusive``.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.baseline.stats import fmt_p

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "contracts.toml"
KINDS = ("ratio", "value")
STATS = ("p50", "p95", "p99", "mean", "max", "min")
APPLIES_KEYS = ("chip", "memory_gb", "backend", "model", "bits")
MEMORY_TOLERANCE = 0.15

PASS, FAIL, INCONCLUSIVE = "pass", "FAIL", "inconclusive"
NOT_HERE, NOT_IN_RUN = "not measured here", "not measured in this run"


class ContractError(ValueError):
    """The contracts file is malformed (names the contract and the field)."""


@dataclass(frozen=True)
class Contract:
    id: str
    description: str
    metric: str
    kind: str
    min: float | None = None
    max: float | None = None
    stat: str = "p50"
    scope: str = "model"
    applies: dict = field(default_factory=dict)

    def bound_text(self) -> str:
        unit = "×" if self.kind == "ratio" else ""
        parts = []
        if self.min is not None:
            parts.append(f"≥ {_num(self.min)}{unit}")
        if self.max is not None:
            parts.append(f"≤ {_num(self.max)}{unit}")
        return " and ".join(parts)


@dataclass
class Verdict:
    contract: Contract
    status: str
    model: str | None
    value: float | None
    detail: str

    def line(self) -> str:
        where = f" [{self.model}]" if self.model else ""
        return f"{self.status}: {self.contract.id}{where}: {self.contract.description} — {self.detail}"


def load(path: Path = DEFAULT_FILE) -> list[Contract]:
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ContractError(f"{path}: not valid TOML: {e}") from e
    return parse(data, str(path))


def parse(data: dict, source: str = "contracts") -> list[Contract]:
    out, seen = [], set()
    for i, raw in enumerate(data.get("contract", [])):
        cid = raw.get("id") or f"#{i + 1}"
        where = f"{source}: contract {cid}"
        unknown = set(raw) - {"id", "description", "metric", "kind", "min", "max", "stat", "scope", "applies"}
        if unknown:
            raise ContractError(f"{where}: unknown field(s) {sorted(unknown)}")
        for key in ("id", "description", "metric", "kind"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ContractError(f"{where}: '{key}' must be a non-empty string")
        if raw["kind"] not in KINDS:
            raise ContractError(f"{where}: kind must be one of {KINDS}, not {raw['kind']!r}")
        if raw.get("min") is None and raw.get("max") is None:
            raise ContractError(f"{where}: needs 'min' or 'max'")
        for key in ("min", "max"):
            if key in raw and not isinstance(raw[key], (int, float)):
                raise ContractError(f"{where}: '{key}' must be a number")
        stat = raw.get("stat", "p50")
        if stat not in STATS:
            raise ContractError(f"{where}: stat must be one of {STATS}, not {stat!r}")
        if raw["kind"] == "ratio" and "stat" in raw:
            raise ContractError(f"{where}: 'stat' applies to kind = \"value\" only (ratios use medians)")
        scope = raw.get("scope", "model")
        if scope not in ("model", "global"):
            raise ContractError(f"{where}: scope must be 'model' or 'global'")
        applies = raw.get("applies", {})
        bad = set(applies) - set(APPLIES_KEYS)
        if bad:
            raise ContractError(f"{where}: unknown 'applies' key(s) {sorted(bad)}; known: {APPLIES_KEYS}")
        if cid in seen:
            raise ContractError(f"{where}: duplicate id")
        seen.add(cid)
        out.append(Contract(id=cid, description=raw["description"], metric=raw["metric"],
                            kind=raw["kind"], min=_opt(raw.get("min")), max=_opt(raw.get("max")),
                            stat=stat, scope=scope, applies=dict(applies)))
    return out


def hardware_mismatch(c: Contract, hw: dict) -> str | None:
    """Why the contract's hardware conditions do not hold here, or None."""
    a = c.applies
    if "chip" in a and not str(hw.get("chip", "")).startswith(a["chip"]):
        return f"needs {a['chip']}; this is {hw.get('chip') or 'unknown chip'}"
    if "memory_gb" in a:
        gb = (hw.get("memory_bytes") or 0) / 2**30
        if abs(gb - a["memory_gb"]) > MEMORY_TOLERANCE * a["memory_gb"]:
            return f"needs {a['memory_gb']} GB RAM; this machine has {gb:.1f} GB"
    if "backend" in a and hw.get("backend") != a["backend"]:
        return f"needs the {a['backend']} backend; this is {hw.get('backend')}"
    return None


def model_matches(c: Contract, model: dict) -> bool:
    a = c.applies
    if "model" in a and (model.get("catalog") or "").lower() != a["model"].lower():
        return False
    if "bits" in a and model.get("bits") != a["bits"]:
        return False
    return True


def evaluate(contracts: list[Contract], hardware: dict, models: list[dict],
             global_metrics: dict) -> list[Verdict]:
    """``models``: [{"label": str, "catalog": str|None, "bits": int|None, "metrics": {...}}]."""
    out: list[Verdict] = []
    for c in contracts:
        why = hardware_mismatch(c, hardware)
        if why:
            out.append(Verdict(c, NOT_HERE, None, None, why))
            continue
        if c.scope == "global":
            out.append(_judge(c, None, global_metrics.get(c.metric)))
            continue
        matching = [m for m in models if model_matches(c, m)]
        if not matching:
            want = " ".join(str(c.applies[k]) for k in ("model", "bits") if k in c.applies)
            out.append(Verdict(c, NOT_IN_RUN, None, None,
                               f"{want or 'model'} not benchmarked in this run"
                               + (f" (try --models {c.applies['model']})" if "model" in c.applies else "")))
            continue
        for m in matching:
            out.append(_judge(c, m["label"], m.get("metrics", {}).get(c.metric)))
    return out


def failures(verdicts: list[Verdict], strict: bool = False) -> list[Verdict]:
    bad = (FAIL, INCONCLUSIVE) if strict else (FAIL,)
    return [v for v in verdicts if v.status in bad]


def _judge(c: Contract, model: str | None, entry: dict | None) -> Verdict:
    if entry and entry.get("skipped"):
        return Verdict(c, NOT_IN_RUN, model, None, entry["skipped"])
    if not entry or entry.get("error"):
        reason = (entry or {}).get("error") or f"metric {c.metric} missing from the results"
        return Verdict(c, FAIL, model, None, f"could not be measured: {reason}")
    if c.kind == "ratio":
        value = entry.get("ratio")
        if value is None or not math.isfinite(value):
            why = entry.get("note") or f"no Squish/mlx_lm ratio for {c.metric}"
            return Verdict(c, FAIL, model, None, f"could not be measured: {why}")
        p = entry.get("p")
        sig = "significant" if entry.get("significant") else "not significant"
        shown = f"Squish/mlx_lm = {value:.3f}× (p={fmt_p(p)}, {sig}, n={entry.get('n_pairs', 0)})"
    else:
        value = (entry.get("squish") or {}).get(c.stat)
        if value is None or not math.isfinite(value):
            why = entry.get("note") or f"no Squish {c.stat} for {c.metric}"
            return Verdict(c, FAIL, model, None, f"could not be measured: {why}")
        shown = f"{c.stat} = {_num(value)}"
    ok = (c.min is None or value >= c.min) and (c.max is None or value <= c.max)
    detail = f"{shown}; contract {c.bound_text()}"
    if ok:
        return Verdict(c, PASS, model, value, detail)
    if c.kind == "ratio" and not entry.get("significant"):
        return Verdict(c, INCONCLUSIVE, model, value,
                       detail + "; missed, but not significantly: rerun with more samples (without --quick)")
    return Verdict(c, FAIL, model, value, detail)


def _opt(x):
    return None if x is None else float(x)


def _num(x: float) -> str:
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4g}"
