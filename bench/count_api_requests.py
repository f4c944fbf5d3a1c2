"""Run `inferencefleet operator` while counting every HTTP request it sends to the apiserver.

Both clients the operator uses are counted where they send: urllib3 (the kubernetes client)
and aiohttp (kopf's watches and patches). The counts, keyed by "METHOD /path" with object
names folded away, are rewritten to a JSON file every half second, so a benchmark can read
them at the start and the end of a window.

    python bench/count_api_requests.py COUNTS.json operator --namespace NS ...
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

_counts: collections.Counter[str] = collections.Counter()
_lock = threading.Lock()


def _key(method: str, url: str) -> str:
    path = re.sub(r"^[a-z]+://[^/]+", "", str(url)).split("?", 1)[0]
    kind = "WATCH" if "watch=true" in str(url) or "watch=True" in str(url) else method.upper()
    parts = path.strip("/").split("/")
    # Keep the resource names, fold object and namespace names: every second segment after
    # the group/version prefix is a name.
    start = 2 if parts[:1] == ["api"] else 3
    folded = parts[:start]
    for index, part in enumerate(parts[start:]):
        folded.append("*" if index % 2 == 1 else part)
    return f"{kind} /{'/'.join(folded)}"


def _count(method: str, url: str) -> None:
    with _lock:
        _counts[_key(method, url)] += 1


def _patch_urllib3() -> None:
    import urllib3.connectionpool

    original = urllib3.connectionpool.HTTPConnectionPool.urlopen

    def urlopen(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        _count(method, url)  # a retry calls urlopen again, and is counted again
        return original(self, method, url, *args, **kwargs)

    urllib3.connectionpool.HTTPConnectionPool.urlopen = urlopen  # type: ignore[method-assign]


def _patch_aiohttp() -> None:
    import aiohttp

    original = aiohttp.ClientSession._request

    async def _request(self: Any, method: str, str_or_url: Any, **kwargs: Any) -> Any:
        url = str(str_or_url)
        params = kwargs.get("params") or {}
        if isinstance(params, dict) and str(params.get("watch", "")).lower() == "true":
            url += "?watch=true"
        _count(method, url)
        return await original(self, method, str_or_url, **kwargs)

    aiohttp.ClientSession._request = _request  # type: ignore[method-assign]


def _writer(path: Path) -> None:
    while True:
        with _lock:
            document = {"time": time.time(), "counts": dict(_counts)}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document), encoding="utf-8")
        os.replace(tmp, path)
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    _patch_urllib3()
    _patch_aiohttp()
    threading.Thread(target=_writer, args=(path,), daemon=True).start()
    from inferencefleet.cli import main as cli_main

    result: int = cli_main(argv[1:])
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
