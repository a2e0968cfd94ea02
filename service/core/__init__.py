"""What every Sluice process shares: configuration, Redis keys and scripts, storage, wire types.

Nothing here imports from service.web, service.cli or workers.
"""
