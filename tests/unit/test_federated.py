"""edged.federated's pure parts and the Flower client's behaviour without Flower: the head on
the wire, enrolment, the session file, a device's local round (strategy, FedProx), adopting a
merged head, streaming-LDA statistics that federate exactly, what a device sends (head
parameters or statistics only: never a sample or a feature), and `edged-fleet federate`'s
checks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from edged.core.errors import EdgedError
from edged.federated import enrol
from edged.federated.client import Device
from edged.federated.local import (
    RoundConfig,
    is_lda_statistics,
    lda_merge,
    lda_statistics,
    local_fit,
)
from edged.federated.params import head_from_arrays, head_to_arrays, payload_bytes
from edged.federated.session import MERGED_FILE, MergedInfo, Session
from edged.fleet import federate
from edged.learn.head import accuracy, init_head, load_head, save_head, write_npz
from edged.learn.strategies import (
    StreamingLDA,
    adopt,
    initial_state,
    load_state,
    save_state,
    tuned_hyper,
)
from tests.daemon_process import EXAMPLE_MODELS

HEAD = EXAMPLE_MODELS / "digits_learn" / "1" / "head.npz"
STATE = EXAMPLE_MODELS / "digits_learn" / "1" / "learn_state.npz"


def _blobs(seed: int, classes: list[int], n: int = 40, dim: int = 64) -> tuple[np.ndarray, ...]:
    """Separable features: class c centred at 3 * e_c."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.array(classes), n)
    x = rng.normal(size=(len(y), dim)).astype(np.float32)
    x[np.arange(len(y)), y] += 6.0
    return x, y.astype(np.int64)


# -- the head on the wire -----------------------------------------------------------------


