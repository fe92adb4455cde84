"""Offline verification of receipts (effects-v1 §2 canonical DAG-CBOR, §4 envelopes, §10 receipts).

Only what verification needs: a strict DAG-CBOR decoder, a canonical encoder (to rebuild the signing
input and check that what was decoded re-encodes to the same bytes), Ed25519 via ``cryptography`` and
BLAKE3 CIDs via ``blake3`` (both from the ``verify`` extra).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ._exceptions import ReceiptVerificationError

ENVELOPE_DOMAIN = "tartarus-effects/v1/envelope"
RECEIPT_FORMAT = "tartarus-effects/v1/receipt"
RECEIPT_KEYS = {
    "format", "tool", "request_hash", "response_hash", "idempotency_key", "sandbox", "tenant",
    "started_at", "finished_at", "status", "code",
}  # fmt: skip
NULLABLE = {"response_hash", "idempotency_key", "code"}


@dataclass(frozen=True)
class Link:
    """A CID inside a DAG-CBOR object (tag 42); ``cid`` is its binary form."""

    cid: bytes

    def __str__(self) -> str:
        return cid_text(self.cid)


def _fail(kind: str, msg: str) -> ReceiptVerificationError:
    return ReceiptVerificationError(kind, msg)


# -- DAG-CBOR --------------------------------------------------------------------------------------------


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.i = 0

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.d):
            raise _fail("truncated", "input ends inside an item")
        out = self.d[self.i : self.i + n]
        self.i += n
        return out

    def head(self) -> Tuple[int, int]:
        b = self.take(1)[0]
        major, info = b >> 5, b & 0x1F
        if info < 24:
            return major, info
        if info in (24, 25, 26, 27):
            n = 1 << (info - 24)
            if major == 7:
                raise _fail("float" if info >= 25 else "malformed", "floats and simple values are refused")
            val = int.from_bytes(self.take(n), "big")
            minimum = {1: 24, 2: 0x100, 4: 0x10000, 8: 0x100000000}[n]
            if val < minimum:
                raise _fail("non_minimal", "integer or length not in its shortest form")
            return major, val
        if info == 31:
            raise _fail("indefinite_length", "indefinite lengths are refused")
        raise _fail("malformed", f"reserved additional info {info}")

    def item(self) -> Any:
        major, val = self.head()
        if major == 0:
            return val
        if major == 1:
            return -1 - val
        if major == 2:
            return self.take(val)
        if major == 3:
            try:
                return self.take(val).decode("utf-8")
            except UnicodeDecodeError:
                raise _fail("malformed", "text is not UTF-8") from None
        if major == 4:
            return [self.item() for _ in range(val)]
        if major == 5:
            out: Dict[str, Any] = {}
            prev: Optional[bytes] = None
            for _ in range(val):
                k = self.item()
                if not isinstance(k, str):
                    raise _fail("malformed", "map keys must be text")
                kb = k.encode()
                if prev is not None and (len(kb), kb) <= (len(prev), prev):
                    raise _fail("unsorted_keys", f"map key {k!r} out of order or repeated")
                prev = kb
                out[k] = self.item()
            return out
        if major == 6:
            if val != 42:
                raise _fail("malformed", f"tag {val} is not allowed")
            b = self.item()
            if not isinstance(b, bytes) or not b or b[0] != 0:
                raise _fail("malformed", "a link is a byte string starting with 0x00")
            return Link(b[1:])
        # major 7 with an inline value
        if val == 20:
            return False
        if val == 21:
            return True
        if val == 22:
            return None
        raise _fail("malformed", f"simple value {val} is not allowed")


def decode(data: bytes) -> Any:
    """Decode exactly one canonical DAG-CBOR item and check that it re-encodes to the same bytes."""
    dec = _Decoder(data)
    value = dec.item()
    if dec.i != len(data):
        raise _fail("trailing_bytes", f"{len(data) - dec.i} bytes after the item")
    if encode(value) != data:
        raise _fail("not_canonical", "the bytes do not re-encode to themselves")
    return value


def _head(major: int, val: int) -> bytes:
    if val < 24:
        return bytes([(major << 5) | val])
    for info, n in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if val < (1 << (8 * n)):
            return bytes([(major << 5) | info]) + val.to_bytes(n, "big")
    raise ValueError("integer out of range")


def encode(value: Any) -> bytes:
    """Canonical DAG-CBOR (effects-v1 §2): no floats, map keys by length then bytes."""
    if value is None:
        return b"\xf6"
    if value is True:
        return b"\xf5"
    if value is False:
        return b"\xf4"
    if isinstance(value, int):
        return _head(0, value) if value >= 0 else _head(1, -1 - value)
    if isinstance(value, bytes):
        return _head(2, len(value)) + value
    if isinstance(value, str):
        b = value.encode("utf-8")
        return _head(3, len(b)) + b
    if isinstance(value, Link):
        inner = b"\x00" + value.cid
        return b"\xd8\x2a" + _head(2, len(inner)) + inner
    if isinstance(value, (list, tuple)):
        return _head(4, len(value)) + b"".join(encode(v) for v in value)
    if isinstance(value, dict):
        items = sorted(((k.encode("utf-8"), v) for k, v in value.items()), key=lambda kv: (len(kv[0]), kv[0]))
        return _head(5, len(items)) + b"".join(_head(3, len(k)) + k + encode(v) for k, v in items)
    raise TypeError(f"cannot encode {type(value).__name__} (floats are not allowed)")


# -- CIDs ------------------------------------------------------------------------------------------------

_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def cid_text(binary: bytes) -> str:
    return "b" + base64.b32encode(binary).decode().lower().rstrip("=")


def _blake3(data: bytes) -> bytes:
    try:
        from blake3 import blake3
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError("content ids need the 'blake3' package: pip install 'tartarus[verify]'") from e
    return blake3(data).digest()


def cid(data: bytes, codec: int) -> str:
    """The text CIDv1 (BLAKE3) of ``data``: codec 0x71 dag-cbor for objects, 0x55 raw for blobs."""
    return cid_text(bytes([0x01, codec, 0x1E, 0x20]) + _blake3(data))


def key_id(public_key: bytes) -> str:
    return _blake3(public_key).hex()[:16]


# -- verification ----------------------------------------------------------------------------------------


def _envelope_bytes(receipt: Any) -> bytes:
    if isinstance(receipt, bytes):
        return receipt
    if isinstance(receipt, str):
        return base64.b64decode(receipt)
    return base64.b64decode(receipt.envelope)


def envelope_kid(receipt: Any) -> Optional[str]:
    try:
        env = decode(_envelope_bytes(receipt))
        return env.get("kid") if isinstance(env, dict) else None
    except Exception:
        return None


def _public_keys(keys: Mapping[str, Any]) -> Dict[str, bytes]:
    out: Dict[str, bytes] = {}
    entries: List[Mapping[str, Any]] = list(keys.get("keys", [])) if "keys" in keys else [
        {"kid": k, "algorithm": "ed25519", "public_key": v} for k, v in keys.items()
    ]
    for k in entries:
        if k.get("algorithm", "ed25519") != "ed25519":
            continue
        pub = bytes.fromhex(k["public_key"])
        try:
            derived = key_id(pub)
        except ImportError:
            derived = k["kid"]  # without blake3 the id cannot be rechecked
        if derived != k["kid"]:
            raise _fail("invalid_key", f"key id {k['kid']} does not match its key ({derived})")
        out[k["kid"]] = pub
    return out


def verify_envelope(envelope: bytes, keys: Mapping[str, Any]) -> bytes:
    """§4.3: returns the signed payload bytes."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError("receipt verification needs 'cryptography': pip install 'tartarus[verify]'") from e
    env = decode(envelope)
    if not isinstance(env, dict):
        raise _fail("malformed", "an envelope is a map")
    if env.get("version") != 1:
        raise _fail("wrong_version", f"envelope version {env.get('version')!r}")
    if set(env) != {"kid", "payload", "version", "signature"}:
        raise _fail("malformed", f"envelope keys {sorted(env)}")
    kid, payload, sig = env["kid"], env["payload"], env["signature"]
    if not isinstance(kid, str) or not isinstance(payload, bytes) or not isinstance(sig, bytes):
        raise _fail("malformed", "envelope field of the wrong type")
    pubs = _public_keys(keys)
    if kid not in pubs:
        raise _fail("unknown_key", f"key {kid} is not among the trusted keys {sorted(pubs)}")
    if len(sig) != 64:
        raise _fail("bad_signature", "an Ed25519 signature is 64 bytes")
    signing_input = encode({"kid": kid, "domain": ENVELOPE_DOMAIN, "payload": payload, "version": 1})
    try:
        Ed25519PublicKey.from_public_bytes(pubs[kid]).verify(sig, signing_input)
    except InvalidSignature:
        raise _fail("bad_signature", "the signature does not verify") from None
    return payload


