"""The lower-tier entry format: every way an entry can be wrong is detected, named and never decoded."""
import pytest

from tierlm.kvcache.tiers.codec import CorruptEntry, EntryIdentity, decode_entry, encode_entry

ID = EntryIdentity(model="m@abc/def/fp32", kv_format="fp32", layout="2 layers;data:float32:2x2x4x1x2")
TOKENS = (5, 6, 7, 8)
PAYLOAD = [bytes(range(64)), bytes(range(64, 96))]


def entry() -> bytes:
    return encode_entry(ID, TOKENS, [memoryview(p) for p in PAYLOAD])


def test_round_trip():
    assert bytes(decode_entry(entry(), ID, TOKENS)) == b"".join(PAYLOAD)


@pytest.mark.parametrize("pos", [0, 5, 30, -1, -40])
def test_any_flipped_byte_is_caught(pos):
    buf = bytearray(entry())
    buf[pos] ^= 0x10
    with pytest.raises(CorruptEntry) as e:
        decode_entry(bytes(buf), ID, TOKENS)
    assert e.value.reason in ("checksum", "foreign", "truncated")


@pytest.mark.parametrize("cut", [0, 3, 27, 60, 1])
def test_truncated(cut):
    with pytest.raises(CorruptEntry, match="truncated"):
        decode_entry(entry()[: len(entry()) - cut if cut else 10], ID, TOKENS)


@pytest.mark.parametrize("field,value", [("model", "other@abc/def/fp32"), ("kv_format", "bf16"),
                                         ("layout", "2 layers;data:bfloat16:2x2x4x1x2")])
def test_entry_of_another_model_format_or_layout_is_foreign(field, value):
    other = EntryIdentity(**{**ID.__dict__, field: value})
    with pytest.raises(CorruptEntry, match=f"foreign: {field}"):
        decode_entry(encode_entry(other, TOKENS, PAYLOAD), ID, TOKENS)


def test_other_tokens_are_foreign():
    with pytest.raises(CorruptEntry, match="token ids differ"):
        decode_entry(entry(), ID, (5, 6, 7, 9))


def test_not_an_entry():
    with pytest.raises(CorruptEntry, match="magic"):
        decode_entry(b"GIF89a" + bytes(40), ID, TOKENS)
