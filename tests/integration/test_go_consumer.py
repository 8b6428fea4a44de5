"""The Go consumer (examples/go-consumer) reaches the Python Subscriber's verdict on every record.

Both read the published consumer vectors from a real Kafka topic: same records accepted, same
records refused, with the same reason. The Go side is built from source by the real toolchain.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import math
import random
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckms._kafka import TopicSpec, ensure_topics
from ckms._kafka_security import KafkaLink
from ckms.consumer import FileOffsetStore, Subscriber
from ckms.errors import ProtocolError
from ckms.protocol import MessageRejected, canonical_json, parse_canonical_json, verify_message
from tests.support.go_consumer import MODULE, go_consumer, go_env, run_go_consumer
from tests.support.kafka import go_tls_args
from tests.support.vectors import VECTORS_DIR, load_vectors

__all__ = ["go_consumer"]

VECTORS = load_vectors("consumer.json")
CASES = VECTORS["cases"]
TRUST_B64 = [base64.b64encode(bytes.fromhex(t["public_hex"])).decode()
             for t in VECTORS["trusted"]]  # fmt: skip
DROPPED = re.compile(r"dropped event topic=\S+ partition=(\d+) offset=(\d+) reason=(\S+):")


def _expected() -> list[tuple[str, str | None]]:
    return [(c["verdict"], c["reason"]) for c in CASES]


# -- offline: the rules alone ---------------------------------------------------------------


def test_go_judges_every_vector_as_published(go_consumer: Path) -> None:
    result = subprocess.run(
        [str(go_consumer), "-vectors", str(VECTORS_DIR / "consumer.json")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert [g["name"] for g in got] == [c["name"] for c in CASES]
    assert [(g["verdict"], g["reason"]) for g in got] == _expected()


def _go_canonical(binary: Path, values: list[bytes]) -> list[bool]:
    result = subprocess.run(
        [str(binary), "-check-canonical"],
        input="\n".join(v.hex() for v in values) + "\n",
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [line == "canonical" for line in result.stdout.splitlines()]


def _python_canonical(value: bytes) -> bool:
    try:
        parse_canonical_json(value)
    except ProtocolError:
        return False
    return True


def test_go_agrees_on_the_canonical_json_vectors(go_consumer: Path) -> None:
    vectors = load_vectors("canonical_json.json")
    valid = [bytes.fromhex(v["expected_hex"]) for v in vectors["valid"]]
    invalid = [bytes.fromhex(v["input_hex"]) for v in vectors["invalid"]]
    invalid = [v for v in invalid if v]  # one value per line: the empty value is a vector case
    assert _go_canonical(go_consumer, valid) == [True] * len(valid)
    assert _go_canonical(go_consumer, invalid) == [False] * len(invalid)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _mutations(value: bytes) -> list[bytes]:
    """Near misses of a canonical encoding: each byte edit a sloppy encoder might make."""
    text = value.decode()
    out = [value + b" ", b" " + value, value.replace(b":", b": ", 1), value.replace(b",", b", ", 1)]
    out.append(re.sub(r"(\d)\.0\b", r"\1.00", text, count=1).encode())
    out.append(re.sub(r"\be\+", "E+", text, count=1).encode())
    out.append(text.encode("ascii", "backslashreplace").replace(b"\\x", b"\\u00"))
    return [m for m in out if m != value]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(JSON_VALUES, min_size=20, max_size=20))
def test_go_and_python_agree_on_random_values_and_near_misses(
    go_consumer: Path, values: list[Any]
) -> None:
    encoded = []
    for value in values:
        try:
            encoded.append(canonical_json(value))
        except ProtocolError:
            continue  # lone surrogates
    candidates = encoded + [m for e in encoded for m in _mutations(e)]
    candidates = [c for c in candidates if c and b"\n" not in c]
    go = _go_canonical(go_consumer, candidates)
    python = [_python_canonical(c) for c in candidates]
    assert go == python, [c for c, g, p in zip(candidates, go, python, strict=True) if g != p][:3]


def test_python_float_spelling_edges(go_consumer: Path) -> None:
    floats = [0.0, -0.0, 1.0, 0.1, 1e16, 1e15, 123456789012345678.0, 1e-4, 1e-5, 5e-324,
              1.7976931348623157e308, 0.30000000000000004, -2.5e-7, 100.0, math.pi]  # fmt: skip
    values = [canonical_json(f) for f in floats]
    assert _go_canonical(go_consumer, values) == [True] * len(values)


# -- over Kafka: the Subscriber and the Go consumer on the same records ----------------------


@pytest.fixture
async def vector_topic(controller_kafka: KafkaLink, unique_topic: Callable[[str], str]) -> tuple:
    """A topic holding every vector record; returns it and each case's (partition, offset)."""
    topic = unique_topic("vectors")
    await ensure_topics(controller_kafka, [TopicSpec(topic, partitions=VECTORS["partitions"])])
    positions = await produce_cases(controller_kafka, topic, CASES)
    return topic, positions


