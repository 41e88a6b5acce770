"""Put packets into a store one at a time, printing each id once its put has returned.

Run by tests/test_crash.py, which kills it with SIGKILL mid-stream:
``python tests/crash_writer.py DATA_DIR START``. Each line is ``packet_id key_hex`` for a
packet whose put was acknowledged (committed), flushed before the next put starts.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import NOW, make_packets  # noqa: E402

from qisd.config import StoreLimits  # noqa: E402
from qisd.core.crypto import Identity  # noqa: E402
from qisd.net.store import Store  # noqa: E402


def main() -> None:
    data_dir, start = sys.argv[1], int(sys.argv[2])
    ident = Identity.generate()
    store = Store.open(data_dir, limits=StoreLimits(), ttl_ms=30 * 86_400_000)
    out = sys.stdout
    i = start
    while True:  # until killed
        envelopes = make_packets(1, ident, start=i)[0]
        result = store.put(envelopes, now_ms=NOW, local=i % 2 == 0)
        assert len(result.accepted) == len(envelopes), result
        for env in envelopes:
            out.write(f"{env.packet_id} {env.key.hex()}\n")
        out.flush()
        i += 1


if __name__ == "__main__":
    main()
