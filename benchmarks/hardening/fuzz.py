"""Fuzz: schemathesis over the served ``/openapi.json``, every route it lists.

The routes come from the document the server serves (fetched with the API key), never
from a list here, so a new protocol adapter is fuzzed as soon as it is mounted.
schemathesis's engine runs its phases: ``examples`` (any the document gives), ``coverage``
(boundary values, missing and wrong-typed fields, undeclared methods; deterministic) and
``fuzzing`` (hypothesis, positive and negative data), with a fixed seed and deterministic
generation. Rounds of ``fuzzing`` with the next seeds follow until ``cases`` requests were
sent. Generation is kept cheap by two schema-level hooks: any integer field that is a token
budget (``TOKEN_KEYS``, at any depth: Ollama's ``options.num_predict`` too) above ``cap``
becomes ``v % cap + 1``, and a body's ``model`` (or a path parameter naming a model) of a
valid length becomes the served model's name, so that fuzzed requests reach the engine
rather than stopping at "model not found". The server should run with ``--max-tokens``
near ``cap`` (a request without a budget then stops there too).

What counts as a failure (``failures``), per request:
- no response at all (a dropped connection, a timeout);
- a 5xx other than the two a healthy server may give: 503 with ``Retry-After`` (busy,
  loading) and 504 (the request's own timeout);
- a reply that breaks the documented schema: schemathesis's ``status_code_conformance``,
  ``content_type_conformance``, ``response_headers_conformance``,
  ``response_schema_conformance``, and the checks that the server refuses what the
  document forbids (``negative_data_rejection``), undeclared methods (``unsupported_method``)
  and requests without the key (``ignored_auth``, ``missing_required_header``);
- a 422 ("wrong type or range") for data the document says is valid: the document and the
  validator disagree about a type or range.
Reported, not failures: a 400 for data the document allows (a rule JSON Schema cannot
express, such as "a tool message needs tool_call_id", or a value of a known field that the
server does not implement); schemathesis's own ``positive_data_acceptance`` is off for that
reason.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

TOKEN_KEYS = frozenset({"max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict",
                        "max_new_tokens", "num_ctx"})
SCHEMA_CHECKS = ("status_code_conformance", "content_type_conformance", "response_headers_conformance",
                 "response_schema_conformance", "negative_data_rejection", "unsupported_method",
                 "missing_required_header", "ignored_auth", "allow_header_conformance")
OFF_CHECKS = ("not_a_server_error", "positive_data_acceptance", "use_after_free",
              "ensure_resource_availability", "object_level_authorization")
EXAMPLES_PER_KIND = 3


def allowed_5xx(status: int, headers: dict, documented: frozenset = frozenset()) -> bool:
    """503 with Retry-After (busy / loading), 504 (the request's timeout) and a 501 the
    operation documents (an Ollama route this server refuses on purpose) are a healthy
    server's answers; every other 5xx is a failure."""
    if status == 503:
        return bool(headers.get("retry-after"))
    return status == 504 or (status == 501 and "501" in documented)


def _documented(case) -> frozenset:
    """The statuses the case's operation documents (empty when schemathesis hides them)."""
    try:
        return frozenset(case.operation.definition.raw.get("responses", {}))
    except Exception:  # noqa: BLE001 - unknown: nothing documented
        return frozenset()


def _clamp(value: Any, cap: int) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():
            if k in TOKEN_KEYS and isinstance(v, int) and not isinstance(v, bool) and v > cap:
                value[k] = v % cap + 1
            else:
                _clamp(v, cap)
    elif isinstance(value, list):
        for v in value:
            _clamp(v, cap)
    return value


def _config(url: str, headers: dict, seed: int, max_examples: int, phases: dict) -> Any:
    import schemathesis

    return schemathesis.Config.from_dict({
        "seed": seed, "continue-on-failure": True, "request-timeout": 120, "workers": 1,
        "headers": headers, "base-url": url,
        "suppress-health-check": ["all"],
        "output": {"sanitization": {"enabled": False}},  # failure examples give runnable curl commands
        "generation": {"max-examples": max_examples, "deterministic": True, "mode": "all"},
        "checks": {name: {"enabled": False} for name in OFF_CHECKS},
        "phases": phases,
    })


def _schema(url: str, headers: dict, model: str, cap: int, seed: int, max_examples: int, phases: dict):
    import schemathesis

    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers, timeout=30,
                                           config=_config(url, headers, seed, max_examples, phases))

    @schema.hook
    def map_body(ctx, body):  # noqa: ARG001 - schemathesis hook signature
        if isinstance(body, dict):
            name = body.get("model")
            if isinstance(name, str) and 1 <= len(name) <= 256:
                body["model"] = model
        return _clamp(body, cap)

    @schema.hook
    def map_path_parameters(ctx, params):  # noqa: ARG001
        for k, v in list((params or {}).items()):
            if "model" in k.lower() and isinstance(v, str) and v:
                params[k] = model
        return params

    return schema


