"""Boltz-2's model features without any dense N x N or atoms x tokens array.

Boltz's featurizer (``boltz/data/feature/featurizerv2.py``) builds, besides O(N) and O(M) arrays, dense
[N, N] pair features (token bonds and bond types, contact conditioning and its thresholds, a distogram
target) and one-hot [M, N] / [N, M] maps between atoms and tokens. At 30,000 tokens and 250,000 atoms those
are tens to hundreds of GB. Here the same information is kept as

* token 1-D features ``[N, ...]`` under Boltz's names and dtypes (held by every rank: O(N));
* atom 1-D features ``[M, ...]`` (M padded to a multiple of 32 as Boltz pads) with index maps in place of the
  one-hot matrices: ``atom_to_token`` [M] (-1 on padding atoms), ``token_to_rep_atom`` [N],
  ``token_to_center_atom`` [N], ``r_set_to_rep_atom`` [N_R], and one-hot features as class indices
  (``ref_element`` [M], ``ref_atom_name_chars`` [M, 4], ``atom_backbone_feat`` [M]);
* pair features as sparse write lists (bonds, pocket and contact constraints) from which
  :meth:`Features.pair_tile` builds any (row-block, col-block) tile of ``token_bonds``, ``type_bonds``,
  ``contact_conditioning`` and ``contact_threshold`` exactly as Boltz's dense loops would have filled it.

Inputs are boltz's own ``Tokenized`` data (its parser and tokenizer are O(atoms)) and the CCD molecules.
``disto_target`` (a training loss target) is not produced.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..distributed.layout import TileLayout

__all__ = ["Features", "PairWrites", "featurize", "template_pair_tile"]

if TYPE_CHECKING:
    from .msa import MSAPlan

ATOMS_PER_WINDOW = 32


@dataclasses.dataclass
class PairWrites:
    """Ordered writes into an N x N pair feature: ``feature[rows x cols] = value`` for each entry in turn.

    rows, cols: int64 index arrays of one write (a cartesian block); values: the class (or bond type) and the
    threshold of each write. Replaying the list restricted to a tile gives that tile of the dense feature.
    """

    rows: list[np.ndarray] = dataclasses.field(default_factory=list)
    cols: list[np.ndarray] = dataclasses.field(default_factory=list)
    values: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    def add(self, rows, cols, value: int, threshold: float = 0.0) -> None:
        self.rows.append(np.atleast_1d(np.asarray(rows, dtype=np.int64)))
        self.cols.append(np.atleast_1d(np.asarray(cols, dtype=np.int64)))
        self.values.append((int(value), float(threshold)))

    def __len__(self) -> int:
        return len(self.values)


@dataclasses.dataclass
class Features:
    """Boltz-2 features of one input, sharding-ready.

    Attributes:
        token: token 1-D features (Boltz names), each ``[N, ...]``.
        atom: atom 1-D features and index maps, each ``[M, ...]`` (M padded to a multiple of 32), plus
            ``token_to_rep_atom`` / ``token_to_center_atom`` [N], ``r_set_to_rep_atom`` [N_R], ``frames_idx``
            [1, N, 3], ``frame_resolved_mask`` [1, N], ``disto_coords_ensemble`` [1, N, 3].
        bonds: ``[E, 3]`` int64 (token_1, token_2, bond type) in Boltz's order.
        contacts: the pocket and contact constraint writes, in Boltz's order.
        any_contact: whether any constraint wrote anything (Boltz then marks untouched pairs UNSELECTED,
            otherwise every pair is UNSPECIFIED).
        msa: the MSA row plan (:mod:`.msa`); ``token`` then also holds ``profile`` and ``deletion_mean``.
        template: Boltz's template features, ``[T, N, ...]`` (O(T N): computed with boltz's own functions;
            the pair terms are built from them in the model, tile by tile). One all-zero template when the
            input has none, as Boltz does.
        affinity_mw: the affinity ligand's molecular weight (affinity features only, else None).
    """

    token: dict[str, Tensor]
    atom: dict[str, Tensor]
    bonds: Tensor
    contacts: PairWrites
    any_contact: bool
    msa: Optional["MSAPlan"] = None
    template: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    affinity_mw: Optional[float] = None

    def msa_block(self, p: int, row: int, col: int) -> tuple[Tensor, Tensor, Tensor]:
        """Rank (row, col)'s MSA block: rows block ``col`` of token block ``row``, padded with gaps.

        returns (msa [s, n] token ids, deletion counts [s, n], paired [s, n]) with s = ceil(S / p),
        n = ceil(N / p); ``msa_mask`` is 1 on real rows and tokens.
        """
        if self.msa is None:
            raise ValueError("these features were made without an MSA plan")
        tokens = TileLayout(self.n_tokens, p).block(row)
        rows = TileLayout(self.msa.n_rows, p).block(col)
        return self.msa.block(rows, tokens)

    def msa_model_block(self, p: int, row: int, col: int) -> dict[str, Tensor]:
        """Rank (row, col)'s MSA block as the MSA module reads it, each [1, s, n]: ``msa``, ``has_deletion``,
        ``deletion_value`` (pi/2 atan(d/3)), ``msa_paired``, ``msa_mask`` (0 on padding rows and tokens)."""
        msa, deletion, paired = self.msa_block(p, row, col)
        mask = torch.zeros(msa.shape, dtype=torch.long)
        mask[: TileLayout(self.msa.n_rows, p).valid_local(col).stop, : TileLayout(self.n_tokens, p).valid_local(row).stop] = 1
        return {"msa": msa[None], "has_deletion": (deletion > 0)[None],
                "deletion_value": (np.pi / 2 * torch.arctan(deletion / 3))[None], "msa_paired": paired[None],
                "msa_mask": mask[None]}

    def model_inputs(self, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(token, atom) as the model modules read them, with a batch dim of 1, floats cast to ``dtype``.

        token: every token 1-D feature [1, N, ...]; atom: every per-atom feature [1, M, ...] plus the
        token-indexed atom maps ``token_to_rep_atom`` / ``token_to_center_atom`` [1, N], ``frames_idx``
        [1, N, 3] and ``frame_resolved_mask`` [1, N].
        """
        def cast(t: Tensor) -> Tensor:
            t = t.to(dtype) if (dtype is not None and t.is_floating_point()) else t
            return t if device is None else t.to(device)

        token = {k: cast(v)[None] for k, v in self.token.items()}
        atom = {k: cast(v)[None] for k, v in self.atom.items() if v.dim() and v.shape[0] == self.n_atoms}
        for key in ("token_to_rep_atom", "token_to_center_atom"):
            atom[key] = cast(self.atom[key])[None]
        for key in ("frames_idx", "frame_resolved_mask"):
            atom[key] = cast(self.atom[key])  # already [1, N, ...]
        return token, atom

    @property
    def n_tokens(self) -> int:
        return int(self.token["token_index"].shape[0])

    @property
    def n_atoms(self) -> int:
        """Atoms including the padding to a multiple of 32."""
        return int(self.atom["atom_pad_mask"].shape[0])

    def pair_tile(self, p: int, row: int, col: int) -> dict[str, Tensor]:
        """Tile (row, col) of the pair features on a p x p grid, compact: 7 bytes per token pair.

        returns ``token_bonds`` [n, n] bool, ``type_bonds`` [n, n] uint8 (bond type + 1, 0 = none),
        ``contact_class`` [n, n] uint8 (Boltz's contact-conditioning class) and ``contact_threshold`` [n, n]
        float32, n = ceil(N / p); padded rows and columns hold 0 (they are masked by the pair mask).
        """
        from boltz.data import const

        layout = TileLayout(self.n_tokens, p)
        r0, r1 = layout.block(row).start, layout.valid(row).stop
        c0, c1 = layout.block(col).start, layout.valid(col).stop
        n = layout.n_local

        bonds = torch.zeros(n, n, dtype=torch.bool)
        types = torch.zeros(n, n, dtype=torch.uint8)
        if len(self.bonds):
            t1, t2, ty = self.bonds[:, 0].numpy(), self.bonds[:, 1].numpy(), self.bonds[:, 2].numpy()
            # both directions, in Boltz's write order; the last write of a cell wins
            i = np.stack([t1, t2], axis=1).reshape(-1)
            j = np.stack([t2, t1], axis=1).reshape(-1)
            kind = np.repeat(ty, 2)
            inside = (i >= r0) & (i < r1) & (j >= c0) & (j < c1)
            i, j, kind = i[inside] - r0, j[inside] - c0, kind[inside]
            if len(i):
                cell = i * n + j
                last = len(cell) - 1 - np.unique(cell[::-1], return_index=True)[1]
                bonds[i[last], j[last]] = True
                types[i[last], j[last]] = torch.from_numpy(kind[last].astype(np.uint8))

        default = const.contact_conditioning_info["UNSELECTED" if self.any_contact else "UNSPECIFIED"]
        klass = torch.zeros(n, n, dtype=torch.uint8)
        klass[: r1 - r0, : c1 - c0] = default
        threshold = torch.zeros(n, n, dtype=torch.float32)  # Boltz fills float64 and casts: the same float32 values
        for rows, cols, (value, limit) in zip(self.contacts.rows, self.contacts.cols, self.contacts.values):
            rows = torch.from_numpy(rows[(rows >= r0) & (rows < r1)] - r0)
            cols = torch.from_numpy(cols[(cols >= c0) & (cols < c1)] - c0)
            if len(rows) and len(cols):
                klass[rows[:, None], cols[None, :]] = value
                threshold[rows[:, None], cols[None, :]] = limit
        return {"token_bonds": bonds, "type_bonds": types, "contact_class": klass,
                "contact_threshold": threshold}

    def boltz_pair_tile(self, p: int, row: int, col: int) -> dict[str, Tensor]:
        """The same tile in Boltz's dense forms and dtypes (``token_bonds`` [n, n, 1] float32, ``type_bonds``
        int64, ``contact_conditioning`` [n, n, 5] int64 one-hot with all-zero padding, ``contact_threshold``),
        as boltz's featurizer output sliced to the tile; 56 bytes per pair, for comparisons."""
        from boltz.data import const

        tile = self.pair_tile(p, row, col)
        layout = TileLayout(self.n_tokens, p)
        rows, cols = layout.valid_local(row).stop, layout.valid_local(col).stop
        conditioning = torch.nn.functional.one_hot(tile["contact_class"].long(),
                                                   num_classes=len(const.contact_conditioning_info))
        conditioning[rows:] = 0
        conditioning[:, cols:] = 0
        return {"token_bonds": tile["token_bonds"].float().unsqueeze(-1), "type_bonds": tile["type_bonds"].long(),
                "contact_conditioning": conditioning, "contact_threshold": tile["contact_threshold"]}


