"""qisd: a peer-to-peer DHT node daemon for signed Arrow outcome packets."""

__version__ = "0.1.0"
