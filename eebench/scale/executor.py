"""Scale out on Ray: ``eebench run --executor ray`` here, ``eebench tune`` in ``eebench.scale.tune``.

No scheduler of our own: Ray Core runs every (method, seed) cell of ``eebench run`` as one Ray
task with its resource request, and Ray Tune runs hyper-parameter searches whose trials are
eebench cells. Ray is an optional extra (``pip install 'eebench[ray]'``) imported only here and
only when used.

Cells stay the unit of work and of fault tolerance: a cell lives in a folder named by the hash
of its config, writes trainer checkpoints into ``<cell>/checkpoint`` and its result JSON last.
A retried Ray task (worker or node lost) or a restarted Tune trial therefore resumes the cell
from its last checkpoint, provided every worker sees the output folder (one machine, or a
shared filesystem on a cluster).

MLflow is written by the driver only (workers train with tracking off and hand back their
CellResult): one writer keeps the default SQLite store free of "database is locked", and the
tracking URI need not be reachable from the workers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eebench.errors import EebenchError

if TYPE_CHECKING:
    from eebench.runs.results import CellResult

RAY_HINT = "pip install 'eebench[ray]'"

#: Environment a worker must share with the driver (offline flags, data location, eebench's own).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "MLFLOW_DISABLE_TELEMETRY",
                 "DO_NOT_TRACK", "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED", "GLUE_DIR")


# ------------------------------------------------------------------------------------ Ray itself
def require_ray(what: str = "--executor ray", tune: bool = False):
    """Import and return ``ray`` (and ``ray.tune`` when asked), or raise an EebenchError with the
    install hint."""
    try:
        import ray

        if tune:
            import ray.tune  # noqa: F401 - needs the tune extra's dependencies
    except ImportError:
        raise EebenchError(f"{what} needs Ray, which is not installed; install the extra: {RAY_HINT}") from None
    return ray


def _import_ray(address: str | None, what: str, tune: bool = False):
    if address is None and "ray" not in sys.modules:
        # A private local instance: keep every Ray port on the loopback interface (Ray otherwise
        # binds the machine's outward address; this switch is what it uses on macOS / Windows).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return require_ray(what, tune)


def init_ray(address: str | None = None, num_cpus: int | None = None, what: str = "--executor ray") -> bool:
    """Connect to the Ray cluster at ``address``, or start a local Ray sized to this machine and
    bound to 127.0.0.1. An already initialised Ray is reused. Returns whether Ray was started
    (or connected) here, i.e. whether the caller should shut it down."""
    ray = _import_ray(address, what)
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            n = num_cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
            ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise EebenchError(f"cannot start or reach {where}: {str(e).splitlines()[0][:300]}") from None
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, what: str = "--executor ray") -> Iterator[Any]:
    """``init_ray`` for the duration of a ``with`` block; shuts down only what it started."""
    started = init_ray(address, num_cpus, what)
    import ray

    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@dataclass
class RayOptions:
    """Where and how big: the cluster address and the resources each cell (or trial) asks for."""

    address: str | None = None  # None: start a local Ray
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0  # fractions share a GPU (e.g. 0.5: two cells per GPU)
    max_retries: int = 2  # re-runs of a cell whose worker or node died (resumes from its checkpoint)
    num_cpus: int | None = None  # local Ray only; default: every CPU of this machine

    def check(self) -> None:
        """Reject requests Ray cannot express (exit code 2 with the reason)."""
        if not self.cpus_per_cell > 0:
            raise EebenchError(f"--cpus-per-cell must be positive (got {self.cpus_per_cell:g})")
        if self.gpus_per_cell < 0:
            raise EebenchError(f"--gpus-per-cell must be 0 or more (got {self.gpus_per_cell:g})")
        if self.gpus_per_cell > 1 and self.gpus_per_cell != int(self.gpus_per_cell):
            raise EebenchError(f"--gpus-per-cell {self.gpus_per_cell:g}: fractions are only possible below 1 "
                               "(e.g. 0.5 or 2, not 1.5)")
        if self.max_retries < 0:
            raise EebenchError(f"--max-retries must be 0 or more (got {self.max_retries})")


def _check_fits(ray, opts: RayOptions, started: bool) -> None:
    """A request no node can satisfy would wait forever: refuse it on a cluster we started,
    warn on one we joined (an autoscaler may still add such a node)."""
    best: dict[str, float] = {}
    for node in ray.nodes():
        if node.get("Alive"):
            for k in ("CPU", "GPU"):
                best[k] = max(best.get(k, 0.0), float(node.get("Resources", {}).get(k, 0.0)))
    need = {"CPU": opts.cpus_per_cell, "GPU": opts.gpus_per_cell}
    short = [f"{need[k]:g} {k}" for k in need if need[k] > best.get(k, 0.0) + 1e-9]
    if not short:
        return
    msg = (f"no Ray node has {' and '.join(short)} for one cell (largest node: {best.get('CPU', 0):g} CPU, "
           f"{best.get('GPU', 0):g} GPU); lower --cpus-per-cell / --gpus-per-cell")
    if started:
        raise EebenchError(msg)
    print(f"warning: {msg}; cells wait until such a node joins", flush=True)


# --------------------------------------------------------------------------------- worker side
def _driver_context() -> dict[str, Any]:
    """What a worker needs to behave like the driver: its environment flags and folder."""
    env = {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith("EEBENCH_")}
    return {"env": env, "cwd": os.getcwd()}


@contextlib.contextmanager
def _as_driver(ctx: dict[str, Any], cpus: float) -> Iterator[None]:
    """Run a cell on a worker as the driver would: same flags, same working folder (relative
    task / model paths keep their meaning and so their cell hash), threads = CPUs asked for."""
    saved = {k: os.environ.get(k) for k in ctx["env"]}
    os.environ.update(ctx["env"])
    old = os.getcwd()
    if os.path.isdir(ctx["cwd"]):
        os.chdir(ctx["cwd"])
    try:
        import torch

        torch.set_num_threads(max(1, int(cpus)))
        yield
    finally:
        os.chdir(old)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _cell_lock(cell_dir: Path) -> Iterator[None]:
    """One process at a time per cell folder (two trials may draw the same config): the second
    waits and then finds the cell finished. The runner's own lock (re-entrant, so that
    ``run_cell`` inside takes it again at no cost)."""
    from eebench.runs.locks import cell_lock

    with cell_lock(cell_dir):
        yield


def _worker_config(cfg_data: dict[str, Any], gpus: float):
    """The worker's RunConfig: tracking off (the driver logs), no progress bars, and no GPU
    unless the cell asked Ray for one."""
    from eebench.runs.config import RunConfig

    data = dict(cfg_data, no_mlflow=True, progress=False)
    if gpus <= 0 and data.get("device", "auto") == "auto":
        data["device"] = "cpu"
    return RunConfig(**data)


def _needs_work(runner, method: str, seed: int, h: str) -> bool:
    from eebench.runs.results import CellResult

    p = runner.cell_dir(method, seed, h) / "result.json"
    if not p.exists():
        return True
    from eebench.runs.runner import signals_to_sweep

    try:
        return bool(signals_to_sweep(CellResult.from_disk(p), runner._cell_policies(method), runner.cfg.num_thresholds))
    except EebenchError:  # unreadable: run_cell sets it aside and trains the cell again
        return True


def _cell_task(cfg_data: dict, method: str, seed: int, cc: dict, h: str, ctx: dict, cpus: float,
               gpus: float) -> dict[str, Any]:
    """One ``eebench run`` cell as a Ray task: train / resume / sweep it exactly as the local
    executor does, and hand the CellResult back to the driver."""
    start = time.time()
    with _as_driver(ctx, cpus):
        from eebench.runs.runner import Runner

        runner = Runner(_worker_config(cfg_data, gpus))
        runner.epoch_hook = _kill_once_hook()
        d = runner.cell_dir(method, seed, h)
        with _cell_lock(d):
            worked = _needs_work(runner, method, seed, h)
            result = runner.run_cell(method, seed, cc, h, None)
    import ray

    return {"result": result, "worked": worked, "start": start, "end": time.time(), "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id()}


def _kill_once_hook(then: Callable | None = None) -> Callable | None:
    """Test hook: with EEBENCH_TEST_KILL_AFTER_EPOCH=<marker file>, the first worker to finish an
    epoch writes the marker and dies, as a lost worker would; the retry resumes the cell."""
    fault = os.environ.get("EEBENCH_TEST_KILL_AFTER_EPOCH")
    if not fault:
        return then
    marker = Path(fault)

    def hook(model, epoch: int, entry: dict) -> None:
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # no cleanup, like a killed process
        if then is not None:
            then(model, epoch, entry)

    return hook


# ------------------------------------------------------------------------- --executor ray (run)
@dataclass
class CellOutcome:
    """How one cell went on Ray: its result or its error, and when and where it ran."""

    method: str
    seed: int
    cell_id: str
    cell_dir: Path
    result: CellResult | None = None
    error: str | None = None
    start: float | None = None  # wall clock (time.time()) on the worker
    end: float | None = None
    node: str | None = None
    pid: int | None = None


class CellsFailed(EebenchError):
    """Some cells raised (or lost their worker more often than --max-retries); the rest finished."""


def run_on_ray(cfg, opts: RayOptions | None = None, raise_on_error: bool = True) -> list[CellOutcome]:
    """``eebench run --executor ray``: every (method, seed) cell as one Ray task with its resource
    request; results JSON and MLflow runs as with the local executor. Outcomes in cell order;
    with ``raise_on_error`` a failed cell raises CellsFailed once all others are done."""
    from eebench.runs.runner import Runner

    opts = opts or RayOptions()
    opts.check()
    _import_ray(opts.address, "--executor ray")
    runner = Runner(cfg)  # validates every name, opens the tracker; the driver trains nothing
    runner.prepare()  # loads the data (its mistakes surface here) before anything is created
    cells = runner.cells()
    cfg_data = cfg.model_dump()
    cfg_data["output"] = str(Path(cfg.output).resolve())
    if cfg.data_dir:
        cfg_data["data_dir"] = str(Path(cfg.data_dir).resolve()) if Path(cfg.data_dir).exists() else cfg.data_dir
    ctx = _driver_context()
    with ray_session(opts.address, opts.num_cpus) as ray:
        _check_fits(ray, opts, started=opts.address is None)
        parent = runner.open_parent()
        task = ray.remote(_cell_task)
        refs = {}
        for method, seed, cc, h in cells:
            ref = task.options(num_cpus=opts.cpus_per_cell, num_gpus=opts.gpus_per_cell, max_retries=opts.max_retries,
                               name=f"eebench {method} seed {seed}").remote(
                cfg_data, method, seed, cc, h, ctx, opts.cpus_per_cell, opts.gpus_per_cell)
            refs[ref] = CellOutcome(method, seed, h, runner.cell_dir(method, seed, h))
        print(f"[ray] {len(refs)} cell(s) submitted ({opts.cpus_per_cell:g} CPU, {opts.gpus_per_cell:g} GPU each; "
              f"cluster: {_describe(ray)})", flush=True)
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    _collect(ray, ref, refs[ref], runner, parent)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            runner.close_parent(parent, [o.result for o in refs.values() if o.result], "KILLED")
            raise
        outcomes = list(refs.values())
        failed = [o for o in outcomes if o.error]
        runner.close_parent(parent, [o.result for o in outcomes if o.result], "FAILED" if failed else "FINISHED")
    if failed and raise_on_error:
        what = "; ".join(f"[{o.method} seed {o.seed}] {o.error}" for o in failed)
        raise CellsFailed(f"{len(failed)} of {len(outcomes)} cell(s) failed on Ray: {what} (finished cells are kept; "
                          "rerun the same command to retry the others)")
    return outcomes


def _describe(ray) -> str:
    res = ray.cluster_resources()
    return f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"


def _collect(ray, ref, out: CellOutcome, runner, parent: str | None) -> None:
    """Fetch one finished cell; the driver (the only MLflow writer) logs it and records the run id."""
    try:
        got = ray.get(ref)
    except Exception as e:  # noqa: BLE001 - any failure of one cell is reported, the others go on
        out.error = _error_text(e)
        print(f"[{out.method} seed {out.seed}] failed: {out.error}", file=sys.stderr, flush=True)
        return
    result: CellResult = got["result"]
    out.result, out.start, out.end, out.node, out.pid = result, got["start"], got["end"], got["node"], got["pid"]
    # Every cell this command covered is a child of its parent; workers do not log, so the child
    # is created here, spanning the task's wall-clock time on its worker.
    run_id = runner.tracker.log_cell(result, parent, out.cell_dir, reused=not got["worked"],
                                     start_time=int(got["start"] * 1000), end_time=int(got["end"] * 1000))
    if run_id and (got["worked"] or result.mlflow_run_id is None):
        result.mlflow_run_id = run_id
        result.to_disk(out.cell_dir / "result.json")


def _error_text(e: BaseException) -> str:
    """One line: the original exception of a Ray task error, else Ray's own."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return (first if isinstance(e, EebenchError) else f"{type(e).__name__}: {first}")[:1000]


