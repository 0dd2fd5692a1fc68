"""Qwen 2.5 / Qwen 3 (Hermes style): ``<tool_call>\\n{"name":..., "arguments":...}\\n</tool_call>``.

Their chat templates render ``tools`` natively, so no fallback prompt is used.
"""

from squish.tools.families.base import TaggedFamily

FAMILY = TaggedFamily(name="qwen", template_markers=("<tool_call>", "<tools>"))
