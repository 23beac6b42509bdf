"""``foldcp-hpc run job.toml``: fold the job's input on the grid and write Boltz-layout predictions.

Rank 0 reads and featurizes the input (a bad input or job file ends the whole job with one line before the grid
starts); every rank then builds the grid, receives the weights (rank 0 reads the checkpoint, or makes seeded
random weights), and runs the model on its tiles; rank 0 writes the outputs and says where.

Checkpoints (``[checkpoint]``) are written at every recycle's end, every few Pairformer blocks and sampler steps,
and on SIGTERM / SIGUSR1, after which the run exits with code 75 (:data:`~foldcp_hpc.io.checkpoint.EXIT_PREEMPTED`);
``--resume`` continues from the newest complete one, on any grid. ``[output] save`` streams intermediates into
``intermediates_<name>.h5``.

When the input asks for ``properties: affinity`` and ``[model] affinity_checkpoint`` is set, a second pass follows
as in ``boltz predict``: the top-ranked structure is cropped around the ligand (at most 256 tokens), featurized on
rank 0, and folded again on the grid by the affinity model, whose affinity heads write ``affinity_<name>.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, load_job
from .featurize import features_of
from .io.checkpoint import EXIT_PREEMPTED, Preempted
from .progress import Progress

if TYPE_CHECKING:
    from .config import JobConfig

__all__ = ["run_job", "hparams_for"]


def hparams_for(job: "JobConfig") -> dict | None:
    """The Boltz2 hyper-parameters for random weights (None: the checkpoint's own)."""
    from .data.boltz2_hparams import boltz2_hparams, reduced_boltz2_hparams

    if job.model.checkpoint != "random":
        return None
    return reduced_boltz2_hparams() if job.model.architecture == "boltz2-small" else boltz2_hparams()


def confidence_rows(prediction) -> list[dict]:
    """One dict per sample with Boltz-2's summary values (Python floats), confidence_score as boltz computes it:
    4/5 complex pLDDT + 1/5 ipTM, or pTM when every sample's ipTM is zero (single chain)."""
    import torch

    confidences = prediction.confidence
    iptm = torch.cat([c.iptm for c in confidences])
    use_iptm = not torch.allclose(iptm, torch.zeros_like(iptm))
    rows = []
    for conf in confidences:
        interface = conf.iptm if use_iptm else conf.ptm
        row = {"confidence_score": float((4 * conf.complex_plddt + interface) / 5)}
        for key in ("ptm", "iptm", "ligand_iptm", "protein_iptm", "complex_plddt", "complex_iplddt", "complex_pde",
                    "complex_ipde"):
            row[key] = float(getattr(conf, key))
        row["pair_chains_iptm"] = {int(a): {int(b): float(v) for b, v in inner.items()}
                                   for a, inner in conf.pair_chains_iptm.items()}
        rows.append(row)
    return rows


def run_job(job_path: str, overrides: list[str], resume: str | None = None) -> int:
    """Fold the job's input; returns the exit status (0, or EXIT_PREEMPTED after a signal's checkpoint)."""
    job = load_job(job_path, overrides)
    if job.input.path is None:
        raise ConfigError(f"{job.source}: [input] path: required (the Boltz .yaml or .fasta to fold)")
    from mpi4py import MPI

    from .io.checkpoint import StopSignal

    world = MPI.COMM_WORLD
    stop = StopSignal().install()  # from the start: a signal during set-up stops the run at its first block
    progress = Progress(world.Get_rank() == 0)
    progress.say(f"job {job.source}: reading {job.resolve(job.input.path)}")
    progress("features", 0, 1)
    package, parsed, msas = None, None, None
    if world.Get_rank() == 0:
        features, summary, parsed, msas = features_of(job.resolve(job.input.path), job.resolve(job.input.ccd_cache),
                                                      job.input.max_tokens, job.input.max_msa_seqs, keep_parsed=True,
                                                      seed=job.runtime.seed)
        resume_path = _find_resume(job, resume, summary["name"]) if resume is not None else None
        package = (features, summary, _wants_affinity(job, parsed), _identity(job), resume_path)
        if resume is not None and resume_path is None:
            progress.say(f"--resume: no complete checkpoint in {_checkpoint_dir(job, summary['name'])}; starting "
                         "from the beginning")
        for line in _not_applied(job, parsed):
            progress.say(f"note: {line}")
    features, summary, affinity_pass, identity, resume_path = world.bcast(package, root=0)
    try:
        return _fold(job, features, summary, parsed, msas, affinity_pass, identity, resume_path, stop, progress)
    finally:
        stop.uninstall()


def _fold(job: "JobConfig", features, summary: dict, parsed, msas, affinity_pass: bool, identity: str,
          resume_path: Path | None, stop, progress: Progress) -> int:

    import torch

    from .distributed.grid import ProcessGrid
    from .model.precision import Precision

    precision = Precision(job.model.dtype)
    dtype = precision.dtype
    with ProcessGrid.create(job.grid.cp, job.grid.dp, backend=job.runtime.backend,
                            timeout_s=job.runtime.timeout_s) as grid:
        progress.device = grid.device
        progress.say(f"input {summary['name']}: {summary['tokens']} tokens, {summary['atoms']} atoms, "
                     f"{summary['chains']} chains, MSA of {summary['msa_rows']} rows; {grid.dp} x {grid.p}x{grid.p} "
                     f"grid of {grid.world_size} ranks, transport {grid.transport.name}, {job.model.dtype}")
        if job.runtime.self_check:
            _check_collectives(grid, progress)
        model, untrained = _model(job, grid, job.model.checkpoint, hparams_for(job), dtype, progress)
        generator = torch.Generator(device=grid.device).manual_seed(job.runtime.seed)
        sampling = job.sampling
        checkpointer = _checkpointer(job, grid, summary, identity, model, stop, progress)
        resume_point = None
        if resume_path is not None:
            from .io.checkpoint import load_checkpoint

            resume_point = load_checkpoint(resume_path, grid, identity, dtype)
            progress.say(f"resuming from {resume_path} ({resume_point.stage} stage)")
        start = time.perf_counter()
        try:
            with precision.autocast(grid.device):
                prediction = model.predict(
                    features, recycling_steps=sampling.recycling_steps, sampling_steps=sampling.sampling_steps,
                    diffusion_samples=sampling.diffusion_samples, max_parallel_samples=sampling.max_parallel_samples,
                    generator=generator, dtype=dtype, gather_pae=job.output.write_full_pae,
                    gather_pde=job.output.write_full_pde, progress=progress, hooks=checkpointer, resume=resume_point,
                    cuda_graphs=job.runtime.cuda_graphs)
        except Preempted as stopped:
            progress.say(f"{stopped}; exiting with code {EXIT_PREEMPTED}. Resume with: foldcp-hpc run "
                         f"{job.source} --resume {stopped.path.parent}")
            return EXIT_PREEMPTED
        seconds = time.perf_counter() - start
        rows = confidence_rows(prediction)
        del model
        if job.output.save:
            from .io.intermediates import save_intermediates

            path = job.resolve(job.output.dir) / f"intermediates_{summary['name']}.h5"
            save_intermediates(path, grid, prediction, features.n_tokens, job.output.save,
                               attrs={"input": summary["name"], "job": _job_text(job), "dtype": job.model.dtype})
            progress.say(f"wrote intermediates ({', '.join(job.output.save)}) to {path}")
        top_coords = None
        if grid.rank == 0:
            written = _write(job, parsed, prediction, rows, untrained=untrained)
            best = max(rows, key=lambda r: r["confidence_score"])
            progress.say(f"model ran in {seconds:.1f} s; best confidence_score {best['confidence_score']:.4f}")
            progress.say(f"wrote {len(written)} files to {written[0].parent}")
            from .io.predictions import rank_samples

            top = rank_samples([row["confidence_score"] for row in rows]).index(0)  # Boltz's model_0
            top_coords = prediction.coords[top].float().cpu().numpy()
        del prediction
        if affinity_pass:
            _affinity(job, grid, parsed, msas, top_coords, precision, progress)
        _report(job, grid, summary["name"], progress)
    return 0


def _report(job: "JobConfig", grid, name: str, progress: Progress) -> None:
    """The per-stage time and memory table (min / median / max over ranks) in the log and as JSON."""
    import json

    from .progress import format_report, stage_report

    report = stage_report(progress, grid.comm)
    if report is None:
        return
    report.update({"input": name, "grid": {"dp": grid.dp, "p": grid.p}, "transport": grid.transport.name,
                   "dtype": job.model.dtype, "total_seconds": round(progress.elapsed(), 3)})
    path = job.resolve(job.output.dir) / f"run_report_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    for line in format_report(report):
        progress.say(line)
    progress.say(f"wrote {path}")


def _identity(job: "JobConfig") -> str:
    """What a checkpoint must agree with to be resumed by this job (not the grid: a resume may change it)."""
    import dataclasses
    import hashlib

    from .io.checkpoint import fingerprint

    data = Path(job.resolve(job.input.path)).read_bytes()
    return fingerprint({"input": hashlib.sha256(data).hexdigest(), "model": dataclasses.asdict(job.model),
                        "sampling": dataclasses.asdict(job.sampling), "seed": job.runtime.seed,
                        "max_msa_seqs": job.input.max_msa_seqs})


def _job_text(job: "JobConfig") -> str:
    return Path(job.source).read_text() if job.source != "<defaults>" else ""


def _checkpoint_dir(job: "JobConfig", name: str) -> Path:
    if job.checkpoint.dir is not None:
        return job.resolve(job.checkpoint.dir)
    return job.resolve(job.output.dir) / "checkpoints" / name


def _find_resume(job: "JobConfig", resume: str, name: str) -> Path | None:
    """The checkpoint ``--resume`` names (it must exist), or, with ``--resume`` alone, the newest complete one of
    the job's checkpoint folder if there is one (None: start from the beginning, as a batch job's first start)."""
    from .io.checkpoint import CheckpointError, find_checkpoint

    if resume:
        return find_checkpoint(Path(resume).expanduser())
    try:
        return find_checkpoint(_checkpoint_dir(job, name))
    except CheckpointError:
        return None


def _checkpointer(job: "JobConfig", grid, summary: dict, identity: str, model, stop, progress: Progress):
    from .io.checkpoint import Checkpointer

    cfg = job.checkpoint
    return Checkpointer(grid=grid, directory=_checkpoint_dir(job, summary["name"]), identity=identity,
                        n_tokens=summary["tokens"], blocks=model.trunk.pairformer_module.num_blocks,
                        recycling_steps=job.sampling.recycling_steps, every_blocks=cfg.every_blocks,
                        every_steps=cfg.every_steps, keep=cfg.keep, stop=stop, say=progress.say,
                        enabled=cfg.enabled, attrs={"input": summary["name"], "grid_p_writer": grid.p,
                                                    "job": _job_text(job), "model": job.model.checkpoint
                                                    if job.model.checkpoint != "random"
                                                    else f"random ({job.model.architecture})"})


def _model(job: "JobConfig", grid, checkpoint: str, hparams: dict | None, dtype, progress: Progress,
           stage: str = "weights"):
    """The model on every rank (rank 0 reads the checkpoint or makes random weights); returns (model, untrained)."""
    from .data.weights import load_weights
    from .model.boltz2 import FoldModel

    source = checkpoint if checkpoint == "random" else job.resolve(checkpoint)
    progress(stage, 0, 1)
    weights = load_weights(grid, source, hparams, seed=job.runtime.seed)
    progress.say(f"weights: {weights.source}" + (" (UNTRAINED: outputs are not predictions)"
                                                 if weights.untrained else ""))
    hp = dict(weights.hparams)
    if hp.get("affinity_prediction"):
        hp["affinity_mw_correction"] = job.model.affinity_mw_correction  # boltz predict's load-time override
    model = FoldModel(hp, grid=grid)
    model.load_boltz_state(weights.state_dict)
    untrained = weights.untrained
    del weights
    return model.to(device=grid.device, dtype=dtype).eval(), untrained


def _affinity(job: "JobConfig", grid, parsed, msas, top_coords, precision, progress: Progress) -> None:
    """The affinity pass: rank 0 crops and featurizes the top-ranked structure; the grid folds the crop with the
    affinity model; rank 0 writes ``affinity_<name>.json``."""
    import torch

    from .data.affinity import affinity_features
    from .data.boltz2_hparams import with_affinity
    from .io.predictions import count_tokens, write_affinity

    package = None
    if grid.rank == 0:
        n_valid = len(parsed.target.structure.remove_invalid_chains().atoms)
        features, _ = affinity_features(parsed, msas, top_coords[:n_valid], seed=job.runtime.seed)
        package = features
        progress.say(f"affinity: {features.n_tokens} of {count_tokens(parsed.target.structure)} tokens around the "
                     f"ligand, {int(features.atom['atom_pad_mask'].sum())} atoms")
    features = grid.comm.bcast(package, root=0)
    checkpoint = job.model.affinity_checkpoint
    hparams = None
    if checkpoint == "random":  # the affinity model's architecture on the job's (or the released) structure model
        from .data.boltz2_hparams import boltz2_hparams

        small = job.model.architecture == "boltz2-small"
        hparams = with_affinity(hparams_for(job) or boltz2_hparams(), pairformer_blocks=2 if small else 8)
    model, untrained = _model(job, grid, checkpoint, hparams, precision.dtype, progress,
                              stage="affinity pass: weights")
    if not model.affinity_prediction:
        raise ConfigError(f"{job.source}: [model] affinity_checkpoint: {checkpoint} has no affinity heads "
                          "(affinity_prediction is off in its hyper-parameters)")
    sampling = job.sampling
    generator = torch.Generator(device=grid.device).manual_seed(job.runtime.seed)
    start = time.perf_counter()
    with precision.autocast(grid.device):
        prediction = model.predict(features, recycling_steps=sampling.affinity_recycling_steps,
                                   sampling_steps=sampling.affinity_sampling_steps,
                                   diffusion_samples=sampling.affinity_diffusion_samples, max_parallel_samples=1,
                                   generator=generator, dtype=precision.dtype, cuda_graphs=job.runtime.cuda_graphs,
                                   progress=lambda stage, done, total, detail="": progress(
                                       f"affinity pass: {stage}", done, total, detail))
    if grid.rank == 0:
        values = {key: value.float().cpu() for key, value in prediction.affinity.items()}
        path = write_affinity(job.resolve(job.output.dir), parsed.target.record.id, values, untrained=untrained)
        progress.say(f"affinity pass ran in {time.perf_counter() - start:.1f} s; affinity_pred_value "
                     f"{float(values['affinity_pred_value']):.4f}, affinity_probability_binary "
                     f"{float(values['affinity_probability_binary']):.4f}; wrote {path}")


def _wants_affinity(job: "JobConfig", parsed) -> bool:
    return getattr(parsed.target.record, "affinity", None) is not None and job.model.affinity_checkpoint is not None


def _check_collectives(grid, progress: Progress) -> None:
    """``[runtime] self_check``: every tile collective on a known tensor, exact on every rank, before any work."""
    from .distributed.selfcheck import self_check

    results = self_check(grid)
    bad = [r.name for r in results if not r.ok]
    if bad:
        raise RuntimeError(f"collective self-check failed on the {grid.p}x{grid.p} grid: {', '.join(bad)}")
    progress.say(f"collective self-check: {len(results)}/{len(results)} exact")


def _not_applied(job: "JobConfig", parsed) -> list[str]:
    """What ``boltz predict`` would do for this input that this run will not."""
    notes = []
    record = parsed.target.record
    if getattr(record, "affinity", None) is not None and job.model.affinity_checkpoint is None:
        notes.append("the input asks for affinity (properties: affinity) but [model] affinity_checkpoint is not "
                     "set, so no affinity_*.json is written")
    options = record.inference_options
    forced = [c for c in ((options.pocket_constraints or []) + (options.contact_constraints or []) if options else [])
              if c[-1]]
    forced_templates = [t for t in (record.templates or []) if getattr(t, "force", False)]
    if forced or forced_templates:
        notes.append(f"{len(forced)} constraint(s) and {len(forced_templates)} template(s) set force: true; boltz "
                     "predict then steers sampling with guidance potentials, which are not implemented here (the "
                     "constraints and templates still condition the model as in Boltz-2)")
    return notes


def _write(job: "JobConfig", parsed, prediction, rows: list[dict], untrained: bool) -> list[Path]:
    """Rank 0: the Boltz-layout files of every sample."""
    import torch

    from .io.predictions import write_predictions

    name = parsed.target.record.id
    plddt = torch.cat([c.plddt for c in prediction.confidence]).float().cpu().numpy()
    pae = prediction.pae.float().cpu().numpy() if prediction.pae is not None else None
    pde = prediction.pde.float().cpu().numpy() if prediction.pde is not None else None
    return write_predictions(job.resolve(job.output.dir), name, parsed.target.structure,
                             prediction.coords.float().cpu().numpy(), plddt, rows, pae=pae, pde=pde,
                             output_format=job.output.format, untrained=untrained)
