"""One way to choose where afpx's parallel work runs: Dask's current scheduler.

Every parallel step of afpx (ingestion, fingerprints, likelihood blocks, the
element sets of an evaluation or a screen) is a Dask graph computed with
:func:`compute`, which runs it on whatever scheduler is current. The command
line chooses that scheduler once, with :func:`use_scheduler`:

- nothing: the scheduler already current is kept. An active
  ``distributed.Client`` (made by the caller, e.g. in a notebook) is
  respected; otherwise Dask's default for the collection runs it.
- ``"threads"``, ``"processes"`` or ``"synchronous"``: Dask's local
  schedulers, with ``workers`` threads or processes.
- an address such as ``"tcp://10.0.0.5:8786"``: connect to a running
  ``dask.distributed`` scheduler.
- ``workers`` alone: start a local ``distributed`` cluster of that many
  single-threaded worker processes for the block.

Results never depend on the scheduler: graphs are seeded per task, not per
worker.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from afpx import AfpxError

__all__ = [
    "LOCAL_SCHEDULERS",
    "LOCAL_WORKER_MALLOC",
    "SCHEDULER_TIMEOUT",
    "active_client",
    "compute",
    "one_blas_thread",
    "one_malloc_arena",
    "set_mmap_threshold",
    "task_slots",
    "trim_memory",
    "use_scheduler",
    "workers_on_this_host",
]

#: Dask's local schedulers, by the names ``dask.config`` uses.
LOCAL_SCHEDULERS = ("threads", "processes", "synchronous")

#: How long to wait for a remote scheduler before giving up.
SCHEDULER_TIMEOUT = "10s"

#: glibc malloc settings of the worker processes of afpx's own local cluster.
#: ``distributed`` starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
#: also freezes glibc's mmap threshold at 128 KiB: every temporary array above
#: it is mapped, faulted in page by page and unmapped again. Evaluation makes
#: millions of such arrays; with these settings its workers spend ~30 % less
#: CPU (a third of it was system time). Workers keep at most the trim threshold
#: of freed memory. Set only where the Dask configuration still has
#: ``distributed``'s default (a user's own settings win).
LOCAL_WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": 64 * 2**20, "MALLOC_TRIM_THRESHOLD_": 256 * 2**20}
_DISTRIBUTED_TRIM_DEFAULT = 65536

_DISTRIBUTED_HINT = "pip install 'afpx[distributed]'"


def active_client() -> Any:
    """The ``distributed.Client`` that Dask computations go to now, or None.

    Does not import ``distributed`` if nothing has imported it yet (then no
    client can be active).
    """
    if sys.modules.get("distributed") is None:
        return None
    from distributed import get_client

    try:
        client = get_client()
    except ValueError:
        return None
    import dask

    # a client made with set_as_default=False, or shadowed by a local
    # scheduler set in dask.config, does not receive computations
    if dask.config.get("scheduler", None) not in (None, "dask.distributed"):
        return None
    return client


def _check_spec(scheduler: str | None, workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise AfpxError(f"workers must be at least 1, got {workers}")
    if scheduler is None:
        return
    if scheduler in LOCAL_SCHEDULERS:
        return
    if "://" not in scheduler:
        raise AfpxError(
            f"unknown scheduler {scheduler!r}: give one of {', '.join(LOCAL_SCHEDULERS)} "
            "or the address of a running Dask scheduler such as tcp://HOST:8786"
        )
    if workers is not None:
        raise AfpxError(
            f"--workers cannot be combined with the scheduler address {scheduler}: "
            "the cluster there decides its workers"
        )


@contextlib.contextmanager
def use_scheduler(scheduler: str | None = None, *, workers: int | None = None) -> Iterator[Any]:
    """Run the Dask computations inside the block on the chosen scheduler.

    Parameters
    ----------
    scheduler : str, optional
        ``"threads"``, ``"processes"``, ``"synchronous"`` or the address of a
        running ``dask.distributed`` scheduler (``tcp://HOST:PORT``). None
        keeps the current scheduler (an active client included), or starts a
        local cluster when ``workers`` is given.
    workers : int, optional
        Threads or processes of a local scheduler; with no ``scheduler``, the
        number of single-threaded worker processes of a local cluster.

    Yields
    ------
    distributed.Client or None
        The client computations go to, or None on a local scheduler.

    Raises
    ------
    AfpxError
        For an unknown scheduler name, ``workers < 1``, ``workers`` with an
        address, an unreachable address, or a distributed scheduler without
        ``dask.distributed`` installed.
    """
    _check_spec(scheduler, workers)
    import dask

    if scheduler in LOCAL_SCHEDULERS:
        options: dict[str, Any] = {"scheduler": scheduler}
        if workers is not None and scheduler != "synchronous":
            options["num_workers"] = workers
        with dask.config.set(options):
            yield None
        return
    if scheduler is None and workers is None:
        yield active_client()
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise AfpxError(
            f"a distributed scheduler needs dask.distributed: {_DISTRIBUTED_HINT}"
        ) from exc
    # distributed sets its loggers to INFO; follow the application's level
    # instead (the CLI's -v), and restore it after
    dist_logger = logging.getLogger("distributed")
    saved_level = dist_logger.level
    dist_logger.setLevel(max(logging.getLogger().level, logging.INFO))
    try:
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout=SCHEDULER_TIMEOUT)
            except OSError as exc:
                raise AfpxError(
                    f"cannot reach the Dask scheduler at {scheduler}: {exc}; "
                    "check that it is running and the address is right"
                ) from exc
            with client, dask.config.set(scheduler="dask.distributed"):
                yield client
            return
        with (
            dask.config.set(_local_worker_environ()),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                # no dashboard: it is not needed, and a second cluster would warn
                # that port 8787 is taken
                dashboard_address=False,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
            dask.config.set(scheduler="dask.distributed"),
        ):
            yield client
    finally:
        dist_logger.setLevel(saved_level)


def _local_worker_environ() -> dict[str, Any]:
    """Dask configuration that gives local workers :data:`LOCAL_WORKER_MALLOC`."""
    import dask

    key = "distributed.nanny.pre-spawn-environ"
    environ = dict(dask.config.get(key, default={}) or {})
    trim = environ.get("MALLOC_TRIM_THRESHOLD_", _DISTRIBUTED_TRIM_DEFAULT)
    if trim != _DISTRIBUTED_TRIM_DEFAULT or "MALLOC_MMAP_THRESHOLD_" in environ:
        return {}  # configured by the user
    return {key: {**environ, **LOCAL_WORKER_MALLOC}}


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Limit the BLAS/OpenMP thread pools of this process to one thread inside the block.

    Numbers that go through BLAS (matrix products, SVDs) can differ in their
    last bits with the number of threads; a task run under this gives the same
    result on every scheduler and core count. The limit is process-wide, so it
    is not re-entered where every pool already has one thread (a caller that
    limits them around a threaded compute, or a local cluster's single-threaded
    workers): concurrent tasks would otherwise undo each other's limits.
    """
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    if all(lib.num_threads == 1 for lib in controller.lib_controllers):
        yield
        return
    with controller.limit(limits=1):
        yield


def workers_on_this_host(client: Any) -> bool:
    """Whether every worker of ``client`` runs on this machine (True for no client).

    Such workers can read files this process writes (a build's temporary files).

    Parameters
    ----------
    client : distributed.Client or None
        As yielded by :func:`use_scheduler`.
    """
    if client is None:
        return True
    here = socket.gethostname()
    hosts = client.run(socket.gethostname)
    return bool(hosts) and all(host == here for host in hosts.values())


def task_slots(client: Any) -> int:
    """How many tasks run at once: the threads of ``client``'s workers, else of this process.

    Parameters
    ----------
    client : distributed.Client or None
        As yielded by :func:`use_scheduler`; None for Dask's local schedulers
        (``num_workers`` in Dask's configuration, else the number of cores).
    """
    if client is not None:
        return max(1, sum(int(n) for n in client.nthreads().values()))
    import dask
    from dask.system import CPU_COUNT

    return max(1, int(dask.config.get("num_workers", None) or CPU_COUNT))


def trim_memory() -> bool:
    """Hand the free memory of this process's malloc arenas back to the system.

    glibc keeps memory freed inside its heaps resident (the arenas of Dask's
    worker threads are not reused by the main thread, nor the other way
    round), so a long step starts from the high-water mark of the steps
    before it rather than from what is live. ``malloc_trim(0)`` releases
    every free page of every arena; nothing that is allocated moves.

    Returns
    -------
    bool
        False where the C library has no ``malloc_trim`` (not glibc), and
        nothing was done.
    """
    import ctypes
    import ctypes.util

    try:
        malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    malloc_trim(0)
    return True


def _mallopt(param: int, value: int) -> bool:
    """glibc's ``mallopt(param, value)``; False where there is none or it refused."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(param, value))


#: ``M_ARENA_MAX`` of glibc's ``mallopt`` (``malloc.h``).
_M_ARENA_MAX = -8


def one_malloc_arena() -> bool:
    """Make the threads of this process that have no malloc arena yet share glibc's main one.

    glibc gives every new thread a malloc arena of its own (up to eight per
    core), and memory freed in
    one arena is reused by that arena only: Dask's worker threads each keep
    their own high-water mark beside the main thread's, and what reading
    left behind in one arena is never reused by the fingerprints computed in
    another. With one arena, the working memory of every step fills the
    holes the steps before it left. Process-wide and for the rest of the
    process (glibc fixes the limit when it first needs a new arena); threads
    that have an arena already keep it.

    Returns
    -------
    bool
        False where the C library has no ``mallopt`` (not glibc) or refused
        the setting, and nothing was done.
    """
    return _mallopt(_M_ARENA_MAX, 1)


#: ``M_MMAP_THRESHOLD`` of glibc's ``mallopt``.
_M_MMAP_THRESHOLD = -3


def set_mmap_threshold(nbytes: int) -> bool:
    """Have glibc map every allocation of ``nbytes`` or more on its own from now on.

    Such a block is unmapped when freed, never left in a heap. By default
    glibc raises the threshold to the size of the largest mapped block freed
    so far (up to 32 MiB), so that a long computation ends up with its large
    arrays in the heap, where the holes they leave are reused only in part;
    fixing the threshold also stops it from moving. Process-wide. A low
    threshold costs system time (every such array is mapped and faulted in
    afresh): 128 KiB more than tripled it for ``build-cube``.

    Returns
    -------
    bool
        False where the C library has no ``mallopt`` (not glibc) or refused
        the value, and nothing was done.
    """
    return _mallopt(_M_MMAP_THRESHOLD, int(nbytes))


def compute(*collections: Any, progress: bool = False, **kwargs: Any) -> tuple[Any, ...]:
    """Compute Dask collections on the current scheduler, with a progress bar if asked.

    When a task fails, the tasks already running are waited for before the
    error is raised, so that none of them still writes (into a store the
    caller is about to clean up) after this returns.

    Parameters
    ----------
    *collections
        Dask collections (arrays, bags, delayed objects); other objects pass
        through unchanged, as in :func:`dask.compute`.
    progress : bool
        Show a progress bar on stderr (``distributed.progress`` on a
        distributed client, :class:`dask.diagnostics.ProgressBar` otherwise).
    **kwargs
        Passed to :func:`dask.compute` (e.g. ``optimize_graph``).

    Returns
    -------
    tuple
        One result per collection.
    """
    client = active_client()
    if client is not None:
        return _compute_on_client(client, collections, progress=progress, **kwargs)
    if not progress:
        return _compute_locally(collections, **kwargs)
    from dask.diagnostics import ProgressBar

    with ProgressBar(minimum=1.0, dt=0.5, out=sys.stderr):
        return _compute_locally(collections, **kwargs)


def _compute_on_client(
    client: Any, collections: tuple[Any, ...], *, progress: bool, **kwargs: Any
) -> tuple[Any, ...]:
    from distributed import wait

    futures = client.compute(list(collections), **kwargs)
    try:
        if progress:
            from distributed import progress as distributed_progress

            distributed_progress(futures)
        return tuple(client.gather(futures))
    except Exception:
        # the other tasks go on running on the workers: let them finish first
        with contextlib.suppress(Exception):
            wait(futures)
        raise


def _compute_locally(collections: tuple[Any, ...], **kwargs: Any) -> tuple[Any, ...]:
    import dask
    import dask.threaded
    from dask.base import get_scheduler

    found = _dask_collections(collections)
    if "pool" in kwargs or not found or get_scheduler(collections=found) is not dask.threaded.get:
        # Dask's process pool is shut down (waited for) after each compute
        return tuple(dask.compute(*collections, **kwargs))
    # Dask's threaded scheduler raises as soon as a task fails while the others
    # still run in its shared pool: give it a pool of its own and wait for it
    from dask.system import CPU_COUNT

    executor = getattr(dask.threaded, "ContextAwareThreadPoolExecutor", ThreadPoolExecutor)
    pool = executor(int(dask.config.get("num_workers", None) or CPU_COUNT))
    try:
        return tuple(dask.compute(*collections, pool=pool, **kwargs))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _dask_collections(objects: Any) -> list[Any]:
    """The Dask collections in ``objects``, inside lists, tuples and dicts as in dask.compute."""
    import dask

    found: list[Any] = []
    stack = [objects]
    while stack:
        obj = stack.pop()
        if dask.is_dask_collection(obj):
            found.append(obj)
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
    return found