# ------------------------------------------------------------------------------------------------------------
def featurize(tokenized: Any, molecules: dict[str, Any], random: np.random.Generator,
              pocket_constraints: Optional[list] = None, contact_constraints: Optional[list] = None,
              override_method: Optional[str] = None, with_msa: bool = True, compute_affinity: bool = False
              ) -> Features:
    """Token and atom features of a tokenized input, as Boltz-2's inference featurizer computes them.

    tokenized: boltz's ``Tokenized`` (from ``Boltz2Tokenizer().tokenize``); molecules: CCD code -> RDKit Mol;
    random: the generator Boltz uses for conformer choice (``np.random.default_rng(42)`` at inference);
    the reference-conformer augmentation draws from torch's global generator, as Boltz's does.
    compute_affinity: also the affinity module's inputs (``profile_affinity`` and ``deletion_mean_affinity``
    from the query row, the ligand's molecular weight); templates are then left out, as Boltz does.
    """
    from .msa import plan_msa

    token, bonds, contacts, any_contact = _token_features(tokenized, pocket_constraints, contact_constraints,
                                                          override_method)
    atom = _atom_features(tokenized, molecules, random)
    plan = None
    tokens = slice(0, len(tokenized.tokens))
    if with_msa:  # after the atom features: Boltz draws nothing random for the MSA at inference
        plan = plan_msa(tokenized)
        token["profile"], token["deletion_mean"] = plan.profile_and_deletion_mean(tokens)
    affinity_mw = None
    if compute_affinity:
        if plan is None:
            raise ValueError("compute_affinity needs the MSA plan (with_msa=True)")
        token["profile_affinity"], token["deletion_mean_affinity"] = plan.profile_and_deletion_mean(tokens, n_rows=1)
        affinity_mw = float(tokenized.record.affinity.mw)
    template = _template_features(tokenized, with_templates=not compute_affinity)
    return Features(token=token, atom=atom, bonds=bonds, contacts=contacts, any_contact=any_contact, msa=plan,
                    template=template, affinity_mw=affinity_mw)


