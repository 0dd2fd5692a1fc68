"""The in-memory store of OpenAI Responses (``store: true``), bounded in count and bytes.

A stored response keeps three things: the response object as returned (for
``GET /v1/responses/{id}``), the request's own input items with their ids
(``GET /v1/responses/{id}/input_items``), and the id of the response it
continued (``previous_response_id``). A conversation is a chain of such
entries, so each turn is stored once: ``conversation(id)`` walks the chain
back and returns every earlier input and output item in order, which is what
a request that names ``previous_response_id`` continues.

Bounds: at most ``max_items`` responses and ``max_bytes`` bytes (the size of
an entry is the length of its JSON text), least recently used first out;
continuing a response counts as a use of every response in its chain, so the
turns of a live conversation stay together. A response larger than
``max_bytes`` alone is not kept. Nothing survives a restart.

Synchronisation: the store is only touched by request handlers on the event
loop (never from worker threads), so it needs no lock.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

from squish.serving.errors import ServeError

DEFAULT_MAX_ITEMS = 1000
DEFAULT_MAX_MB = 64


@dataclass
class Entry:
    response: dict
    input_items: list[dict]
    previous: str | None
    size: int


def _size(obj) -> int:
    return len(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


class ResponseStore:
    def __init__(self, max_items: int = DEFAULT_MAX_ITEMS, max_bytes: int = DEFAULT_MAX_MB << 20):
        if max_items < 0 or max_bytes < 0:
            raise ValueError("the response store's bounds must not be negative")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, rid: str) -> bool:
        return rid in self._entries

    def put(self, response: dict, input_items: list[dict], previous: str | None) -> bool:
        """Keep ``response`` (evicting the least recently used); False if it alone exceeds the bounds."""
        rid = response["id"]
        size = _size(response) + _size(input_items)
        if self.max_items == 0 or size > self.max_bytes:
            return False
        self.delete(rid)
        self._entries[rid] = Entry(response, input_items, previous, size)
        self.bytes += size
        while len(self._entries) > self.max_items or self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.size
        return True

    def get(self, rid: str) -> Entry | None:
        entry = self._entries.get(rid)
        if entry is not None:
            self._entries.move_to_end(rid)
        return entry

    def delete(self, rid: str) -> bool:
        entry = self._entries.pop(rid, None)
        if entry is None:
            return False
        self.bytes -= entry.size
        return True

    def conversation(self, rid: str, param: str = "previous_response_id") -> list[dict]:
        """Every input and output item of ``rid`` and the responses it continued, oldest first.

        A 400 (``previous_response_not_found``, as OpenAI answers) if ``rid`` or one of the
        earlier turns it continued is not stored (never stored, deleted, or evicted)."""
        chain: list[Entry] = []
        at: str | None = rid
        while at is not None:
            entry = self.get(at)
            if entry is None:
                what = f"Previous response with id '{rid}' not found." if at == rid else (
                    f"Previous response '{rid}' continues '{at}', which is no longer stored (deleted, or "
                    "evicted from this server's bounded in-memory store); send the conversation as input "
                    "instead.")
                raise ServeError(400, what, param=param, code="previous_response_not_found")
            chain.append(entry)
            at = entry.previous
        items: list[dict] = []
        for entry in reversed(chain):
            items.extend(entry.input_items)
            items.extend(entry.response.get("output") or ())
        return items
