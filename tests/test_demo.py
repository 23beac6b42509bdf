"""The README's main job end to end: ``mpirun -n 4 foldcp-hpc run jobs/demo.toml`` writes Boltz-layout outputs
(mmCIF that biotite and gemmi read, Boltz-2's confidence JSON keys, pLDDT in [0, 1], the affinity JSON of the
affinity pass, and with ``[output] save`` the intermediates that read back), all labelled untrained."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import REPO, mpirun

AFFINITY_KEYS = ["affinity_pred_value", "affinity_probability_binary", "affinity_pred_value1",
                 "affinity_probability_binary1", "affinity_pred_value2", "affinity_probability_binary2"]
BOLTZ2_KEYS = ["confidence_score", "ptm", "iptm", "ligand_iptm", "protein_iptm", "complex_plddt", "complex_iplddt",
               "complex_pde", "complex_ipde", "chains_ptm", "pair_chains_iptm"]
SAVED = ["s_inputs", "trunk_s", "trunk_z", "distogram", "pae", "pde", "plddt"]  # [output] save: every intermediate


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's job run once for this module: as shipped, but one recycle and 10 sampler steps in each pass
    (the trunk and the sampler are tested against boltz elsewhere), ``[output] save`` on and checkpoints off.
    Returns (the finished process, its output folder)."""
    out = tmp_path_factory.mktemp("demo")
    done = mpirun(4, str(REPO / ".venv" / "bin" / "foldcp-hpc"), "run", str(REPO / "jobs" / "demo.toml"),
                  f"output.dir={out}", "sampling.recycling_steps=1", "sampling.sampling_steps=10",
                  "sampling.affinity_recycling_steps=1", "sampling.affinity_sampling_steps=10",
                  "checkpoint.enabled=false", f"output.save={json.dumps(SAVED)}", timeout=900)
    return done, out


def test_demo_job_writes_boltz_outputs(demo):
    done, out = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "UNTRAINED" in done.stdout and "sampling: 10/10" in done.stdout
    folder = out / "predictions" / "demo"
    for k in range(2):
        for name in (f"demo_model_{k}.cif", f"confidence_demo_model_{k}.json", f"plddt_demo_model_{k}.npz",
                     f"pae_demo_model_{k}.npz"):
            assert (folder / name).is_file(), name
        summary = json.loads((folder / f"confidence_demo_model_{k}.json").read_text())
        assert [key for key in summary if key != "untrained_weights"] == BOLTZ2_KEYS
        assert summary["untrained_weights"] is True
        plddt = np.load(folder / f"plddt_demo_model_{k}.npz")["plddt"]
        assert plddt.shape == (72,) and plddt.min() >= 0 and plddt.max() <= 1
        pae = np.load(folder / f"pae_demo_model_{k}.npz")["pae"]
        assert pae.shape == (72, 72) and np.isfinite(pae).all()

        from biotite.structure.io.pdbx import CIFFile, get_structure

        atoms = get_structure(CIFFile.read(str(folder / f"demo_model_{k}.cif")), model=1)
        assert len(atoms) == 352 and np.isfinite(atoms.coord).all()
        import gemmi

        structure = gemmi.read_structure(str(folder / f"demo_model_{k}.cif"))
        assert sum(1 for _ in structure[0].all()) == 352
    report = json.loads((out / "run_report_demo.json").read_text())
    stages = [row["stage"] for row in report["stages"]]
    expected = {"weights", "trunk", "sampling", "confidence", "affinity pass: weights", "affinity pass: trunk",
                "affinity pass: affinity heads"}
    assert report["ranks"] == 4 and expected <= set(stages), stages
    assert all(0 < row["peak_mib_min"] <= row["peak_mib_median"] <= row["peak_mib_max"] for row in report["stages"])
    assert "peak MiB min" in done.stdout  # the table in the log
    affinity = json.loads((folder / "affinity_demo.json").read_text())
    assert [key for key in affinity if key != "untrained_weights"] == AFFINITY_KEYS
    assert affinity["untrained_weights"] is True
    assert all(0 <= affinity[key] <= 1 for key in AFFINITY_KEYS if "probability" in key)
    assert "affinity pass: sampling: 10/10" in done.stdout
    first, second = (json.loads((folder / f"confidence_demo_model_{k}.json").read_text())["confidence_score"]
                     for k in range(2))
    assert first >= second  # samples ranked by confidence_score, as Boltz ranks them


def test_saved_intermediates_read_back(demo):
    """``[output] save`` streams tiles into intermediates_<name>.h5; the PAE and pLDDT there are the ones the npz
    files hold; with checkpoints off no checkpoint folder is made."""
    import h5py

    done, out = demo
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with h5py.File(out / "intermediates_demo.h5", "r") as h5:
        assert h5.attrs["complete"] and h5.attrs["stage"] == "prediction"
        assert h5["/trunk/z"].shape == (72, 72, 128) and h5["/trunk/s"].shape == (72, 384)
        assert h5["/distogram"].shape == (72, 72, 64) and h5["/confidence/pde"].shape == (2, 72, 72)
        assert np.isfinite(h5["/trunk/z"][()]).all() and np.abs(h5["/trunk/z"][()]).max() > 0
        pae = h5["/confidence/pae"][()]
        plddt = h5["/confidence/plddt"][()]
    written = sorted(np.load(p)["pae"].tobytes() for p in (out / "predictions" / "demo").glob("pae_*.npz"))
    assert written == sorted(pae[k].astype(np.float32).tobytes() for k in range(2))
    written = sorted(np.load(p)["plddt"].tobytes() for p in (out / "predictions" / "demo").glob("plddt_*.npz"))
    assert written == sorted(plddt[k].astype(np.float32).tobytes() for k in range(2))
    assert not (out / "checkpoints").exists()


def test_run_ends_the_whole_job_on_bad_input(tmp_path):
    """A missing input or a bad job value: one line naming the file and field, every rank gone in seconds."""
    import time

    for override, expected in (("input.path=missing.yaml", "missing.yaml: no such input file"),
                               ("sampling.sampling_steps=1", "[sampling] sampling_steps: must be at least 2")):
        start = time.monotonic()
        done = mpirun(4, str(REPO / ".venv" / "bin" / "foldcp-hpc"), "run", str(REPO / "jobs" / "demo.toml"),
                      override, f"output.dir={tmp_path}", timeout=120)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("foldcp-hpc:")]
        assert done.returncode != 0 and len(lines) == 1 and expected in lines[0], (override, lines)
        assert time.monotonic() - start < 60
