"""The HDF5 layer serially: chunk and piece maths, completion marking and verification, checkpoint rotation,
and ``foldcp-hpc inspect`` (summary, pictures, one-line errors) on small files written by a 1 x 1 grid."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO
from foldcp_hpc import inspect as inspect_mod
from foldcp_hpc.io.h5complete import (checkpoint_name, latest_complete, parse_checkpoint_name, problems, rotation,
                                      verify)
from foldcp_hpc.io.h5layout import chunk_shape, rank_file_name, row_pieces
from foldcp_hpc.io.tiles import FALLBACK_ENV, H5LayoutError, PairFile, use_fallback

GIB4 = 2**32 - 1


# ---------------------------------------------------------------------------------------------------------------
def test_chunks_follow_tiles_and_stay_under_hdf5s_limit():
    assert chunk_shape((7, 7, 128), (0, 1), 4, 4) == (4, 4, 128)
    assert chunk_shape((2, 2, 3), (0, 1), 1, 8) == (1, 1, 3)  # N < p: blocks of one token
    assert chunk_shape((5, 30000, 30000), (1, 2), 15000, 4) == (1, 15000, 15000)
    assert chunk_shape((30000, 128), (0,), 10000, 4) == (10000, 128)
    # 30k tokens on 2 x 2, C_z 128 float32: 115 GB per tile; channels shrink first, tile extent kept
    z = chunk_shape((30000, 30000, 128), (0, 1), 15000, 4)
    assert z == (15000, 15000, 4) and np.prod(z) * 4 <= GIB4
    # one channel alone over 4 GiB: the token extent halves (still dividing the tile)
    big = chunk_shape((70000, 70000, 128), (0, 1), 35000, 4)
    assert big == (17500, 17500, 1) and np.prod(big) * 4 <= GIB4
    with pytest.raises(ValueError, match="token dims \\(3,\\) out of range for a 2-dim shape"):
        chunk_shape((4, 4), (3,), 2, 4)


@pytest.mark.parametrize("n_local,row_bytes,limit", [(10, 2**29, 2**30), (7, 1, 2**30), (13, 100, 300)])
def test_row_pieces_line_up_across_ranks(n_local, row_bytes, limit):
    counts = set()
    for n_rows in range(n_local + 1):  # every rank of a grid: from all-padding to full tiles
        pieces = row_pieces(n_rows, n_local, row_bytes, limit)
        counts.add(len(pieces))
        covered = [i for piece in pieces for i in range(piece.start, piece.stop)]
        assert covered == list(range(n_rows))
        assert all((piece.stop - piece.start) * row_bytes <= max(limit, row_bytes) for piece in pieces)
    assert len(counts) == 1


def test_rank_file_names():
    assert str(rank_file_name("out/run.h5", 3)) == "out/run.rank3.h5"
    assert str(rank_file_name("ckpt", 0)) == "ckpt.rank0.h5"


def test_fallback_choice(monkeypatch):
    monkeypatch.setenv(FALLBACK_ENV, "1")
    assert use_fallback() is True
    if h5py.get_config().mpi:
        assert use_fallback(False) is False  # an explicit argument wins over the variable
    monkeypatch.setenv(FALLBACK_ENV, "yes")
    with pytest.raises(H5LayoutError, match="FOLDCP_H5_FALLBACK='yes'"):
        use_fallback()
    monkeypatch.delenv(FALLBACK_ENV)
    assert use_fallback() == (not h5py.get_config().mpi)
    assert use_fallback(True)


# ---------------------------------------------------------------------------------------------------------------
N, C = 10, 3


def tensors():
    rng = np.random.default_rng(0)
    return {"z": rng.standard_normal((N, N, C)).astype(np.float32),
            "pae": rng.uniform(0, 30, (2, N, N)).astype(np.float32),
            "distogram": rng.standard_normal((N, N, 1, 8)).astype(np.float32),
            "s": rng.standard_normal((N, 4)).astype(np.float32)}


def write_file(path, fallback=False, complete=True):
    """A 1 x 1 grid's file: every dataset kind, root attributes as a checkpoint has them."""
    from mpi4py import MPI

    t = tensors()
    out = PairFile(path, MPI.COMM_SELF, 1, fallback=fallback,
                   attrs={"stage": "trunk", "model": "boltz2-small", "dtype": "float32", "recycle": 2, "block": 4,
                          "config": "[model]\narchitecture = 'boltz2-small'\n"})
    out.create_group("/trunk", {"recycle": 2})
    out.create_pair("/trunk/z", N, trail=(C,))
    out.create_pair("/confidence/pae", N, lead=(2,))
    out.create_pair("/trunk/distogram", N, trail=(1, 8), attrs={"min_dist": 2.0, "max_dist": 22.0})
    out.create_tokens("/trunk/s", N, trail=(4,))
    out.write_tile("/trunk/z", t["z"])
    out.write_tile("/confidence/pae", t["pae"])
    out.write_tile("/trunk/distogram", t["distogram"])
    out.write_tokens("/trunk/s", t["s"])
    out.write_replicated("/checkpoint/rng", np.arange(5, dtype=np.uint8))
    out.close(complete=complete)
    return t


