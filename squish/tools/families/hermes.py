"""The ``<tool_call>`` JSON families: each call is a JSON object (or a list of them)
inside ``<tool_call>`` ... ``</tool_call>``, the Hermes style.

- ``QWEN``: Qwen 2.5 / Qwen 3. Their chat templates render ``tools`` natively, so no
  fallback prompt is used.
- ``SMOLLM2``: SmolLM2 Instruct. Its chat template has no tool support, so tools go
  in through the fallback prompt (``render.FALLBACK_SYSTEM``), which asks for the
  same blocks. SmolLM2's own tool-use data puts a JSON *list* of calls inside one
  block; ``parse_block`` accepts both.
- ``GENERIC``: templates Squish does not know. Prompted with the fallback prompt;
  when parsing, a reply that is nothing but a JSON call object (or list of them)
  also counts as calls, since small models often drop the tags.
"""

from squish.tools.families.base import ParseResult, TaggedFamily, calls_from_json_text


class _SmolLM2(TaggedFamily):
    def matches(self, model_type: str, template: str) -> bool:
        return "SmolLM" in template and "tools" not in template


class _Generic(TaggedFamily):
    def matches(self, model_type: str, template: str) -> bool:
        return True  # the last resort; registry tries it last

    def parse(self, text: str) -> ParseResult:
        stripped = text.strip()
        if self.start not in text and stripped[:1] in ("{", "["):
            calls = calls_from_json_text(stripped)
            if all(c.error is None for c in calls):
                return ParseResult("", calls)
        return super().parse(text)


QWEN = TaggedFamily(name="qwen", template_markers=("<tool_call>", "<tools>"))
SMOLLM2 = _SmolLM2(name="smollm2")
GENERIC = _Generic(name="generic")
