"""qisd: a peer-to-peer DHT node daemon for signed Arrow outcome packets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from qisd.client import Client

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so `import qisd` stays cheap for the pure core.
    if name == "Client":
        from qisd.client import Client

        return Client
    raise AttributeError(f"module 'qisd' has no attribute {name!r}")
