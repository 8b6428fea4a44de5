"""Secrets stay out of reprs and log records: SecretStr in wire models, the redaction filter,
and asyncssh pinned to WARNING unless SSH debugging is asked for."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from ckms._logging import RedactingFilter, configure_logging, redact
from ckms.crypto import split_root_kek
from ckms.protocol import EnrollRequest
from ckms.protocol import admin as api

TOKEN = "ckms-enroll-" + "Zq9" * 14
SHARE = split_root_kek(bytes(32), 2, 3)[0]


def test_models_that_carry_secrets_never_show_them() -> None:
    unseal = api.UnsealParams(share=SHARE)
    passphrase = api.UnsealParams(passphrase="correct horse battery")
    enroll = EnrollRequest(
        token=TOKEN, identity_key="ssh-ed25519 " + "A" * 68, signing_key="AA", wrapping_key="AA"
    )
    reply = api.HostEnrollReply.model_validate(
        {
            "host": "web-1",
            "labels": {},
            "token": TOKEN,
            "expires_at": "2026-12-01T00:00:00Z",
            "host_key_fingerprint": "SHA256:x",
            "listen": "x:1",
        }
    )
    for model, secret in ((unseal, SHARE), (passphrase, "correct horse"), (enroll, TOKEN)):
        for shown in (repr(model), str(model), f"{model}", repr(model.model_dump())):
            assert secret not in shown
    assert TOKEN not in repr(reply) and TOKEN not in str(reply)
    # What goes on the wire (the request body) is the value itself.
    assert unseal.model_dump(mode="json")["share"] == SHARE
    assert enroll.model_dump(mode="json")["token"] == TOKEN
    assert reply.token.get_secret_value() == TOKEN


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f'unseal {{"share":"{SHARE}"}}', SHARE),
        (f"Command: enroll {{'token': '{TOKEN}'}}", TOKEN),
        (f"token {TOKEN} refused", TOKEN),
        (f"the share is {SHARE} ok", " ".join(SHARE.split()[3:11])),
        ('{"passphrase": "hunter2 hunter2"}', "hunter2"),
    ],
)
def test_redact_removes_tokens_shares_and_secret_fields(text: str, secret: str) -> None:
    assert secret not in redact(text)


def test_redact_leaves_ordinary_text_alone() -> None:
    line = "key payments/db version 3 installed on web-1 in 12 ms (digest sha256:abc)"
    assert redact(line) == line


@pytest.fixture
def isolated_logging() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    levels = {n: logging.getLogger(n).level for n in ("asyncssh", "aiokafka", "aiosqlite")}
    root.handlers = []
    stream = io.StringIO()
    yield stream
    root.handlers = saved[1]
    root.setLevel(saved[0])
    for name, level in levels.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.filters = [f for f in logger.filters if not isinstance(f, RedactingFilter)]


def test_asyncssh_stays_at_warning_unless_ssh_debug(isolated_logging: io.StringIO) -> None:
    configure_logging("DEBUG", stream=isolated_logging)
    assert logging.getLogger("asyncssh").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("aiokafka").getEffectiveLevel() == logging.DEBUG
    configure_logging("DEBUG", ssh_debug=True, stream=isolated_logging)
    assert logging.getLogger("asyncssh").getEffectiveLevel() == logging.DEBUG
    configure_logging("INFO", ssh_debug=True, stream=isolated_logging)
    assert logging.getLogger("asyncssh").getEffectiveLevel() == logging.WARNING


def test_aiosqlite_never_logs_its_statements(isolated_logging: io.StringIO) -> None:
    """Its DEBUG lines carry every SQL parameter (sealed material, request parameters)."""
    configure_logging("DEBUG", ssh_debug=True, stream=isolated_logging)
    assert logging.getLogger("aiosqlite").getEffectiveLevel() == logging.WARNING


def test_the_filter_scrubs_records_and_exceptions(
    isolated_logging: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    configure_logging("DEBUG", ssh_debug=True, stream=isolated_logging)
    for handler in logging.getLogger().handlers:  # pytest's capture handler, like any other
        handler.addFilter(RedactingFilter())
    logging.getLogger("asyncssh").info("  Command: unseal %s", f'{{"share":"{SHARE}"}}')
    logging.getLogger("ckms.test").warning("enroll with %s", TOKEN)
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        logging.getLogger("ckms.test").exception("failed")
    text = caplog.text + isolated_logging.getvalue()
    assert "Command: unseal" in text and "failed (ValueError" in text
    assert TOKEN not in text and " ".join(SHARE.split()[:4]) not in text


def test_a_validation_error_or_a_chained_cause_shows_no_secret(
    isolated_logging: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    """pydantic's error text carries ``input_value`` even for SecretStr fields."""
    from pydantic import BaseModel, SecretStr, ValidationError, field_validator

    class Shares(BaseModel):
        passphrase: SecretStr

        @field_validator("passphrase")
        @classmethod
        def _long(cls, value: SecretStr) -> SecretStr:
            raise ValueError("too short")

    secret = "hunter2-" + "q" * 12
    configure_logging("DEBUG", stream=isolated_logging)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    log = logging.getLogger("ckms.test")
    try:
        Shares(passphrase=secret)  # type: ignore[arg-type]
    except ValidationError:
        log.exception("refused")
    try:
        try:
            Shares.model_validate({"passphrase": secret})
        except ValidationError as exc:
            raise RuntimeError("could not unseal") from exc
    except RuntimeError:
        log.exception("unseal failed")
    text = caplog.text + isolated_logging.getvalue()
    assert "refused" in text and "unseal failed" in text
    assert secret not in text