def _check_receipt(p: Any) -> Dict[str, Any]:
    if not isinstance(p, dict):
        raise _fail("malformed", "a receipt is a map")
    keys = set(p)
    missing = RECEIPT_KEYS - keys
    unknown = keys - RECEIPT_KEYS - {"nonce"}
    if unknown or (missing - NULLABLE):
        raise _fail("malformed", f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    if missing:
        raise _fail("not_canonical", f"nullable keys left out instead of null: {sorted(missing)}")
    if "nonce" in p and p["nonce"] is None:
        raise _fail("not_canonical", "nonce written as null instead of left out")
    if p["format"] != RECEIPT_FORMAT:
        raise _fail("invalid_object", f"format {p['format']!r}")
    for k in ("tool", "sandbox", "tenant"):
        if not isinstance(p[k], str) or not p[k]:
            raise _fail("invalid_object", f"{k} must be non-empty text")
    for k in ("request_hash", "response_hash"):
        v = p[k]
        if v is None and k == "response_hash":
            continue
        if not isinstance(v, Link) or v.cid[:2] != b"\x01\x55":
            raise _fail("invalid_object", f"{k} must be a raw-codec link")
    if not isinstance(p["started_at"], int) or not isinstance(p["finished_at"], int):
        raise _fail("invalid_object", "times are integers")
    if p["finished_at"] < p["started_at"]:
        raise _fail("invalid_object", "finished_at before started_at")
    if p["status"] not in ("ok", "failed", "error"):
        raise _fail("invalid_object", f"status {p['status']!r}")
    answered = p["status"] != "error"
    if answered != (p["code"] is not None) or answered != (p["response_hash"] is not None):
        raise _fail("invalid_object", "code and response_hash are set exactly when the tool answered")
    if "nonce" in p:
        n = p["nonce"]
        if not (isinstance(n, str) and len(n) == 32 and all(c in "0123456789abcdef" for c in n)):
            raise _fail("invalid_object", "nonce is 32 lower-case hex digits")
    return {k: (str(v) if isinstance(v, Link) else v) for k, v in p.items()}


def verify_receipt(
    receipt: Union[Any, bytes, str],
    keys: Mapping[str, Any],
    *,
    request: Optional[bytes] = None,
    response: Optional[bytes] = None,
) -> Dict[str, Any]:
    """Verify a receipt (a ``Receipt``, its envelope bytes, or their base64) as effects-v1 §10.3 says; returns
    the payload with links as text CIDs. ``keys`` is the ``/v1/keys`` document (or ``{kid: hex}``)."""
    envelope = _envelope_bytes(receipt)
    payload = _check_receipt(decode(verify_envelope(envelope, keys)))
    if request is not None and cid(request, 0x55) != payload["request_hash"]:
        raise _fail("hash_mismatch", "the request bytes are not the ones the receipt names")
    if response is not None:
        if payload["response_hash"] is None:
            raise _fail("hash_mismatch", "the receipt names no response (status error)")
        if cid(response, 0x55) != payload["response_hash"]:
            raise _fail("hash_mismatch", "the response bytes are not the ones the receipt names")
    view_id = getattr(receipt, "id", None)
    if view_id is not None:
        try:
            actual = cid(envelope, 0x71)
        except ImportError:
            actual = view_id
        if actual != view_id:
            raise _fail("hash_mismatch", f"the receipt's id {view_id} is not its envelope's ({actual})")
        for field in ("tool", "sandbox", "tenant", "status", "request_hash", "response_hash",
                      "idempotency_key", "started_at", "finished_at", "code"):  # fmt: skip
            if getattr(receipt, field) != payload[field]:
                raise _fail("hash_mismatch", f"the view's {field} differs from the signed one")
    return payload
