"""Write the seed corpus (tests/fuzz/corpus/<target>/): small valid and near-valid inputs
for each harness. Run once (`python -m tests.fuzz.seeds`); the corpus is checked in, and
crashes found later are added beside these."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np

from edged._proto.inference import grpc_service_pb2 as pb
from edged.core.types import InferRequest
from edged.frontends import zmq_wire
from edged.frontends.kserve_codec import request_to_proto
from tests.fuzz.harnesses import FRAME_SEPARATOR, tar_of

CORPUS = Path(__file__).resolve().parent / "corpus"
MODELS = Path(__file__).resolve().parents[2] / "models"


def _kserve() -> list[bytes]:
    seeds = [
        request_to_proto(
            InferRequest("digits", {"input": np.zeros((1, 64), np.float32)})
        ).SerializeToString(),
        request_to_proto(
            InferRequest("m", {"s": np.array([b"ab", b""], dtype=object)}, requested_outputs=("y",))
        ).SerializeToString(),
    ]
    typed = pb.ModelInferRequest(model_name="digits", id="t")
    tensor = typed.inputs.add(name="input", datatype="INT8", shape=[1, 3])
    tensor.contents.int_contents.extend([1, -2, 300])
    typed.parameters["priority"].int64_param = 1
    seeds.append(typed.SerializeToString())
    shm = pb.ModelInferRequest(model_name="digits")
    t = shm.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_byte_size"].int64_param = 256
    seeds.append(shm.SerializeToString())
    huge = pb.ModelInferRequest(model_name="x")
    huge.inputs.add(name="i", datatype="BOOL", shape=[0, 2**63 - 1])
    seeds.append(huge.SerializeToString())
    return seeds


def _zmq() -> list[bytes]:
    request = InferRequest(
        "digits", {"input": np.zeros((1, 2), np.float32), "s": np.array([b"x"], dtype=object)}
    )
    frames = [bytes(f) for f in zmq_wire.encode_request("infer", "r1", request=request)]
    seeds = [FRAME_SEPARATOR.join(frames)]
    seeds.append(json.dumps({"v": 1, "op": "live", "id": "l"}).encode())
    seeds.append(
        FRAME_SEPARATOR.join(
            [
                json.dumps(
                    {
                        "v": 1,
                        "op": "add_samples",
                        "model": "m",
                        "labels": [1],
                        "inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 2]}],
                    }
                ).encode(),
                b"\x01\x02",
            ]
        )
    )
    seeds.append(b'{"v": 1, "op": "infer", "inputs": [{"shape": [0, 1e999]}]}')
    return seeds


def _bytes_tensor() -> list[bytes]:
    def pack(items: list[bytes]) -> bytes:
        return bytes([len(items)]) + b"".join(struct.pack("<I", len(i)) + i for i in items)

    return [pack([b"a", b"", b"\x00\xff"]), pack([]), b"\x02\x05\x00\x00\x00ab"]


def _model_toml() -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted(MODELS.glob("*/model.toml"))]
    seeds.append(b'format = "onnx"\nmax_batch_size = -1\n[[inputs]]\nname = 3\n')
    return seeds


def _bundle() -> list[bytes]:
    return [
        tar_of({"bundle.toml": b'name = "m"\nversion = 1\n', "model.onnx": b"\x08\x01"}),
        tar_of({"../../x": b"escape"}),
        tar_of({"a": b"1", "a/b": b"2"}),
        b"\x1f\x8b\x08\x00" + b"\x00" * 20,
    ]


def write() -> None:
    for target, seeds in {
        "kserve_request": _kserve(),
        "zmq_message": _zmq(),
        "bytes_tensor": _bytes_tensor(),
        "model_toml": _model_toml(),
        "bundle_archive": _bundle(),
    }.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (folder / f"seed-{hashlib.sha256(seed).hexdigest()[:16]}").write_bytes(seed)


if __name__ == "__main__":
    write()
