"""Typed training configuration: one set of defaults, YAML files, ``--set`` overrides (engine layer).

A :class:`Config` holds seven frozen sections (data, crops, model, swav, optim, run, debug). The
defaults are the original training script's flag defaults (SPEC §9), so an official launch line
that relies on them behaves the same, with one exception: the precision (``run.precision: auto``, bf16
where supported, else fp32; the original's ``--use_fp16`` defaults to true and fp16 overflow is a known
failure mode, so fp16 is used only on request; see the README's deviations). A config is validated when it is built and never mutated
afterwards; overrides return a new object (:func:`apply_overrides`). Values that depend on the
world size or the data set (global batch, per-rank queue length, steps per epoch) are computed
once by :func:`swav.derived.derive_values` and stored beside the config in the run folder.

Example:
    >>> cfg = apply_overrides(Config(), ["optim.base_lr=0.6", "crops.counts=[2, 6]",
    ...                                  "crops.sizes=[224, 96]", "crops.min_scales=[0.14, 0.05]",
    ...                                  "crops.max_scales=[1, 0.14]"])
    >>> cfg.optim.base_lr, cfg.crops.counts, cfg.num_crops
    (0.6, (2, 6), 8)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from swav.config_coerce import coerce_value

__all__ = [
    "DataConfig", "CropsConfig", "ModelConfig", "SwAVConfig", "OptimConfig", "RunConfig",
    "DebugConfig", "Config", "SECTIONS", "config_from_dict", "config_to_dict", "apply_overrides",
    "with_values", "merge_dict", "parse_override", "load_config_file", "read_config_values", "save_config",
    "config_keys",
    "PIPELINES", "PRECISIONS",
]

PIPELINES = ("auto", "pil", "batched", "tensor", "device")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _fail(key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{key}={value!r} is invalid: expected {expected}")


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise _fail(key, value, expected)


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are loaded (SPEC §7 feeds on this)."""

    path: str | None = None  # folder, IDX/CIFAR files, shards:PATTERN, or a name (fashion-mnist)
    channels: int = 3  # 1 (grey) or 3 (RGB); also the network's input channels
    pipeline: str = "auto"  # auto | pil | batched | tensor (in-memory uint8 data) | device (decode+crop on the GPU)
    workers: int = 10  # DataLoader worker processes per rank
    # make this many batches ahead in a background thread (0 = inline; not for shards); null = auto: 1 for the
    # device pipeline on a GPU (torchvision's GPU decoder blocks the calling thread until the batch is decoded)
    prefetch_batches: int | None = None
    # torch.compile the batched colour stage: true = on any device (on a CPU its hue rotation: the stage 1.1x
    # faster, compiling for 20-30 s at start; needs a C++ compiler, falls back to eager), false = never,
    # null = auto: with run.compile on a GPU (the dense stage: a few fused kernels instead of ~600)
    compile_colour: bool | None = None
    limit: int = 0  # use only the first N images (0 = all); for tests and quick checks
    download: bool = False  # allow torchvision to download a named data set
    max_bad_fraction: float = 0.01  # abort when more of the images are unreadable
    # image files (spread over the folder) decoded before the run writes its output folder, so that data the run
    # would stop on is refused first (with --overwrite, before the old run is removed); 0 = no check
    check_files: int = 64
    # bits per sample of 16-bit image files, grey or colour (8..16): 12 for 12-bit medical or camera data stored
    # in 16-bit PNG/TIFF, so that 0..4095 becomes 0..255 (larger values clipped); null = full 16-bit (0..65535)
    bit_depth: int | None = None
    mean: tuple[float, ...] | None = None  # normalisation; None = ImageNet (RGB) or 0.5 (grey)
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check(self.channels in (1, 3), "data.channels", self.channels, "1 or 3")
        _check(self.pipeline in PIPELINES, "data.pipeline", self.pipeline, f"one of {PIPELINES}")
        for key in ("workers", "limit", "prefetch_batches", "check_files"):
            value = getattr(self, key)
            _check(value is None and key == "prefetch_batches" or value is not None and value >= 0, f"data.{key}",
                   value, "an integer >= 0" + (" or null (auto)" if key == "prefetch_batches" else ""))
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", self.max_bad_fraction,
               "a fraction in [0, 1]")
        _check(self.bit_depth is None or 8 <= self.bit_depth <= 16, "data.bit_depth", self.bit_depth,
               "an integer 8..16 (bits per sample of 16-bit image files, e.g. 12) or null (full 16-bit)")
        for key in ("mean", "std"):
            values = getattr(self, key)
            _check(values is None or len(values) == self.channels, f"data.{key}", values,
                   f"{self.channels} value(s), one per channel")
        _check(self.std is None or all(s > 0 for s in self.std), "data.std", self.std, "values > 0")


