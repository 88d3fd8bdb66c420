"""Split execution of one ONNX model between the gateway and a server (docs/partition.md).

- :mod:`edged.partition.graph`: the candidate cuts of an ONNX graph and the head/tail models
  cut at one (onnx's graph API; needs the ``edged[learn]`` extra, imported only here).
- :mod:`edged.partition.planner`: the pure rule that picks the cut minimising end-to-end
  latency from a cost table (Neurosurgeon, Kang et al., ASPLOS 2017).
- :mod:`edged.partition.profile`: the measurements the planner needs (per-cut head and tail
  latency on an executor, tensor bytes at each cut).

The daemon imports none of this: it serves a head and a tail as ordinary ONNX models, and the
``remote`` executor (hal/remote.py) runs a split model.
"""
