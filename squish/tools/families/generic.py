"""The generic JSON form, for templates Squish does not know.

Prompted with the fallback prompt (``<tool_call>`` blocks). When parsing, a
reply that is nothing but a JSON call object (or list of them) also counts as
calls, since small models often drop the tags.
"""

from squish.tools.families.base import ParseResult, TaggedFamily, calls_from_json_text


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


FAMILY = _Generic(name="generic")
