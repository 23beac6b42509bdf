"""Job files: TOML -> frozen dataclasses, one section per component.

Each section is a frozen dataclass whose fields carry their documentation in ``metadata["doc"]`` (and
allowed values in ``metadata["choices"]``). :func:`load_job` reads a TOML file, applies
``section.key=value`` overrides from the command line, checks every value and rejects unknown
sections and keys with a did-you-mean suggestion. Errors are :class:`ConfigError` with one line that
names the file and the field.

Each component receives only its own section (``job.grid``, ``job.runtime``), never the whole job.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .distributed.transport import TRANSPORTS
from .errors import UniformError

__all__ = ["ConfigError", "GridConfig", "RuntimeConfig", "InputConfig", "ModelConfig", "SamplingConfig", "OutputConfig",
           "CheckpointConfig", "JobConfig", "load_job", "parse_overrides"]


class ConfigError(UniformError):
    """A job file or override is wrong; the message names the file and the field."""


@dataclass(frozen=True)
class _AtLeast:
    """A field check: ``value >= low`` (``> low`` when strict); unset (None) passes.

    A class rather than a lambda so that docs/config.md can print the bound (``allowed``).
    """

    low: int
    strict: bool = False

    @property
    def allowed(self) -> str:
        return f"> {self.low}" if self.strict else f">= {self.low}"

    def __call__(self, value: Any) -> str | None:
        if value is None or (value > self.low if self.strict else value >= self.low):
            return None
        if self.strict and self.low == 0:
            return f"must be positive, got {value}"
        return f"must be {'more than' if self.strict else 'at least'} {self.low}, got {value}"


_positive = _AtLeast(0, strict=True)


def _doc(text: str, choices: Sequence[str] | None = None, check: Any = None) -> dict[str, Any]:
    """Field metadata: its documentation, allowed values, and a check returning an error text or None."""
    meta: dict[str, Any] = {"doc": text}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if check is not None:
        meta["check"] = check
    return meta


@dataclass(frozen=True)
class GridConfig:
    """``[grid]``: how the ranks are laid out (dp replicas of a p x p context-parallel grid)."""

    cp: int | None = field(default=None, metadata=_doc(
        "Side of the context-parallel grid (p x p ranks per replica). Unset: inferred from the rank count and dp.",
        check=_positive))
    dp: int = field(default=1, metadata=_doc(
        "Number of data-parallel replicas of the grid. The replicas split the diffusion samples (sampling and "
        "confidence; the results are the same as one replica's); each runs the trunk on its own grid.",
        check=_positive))


@dataclass(frozen=True)
class RuntimeConfig:
    """``[runtime]``: communication backend, timeouts and determinism."""

    backend: str = field(default="auto", metadata=_doc(
        "How tensors travel: nccl (one GPU per rank), gloo (CPU), host (GPU compute, messages staged through "
        "host memory; more ranks than GPUs), auto (nccl if every rank has a GPU, host if GPUs are shared, "
        "else gloo).", TRANSPORTS))
    timeout_s: float = field(default=600.0, metadata=_doc(
        "Seconds a collective may wait before torch.distributed gives up.", check=_positive))
    seed: int = field(default=0, metadata=_doc("Seed of the random generator shared by all ranks."))
    self_check: bool = field(default=True, metadata=_doc(
        "Run the collective self-check (exactness of every tile collective) at start-up."))
    cuda_graphs: bool = field(default=True, metadata=_doc(
        "On a one-rank grid on a GPU, replay each sampler step's score model from a CUDA graph (recorded at the "
        "second step; the same arithmetic, without the CPU's per-kernel launch cost)."))


@dataclass(frozen=True)
class InputConfig:
    """``[input]``: what to fold and where the offline CCD molecules are cached."""

    path: str | None = field(default=None, metadata=_doc(
        "Boltz input: a .yaml (Boltz's schema) or a .fasta file; relative paths are read from the job file's folder."))
    ccd_cache: str = field(default="~/.cache/foldcp_hpc/ccd", metadata=_doc(
        "Folder of CCD molecules in Boltz's mols/ layout (a Boltz cache's mols/ folder works); molecules missing "
        "there are built from biotite's CCD and added."))
    max_tokens: int | None = field(default=None, metadata=_doc(
        "Refuse inputs with more tokens than this (unset: no limit).", check=_positive))
    max_msa_seqs: int = field(default=8192, metadata=_doc(
        "Rows read from each chain's MSA file (Boltz's --max_msa_seqs).", check=_positive))


ARCHITECTURES = ("boltz2", "boltz2-small")
SAVE_CHOICES = ("s_inputs", "trunk_s", "trunk_z", "distogram", "pae", "pde", "plddt")
DTYPES = ("float32", "float64", "bf16-mixed")  # foldcp_hpc.model.precision.PRECISIONS (torch-free here)
OUTPUT_FORMATS = ("mmcif", "pdb")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: which weights, which architecture, which precision."""

    checkpoint: str = field(default="random", metadata=_doc(
        "A Boltz-2 checkpoint (boltz2_conf.ckpt, as boltz downloads it), or \"random\" for seeded random weights "
        "(every output is then labelled untrained)."))
    architecture: str = field(default="boltz2", metadata=_doc(
        "With random weights: boltz2 (the released sizes) or boltz2-small (the same widths with 2 Pairformer "
        "blocks, 1 MSA block, 2 token-transformer layers, 1 atom layer, 1 confidence block, 2 blocks in each "
        "random affinity model: demos and tests). A "
        "checkpoint brings its own architecture.", ARCHITECTURES))
    dtype: str = field(default="float32", metadata=_doc(
        "Floating-point precision of the model. bf16-mixed is boltz predict's own: float32 weights and "
        "activations between layers, matrix products and attention in bfloat16 under autocast (the fast GPU "
        "path, Triton kernels on CUDA); float64 is for checks.", DTYPES))
    affinity_checkpoint: str | None = field(default=None, metadata=_doc(
        "Boltz-2's affinity checkpoint (boltz2_aff.ckpt), or \"random\" for seeded random weights of its "
        "architecture; used when the input asks for properties: affinity (unset: no affinity is predicted)."))
    affinity_mw_correction: bool = field(default=False, metadata=_doc(
        "Apply Boltz's molecular-weight correction to the affinity value (boltz predict --affinity_mw_correction)."))


