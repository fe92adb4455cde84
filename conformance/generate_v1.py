#!/usr/bin/env python3
"""Writes the effects-v1 golden vectors (conformance/v1) from a second, independent implementation.

This script shares no code with crates/tartarus-effects: its DAG-CBOR encoder is the thirty lines below,
Ed25519 is `cryptography`'s (OpenSSL), BLAKE3 is the `blake3` package. The Rust runner
(`tartarus_effects::run_conformance`) must agree with every vector, so the vectors check the Rust crate
against the spec (docs/spec/effects-v1.md), not against itself.

The vectors are golden: once published, a vector's bytes never change. Rerunning this script must leave
`git status` clean; a diff means the format changed, which needs effects-v2 (spec §8).

Usage: python3 -m venv --system-site-packages /tmp/venv && /tmp/venv/bin/pip install blake3
       /tmp/venv/bin/python conformance/generate_v1.py
"""

import base64
import json
import os
import shutil
import struct
import sys

import blake3
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "v1")
DOMAIN = "tartarus-effects/v1/envelope"


class Link:
    """An IPLD link (CBOR tag 42) to a CID given as binary."""

    def __init__(self, cid_bytes):
        self.cid_bytes = cid_bytes


def head(major, n):
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt, limit in ((24, ">B", 1 << 8), (25, ">H", 1 << 16), (26, ">I", 1 << 32), (27, ">Q", 1 << 64)):
        if n < limit:
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError("integer out of range")


