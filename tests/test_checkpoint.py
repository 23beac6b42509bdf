"""Checkpoints, walltime signals and resume, end to end under mpirun (crambin + SAH; a checkpoint of Boltz-2's
reduced architecture with narrow channels, every weight perturbed so that every layer counts in the outputs:
boltz2-small's random weights took twice as long a run).

* SIGTERM to every rank mid-trunk: exit code 75 after a checkpoint; the newest checkpoint truncated on purpose is
  passed over for the one before; the resumed run's files equal an uninterrupted run's byte for byte (CPU, same
  2 x 2 grid).
* SIGUSR1 mid-sampling on a 3 x 3 grid, resumed on 2 x 2: the trunk's s and z (``[output] save``) equal the
  uninterrupted run's exactly, and the structures within float rounding (the 3 x 3 run itself starts from the
  uninterrupted 2 x 2 run's last trunk checkpoint: the grid changes twice).
* A checkpoint of another job (another seed) is refused. (``[output] save``'s intermediates: tests/test_demo.py.)
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest

from boltz_reference import narrow_boltz2_hparams
from conftest import REPO, mpirun, mpirun_popen
from test_weights import lightning_checkpoint

FOLDCP = str(REPO / ".venv" / "bin" / "foldcp-hpc")
EXIT_PREEMPTED = 75
SAVE_TRUNK = 'output.save=["trunk_s", "trunk_z"]'  # not part of the job's identity: runs may differ in it


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    lightning_checkpoint(folder / "model.ckpt", hparams=narrow_boltz2_hparams(), perturb=True)
    (folder / "in.yaml").write_text(textwrap.dedent("""
        version: 1
        sequences:
          - protein:
              id: A
              sequence: TTCCPSIVARSNFNVCRLPGTPEAICATYTGCIIIPGATCPGDYAN
              msa: empty
          - ligand:
              id: B
              ccd: SAH
    """))
    (folder / "job.toml").write_text(textwrap.dedent(f"""
        [runtime]
        self_check = false
        [input]
        path = "in.yaml"
        [model]
        checkpoint = "{folder / 'model.ckpt'}"
        [sampling]
        recycling_steps = 1
        sampling_steps = 16
        diffusion_samples = 2
        max_parallel_samples = 2
        [checkpoint]
        every_blocks = 1
        every_steps = 4
    """))
    return folder / "job.toml"


@pytest.fixture(scope="module")
def uninterrupted(job, tmp_path_factory):
    """The job run through on 2 x 2; returns its output folder. It keeps every checkpoint (``keep`` is not part of
    the job's identity): the SIGUSR1 test starts from its last trunk checkpoint."""
    out = tmp_path_factory.mktemp("full")
    done = mpirun(4, FOLDCP, "run", str(job), f"output.dir={out}", "checkpoint.keep=100", SAVE_TRUNK, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def run_until(ranks: int, job, out, marker: str, signum: int, *args: str) -> tuple[int, str]:
    """Start the job (``args`` added), send ``signum`` to every rank once ``marker`` is printed; returns (exit
    code, log)."""
    process = mpirun_popen(ranks, FOLDCP, "run", str(job), f"output.dir={out}", *args)
    lines = []
    deadline = time.monotonic() + 600
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            # the ranks (not mpirun): what Slurm signals at the walltime
            subprocess.run(["pkill", f"-{signal.Signals(signum).name[3:]}", "-f", f"bin/python .*foldcp-hpc run .*{out}"])
            break
        assert time.monotonic() < deadline, "".join(lines[-20:])
    rest, _ = process.communicate(timeout=300)
    return process.returncode, "".join(lines) + rest


def test_sigterm_mid_trunk_then_resume_is_bitwise(job, uninterrupted, tmp_path):
    out = tmp_path / "out"
    code, log = run_until(4, job, out, "checkpoint trunk after block 1 of recycle 1", signal.SIGTERM)
    assert code == EXIT_PREEMPTED, log[-3000:]
    assert "stopped on a signal" in log and "exiting with code 75" in log
    folder = out / "checkpoints" / "in"
    checkpoints = sorted(folder.glob("ckpt-*.h5"))
    assert len(checkpoints) == 2, checkpoints  # keep = 2
    newest, previous = checkpoints[-1], checkpoints[-2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short, as a kill mid-write would
    done = mpirun(4, FOLDCP, "run", str(job), f"output.dir={out}", "--resume", timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming from {previous}" in done.stdout
    produced, full = out / "predictions" / "in", uninterrupted / "predictions" / "in"
    names = sorted(p.name for p in full.iterdir())
    assert names == sorted(p.name for p in produced.iterdir()) and len(names) == 6
    for name in names:
        assert (produced / name).read_bytes() == (full / name).read_bytes(), name

    # the checkpoints left belong to this job: another seed (another job) refuses them with one line
    refused = mpirun(4, FOLDCP, "run", str(job), f"output.dir={out}", "runtime.seed=7", "--resume", timeout=300)
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if line.startswith("foldcp-hpc:")]
    assert refused.returncode not in (0, EXIT_PREEMPTED) and len(lines) == 1, lines
    assert "written by another job" in lines[0]


def test_sigusr1_mid_sampling_on_3x3_resumes_on_2x2(job, uninterrupted, tmp_path):
    import h5py
    from biotite.structure.io.pdbx import CIFFile, get_structure

    out = tmp_path / "out"
    # the 3 x 3 run starts where the 2 x 2 run's trunk ended (9 oversubscribed ranks spent 13 s on the trunk)
    start = tmp_path / "start"
    start.mkdir()
    trunk_end = sorted(p for p in (uninterrupted / "checkpoints" / "in").glob("ckpt-0*.h5") if "." not in p.stem)[-1]
    for part in trunk_end.parent.glob(f"{trunk_end.stem}*"):  # with the rank files of a fallback checkpoint
        shutil.copy(part, start)
    code, log = run_until(9, job, out, "checkpoint sampling after sampler step 4", signal.SIGUSR1, f"--resume={start}")
    assert code == EXIT_PREEMPTED, log[-3000:]
    assert f"resuming from {start / trunk_end.name} (trunk stage)" in log, log[-3000:]
    done = mpirun(4, FOLDCP, "run", str(job), f"output.dir={out}", f"--resume={out / 'checkpoints' / 'in'}",
                  SAVE_TRUNK, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(sampling stage)" in done.stdout
    # the trunk's s and z went 2 x 2 -> 3 x 3 -> 2 x 2 through two checkpoints untouched: the same values in the
    # same places (the structures below compare only within the sampler's rounding, which would pass a z
    # transposed on the way)
    with h5py.File(out / "intermediates_in.h5", "r") as ours, h5py.File(uninterrupted / "intermediates_in.h5",
                                                                          "r") as reference:
        for name in ("/trunk/s", "/trunk/z"):
            assert np.array_equal(ours[name][()], reference[name][()]), name
    produced, full = out / "predictions" / "in", uninterrupted / "predictions" / "in"
    for k in range(2):
        ours = get_structure(CIFFile.read(str(produced / f"in_model_{k}.cif")), model=1).coord
        reference = get_structure(CIFFile.read(str(full / f"in_model_{k}.cif")), model=1).coord
        assert np.abs(ours - reference).max() <= 1e-2 * np.abs(reference).max()
        ours_plddt = np.load(produced / f"plddt_in_model_{k}.npz")["plddt"]
        reference_plddt = np.load(full / f"plddt_in_model_{k}.npz")["plddt"]
        np.testing.assert_allclose(ours_plddt, reference_plddt, atol=1e-3)
        scores = [json.loads((folder / f"confidence_in_model_{k}.json").read_text())["confidence_score"]
                  for folder in (produced, full)]
        assert abs(scores[0] - scores[1]) <= 1e-3