async def produce_cases(kafka: KafkaLink, topic: str, cases: list[dict]) -> list[tuple[int, int]]:
    producer = AIOKafkaProducer(**kafka.client_args(acks="all", max_request_size=1 << 20))
    await producer.start()
    try:
        out = []
        for case in cases:
            value = None if case["value_hex"] is None else bytes.fromhex(case["value_hex"])
            headers = [(name, bytes.fromhex(v)) for name, v in case["headers"]]
            meta = await producer.send_and_wait(
                topic, value, key=case["key"].encode(), headers=headers, partition=case["partition"]
            )
            out.append((meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


async def python_verdicts(
    kafka: KafkaLink,
    topic: str,
    positions: list[tuple[int, int]],
    caplog: pytest.LogCaptureFixture,
    **kw: Any,
) -> dict[tuple[int, int], tuple[str, str | None]]:
    """Run the Subscriber over the vector records; its verdicts by (partition, offset).

    Deliveries are placed by event id (each accepted vector has its own), refusals by the
    partition and offset its log line names. It runs until the topic stays quiet for 3 s.
    """
    caplog.set_level(logging.WARNING, logger="ckms.consumer")
    trust = [bytes.fromhex(t["public_hex"]) for t in VECTORS["trusted"]]
    by_id = {c["expect"]["id"]: pos for c, pos in zip(CASES, positions, strict=True)
             if c["verdict"] == "accept"}  # fmt: skip
    verdicts: dict[tuple[int, int], tuple[str, str | None]] = {}
    async with Subscriber(
        bootstrap=kafka.bootstrap, security=kafka.security, trust=trust, topic=topic, **kw
    ) as sub:
        while True:
            try:
                event = await asyncio.wait_for(anext(sub), 3)
            except TimeoutError:
                break
            verdicts[by_id[event.id]] = ("accept", None)
    for record in caplog.records:
        if m := DROPPED.search(record.getMessage()):
            verdicts[(int(m[1]), int(m[2]))] = ("reject", m[3])
    return verdicts


@pytest.mark.kafka
async def test_both_consumers_judge_the_vectors_alike_over_kafka(
    go_consumer: Path,
    reader_kafka: KafkaLink,
    vector_topic: tuple,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic, positions = vector_topic
    expected = dict(zip(positions, _expected(), strict=True))

    python = await python_verdicts(reader_kafka, topic, positions, caplog)
    assert python == expected

    state = tmp_path / "go-state.json"
    args = ["-brokers", reader_kafka.bootstrap, *go_tls_args(reader_kafka.security),
            "-topic", topic, "-state", str(state), "-json",
            "-poll-wait", "500ms"] + [a for k in TRUST_B64 for a in ("-trust", k)]  # fmt: skip
    async with run_go_consumer(go_consumer, *args) as go:
        await go.wait_lines(len(CASES))
    records = go.records()
    go_verdicts = {(r["partition"], r["offset"]): (r["verdict"], r.get("reason")) for r in records}
    assert go_verdicts == expected
    accepted = [r for r in records if r["verdict"] == "accept"]
    by_offset = {p: c for p, c in zip(positions, CASES, strict=True)}
    for r in accepted:  # what Go hands on is the event itself: type, seq, id, data
        case = by_offset[(r["partition"], r["offset"])]
        assert {k: r[k] for k in ("type", "seq", "id")} == case["expect"]
        value = json.loads(bytes.fromhex(case["value_hex"]))
        assert r["data"] == value["data"]

    # The Go state file is the Python offset store's format: each can resume from the other's.
    saved = FileOffsetStore(state).load_sync(topic)
    last_accepted = {}
    for (partition, _offset), case in zip(positions, CASES, strict=True):
        if case["verdict"] == "accept":
            last_accepted[partition] = case["expect"]["seq"]
    for partition in range(VECTORS["partitions"]):
        ends = [o for p, o in positions if p == partition]
        assert saved[partition].offset == max(ends) + 1
        assert saved[partition].last_seq == last_accepted[partition]


@pytest.mark.kafka
async def test_go_consumer_resumes_from_its_state_and_drops_replays_across_restarts(
    go_consumer: Path, controller_kafka: KafkaLink, reader_kafka: KafkaLink, vector_topic: tuple,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    topic, positions = vector_topic
    state = tmp_path / "go-state.json"
    args = ["-brokers", reader_kafka.bootstrap, *go_tls_args(reader_kafka.security),
            "-topic", topic, "-state", str(state), "-json",
            "-poll-wait", "500ms"] + [a for k in TRUST_B64 for a in ("-trust", k)]  # fmt: skip
    async with run_go_consumer(go_consumer, *args) as go:
        await go.wait_lines(len(CASES))

    # Sent again after the restart: an accepted record (a replay) and one new event.
    replay = next(c for c in CASES if c["name"] == "valid_key.revoked")
    fresh = next(c for c in CASES if c["name"] == "after_refusals")
    newer = dict(fresh, name="newer")  # same bytes: already applied, so also a replay
    await produce_cases(controller_kafka, topic, [replay, newer])
    async with run_go_consumer(go_consumer, *args) as go:
        lines = await go.wait_lines(2)
    got = [json.loads(line) for line in lines]
    assert [(g["verdict"], g.get("reason")) for g in got] == [("reject", "replayed")] * 2
    end = max(o for p, o in positions if p == 0)
    assert [g["offset"] for g in got] == [end + 1, end + 2]

    # The Python Subscriber resumes from the Go consumer's state file alike: nothing new.
    caplog.clear()
    python = await python_verdicts(
        reader_kafka, topic, positions, caplog, offsets=FileOffsetStore(state)
    )
    assert python == {}


def test_go_sources_are_gofmt_clean(go_consumer: Path) -> None:
    gofmt = Path(shutil.which("go") or "go").with_name("gofmt")
    result = subprocess.run(
        [str(gofmt), "-l", "."], cwd=MODULE, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "", f"run gofmt -w on: {result.stdout}"


# -- random near misses of valid data: both sides must agree on every one -------------------

_POOL: list[Any] = [
    None, True, False, 0, -1, 1, 7, 1.5, 30.0, 2**63, "", "x", "X", "a/b", "db-7", "db-7\n",
    "Active", "keyCompromise", "sha256:" + "0" * 64, "/etc/{name}", "/etc/{nope}", "/a/../b",
    "root", "Root", "keyring-json", "raw", "é" * 130, [], [""], ["a"], [5], {}, {"env": "prod"},
    {"Env": "prod"}, {"argv": ["x"]}, {"argv": []}, 0o640, 0o644, 0o777, 0o700, 600.0, 600.5,
    0.0, -0.0, 1e-300, 0.1, {"argv": ["x"], "timeout_s": 600}, {"argv": ["x"], "timeout_s": 0},
]  # fmt: skip


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(data: Any, rng: random.Random) -> Any:
    data = copy.deepcopy(data)
    paths = _paths(data)
    if not paths:
        return rng.choice(_POOL)
    path = rng.choice(paths)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    op = rng.random()
    if op < 0.15 and isinstance(parent, dict):
        del parent[last]
    elif op < 0.25 and isinstance(parent, dict):
        parent[rng.choice(["extra", "material", "Key", "version "])] = rng.choice(_POOL)
    else:
        parent[last] = rng.choice(_POOL)
    return data


def test_go_and_python_agree_on_random_near_misses_of_valid_data(
    go_consumer: Path, tmp_path: Path
) -> None:
    from tests.support import consumer_vectors as cv

    rng = random.Random(20)
    cases = []
    for seq in range(1, 601):
        etype = rng.choice(list(cv.DATA))
        value = cv.raw_envelope(cv.envelope(etype, seq, _mutate(cv.DATA[etype], rng)))
        headers = cv.signed(value)
        cases.append({"name": f"m{seq}", "partition": 0, "value_hex": value.hex(),
                      "headers": [[n, h.hex()] for n, h in headers]})  # fmt: skip
    path = tmp_path / "mutations.json"
    path.write_text(json.dumps({"trusted": VECTORS["trusted"], "cases": cases}))
    result = subprocess.run(
        [str(go_consumer), "-vectors", str(path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    go = [(g["verdict"], g["reason"]) for g in map(json.loads, result.stdout.splitlines())]
    trust = {t["kid"]: bytes.fromhex(t["public_hex"]) for t in VECTORS["trusted"]}
    python = []
    for case in cases:
        headers = [(n, bytes.fromhex(h)) for n, h in case["headers"]]
        try:
            verify_message(bytes.fromhex(case["value_hex"]), headers, trust)
            python.append(("accept", None))
        except MessageRejected as exc:
            python.append(("reject", exc.reason))
    differ = [(c["name"], bytes.fromhex(c["value_hex"])[:300], g, p)
              for c, g, p in zip(cases, go, python, strict=True) if g != p]  # fmt: skip
    assert not differ, differ[:3]
    # The mutations reach both verdicts, so the comparison means something.
    assert {v for v, _ in python} == {"accept", "reject"}


def test_go_and_python_agree_on_long_integers_and_deep_nesting(go_consumer: Path) -> None:
    values = [b"1" * 4300, b"1" * 4301, b"-" + b"9" * 4300, b"[" * 32 + b"]" * 32,
              b"[" * 33 + b"]" * 33, b'{"a":' * 32 + b"1" + b"}" * 32]  # fmt: skip
    assert _go_canonical(go_consumer, values) == [_python_canonical(v) for v in values]
    assert [_python_canonical(v) for v in values] == [True, False, True, True, False, True]


def test_go_test_passes(go_consumer: Path) -> None:
    """The example's own `go test` (the vectors, Python's float spelling, key ids) and vet."""
    go = shutil.which("go")
    assert go is not None
    result = subprocess.run(
        [go, "test", "-count=1", "./..."],
        cwd=MODULE, env=go_env(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
