"""The ``squish`` command line: ``main`` parses and maps errors to exit codes; one module
per subcommand that runs the engine (``serve``, ``chat``), sharing ``runner``."""