def test_head_travels_as_its_function_and_fits_100_kb() -> None:
    head = load_head(HEAD)
    arrays = head_to_arrays(head)
    assert len(arrays) == 2 * head.layers  # no standardisation on the wire: it is folded in
    x = np.random.default_rng(0).normal(size=(20, head.in_dim)).astype(np.float32) * 3
    for like in (None, head):
        again = head_from_arrays(arrays, like)
        np.testing.assert_allclose(again.logits(x), head.logits(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(head_from_arrays(arrays, head).scale, head.scale)
    assert payload_bytes(arrays) <= 100 * 1024  # the per-round budget


@pytest.mark.parametrize(
    ("arrays", "words"),
    [
        ([np.zeros((3, 2))], "got 1 arrays"),
        ([np.zeros(3), np.ones(3)], "weight.0 must be 2-D"),
        ([np.zeros((3, 2)), np.zeros(2), np.zeros((4, 2)), np.zeros(2)], "weight.1 has 4 rows"),
    ],
)
def test_a_malformed_head_is_refused_naming_the_array(arrays: list, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        head_from_arrays(arrays)


# -- enrolment -------------------------------------------------------------------------------


def test_enrolment_proof_binds_token_model_device_and_nonce(tmp_path: Path) -> None:
    tokens = {"dev0": b"a" * 16, "dev1": b"b" * 16}
    answer = enrol.proof(b"a" * 16, "m", "dev0", "n1")
    assert enrol.verify(tokens, "m", "dev0", "n1", answer)
    assert not enrol.verify(tokens, "m", "dev0", "n2", answer)  # replayed for another nonce
    assert not enrol.verify(tokens, "other", "dev0", "n1", answer)  # another model
    assert not enrol.verify(tokens, "m", "dev1", "n1", answer)  # claimed by another device
    assert not enrol.verify(tokens, "m", "dev9", "n1", answer)  # not enrolled


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("dev0 short\n", r"enrolled.txt:1: expected 'DEVICE_ID TOKEN'"),
        ("# fleet\ndev0 " + "a" * 16 + "\ndev0 " + "b" * 16 + "\n", r":3: device 'dev0' is listed"),
        ("dev0 " + "a" * 16 + " extra\n", r":1: expected"),
    ],
)
def test_a_bad_enrolment_file_names_the_line(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "enrolled.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=words):
        enrol.read_enrolled(path)


def test_a_short_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc\n")
    with pytest.raises(ValueError, match="16"):
        enrol.read_token(tmp_path / "token")


# -- session ---------------------------------------------------------------------------------


def _session(tmp_path: Path, **changes: object) -> Session:
    values: dict[str, object] = {
        "model": "digits_learn",
        "server": "localhost:9092",
        "root_certificates": "",
        "insecure": True,
        "device_id": "dev0",
        "token_file": "",
        "strategy": "replay+lwf",
        "seed": 3,
        "head": str(HEAD),
        "state": str(STATE),
        "max_wait_s": 5.0,
    }
    values.update(changes)
    return Session(**values)  # type: ignore[arg-type]


def test_session_round_trips_and_a_bad_field_is_named(tmp_path: Path) -> None:
    session = _session(tmp_path)
    session.write(tmp_path)
    assert Session.read(tmp_path) == session
    data = json.loads((tmp_path / "session.json").read_text())
    data["seed"] = "3"
    with pytest.raises(ValueError, match="'seed' must be int"):
        Session.from_json(json.dumps(data))
    del data["seed"]
    with pytest.raises(ValueError, match="'seed' is missing"):
        Session.from_json(json.dumps(data))


# -- a device's round ------------------------------------------------------------------------


def test_local_fit_learns_the_device_classes_and_fedprox_stays_closer_to_the_global() -> None:
    x, y = _blobs(1, [5, 6])
    head = init_head((64, 32, 10), np.random.default_rng(0), np.zeros(64), np.ones(64))
    state = initial_state(head, *_blobs(2, [0, 1, 2]), "replay", tuned_hyper("replay"), 0)
    before = accuracy(head, x, y)
    plain = local_fit(head, state, x, y, "replay", RoundConfig(epochs=10), seed=4)
    again = local_fit(head, state, x, y, "replay", RoundConfig(epochs=10), seed=4)
    prox = local_fit(head, state, x, y, "replay", RoundConfig(10, proximal_mu=10.0), seed=4)
    assert accuracy(plain, x, y) > before + 0.5
    for a, b in zip(head_to_arrays(plain), head_to_arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)  # seeded: reproducible
    np.testing.assert_array_equal(plain.mean, head.mean)  # trained in fixed coordinates

    def distance(h: object) -> float:
        return sum(
            float(np.sum((a - b) ** 2))
            for a, b in zip(h.params(), head.params(), strict=True)  # type: ignore[attr-defined]
        )

    assert distance(prox) < distance(plain)


def test_adopt_absorbs_the_device_samples_and_knows_every_class() -> None:
    head = load_head(HEAD)
    state = load_state(STATE)
    x, y = _blobs(3, [7, 8])
    new = adopt(head, state, x[:60], y[:60], (x[60:], y[60:]), seed=1)
    assert new.known is not None
    assert new.known.all()
    assert new.tasks == state.tasks + 1
    assert new.replay is not None
    assert state.replay is not None
    assert new.replay.seen == state.replay.seen + 60
    assert new.holdout.seen == state.holdout.seen + len(y) - 60


def test_streaming_lda_federated_equals_centralised_up_to_float_error() -> None:
    rng = np.random.default_rng(0)
    base = StreamingLDA(16, 6, rng.normal(size=16), rng.uniform(0.5, 2.0, 16))
    base.fit(rng.normal(size=(80, 16)), rng.integers(0, 3, 80))  # what the model knew
    devices = [(rng.normal(size=(n, 16)) + 2, rng.integers(0, 6, n)) for n in (30, 17, 44)]
    stats = [lda_statistics(base, x, y) for x, y in devices]
    assert all(is_lda_statistics(s, base) for s in stats)
    counts = [len(y) for _, y in devices]
    total = sum(counts)
    # what Flower's FedAvg computes: the average weighted by sample counts
    fedavg = [sum(n * s[k] for n, s in zip(counts, stats, strict=True)) / total for k in range(3)]
    federated = lda_merge(base, fedavg, total)
    central = base.copy()
    for x, y in devices:
        central.fit(x, y)
    np.testing.assert_array_equal(federated.counts, central.counts)
    np.testing.assert_allclose(federated.means, central.means, rtol=0, atol=1e-12)
    np.testing.assert_allclose(federated.scatter, central.scatter, rtol=1e-12, atol=1e-9)
    a, b = federated.to_head(1e-4), central.to_head(1e-4)
    np.testing.assert_allclose(a.weights[0], b.weights[0], rtol=1e-5, atol=1e-5)


# -- what leaves a device ---------------------------------------------------------------------


def _device(tmp_path: Path, strategy: str = "replay+lwf") -> tuple[Device, np.ndarray]:
    head = load_head(HEAD)
    x, y = _blobs(5, [5, 6], dim=head.in_dim)
    write_npz(
        tmp_path / "samples.npz",
        {"x_train": x[:64], "y_train": y[:64], "x_holdout": x[64:], "y_holdout": y[64:]},
    )
    state_path = tmp_path / "state.npz"
    if strategy == "streaming-lda":
        old = _blobs(6, [0, 1], dim=64)
        save_state(state_path, initial_state(head, *old, strategy, tuned_hyper(strategy), 0))
    else:
        state_path = STATE
    (tmp_path / "token").write_text("t" * 32)
    session = _session(
        tmp_path, strategy=strategy, state=str(state_path), token_file=str(tmp_path / "token")
    )
    return Device(tmp_path, session), x


@pytest.mark.parametrize("strategy", ["replay+lwf", "streaming-lda"])
def test_a_device_sends_parameters_or_statistics_never_samples(
    tmp_path: Path, strategy: str
) -> None:
    device, x = _device(tmp_path, strategy)
    head = load_head(HEAD)
    sent, count = device.fit(head_to_arrays(head), {"round": 1, "epochs": 2})
    assert count == 64  # the weight FedAvg uses: a count, not the samples
    if strategy == "streaming-lda":
        assert device.lda is not None
        assert [a.shape for a in sent] == [(10,), (10, 64), (64, 64)]
    else:
        assert [a.shape for a in sent] == [a.shape for a in head_to_arrays(head)]
    rows = {row.tobytes() for row in np.asarray(x, np.float32)}
    for array in sent:
        flat = np.asarray(array, np.float32)
        # no sent array holds a feature row (as a row, or as the matrix itself)
        assert not (
            flat.ndim == 2
            and flat.shape[1] == x.shape[1]
            and any(r.tobytes() in rows for r in flat)
        )
        assert flat.shape[0] != len(x)
    props = device.properties({"nonce": "n"})
    assert set(props) == {"model", "device", "proof"}
    assert "t" * 32 not in json.dumps(props)  # the token itself never travels


def test_evaluate_keeps_the_merged_head_and_its_round(tmp_path: Path) -> None:
    device, _ = _device(tmp_path)
    head = load_head(HEAD)
    loss, count = device.evaluate(
        head_to_arrays(head),
        {"round": 4, "rounds": 4, "strategy": "fedprox", "participants": 3},
    )
    assert count == 16
    assert loss > 0
    kept = load_head(tmp_path / MERGED_FILE)
    np.testing.assert_allclose(kept.weights[0], head.weights[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(kept.scale, head.scale)  # the device's own coordinates
    assert MergedInfo.read(tmp_path) == MergedInfo(4, 4, "fedprox", 3)


def test_lda_evaluate_merges_the_statistics_into_an_lda_head(tmp_path: Path) -> None:
    device, _ = _device(tmp_path, "streaming-lda")
    stats, count = device.fit([], {"round": 1})
    device.evaluate(stats, {"round": 1, "rounds": 1, "samples": count})
    merged = load_head(tmp_path / MERGED_FILE)
    assert device.lda is not None
    expected = device.lda.copy()
    expected.fit(device.x_train, device.y_train)
    np.testing.assert_allclose(
        merged.weights[0], expected.to_head(1e-4).weights[0], rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="sample count"):
        device.evaluate(stats, {"round": 1})


# -- edged-fleet federate's checks ---------------------------------------------------------


def _args(tmp_path: Path, **changes: object) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    federate.add_arguments(parser)
    enrolled = tmp_path / "enrolled.txt"
    enrolled.write_text("dev0 " + "a" * 16 + "\n")
    args = parser.parse_args(["m", "--head", str(HEAD), "--insecure"])
    args.enrolled = enrolled
    args.python = str(Path(__import__("sys").executable))
    for key, value in changes.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"secagg": True}, "SecAgg"),
        ({"fraction": 0.0}, "--fraction"),
        ({"dp_noise": 1.0}, "--dp-clip"),
        ({"insecure": False}, "--tls-cert is required"),
        ({"insecure": False, "enrolled": None}, "--enrolled is required"),
        ({"head": Path("/nonexistent/head.npz")}, "--head"),
        ({"python": "/nonexistent/python"}, "make federated-env"),
    ],
)
def test_federate_names_what_is_wrong(tmp_path: Path, changes: dict, words: str) -> None:
    with pytest.raises(EdgedError, match=words):
        federate.server_argv(_args(tmp_path, **changes))


def test_federate_passes_every_setting_to_the_server(tmp_path: Path) -> None:
    argv = federate.server_argv(_args(tmp_path, strategy="fedadam", rounds=7))
    assert argv[1:4] == ["-m", "edged.federated.server", "m"]
    text = " ".join(argv)
    assert "--strategy fedadam" in text
    assert "--rounds 7" in text
    assert "--insecure" in text
    assert "--enrolled" in text
    save_head(tmp_path / "x.npz", load_head(HEAD))  # (the head is read, not changed)
