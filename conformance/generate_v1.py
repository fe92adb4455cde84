#!/usr/bin/env python3
"""Writes the effects-v1 golden vectors (conformance/v1) from a second, independent implementation.

This script shares no code with crates/tartarus-effects: its DAG-CBOR encoder is the thirty lines below,
Ed25519 is `cryptography`'s (OpenSSL), BLAKE3 is the `blake3` package; receipts, episode bundles (CARv1)
and dataset manifests (query checks, filter, seeded sampling, stratification) are written from the spec
(§10–§13) below. The Rust runner
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


# --- receipts (spec §10) --------------------------------------------------------------------------------------
RECEIPT_FORMAT = "tartarus-effects/v1/receipt"
SEED_SERVER = bytes(range(0x20, 0x40))
SEED_EVALUATOR = bytes(range(0x40, 0x60))


def sign_envelope(seed, payload_bytes, version=1):
    private, kid = keypair(seed)
    return envelope(version, kid, payload_bytes, private.sign(signing_input(version, kid, payload_bytes)))


def receipt_object(request, response, **overrides):
    """A receipt as (CBOR value, JSON value): hashes are links in the first, CID text in the second."""
    fields = {
        "format": RECEIPT_FORMAT,
        "tool": "charge",
        "request_hash": cid_bytes(0x55, request),
        "response_hash": None if response is None else cid_bytes(0x55, response),
        "idempotency_key": None,
        "sandbox": "sb-0001",
        "tenant": "team-a",
        "started_at": 1700000000100,
        "finished_at": 1700000000150,
        "status": "ok",
        "code": 200,
    }
    fields.update(overrides)
    as_cbor = {k: Link(v) if isinstance(v, bytes) else v for k, v in fields.items()}
    as_json = {k: cid_text(v) if isinstance(v, bytes) else v for k, v in fields.items()}
    return as_cbor, as_json


REQUEST = b'{"amount":100,"currency":"eur"}'
RESPONSE = b'{"id":"ch_1","status":"succeeded"}'
for name, description, request, response, overrides in [
    ("ok", "a successful call with an idempotency key", REQUEST, RESPONSE, {"idempotency_key": "order-7"}),
    ("failed", "a call the tool answered with HTTP 502", REQUEST, b"bad gateway", {"status": "failed", "code": 502}),
    ("error", "a call that got no answer: no response hash, no code", b"", None,
     {"status": "error", "code": None, "tool": "search", "started_at": 0, "finished_at": 0}),
    ("with-nonce", "a call with the optional per-call nonce (§10.1)", REQUEST, RESPONSE,
     {"nonce": "0123456789abcdef0123456789abcdef"}),
]:
    as_cbor, as_json = receipt_object(request, response, **overrides)
    data = sign_envelope(SEED_SERVER, enc(as_cbor))
    add(f"receipt/{name}", kind="receipt", description=description, seed_hex=SEED_SERVER.hex(), receipt=as_json,
        request_hex=request.hex(), response_hex=None if response is None else response.hex(),
        envelope_hex=data.hex(), receipt_cid=obj_cid(data))


def add_receipt_reject(name, description, data, error, verifier=SEED_SERVER, request=None, response=None):
    add(f"receipt-reject/{name}", kind="receipt_reject", description=description, verifier_seed_hex=verifier.hex(),
        envelope_hex=data.hex(), request_hex=None if request is None else request.hex(),
        response_hex=None if response is None else response.hex(), error=error)


good_receipt = sign_envelope(SEED_SERVER, enc(receipt_object(REQUEST, RESPONSE)[0]))
add_receipt_reject("request-mismatch", "request bytes other than the ones the receipt names", good_receipt,
                   "hash_mismatch", request=REQUEST + b" ")
add_receipt_reject("response-mismatch", "response bytes other than the ones the receipt names", good_receipt,
                   "hash_mismatch", request=REQUEST, response=b"{}")
error_receipt = sign_envelope(SEED_SERVER, enc(receipt_object(
    b"", None, status="error", code=None)[0]))
add_receipt_reject("response-without-answer", "response bytes for a receipt that records no answer",
                   error_receipt, "hash_mismatch", response=b"")
add_receipt_reject("unknown-key", "a receipt signed by a key the verifier does not hold", good_receipt,
                   "unknown_key", verifier=SEED_A)
private_s, kid_s = keypair(SEED_SERVER)
receipt_payload = enc(receipt_object(REQUEST, RESPONSE)[0])
receipt_signature = private_s.sign(signing_input(1, kid_s, receipt_payload))
add_receipt_reject("tampered-payload", "status changed to failed after signing", envelope(
    1, kid_s, enc(receipt_object(REQUEST, RESPONSE, status="failed")[0]), receipt_signature), "bad_signature")
for name, description, overrides in [
    ("ok-without-code", "status ok without a code", {"code": None}),
    ("error-with-response", "status error with a response hash", {"status": "error", "code": None}),
    ("unknown-status", "a status other than ok, failed and error", {"status": "maybe"}),
    ("finished-before-started", "finished_at before started_at", {"finished_at": 1700000000099}),
    ("object-request-hash", "a request hash with the dag-cbor codec, not raw",
     {"request_hash": cid_bytes(0x71, REQUEST)}),
    ("format-v2", "the format of another version", {"format": "tartarus-effects/v2/receipt"}),
    ("empty-tool", "an empty tool name", {"tool": ""}),
    ("short-nonce", "a nonce that is not 32 lower-case hex digits", {"nonce": "0123456789ABCDEF"}),
]:
    add_receipt_reject(name, f"validly signed, but {description}",
                       sign_envelope(SEED_SERVER, enc(receipt_object(REQUEST, RESPONSE, **overrides)[0])),
                       "invalid_object")
missing_code = {k: v for k, v in receipt_object(REQUEST, RESPONSE)[0].items() if k != "code"}
add_receipt_reject("absent-optional-field", "validly signed, `code` left out instead of null",
                   sign_envelope(SEED_SERVER, enc(missing_code)), "not_canonical")
add_receipt_reject("null-nonce", "validly signed, the optional `nonce` written as null instead of left out",
                   sign_envelope(SEED_SERVER, enc(receipt_object(REQUEST, RESPONSE, nonce=None)[0])),
                   "not_canonical")

# --- datasets (spec §13) --------------------------------------------------------------------------------------
DATASET_FORMAT = "tartarus-effects/v1/dataset"
FILTER_OPS = ("and", "or", "not", "eq", "ne", "lt", "le", "gt", "ge", "in", "exists")


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 63) <= v < (1 << 63)


def is_value(v):
    return is_int(v) or isinstance(v, (str, bool))


def same_value(a, b):
    return type(a) is type(b) and a == b


def check_filter(f, depth=1):
    """Validates a filter (spec §13.2); raises ValueError on anything the spec refuses."""
    if depth > 64 or not isinstance(f, dict) or len(f) != 1:
        raise ValueError("filter node")
    (op, args), = f.items()
    if op in ("and", "or"):
        if not isinstance(args, list) or not args:
            raise ValueError(op)
        for item in args:
            check_filter(item, depth + 1)
    elif op == "not":
        check_filter(args, depth + 1)
    elif op == "exists":
        if not isinstance(args, str) or not args:
            raise ValueError(op)
    elif op in FILTER_OPS:
        if not isinstance(args, list) or len(args) != 2 or not isinstance(args[0], str) or not args[0]:
            raise ValueError(op)
        value = args[1]
        if op in ("eq", "ne") and not is_value(value):
            raise ValueError(op)
        if op in ("lt", "le", "gt", "ge") and not is_int(value):
            raise ValueError(op)
        if op == "in" and (not isinstance(value, list) or not value or not all(map(is_value, value))):
            raise ValueError(op)
    else:
        raise ValueError(op)


def canonical_query(query):
    """The query with absent (null) parts dropped, after validation."""
    if not isinstance(query, dict) or set(query) - {"filter", "sample", "stratify"}:
        raise ValueError("query")
    out = {k: v for k, v in query.items() if v is not None}
    if "filter" in out:
        check_filter(out["filter"])
    if "sample" in out:
        sample = out["sample"]
        if not isinstance(sample, dict) or set(sample) != {"seed", "size"}:
            raise ValueError("sample")
        for key in ("seed", "size"):
            if not (isinstance(sample[key], int) and not isinstance(sample[key], bool) and 0 <= sample[key] < 1 << 64):
                raise ValueError(key)
        if sample["size"] == 0:
            raise ValueError("size")
    if "stratify" in out and (not isinstance(out["stratify"], str) or not out["stratify"]):
        raise ValueError("stratify")
    return out


def matches(f, fields):
    (op, args), = f.items()
    if op == "and":
        return all(matches(x, fields) for x in args)
    if op == "or":
        return any(matches(x, fields) for x in args)
    if op == "not":
        return not matches(args, fields)
    if op == "exists":
        return args in fields
    field, value = args
    if field not in fields:
        return False
    fact = fields[field]
    if op == "eq":
        return same_value(fact, value)
    if op == "ne":
        return not same_value(fact, value)
    if op == "in":
        return any(same_value(fact, v) for v in value)
    if not is_int(fact):
        return False
    return {"lt": fact < value, "le": fact <= value, "gt": fact > value, "ge": fact >= value}[op]


def stratum(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def largest_remainder(counts, size):
    total = sum(counts)
    shares = [size * c // total for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-(size * counts[i] % total), i))
    for i in order[: size - sum(shares)]:
        shares[i] += 1
    return shares


def build_manifest(query, facts):
    """facts: list of (episode cid bytes, fields). Returns the manifest's canonical bytes (spec §13.3)."""
    query = canonical_query(query)
    ids = [cid for cid, _ in facts]
    assert len(set(ids)) == len(ids)
    matched = [(cid, fields) for cid, fields in facts if "filter" not in query or matches(query["filter"], fields)]
    sample = query.get("sample")

    def key(item):
        cid = item[0]
        if sample is None:
            return (b"", cid)
        return (blake3.blake3(struct.pack("<Q", sample["seed"]) + cid).digest(), cid)

    matched.sort(key=key)
    size = len(matched) if sample is None else min(sample["size"], len(matched))
    strata = {}
    if "stratify" not in query:
        episodes = [cid for cid, _ in matched[:size]]
    else:
        groups = {}
        for cid, fields in matched:
            groups.setdefault(stratum(fields.get(query["stratify"])), []).append(cid)
        names = sorted(groups, key=lambda s: s.encode("utf-8"))
        shares = largest_remainder([len(groups[n]) for n in names], size) if names else []
        episodes = []
        for name, share in zip(names, shares):
            episodes.extend(groups[name][:share])
            strata[name] = share
    manifest = {"format": DATASET_FORMAT, "query": query, "matched": len(matched),
                "episodes": [Link(cid) for cid in episodes], "strata": strata}
    return enc(manifest)


