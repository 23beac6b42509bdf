"""The atom-window layout (pure): windows partition the atoms, and the halo plan delivers exactly the key atoms
each rank's windows read, for many (windows, ranks) including ranks without windows."""

from __future__ import annotations

import pytest

from foldcp_hpc.distributed.atom_layout import AtomWindowLayout


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 4, 7, 9, 16, 64])
@pytest.mark.parametrize("n_windows", [0, 1, 2, 3, 5, 13, 40, 257])
def test_windows_partition_and_halos_cover_the_keys(n_windows, n_ranks):
    layout = AtomWindowLayout(32 * n_windows, n_ranks)
    owned = []
    for rank in range(n_ranks):
        k0, k1 = layout.windows(rank)
        assert 0 <= k1 - k0 <= -(-n_windows // n_ranks)
        owned.extend(range(*layout.atoms(rank)))
        for atom in range(*layout.atoms(rank)):
            assert layout.owner(atom) == rank
    assert owned == list(range(layout.n_atoms))
    for rank in range(n_ranks):
        a0, a1 = layout.atoms(rank)
        got = set(range(a0, a1))
        for src, lo, hi in layout.receives(rank):
            assert src != rank and (rank, lo, hi) in layout.sends(src)
            assert all(layout.owner(atom) == src for atom in range(lo, hi))
            assert got.isdisjoint(range(lo, hi))
            got.update(range(lo, hi))
        if a1 > a0:
            # window k reads [32k - 48, 32k + 80): Boltz's key windows, clipped to the real atoms
            keys = set()
            for k in range(*layout.windows(rank)):
                keys.update(a for a in range(32 * k - 48, 32 * k + 80) if 0 <= a < layout.n_atoms)
            assert got == keys
        else:
            assert got == set()


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        AtomWindowLayout(33, 4)
    with pytest.raises(ValueError, match="even difference"):
        AtomWindowLayout(64, 4, queries=32, keys=97)
    with pytest.raises(ValueError, match="rank 4 out of range"):
        AtomWindowLayout(64, 4).windows(4)
    assert AtomWindowLayout(64, 1).halo == 48
