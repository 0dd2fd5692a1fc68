"""One module per model family's tool-call format; see ``base`` and ``squish.tools.registry``."""
