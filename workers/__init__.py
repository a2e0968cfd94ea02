"""Background processes: the consumer-group worker and the finalizer."""