TEMPLATES = ["py"] * 5 + ["r"] * 3 + ["sh"] * 2
dataset_facts = []
for i in range(40):
    fields = {"template": TEMPLATES[i % 10], "tenant": "team-a" if i % 2 == 0 else "team-b",
              "outcome": "timeout" if i % 9 == 4 else "exited", "tool_calls": i % 4, "ok": i % 3 != 0,
              "started_at": 1700000000000 + 1000 * i}
    if i % 7 != 0:
        fields["signal.quality.score"] = i * 97 % 10000
    if i % 5 == 0:
        fields["signal.review.label"] = "pass" if i % 10 == 0 else "fail"
    dataset_facts.append((cid_bytes(0x71, enc(f"episode {i}")), fields))
facts_json = [{"episode": cid_text(cid), "fields": fields} for cid, fields in dataset_facts]

for name, description, query in [
    ("all", "the empty query: every episode, in binary CID order", {}),
    ("filter-and-sample", "a filter and a seeded sample of 5",
     {"filter": {"and": [{"eq": ["tenant", "team-a"]}, {"ge": ["signal.quality.score", 1000]}]},
      "sample": {"seed": 42, "size": 5}}),
    ("another-seed", "the same query with seed 43: another selection",
     {"filter": {"and": [{"eq": ["tenant", "team-a"]}, {"ge": ["signal.quality.score", 1000]}]},
      "sample": {"seed": 43, "size": 5}}),
    ("stratified-largest-remainder", "7 of 40 by template (20:12:8): 3.5, 2.1, 1.4 → 4, 2, 1",
     {"sample": {"seed": 7, "size": 7}, "stratify": "template"}),
    ("stratified-missing-stratum", "no sample (null): every episode with fewer than 2 tool calls, by review "
     "label; episodes without one form the stratum \"\"",
     {"filter": {"lt": ["tool_calls", 2]}, "stratify": "signal.review.label", "sample": None}),
    ("stratified-integer-strata", "integer strata sort by their decimal text",
     {"sample": {"seed": 18446744073709551615, "size": 9}, "stratify": "tool_calls"}),
    ("missing-field-semantics", "ne on a missing field is false, not-eq is true; no coercion between types",
     {"filter": {"or": [{"ne": ["signal.review.label", "pass"]},
                        {"and": [{"not": {"eq": ["signal.quality.score", 0]}}, {"eq": ["ok", True]},
                                 {"in": ["template", ["r", 1, False]]}]}]}}),
    ("operators", "every operator once",
     {"filter": {"and": [{"exists": "started_at"}, {"gt": ["started_at", 1700000004000]},
                         {"le": ["started_at", 1700000030000]}, {"not": {"eq": ["outcome", "timeout"]}},
                         {"or": [{"in": ["template", ["py", "sh"]]}, {"ne": ["ok", True]}]}]},
      "sample": {"seed": 0, "size": 100}, "stratify": "tenant"}),
]:
    data = build_manifest(query, dataset_facts)
    add(f"dataset/{name}", kind="dataset", description=description, query=query, facts=facts_json,
        manifest_hex=data.hex(), manifest_cid=blob_cid(data))