def _error_message(content: bytes) -> str:
    """The error message of a reply in any protocol's shape, digits and quoted text elided."""
    import json
    import re

    try:
        body = json.loads(content)
    except ValueError:
        return "(not JSON)"
    err = body.get("error") if isinstance(body, dict) else None
    msg = err.get("message") if isinstance(err, dict) else err
    msg = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", str(msg))
    return re.sub(r"\d+", "N", msg)[:120]


def _mode(meta) -> str:
    """"positive" only when every part of the request (body, path, query, headers) is."""
    if meta is None:
        return "?"
    if meta.generation.mode.value == "negative" or any(c.mode.is_negative for c in meta.components.values()):
        return "negative"
    return "positive"


def _header_map(headers) -> dict[str, str]:
    out = {}
    for k, v in (headers or {}).items():
        out[k.lower()] = ", ".join(v) if isinstance(v, list) else str(v)
    return out


class Tally:
    """Counts and failure examples over every request the fuzzer sent."""

    def __init__(self) -> None:
        self.cases = 0
        self.by_operation: collections.Counter = collections.Counter()
        self.by_status: collections.Counter = collections.Counter()
        self.by_op_status: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.by_phase: collections.Counter = collections.Counter()
        self.reached_engine = 0  # 2xx replies to generation routes
        self.allowed_5xx: collections.Counter = collections.Counter()
        self.positive_400: collections.Counter = collections.Counter()
        self.positive_400_why: collections.Counter = collections.Counter()
        self.failures: collections.Counter = collections.Counter()
        self.examples: dict[str, list[dict]] = collections.defaultdict(list)
        self.errors: list[str] = []

    def _fail(self, kind: str, label: str, case, response, detail: str) -> None:
        key = f"{kind} @ {label}"
        self.failures[key] += 1
        if len(self.examples[key]) < EXAMPLES_PER_KIND:
            curl = ""
            if case is not None:
                try:
                    curl = case.as_curl_command()
                except Exception:  # noqa: BLE001 - an example is best effort
                    pass
            body = response.content[:400].decode("utf-8", "replace") if response is not None else ""
            self.examples[key].append({"detail": detail[:600], "curl": curl[:1500], "response": body})

    def scenario(self, recorder) -> None:
        label = recorder.label
        failed_checks: dict[str, list] = collections.defaultdict(list)
        for cid, checks in recorder.checks.items():
            for c in checks:
                if c.status.value == "failure" and c.name in SCHEMA_CHECKS:
                    failed_checks[cid].append(c)
        for cid, inter in recorder.interactions.items():
            node = recorder.cases.get(cid)
            case = node.value if node is not None else None
            meta = getattr(case, "meta", None)
            phase = meta.phase.name.value if meta is not None else "?"
            mode = _mode(meta)
            self.cases += 1
            self.by_operation[label] += 1
            self.by_phase[phase] += 1
            resp = inter.response
            if resp is None:
                self.by_status["none"] += 1
                self._fail("no response", label, case, None, "the request got no response")
                continue
            status = resp.status_code
            hdrs = _header_map(resp.headers)
            self.by_status[str(status)] += 1
            self.by_op_status[label][str(status)] += 1
            if 200 <= status < 300 and label.startswith("POST"):
                self.reached_engine += 1
            if status >= 500:
                if allowed_5xx(status, hdrs, _documented(case)):
                    self.allowed_5xx[str(status)] += 1
                else:
                    self._fail(f"server error {status}", label, case, resp, "a 5xx a healthy server does not give")
            if mode == "positive" and status == 422:
                self._fail("422 for schema-valid data", label, case, resp,
                           "the document allows this request; the server calls a type or range wrong")
            elif mode == "positive" and status == 400:
                self.positive_400[label] += 1
                self.positive_400_why[_error_message(resp.content)] += 1
            for c in failed_checks.get(cid, ()):
                info = c.failure_info
                detail = str(info.failure) if info is not None else c.name
                self._fail(c.name, label, case, resp, detail)
        # checks that failed on cases without a recorded interaction of their own
        for cid, checks in failed_checks.items():
            if cid not in recorder.interactions:
                for c in checks:
                    info = c.failure_info
                    self._fail(c.name, label, None, None,
                               str(info.failure) if info is not None else c.name)

    def summary(self) -> dict:
        return {
            "cases": self.cases,
            "operations": dict(sorted(self.by_operation.items())),
            "statuses": dict(sorted(self.by_status.items())),
            "statuses_by_operation": {k: dict(sorted(v.items())) for k, v in sorted(self.by_op_status.items())},
            "phases": dict(self.by_phase),
            "generation_replies_2xx": self.reached_engine,
            "responses_5xx_failures": sum(n for k, n in self.failures.items() if k.startswith("server error")),
            "responses_5xx_allowed": dict(self.allowed_5xx),
            "schema_failures": sum(n for k, n in self.failures.items() if k.split(" @ ")[0] in SCHEMA_CHECKS
                                   or k.startswith("422 for")),
            "positive_rejected_400": dict(self.positive_400),
            "positive_rejected_400_why": dict(self.positive_400_why.most_common(12)),
            "failure_counts": dict(self.failures),
            "failure_examples": dict(self.examples),
            "engine_errors": self.errors[:20],
        }


