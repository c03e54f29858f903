"""The run folder: refuse to overwrite another run, clear it on request, check a resume is compatible.

A folder "holds a run" when it has ``config.yaml`` or checkpoint files (issue 8):

* ``--overwrite`` deletes the run's files (nothing else) and starts again; ``--resume`` continues it.
* Neither flag: if the folder holds an *unfinished* run of exactly this config (the same command
  again, e.g. after ``kill -9``, a crash or a requeued cluster job) it is continued from its newest
  valid checkpoint, with a WARNING (item 1). Any other run there, or a finished one, is refused with
  :class:`RunExistsError` (item 10), naming what differs.

Resuming from a checkpoint whose architecture, crops or prototype count differ from the config is
refused with every difference listed (item 6), unless a partial load is asked for
(:func:`partial_resume_checkpoint`); other differences are listed in a WARNING.

While a run trains, its rank 0 holds :class:`RunLock` (a POSIX lock on ``<run>/.swav.lock``), so
that the same command started twice does not make two processes train into one folder; the
operating system drops the lock when the process ends, however it ends (``kill -9`` included).

Example:
    >>> import tempfile
    >>> from swav.config import Config, config_to_dict, with_values
    >>> saved = config_to_dict(Config())
    >>> fatal, soft = resume_differences(saved, with_values(Config(), {"model.num_prototypes": 100,
    ...                                                                "optim.base_lr": 0.6}))
    >>> fatal, soft
    (['model.num_prototypes: checkpoint [3000], config [100]'], ['optim.base_lr: checkpoint 4.8, config 0.6'])
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swav.checkpoint import checkpoint_dir, final_checkpoint_path, list_checkpoints
from swav.config import Config, config_to_dict, load_config_file
from swav.sinkhorn import needs_log_domain
from swav.usage import UsageError

__all__ = ["RunExistsError", "RUN_FILES", "holds_run", "clear_run", "check_run_folder", "resume_differences",
           "run_differences", "resume_refusal", "partial_resume_checkpoint", "count_bad_images", "FATAL_KEYS",
           "SAME_RUN_IGNORED_KEYS", "RunLock", "RunLockedError", "bad_images_offset"]

logger = logging.getLogger(__name__)

#: files and folders a run writes (what --overwrite removes)
RUN_FILES = ("config.yaml", "derived.json", "metrics.jsonl", "train.log", "model.pt", "summary.json",
             "bad_images.txt", "checkpoints", "tensorboard")
#: config keys that must match for a resume: they change the model's shapes or the meaning of the codes
FATAL_KEYS = ("model.backbone", "model.small_images", "model.hidden_dim", "model.output_dim",
              "model.num_prototypes", "model.head_batch_norm", "data.channels", "crops.counts", "crops.sizes",
              "swav.crops_for_assign",
              "optim.lars")  # LARS and plain SGD keep different optimiser states
_IGNORED_SECTIONS = ("run", "debug")
_IGNORED_KEYS = ("data.workers", "data.pipeline", "data.download", "data.compile_colour", "data.check_files",
                 "optim.lr_global_batch")
#: keys that may differ between the processes of one job, or name the folder itself: ignored when deciding
#: whether a folder holds "this same run" (everything else must be equal for an automatic resume)
SAME_RUN_IGNORED_KEYS = ("run.output_dir", "run.rank", "run.local_rank",
                         # where a job meets and how many it is: a requeued SLURM job may start on another
                         # first node (official launch lines pass --dist_url tcp://$master_node:40000) or with
                         # another node count (the engine re-splits the queues on resume)
                         "run.dist_url", "run.dist_timeout_minutes", "run.world_size",
                         # what is checked before a start, not how the run trains
                         "data.check_files", "optim.lr_global_batch",
                         # the memory layout, not what is trained (folders of older versions hold false, now null)
                         "run.channels_last",
                         # limits of one invocation (never taken over from config.yaml), and debug hooks
                         "run.max_steps", "run.time_budget_minutes")


class RunExistsError(FileExistsError):
    """The output folder already holds a run and neither --resume nor --overwrite was given."""


class RunLockedError(RunExistsError):
    """Another live process is training in this output folder."""


class RunLock:
    """Exclusive lock on ``<output_dir>/.swav.lock`` while a run trains (``fcntl.lockf``, non-blocking).

    POSIX record locks belong to the process: data-loader workers forked from it do not keep the lock
    after it dies, and nothing stale is left behind. Works on local disks and NFS with lock support.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with RunLock(folder):
        ...     pass
    """

    def __init__(self, output_dir: str | os.PathLike, activity: str = "training") -> None:
        self.path = Path(output_dir) / ".swav.lock"
        self.activity = activity
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating the folder if needed); a no-op when this object holds it already."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunLockedError(f"another process ({holder}) is using {str(self.path.parent)!r} right now; wait "
                                 "for it to end (or stop it), or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, {self.activity}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_run(output_dir: str | os.PathLike) -> bool:
    folder = Path(output_dir)
    return (folder / "config.yaml").is_file() or bool(list_checkpoints(folder)) or \
        (checkpoint_dir(folder).is_dir() and any(checkpoint_dir(folder).iterdir()))


def clear_run(output_dir: str | os.PathLike) -> list[str]:
    """Delete the files a run writes (see :data:`RUN_FILES`); other files in the folder stay."""
    removed = []
    for name in RUN_FILES:
        path = Path(output_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            removed.append(name)
        elif path.exists() or path.is_symlink():
            path.unlink()
            removed.append(name)
    return removed


def check_run_folder(output_dir: str | os.PathLike, *, resume: bool, overwrite: bool,
                     config: Config | None = None) -> bool:
    """Decide what to do with ``output_dir``; True when the run there is to be continued.

    Raises :class:`RunExistsError` if the folder holds a run and neither flag allows touching it. With
    ``config`` given and neither flag, an unfinished run of the same config is continued (see the module
    docstring); without ``config`` any run there is refused.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other (Python: resume=True and overwrite=True): "
                         "continue the run or replace it")
    if resume:
        return True
    if overwrite or not holds_run(output_dir):
        return False
    folder = os.fspath(output_dir)
    finished = final_checkpoint_path(output_dir).is_file()
    differences = _differences_to_folder(output_dir, config) if config is not None else ["(not compared)"]
    if not differences and not finished:  # the caller says so once it holds the folder's lock
        return True
    if not differences:
        raise RunExistsError(f"output folder {folder!r} already holds a run of this same config, and it is complete "
                             "(checkpoints/final.pt): nothing to do. --resume confirms that without an error; "
                             "--overwrite trains it again; or choose another --output-dir (Python: resume=True, "
                             "overwrite=True, or another run.output_dir)")
    if differences == ["(not compared)"]:
        why = " (config.yaml or checkpoints/)"
    else:
        shown = "; ".join(differences[:5]) + (f"; ... {len(differences) - 5} more" if len(differences) > 5 else "")
        why = f" of another config ({shown})"
    if not list_checkpoints(output_dir) and not (Path(output_dir) / "model.pt").exists():
        raise RunExistsError(f"output folder {folder!r} holds a run{why} that saved no checkpoint (a start that "
                             "failed, or one stopped early), so nothing trained there would be lost: pass --overwrite "
                             "to start this config there, or choose another --output-dir (Python: "
                             "swav.pretrain(..., overwrite=True), or another run.output_dir)")
    if finished:
        raise RunExistsError(f"output folder {folder!r} already holds a complete run{why}: a finished run cannot be "
                             "continued with other settings. Pass --overwrite to replace it, or choose another "
                             "--output-dir (Python: swav.pretrain(..., overwrite=True), or another run.output_dir)")
    raise RunExistsError(f"output folder {folder!r} already holds a run{why}. Pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --output-dir (Python: swav.pretrain(..., resume=True) "
                         "or overwrite=True, or another run.output_dir)")


