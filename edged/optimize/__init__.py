"""``edged optimize``: compress a model (quantise, prune, distil), measure every variant
against the original, and write only what passes the budget (docs/optimize.md).

Fleet-side tooling that also runs on a device for small models; the daemon never imports it.
Needs the ``edged[optimize]`` extra (onnx, matplotlib)."""
