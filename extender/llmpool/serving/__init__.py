"""Talking to live model servers: parsing their metrics, the router-side datastore,
the dispatch loop that runs a policy against real endpoints, and the clients built
on them (replay, calibration)."""
