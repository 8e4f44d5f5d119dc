"""The shared secret that guards POST /v1/weights: whoever can write weights controls the model.

The key comes from `--api-key-file` or the `OPD_API_KEY` environment variable. A server that binds
beyond loopback refuses to start without one; with a key set, a weight push needs
`Authorization: Bearer <key>` (compared in constant time), whatever the bind address.
"""

import hmac
import ipaddress
import os
from pathlib import Path

from opd.errors import ConfigError, RequestError

API_KEY_ENV = "OPD_API_KEY"


def load_api_key(path: str | None) -> str | None:
    """The key from `path` (stripped) if given, else from $OPD_API_KEY, else None."""
    if path is not None:
        try:
            key = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --api-key-file {path}: {exc}") from exc
        if not key:
            raise ConfigError(f"--api-key-file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_key_off_loopback(host: str, key: str | None) -> None:
    if key is None and not is_loopback(host):
        raise ConfigError(
            f"--host {host} exposes POST /v1/weights beyond this machine; set {API_KEY_ENV} or "
            "--api-key-file so that only holders of the key can replace the model"
        )


def check_bearer(authorization: str | None, key: str | None) -> None:
    """401 without a bearer token, 403 with a wrong one; no-op when no key is configured."""
    if key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise RequestError("this endpoint needs 'Authorization: Bearer <key>'", param="authorization", status=401)
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise RequestError("wrong API key", param="authorization", status=403)