def _differences_to_folder(output_dir: str | os.PathLike, config: Config) -> list[str]:
    saved = Path(output_dir) / "config.yaml"
    if not saved.is_file():
        return ["config.yaml: missing"]
    try:
        return run_differences(config_to_dict(load_config_file(saved)), config)
    except (ValueError, OSError) as exc:  # unreadable, or written by another swav version
        return [f"config.yaml: unreadable ({exc})"]


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    flat = {f"{section}.{key}": value for section, values in d.items() if isinstance(values, dict)
            for key, value in values.items()}
    if "swav.log_domain" in flat and flat["swav.log_domain"] is None:  # compare what runs: null is automatic
        flat["swav.log_domain"] = needs_log_domain(float(flat.get("swav.epsilon", 0.05)))
    return flat


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resume_differences(saved_config: dict[str, Any], config: Config) -> tuple[list[str], list[str]]:
    """``(fatal, soft)`` lists of ``'key: checkpoint X, config Y'`` between a checkpoint's config and ``config``."""
    # a key the checkpoint lacks was added to swav after it was written: the run had its default's behaviour
    old = {**_flatten(config_to_dict(Config())), **_flatten(saved_config)}
    new = _flatten(config_to_dict(config))
    fatal, soft = [], []
    for key in sorted(set(old) | set(new), key=lambda k: list(new).index(k) if k in new else len(new)):
        if key.split(".")[0] in _IGNORED_SECTIONS or key in _IGNORED_KEYS:
            continue
        a, b = _norm(old.get(key, "<absent>")), _norm(new.get(key, "<absent>"))
        if a != b:
            (fatal if key in FATAL_KEYS else soft).append(f"{key}: checkpoint {a}, config {b}")
    return fatal, soft


