"""Signed result bundles: who submitted a bundle, and that nothing changed after they signed it.

A submitter makes an ed25519 key pair once (`capbench keys generate`), signs what they export
(`capbench export --sign KEY`), and gives the leaderboard maintainer the public key, who trusts it by
name (`capbench db trust PUBKEY --name NAME`). `capbench db import --require-signature` then takes only
bundles whose signature checks and whose key is trusted.

The signature covers the bundle's canonical content: the JSON document without its ``signature``
member, keys sorted, no insignificant whitespace. Keys are the `cryptography` package's ed25519.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from capbench_core.errors import CapbenchError

ALGORITHM = "ed25519"


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a signature covers: every member but ``signature``, canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def generate(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (private, PEM, mode 0600) and ``NAME.pub`` (the public key, base64) into ``out_dir``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise CapbenchError(f"{path} exists: keys are never overwritten (choose another --name or --out)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_text(public_key_text(key) + "\n")
    return private, public


def public_key_text(key: Any) -> str:
    """The raw 32-byte public key of a private key, base64."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_private(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CapbenchError(f"no key file {path}: make one with `capbench keys generate`") from None
    except (ValueError, TypeError) as exc:
        raise CapbenchError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CapbenchError(f"{path} is not an ed25519 key: make one with `capbench keys generate`")
    return key


def read_public(value: str) -> str:
    """A public key given as a ``.pub`` file or as its base64 text, checked to be 32 bytes."""
    text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise CapbenchError(f"{value!r} is neither a .pub file nor a base64 ed25519 public key") from None
    if len(raw) != 32:
        raise CapbenchError(f"{value!r}: an ed25519 public key is 32 bytes, this is {len(raw)}")
    return text


def sign(doc: dict[str, Any], key: Any) -> dict[str, Any]:
    """``doc`` with a ``signature`` member over its canonical content."""
    value = base64.b64encode(key.sign(canonical(doc))).decode()
    return {**doc, "signature": {"algorithm": ALGORITHM, "public_key": public_key_text(key), "value": value}}


def signer(doc: dict[str, Any]) -> str | None:
    """The public key that signed ``doc`` (base64), None when unsigned; a CapbenchError naming what is
    wrong when the signature does not check."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    sig = doc.get("signature")
    if sig is None:
        return None
    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM:
        raise CapbenchError(f"signature must be an object with algorithm {ALGORITHM!r}, public_key and value")
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(str(sig.get("public_key")), validate=True))
        public.verify(base64.b64decode(str(sig.get("value")), validate=True), canonical(doc))
    except (ValueError, TypeError):
        raise CapbenchError("signature: the public key or the value is not valid base64 of the right size") from None
    except InvalidSignature:
        raise CapbenchError("signature does not match the content: the bundle was changed after it was signed, "
                            "or signed with another key") from None
    return str(sig["public_key"])