for name, description, query in [
    ("float", "a float where an integer is expected", {"filter": {"ge": ["signal.quality.score", 0.5]}}),
    ("text-bound", "an ordering against text", {"filter": {"lt": ["template", "r"]}}),
    ("unknown-operator", "an operator v1 does not define", {"filter": {"like": ["template", "p%"]}}),
    ("two-operators", "two operators in one node", {"filter": {"eq": ["a", 1], "ne": ["b", 2]}}),
    ("empty-and", "an empty list of filters", {"filter": {"and": []}}),
    ("empty-in", "an empty list of values", {"filter": {"in": ["template", []]}}),
    ("null-value", "null is not a value", {"filter": {"eq": ["template", None]}}),
    ("empty-field", "an empty field name", {"filter": {"exists": ""}}),
    ("size-zero", "a sample of size 0", {"sample": {"seed": 1, "size": 0}}),
    ("negative-seed", "a negative seed", {"sample": {"seed": -1, "size": 1}}),
    ("sample-extra", "a sample with a field v1 does not define", {"sample": {"seed": 1, "size": 1, "rate": 2}}),
    ("unknown-field", "a query field v1 does not define", {"limit": 10}),
    ("not-an-object", "a query that is a list", [{"eq": ["a", 1]}]),
]:
    try:
        canonical_query(query)
    except ValueError:
        pass
    else:
        raise AssertionError(f"dataset-reject/{name} is accepted by the reference implementation")
    add(f"dataset-reject/{name}", kind="dataset_reject", description=description, query=query,
        error="invalid_query")

