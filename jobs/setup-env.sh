#!/usr/bin/env bash
# Set up foldcp_hpc on a Debian 12 machine: Debian's Open MPI and parallel HDF5, a venv at .venv with torch,
# mpi4py 4.x, h5py built against parallel HDF5, boltz 2.2.1 (its parser and tokenizer are used, and it is the
# numerical reference), biotite (the offline CCD), matplotlib (inspect --plot), the test tools and the project
# itself (editable).
#
# Assumptions: Debian 12 (bookworm) or a derivative, Python 3.10-3.12 as `python3` (override with PYTHON=...),
# run as root or with passwordless sudo for apt. Idempotent: a rerun on a set-up machine checks each step and
# skips what is already in place (well under a minute). The built h5py wheel is kept in .cache/wheels
# (ignored by git; FOLDCP_CACHE_DIR overrides) so a fresh venv reuses it instead of compiling again.
#
# Torch: an existing torch is kept (one already in .venv, or one in the base interpreter, which the venv then
# sees through --system-site-packages, as on GPU images that ship a CUDA torch); otherwise torch==2.13.0
# (CPU build) is installed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
venv="$repo/.venv"
cache="${FOLDCP_CACHE_DIR:-$repo/.cache}"
torch_default="${FOLDCP_TORCH:-torch==2.13.0}"
h5py_version="3.16.0"
hdf5_dir="/usr/lib/x86_64-linux-gnu/hdf5/openmpi"
t_start=$SECONDS

say() { printf '[setup %3ds] %s\n' "$((SECONDS - t_start))" "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# 1. Debian packages -------------------------------------------------------------------------------------------
apt_packages=(openmpi-bin libopenmpi-dev libhdf5-openmpi-dev pkg-config)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi
[ -d "$hdf5_dir" ] || hdf5_dir="$(dirname "$(dpkg -L libhdf5-openmpi-dev | grep -m1 '/hdf5/openmpi/lib$')")"
[ -d "$hdf5_dir" ] || die "parallel HDF5 not found under /usr/lib/*/hdf5/openmpi"

# 2. venv and torch --------------------------------------------------------------------------------------------
if [ ! -x "$venv/bin/python" ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    say "creating .venv on top of the base interpreter's torch ($("$python" -c 'import torch; print(torch.__version__)'))"
    "$python" -m venv --system-site-packages "$venv"
  else
    say "creating .venv"
    "$python" -m venv "$venv"
  fi
fi
vpy="$venv/bin/python"
# pip, quiet, without the warnings some machines print for every missing local index folder
pip() { "$vpy" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
if ! "$vpy" -c "import torch" 2>/dev/null; then
  say "installing $torch_default"
  pip install "$torch_default"
fi
torch_version="$("$vpy" -c 'import torch; print(torch.__version__.split("+")[0])')"
mkdir -p "$cache/wheels"
constraints="$cache/constraints.txt"
{ cat "$repo/jobs/constraints.txt"; echo "torch==$torch_version"; } >"$constraints"
say "torch $torch_version"

# 3. mpi4py, numpy and the h5py build tools -------------------------------------------------------------------
if ! "$vpy" -c "import mpi4py, numpy, Cython, pkgconfig; assert mpi4py.__version__ >= '4'; assert numpy.__version__ < '2'" 2>/dev/null; then
  say "installing mpi4py 4.x, numpy<2, Cython, pkgconfig"
  pip install -c "$constraints" "mpi4py>=4,<5" "numpy<2" "Cython>=3" pkgconfig "setuptools>=77" wheel
fi

# 4. h5py against parallel HDF5 ---------------------------------------------------------------------------------
h5py_ok() { "$vpy" -c "import h5py, sys; sys.exit(0 if h5py.get_config().mpi and h5py.__version__ == '$h5py_version' else 1)" 2>/dev/null; }
if ! h5py_ok; then
  wheel="$(ls "$cache"/wheels/h5py-"$h5py_version"-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$wheel" ]; then
    say "building h5py $h5py_version against parallel HDF5 ($hdf5_dir), about 2 minutes"
    build_cfg="$cache/h5py-build.cfg"
    printf '[build_ext]\nparallel = %s\n' "$(nproc)" >"$build_cfg"
    CC=mpicc HDF5_MPI=ON HDF5_DIR="$hdf5_dir" DIST_EXTRA_CONFIG="$build_cfg" \
      pip wheel --no-deps --no-binary=h5py --no-build-isolation -w "$cache/wheels" "h5py==$h5py_version"
    wheel="$(ls "$cache"/wheels/h5py-"$h5py_version"-*.whl | head -n1)"
  else
    say "reusing the built wheel $(basename "$wheel")"
  fi
  pip install --force-reinstall --no-deps "$wheel"
fi
h5py_ok || die "h5py in .venv is not built with MPI (h5py.get_config().mpi is False); remove $cache/wheels/h5py-* and rerun"
say "h5py $h5py_version with MPI"

# 5. boltz, biotite, test tools, the project --------------------------------------------------------------------
if ! "$vpy" -c "import boltz, biotite, matplotlib, pytest, pytest_mpi, triton, foldcp_hpc; from importlib.metadata import version; assert version('boltz') == '2.2.1'" 2>/dev/null \
   || [ "$repo/setup.cfg" -nt "$venv/.foldcp-installed" ]; then
  say "installing boltz 2.2.1, biotite, matplotlib, pytest, pytest-mpi, triton and foldcp_hpc (editable)"
  pip install -c "$constraints" "boltz==2.2.1" -e "$repo[test,plot]"
  touch "$venv/.foldcp-installed"
fi

# 6. Check that nothing above was replaced behind our back ------------------------------------------------------
"$vpy" - <<PY || die "environment check failed"
import sys
import h5py, mpi4py, numpy, torch
from importlib.metadata import version
problems = []
if torch.__version__.split("+")[0] != "$torch_version":
    problems.append(f"torch changed to {torch.__version__}")
if not h5py.get_config().mpi:
    problems.append("h5py lost MPI support")
if numpy.__version__ >= "2":
    problems.append(f"numpy {numpy.__version__} (boltz needs <2)")
if version("boltz") != "2.2.1":
    problems.append(f"boltz {version('boltz')}")
if problems:
    sys.exit("; ".join(problems))
print(f"[setup] ready: torch {torch.__version__}, mpi4py {mpi4py.__version__}, h5py {h5py.__version__} (mpi), "
      f"numpy {numpy.__version__}, boltz {version('boltz')}")
PY
say "done"