@dataclass(frozen=True)
class CropsConfig:
    """Multi-crop (SPEC §7): one entry per resolution in each list (official ``--nmb_crops`` ...)."""

    counts: tuple[int, ...] = (2,)
    sizes: tuple[int, ...] = (224,)
    min_scales: tuple[float, ...] = (0.14,)
    max_scales: tuple[float, ...] = (1.0,)
    color_jitter_strength: float = 1.0  # s: brightness/contrast/saturation 0.8 s, hue 0.2 s
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5

    def __post_init__(self) -> None:
        n = len(self.counts)
        _check(n > 0, "crops.counts", [], "at least one resolution")
        for key in ("sizes", "min_scales", "max_scales"):
            if len(getattr(self, key)) != n:
                raise ValueError(
                    f"crops.{key}={list(getattr(self, key))} has {len(getattr(self, key))} entries but "
                    f"crops.counts={list(self.counts)} has {n}: give one value per resolution")
        for i in range(n):
            _check(self.counts[i] >= 1 and self.sizes[i] >= 1, f"crops.counts[{i}]/sizes[{i}]",
                   (self.counts[i], self.sizes[i]), "integers >= 1")
            lo, hi = self.min_scales[i], self.max_scales[i]
            _check(0 < lo <= 1 and 0 < hi <= 1, f"crops.min_scales[{i}]/max_scales[{i}]", (lo, hi),
                   "fractions in (0, 1]")
            if lo > hi:
                raise ValueError(f"crops.min_scales[{i}]={lo} is larger than crops.max_scales[{i}]={hi}: "
                                 "the minimum crop scale must not exceed the maximum")
        _check(0 <= self.color_jitter_strength <= 1.25, "crops.color_jitter_strength",
               self.color_jitter_strength, "a value in [0, 1.25]")
        for key in ("grayscale_prob", "blur_prob"):
            _check(0 <= getattr(self, key) <= 1, f"crops.{key}", getattr(self, key), "a probability in [0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, projection head and prototypes (SPEC §2, §8); becomes a :class:`ModelSpec`."""

    backbone: str = "resnet50"  # see swav.backbones.available_backbones()
    small_images: bool = False  # 3x3 stride-1 stem without max-pool (CIFAR-sized inputs)
    hidden_dim: int = 2048  # projection head hidden size (0 = one linear layer)
    output_dim: int = 128  # D
    num_prototypes: tuple[int, ...] = (3000,)  # K; several values = several heads
    head_batch_norm: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.backbone), "model.backbone", self.backbone, "a backbone name such as resnet50")
        _check(self.hidden_dim >= 0, "model.hidden_dim", self.hidden_dim, "an integer >= 0 (0 = one linear layer)")
        _check(self.output_dim >= 1, "model.output_dim", self.output_dim, "an integer >= 1")
        _check(bool(self.num_prototypes) and all(k >= 1 for k in self.num_prototypes), "model.num_prototypes",
               self.num_prototypes, "K >= 1 (or a list of them, one per head)")


