"""SmolLM2 Instruct: its chat template has no tool support, so tools go in
through the fallback prompt (``render.FALLBACK_SYSTEM``), which asks for the
same ``<tool_call>`` blocks as the Hermes style. SmolLM2's own tool-use data
puts a JSON *list* of calls inside one block; ``parse_block`` accepts both.
"""

from squish.tools.families.base import TaggedFamily


class _SmolLM2(TaggedFamily):
    def matches(self, model_type: str, template: str) -> bool:
        return "SmolLM" in template and "tools" not in template


FAMILY = _SmolLM2(name="smollm2")
