"""Development tools that are not part of a deployment: the mock upstream."""
