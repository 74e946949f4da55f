"""API key verification per request: warm (cached) against a cold database lookup, SQLite."""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from pathlib import Path

from bench.common import percentiles
from cave.auth.keys import KeyService
from cave.auth.settings import AuthSettings
from cave.db import Database, load_database_settings

N = 5000


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = await Database.connect(load_database_settings({"BKG_DB_PATH": str(Path(tmp, "b.db"))}))
        keys = KeyService(
            db,
            AuthSettings(
                key_pepper=secrets.token_bytes(32),
                secret_key=secrets.token_bytes(32),
                rotation_grace_s=3600,
            ),
        )
        _, plaintext = await keys.create("admin", None, [])
        rows = {}
        for label, cold in (
            ("authenticate, cache miss (database read)", True),
            ("authenticate, warm (cached)", False),
        ):
            samples = []
            for _ in range(N if not cold else N // 10):
                if cold:
                    keys._cache.clear()  # the bench measures both paths on purpose
                start = time.perf_counter()
                await keys.authenticate(plaintext)
                samples.append(time.perf_counter() - start)
            rows[label] = percentiles(samples)
        await db.close()
    for label, stats in rows.items():
        p50, p99 = stats["p50_ms"] * 1000, stats["p99_ms"] * 1000
        print(f"{label:44s} p50 {p50:8.1f} us  p99 {p99:8.1f} us")
    cold, warm = rows.values()
    print(f"warm / cold p50: x{warm['p50_ms'] / cold['p50_ms']:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