# --- episode bundles (spec §11, §12) --------------------------------------------------------------------------
TRACE_FORMAT = "tartarus-effects/v1/trace"
EPISODE_FORMAT = "tartarus-effects/v1/episode"
SIGNAL_FORMAT = "tartarus-effects/v1/signal"
EPISODE_KEYS_FORMAT = "tartarus-effects/v1/episode-keys"
SANDBOX = "sb-0001"


def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def car(roots, blocks):
    """CARv1 with these roots and (cid bytes, data) blocks, in order, each once."""
    header = enc({"roots": [Link(r) for r in roots], "version": 1})
    out = varint(len(header)) + header
    seen = set()
    for cid, data in blocks:
        if cid not in seen:
            seen.add(cid)
            out += varint(len(cid) + len(data)) + cid + data
    return out


def public_keys_doc(seed):
    private, kid = keypair(seed)
    public = private.public_key().public_bytes_raw()
    return {"format": "tartarus-effects/v1/public-keys", "current": kid,
            "keys": [{"kid": kid, "algorithm": "ed25519", "public_key": public.hex()}]}


def episode_keys_json(server_seed, evaluators):
    doc = {"format": EPISODE_KEYS_FORMAT, "server": public_keys_doc(server_seed),
           "evaluators": {name: public_keys_doc(seed) for name, seed in sorted(evaluators.items())}}
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def trace_record(seq, at, kind, attrs, sandbox=SANDBOX):
    return enc({"format": TRACE_FORMAT, "seq": seq, "at": at, "kind": kind, "sandbox": sandbox, "attrs": attrs})