# --------------------------------------------------------------------------------- the CLI part
def add_ray_arguments(p) -> None:
    """``--ray-address``, ``--cpus-per-cell``, ``--gpus-per-cell``, ``--max-retries``."""
    p.add_argument("--ray-address", help="an existing Ray cluster (host:port of its head, or 'auto'); default: start Ray here")
    p.add_argument("--cpus-per-cell", type=float, help="CPUs each cell / trial asks Ray for (default 1)")
    p.add_argument("--gpus-per-cell", type=float,
                   help="GPUs each cell / trial asks Ray for; fractions share one (0.5: two per GPU; default 0)")
    p.add_argument("--max-retries", type=int,
                   help="re-runs of a cell / trial whose worker died; it resumes from its checkpoint (default 2)")


_RAY_FLAGS = ("ray_address", "cpus_per_cell", "gpus_per_cell", "max_retries")


def ray_options_from(args) -> RayOptions:
    """RayOptions from parsed CLI flags (unset flags keep RayOptions' defaults)."""
    given = {k: getattr(args, k, None) for k in _RAY_FLAGS}
    given["address"] = given.pop("ray_address")
    return RayOptions(**{k: v for k, v in given.items() if v is not None})


def check_no_ray_flags(args) -> None:
    """Ray flags mean nothing to the local executor: say so instead of ignoring them."""
    given = [f"--{k.replace('_', '-')}" for k in _RAY_FLAGS if getattr(args, k, None) is not None]
    if given:
        raise EebenchError(f"{', '.join(given)} only apply with --executor ray")


def cmd_run_ray(cfg, args) -> list[CellOutcome]:
    """``eebench run --executor ray``."""
    return run_on_ray(cfg, ray_options_from(args))


__all__ = ["RayOptions", "CellOutcome", "CellsFailed", "require_ray", "init_ray", "ray_session", "run_on_ray",
           "add_ray_arguments", "cmd_run_ray"]
