"""API keys for tests: fresh random keys, their digests and settings entries."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TestKey:
    __test__ = False  # a helper, not a test class

    id: str
    secret: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None = None
    rate_limit: str | None = None

    @property
    def entry(self) -> dict[str, Any]:
        """The settings / keys-file entry: the digest, never the key."""
        doc: dict[str, Any] = {
            "id": self.id,
            "sha256": hashlib.sha256(self.secret.encode()).hexdigest(),
            "scopes": list(self.scopes),
        }
        if self.models is not None:
            doc["models"] = list(self.models)
        if self.rate_limit is not None:
            doc["rate_limit"] = self.rate_limit
        return doc

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def header(self) -> dict[str, str]:
        return {"x-api-key": self.secret}


def new_key(key_id: str, *scopes: str, **extra: Any) -> TestKey:
    # A recognisable prefix, so a leak is easy to find in any text.
    return TestKey(key_id, "sk-test-" + secrets.token_urlsafe(24), scopes, **extra)
