"""jobs/: every script parses (bash -n), every TOML job loads, and the Slurm script's requeue logic works with
stand-ins for srun, scontrol and scancel (serial, no scheduler needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from foldcp_hpc.config import load_job
from conftest import REPO

SCRIPTS = sorted([*(REPO / "jobs").glob("*.sh"), *(REPO / "jobs").glob("*.sbatch")])
TOML_JOBS = sorted((REPO / "jobs").glob("*.toml"))


def test_the_launch_scripts_exist():
    assert {"slurm.sbatch", "pbs.sh", "mpirun.sh"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_parses_and_states_its_assumptions(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    header = script.read_text().split("\nset ", 1)[0]
    assert "Assumption" in header or "assum" in header.lower(), f"{script.name}: no assumptions in its header"


@pytest.mark.parametrize("job", TOML_JOBS, ids=[p.name for p in TOML_JOBS])
def test_toml_job_loads(job):
    assert load_job(job).source == str(job)


def test_slurm_script_directives():
    text = (REPO / "jobs" / "slurm.sbatch").read_text()
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in directives
    assert "#SBATCH --signal=B:USR1@600" in directives
    assert "#SBATCH --gpus-per-node=4" in directives and "#SBATCH --ntasks-per-node=4" in directives
    assert "EX_TEMPFAIL=75" in text and "srun --mpi=pmix" in text
    text = (REPO / "jobs" / "pbs.sh").read_text()
    assert "#PBS -l select=16:ncpus=32:ngpus=4:mpiprocs=4" in text


def fake_slurm(tmp_path, status: int, seconds: float = 0.0):
    """srun, scontrol and scancel stand-ins that log their arguments; srun ends with ``status``."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name, body in (("srun", f'sleep {seconds}\nexit {status}'), ("scontrol", "exit 0"), ("scancel", "exit 0")):
        path = bin_dir / name
        path.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n{body}\n')
        path.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FOLDCP_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="4242", SLURM_NTASKS="64", FOLDCP_MODULES="",
               FOLDCP_VENV="/opt/venv")
    return env, log


def run_sbatch(env, *args, usr1_log=None):
    """Run the script; with ``usr1_log``, send it USR1 (as Slurm does before the limit) once srun has started."""
    process = subprocess.Popen(["bash", str(REPO / "jobs" / "slurm.sbatch"), *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if usr1_log is not None:
        deadline = time.monotonic() + 30
        while not usr1_log.exists() and time.monotonic() < deadline:  # the trap is set before srun starts
            time.sleep(0.05)
        process.send_signal(signal.SIGUSR1)
    out, _ = process.communicate(timeout=60)
    return process.returncode, out


def test_slurm_requeues_on_the_checkpoint_status(tmp_path):
    env, log = fake_slurm(tmp_path, status=75)
    status, out = run_sbatch(env, "jobs/demo.toml", "grid.dp=2")
    calls = log.read_text().splitlines()
    assert status == 0, out
    assert calls[0] == ("srun --mpi=pmix --kill-on-bad-exit=1 /opt/venv/bin/foldcp-hpc run jobs/demo.toml --resume "
                        "grid.dp=2")
    assert calls[1] == "scontrol requeue 4242"


def test_slurm_passes_other_statuses_through_without_requeue(tmp_path):
    env, log = fake_slurm(tmp_path, status=3)
    status, out = run_sbatch(env)
    assert status == 3, out
    assert log.read_text().splitlines() == [
        "srun --mpi=pmix --kill-on-bad-exit=1 /opt/venv/bin/foldcp-hpc run jobs/large_assembly.toml --resume"]


def test_slurm_usr1_without_checkpointing_only_logs(tmp_path):
    env, log = fake_slurm(tmp_path, status=0, seconds=1.5)
    env["FOLDCP_RESUME_ARGS"] = ""
    status, out = run_sbatch(env, "jobs/demo.toml", usr1_log=log)
    assert status == 0, out
    assert "checkpointing is off" in out
    assert not any(line.startswith("scancel") for line in log.read_text().splitlines())


def test_slurm_usr1_with_checkpointing_signals_the_ranks_and_requeues(tmp_path):
    env, log = fake_slurm(tmp_path, status=75, seconds=1.5)
    env["FOLDCP_RESUME_ARGS"] = "--resume"
    status, out = run_sbatch(env, "jobs/demo.toml", usr1_log=log)
    assert status == 0, out
    assert log.read_text().splitlines() == [
        "srun --mpi=pmix --kill-on-bad-exit=1 /opt/venv/bin/foldcp-hpc run jobs/demo.toml --resume",
        "scancel --signal=USR1 4242", "scontrol requeue 4242"]


def fake_launcher(tmp_path, name: str):
    """A stand-in for ``name`` (mpiexec, mpirun) that logs its arguments; the environment to run a script with."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    (bin_dir / name).write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n')
    (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PBS_", "FOLDCP_", "NP", "HOSTFILE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FOLDCP_MODULES="", FOLDCP_VENV="/opt/venv")
    return env, log


def test_pbs_counts_the_ranks_from_the_node_file(tmp_path):
    env, log = fake_launcher(tmp_path, "mpiexec")
    nodefile = tmp_path / "nodes"
    nodefile.write_text("".join(f"node{k // 4}\n" for k in range(8)))  # 2 chunks of mpiprocs=4
    env.update(PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(REPO), FOLDCP_JOB="jobs/demo.toml",
               FOLDCP_OVERRIDES="sampling.diffusion_samples=5 grid.cp=2")
    result = subprocess.run(["bash", str(REPO / "jobs" / "pbs.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "on 2 node(s), 8 ranks" in result.stdout
    assert log.read_text().splitlines() == [
        "mpiexec -n 8 -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS=8 /opt/venv/bin/foldcp-hpc run jobs/demo.toml "
        "sampling.diffusion_samples=5 grid.cp=2"]


def test_mpirun_script_on_one_node_and_over_a_hostfile(tmp_path):
    env, log = fake_launcher(tmp_path, "mpirun")
    env["NP"] = "9"
    result = subprocess.run(["bash", str(REPO / "jobs" / "mpirun.sh"), "jobs/demo.toml", "runtime.backend=host"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    env.update(NP="64", HOSTFILE="hosts", GPUS_PER_NODE="8")
    result = subprocess.run(["bash", str(REPO / "jobs" / "mpirun.sh"), "jobs/large_assembly.toml"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        "mpirun -n 9 -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS /opt/venv/bin/foldcp-hpc run jobs/demo.toml "
        "runtime.backend=host",
        "mpirun -n 64 --hostfile hosts --map-by ppr:8:node -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS "
        "/opt/venv/bin/foldcp-hpc run jobs/large_assembly.toml"]
    usage = subprocess.run(["bash", str(REPO / "jobs" / "mpirun.sh")], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