@dataclass(frozen=True)
class SwAVConfig:
    """Codes, loss, queue and prototype freezing (SPEC §3-§6)."""

    crops_for_assign: tuple[int, ...] = (0, 1)
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    log_domain: bool | None = None  # log-domain Sinkhorn; null = where exp could underflow (eps < 0.025)
    queue_length: int = 0  # global L; 0 = no queue
    queue_start_epoch: int = 15
    freeze_prototypes_steps: int = 313

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "swav.temperature", self.temperature, "a value > 0")
        _check(self.epsilon > 0, "swav.epsilon", self.epsilon, "a value > 0")
        _check(self.sinkhorn_iterations >= 0, "swav.sinkhorn_iterations", self.sinkhorn_iterations,
               "an integer >= 0 (0: the codes are the unbalanced softmax kernel, as the original allows)")
        for key in ("queue_length", "queue_start_epoch", "freeze_prototypes_steps"):
            _check(getattr(self, key) >= 0, f"swav.{key}", getattr(self, key), "an integer >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """SGD + momentum wrapped in LARS, warm-up + cosine learning rate per step (SPEC §9)."""

    epochs: int = 100
    batch_size_per_device: int = 64
    base_lr: float = 4.8
    final_lr: float = 0.0
    warmup_epochs: float = 10.0
    start_warmup: float = 0.0
    weight_decay: float = 1e-6
    momentum: float = 0.9
    lars: bool = True
    trust_coefficient: float = 0.001
    # the global batch base_lr was set for (the recipes state theirs); a run with another global batch is warned
    # that its learning rate may not fit. 0 = not stated, no warning
    lr_global_batch: int = 0

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "optim.epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size_per_device >= 1, "optim.batch_size_per_device", self.batch_size_per_device,
               "an integer >= 1")
        for key in ("base_lr", "final_lr", "start_warmup", "weight_decay"):
            value = getattr(self, key)
            _check(value >= 0 and math.isfinite(value), f"optim.{key}", value, "a finite value >= 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs", self.warmup_epochs,
               f"a value in [0, optim.epochs={self.epochs}] (the warm-up defaults to 10 epochs, as in the official "
               f"recipes: with fewer epochs set --warmup_epochs or --set optim.warmup_epochs=N, e.g. "
               f"{min(self.epochs, max(0.0, round(self.epochs / 10, 2))):g})")
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "a value in [0, 1)")
        _check(self.lr_global_batch >= 0, "optim.lr_global_batch", self.lr_global_batch,
               "an integer >= 0 (0 = not stated)")
        _check(self.trust_coefficient > 0, "optim.trust_coefficient", self.trust_coefficient, "a value > 0")


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes: output, devices, precision, checkpoints, limits."""

    output_dir: str = "."
    seed: int = 31
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto = bf16 where the hardware supports it, else fp32
    channels_last: bool | None = None  # null (auto): on for GPUs and for bf16/fp16, off for fp32 on a CPU
    compile: bool = False  # torch.compile the model
    cudnn_benchmark: bool = True  # CUDA: let cuDNN time its convolution algorithms once per crop size
    sync_bn: bool = True  # SyncBatchNorm when world size > 1
    sync_bn_group_size: int = 8  # ranks per SyncBatchNorm group (official --syncbn_process_group_size); 0 = all
    dist_url: str = "env://"
    dist_timeout_minutes: float = 30.0
    world_size: int = -1  # -1 = from the launcher's environment
    rank: int = -1
    local_rank: int = -1
    checkpoint_every_epochs: int = 1  # resumable checkpoint at every N-th epoch end (0 = never)
    checkpoint_every_steps: int = 0  # ... and every N global steps (0 = never)
    keep_checkpoints: int = 3  # newest step checkpoints kept on disk
    keep_every_epochs: int = 25  # also keep checkpoints/epoch_XXXX.pt every N epochs (official --checkpoint_freq)
    max_steps: int = 0  # stop (and save) after this many global steps; 0 = no limit
    time_budget_minutes: float = 0.0  # stop (and save) after this much time; 0 = no limit
    log_every_steps: int = 50
    nan_check: bool = True  # stop before the optimiser step on NaN/Inf loss or gradients
    # when the step's flags (NaN check, stop signals) reach the host: "step" = in the same step (one host-
    # device sync per step), "deferred" = one step later, without a sync (a non-finite step's update is
    # skipped on the device), "auto" = deferred on CUDA with LARS, else step
    check_sync: str = "auto"
    max_scaler_skips: int = 20  # fp16: consecutive skipped steps that stop the run
    tensorboard: bool = True
    knn_every_epochs: int = 0  # online k-NN monitor on held-out labelled data every N epochs (0 = off)
    knn_train_samples: int = 10000  # k-NN bank size of the monitor (first N training images)
    knn_test_samples: int = 2000  # monitor's evaluation images (first N of the test split)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "run.output_dir", self.output_dir, "a folder path")
        _check(self.precision in PRECISIONS, "run.precision", self.precision, f"one of {PRECISIONS}")
        _check(self.check_sync in ("auto", "step", "deferred"), "run.check_sync", self.check_sync,
               "auto, step or deferred")
        dev = self.device
        ok = dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        _check(ok, "run.device", dev, "auto, cpu, cuda or cuda:N")
        for key in ("checkpoint_every_epochs", "checkpoint_every_steps", "keep_every_epochs", "max_steps",
                    "max_scaler_skips", "knn_every_epochs"):
            _check(getattr(self, key) >= 0, f"run.{key}", getattr(self, key), "an integer >= 0")
        _check(self.sync_bn_group_size >= 0, "run.sync_bn_group_size", self.sync_bn_group_size,
               "an integer >= 1, or 0 for all ranks")
        for key in ("keep_checkpoints", "log_every_steps", "knn_train_samples", "knn_test_samples"):
            _check(getattr(self, key) >= 1, f"run.{key}", getattr(self, key), "an integer >= 1")
        for key in ("time_budget_minutes", "dist_timeout_minutes"):
            _check(getattr(self, key) >= 0, f"run.{key}", getattr(self, key), "a value >= 0")


@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests of the failure paths (issue 8); off by default."""

    inject_nan_step: int = -1  # make the loss NaN in this optimisation step (1-based like step_N.pt; -1 = never)
    inject_nan_rank: int = -1  # only on this rank (-1 = every rank)
    inject_error_step: int = -1  # raise InjectedFailure in this optimisation step (1-based; -1 = never; issue 5)
    inject_error_rank: int = -1  # only on this rank (-1 = every rank)


@dataclass(frozen=True)
class Config:
    """The whole training configuration; cross-section checks run at construction."""

    data: DataConfig = field(default_factory=DataConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    swav: SwAVConfig = field(default_factory=SwAVConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        num_crops = self.num_crops
        ids = self.swav.crops_for_assign
        if num_crops < 2:
            raise ValueError(f"crops.counts={list(self.crops.counts)} gives {num_crops} crop: the swapped "
                             "prediction needs at least 2 crops per image")
        _check(bool(ids), "swav.crops_for_assign", [], "at least one crop id")
        bad = [i for i in ids if not 0 <= i < num_crops]
        if bad:
            raise ValueError(f"swav.crops_for_assign={list(ids)} has ids {bad} out of range: with "
                             f"crops.counts={list(self.crops.counts)} valid ids are 0..{num_crops - 1}")
        _check(len(set(ids)) == len(ids), "swav.crops_for_assign", list(ids), "distinct crop ids")
        q = self.swav.queue_length
        if 0 < q < self.optim.batch_size_per_device:
            raise ValueError(f"swav.queue_length={q} is shorter than one batch "
                             f"(optim.batch_size_per_device={self.optim.batch_size_per_device}): use 0 for no "
                             "queue or a multiple of the global batch size")

    @property
    def num_crops(self) -> int:
        """V, the number of crops per image."""
        return sum(self.crops.counts)


SECTIONS: dict[str, type] = {"data": DataConfig, "crops": CropsConfig, "model": ModelConfig,
                             "swav": SwAVConfig, "optim": OptimConfig, "run": RunConfig, "debug": DebugConfig}


def config_keys() -> list[str]:
    """Every valid ``section.key``, e.g. ``optim.base_lr``."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str) -> ValueError:
    from swav.official_flags import OFFICIAL_FLAGS  # lazy: that module builds on this one

    name = key.rpartition(".")[2]
    official = OFFICIAL_FLAGS.get(name.lstrip("-"), (None,))[0]
    close = [official] if official else difflib.get_close_matches(key, config_keys(), n=3, cutoff=0.5)
    section = key.split(".")[0]
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    if official:
        hint += f"({name!r} is the original --{name.lstrip('-')} flag; config files and --set use the key above) "
    if section in SECTIONS:
        valid = ", ".join(f.name for f in dataclasses.fields(SECTIONS[section]))
        return ValueError(f"unknown config key {key!r}; {hint}valid keys of section {section!r}: {valid}")
    return ValueError(f"unknown config key {key!r}; {hint}valid sections: {', '.join(SECTIONS)}")


def _build_section(name: str, values: Mapping[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(f"{name}.{key}")
        kwargs[key] = coerce_value(value, hints[key], f"{name}.{key}")
        numbers = kwargs[key] if isinstance(kwargs[key], tuple) else (kwargs[key],)
        # no setting takes NaN or an infinity (swav.epsilon=.inf would train on uniform codes without a word)
        _check(all(math.isfinite(v) for v in numbers if isinstance(v, float)), f"{name}.{key}", kwargs[key],
               "finite numbers (not NaN or infinity)" if isinstance(kwargs[key], tuple) else "a finite number (not "
               "NaN or infinity)")
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any] | None) -> Config:
    """Build and validate a :class:`Config` from a nested mapping (missing keys keep defaults)."""
    d = dict(d or {})
    for section, values in d.items():
        if section not in SECTIONS:
            raise _unknown_key(str(section))
        _check(values is None or isinstance(values, Mapping), str(section), values, f"a mapping of {section} keys")
    return Config(**{name: _build_section(name, d.get(name) or {}) for name in SECTIONS})


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples as lists) for YAML, JSON and checkpoints."""
    out: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {f.name: (list(v) if isinstance(v := getattr(section, f.name), tuple) else v)
                     for f in dataclasses.fields(section)}
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``'optim.base_lr=0.6'`` -> ``('optim.base_lr', 0.6)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ValueError(f"override {text!r} is invalid: expected section.key=value, e.g. optim.base_lr=0.6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def with_values(config: Config, values: Mapping[str, Any]) -> Config:
    """A new, validated config with ``{'section.key': value}`` replaced."""
    d = config_to_dict(config)
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in d or name not in d[section]:
            raise _unknown_key(key)
        d[section][name] = value
    return config_from_dict(d)


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Apply ``--set section.key=value`` strings in order (later ones win)."""
    values: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        values[key] = value
    return with_values(config, values) if values else config


