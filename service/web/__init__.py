"""The HTTP front end (``sluice web``): the Files and Batches APIs, events, dashboard, metrics,
and the web process's background tasks (publisher, feeder)."""