def run_differences(saved_config: dict[str, Any], config: Config) -> list[str]:
    """Every ``'key: folder X, this command Y'`` between a saved config and ``config`` (all sections).

    Only :data:`SAME_RUN_IGNORED_KEYS` and ``debug.*`` are left out: an empty list means "the same command again".
    """
    old, new = _flatten(saved_config), _flatten(config_to_dict(config))
    keys = [key for key in sorted(set(old) | set(new))
            if key not in SAME_RUN_IGNORED_KEYS and not key.startswith("debug.")]
    return [f"{key}: folder {_norm(old.get(key, '<absent>'))}, this command {_norm(new.get(key, '<absent>'))}"
            for key in keys if _norm(old.get(key, "<absent>")) != _norm(new.get(key, "<absent>"))]


def resume_refusal(ckpt: dict[str, Any], config: Config, spec: dict[str, Any], path: str) -> str:
    """Why ``ckpt`` cannot be resumed with ``config`` (model spec ``spec``), or '' when it can (item 6).

    Checked before anything in the run folder is written, so that a refused resume changes nothing.
    """
    fatal, _ = resume_differences(ckpt.get("config", {}), config)
    saved_spec = ckpt.get("model_spec") or {}
    fatal = fatal or [f"model_spec.{k}: checkpoint {saved_spec.get(k)}, config {v}" for k, v in spec.items()
                      if saved_spec and saved_spec.get(k) != v]
    if not fatal:
        return ""
    return (f"checkpoint {path} was trained with a different model or crops; refusing to resume. Differences:\n  "
            + "\n  ".join(fatal) + "\nUse the original settings, start a new run (another --output-dir or "
            "--overwrite), or load what fits with a partial resume (--resume --partial; Python: swav.pretrain(..., partial=True))")


