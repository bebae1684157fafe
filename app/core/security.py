"""API keys (stored only as HMAC-SHA256 under the server secret), the Fernet box for per-job Hub tokens, and
redaction of secrets from anything that is logged or stored."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import threading

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_PREFIX = "mpq"
_KEY_RE = re.compile(r"^mpq_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{20,100})$")


def _derive(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"mopeq-v1", info=info).derive(secret)


class Keyring:
    """Keys derived from the server secret, one per purpose."""

    def __init__(self, secret: bytes):
        self._hmac_key = _derive(secret, b"api-key-hmac")
        self._fernet = Fernet(base64.urlsafe_b64encode(_derive(secret, b"hf-token-fernet")))

    # ---- API keys -------------------------------------------------------------------------------------------------
    def hash_key(self, api_key: str) -> str:
        return hmac.new(self._hmac_key, api_key.encode(), hashlib.sha256).hexdigest()

    def verify_key(self, api_key: str, stored_hash: str) -> bool:
        return hmac.compare_digest(self.hash_key(api_key), stored_hash)

    # ---- per-job tokens -------------------------------------------------------------------------------------------
    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise ValueError("the stored Hub token cannot be decrypted with this server's secret "
                             "(MOPEQ_SECRET_KEY differs between API and worker?)") from exc


def new_api_key() -> tuple[str, str]:
    """Returns (key_id, full key). The key id is public (shown in listings); the rest is the secret."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    key_id = "".join(secrets.choice(alphabet) for _ in range(12))
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def parse_api_key(api_key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    m = _KEY_RE.match(api_key)
    return m.group(1) if m else None


# ---- redaction ----------------------------------------------------------------------------------------------------
_HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{10,}\b")
_KEY_SECRET_RE = re.compile(r"\bmpq_[A-Za-z0-9]{12}_[A-Za-z0-9_-]{20,}")
_secrets_lock = threading.Lock()
_live_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    if value and len(value) >= 6:
        with _secrets_lock:
            _live_secrets.add(value)


def forget_secret(value: str | None) -> None:
    with _secrets_lock:
        _live_secrets.discard(value or "")


def redact(text: str) -> str:
    if not text:
        return text
    with _secrets_lock:
        live = sorted(_live_secrets, key=len, reverse=True)
    for s in live:
        if s in text:
            text = text.replace(s, "***")
    text = _HF_TOKEN_RE.sub("hf_***", text)
    return _KEY_SECRET_RE.sub("mpq_***", text)


class RedactingFilter(logging.Filter):
    """Rewrites every record's message so that registered secrets and token-shaped strings never reach a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not break logging
            return True
        clean = redact(msg)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        return True


def install_log_redaction() -> None:
    """Attach the redacting filter to every handler of the root logger (and to the root logger itself)."""
    root = logging.getLogger()
    flt = next((f for f in root.filters if isinstance(f, RedactingFilter)), None) or RedactingFilter()
    if flt not in root.filters:
        root.addFilter(flt)
    for h in root.handlers:
        if flt not in h.filters:
            h.addFilter(flt)
