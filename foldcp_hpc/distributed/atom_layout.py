"""Pure layout maths of the atom windows: which rank owns which windows, and which halo atoms it needs.

Boltz's atom transformer works on windows of ``queries`` consecutive atoms (32); window ``k`` attends to the
``keys`` atoms (128) centred on it, ``[queries * k - halo, queries * k + queries + halo)`` with
``halo = (keys - queries) / 2`` (48), and key positions outside ``[0, n_atoms)`` are zeros (masked). The
windows are split into contiguous, balanced runs over the ``n_ranks`` ranks of the grid (in grid order), so
rank ``g`` owns atoms ``[a0, a1)`` and needs the atoms ``[a0 - halo, a1 + halo)``: its own plus up to
``halo`` on each side, which belong to its neighbours in grid order (or, when ranks own fewer than
``halo / queries`` windows, to ranks further away).

Nothing here communicates; any rank can compute any other rank's part, as with :mod:`.layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AtomWindowLayout"]


@dataclass(frozen=True)
class AtomWindowLayout:
    """Atom windows of an ``n_atoms``-atom input (padded to a multiple of ``queries``) over ``n_ranks`` ranks.

    Args:
        n_atoms: atom count including the padding to a multiple of ``queries``.
        n_ranks: ranks sharing the windows (the p x p grid of one replica: p²).
        queries: atoms per query window (Boltz: 32).
        keys: atoms per key window (Boltz: 128).
    """

    n_atoms: int
    n_ranks: int
    queries: int = 32
    keys: int = 128

    def __post_init__(self) -> None:
        if self.queries < 1 or self.keys < self.queries or (self.keys - self.queries) % 2:
            raise ValueError(f"atom windows need keys >= queries >= 1 with an even difference, "
                             f"got queries={self.queries}, keys={self.keys}")
        if self.n_atoms < 0 or self.n_atoms % self.queries:
            raise ValueError(f"n_atoms must be a non-negative multiple of {self.queries} (padded), got {self.n_atoms}")
        if self.n_ranks < 1:
            raise ValueError(f"n_ranks must be positive, got {self.n_ranks}")

    @property
    def n_windows(self) -> int:
        return self.n_atoms // self.queries

    @property
    def halo(self) -> int:
        """Key atoms each window reaches beyond its own on either side."""
        return (self.keys - self.queries) // 2

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.n_ranks:
            raise ValueError(f"rank {rank} out of range for {self.n_ranks} ranks")

    def windows(self, rank: int) -> tuple[int, int]:
        """``[k0, k1)``: the windows rank ``rank`` owns (balanced: counts differ by at most one)."""
        self._check_rank(rank)
        return rank * self.n_windows // self.n_ranks, (rank + 1) * self.n_windows // self.n_ranks

    def atoms(self, rank: int) -> tuple[int, int]:
        """``[a0, a1)``: the atoms (queries) rank ``rank`` owns."""
        k0, k1 = self.windows(rank)
        return k0 * self.queries, k1 * self.queries

    def span(self, rank: int) -> tuple[int, int]:
        """``[a0 - halo, a1 + halo)``: the atoms rank ``rank``'s windows read as keys (may reach outside
        ``[0, n_atoms)``: those positions are zeros). Empty at ``a0`` when the rank owns no window."""
        a0, a1 = self.atoms(rank)
        if a0 == a1:
            return a0, a0
        return a0 - self.halo, a1 + self.halo

    def owner(self, atom: int) -> int:
        """The rank owning atom ``atom`` (0 <= atom < n_atoms)."""
        if not 0 <= atom < self.n_atoms:
            raise ValueError(f"atom {atom} out of range for {self.n_atoms} atoms")
        window = atom // self.queries
        rank = min(self.n_ranks - 1, (window * self.n_ranks) // max(1, self.n_windows))
        while self.windows(rank)[0] > window:
            rank -= 1
        while self.windows(rank)[1] <= window:
            rank += 1
        return rank

    def transfer(self, src: int, dst: int) -> tuple[int, int]:
        """``[lo, hi)``: the atoms of ``src`` that ``dst`` reads as halo keys (empty, ``lo == hi``, when none
        or when ``src == dst``)."""
        a0, a1 = self.atoms(src)
        s0, s1 = self.span(dst)
        lo, hi = max(a0, s0), min(a1, s1)
        if src == dst or hi <= lo:
            return a0, a0
        return lo, hi

    def receives(self, rank: int) -> list[tuple[int, int, int]]:
        """``(src, lo, hi)`` for every rank that sends halo atoms ``[lo, hi)`` to ``rank``, in rank order."""
        out = []
        for src in range(self.n_ranks):
            lo, hi = self.transfer(src, rank)
            if hi > lo:
                out.append((src, lo, hi))
        return out

    def sends(self, rank: int) -> list[tuple[int, int, int]]:
        """``(dst, lo, hi)`` for every rank that reads ``rank``'s atoms ``[lo, hi)`` as halo keys."""
        out = []
        for dst in range(self.n_ranks):
            lo, hi = self.transfer(rank, dst)
            if hi > lo:
                out.append((dst, lo, hi))
        return out