@dataclass(frozen=True)
class SamplingConfig:
    """``[sampling]``: Boltz's prediction settings (the defaults are ``boltz predict``'s)."""

    recycling_steps: int = field(default=3, metadata=_doc("Trunk recycling steps.", check=_AtLeast(0)))
    sampling_steps: int = field(default=200, metadata=_doc("Diffusion sampler steps.", check=_AtLeast(2)))
    diffusion_samples: int = field(default=1, metadata=_doc("Structures sampled per input.", check=_positive))
    max_parallel_samples: int = field(default=5, metadata=_doc(
        "Samples denoised together (Boltz's chunking of the samples).", check=_positive))
    affinity_recycling_steps: int = field(default=5, metadata=_doc(
        "Trunk recycling steps of the affinity pass (boltz predict uses 5).",
        check=_AtLeast(0)))
    affinity_sampling_steps: int = field(default=200, metadata=_doc(
        "Diffusion sampler steps of the affinity pass (boltz predict --sampling_steps_affinity).",
        check=_AtLeast(2)))
    affinity_diffusion_samples: int = field(default=5, metadata=_doc(
        "Structures sampled in the affinity pass; affinity is predicted on the one with the best ipTM (boltz "
        "predict --diffusion_samples_affinity).", check=_positive))


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``: where and what to write."""

    dir: str = field(default="foldcp_results", metadata=_doc(
        "Output folder (relative to the job file's folder); predictions go to <dir>/predictions/<input name>/."))
    format: str = field(default="mmcif", metadata=_doc("Structure file format.", OUTPUT_FORMATS))
    write_full_pae: bool = field(default=False, metadata=_doc("Also write the full PAE matrices (pae_*.npz)."))
    write_full_pde: bool = field(default=False, metadata=_doc("Also write the full PDE matrices (pde_*.npz)."))
    save: tuple[str, ...] = field(default=(), metadata=_doc(
        "Intermediates to stream, tile by tile, into <dir>/intermediates_<input name>.h5 (docs/hdf5-layout.md): "
        "s_inputs, trunk_s, trunk_z, distogram, pae, pde, plddt.", SAVE_CHOICES))


@dataclass(frozen=True)
class CheckpointConfig:
    """``[checkpoint]``: when the run saves the state it can resume from (``foldcp-hpc run --resume``)."""

    enabled: bool = field(default=True, metadata=_doc(
        "Write checkpoints (at every recycle's end, every_blocks Pairformer blocks and every_steps sampler steps) "
        "and one on SIGTERM / SIGUSR1 before exiting with code 75."))
    dir: str | None = field(default=None, metadata=_doc(
        "Checkpoint folder (relative to the job file's folder); unset: <output dir>/checkpoints/<input name>."))
    every_blocks: int = field(default=64, metadata=_doc(
        "Also checkpoint after every this many Pairformer blocks within a recycle (each checkpoint writes z: "
        "N x N x 128 values over the ranks).", check=_positive))
    every_steps: int = field(default=50, metadata=_doc("Checkpoint after every this many sampler steps.",
                                                      check=_positive))
    keep: int = field(default=2, metadata=_doc("Complete checkpoints kept (older ones are deleted).",
                                               check=_positive))


@dataclass(frozen=True)
class JobConfig:
    """A whole job: one attribute per section."""

    grid: GridConfig = field(default_factory=GridConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    input: InputConfig = field(default_factory=InputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    source: str = field(default="<defaults>", compare=False, metadata={"internal": True})

    def resolve(self, path: str) -> Path:
        """A path from the job file, made absolute against the job file's folder (``~`` expanded)."""
        candidate = Path(path).expanduser()
        if candidate.is_absolute() or self.source == "<defaults>":
            return candidate
        return Path(os.path.normpath(Path(self.source).parent / candidate))


