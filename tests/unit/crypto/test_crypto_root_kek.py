"""The root KEK: check value, SLIP-39 shares and the passphrase wrap."""

from __future__ import annotations

import copy
import itertools

import pytest

from ckms.crypto import (
    combine_shares,
    kek_check_value,
    new_root_kek,
    split_root_kek,
    unwrap_root_kek_with_passphrase,
    wrap_root_kek_with_passphrase,
)
from ckms.errors import ConfigError, CryptoError, UnsealError

FAST_N = 2**10  # scrypt cost for tests; production default is 2**15


@pytest.fixture(scope="module")
def kek() -> bytes:
    return new_root_kek()


@pytest.fixture(scope="module")
def shares(kek: bytes) -> list[str]:
    return split_root_kek(kek, 3, 5)


def test_root_kek_is_256_random_bits() -> None:
    a, b = new_root_kek(), new_root_kek()
    assert len(a) == len(b) == 32 and a != b


def test_check_value_tells_keks_apart_and_hides_the_kek(kek: bytes) -> None:
    value = kek_check_value(kek)
    assert value == kek_check_value(kek)
    assert value != kek_check_value(new_root_kek())
    assert len(value) == 64 and int(value, 16) >= 0
    assert kek.hex() not in value


@pytest.mark.parametrize("bad", [b"", bytes(31), bytes(33), "x" * 32])
def test_check_value_refuses_a_wrong_size_kek(bad: object) -> None:
    with pytest.raises((CryptoError, ConfigError)):
        kek_check_value(bad)  # type: ignore[arg-type]


def test_split_gives_count_distinct_mnemonics(shares: list[str]) -> None:
    assert len(shares) == 5 and len(set(shares)) == 5
    assert all(len(s.split()) == 33 for s in shares)  # SLIP-39 length for a 256-bit secret


def test_every_threshold_subset_recovers_the_kek(kek: bytes, shares: list[str]) -> None:
    for subset in itertools.combinations(shares, 3):
        assert combine_shares(list(subset)) == kek
    # Order does not matter, and more than the threshold is fine.
    assert combine_shares(list(reversed(shares))) == kek


def test_threshold_minus_one_is_refused_saying_how_many_more(shares: list[str]) -> None:
    with pytest.raises(UnsealError, match=r"^1 more share needed \(2 of 3 given\)$"):
        combine_shares(shares[:2])
    with pytest.raises(UnsealError, match=r"^2 more shares needed \(1 of 3 given\)$"):
        combine_shares(shares[:1])


def test_a_repeated_share_is_refused_and_does_not_count(shares: list[str]) -> None:
    with pytest.raises(UnsealError, match="given twice"):
        combine_shares([shares[0], shares[1], shares[0]])
    # Same share typed differently (case, spacing) is still the same custodian.
    retyped = "  ".join(shares[1].upper().split())
    with pytest.raises(UnsealError, match="given twice"):
        combine_shares([shares[0], shares[1], retyped])


def test_a_share_from_another_split_is_refused(kek: bytes, shares: list[str]) -> None:
    stranger = split_root_kek(new_root_kek(), 3, 5)[2]
    # A 15-bit SLIP-39 id can collide (1 in 32768); then the digest check or the repeat check
    # still refuses the set, so accept any of the three refusals.
    with pytest.raises(UnsealError, match=r"different split|do not reconstruct|given twice"):
        combine_shares([shares[0], shares[1], stranger])
    same_kek_other_split = split_root_kek(kek, 3, 5)[4]
    with pytest.raises(UnsealError, match=r"different split|do not reconstruct|given twice"):
        combine_shares([shares[0], shares[1], same_kek_other_split])


@pytest.mark.parametrize(
    "bad",
    [
        "not a mnemonic at all",
        "",
        None,
    ],
)
def test_invalid_mnemonics_are_refused(shares: list[str], bad: object) -> None:
    with pytest.raises(UnsealError, match="share 2"):
        combine_shares([shares[0], bad, shares[1]])  # type: ignore[list-item]