def load_config_file(path: str | os.PathLike, base: Config | None = None) -> Config:
    """Read a YAML file (a full or partial config) on top of ``base`` (default: the defaults)."""
    return merge_dict(base or Config(), _read_yaml_mapping(path), source=os.fspath(path))


def read_config_values(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config file (full or partial) as ``{'section.key': value}``, its sections and keys checked but not
    yet its values: for callers that apply more values on top before validating them together (the command
    line's flags and ``--set`` after ``--config``)."""
    return _flatten(_read_yaml_mapping(path), os.fspath(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first at line {seen[key].start_mark.line + 1}): only one "
                    "of them would be used; keep one", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def load_yaml_text(text: Any) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (see :class:`_UniqueKeyLoader`)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml_mapping(path: str | os.PathLike) -> Mapping[str, Any]:
    with open(path, encoding="utf-8") as fh:
        try:
            raw = load_yaml_text(fh)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"config file {os.fspath(path)!r} must hold a mapping of sections, "
                         f"got {type(raw).__name__}")
    return raw


def merge_dict(base: Config, raw: Mapping[str, Any], source: str = "mapping") -> Config:
    """``base`` with every ``section: {key: value}`` of ``raw`` applied (unknown keys are errors)."""
    values = _flatten(raw, source)
    try:
        return with_values(base, values)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _flatten(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``{section: {key: value}}`` -> ``{'section.key': value}``, unknown sections and keys refused."""
    values: dict[str, Any] = {}
    defaults = config_to_dict(Config())
    for section, entries in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"{source}: {_unknown_key(str(section))}")
        if not isinstance(entries, Mapping):
            raise ValueError(f"{source}: section {section!r} must be a mapping, got {entries!r}")
        for key, value in entries.items():
            if str(key) not in defaults[section]:
                raise ValueError(f"{source}: {_unknown_key(f'{section}.{key}')}")
            values[f"{section}.{key}"] = value
    return values


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (readable back with :func:`load_config_file`), atomically: a kill or a
    full disk while writing leaves the previous file, never a truncated one."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config_to_dict(config), fh, sort_keys=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
