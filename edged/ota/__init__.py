"""Over-the-air model updates, the device side.

``bundle`` (the model bundle format and its checks), ``targets`` (where a bundle lives in the
fleet's TUF repository), ``archive`` (safe unpacking of a downloaded bundle),
``state``/``store``/``updater`` (fetch, stage, verify, activate, health window, commit or roll
back). The fleet side (building, publishing and rolling out bundles, ``edged-fleet``) is
``edged.fleet``; this package never imports it, nor the HAL. See docs/ota.md.
"""
