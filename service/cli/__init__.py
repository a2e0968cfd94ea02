"""The ``sluice`` command line: process entry points, the API client, status, up and tokens."""
