"""afpx.scheduler: one way to pick Dask's scheduler, and compute on it."""

from __future__ import annotations

import sys

import dask
import dask.array as da
import numpy as np
import pytest

import afpx.scheduler
from afpx import AfpxError
from afpx.scheduler import active_client, compute, use_scheduler


@pytest.mark.parametrize(
    ("scheduler", "workers", "match"),
    [
        ("tcp://127.0.0.1:1", 2, "cannot be combined"),
        (None, 0, "at least 1"),
        ("threads", 0, "at least 1"),
        ("thread", None, "unknown scheduler 'thread'"),
        ("127.0.0.1:8786", None, "tcp://HOST:8786"),
    ],
)
def test_bad_scheduler_options_raise(
    scheduler: str | None, workers: int | None, match: str
) -> None:
    with pytest.raises(AfpxError, match=match), use_scheduler(scheduler, workers=workers):
        pass


def test_missing_distributed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert active_client() is None
    with pytest.raises(AfpxError, match="afpx\\[distributed\\]"), use_scheduler(workers=2):
        pass


def test_unreachable_scheduler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(afpx.scheduler, "SCHEDULER_TIMEOUT", "0.5s")
    with pytest.raises(AfpxError, match="cannot reach"), use_scheduler("tcp://127.0.0.1:9"):
        pass


@pytest.mark.parametrize("name", ["threads", "processes", "synchronous"])
def test_local_schedulers_set_dask_config(name: str) -> None:
    with use_scheduler(name, workers=2) as client:
        assert client is None
        assert dask.config.get("scheduler") == name
        x = da.arange(10, chunks=3)
        (total,) = compute(x.sum())
    assert total == 45


def test_an_active_client_is_respected() -> None:
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        with use_scheduler() as current:
            assert current is client
            x = da.ones((6, 4), chunks=(2, 4))
            (total,) = compute(x.sum(), progress=True)
        assert total == 24
        # a local scheduler named explicitly wins over the client
        with use_scheduler("synchronous") as current:
            assert current is None
            assert active_client() is None
    assert active_client() is None


def test_compute_with_progress_on_a_local_scheduler(capsys: pytest.CaptureFixture[str]) -> None:
    x = da.from_array(np.arange(12.0), chunks=4)
    with use_scheduler("threads"):
        (total,) = compute(x.sum(), progress=True)
    assert total == 66.0


def _fail() -> None:
    raise RuntimeError("task failed")


def _slow_write(path: str) -> None:
    import time

    time.sleep(0.5)
    with open(path, "w") as f:
        f.write("done")


@pytest.mark.parametrize("where", ["threads", "client"])
def test_compute_waits_for_running_tasks_before_raising(tmp_path: object, where: str) -> None:
    from pathlib import Path

    out = Path(str(tmp_path)) / "written"
    tasks = [dask.delayed(_slow_write, pure=False)(str(out)), dask.delayed(_fail, pure=False)()]
    if where == "threads":
        with use_scheduler("threads", workers=2), pytest.raises(RuntimeError, match="failed"):
            compute(*tasks)
        assert out.read_text() == "done"
        return
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=False
        ) as cluster,
        distributed.Client(cluster),
    ):
        with pytest.raises(RuntimeError, match="failed"):
            compute(*tasks)
        assert out.read_text() == "done"


def test_compute_accepts_a_list_of_delayed_objects_as_dask_compute_does() -> None:
    tasks = [dask.delayed(pow)(i, 2) for i in range(5)]
    (squares,) = compute(tasks)
    assert squares == [0, 1, 4, 9, 16]
    assert compute({"a": tasks[:2]}, 7) == ({"a": [0, 1]}, 7)


def _malloc_environ() -> dict[str, str | None]:
    import os

    return {name: os.environ.get(name) for name in afpx.scheduler.LOCAL_WORKER_MALLOC}


def test_local_cluster_workers_keep_freed_memory_unless_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # distributed's default (MALLOC_TRIM_THRESHOLD_=65536) pins glibc's mmap
    # threshold at 128 KiB; afpx's own workers get larger thresholds ...
    pytest.importorskip("distributed")

    def clear() -> None:
        # distributed copies the settings into this process's environment,
        # where they win over the configuration of the next cluster
        for name in afpx.scheduler.LOCAL_WORKER_MALLOC:
            monkeypatch.delenv(name, raising=False)

    clear()
    with use_scheduler(workers=1) as client:
        (seen,) = client.run(_malloc_environ).values()
    assert seen == {k: str(v) for k, v in afpx.scheduler.LOCAL_WORKER_MALLOC.items()}
    # ... unless the user configured them
    key = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
    clear()
    with dask.config.set({key: 12345}), use_scheduler(workers=1) as client:
        (seen,) = client.run(_malloc_environ).values()
    assert seen == {"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": "12345"}


def test_trim_memory_where_glibc_can(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    assert afpx.scheduler.trim_memory() is (sys.platform == "linux")  # glibc (not musl) here
    # another C library: nothing to call, nothing happens
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    assert afpx.scheduler.trim_memory() is False


def _glibc_defaults() -> dict[str, str]:
    """This environment less any glibc malloc setting (a local cluster's may be in it)."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}


_ARENAS = """
import ctypes, sys, tempfile, threading
import numpy as np
import afpx.scheduler
if sys.argv[1] == "one":
    assert afpx.scheduler.one_malloc_arena()
kept = []
def work():
    kept.append(np.ones(10_000))  # 80 KB: from this thread's malloc arena
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as out:
    f = ctypes.c_void_p(libc.fopen(out.name.encode(), b"w"))
    libc.malloc_info(0, f)
    libc.fclose(f)
    print(open(out.name).read().count("<heap nr="))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc arenas")
def test_one_malloc_arena_makes_new_threads_share_the_main_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes
    import subprocess

    def heaps(mode: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _ARENAS, mode],
            capture_output=True,
            text=True,
            check=True,
            env=_glibc_defaults(),
        )
        return int(done.stdout.strip().splitlines()[-1])

    assert heaps("default") > 1  # the threads' own arenas
    assert heaps("one") == 1
    # another C library: nothing to call, nothing happens
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    assert afpx.scheduler.one_malloc_arena() is False


_MAPPED = """
import ctypes
import numpy as np
import afpx.scheduler
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
def mapped(nbytes):
    before = libc.mallinfo2().hblkhd
    a = np.ones(nbytes, dtype=np.uint8)  # kept until measured
    return libc.mallinfo2().hblkhd - before >= nbytes
small, large = 512 * 2**10, 4 * 2**20
print(mapped(small), mapped(large))
assert afpx.scheduler.set_mmap_threshold(2**20)
print(mapped(small), mapped(large))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mmap threshold")
def test_set_mmap_threshold_maps_large_blocks_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _MAPPED],
        capture_output=True,
        text=True,
        check=True,
        env=_glibc_defaults(),
    )
    # glibc's own threshold (128 KiB at first) maps both; from 1 MiB on, the large one only
    assert done.stdout.split() == ["True", "True", "False", "True"]
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())
    assert afpx.scheduler.set_mmap_threshold(2**20) is False


class _Threads:
    def nthreads(self) -> dict[str, int]:
        return {"tcp://w0:1": 4, "tcp://w1:1": 2}


def test_task_slots_of_a_client_and_of_local_schedulers() -> None:
    from dask.system import CPU_COUNT

    assert afpx.scheduler.task_slots(_Threads()) == 6
    with dask.config.set(num_workers=3):
        assert afpx.scheduler.task_slots(None) == 3
    with dask.config.set(num_workers=None):
        assert afpx.scheduler.task_slots(None) == CPU_COUNT