def run(server, *, cases: int = 1000, cap: int = 8, seed: int = 0, log=print) -> dict:
    """Fuzz ``server`` (a ``server.Server``) until ``cases`` requests were sent."""
    import schemathesis  # noqa: F401 - fail early and clearly if it is missing
    from schemathesis.engine import events as ev
    from schemathesis.engine import from_schema

    t0 = time.monotonic()
    tally = Tally()
    rounds = []
    first_phases = {"examples": {"enabled": True}, "coverage": {"enabled": True},
                    "fuzzing": {"enabled": True}, "stateful": {"enabled": False}}
    later_phases = {"examples": {"enabled": False}, "coverage": {"enabled": False},
                    "fuzzing": {"enabled": True}, "stateful": {"enabled": False}}
    operations = None
    rnd = 0
    while tally.cases < cases and rnd < 50:
        if operations is None:
            max_examples = 50
        else:
            max_examples = max(10, math.ceil((cases - tally.cases) / max(1, operations)))
        schema = _schema(server.url, server.headers, server.model, cap, seed + rnd, max_examples,
                         first_phases if rnd == 0 else later_phases)
        if operations is None:
            operations = sum(1 for r in schema.get_all_operations() if r.ok() is not None)
        before = tally.cases
        for event in from_schema(schema).execute():
            if isinstance(event, ev.ScenarioFinished):
                tally.scenario(event.recorder)
            elif isinstance(event, (ev.NonFatalError, ev.FatalError)):
                tally.errors.append(f"{type(event).__name__}: {getattr(event, 'label', '')}: "
                                    f"{getattr(event, 'value', getattr(event, 'exception', ''))!s}"[:500])
        rounds.append({"seed": seed + rnd, "max_examples": max_examples, "cases": tally.cases - before})
        log(f"fuzz round {rnd}: seed {seed + rnd}, {tally.cases - before} cases ({tally.cases} in all)")
        if tally.cases == before:
            break  # nothing new can be generated
        rnd += 1
    out = tally.summary()
    out.update({
        "seed": seed, "token_cap": cap, "rounds": rounds, "elapsed_s": time.monotonic() - t0,
        "operations_in_schema": operations, "server_alive": server.alive(),
        "health_after": server.health().json() if server.alive() else None,
    })
    failures = [f"{n} x {k}" for k, n in sorted(out["failure_counts"].items())]
    failures += [f"engine error: {e}" for e in tally.errors]
    if not server.alive():
        failures.append("the server exited during the fuzz")
    if out["cases"] < cases:
        failures.append(f"only {out['cases']} cases were generated (target {cases})")
    out["failures"] = failures
    return out