def _template_features(data: Any, with_templates: bool = True) -> dict[str, Tensor]:
    """Boltz's template features (per template and token: O(T N)), or its single all-zero template."""
    from boltz.data.feature.featurizerv2 import load_dummy_templates_features, process_template_features

    n_tokens = data.tokens.shape[0]
    if data.templates and with_templates:
        return process_template_features(data=data, max_tokens=n_tokens)
    return load_dummy_templates_features(tdim=1, num_tokens=n_tokens)


def _token_features(data: Any, pocket_constraints, contact_constraints, override_method):
    from boltz.data import const

    tokens = data.tokens
    n_tokens = len(tokens)
    method_id = const.method_types_ids["x-ray diffraction" if override_method is None else override_method.lower()]
    record = getattr(data, "record", None)
    if (override_method is None and record is not None and record.structure.method is not None
            and record.structure.method.lower() in const.method_types_ids):
        method_id = const.method_types_ids[record.structure.method.lower()]

    token = {
        "token_index": torch.arange(n_tokens, dtype=torch.long),
        "residue_index": torch.from_numpy(tokens["res_idx"]).long(),
        "asym_id": torch.from_numpy(tokens["asym_id"]).long(),
        "entity_id": torch.from_numpy(tokens["entity_id"]).long(),
        "sym_id": torch.from_numpy(tokens["sym_id"]).long(),
        "mol_type": torch.from_numpy(tokens["mol_type"]).long(),
        "res_type": torch.nn.functional.one_hot(torch.from_numpy(tokens["res_type"]).long(),
                                                num_classes=const.num_tokens),
        "disto_center": torch.from_numpy(tokens["disto_coords"]),
        "token_pad_mask": torch.ones(n_tokens, dtype=torch.float),
        "token_resolved_mask": torch.from_numpy(tokens["resolved_mask"]).float(),
        "token_disto_mask": torch.from_numpy(tokens["disto_mask"]).float(),
        "method_feature": torch.full((n_tokens,), method_id, dtype=torch.long),
        "modified": torch.from_numpy(tokens["modified"]).long(),
        "cyclic_period": torch.maximum(_cyclic_from_bonds(data), torch.from_numpy(tokens["cyclic_period"].copy())),
        "affinity_token_mask": torch.from_numpy(tokens["affinity_mask"]).float(),
    }

    # bonds as an edge list, in Boltz's order
    position = {int(t): i for i, t in enumerate(tokens["token_idx"])}
    edges = [(position[int(b["token_1"])], position[int(b["token_2"])], int(b["type"])) for b in data.bonds]
    bonds = torch.tensor(edges, dtype=torch.long).reshape(-1, 3)

    contacts, any_contact = _constraint_writes(tokens, pocket_constraints, contact_constraints)
    return token, bonds, contacts, any_contact


