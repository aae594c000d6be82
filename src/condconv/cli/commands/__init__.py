"""One module per subcommand of ``condconv`` (``HELP``, ``add_arguments(parser)``, ``run(args)``) and the shared
option types (``options``)."""