SECTIONS: dict[str, type] = {"grid": GridConfig, "runtime": RuntimeConfig, "input": InputConfig,
                             "model": ModelConfig, "sampling": SamplingConfig, "output": OutputConfig,
                             "checkpoint": CheckpointConfig}


# ------------------------------------------------------------------------------------------------------------
def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known: {', '.join(sorted(options))})"


def _convert(value: Any, annotation: Any, where: str, choices: Sequence[str] | None) -> Any:
    """Check ``value`` against a field annotation (int, float, str, bool, or X | None)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    elif annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif typing.get_origin(annotation) is tuple:  # tuple[str, ...]: a TOML list of strings
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
        for item in value:
            if choices is not None and item not in choices:
                close = difflib.get_close_matches(item, list(choices), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}: {item!r} is not one of {', '.join(choices)}{hint}")
        return tuple(value)
    if choices is not None and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _build_section(cls: type, table: Mapping[str, Any], source: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        where = f"{source}: [{section}] {key}"
        if key not in fields:
            raise ConfigError(f"{source}: [{section}] has no key {key!r}{_suggest(key, list(fields))}")
        values[key] = _convert(value, hints[key], where, fields[key].metadata.get("choices"))
        check = fields[key].metadata.get("check")
        problem = check(values[key]) if check is not None else None
        if problem:
            raise ConfigError(f"{where}: {problem}")
    return cls(**values)


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["grid.cp=3", "runtime.backend=gloo"]`` -> ``{"grid": {"cp": 3}, "runtime": {"backend": "gloo"}}``.

    Values are read as TOML values (``3``, ``true``, ``"x"``); a bare word that is not valid TOML is a string.
    """
    tables: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"command line: override {item!r} must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        tables.setdefault(section, {})[name] = value
    return tables


def load_job(path: str | Path | None, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a job file (or only defaults when ``path`` is None) and apply ``section.key=value`` overrides.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown section or key, or a bad value; one line naming
            the file and the field.
    """
    source = "<defaults>" if path is None else str(path)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such job file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for section, table in parse_overrides(overrides).items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"{source}: {section!r} must be a table [{section}]")
        data[section].update(table)
    sections = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]{_suggest(name, list(SECTIONS))}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name!r} must be a table [{name}], got {table!r}")
        sections[name] = _build_section(SECTIONS[name], table, source, name)
    job = JobConfig(**sections, source=source)
    if job.model.checkpoint != "random" and job.model.architecture != "boltz2":
        raise ConfigError(f"{source}: [model] architecture: {job.model.architecture!r} applies to random weights; "
                          "a checkpoint brings its own architecture (leave architecture unset)")
    return job