def partial_resume_checkpoint(ckpt: dict[str, Any], config: Config, model: nn.Module,
                              optimizer: torch.optim.Optimizer, *, source: str = "checkpoint") -> dict[str, Any]:
    """A copy of ``ckpt`` that fits ``config`` and ``model``: the partial load of a resume (issue 8, item 6).

    Model tensors whose name and shape match are taken from the checkpoint, the others keep ``model``'s
    fresh values (a WARNING lists both the differences and the skipped tensors). The optimiser state is
    kept only if every saved buffer still has its parameter's shape, the queue only if the model and
    crops did not change; position, RNG and scaler continue. A checkpoint that fits already is returned
    unchanged.
    """
    from swav.interop import diff_state_dict

    fatal, _ = resume_differences(ckpt.get("config", {}), config)
    spec = model.spec.to_dict() if getattr(model, "spec", None) is not None else {}
    diff = diff_state_dict(model.state_dict(), ckpt["model"])
    if not fatal and not diff and (not ckpt.get("model_spec") or ckpt.get("model_spec") == spec):
        return ckpt
    fresh = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    mismatched = {k for k, _, _ in diff.mismatched}
    merged = {k: (ckpt["model"][k] if k in ckpt["model"] and k not in mismatched else v) for k, v in fresh.items()}
    spec_differs = bool(ckpt.get("model_spec")) and ckpt.get("model_spec") != spec
    why = ("the run was trained with a different model or crops:\n  " + "\n  ".join(fatal)) if fatal else \
        "the model spec differs" if spec_differs else "the file's model tensors do not match the model's"
    logger.warning("PARTIAL resume from %s (%s)\n"
                   "%d of %d model tensors loaded; freshly initialised: %s; ignored from the file: %s", source,
                   why, len(fresh) - len(diff.skipped()), len(fresh),
                   ", ".join(diff.skipped()) or "none", ", ".join(diff.unexpected) or "none")
    adapted = dict(ckpt, model=merged, model_spec=spec)
    old = ckpt.get("config") or {}
    now = config_to_dict(config)
    adapted["config"] = {section: dict(values, **{k: now[section][k] for k in values
                                                  if f"{section}.{k}" in FATAL_KEYS and section in now})
                         if isinstance(values, dict) else values for section, values in old.items()}
    if not _optimizer_state_fits(ckpt.get("optimizer") or {}, model):
        logger.warning("PARTIAL resume: the optimiser state does not fit the new parameters; it starts afresh")
        adapted["optimizer"] = optimizer.state_dict()
    if fatal or diff:
        adapted["queues"] = [None] * len(ckpt.get("queues") or [None])
    return adapted


def _optimizer_state_fits(state: dict[str, Any], model: nn.Module) -> bool:
    params = list(model.parameters())
    saved = [i for group in state.get("param_groups", []) for i in group.get("params", [])]
    if len(saved) != len(params):
        return False
    for index, param in zip(saved, params):
        buffers = state.get("state", {}).get(index, {})
        if any(isinstance(b, torch.Tensor) and b.dim() > 0 and b.shape != param.shape for b in buffers.values()):
            return False
    return True


def bad_images_offset(output_dir: str | os.PathLike) -> int:
    """The size of the run's ``bad_images.txt`` now (0 when there is none): where this invocation's lines begin."""
    try:
        return (Path(output_dir) / "bad_images.txt").stat().st_size
    except OSError:
        return 0


def count_bad_images(output_dir: str | os.PathLike, *, deduplicate: bool = False, since: int = 0) -> int:
    """Distinct unreadable image files listed in the run's ``bad_images.txt`` (0 when there is none); with
    ``since`` (a :func:`bad_images_offset`), only those listed after that point (this invocation's).

    Every data-loader worker appends the files it met, so a file can be listed more than once;
    ``deduplicate=True`` (the main process at the end of a run) rewrites the list with each file once, in
    order of discovery.
    """
    path = Path(output_dir) / "bad_images.txt"
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        if since:
            fh.seek(since)
        lines = list(dict.fromkeys(line.rstrip("\n") for line in fh if line.strip()))
    if since:
        return len(lines)
    if deduplicate:
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    return len(lines)