def test_a_corrupted_word_is_refused_without_echoing_it(shares: list[str]) -> None:
    words = shares[1].split()
    words[10] = "academic" if words[10] != "academic" else "acid"
    with pytest.raises(UnsealError) as info:
        combine_shares([shares[0], " ".join(words), shares[2]])
    message = str(info.value)
    assert "share 2" in message
    # SLIP-39 words are random per share and include ordinary English ("valid", "academic"):
    # only the message's own fixed wording may coincide with one of them.
    template = {"share", "2", "is", "not", "a", "valid", "SLIP-39", "mnemonic"}
    assert not (set(message.split()) & set(shares[1].split())) - template
    assert "academic" not in message and "acid" not in message


def test_no_shares_and_a_bare_string_are_refused(shares: list[str]) -> None:
    with pytest.raises(UnsealError):
        combine_shares([])
    with pytest.raises(UnsealError):
        combine_shares(shares[0])


@pytest.mark.parametrize(
    ("threshold", "count"),
    [(1, 1), (1, 3), (0, 2), (3, 2), (2, 17), (17, 17), (True, 3), (2, 3.0)],
)
def test_split_refuses_bad_thresholds(kek: bytes, threshold: object, count: object) -> None:
    with pytest.raises(ConfigError):
        split_root_kek(kek, threshold, count)  # type: ignore[arg-type]


@pytest.mark.parametrize(("threshold", "count"), [(2, 2), (16, 16), (2, 16)])
def test_split_accepts_the_edges(kek: bytes, threshold: int, count: int) -> None:
    shares = split_root_kek(kek, threshold, count)
    assert len(shares) == count
    assert combine_shares(shares[-threshold:]) == kek


def test_passphrase_wrap_round_trips_and_has_the_documented_shape(kek: bytes) -> None:
    blob = wrap_root_kek_with_passphrase(kek, "correct horse battery staple", n=FAST_N)
    assert set(blob) == {"v", "kdf", "n", "r", "p", "salt", "nonce", "ct"}
    assert (blob["v"], blob["kdf"], blob["n"], blob["r"], blob["p"]) == (1, "scrypt", FAST_N, 8, 1)
    assert unwrap_root_kek_with_passphrase(blob, "correct horse battery staple") == kek
    assert kek.hex() not in repr(blob)


def test_default_scrypt_cost_is_2_to_the_15(kek: bytes) -> None:
    blob = wrap_root_kek_with_passphrase(kek, "pw")
    assert blob["n"] == 2**15
    assert unwrap_root_kek_with_passphrase(blob, "pw") == kek


def test_passphrase_is_nfc_normalised(kek: bytes) -> None:
    blob = wrap_root_kek_with_passphrase(kek, "caf\u00e9", n=FAST_N)
    assert unwrap_root_kek_with_passphrase(blob, "cafe\u0301") == kek


def _tampered(blob: dict[str, object]) -> list[dict[str, object]]:
    variants: list[dict[str, object]] = []
    for field, value in [
        ("v", 2),
        ("kdf", "pbkdf2"),
        ("n", 2**11),
        ("n", 2**30),
        ("n", 1000),
        ("r", 1),
        ("p", 2),
        ("salt", "AAAAAAAAAAAAAAAAAAAAAA=="),
        ("salt", "!!"),
        ("nonce", "AAAAAAAAAAAAAAAA"),
        ("ct", "AAAA"),
    ]:
        changed = copy.deepcopy(blob)
        changed[field] = value
        variants.append(changed)
    for field in blob:
        missing = copy.deepcopy(blob)
        del missing[field]
        variants.append(missing)
    return variants


def test_every_unwrap_failure_looks_the_same(kek: bytes) -> None:
    blob = wrap_root_kek_with_passphrase(kek, "right", n=FAST_N)
    messages = set()
    for passphrase, candidate in [
        ("wrong", blob),
        ("", blob),
        ("Right", blob),
        *(("right", t) for t in _tampered(blob)),
        ("right", "not a dict"),
    ]:
        with pytest.raises(UnsealError) as info:
            unwrap_root_kek_with_passphrase(candidate, passphrase)  # type: ignore[arg-type]
        messages.add(str(info.value))
    assert messages == {"passphrase did not unlock the root KEK"}


def test_wrap_refuses_empty_passphrase_and_bad_cost(kek: bytes) -> None:
    with pytest.raises(ConfigError):
        wrap_root_kek_with_passphrase(kek, "")
    for n in (1000, 2**9, 2**19, True):
        with pytest.raises(ConfigError):
            wrap_root_kek_with_passphrase(kek, "pw", n=n)
