"""The shard tags of docs/cluster-design.md: Redis's slot rule, and evenly spaced slots."""

from __future__ import annotations

from redis.crc import key_slot as redis_key_slot

from service.devtools.shard_tags import key_slot, shard_tags

# The list docs/cluster-design.md gives (python -m service.devtools.shard_tags).
DOC_TAGS = [
    "smj1",
    "segi",
    "s4et",
    "s4a4",
    "s85k",
    "se2c",
    "s4tv",
    "s4p6",
    "sgao",
    "sol7",
    "s6g2",
    "s6cr",
    "sg4e",
    "sv25",
    "s628",
    "s66x",
]


def test_the_slot_rule_is_redis_own():
    for key in ["", "a", "sluice:{batch_1}:lines", "{}x", "x{}y{z}", "{a}{b}", "{{a}}", "héllo"]:
        assert key_slot(key) == redis_key_slot(key.encode()), key


def test_sixteen_tags_evenly_spaced_split_five_six_five_over_three_masters():
    tags = shard_tags(16)
    assert tags == DOC_TAGS
    slots = [key_slot(f"sluice:{{{t}}}:x") for t in tags]
    assert slots == [512 + 1024 * i for i in range(16)]
    # redis-cli --cluster create's ranges for 3 masters.
    ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
    assert [sum(lo <= s <= hi for s in slots) for lo, hi in ranges] == [5, 6, 5]
