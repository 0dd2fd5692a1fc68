"""Tool-call formats, one module per format (``hermes`` holds the ``<tool_call>`` JSON families); see ``base`` and ``squish.tools.registry``."""
