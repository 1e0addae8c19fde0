"""FXQUANT_TEST_SHARD=i/n keeps every n-th test starting at i, so the GPU suite can run as
several processes at once (Triton compiles in parallel; they share Triton's on-disk cache)."""
import os


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("FXQUANT_TEST_SHARD")
    if not shard:
        return
    i, n = (int(v) for v in shard.split("/"))
    keep = [it for j, it in enumerate(items) if j % n == i]
    config.hook.pytest_deselected(items=[it for it in items if it not in keep])
    items[:] = keep
