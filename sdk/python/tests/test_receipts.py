"""Receipts: offline verification against the spec's conformance vectors, and live against the server."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Dict

import pytest

import tartarus
from tartarus import ReceiptVerificationError, Sandbox, verify_receipt
from tartarus import _receipts

pytest.importorskip("cryptography")
pytest.importorskip("blake3")
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402

VECTORS = Path(__file__).resolve().parents[3] / "conformance" / "v1"


def _keys(seed_hex: str) -> Dict[str, Any]:
    pub = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)).public_key()
    raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"keys": [{"kid": _receipts.key_id(raw), "algorithm": "ed25519", "public_key": raw.hex()}]}


def _vectors(kind: str) -> list:
    d = VECTORS / kind
    if not d.is_dir():
        return []
    return sorted(d.glob("*.json"))


def _opt(v: Any) -> Any:
    return None if v is None else bytes.fromhex(v)


@pytest.mark.parametrize("path", _vectors("receipt"), ids=lambda p: p.stem)
def test_conformance_receipts_verify(path: Path) -> None:
    v = json.loads(path.read_text())
    env = bytes.fromhex(v["envelope_hex"])
    payload = verify_receipt(env, _keys(v["seed_hex"]), request=_opt(v.get("request_hex")),
                             response=_opt(v.get("response_hex")))  # fmt: skip
    for k, want in v["receipt"].items():
        assert payload[k] == want, k
    assert _receipts.cid(env, 0x71) == v["receipt_cid"]


@pytest.mark.parametrize("path", _vectors("receipt-reject"), ids=lambda p: p.stem)
def test_conformance_receipts_reject(path: Path) -> None:
    v = json.loads(path.read_text())
    with pytest.raises(ReceiptVerificationError) as e:
        verify_receipt(bytes.fromhex(v["envelope_hex"]), _keys(v["verifier_seed_hex"]),
                       request=_opt(v.get("request_hex")), response=_opt(v.get("response_hex")))  # fmt: skip
    assert e.value.kind == v["error"]


def test_conformance_vectors_present() -> None:
    if not VECTORS.is_dir():
        pytest.skip("conformance/v1 is not beside the SDK (installed from an sdist?)")
    assert _vectors("receipt") and _vectors("receipt-reject")


def test_cbor_rejects_non_canonical() -> None:
    for data, kind in [
        (b"\x18\x01", "non_minimal"),
        (b"\xfb" + b"\x00" * 8, "float"),
        (b"\x9f\xff", "indefinite_length"),
        (b"\x01\x02", "trailing_bytes"),
        (b"\x62a", "truncated"),
        (b"\xa2\x61b\x01\x61a\x02", "unsorted_keys"),
    ]:
        with pytest.raises(ReceiptVerificationError) as e:
            _receipts.decode(data)
        assert e.value.kind == kind, data


@pytest.fixture(scope="module")
def echo_tool(server):  # type: ignore[no-untyped-def]
    with tartarus.Client(server.host, server.admin_key) as admin:
        admin.request("POST", "/v1/tools", json={"name": "sdk-echo", "kind": "command", "command": ["/bin/cat"]})
        yield "sdk-echo"
        admin.request("DELETE", "/v1/tools/sdk-echo")


def test_live_tool_call_receipt_verifies(client: tartarus.Client, echo_tool: str) -> None:
    with Sandbox.create(client=client) as sb:
        assert echo_tool in [t["name"] for t in sb.tools.list()]
        res = sb.tools.call(echo_tool, {"amount": 100}, idempotency_key="sdk-order-1")
        assert res.status == 200 and res.json() == {"amount": 100} and not res.replayed
        assert res.receipt_id
        again = sb.tools.call(echo_tool, {"amount": 100}, idempotency_key="sdk-order-1")
        assert again.replayed and again.receipt_id == res.receipt_id

        [receipt] = sb.receipts()
        assert receipt.id == res.receipt_id and receipt.tool == echo_tool and receipt.sandbox == sb.id
        assert client.receipts.get(receipt.id) == receipt
        assert client.receipts.envelope(receipt.id) == receipt.envelope_bytes
        assert receipt.id in {r.id for r in client.receipts.list()}

        payload = client.receipts.verify(receipt, request=b'{"amount": 100}', response=res.body)
        assert payload["status"] == "ok" and payload["tenant"] == "sdk-a"

        with pytest.raises(ReceiptVerificationError) as e:
            client.receipts.verify(receipt, request=b'{"amount": 101}')
        assert e.value.kind == "hash_mismatch"

        env = bytearray(receipt.envelope_bytes)
        env[-1] ^= 1  # flip a bit of the signature
        with pytest.raises(ReceiptVerificationError) as e:
            client.receipts.verify(bytes(env))
        assert e.value.kind == "bad_signature"

        with pytest.raises(ReceiptVerificationError) as e:
            client.receipts.verify(receipt, keys={"keys": []})
        assert e.value.kind == "unknown_key"

        keys = client.receipts.public_keys()
        assert keys["current"] == receipt.kid
        # The same check with the keys pinned and the base64 form, no client needed.
        assert verify_receipt(base64.b64encode(receipt.envelope_bytes).decode(), keys)["tool"] == echo_tool


def test_receipt_not_found(client: tartarus.Client) -> None:
    with pytest.raises(tartarus.NotFoundError):
        client.receipts.get("bafyr4ieh6dbt4flzbtj56awq2c27tzgwli6ap4nkv6dh7oadxhxlxw6eqe")