class Bundle:
    """The parts of one episode bundle; `car()` lays them out as spec §11.2 says an exporter does."""

    def __init__(self):
        stdout = b"hello\n"
        secret_marker = {"redacted": Link(cid_bytes(0x55, b"ghp_secret"))}
        self.blobs = {cid_bytes(0x55, b): b for b in (stdout, REQUEST, RESPONSE)}
        receipt = sign_envelope(SEED_SERVER, enc(receipt_object(REQUEST, RESPONSE)[0]))
        self.receipts = [receipt]
        self.records = [
            trace_record(0, 1700000000000, "sandbox.start",
                         {"template": "python", "env": {"GITHUB_TOKEN": secret_marker, "LANG": "C.UTF-8"}}),
            trace_record(1, 1700000000050, "exec",
                         {"argv": ["echo", "hello"], "exit_code": 0, "stdout": Link(cid_bytes(0x55, stdout))}),
            trace_record(2, 1700000000150, "tool_call",
                         {"tool": "charge", "receipt": Link(cid_bytes(0x71, receipt))}),
            trace_record(3, 1700000000200, "sandbox.end", {"outcome": "exited", "exit_code": 0}),
        ]
        self.episode_fields = {
            "format": EPISODE_FORMAT, "sandbox": SANDBOX, "tenant": "team-a", "template": "python",
            "started_at": 1700000000000, "finished_at": 1700000000200, "outcome": "exited", "exit_code": 0,
            "trace": [cid_bytes(0x71, r) for r in self.records],
            "receipts": [cid_bytes(0x71, r) for r in self.receipts],
            "blobs": sorted(self.blobs),
        }
        self.server_seed = SEED_SERVER
        self.keys = episode_keys_json(SEED_SERVER, {"reviewer": SEED_EVALUATOR})
        self.include = set(self.blobs)
        self.extra = []
        self.signal_overrides = [{}]

    def episode(self):
        fields = {k: [Link(c) for c in v] if k in ("trace", "receipts", "blobs") else v
                  for k, v in self.episode_fields.items()}
        return sign_envelope(self.server_seed, enc(fields))

    def signals(self, episode_cid):
        out = []
        for overrides in self.signal_overrides:
            overrides = dict(overrides)
            fields = {"format": SIGNAL_FORMAT, "episode": Link(episode_cid), "evaluator": "reviewer",
                      "name": "quality", "score": 8500, "label": "good", "comment": None, "at": 1700000001000}
            seed = overrides.pop("_seed", SEED_EVALUATOR)
            fields.update(overrides)
            out.append(sign_envelope(seed, enc(fields)))
        return out

    def car(self):
        episode = self.episode()
        episode_cid = cid_bytes(0x71, episode)
        signals = self.signals(episode_cid)
        roots = [episode_cid, cid_bytes(0x55, self.keys)] + [cid_bytes(0x71, s) for s in signals]
        blocks = [(episode_cid, episode), (roots[1], self.keys)]
        blocks += [(cid_bytes(0x71, s), s) for s in signals]
        records = {cid_bytes(0x71, r): r for r in self.records}
        receipts = {cid_bytes(0x71, r): r for r in self.receipts}
        blocks += [(c, records[c]) for c in self.episode_fields["trace"] if c in records]
        blocks += [(c, receipts[c]) for c in self.episode_fields["receipts"] if c in receipts]
        blocks += [(c, self.blobs[c]) for c in self.episode_fields["blobs"] if c in self.include]
        return car(roots, blocks + self.extra), episode_cid


def add_episode_car(name, description, bundle, signals):
    data, episode_cid = bundle.car()
    listed = bundle.episode_fields["blobs"]
    add(f"episode-car/{name}", kind="episode_car", description=description, car_hex=data.hex(),
        episode_cid=cid_text(episode_cid), records=len(bundle.records), receipts=len(bundle.receipts),
        signals=signals, blobs_included=len([c for c in listed if c in bundle.include]),
        blobs_missing=[cid_text(c) for c in listed if c not in bundle.include])


add_episode_car("complete", "an episode with four trace records, a receipt, three blobs and a signal",
                Bundle(), 1)
partial = Bundle()
partial.signal_overrides = []
partial.include = {cid_bytes(0x55, b"hello\n")}
add_episode_car("without-blobs-and-signals", "the request and response bodies left out, no signals", partial, 0)


def add_episode_car_reject(name, description, data, error, trusted=None):
    add(f"episode-car-reject/{name}", kind="episode_car_reject", description=description, car_hex=data.hex(),
        trusted_keys=trusted, error=error)