def enc(v):
    """Deterministic DAG-CBOR (spec §2)."""
    if v is None:
        return b"\xf6"
    if v is True:
        return b"\xf5"
    if v is False:
        return b"\xf4"
    if isinstance(v, int):
        return head(0, v) if v >= 0 else head(1, -1 - v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return head(3, len(b)) + b
    if isinstance(v, (bytes, bytearray)):
        return head(2, len(v)) + bytes(v)
    if isinstance(v, list):
        return head(4, len(v)) + b"".join(enc(x) for x in v)
    if isinstance(v, dict):
        keys = sorted(v, key=lambda k: (len(k.encode("utf-8")), k.encode("utf-8")))
        return head(5, len(v)) + b"".join(enc(k) + enc(v[k]) for k in keys)
    if isinstance(v, Link):
        return b"\xd8\x2a" + enc(b"\x00" + v.cid_bytes)
    raise TypeError(f"no effects-v1 encoding for {type(v).__name__}")


def cid_bytes(codec, content):
    return bytes([0x01, codec, 0x1E, 0x20]) + blake3.blake3(content).digest()


def cid_text(raw):
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def obj_cid(content):
    return cid_text(cid_bytes(0x71, content))


def blob_cid(content):
    return cid_text(cid_bytes(0x55, content))


def kid_of(public):
    return blake3.blake3(public).hexdigest()[:16]


def keypair(seed):
    private = Ed25519PrivateKey.from_private_bytes(seed)
    return private, kid_of(private.public_key().public_bytes_raw())


def signing_input(version, kid, payload):
    return enc({"kid": kid, "domain": DOMAIN, "payload": payload, "version": version})


def envelope(version, kid, payload, signature):
    return enc({"kid": kid, "payload": payload, "version": version, "signature": signature})


vectors = {}


def add(name, **fields):
    assert name not in vectors, name
    vectors[name] = fields


SEED_A = bytes(range(32))
SEED_B = bytes([0xB0 + i % 16 for i in range(32)])
# RFC 8032 section 7.1, test 1.
SEED_RFC = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")

# --- objects (JSON inputs) --------------------------------------------------------------------------------
EFFECT = {
    "sandbox": "sb-01",
    "argv": ["/bin/echo", "hi"],
    "exit_code": 0,
    "wall_ms": 1234,
    "peak_memory_bytes": 10485760,
}
objects = {
    "empty-map": ("the empty map", {}),
    "unsigned-integer-widths": (
        "unsigned integers at every width boundary take their shortest form",
        [0, 23, 24, 255, 256, 65535, 65536, 4294967295, 4294967296, 18446744073709551615],
    ),
    "negative-integer-widths": (
        "negative integers at width boundaries take their shortest form",
        [-1, -24, -25, -256, -257, -65536, -65537, -9223372036854775808],
    ),
    "key-order-length-first": (
        "map keys sort by encoded length first, then bytewise",
        {"b": 1, "aa": 2, "a": 3, "ab": 4, "": 5, "ba": 6},
    ),
    "key-order-utf8-bytes": (
        "key length and order are by UTF-8 bytes, not characters: \"zz\" (7a7a) before \"é\" (c3a9)",
        {"é": 1, "zz": 2, "z": 3},
    ),
    "nested-and-unicode": (
        "nested maps and lists, booleans, null and non-ASCII text",
        {"name": "ünïcödé ✓", "nested": {"list": [True, False, None], "empty": []}},
    ),
    "length-widths": (
        "string and list lengths of 24 and 256 take one- and two-byte heads",
        {"s24": "x" * 24, "s256": "y" * 256, "l24": list(range(24))},
    ),
    "effect-like": ("an object shaped like an effect record", EFFECT),
}
for name, (description, value) in objects.items():
    data = enc(value)
    add(f"object/{name}", kind="object", description=description, input=value, canonical_hex=data.hex(),
        cid=obj_cid(data))

# --- canonical bytes with byte strings and links ----------------------------------------------------------
hello_blob = cid_bytes(0x55, b"hello")
for name, description, value in [
    ("byte-strings", "byte strings, empty and not", {"blob": b"\x00\x01\x02", "empty": b""}),
    ("link", "an IPLD link (tag 42, multibase-identity prefix 00) to the raw id of \"hello\"",
     {"input": Link(hello_blob), "size": 5}),
]:
    data = enc(value)
    add(f"canonical/{name}", kind="canonical", description=description, hex=data.hex(), cid=obj_cid(data))

# --- blobs --------------------------------------------------------------------------------------------------
for name, description, content in [
    ("empty", "the empty blob", b""),
    ("hello-world", "the blob \"hello world\"", b"hello world"),
    ("two-chunks", "1025 bytes (i mod 251), past BLAKE3's first 1024-byte chunk", bytes(i % 251 for i in range(1025))),
]:
    add(f"blob/{name}", kind="blob", description=description, hex=content.hex(), cid=blob_cid(content))

# --- rejected encodings -------------------------------------------------------------------------------------
effect_bytes = enc(EFFECT)
rejects = [
    ("unsorted-keys", "keys out of order: {\"b\": 1, \"a\": 2}", "a2616201616102", "unsorted_keys"),
    ("bytewise-not-length-first", "keys in plain bytewise order, not length-first: {\"aa\", \"b\"}",
     "a262616101616202", "unsorted_keys"),
    ("duplicate-key", "a key repeated: {\"a\": 1, \"a\": 2}", "a2616101616102", "unsorted_keys"),
    ("non-minimal-uint8", "23 written with a one-byte argument", "1817", "non_minimal"),
    ("non-minimal-uint64", "1 written with an eight-byte argument", "1b0000000000000001", "non_minimal"),
    ("non-minimal-negative", "-24 written with a one-byte argument", "3817", "non_minimal"),
    ("non-minimal-string-length", "\"a\" with a one-byte length", "780161", "non_minimal"),
    ("non-minimal-map-length", "a one-entry map with a one-byte length", "b8016161 01".replace(" ", ""),
     "non_minimal"),
    ("indefinite-array", "an indefinite-length array", "9f01ff", "indefinite_length"),
    ("indefinite-map", "an indefinite-length map", "bf616101ff", "indefinite_length"),
    ("indefinite-string", "an indefinite-length text string", "7f6161ff", "indefinite_length"),
    ("trailing-bytes", "a second item after the first", "0100", "trailing_bytes"),
    ("truncated-half", "the effect-like object cut in half", effect_bytes[: len(effect_bytes) // 2].hex(),
     "truncated"),
    ("truncated-empty", "no bytes at all", "", "truncated"),
    ("float64", "1.5 as f64: DAG-CBOR allows it, effects-v1 does not", "fb3ff8000000000000", "float"),
    ("float32", "1.5 as f32: not even DAG-CBOR", "fa3fc00000", "malformed"),
    ("tag-not-42", "tag 1 (a date): DAG-CBOR has only tag 42", "c100", "malformed"),
    ("undefined", "the simple value undefined", "f7", "malformed"),
    ("integer-key", "a map keyed by an integer", "a10101", "malformed"),
    ("invalid-utf8", "a text string that is not UTF-8", "62c328", "malformed"),
]
for name, description, data, error in rejects:
    add(f"reject/{name}", kind="reject", description=description, hex=data, error=error)
add("reject/float-input", kind="reject", description="a JSON input with a float must not encode",
    input={"ratio": 0.5}, error="float")

# --- CID text -------------------------------------------------------------------------------------------------
some = b"effects"
good = {
    "dag-cbor": ("an object id", cid_bytes(0x71, some)),
    "raw": ("a blob id", cid_bytes(0x55, some)),
}
for name, (description, raw) in good.items():
    add(f"cid/valid-{name}", kind="cid", description=description, text=cid_text(raw), codec=name,
        digest_hex=raw[4:].hex())
raw = cid_bytes(0x55, some)
bad_cids = [
    ("uppercase", "base32 upper (multibase B) is not the canonical spelling", "B" + cid_text(raw)[1:].upper()),
    ("base58", "base58btc (multibase z) is refused", "z" + "3" * 40),
    ("sha2-256", "a sha2-256 multihash is not blake3",
     cid_text(bytes([0x01, 0x55, 0x12, 0x20]) + bytes(32))),
    ("cidv0", "CIDv0 (base58 Qm…) is refused", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG"),
    ("dag-json-codec", "codec dag-json (0x0129) is neither dag-cbor nor raw",
     cid_text(bytes([0x01, 0xA9, 0x02, 0x1E, 0x20]) + bytes(32))),
    ("short-digest", "a 16-byte blake3 digest", cid_text(bytes([0x01, 0x55, 0x1E, 0x10]) + bytes(16))),
    ("truncated", "the text of a valid id cut short", cid_text(raw)[:40]),
    ("empty", "the empty string", ""),
]
for name, description, text in bad_cids:
    add(f"cid/invalid-{name}", kind="cid", description=description, text=text, error="invalid_cid")

# --- envelopes ------------------------------------------------------------------------------------------------
def add_envelope(name, description, seed, payload):
    private, kid = keypair(seed)
    payload_bytes = enc(payload)
    message = signing_input(1, kid, payload_bytes)
    signature = private.sign(message)
    add(f"envelope/{name}", kind="envelope", description=description, seed_hex=seed.hex(), kid=kid,
        payload=payload, payload_hex=payload_bytes.hex(), payload_cid=obj_cid(payload_bytes),
        signing_input_hex=message.hex(), signature_hex=signature.hex(),
        envelope_hex=envelope(1, kid, payload_bytes, signature).hex())


add_envelope("effect", "an effect-like object signed with seed 00..1f", SEED_A, EFFECT)
add_envelope("nested", "a nested object with non-ASCII text", SEED_A, objects["nested-and-unicode"][1])
add_envelope("rfc8032-key-empty-map", "the empty map signed with RFC 8032's first test key", SEED_RFC, {})


def add_envelope_reject(name, description, verifier_seed, data, error):
    add(f"envelope-reject/{name}", kind="envelope_reject", description=description,
        verifier_seed_hex=verifier_seed.hex(), envelope_hex=data.hex(), error=error)


private_a, kid_a = keypair(SEED_A)
_, kid_b = keypair(SEED_B)
payload = enc(EFFECT)
signature = private_a.sign(signing_input(1, kid_a, payload))
flipped = bytes([signature[0] ^ 1]) + signature[1:]
add_envelope_reject("tampered-signature", "one bit of the signature flipped", SEED_A,
                    envelope(1, kid_a, payload, flipped), "bad_signature")
other = enc(dict(EFFECT, exit_code=1))
add_envelope_reject("tampered-payload", "the payload replaced by another canonical object", SEED_A,
                    envelope(1, kid_a, other, signature), "bad_signature")
add_envelope_reject("unknown-kid", "signed by key A, verified by a holder of key B only", SEED_B,
                    envelope(1, kid_a, payload, signature), "unknown_key")
add_envelope_reject("relabelled-kid", "signed by key A but naming key B, verified by a holder of key B",
                    SEED_B, envelope(1, kid_b, payload, signature), "bad_signature")
add_envelope_reject("short-signature", "a 63-byte signature", SEED_A,
                    envelope(1, kid_a, payload, signature[:63]), "bad_signature")
v2 = private_a.sign(signing_input(2, kid_a, payload))
add_envelope_reject("version-2", "version 2, validly signed: a v1 reader refuses it", SEED_A,
                    envelope(2, kid_a, payload, v2), "wrong_version")
unsorted = bytes.fromhex("a2616201616102")
add_envelope_reject("non-canonical-payload", "a validly signed payload with unsorted keys", SEED_A,
                    envelope(1, kid_a, unsorted, private_a.sign(signing_input(1, kid_a, unsorted))),
                    "unsorted_keys")
good_envelope = envelope(1, kid_a, payload, signature)
# Swap the order of "kid" and "payload" entries: same content, non-canonical map.
kid_entry = enc("kid") + enc(kid_a)
payload_entry = enc("payload") + enc(payload)
assert good_envelope.startswith(b"\xa4" + kid_entry + payload_entry)
swapped = b"\xa4" + payload_entry + kid_entry + good_envelope[1 + len(kid_entry) + len(payload_entry):]
add_envelope_reject("non-canonical-envelope", "the envelope's own keys out of order", SEED_A, swapped,
                    "unsorted_keys")
extra = enc({"kid": kid_a, "payload": payload, "version": 1, "signature": signature, "extra": 0})
add_envelope_reject("extra-field", "an envelope with a field v1 does not define", SEED_A, extra, "not_canonical")
add_envelope_reject("truncated", "the envelope without its last byte", SEED_A, good_envelope[:-1], "truncated")


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    for name, fields in sorted(vectors.items()):
        path = os.path.join(OUT, name + ".json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"kind": fields.pop("kind"), **fields}, f, indent=2, ensure_ascii=False)
            f.write("\n")
    print(f"{len(vectors)} vectors in {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
