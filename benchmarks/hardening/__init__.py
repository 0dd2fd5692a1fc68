"""The parts of ``benchmarks/reliability.py`` (issue 15's standing reliability figures).

Each part drives a real ``squish serve`` subprocess (``server.Server``) and returns a
JSON-able dict with its figures and a ``failures`` list (empty: the part passed):

- ``fuzz``: schemathesis over the served ``/openapi.json``, every route it lists;
- ``flood``: one client over its rate limit while a second one is still served;
- ``soak``: mixed requests at a fixed concurrency, RSS at idle checkpoints;
- ``storm``: many clients disconnecting at once, time until nothing is in flight;
- ``faults``: builds killed or out of disk, a shard changed under a running server.

``tests/e2e/test_reliability.py`` runs short versions of fuzz, flood and storm in CI.
"""