complete, _ = Bundle().car()
flipped_car = complete[:-1] + bytes([complete[-1] ^ 1])
add_episode_car_reject("tampered-blob", "the last byte of the last blob flipped", flipped_car, "hash_mismatch")
add_episode_car_reject("truncated", "the file cut inside its last block", complete[:-3], "invalid_car")
header = enc({"roots": [Link(cid_bytes(0x71, b"x"))], "version": 2})
add_episode_car_reject("car-version-2", "a header of CAR version 2", varint(len(header)) + header, "invalid_car")

smuggled = Bundle()
smuggled.extra = [(cid_bytes(0x71, enc("smuggled")), enc("smuggled"))]
add_episode_car_reject("smuggled-object", "an object the episode does not reference", smuggled.car()[0],
                       "invalid_bundle")
unlisted = Bundle()
unlisted.extra = [(cid_bytes(0x55, b"unlisted"), b"unlisted")]
add_episode_car_reject("unlisted-blob", "a blob the episode does not list", unlisted.car()[0], "invalid_bundle")
missing = Bundle()
missing.records = missing.records[:1] + missing.records[2:]
missing.episode_fields["trace"] = [cid_bytes(0x71, r) for r in Bundle().records]
add_episode_car_reject("missing-trace-record", "trace record 1 listed but absent", missing.car()[0],
                       "invalid_bundle")
swapped = Bundle()
swapped.episode_fields["trace"][0], swapped.episode_fields["trace"][1] = (
    swapped.episode_fields["trace"][1], swapped.episode_fields["trace"][0])
add_episode_car_reject("trace-out-of-order", "the episode lists record 1 before record 0", swapped.car()[0],
                       "invalid_object")
stranger = Bundle()
stranger.records[3] = trace_record(3, 1700000000200, "sandbox.end", {}, sandbox="sb-9999")
stranger.episode_fields["trace"] = [cid_bytes(0x71, r) for r in stranger.records]
add_episode_car_reject("trace-of-another-sandbox", "a trace record of another sandbox", stranger.car()[0],
                       "invalid_object")
foreign = Bundle()
foreign.receipts = [sign_envelope(SEED_SERVER, enc(receipt_object(REQUEST, RESPONSE, tenant="team-b")[0]))]
foreign.episode_fields["receipts"] = [cid_bytes(0x71, r) for r in foreign.receipts]
add_episode_car_reject("receipt-of-another-tenant", "a receipt of another tenant", foreign.car()[0],
                       "invalid_object")
forged = Bundle()
forged.receipts = [sign_envelope(SEED_B, enc(receipt_object(REQUEST, RESPONSE)[0]))]
forged.episode_fields["receipts"] = [cid_bytes(0x71, r) for r in forged.receipts]
add_episode_car_reject("receipt-unknown-key", "a receipt signed by a key that is not the server's", forged.car()[0],
                       "unknown_key")
other_episode = Bundle()
other_episode.signal_overrides = [{"episode": Link(cid_bytes(0x71, b"another episode"))}]
add_episode_car_reject("signal-about-another-episode", "a signal that names another episode",
                       other_episode.car()[0], "invalid_object")
stray = Bundle()
stray.signal_overrides = [{"_seed": SEED_B}]
add_episode_car_reject("signal-unknown-key", "a signal signed by a key no evaluator holds", stray.car()[0],
                       "unknown_key")
impostor = Bundle()
impostor.server_seed = SEED_B
impostor.keys = episode_keys_json(SEED_B, {"reviewer": SEED_EVALUATOR})
impostor.receipts = [sign_envelope(SEED_B, enc(receipt_object(REQUEST, RESPONSE)[0]))]
impostor.episode_fields["receipts"] = [cid_bytes(0x71, r) for r in impostor.receipts]
add_episode_car_reject("untrusted-server", "consistent with its own keys, but signed by a server the verifier "
                       "does not trust", impostor.car()[0], "unknown_key",
                       trusted=json.loads(episode_keys_json(SEED_SERVER, {"reviewer": SEED_EVALUATOR})))
good_episode = Bundle().episode()
add_episode_car_reject("keys-root-not-raw", "the episode given as both roots",
                       car([cid_bytes(0x71, good_episode)] * 2, [(cid_bytes(0x71, good_episode), good_episode)]),
                       "invalid_bundle")


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