def copy_set(master, folder):
    """Copy ``master`` and its fallback rank files, if any, into ``folder``; the copy of the master."""
    folder.mkdir()
    for path in [master, *master.parent.glob(master.stem + ".rank*.h5")]:
        shutil.copy(path, folder / path.name)
    return folder / master.name


@pytest.mark.parametrize("fallback", [False, True], ids=["mpio", "fallback"])
def test_complete_files_verify_and_damaged_ones_do_not(tmp_path, fallback):
    if not fallback and not h5py.get_config().mpi:
        pytest.skip("h5py without MPI")
    good = tmp_path / "good.h5"
    t = write_file(good, fallback)
    assert verify(good) and problems(good) == []
    assert np.array_equal(h5py.File(good, "r")["/trunk/z"][()], t["z"])
    master = good.read_bytes()

    truncated = tmp_path / "truncated.h5"  # the tail of the file lost (a job killed while writing)
    truncated.write_bytes(master[: len(master) // 2])
    assert not verify(truncated)
    if fallback:  # a rank file cut short behind an intact master (the master names its rank files: copy both)
        cut = copy_set(good, tmp_path / "cut")
        data = rank_file_name(cut, 0).read_bytes()
        rank_file_name(cut, 0).write_bytes(data[: len(data) - 200])
        assert verify(good) and not verify(cut)
        rank_file_name(cut, 0).unlink()  # or gone altogether
        assert any("no such file" in line for line in problems(cut))

    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x00" * 4096)
    assert not verify(garbage) and not verify(tmp_path / "missing.h5")

    unfinished = tmp_path / "unfinished.h5"  # closed without the marker, as after an exception
    write_file(unfinished, fallback, complete=False)
    assert not verify(unfinished)
    assert "attribute 'complete' is False" in problems(unfinished)[0]

    edited = copy_set(good, tmp_path / "edited")  # the manifest no longer matches the datasets
    with h5py.File(edited, "a") as h5:
        del h5["/checkpoint/rng"]
    assert problems(edited) == [f"{edited}: dataset /checkpoint/rng listed in the manifest is missing"]


def test_exception_leaves_the_file_incomplete(tmp_path):
    from mpi4py import MPI

    path = tmp_path / "crash.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with PairFile(path, MPI.COMM_SELF, 1, fallback=True) as out:
            out.create_pair("/trunk/z", 3, trail=(2,))
            raise RuntimeError("boom")
    assert not verify(path)
    with pytest.raises(H5LayoutError, match=r"tile \(0, 0\) has shape \(2, 2, 2\), expected \(3, 3, 2\)"):
        with PairFile(tmp_path / "shape.h5", MPI.COMM_SELF, 1, fallback=True) as out:
            out.create_pair("/trunk/z", 3, trail=(2,))
            out.write_tile("/trunk/z", np.zeros((2, 2, 2)))


def test_rotation_keeps_the_last_two_complete():
    names = [checkpoint_name("ckpt", c) for c in (3, 1, 2, 4)] + ["ckpt-00000001.rank0.h5", "ckpt-00000004.rank1.h5",
                                                                   "notes.txt", "other-00000001.h5"]
    assert parse_checkpoint_name("ckpt-00000004.rank1.h5", "ckpt") == (4, 1)
    assert parse_checkpoint_name("other-00000001.h5", "ckpt") is None
    assert rotation(names, "ckpt") == ["ckpt-00000001.h5", "ckpt-00000001.rank0.h5", "ckpt-00000002.h5"]
    # the newest (4) is half-written: keep 2 and 3, drop 1; 4 stays (it may still be being written)
    assert rotation(names, "ckpt", complete=["ckpt-00000002.h5", "ckpt-00000003.h5"]) == [
        "ckpt-00000001.h5", "ckpt-00000001.rank0.h5"]
    # 3 is broken and older than the newest complete: it goes too
    assert rotation(names, "ckpt", complete=["ckpt-00000002.h5", "ckpt-00000004.h5"]) == [
        "ckpt-00000001.h5", "ckpt-00000001.rank0.h5", "ckpt-00000003.h5"]
    assert rotation(names[:1], "ckpt") == [] and rotation([], "ckpt") == []
    with pytest.raises(ValueError, match="keep must be at least 1, got 0"):
        rotation(names, "ckpt", keep=0)


def test_latest_complete_passes_over_a_damaged_checkpoint(tmp_path):
    assert latest_complete(tmp_path, "ckpt") is None
    for counter in (1, 2, 3):
        write_file(tmp_path / checkpoint_name("ckpt", counter), fallback=True)
    assert latest_complete(tmp_path, "ckpt") == tmp_path / "ckpt-00000003.h5"
    newest = rank_file_name(tmp_path / "ckpt-00000003.h5", 0)
    newest.write_bytes(newest.read_bytes()[:-100])  # killed while writing checkpoint 3
    assert latest_complete(tmp_path, "ckpt") == tmp_path / "ckpt-00000002.h5"
    write_file(tmp_path / checkpoint_name("ckpt", 4), fallback=True, complete=False)
    assert latest_complete(tmp_path, "ckpt") == tmp_path / "ckpt-00000002.h5"


# ---------------------------------------------------------------------------------------------------------------
def test_inspect_summary_and_images(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    t = write_file(path, fallback=True)
    text = inspect_mod.summary(path)
    for expected in ("state     complete", "fallback writer", "grid      1x1x1 (dp x p x p)", "stage     trunk",
                     "model     boltz2-small", "recycle", "config", "/trunk/z", "[10, 10, 3]", "/confidence/pae",
                     "virtual, 1 file(s)", "pair (token dims 1,2", "/checkpoint/rng"):
        assert expected in text, expected
    assert re.search(r"^  /trunk/ +group +recycle=2$", text, re.M), text

    monkeypatch.setattr(inspect_mod, "BLOCK_BYTES", 4 * 4 * C * 4)  # blocks of 4 x 4 tokens: several reads per row
    k = 3
    m = -(-N // k)

    def block_means(values):
        out = np.zeros((m, m))
        for i in range(m):
            for j in range(m):
                out[i, j] = values[i * k:(i + 1) * k, j * k:(j + 1) * k].mean()
        return out

    image, quantity, got_k = inspect_mod.pair_image(path, "/trunk/z", downsample=k)
    assert (quantity, got_k) == ("norm", k)
    assert np.allclose(image, block_means(np.linalg.norm(t["z"].astype(np.float64), axis=-1)))
    image, quantity, _ = inspect_mod.pair_image(path, "/confidence/pae", downsample=k, sample=1)
    assert quantity == "value" and np.allclose(image, block_means(t["pae"][1]))
    image, quantity, _ = inspect_mod.pair_image(path, "/trunk/distogram", downsample=1)
    assert quantity == "argmax" and np.array_equal(image, t["distogram"][:, :, 0].argmax(-1))
    logits = t["distogram"][:, :, 0].astype(np.float64)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = weights @ np.linspace(2.0, 22.0, 8) / weights.sum(-1)
    image, _, _ = inspect_mod.pair_image(path, "/trunk/distogram", quantity="expected", downsample=1)
    assert np.allclose(image, expected)

    png = tmp_path / "z.png"
    line = inspect_mod.plot(path, "/trunk/z", png, downsample=2)
    assert line == f"wrote {png}: /trunk/z norm, 5x5 pixels (K=2)"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[2] == 4


def test_inspect_command_and_its_errors(tmp_path):
    path = tmp_path / "run.h5"
    write_file(path)
    not_hdf5 = tmp_path / "notes.h5"
    not_hdf5.write_text("not HDF5\n")
    png = tmp_path / "pae.png"

    def inspect(*args):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_"))}
        return subprocess.run([sys.executable, "-m", "foldcp_hpc.cli", "inspect", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env=env)

    done = inspect(path, "--plot", "/confidence/pae", "--sample", "1", "--out", png)
    assert done.returncode == 0, done.stderr
    assert "state     complete" in done.stdout and f"wrote {png}: /confidence/pae value" in done.stdout
    assert png.exists()
    absent = tmp_path / "absent.h5"
    done = inspect(absent)  # one line naming the file, exit status 1
    assert done.returncode == 1 and done.stderr.strip() == f"foldcp-hpc: rank 0/1: InspectError: {absent}: no such file"
    # the same path for every other error: the message names the file and the field
    for args, message in (((not_hdf5,), f"{not_hdf5}: not an HDF5 file"),
                          ((path, "/trunk/q"), f"{path}: no dataset /trunk/q (datasets: /checkpoint/rng, "
                                                 "/confidence/pae, /trunk/distogram, /trunk/s, /trunk/z)"),
                          ((path, "/trunk/s"),
                           f"{path}: /trunk/s: shape [10, 4] is not a pair quantity (no N x N dims)"),
                          ((path, "/confidence/pae", None, None, None, 2),
                           f"{path}: /confidence/pae: sample 2 out of range for 2 sample(s)")):
        with pytest.raises(inspect_mod.InspectError) as caught:
            inspect_mod.run_inspect(*map(lambda a: a if a is None or isinstance(a, int) else str(a), args))
        assert str(caught.value) == message
