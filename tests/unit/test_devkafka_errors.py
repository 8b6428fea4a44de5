"""The launcher fails at once, naming what to install, when Java or Maven is missing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ckms.devkafka import ensure_kafka_jars
from ckms.errors import DependencyMissingError


def test_missing_java_names_the_jdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DependencyMissingError, match=r"Java 17 or newer.*install a JDK"):
        ensure_kafka_jars(tmp_path / "cache")


def test_missing_maven_names_maven(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    java = shutil.which("java")
    if java is None:
        pytest.skip("this machine has no java")
    only_java = tmp_path / "bin"
    only_java.mkdir()
    os.symlink(os.path.realpath(java), only_java / "java")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(only_java))
    with pytest.raises(DependencyMissingError, match=r"Maven.*install Maven"):
        ensure_kafka_jars(tmp_path / "cache")
    assert not (tmp_path / "cache" / "kafka-4.1.1" / "libs").exists()


def test_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: 1 LocalKafka start in 64 failed with "kafka-storage: error: argument
    # --cluster-id/-t: expected one argument" because the id began with '-' (seen in the fault
    # suite). 0xF8 as the first byte encodes to a leading '-' in URL-safe base64.
    import uuid

    from ckms import devkafka

    drawn = iter([uuid.UUID(bytes=b"\xf8" + b"\x01" * 15), uuid.UUID(bytes=b"\x10" * 16)])
    monkeypatch.setattr(devkafka.uuid, "uuid4", lambda: next(drawn))
    cluster_id = devkafka._new_cluster_id()
    assert not cluster_id.startswith("-")
    assert len(cluster_id) == 22
