"""Hash tags whose Redis Cluster slots are evenly spaced: the shards of docs/cluster-design.md.

Redis Cluster puts a key in slot ``CRC16(tag) mod 16384``, where ``tag`` is the part between the
first ``{`` and the next ``}`` when that part is not empty (else the whole key). N tags whose
slots are N evenly spaced points, the i-th at ``(i + 1/2) * 16384 / N``, spread over any
contiguous split of the slot range (``redis-cli --cluster create`` gives each of M masters one
contiguous range of about 16384 / M slots) as evenly as N and M allow: with 16 tags and 3 masters,
5 / 6 / 5. The tags are the first strings ``<prefix><n in base 36>`` (n = 0, 1, ...) that land
exactly on each point, so the list is the same on every run.

``python -m service.devtools.shard_tags [N] [PREFIX]`` prints them, one ``tag slot`` per line.
"""

from __future__ import annotations

import sys

SLOTS = 16384
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster uses."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str | bytes) -> int:
    """The cluster slot of ``key``, hash tags included (Redis's own rule)."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % SLOTS


def _base36(n: int) -> str:
    out = ""
    while True:
        n, d = divmod(n, 36)
        out = _DIGITS[d] + out
        if n == 0:
            return out


def shard_tags(n: int = 16, prefix: str = "s") -> list[str]:
    """``n`` hash tags (without braces) whose slots are ``(i + 1/2) * 16384 / n``, i = 0 .. n-1."""
    if not 1 <= n <= SLOTS:
        raise ValueError(f"n must be within 1..{SLOTS}")
    targets = {(2 * i + 1) * SLOTS // (2 * n): i for i in range(n)}
    found: dict[int, str] = {}
    candidate = 0
    while len(found) < n:
        tag = prefix + _base36(candidate)
        i = targets.get(key_slot(tag))
        if i is not None and i not in found:
            found[i] = tag
        candidate += 1
    return [found[i] for i in range(n)]


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 16
    prefix = argv[1] if len(argv) > 1 else "s"
    for tag in shard_tags(n, prefix):
        print(tag, key_slot(tag))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
