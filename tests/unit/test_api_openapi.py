"""The served OpenAPI document says what the server answers (squish/api/openapi.py), and
the request schema's documented bounds are the validators' (squish/api/openai_schemas.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from squish.api.app import create_app
from squish.api.settings import ServeSettings
from squish.runtime.engine import Engine


@pytest.mark.parametrize("key", ["--5", "²", "٣", "1_0", " 7"])
def test_logit_bias_keys_that_are_not_ascii_token_ids_are_422_not_500(key):
    """Keys passed ``str.isdigit`` (Unicode digits, "--5") and then crashed ``int()``: a 500."""
    app = create_app(ServeSettings(), Engine(lambda: None))
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                  "logit_bias": {key: 1}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "logit_bias"
