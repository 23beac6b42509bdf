"""The per-rank memory model of a run: what each stage holds, from the sizes of the input, the grid and the dtype.

Pure arithmetic (no torch, no MPI): any rank count, any input size, answered at once.

Per-rank sizes (the rank holding the most: rank (0, 0) of the grid, which owns the first atom windows)
--------------------------------------------------------------------------------------------------
* ``n = ceil(N / p)`` tokens per block; a pair tile ``[n, n, C]`` costs ``C`` channels of the unit
  ``pair = n^2 * b`` bytes (b: bytes per element of the dtype); one tile of z is ``C_z = 128`` channels.
* ``token = N * b``: a replicated token tensor costs ``C`` channels of it (s and s_inputs: 384).
* Atom windows: the M atoms (padded to 32) form ``W = M / 32`` windows split over the p^2 ranks of a replica,
  ``w = ceil(W / p^2)`` on the fullest rank; ``window = w * 32 * 128 * b`` (the window pairs, as the atom
  pair tensor ``p`` [w, 32, 128, atom_z] and the window logits use them) and ``atom = (32 w + 96) * b`` (own
  atoms plus the 48-atom halo on either side).
* ``msa = ceil(S / p) * n * b``: the MSA block of S rows.
* ``pair_x``: ``pair`` on grids with p > 1, else 0 (a tile exchanged with the mirror rank needs a receive
  buffer; at p = 1 the transpose is local).
* ``one``: 1 MiB (index tensors and communication buffers of a call that do not grow with the sizes).

Each stage's transient (the bytes a call holds above what was live before it: its inputs excluded, its
output and every intermediate included, as :mod:`foldcp_hpc.bench.memory` measures) is a sum of these units
times channel counts (:data:`COEFFICIENTS`), or the largest of several such moments where the stage peaks at
different places for small and large tiles (the Pairformer's triangle multiplication against its single
track; the diffusion conditioning's pairwise conditioner, atom encoder and token-transformer bias). Where
the code fixes the size of a term (a kept output, the bias of ``depth x heads`` channels and its row chunks,
the in-place Pairformer layer's 1.64 tiles, measured on the CPU at 64 x 64 tiles and on an H100 at N = 4,096
and 10,240), the term is written down; the remaining coefficients were fitted (least squares on relative error
plus the largest error, non-negative) to the stages measured with :func:`foldcp_hpc.bench.stages.
measure_stages` on the development machine: float32, Boltz-2's widths with 1 block each, a 4- or 24-layer
token transformer, synthetic proteins of N = 32 ... 256 tokens (8.2 atoms per token) with 8 to 128 MSA rows,
on 1, 4 and 9 ranks (21 runs), all of it the inference path (autograd off: pair ops in place, whole-tile
computations in 1/16-tile row chunks). The stages a plan reports are predicted within the tolerances that
``tests/test_plan.py`` and ``tests/test_plan_mpi.py`` check; the trunk's sub-stages, whose in-place chunks are
coarse at these small tiles, less closely (the trunk is composed from them below). At large N the chunks are
the fractions above and the written terms dominate.

A run's per-rank peak is the weights (every rank holds all of them) plus, for each stage, what is held while
it runs (the features, the trunk's outputs, the conditioning kept for sampling; written from shapes) plus
its transient; the total is the largest stage. Host memory of rank 0's featurization is not device memory
and is reported apart.

Assumptions: Boltz-2's widths (C_s 384, C_z 128, c_m 64, atom 128/16, 16 single-track heads, triangle
attention 4 x 32) for any block counts; the chunk budgets of the model's modules (below); templates, when
present, are estimated from the template module's shapes (not calibrated: the calibration inputs have none).
For dtypes other than float32 every term is scaled by the element size; the parts the model computes in
float32 whatever the dtype (logits, the triangle-multiplication contraction) would make a bfloat16 run
somewhat larger than this scaling says.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

__all__ = ["Architecture", "Problem", "StagePeak", "MemoryPlan", "DTYPE_BYTES", "COEFFICIENTS", "CHUNKS",
           "units", "stage_transients", "plan_memory", "largest_tokens", "smallest_grid", "samples_per_step",
           "BOLTZ2_PARAMETERS", "BOLTZ2_SMALL_PARAMETERS"]

GIB = 1024**3
MIB = 1024**2
#: bf16-mixed keeps float32 weights and float32 z between layers; its bfloat16 transients are no larger than the
#: calibrated float32 ones, so it is planned as float32. "bfloat16" is a what-if (everything stored in bfloat16).
DTYPE_BYTES = {"float64": 8, "float32": 4, "bf16-mixed": 4, "bfloat16": 2}

#: Parameters FoldModel holds for the released Boltz-2 (``Boltz2``'s 506,724,992 less the 24,640 of the
#: b-factor head, which Boltz-2 does not use at inference); checked against the model by tests/test_plan.py.
BOLTZ2_PARAMETERS = 506_700_352
#: The same for ``boltz2-small`` (``reduced_boltz2_hparams()``).
BOLTZ2_SMALL_PARAMETERS = 43_655_744

#: The chunking the model's modules use (module constants; named here so that the report can say them).
CHUNKS = {
    "triangle multiplication": "in place: 128 channels in 4 groups on one rank, 16 on a grid (one Cannon ring "
                               "each), projections and output gating on 1/16 of the rows at a time",
    "triangle attention": "in place: query rows (columns for the ending node) in chunks whose projections stay "
                          "within 1/8 of a tile; logits within 1/8 of a tile without the GPU kernel",
    "transitions": "in place: rows in chunks whose hidden activations stay within 1/8 of the input",
    "pair init / conditioning / confidence input": "rows in chunks whose widest intermediate stays within 1/16 "
                                                    "of a tile",
    "outer product mean": "query rows in chunks whose [i, j, 32 x 32] products stay within 1/16 of a tile",
}

#: Channel counts per unit, per stage and per moment (stage -> moment -> unit -> channels; see the module
#: docstring for the units and how the counts were fitted). A stage's transient is its largest moment.
COEFFICIENTS: dict[str, dict[str, dict[str, float]]] = {
    # own atom windows: pair features [w, 32, 128, 16] and their MLP, the window attention of the atom
    # transformer; plus the bias output (exact, added in stage_transients)
    "input_embedder": {"atom encoder": {"window": 50.4, "token": 8.3, "one": 0.1}},
    # z_init and the relative-position tile (kept), and the row chunks' one-hot features (int64, 139 wide)
    "pair_init": {"row chunks": {"pair": 323.8, "token": 0.8}},
    # the updated tile and the PairformerNoSeq layer after the outer product mean (~2.6 tiles) against the
    # pair-weighted averaging (z normalised in row chunks), whose values [8 heads, S_c, n, 32] and Cannon ring of
    # them grow with the MSA block
    "msa_module": {"pair stack": {"pair": 329.0, "msa": 356.2, "token": 8.0, "one": 0.0},
                   "pair-weighted averaging": {"pair": 0.0, "msa": 1825.4, "token": 1363.9}},
    # the triangle multiplication in place: ~1.64 tiles (the product, one channel group's a and b, a row chunk's
    # projections; measured); the single track: the pair bias from row chunks, the [16, n, n] logits, and the
    # replicated s work
    "pairformer": {"triangle multiplication": {"pair": 210.0, "pair_x": 0.0},
                   "single track": {"pair": 131.5, "token": 793.5, "one": 0.0}},
    # z + z^T and the [n, n, 64] logits; at p > 1 the mirror rank's tile arrives in a buffer
    "distogram": {"logits": {"pair": 192.7, "pair_x": 64.5}},
    # the pairwise conditioner's transitions (z, its update and a row chunk's hidden layer: 4.25 tiles); z
    # conditioned (1 tile) and the atom encoder's window pairs; the token-bias moment is written from the shapes
    # in stage_transients (its rows are chunked within half a tile)
    "conditioning": {"pairwise conditioner": {"pair": 544.0, "pair_x": 98.4, "token": 12.3},
                     "atom encoder": {"pair": 128.0, "window": 62.9, "atom": 0.1, "one": 0.2},
                     "token bias": {"one": 0.1}},
    # one denoising call of one sample: per-tile logits of the token transformer, the atom windows of the
    # encoder and decoder, the gathered token activations [N, 768]
    "sampler_step": {"token transformer and atoms": {"pair": 2.0, "window": 26.6, "atom": 142.6, "token": 814.6}},
    # the sample's pair input and a Pairformer layer (~2.7 tiles) against the heads (PAE / PDE logits and their
    # expected values in row chunks)
    "confidence": {"pairformer": {"pair": 344.3, "token": 689.2, "atom": 83.2, "pair_x": 70.7},
                   "heads": {"pair": 1.9, "pair_x": 0.0, "token": 1248.9, "one": 0.0}},
}


@dataclass(frozen=True)
class Architecture:
    """The block counts and head counts that change per-rank memory (widths are Boltz-2's).

    n_parameters: parameters every rank holds (FoldModel's).
    """

    n_parameters: int = BOLTZ2_PARAMETERS
    pairformer_blocks: int = 64
    msa_blocks: int = 4
    confidence_blocks: int = 8
    token_transformer_depth: int = 24
    token_transformer_heads: int = 16
    embedder_atom_depth: int = 3
    atom_encoder_depth: int = 3
    atom_decoder_depth: int = 3
    atom_heads: int = 4
    use_templates: bool = True
    template_dim: int = 64
    c_s: int = 384
    c_z: int = 128
    num_bins: int = 64

    def __post_init__(self) -> None:
        if (self.c_s, self.c_z, self.num_bins) != (384, 128, 64):
            raise ValueError(f"the memory model is calibrated for Boltz-2's widths (C_s 384, C_z 128, 64 distogram "
                             f"bins), got C_s {self.c_s}, C_z {self.c_z}, {self.num_bins} bins")

    @classmethod
    def from_hparams(cls, hp: dict[str, Any], n_parameters: int) -> "Architecture":
        """From ``Boltz2`` hyper-parameters (``boltz2_hparams()`` or a checkpoint's)."""
        score = hp["score_model_args"]
        return cls(n_parameters=n_parameters, pairformer_blocks=hp["pairformer_args"]["num_blocks"],
                   msa_blocks=hp["msa_args"]["msa_blocks"],
                   confidence_blocks=(hp["confidence_model_args"]["pairformer_args"]["num_blocks"]
                                      if hp.get("confidence_prediction", True) else 0),
                   token_transformer_depth=score["token_transformer_depth"],
                   token_transformer_heads=score["token_transformer_heads"],
                   embedder_atom_depth=hp["embedder_args"]["atom_encoder_depth"],
                   atom_encoder_depth=score["atom_encoder_depth"], atom_decoder_depth=score["atom_decoder_depth"],
                   atom_heads=score["atom_encoder_heads"], use_templates=hp.get("use_templates", False),
                   template_dim=hp.get("template_args", {}).get("template_dim", 64), c_s=hp["token_s"],
                   c_z=hp["token_z"], num_bins=hp["num_bins"])


@dataclass(frozen=True)
class Problem:
    """What is folded: N tokens, M atoms (padded to a multiple of 32), S MSA rows, templates present."""

    n_tokens: int
    n_atoms: int
    msa_rows: int = 1
    templates: int = 0

    def __post_init__(self) -> None:
        if self.n_tokens < 1 or self.n_atoms < 1 or self.msa_rows < 1 or self.templates < 0:
            raise ValueError(f"a problem needs N >= 1 tokens, M >= 1 atoms and S >= 1 MSA rows, got N={self.n_tokens}, "
                             f"M={self.n_atoms}, S={self.msa_rows}, {self.templates} templates")

    @property
    def padded_atoms(self) -> int:
        return -(-self.n_atoms // 32) * 32

    def scaled(self, n_tokens: int) -> "Problem":
        """The same kind of input with ``n_tokens`` tokens (atoms in proportion, the same MSA depth)."""
        return replace(self, n_tokens=n_tokens, n_atoms=max(1, round(self.n_atoms * n_tokens / self.n_tokens)))


def units(problem: Problem, p: int, dtype_bytes: int) -> dict[str, float]:
    """The byte units of the module docstring for the fullest rank of a p x p grid."""
    if p < 1:
        raise ValueError(f"grid side p must be positive, got {p}")
    b = dtype_bytes
    n = -(-problem.n_tokens // p)
    windows = problem.padded_atoms // 32
    w = -(-windows // (p * p))
    return {"pair": n * n * b, "pair_x": n * n * b if p > 1 else 0.0, "token": problem.n_tokens * b,
            "atom": (32 * w + 96) * b, "window": w * 32 * 128 * b, "msa": -(-problem.msa_rows // p) * n * b,
            "one": MIB}


def samples_per_step(diffusion_samples: int, max_parallel_samples: int, dp: int = 1) -> int:
    """Samples one denoising call takes on the fullest replica. One replica: Boltz's sampler splits the samples
    into ``diffusion_samples % max_parallel_samples + 1`` chunks (``AtomDiffusion.sample``, kept as Boltz has it).
    dp replicas: each takes ``replica_share`` of the samples (the first ⌈S / dp⌉) in calls of at most
    ``max_parallel_samples``."""
    if diffusion_samples < 1 or max_parallel_samples < 1 or dp < 1:
        raise ValueError(f"samples must be positive, got diffusion_samples={diffusion_samples}, "
                         f"max_parallel_samples={max_parallel_samples}, dp={dp}")
    if dp > 1:
        return min(-(-diffusion_samples // dp), max_parallel_samples)
    chunks = min(diffusion_samples, diffusion_samples % max_parallel_samples + 1)
    return -(-diffusion_samples // chunks)


@dataclass
class StageTransient:
    """One stage's transient: ``bytes`` and the named parts of its largest moment (for "what dominates")."""

    bytes: float
    parts: dict[str, float]


def _moments(stage: str, u: dict[str, float], extra: Optional[dict[str, dict[str, float]]] = None) -> StageTransient:
    """The largest moment of ``stage``: its calibrated coefficients plus, per moment, the exact terms ``extra``
    (moment -> unit -> channels)."""
    best: Optional[StageTransient] = None
    for name, moment in COEFFICIENTS[stage].items():
        coefficients = dict(moment)
        for unit, channels in (extra or {}).get(name, {}).items():
            coefficients[unit] = coefficients.get(unit, 0.0) + channels
        parts = {k: c * u[k] for k, c in coefficients.items() if c * u[k] > 0}
        total = sum(parts.values())
        if best is None or total > best.bytes:
            best = StageTransient(total, parts)
    return best


def stage_transients(problem: Problem, p: int, dtype_bytes: int, arch: Architecture,
                     samples: int = 1) -> dict[str, StageTransient]:
    """Each stage's transient on the fullest rank (what ``foldcp_hpc.bench.stages`` measures, same names):
    input_embedder, pair_init, msa_module, pairformer, distogram, trunk, conditioning, sampler_step (one
    denoising call of ``samples`` samples), confidence (one sample, its pair input included)."""
    u = units(problem, p, dtype_bytes)
    out: dict[str, StageTransient] = {}
    # the atom encoder's bias for the embedder's atom transformer: [w, 32, 128, depth x heads], an output
    out["input_embedder"] = _moments("input_embedder", u,
                                     {"atom encoder": {"window": arch.embedder_atom_depth * arch.atom_heads}})
    out["pair_init"] = _moments("pair_init", u)
    out["msa_module"] = _moments("msa_module", u) if arch.msa_blocks else StageTransient(0.0, {})
    out["pairformer"] = _moments("pairformer", u) if arch.pairformer_blocks else StageTransient(0.0, {})
    out["distogram"] = _moments("distogram", u)
    out["trunk"] = _trunk(problem, u, arch, out)
    out["conditioning"] = _moments("conditioning", u, {"token bias": _token_bias(arch)})
    step = _moments("sampler_step", u)
    out["sampler_step"] = StageTransient(step.bytes * samples, {k: v * samples for k, v in step.parts.items()})
    out["confidence"] = _moments("confidence", u) if arch.confidence_blocks else StageTransient(0.0, {})
    return out


def _token_bias(arch: Architecture) -> dict[str, float]:
    """The conditioning's last moment, from the shapes (``DiffusionConditioning._token_bias``): z conditioned (128
    channels), the bias being written [n, n, depth x heads], and a row chunk's per-layer projections and their
    concatenation (2 x depth x heads channels on a fraction 8 / (128 + depth x heads) of the rows); still held:
    the atom pair features [w, 32, 128, 16], the atom biases [w, 32, 128, (encoder + decoder depth) x heads]
    and q, c [m, 128]."""
    width = arch.token_transformer_depth * arch.token_transformer_heads
    rows = min(1.0, 8 / (128 + width))  # row chunks within 1/16 of a tile (inference)
    return {"pair": 128 + width * (1 + 2 * rows),
            "window": 16 + (arch.atom_encoder_depth + arch.atom_decoder_depth) * arch.atom_heads,
            "atom": 2 * 128}


def _trunk(problem: Problem, u: dict[str, float], arch: Architecture, t: dict[str, StageTransient]) -> StageTransient:
    """The whole trunk call: the largest of its steps plus what the trunk holds around each (``Trunk.forward``):
    s_inputs and s_init (2 x 384 token channels) from the pair initialisation on; then also s and z (one more
    token, one tile); a recycle rebuilds z_init's rows and updates z in place, a row chunk at a time, so no tile
    of z_init is held."""
    s_tokens = 384 * u["token"]
    tile = 128 * u["pair"]
    held = 3 * s_tokens + tile
    steps = {"input_embedder": t["input_embedder"].bytes,
             # the stage measured alone keeps the relative-position tile, which the trunk does not make
             "pair_init": 2 * s_tokens + t["pair_init"].bytes - tile,
             # z_norm and z_recycle of a row chunk (1/16 of a tile) at a time, into z
             "recycle": held + tile / 8 + s_tokens + _templates(problem, u, arch),
             "msa_module": held + t["msa_module"].bytes,
             "pairformer": held + t["pairformer"].bytes,
             "distogram": held + t["distogram"].bytes}
    name = max(steps, key=steps.get)
    return StageTransient(steps[name], {name: steps[name]})


def _templates(problem: Problem, u: dict[str, float], arch: Architecture) -> float:
    """The template module with templates present (estimate from its shapes: v [T, n, n, template_dim] through
    a pair stack of that width, 4.375 of its tiles per template, plus the normalised z)."""
    if not arch.use_templates or problem.templates == 0:
        return 0.0
    return (128 + problem.templates * arch.template_dim * (1 + 4.375)) * u["pair"]


@dataclass
class StagePeak:
    """One row of the plan: the per-rank device bytes while ``stage`` runs (``held`` + ``transient``) and what
    dominates them."""

    stage: str
    held: float
    transient: float
    dominant: str

    @property
    def peak(self) -> float:
        return self.held + self.transient


@dataclass
class MemoryPlan:
    """Per-rank peak memory of a whole run on a dp x p x p grid (bytes)."""

    problem: Problem
    p: int
    dp: int
    dtype: str
    samples: int
    weights: float
    stages: list[StagePeak] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Weights plus the largest stage."""
        return self.weights + max(s.peak for s in self.stages)

    @property
    def peak_stage(self) -> StagePeak:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def ranks(self) -> int:
        return self.dp * self.p * self.p

    def fits(self, memory: float) -> bool:
        return self.total <= memory


def feature_bytes(problem: Problem, p: int, dtype_bytes: int, has_msa_module: bool = True) -> float:
    """Device bytes of one rank's features as the model reads them (``Features.model_inputs`` and the tiles):
    per token 369 bytes of integer features and 42 floats, per atom 73 bytes and 7 floats, 7 bytes per pair of
    the pair-feature tile, 25 bytes per entry of the MSA block."""
    b = dtype_bytes
    n = -(-problem.n_tokens // p)
    one_d = problem.n_tokens * (369 + 42 * b) + problem.padded_atoms * (73 + 7 * b)
    msa = 25 * -(-problem.msa_rows // p) * n if has_msa_module else 0
    return one_d + 7 * n * n + msa


def plan_memory(problem: Problem, arch: Architecture, p: int, dtype: str = "float32", dp: int = 1,
                samples: int = 1) -> MemoryPlan:
    """The per-stage per-rank peaks of a run (see the module docstring); ``samples``: samples per denoising call
    (:func:`samples_per_step`)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    if dp < 1:
        raise ValueError(f"replica count dp must be positive, got {dp}")
    b = DTYPE_BYTES[dtype]
    u = units(problem, p, b)
    t = stage_transients(problem, p, b, arch, samples)
    tile = 128 * u["pair"]
    s_tokens = 384 * u["token"]
    features = feature_bytes(problem, p, b, arch.msa_blocks > 0)
    plan = MemoryPlan(problem, p, dp, dtype, samples, weights=arch.n_parameters * b)
    z_tiles = lambda x: f"{x / tile:.2f} tiles of z" if tile else ""  # noqa: E731

    def label(parts: dict[str, float]) -> str:
        if not parts:
            return "-"
        unit, value = max(parts.items(), key=lambda kv: kv[1])
        words = {"pair": f"pair tiles ({z_tiles(value)})", "pair_x": "tile exchange buffers",
                 "token": "replicated token tensors [N, C]", "atom": "atom activations (own windows + halo)",
                 "window": "atom-window pairs and logits", "msa": "MSA block activations",
                 "one": "fixed buffers"}
        return words.get(unit, unit)

    plan.stages.append(StagePeak("features", 0.0, features, "1-D token and atom features" if
                                 problem.n_tokens * 1000 > 7 * (problem.n_tokens / p) ** 2 else "pair-feature tile"))
    trunk_held = features
    rows = [("trunk: input embedder", trunk_held, t["input_embedder"]),
            ("trunk: pair init", trunk_held + 2 * s_tokens, t["pair_init"]),
            ("trunk: recycling", trunk_held + 3 * s_tokens + tile,
             StageTransient(tile / 8 + s_tokens + _templates(problem, u, arch), {"pair": tile / 8})),
            ("trunk: MSA module", trunk_held + 3 * s_tokens + tile, t["msa_module"]),
            ("trunk: Pairformer", trunk_held + 3 * s_tokens + tile, t["pairformer"]),
            ("trunk: distogram", trunk_held + 3 * s_tokens + tile, t["distogram"])]
    for name, held, transient in rows:
        plan.stages.append(StagePeak(name, held, transient.bytes, label(transient.parts)))
    # the trunk's outputs: s_inputs, s, z and the distogram logits [n, n, 64]
    outputs = features + 2 * s_tokens + tile + 64 * u["pair"]
    plan.stages.append(StagePeak("diffusion conditioning", outputs, t["conditioning"].bytes,
                                 label(t["conditioning"].parts)))
    kept = (arch.token_transformer_depth * arch.token_transformer_heads * u["pair"]
            + (arch.atom_encoder_depth + arch.atom_decoder_depth) * arch.atom_heads * u["window"]
            + 2 * 128 * u["atom"])
    coords = 3 * 3 * samples * problem.padded_atoms * b
    plan.stages.append(StagePeak(f"sampler step ({samples} sample{'s' if samples > 1 else ''})",
                                 outputs + kept + coords, t["sampler_step"].bytes, label(t["sampler_step"].parts)))
    if arch.confidence_blocks:
        plan.stages.append(StagePeak("confidence (per sample)", outputs + coords, t["confidence"].bytes,
                                     label(t["confidence"].parts)))
    return plan


def largest_tokens(problem: Problem, arch: Architecture, p: int, memory: float, dtype: str = "float32",
                   samples: int = 1) -> int:
    """The largest N (atoms in the input's proportion, the same MSA depth) whose run fits ``memory`` bytes per
    rank on a p x p grid; 0 when not even one token fits (the weights alone may not)."""
    def fits(n: int) -> bool:
        return plan_memory(problem.scaled(n), arch, p, dtype, samples=samples).fits(memory)

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > 1 << 26:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def smallest_grid(problem: Problem, arch: Architecture, memory: float, dtype: str = "float32", samples: int = 1,
                  max_p: int = 64) -> Optional[int]:
    """The smallest p whose p x p grid fits ``memory`` bytes per rank, or None up to ``max_p`` (the weights alone
    may not fit, or the replicated O(N) tensors)."""
    for p in range(1, max_p + 1):
        if plan_memory(problem, arch, p, dtype, samples=samples).fits(memory):
            return p
    return None
