"""Federated learning across a fleet with Flower (docs/federated.md, docs/adr/0012).

Flower runs in its own environment (``federated.python``: flwr pins protobuf<7, the daemon's
stubs need protobuf 7), so the modules here split in two:

* run by the daemon and ``edged-fleet`` (base environment): ``config``-free helpers
  ``params``, ``local``, ``session``, ``enrol`` (NumPy and the standard library only), the
  device-side supervisor ``devices`` and the fleet-side launcher ``edged.fleet.federate``;
* run in the federated environment, as processes: ``client`` (one per model and device, under
  the learning worker's limits) and ``server`` (``edged-fleet federate``).

Only head parameters cross the wire, never samples or features.
"""
