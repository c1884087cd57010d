"""Transient storage faults: a loopback proxy in front of the S3 server drops connections;
the run still answers every photo exactly once."""

import random
import socket
import threading

import pandas as pd
import pytest

from gender_pipeline.flows.scoring import nightly_scoring
from tests.conftest import free_port, night_options

pytestmark = pytest.mark.usefixtures("prefect_harness")


class DroppingProxy:
    """TCP proxy on 127.0.0.1 that closes a share of new connections at once (seeded)."""

    def __init__(self, upstream_port: int, share: float = 0.3, seed: int = 0) -> None:
        self.upstream_port, self.share = upstream_port, share
        self.random = random.Random(seed)
        self.port = free_port()
        self.connections = self.dropped = 0
        self.server = socket.create_server(("127.0.0.1", self.port))
        self.server.settimeout(0.5)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            if self.random.random() < self.share:
                self.dropped += 1
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()


def test_dropped_connections_lose_and_duplicate_nothing(s3_endpoint, uploads, tmp_path, monkeypatch):
    import s3fs

    from gender_pipeline.lake import storage

    source, files = uploads
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("faulty")
    fs.pipe({f"faulty/uploads/{k}": v for k, v in files.items()})
    proxy = DroppingProxy(int(s3_endpoint.rsplit(":", 1)[1]), share=0.3)
    monkeypatch.setattr(storage, "_sleep", lambda s: None)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # let our retries, not botocore's, absorb the faults
    s3fs.S3FileSystem.clear_instance_cache()
    endpoint = f"http://127.0.0.1:{proxy.port}"
    try:
        for _ in range(2):  # the second run must find nothing new
            nightly_scoring(night_options(source="s3://faulty/uploads", output="s3://faulty/lake", endpoint_url=endpoint,
                            registry=str(tmp_path / "registry"), workers=0, shard_size=5))
    finally:
        proxy.close()
    assert proxy.dropped >= 3, (proxy.connections, proxy.dropped)
    frame = pd.read_parquet("s3://faulty/lake/predictions",
                            storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert sorted(frame["photo_key"]) == sorted(files)  # none lost, none duplicated
    assert not (frame["reject_reason"] == "read_error").any()
    print(f"connections {proxy.connections}, dropped {proxy.dropped}, rows {len(frame)}")
