"""remote: run a model, or the tail of a split model, on another KServe v2 gRPC server
(another edged, or Triton) — split execution between the gateway and a server.

The version folder holds the whole model (``model.onnx``, what the next executor in
model.toml's list runs when the server cannot be reached) and, for a split model, the head
(``[remote] head``, e.g. ``head.onnx``, written by ``edged partition --cut``) that runs here
in ONNX Runtime. Each inference runs the head, sends its outputs to the server's model (the
tail) with a deadline, retries a call the link refused (UNAVAILABLE) a bounded number of
times, and answers the tail's outputs.

Every failure is an ``ExecutorError`` (``ExecutorTimeoutError`` past the deadline): the
daemon's circuit breaker counts them, and its failover moves the model to the next executor
of its list (``executors = ["remote", "cpu-onnx"]``: the whole model, locally) and back once
the server answers again (a recovery trial loads this executor anew, which asks the server
for the model's metadata, and compares its answers with the local ones).

The wire is the generated KServe stubs (``edged._proto``): a leaf of generated code that
imports nothing of edged but its descriptor pool, which this executor may import as it
imports ``edged.core`` (tests/unit/test_layers.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import grpc

from edged._proto.inference import grpc_service_pb2 as pb
from edged._proto.inference import grpc_service_pb2_grpc as pb_grpc
from edged.core.errors import ExecutorError, ExecutorTimeoutError, ModelLoadError
from edged.core.tensors import decode_raw, encode_raw
from edged.core.types import Array, DataType, Signature, TensorSpec
from hal.cpu_onnx import OnnxCpuExecutor
from hal.executor import Executor, ExecutorOptions, LoadedModel, ModelArtifact
from hal.remote_link import estimator_for, tail_key
from hal.remote_target import RemoteTarget

#: the largest answer accepted from the server (gRPC's default is 4 MiB)
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
#: first back-off before a retry; doubled on each further one
RETRY_BACKOFF_S = 0.05


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ModelLoadError(f"remote: cannot read {what} {path}: {e.strerror or e}") from e


def channel_for(target: RemoteTarget) -> grpc.Channel:
    """A channel to ``target.address``: TLS (``ca_file`` or the system's roots, a client
    certificate for mutual TLS) unless ``insecure``.

    Raises:
        ModelLoadError: a TLS file cannot be read, or only one of cert_file and key_file.
    """
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
        ("grpc.max_send_message_length", -1),
        # no keepalive pings: servers refuse frequent ones (GOAWAY too_many_pings), and a
        # call on a dead link ends at its deadline anyway
    ]
    if target.insecure:
        return grpc.insecure_channel(target.address, options=options)
    if bool(target.cert_file) != bool(target.key_file):
        raise ModelLoadError("remote: cert_file and key_file go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(target.ca_file, "ca_file") if target.ca_file else None,
        private_key=_read(target.key_file, "key_file") if target.key_file else None,
        certificate_chain=_read(target.cert_file, "cert_file") if target.cert_file else None,
    )
    if target.server_name:
        options.append(("grpc.ssl_target_name_override", target.server_name))
    return grpc.secure_channel(target.address, credentials, options=options)


def token_metadata(target: RemoteTarget) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying ``token_file``'s bearer token (none without one).

    Raises:
        ModelLoadError: the token file cannot be read.
    """
    if not target.token_file:
        return ()
    token = _read(target.token_file, "token_file").decode("utf-8", "replace").strip()
    return (("authorization", f"Bearer {token}"),)


def _spec(tensor: Any, where: str) -> TensorSpec:
    try:
        datatype = DataType(tensor.datatype)
    except ValueError:
        raise ModelLoadError(
            f"remote: {where} '{tensor.name}' has datatype {tensor.datatype!r}, not a KServe one"
        ) from None
    return TensorSpec(tensor.name, datatype, tuple(int(d) for d in tensor.shape))


