"""A worker job that dies like a segfaulting decoder on one photo (importable by spawned
worker processes), and behaves normally on every other photo."""

import os

from gender_pipeline.engine.prepared import prepare_in_worker


def crash_on_poison(key, data, sha256):
    if "poison" in key:
        os._exit(139)  # the process vanishes, as with SIGSEGV inside a C decoder
    return prepare_in_worker(key, data, sha256)


def broken_initializer(*args):
    raise ImportError("a worker that cannot start (e.g. a missing native library)")
