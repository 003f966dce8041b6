"""Secure aggregation: the coordinator learns the sum of the holders' vectors and nothing else.

Each holder encodes its vector in fixed point in the ring of integers modulo 2^64 and adds one
pairwise mask per other holder: holder i adds ``m_ij`` for every j > i and subtracts ``m_ji`` for
every j < i, so the masks cancel in the sum and each masked vector alone is uniformly distributed
whatever its content (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, without the dropout recovery: here every holder answers every round or the
run stops). The mask of a pair and a round is the keystream of ChaCha20 under a key both holders of
the pair derive from an X25519 key agreement, expanded with HKDF-SHA256 (all from ``cryptography``);
the coordinator only relays public keys and receives masked vectors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lpm_llm.distributed.group import Group

__all__ = ["FixedPoint", "PairwiseMasks", "SecureSum"]

_INFO = b"lpm_llm secure sum v1"


class FixedPoint:
    """Real numbers as integers modulo 2^64: ``round(x * 2^frac_bits)`` in two's complement.

    Sums of encodings decode to the sum of the values as long as every partial sum stays within
    +-2^(63 - frac_bits); :meth:`encode` refuses values whose magnitude could break that for
    ``parties`` summands.
    """

    def __init__(self, frac_bits: int = 32, parties: int = 1):
        if not 8 <= frac_bits <= 48:
            raise ValueError(f"frac_bits must be in 8..48, got {frac_bits}")
        self.frac_bits = frac_bits
        self.limit = 2.0 ** (62 - frac_bits) / max(parties, 1)

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)):
            raise ValueError("secure sum: a value is not finite")
        if np.any(np.abs(x) > self.limit):
            raise ValueError(f"secure sum: |value| {np.abs(x).max():.3g} exceeds the fixed-point range "
                             f"{self.limit:.3g}; lower privacy.frac_bits")
        return np.round(x * 2.0**self.frac_bits).astype(np.int64).view(np.uint64)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**self.frac_bits


class PairwiseMasks:
    """One holder's side of the pairwise masks: its X25519 key pair and the keys it shares."""

    def __init__(self, rank: int):
        self.rank = rank
        self._private = X25519PrivateKey.generate()
        self._shared: dict[int, bytes] = {}

    @property
    def public_bytes(self) -> bytes:
        return self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def agree(self, public: Sequence[bytes]) -> None:
        """Derive the key shared with every other holder from their public keys (index = rank)."""
        for j, pub in enumerate(public):
            if j == self.rank:
                continue
            secret = self._private.exchange(X25519PublicKey.from_public_bytes(pub))
            lo, hi = min(self.rank, j), max(self.rank, j)
            self._shared[j] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                   info=_INFO + f" pair {lo} {hi}".encode()).derive(secret)

    def shared_key(self, other: int) -> bytes:
        return self._shared[other]

    def mask(self, n: int, round_: int) -> np.ndarray:
        """(n,) uint64: the sum of this holder's signed pairwise masks for round ``round_``."""
        if len(self._shared) == 0:
            return np.zeros(n, dtype=np.uint64)
        total = np.zeros(n, dtype=np.uint64)
        for j, key in self._shared.items():
            # cryptography's ChaCha20 takes the block counter and the nonce as 16 bytes, the counter
            # first: the counter starts at 0 and the round goes in the last 8 bytes (nonce under either
            # split, 32+96 or 64+64 bits), so no two rounds' keystreams overlap
            nonce = bytes(8) + round_.to_bytes(8, "little")
            stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * n))
            m = np.frombuffer(stream, dtype=np.uint64)
            total = total + m if j > self.rank else total - m  # wraps modulo 2^64
        return total


class SecureSum:
    """Sums of one vector per rank, learned by rank 0 (the coordinator) and sent back to every rank.

    Every rank of ``group`` is a holder. Rank 0 relays the public keys and receives only masked
    vectors (:meth:`message`), whose sum (:meth:`combine`) is the sum of the holders' vectors;
    with ``transcript`` every message it receives is appended to that JSON-lines file. A holder
    that stops answering makes the round fail (the group's timeout), never a wrong sum.

    ``masks``: key pairs already agreed (tests and benchmarks that play every holder in one
    process); by default each rank makes its own and they are exchanged through rank 0.
    """

    def __init__(self, group: Group, *, frac_bits: int = 32, transcript: str | Path | None = None,
                 masks: PairwiseMasks | None = None):
        self.group = group
        self.codec = FixedPoint(frac_bits, parties=group.world)
        self.transcript = Path(transcript) if transcript is not None and group.is_main else None
        self.rounds = 0
        self.bytes_sent = 0  # by this rank, in masked vectors and public keys
        if masks is None:
            masks = PairwiseMasks(group.rank)
            public = group.gather(masks.public_bytes)
            self.bytes_sent += len(masks.public_bytes)
            if group.is_main:
                self._log({"kind": "public_keys", "from_ranks": [p.hex() for p in public]})
            masks.agree(group.broadcast(public))
        self.masks = masks

    def message(self, x: np.ndarray) -> np.ndarray:
        """What this holder sends for ``x`` in the current round: its encoding plus its masks."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return self.codec.encode(x) + self.masks.mask(x.size, self.rounds)

    def combine(self, received: list[np.ndarray]) -> np.ndarray:
        """The coordinator's sum of every holder's message: the masks cancel."""
        total = np.zeros(received[0].size, dtype=np.uint64)
        for m in received:
            total = total + m
        return self.codec.decode(total)

    def __call__(self, x: np.ndarray, what: str = "") -> np.ndarray:
        """The sum over ranks of ``x`` ((n,) float64, the same n on every rank), on every rank."""
        masked = self.message(x)
        self.bytes_sent += masked.nbytes
        received = self.group.gather(masked)
        total = None
        if self.group.is_main:
            total = self.combine(received)
            self._log({"kind": "masked", "round": self.rounds, "what": what,
                       "from_ranks": [[int(v) for v in m] for m in received], "sum": total.tolist()})
        self.rounds += 1
        return np.asarray(self.group.broadcast(total), dtype=np.float64)

    def _log(self, record: dict[str, Any]) -> None:
        if self.transcript is not None:
            with self.transcript.open("a") as f:
                f.write(json.dumps(record) + "\n")
