"""The ``lightning-paged`` command and its subcommands: thin layers over the core."""
