"""A loopback HTTP server that answers S3's ListObjectsV2 from a sorted key list, with a
fixed delay per request: S3's cost profile (latency, not server CPU) for measuring a
lister's concurrency. moto answers a page in 0.4-1 s of its own CPU at 100,000 keys (a
scan of every key and a slow serializer), which hides any latency a benchmark adds.

    from benchmarks.s3_listing_stub import ListingStub
    with ListingStub("bucket", keys, delay=0.05) as stub:  # stub.endpoint: http://127.0.0.1:PORT
        ...
"""

from __future__ import annotations

import bisect
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse
from xml.sax.saxutils import escape


class ListingStub:
    def __init__(self, bucket: str, keys: list[str], delay: float = 0.05, size: int = 100_000,
                 modified: str = "2026-01-01T00:00:00.000Z") -> None:
        self.bucket, self.keys, self.delay = bucket, sorted(keys), delay
        self.size, self.modified = size, modified
        self.requests = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                time.sleep(stub.delay)
                stub.requests += 1
                body = stub.page(urlparse(self.path)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def page(self, url) -> str:
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        prefix = query.get("prefix", "")
        after = query.get("continuation-token") or query.get("start-after") or ""
        limit = min(1000, int(query.get("max-keys", 1000)))
        start = bisect.bisect_right(self.keys, after) if after else bisect.bisect_left(self.keys, prefix)
        start = max(start, bisect.bisect_left(self.keys, prefix))
        chosen = []
        for key in self.keys[start:start + limit + 1]:
            if not key.startswith(prefix):
                break
            chosen.append(key)
        truncated = len(chosen) > limit
        chosen = chosen[:limit]
        contents = "".join(
            f"<Contents><Key>{escape(k)}</Key><LastModified>{self.modified}</LastModified><ETag>&quot;0&quot;</ETag>"
            f"<Size>{self.size}</Size><StorageClass>STANDARD</StorageClass></Contents>" for k in chosen)
        token = f"<NextContinuationToken>{escape(chosen[-1])}</NextContinuationToken>" if truncated else ""
        return ('<?xml version="1.0" encoding="UTF-8"?>'
                '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{self.bucket}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(chosen)}</KeyCount>"
                f"<MaxKeys>{limit}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                f"{contents}{token}</ListBucketResult>")

    def __enter__(self) -> "ListingStub":
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()
