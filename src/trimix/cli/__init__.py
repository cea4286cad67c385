"""The ``trimix`` command line."""
