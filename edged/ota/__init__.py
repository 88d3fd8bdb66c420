"""Over-the-air model updates.

Fleet side: ``bundle`` (the model bundle format), ``publish`` (the TUF repository a fleet
publishes bundles to; the ``edged-fleet`` command drives it). Device side: ``archive`` (safe
unpacking of a downloaded bundle), ``state``/``store``/``updater`` (fetch, stage, verify,
activate, health window, commit or roll back). See docs/ota.md.
"""
