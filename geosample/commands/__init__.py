"""Subcommands of the ``geosample`` command line (see :mod:`geosample.cli`)."""
