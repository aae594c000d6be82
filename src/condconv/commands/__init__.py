"""The ``condconv`` subcommands: one module each, with ``add_arguments(parser)`` and ``run(args) -> int``.

These are the only modules (with :mod:`condconv.cli`, which wires them) that know about argparse; each turns its
flags into calls of the library services and prints the results.
"""