class RemoteModel(LoadedModel):
    """A head (or none) here and a model on the server, one channel to it."""

    def __init__(
        self,
        target: RemoteTarget,
        signature: Signature,
        channel: grpc.Channel,
        head: LoadedModel | None,
        sent: tuple[TensorSpec, ...],
        metadata: tuple[tuple[str, str], ...],
    ) -> None:
        super().__init__(signature, RemoteExecutor.kind)
        self.target = target
        self._channel = channel
        self._stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        self._head = head
        self._sent = sent
        """The remote model's inputs: what is sent (head outputs, or the request's inputs)."""
        self._metadata = metadata
        self._where = f"remote {target.address} model '{target.model}'"
        self.link = estimator_for(target.address)
        """The link to the server, measured from every call but the first (hal.remote_link)."""
        self._tail = tail_key(target.model, target.version)
        """The cut's name in ``link`` (its server time and head time)."""
        self._measuring = False
        """The first call (a warm-up) also pays for the channel's connection and the server's
        first run of the model: not a figure of the link."""

    def _infer(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        started = time.perf_counter()
        values = self._head.infer(inputs) if self._head is not None else inputs
        head_s = time.perf_counter() - started if self._head is not None else None
        message = pb.ModelInferRequest(
            model_name=self.target.model, model_version=self.target.version
        )
        size = 0
        for spec in self._sent:
            array = values[spec.name]
            message.inputs.add(
                name=spec.name,
                datatype=DataType.from_numpy(array.dtype).value,
                shape=array.shape,
            )
            raw = encode_raw(array)
            size += len(raw)
            message.raw_input_contents.append(raw)
        response, took = self._call(message)
        received = sum(len(r) for r in response.raw_output_contents)
        if self._measuring:
            self.link.record(
                size, received, took, self.target.server_s, tail=self._tail, head_s=head_s
            )
        self._measuring = True
        return self._decode(response)

    def _call(self, message: pb.ModelInferRequest) -> tuple[pb.ModelInferResponse, float]:
        """The server's answer and the seconds of the attempt that got it."""
        attempts = 1 + max(0, self.target.retries)
        for attempt in range(attempts):
            started = time.perf_counter()
            try:
                response: pb.ModelInferResponse = self._stub.ModelInfer(
                    message, timeout=self.target.timeout_s, metadata=self._metadata
                )
                return response, time.perf_counter() - started
            except grpc.RpcError as e:
                code = e.code()
                details = e.details() or ""
                if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise ExecutorTimeoutError(
                        f"{self._where}: no answer within {self.target.timeout_s:g}s"
                    ) from e
                if code is grpc.StatusCode.UNAVAILABLE and attempt + 1 < attempts:
                    time.sleep(RETRY_BACKOFF_S * 2**attempt)
                    continue
                raise ExecutorError(f"{self._where}: {code.name}: {details}") from e
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _decode(self, response: pb.ModelInferResponse) -> dict[str, Array]:
        raw = response.raw_output_contents
        outputs: dict[str, Array] = {}
        for i, tensor in enumerate(response.outputs):
            if i >= len(raw):
                raise ExecutorError(f"{self._where}: output '{tensor.name}' came without contents")
            datatype = DataType(tensor.datatype)
            outputs[tensor.name] = decode_raw(tensor.name, datatype, tensor.shape, raw[i])
        missing = [t.name for t in self.signature.outputs if t.name not in outputs]
        if missing:
            raise ExecutorError(f"{self._where}: the answer lacks output(s) {', '.join(missing)}")
        return outputs

    def _close(self) -> None:
        if self._head is not None:
            self._head.close()
        self._channel.close()


class RemoteExecutor(Executor):
    """Forwards inferences to a KServe v2 gRPC server (model.toml ``[remote]``)."""

    kind: ClassVar[str] = "remote"
    formats: ClassVar[frozenset[str]] = frozenset({"onnx"})

    def _load(self, artifact: ModelArtifact, options: ExecutorOptions) -> LoadedModel:
        target = options.remote
        if target is None:
            raise ModelLoadError(
                "remote: model.toml has no [remote] table (address and model of the server)"
            )
        metadata = token_metadata(target)
        head = None
        if target.head:
            head = OnnxCpuExecutor().load(
                ModelArtifact(artifact.path.parent / target.head, "onnx"), options
            )
        channel: grpc.Channel | None = None
        try:
            channel = channel_for(target)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            try:
                meta = stub.ModelMetadata(
                    pb.ModelMetadataRequest(name=target.model, version=target.version),
                    timeout=target.timeout_s,
                    metadata=metadata,
                )
            except grpc.RpcError as e:
                raise ModelLoadError(
                    f"remote {target.address} model '{target.model}': "
                    f"{e.code().name}: {e.details() or ''}"
                ) from e
            sent = tuple(_spec(t, "input") for t in meta.inputs)
            outputs = tuple(_spec(t, "output") for t in meta.outputs)
            _check_feeds(target, head, sent)
            inputs = head.signature.inputs if head is not None else sent
            return RemoteModel(target, Signature(inputs, outputs), channel, head, sent, metadata)
        except BaseException:
            if head is not None:
                head.close()
            if channel is not None:
                channel.close()
            raise


def _check_feeds(
    target: RemoteTarget, head: LoadedModel | None, sent: tuple[TensorSpec, ...]
) -> None:
    """The head makes every input the remote model takes, with its datatype.

    Raises:
        ModelLoadError: naming the tensor that does not fit.
    """
    if head is None:
        return
    made = {t.name: t for t in head.signature.outputs}
    for spec in sent:
        have = made.get(spec.name)
        if have is None:
            raise ModelLoadError(
                f"remote: model '{target.model}' takes '{spec.name}', which the head "
                f"{target.head} does not make (it makes: {', '.join(made)})"
            )
        if have.datatype is not spec.datatype:
            raise ModelLoadError(
                f"remote: model '{target.model}' takes '{spec.name}' as {spec.datatype}, "
                f"the head {target.head} makes {have.datatype}"
            )