def _matches(tokens: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Token indices that Boltz matches to a constraint key: (asym, res_idx) for polymers, (asym, atom_idx)
    for non-polymer tokens (one token per atom)."""
    from boltz.data import const

    nonpolymer = tokens["mol_type"] == const.chain_type_ids["NONPOLYMER"]
    second = np.where(nonpolymer, tokens["atom_idx"], tokens["res_idx"])
    return np.nonzero((tokens["asym_id"] == key[0]) & (second == key[1]))[0]


def _constraint_writes(tokens: np.ndarray, pockets, contacts) -> tuple[PairWrites, bool]:
    """The writes of Boltz's pocket and contact loops (featurizerv2.process_token_features), in order."""
    from boltz.data import const

    info = const.contact_conditioning_info
    writes = PairWrites()
    wrote = False
    nonpolymer = tokens["mol_type"] == const.chain_type_ids["NONPOLYMER"]
    second = np.where(nonpolymer, tokens["atom_idx"], tokens["res_idx"])
    for binder, members, max_distance, *_ in pockets or []:
        binder_rows = np.nonzero(tokens["asym_id"] == binder)[0]
        wanted = {tuple(m) for m in members}
        for idx in range(len(tokens)):
            if (int(tokens["asym_id"][idx]), int(second[idx])) in wanted:
                writes.add(binder_rows, [idx], info["BINDER>POCKET"], max_distance)
                writes.add([idx], binder_rows, info["POCKET>BINDER"], max_distance)
                wrote |= len(binder_rows) > 0
    for first, other, max_distance, *_ in contacts or []:
        hits_1 = _matches(tokens, tuple(first))
        if len(hits_1) == 0:
            continue
        hits_2 = _matches(tokens, tuple(other))
        if len(hits_2) == 0:
            continue
        i, j = int(hits_1[0]), int(hits_2[0])  # Boltz stops at the first match of each
        writes.add([i], [j], info["CONTACT"], max_distance)
        writes.add([j], [i], info["CONTACT"], max_distance)
        wrote = True
    return writes, wrote


def _cyclic_from_bonds(data: Any) -> Tensor:
    """Per-token cyclic period implied by head-to-tail bonds (Boltz's rule), as float32."""
    chains, connections = data.structure.chains, data.structure.bonds
    period_of: dict[int, int] = {}
    for chain_index, asym in enumerate(chains["asym_id"]):
        for bond in connections:
            if not (chain_index == bond["chain_1"] == bond["chain_2"]):
                continue
            res_num = chains[bond["chain_1"]]["res_num"]
            if res_num > 2 and bond["res_1"] != bond["res_2"] and (
                    (res_num == bond["res_2"] + 1 and bond["res_1"] == 0)
                    or (res_num == bond["res_1"] + 1 and bond["res_2"] == 0)):
                period_of[int(asym)] = int(res_num)
    return torch.tensor([period_of.get(int(a), 0) for a in data.tokens["asym_id"]], dtype=torch.float)


# ------------------------------------------------------------------------------------------------------------
def _atom_features(data: Any, molecules: dict[str, Any], random: np.random.Generator) -> dict[str, Tensor]:
    """Boltz's ``process_atom_features`` at inference (one ensemble member, frames on), index forms only."""
    from boltz.data import const
    from boltz.data.feature.featurizerv2 import compute_frames_nonpolymer, convert_atom_name
    from boltz.model.modules.utils import center_random_augmentation

    structure = data.structure
    start_of_ensemble = int(structure.ensemble[0]["atom_coord_idx"])
    unknown_chirality = const.chirality_type_ids[const.unk_chirality_type]
    n_protein_backbone = len(const.protein_backbone_atom_index)

    names, elements, charges, positions, chirality, uid, to_token, backbone = [], [], [], [], [], [], [], []
    rep, center, r_set, frames, frame_ok, coords, atom_rows, disto = [], [], [], [], [], [], [], []
    residue_uid: dict[tuple[int, int], int] = {}
    residue_conformer: dict[tuple[int, int], int] = {}
    atom_index = 0
    for token_id, token in enumerate(data.tokens):
        key = (int(token["asym_id"]), int(token["res_idx"]))
        chain = structure.chains[token["asym_id"]]
        residue_uid.setdefault(key, len(residue_uid))
        mol = molecules[token["res_name"]]
        by_name = {a.GetProp("name"): a for a in mol.GetAtoms()}
        if key not in residue_conformer:  # one random conformer per residue, drawn as Boltz draws it
            residue_conformer[key] = int(random.choice([int(c.GetId()) for c in mol.GetConformers()]))
        conformer = mol.GetConformer(residue_conformer[key])

        start, count = int(token["atom_idx"]), int(token["atom_num"])
        atoms = structure.atoms[start:start + count]
        refs = [by_name[a["name"]] for a in atoms]
        uid.extend([residue_uid[key]] * count)
        to_token.extend([token_id] * count)
        names.append(np.array([convert_atom_name(a["name"]) for a in atoms]).reshape(count, 4))
        elements.extend(a.GetAtomicNum() for a in refs)
        charges.extend(a.GetFormalCharge() for a in refs)
        for a in refs:
            point = conformer.GetAtomPosition(a.GetIdx())
            positions.append((point.x, point.y, point.z))
        chirality.extend(const.chirality_type_ids.get(a.GetChiralTag().name, unknown_chirality) for a in refs)

        rep.append(atom_index + int(token["disto_idx"]) - start)
        center.append(atom_index + int(token["center_idx"]) - start)
        if chain["mol_type"] != const.chain_type_ids["NONPOLYMER"] and token["resolved_mask"]:
            r_set.append(atom_index + int(token["center_idx"]) - start)
        backbone.extend(_backbone_index(chain["mol_type"], atoms["name"], const, n_protein_backbone))
        coords.append(structure.coords[start_of_ensemble + start:start_of_ensemble + start + count]["coords"])
        a, b, c, ok = _frame(token, atoms, const)
        frames.append([a + atom_index, b + atom_index, c + atom_index])
        frame_ok.append(ok)
        disto.append(structure.coords[structure.ensemble["atom_coord_idx"] + token["disto_idx"]]["coords"][0])
        atom_rows.append(atoms)
        atom_index += count

    atom_data = np.concatenate(atom_rows)
    coord_data = np.concatenate(coords)[None]  # [1, M, 3]
    atom_to_token = torch.tensor(to_token, dtype=torch.long)
    frame_idx, frame_mask = compute_frames_nonpolymer(data, coord_data[0], atom_data["is_present"], atom_to_token,
                                                      frames, frame_ok)
    resolved = torch.from_numpy(atom_data["is_present"])
    ref_pos = torch.from_numpy(np.asarray(positions, dtype=np.float64)).float()
    ref_space_uid = torch.tensor(uid, dtype=torch.long)
    coords_t = torch.from_numpy(coord_data.copy())
    centre = (coords_t * resolved[None, :, None]).sum(dim=1) / resolved.sum().clamp(min=1)
    coords_t = coords_t - centre[:, None]
    # Each residue's conformer gets a random rigid motion, drawn residue by residue in Boltz's order (Boltz's
    # range() leaves the last residue out, and so does this). Atoms are grouped by residue once (a stable
    # sort), not by comparing every atom with every residue: O(M log M), not O(residues x M).
    uid = ref_space_uid.numpy()
    order = np.argsort(uid, kind="stable")
    bounds = np.searchsorted(uid[order], np.arange(int(uid.max()) + 1))
    for residue in range(int(uid.max())):
        members = torch.from_numpy(order[bounds[residue]:bounds[residue + 1]])
        if len(members) and bool(resolved[members].any()):
            ref_pos[members] = center_random_augmentation(ref_pos[members][None], resolved[members][None],
                                                          centering=True)[0]

    n_real = len(atom_data)
    pad = -(-n_real // ATOMS_PER_WINDOW) * ATOMS_PER_WINDOW - n_real

    def padded(t: Tensor, dim: int = 0, value: float = 0) -> Tensor:
        if pad == 0:
            return t
        shape = list(t.shape)
        shape[dim] = pad
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=dim)

    return {
        "ref_pos": padded(ref_pos),
        "atom_resolved_mask": padded(resolved),
        "ref_atom_name_chars": padded(torch.from_numpy(np.concatenate(names)).long()),
        "ref_element": padded(torch.tensor(elements, dtype=torch.long)),
        "ref_charge": padded(torch.tensor(charges, dtype=torch.float)),
        "ref_chirality": padded(torch.tensor(chirality, dtype=torch.long)),
        "atom_backbone_feat": padded(torch.tensor(backbone, dtype=torch.long)),
        "ref_space_uid": padded(ref_space_uid),
        "coords": padded(coords_t, dim=1),
        "atom_pad_mask": padded(torch.ones(n_real, dtype=torch.float)),
        "atom_to_token": padded(atom_to_token, value=-1),
        "token_to_rep_atom": torch.tensor(rep, dtype=torch.long),
        "token_to_center_atom": torch.tensor(center, dtype=torch.long),
        "r_set_to_rep_atom": torch.tensor(r_set, dtype=torch.long),
        "disto_coords_ensemble": torch.from_numpy(np.asarray(disto))[None],
        "bfactor": padded(torch.from_numpy(atom_data["bfactor"].copy())),
        "plddt": padded(torch.from_numpy(atom_data["plddt"].copy())),
        "frames_idx": torch.from_numpy(frame_idx.copy())[None],
        "frame_resolved_mask": torch.from_numpy(frame_mask.copy())[None],
    }


def _backbone_index(mol_type: int, atom_names: np.ndarray, const: Any, n_protein: int) -> list[int]:
    if mol_type == const.chain_type_ids["PROTEIN"]:
        table, offset = const.protein_backbone_atom_index, 1
    elif mol_type in (const.chain_type_ids["DNA"], const.chain_type_ids["RNA"]):
        table, offset = const.nucleic_backbone_atom_index, 1 + n_protein
    else:
        return [0] * len(atom_names)
    return [table[name] + offset if name in table else 0 for name in atom_names]


def _frame(token: Any, atoms: np.ndarray, const: Any) -> tuple[int, int, int, bool]:
    """Frame atoms (local indices) and whether all three are present, as Boltz picks them."""
    res_type = const.tokens[token["res_type"]]
    res_name = str(token["res_name"])
    protein = token["mol_type"] == const.chain_type_ids["PROTEIN"]
    nucleic = token["mol_type"] in (const.chain_type_ids["DNA"], const.chain_type_ids["RNA"])
    if token["atom_num"] < 3 or res_type in ("PAD", "UNK", "-"):
        return 0, 0, 0, False
    if (protein or nucleic) and res_name in const.ref_atoms:
        names = ("N", "CA", "C") if protein else ("C1'", "C3'", "C4'")
        a, b, c = (const.ref_atoms[res_name].index(n) for n in names)
        return a, b, c, bool(atoms["is_present"][a] and atoms["is_present"][b] and atoms["is_present"][c])
    if protein or nucleic:  # modified residue: look the atoms up by name
        names = ("CA", "N", "C") if protein else ("C1'", "C3'", "C4'")
        found = []
        for name in names:
            hit = atoms["name"] == name
            index = int(hit.argmax())
            found.append((index, bool(atoms[index]["is_present"]) if hit.any() else False))
        return found[0][0], found[1][0], found[2][0], all(ok for _, ok in found)
    return 0, 0, 0, False


def template_pair_tile(template: dict[str, Tensor], p: int, row: int, col: int, min_dist: float = 3.25,
                       max_dist: float = 50.75, num_bins: int = 38) -> Tensor:
    """Tile (row, col) of the template pair features that Boltz-2's ``TemplateV2Module`` projects with ``a_proj``.

    template: Boltz's template features, ``[T, N, ...]`` (``Features.template``).
    returns: [T, n, n, num_bins + 1 + 3 + 1 + 2 * 33] float32, n = ceil(N / p), for query rows i of block ``row``
    and columns j of block ``col``: one-hot of the binned distance |cb_i - cb_j|, cb pair mask, unit vector of
    ca_i in the frame of j, frame pair mask (all zeroed where i and j are not visible to each other), then the
    template residue types of i and of j. Padded rows and columns are zero. Built from the 1-D features of the
    tile's rows and columns only.
    """
    n_tokens = template["template_mask"].shape[1]
    layout = TileLayout(n_tokens, p)
    rows, cols = layout.valid(row), layout.valid(col)
    n = layout.n_local

    def pick(key: str, sl: slice) -> Tensor:
        return template[key][:, sl]

    cb_i, cb_j = pick("template_cb", rows), pick("template_cb", cols)
    dists = torch.cdist(cb_i, cb_j)  # [T, i, j]
    boundaries = torch.linspace(min_dist, max_dist, num_bins - 1)
    distogram = torch.nn.functional.one_hot((dists[..., None] > boundaries).sum(dim=-1).long(), num_classes=num_bins)
    cb_mask = (pick("template_mask_cb", rows)[:, :, None] * pick("template_mask_cb", cols)[:, None, :])[..., None]
    frame_mask = (pick("template_mask_frame", rows)[:, :, None] * pick("template_mask_frame", cols)[:, None, :])[..., None]
    visible = (pick("visibility_ids", rows)[:, :, None] == pick("visibility_ids", cols)[:, None, :]).float()

    # as Boltz indexes it: entry (i, j) holds R_j^T (ca_i - t_j), ca of i in the frame of j
    rot = pick("template_frame_rot", cols).unsqueeze(1).transpose(-1, -2)  # [T, 1, j, 3, 3]
    origin = pick("template_frame_t", cols).unsqueeze(1).unsqueeze(-1)  # [T, 1, j, 3, 1]
    ca = pick("template_ca", rows).unsqueeze(2).unsqueeze(-1)  # [T, i, 1, 3, 1]
    vector = torch.matmul(rot, ca - origin)
    norm = torch.norm(vector, dim=-1, keepdim=True)
    unit = torch.where(norm > 0, vector / norm, torch.zeros_like(vector)).squeeze(-1)  # [T, i, j, 3]

    features = torch.cat([distogram, cb_mask, unit, frame_mask], dim=-1) * visible.unsqueeze(-1)
    res_i = pick("template_restype", rows)[:, :, None].expand(-1, -1, cols.stop - cols.start, -1)
    res_j = pick("template_restype", cols)[:, None, :].expand(-1, rows.stop - rows.start, -1, -1)
    features = torch.cat([features, res_i, res_j], dim=-1)
    out = torch.zeros(features.shape[0], n, n, features.shape[-1], dtype=features.dtype)
    out[:, : features.shape[1], : features.shape[2]] = features
    return out
