"""Diffusion conditioning, score model and sampler on the grid against boltz 2.2.1's modules, float64, at 1, 4
and 9 ranks (atoms split by windows, z and the token-transformer bias as tiles), forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltz_reference import double, float64_reference, narrow_boltz2_hparams, perturb_, relative_error, shared_randn
from conftest import everywhere, quiet_bcast
from foldcp_hpc.data.boltz2_hparams import diffusion_conditioning_args
from foldcp_hpc.distributed.autograd import take_tile
from test_features import mol_dir, shared_features  # noqa: F401 - mol_dir is a fixture
from test_pairformer_parity_mpi import compare, parameter_pairs, summed

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def mixed_features(grid, mol_dir):  # noqa: F811
    """(boltz's feats [1, ...] float64, our token and atom dicts [1, ...] float64, N, our Features) of the mixed
    input."""
    ref_feats, ours = shared_features(grid, "protein_dna_rna_ligand", mol_dir)
    feats = {k: v[None] for k, v in double(ref_feats).items()}
    token, atom = ours.model_inputs(torch.float64)
    return feats, token, atom, ours.n_tokens, ours


def test_diffusion_conditioning_equals_boltz(grid, mixed_features):
    from boltz.model.modules.diffusion_conditioning import DiffusionConditioning as Ref

    from foldcp_hpc.model.diffusion_conditioning import DiffusionConditioning

    feats, token, atom, n_tokens, _ = mixed_features
    hp = narrow_boltz2_hparams(atom_depth=2, token_transformer_depth=2)
    args = diffusion_conditioning_args(hp)
    torch.manual_seed(0)
    np.random.seed(0)
    ref = perturb_(Ref(**args).double(), seed=11)
    mine = DiffusionConditioning(**args, grid=grid).double()
    mine.load_state_dict(ref.state_dict(), strict=True)

    c_s, c_z = args["token_s"], args["token_z"]
    s_trunk = shared_randn(1, n_tokens, c_s, seed=1)
    z_trunk = shared_randn(1, n_tokens, n_tokens, c_z, seed=2)
    rel = shared_randn(1, n_tokens, n_tokens, c_z, seed=3)

    leaves_ref = [t.clone().requires_grad_() for t in (s_trunk, z_trunk, rel)]
    with float64_reference():
        q, c, _, enc, dec, tok = ref(*leaves_ref, feats)
    outputs_ref = {"q": q, "c": c, "atom_enc_bias": enc, "atom_dec_bias": dec, "token_trans_bias": tok}
    weights = {name: shared_randn(*t.shape, seed=20 + i) for i, (name, t) in enumerate(outputs_ref.items())}
    sum((t * weights[name]).sum() for name, t in outputs_ref.items()).backward()

    s_mine = s_trunk.clone().requires_grad_()
    z_tile = grid.scatter_pair(z_trunk).clone().requires_grad_()
    rel_tile = grid.scatter_pair(rel).clone().requires_grad_()
    out = mine(s_mine, z_tile, rel_tile, token, atom)
    layout = out.layout
    a0, a1 = layout.atoms(grid.axis("grid").index)
    k0, k1 = layout.windows(grid.axis("grid").index)
    own = {"q": (out.q, slice(a0, a1)), "c": (out.c, slice(a0, a1)), "atom_enc_bias": (out.atom_enc_bias, slice(k0, k1)),
           "atom_dec_bias": (out.atom_dec_bias, slice(k0, k1))}
    objective = sum((t * weights[name][:, sl]).sum() for name, (t, sl) in own.items())
    objective = objective + (out.token_trans_bias * grid.scatter_pair(weights["token_trans_bias"])).sum()
    objective.backward()

    pairs = {f"forward {name}": (t.detach(), outputs_ref[name][:, sl].detach(), 1e-10) for name, (t, sl) in own.items()}
    nl = grid.layout(n_tokens)
    valid = (slice(None), nl.valid_local(grid.row), nl.valid_local(grid.col))
    pairs["forward token_trans_bias"] = (out.token_trans_bias.detach()[valid],
                                         take_tile(tok.detach(), grid.p, grid.row, grid.col)[valid], 1e-10)
    pairs["grad s_trunk"] = (summed(grid, s_mine.grad), leaves_ref[0].grad, 1e-8)
    pairs["grad z_trunk"] = (z_tile.grad[valid], take_tile(leaves_ref[1].grad, grid.p, grid.row, grid.col)[valid], 1e-8)
    pairs["grad rel"] = (rel_tile.grad[valid], take_tile(leaves_ref[2].grad, grid.p, grid.row, grid.col)[valid], 1e-8)
    pairs.update(parameter_pairs(grid, ref, mine))
    compare(grid, pairs)


def score_model_args(hp):
    return {"token_s": hp["token_s"], "atom_s": hp["atom_s"], "atoms_per_window_queries": hp["atoms_per_window_queries"],
            "atoms_per_window_keys": hp["atoms_per_window_keys"], **hp["score_model_args"]}


def build_pair(grid, hp, seed):
    """boltz's DiffusionConditioning and DiffusionModule (perturbed), and ours loaded from them."""
    from boltz.model.modules.diffusion_conditioning import DiffusionConditioning as RefCond
    from boltz.model.modules.diffusionv2 import DiffusionModule as RefScore

    from foldcp_hpc.model.diffusion import DiffusionModule
    from foldcp_hpc.model.diffusion_conditioning import DiffusionConditioning

    torch.manual_seed(seed)
    np.random.seed(seed)
    ref_cond = perturb_(RefCond(**diffusion_conditioning_args(hp)).double(), seed=seed + 1).eval()
    ref_score = perturb_(RefScore(**score_model_args(hp)).double(), seed=seed + 2).eval()
    cond = DiffusionConditioning(**diffusion_conditioning_args(hp), grid=grid).double().eval()
    cond.load_state_dict(ref_cond.state_dict(), strict=True)
    score = DiffusionModule(**score_model_args(hp), grid=grid).double().eval()
    score.load_state_dict(ref_score.state_dict(), strict=True)
    return ref_cond, ref_score, cond, score


def test_score_model_equals_boltz(grid, mixed_features):
    """One denoising call with two samples (multiplicity 2): r_update of the own atoms, and the gradients of
    every score-model parameter, of r_noisy and of s_trunk / s_inputs."""
    feats, token, atom, n_tokens, _ = mixed_features
    hp = narrow_boltz2_hparams(atom_depth=2, token_transformer_depth=2)
    ref_cond, ref_score, cond, score = build_pair(grid, hp, seed=30)
    c_s, c_z, mult = hp["token_s"], hp["token_z"], 2
    s_trunk = shared_randn(1, n_tokens, c_s, seed=31)
    s_inputs = shared_randn(1, n_tokens, c_s, seed=32)
    z_trunk = shared_randn(1, n_tokens, n_tokens, c_z, seed=33)
    rel = shared_randn(1, n_tokens, n_tokens, c_z, seed=34)
    n_atoms = atom["ref_pos"].shape[1]
    r_noisy = shared_randn(mult, n_atoms, 3, seed=35)
    times = torch.tensor([0.3, -0.7], dtype=torch.float64)

    with torch.no_grad(), float64_reference():
        q, c, to_keys, enc, dec, tok = ref_cond(s_trunk, z_trunk, rel, feats)
    leaves_ref = [t.clone().requires_grad_() for t in (s_inputs, s_trunk, r_noisy)]
    with float64_reference():
        r_ref = ref_score(leaves_ref[0], leaves_ref[1], leaves_ref[2], times, feats,
                          {"q": q, "c": c, "to_keys": to_keys, "atom_enc_bias": enc, "atom_dec_bias": dec,
                           "token_trans_bias": tok}, multiplicity=mult)
    weight = shared_randn(*r_ref.shape, seed=36)
    (r_ref * weight).sum().backward()

    with torch.no_grad():
        conditioning = cond(s_trunk, grid.scatter_pair(z_trunk), grid.scatter_pair(rel), token, atom)
    a0, a1 = conditioning.layout.atoms(grid.axis("grid").index)
    s_in, s_tr = s_inputs.clone().requires_grad_(), s_trunk.clone().requires_grad_()
    r_own = r_noisy[:, a0:a1].clone().requires_grad_()
    r_update = score(s_in, s_tr, r_own, times, token, atom, conditioning, multiplicity=mult)
    (r_update * weight[:, a0:a1]).sum().backward()

    pairs = {"forward": (r_update.detach(), r_ref[:, a0:a1].detach(), 1e-10),
             "grad s_inputs": (summed(grid, s_in.grad), leaves_ref[0].grad, 1e-8),
             "grad s_trunk": (summed(grid, s_tr.grad), leaves_ref[1].grad, 1e-8),
             "grad r_noisy": (r_own.grad, leaves_ref[2].grad[:, a0:a1], 1e-8)}
    pairs.update(parameter_pairs(grid, ref_score, score))
    compare(grid, pairs)


def test_sampler_equals_boltz(grid, mixed_features):
    """Three EDM steps with three samples in two chunks (max_parallel_samples=2), rigid alignment on: the
    coordinates equal boltz's AtomDiffusion.sample with the same seed (ours: a generator seeded alike on every
    rank; boltz: torch's global generator)."""
    from boltz.model.modules.diffusionv2 import AtomDiffusion as Ref

    from foldcp_hpc.model.sampler import AtomDiffusion

    feats, token, atom, n_tokens, _ = mixed_features
    hp = narrow_boltz2_hparams(atom_depth=1, token_transformer_depth=2)
    ref_cond, ref_score, cond, _ = build_pair(grid, hp, seed=40)
    ref = Ref(score_model_args=score_model_args(hp), **hp["diffusion_process_args"]).double().eval()
    ref.score_model.load_state_dict(ref_score.state_dict(), strict=True)
    mine = AtomDiffusion(score_model_args(hp), **hp["diffusion_process_args"], grid=grid).double().eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    c_s, c_z = hp["token_s"], hp["token_z"]
    s_trunk = shared_randn(1, n_tokens, c_s, seed=41)
    s_inputs = shared_randn(1, n_tokens, c_s, seed=42)
    z_trunk = shared_randn(1, n_tokens, n_tokens, c_z, seed=43)
    rel = shared_randn(1, n_tokens, n_tokens, c_z, seed=44)

    steering = {"fk_steering": False, "physical_guidance_update": False, "contact_guidance_update": False}
    reference = None
    if grid.rank == 0:
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # boltz draws its noise in the default dtype
        try:
            with torch.no_grad(), float64_reference():
                q, c, to_keys, enc, dec, tok = ref_cond(s_trunk, z_trunk, rel, feats)
                torch.manual_seed(7)
                reference = ref.sample(atom_mask=feats["atom_pad_mask"], num_sampling_steps=3, multiplicity=3,
                                       max_parallel_samples=2, steering_args=steering, s_trunk=s_trunk,
                                       s_inputs=s_inputs, feats=feats,
                                       diffusion_conditioning={"q": q, "c": c, "to_keys": to_keys,
                                                               "atom_enc_bias": enc, "atom_dec_bias": dec,
                                                               "token_trans_bias": tok})["sample_atom_coords"]
        finally:
            torch.set_default_dtype(default)
    reference = quiet_bcast(grid, reference)

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # gamma_0 is taken in the default dtype, by Boltz and by us
    try:
        with torch.no_grad():
            conditioning = cond(s_trunk, grid.scatter_pair(z_trunk), grid.scatter_pair(rel), token, atom)
            coords = mine.sample(s_inputs, s_trunk, token, atom, conditioning, torch.Generator().manual_seed(7),
                                 num_sampling_steps=3, multiplicity=3, max_parallel_samples=2)
    finally:
        torch.set_default_dtype(default)
    error = relative_error(coords, reference)
    same = grid.comm.allgather(float(coords.sum()))
    assert everywhere(grid, error <= 1e-8 and len(set(same)) == 1), (error, same)


def test_confidence_equals_boltz(grid, mixed_features):
    """Boltz-2's confidence module (one Pairformer block, separate intra/inter heads, z input features) on two
    sampled structures, run one after another as boltz predict does: every output, and the gradients of the
    logits heads' parameters and of the Pairformer's."""
    from boltz.model.modules.confidencev2 import ConfidenceModule as Ref

    from foldcp_hpc.model.confidence import ConfidenceModule

    feats, token, atom, n_tokens, ours = mixed_features
    hp = narrow_boltz2_hparams(confidence_blocks=1)
    args = dict(token_level_confidence=True, bond_type_feature=hp["bond_type_feature"],
                fix_sym_check=hp["fix_sym_check"], cyclic_pos_enc=hp["cyclic_pos_enc"],
                conditioning_cutoff_min=hp["conditioning_cutoff_min"],
                conditioning_cutoff_max=hp["conditioning_cutoff_max"], **hp["confidence_model_args"])
    torch.manual_seed(50)
    np.random.seed(50)
    ref = perturb_(Ref(hp["token_s"], hp["token_z"], **args).double(), seed=51).eval()
    args["pairformer_args"] = dict(hp["confidence_model_args"]["pairformer_args"])
    mine = ConfidenceModule(hp["token_s"], hp["token_z"], **args, grid=grid).double().eval()
    mine.load_state_dict(ref.state_dict(), strict=True)

    c_s, c_z, n_atoms = hp["token_s"], hp["token_z"], atom["ref_pos"].shape[1]
    s_inputs = shared_randn(1, n_tokens, c_s, seed=52)
    s = shared_randn(1, n_tokens, c_s, seed=53)
    z = shared_randn(1, n_tokens, n_tokens, c_z, seed=54)
    coords = 6 * shared_randn(2, n_atoms, 3, seed=55)  # contacts under 8 A and every distance bin occur
    distogram = shared_randn(1, n_tokens, n_tokens, 64, seed=56)
    with float64_reference():
        out = ref(s_inputs, s, z, coords, feats, distogram, multiplicity=2, run_sequentially=True)
    weights = {k: shared_randn(*out[f"{k}_logits"][:1].shape, seed=60 + i)
               for i, k in enumerate(("pae", "pde", "plddt", "resolved"))}
    sum((out[f"{k}_logits"][:1] * w).sum() for k, w in weights.items()).backward()

    pair = {k: v[None] for k, v in ours.pair_tile(grid.p, grid.row, grid.col).items()}
    z_tile, d_tile = grid.scatter_pair(z), grid.scatter_pair(distogram)
    base = mine.pair_base(s_inputs, z_tile, token, pair)
    nl = grid.layout(n_tokens)
    valid = (slice(None), nl.valid_local(grid.row), nl.valid_local(grid.col))
    size = grid.axis("grid").size
    pairs = {}
    for k in range(2):
        got = mine(s_inputs, s, z_tile, coords[k:k + 1], token, atom, pair, d_tile, z_base=base)
        if k == 0:
            objective = sum((got.logits[name] * grid.scatter_pair(weights[name])).sum() for name in ("pae", "pde"))
            objective = objective + sum((got.logits[name] * weights[name]).sum() / size for name in ("plddt", "resolved"))
            objective.backward()
        tile = lambda t: take_tile(t[k:k + 1], grid.p, grid.row, grid.col)[valid]  # noqa: E731
        pairs[f"{k} pae"] = (got.pae.detach()[valid], tile(out["pae"]).detach(), 1e-10)
        pairs[f"{k} pde"] = (got.pde.detach()[valid], tile(out["pde"]).detach(), 1e-10)
        pairs[f"{k} pae_logits"] = (got.logits["pae"].detach()[valid], tile(out["pae_logits"]).detach(), 1e-10)
        pairs[f"{k} plddt"] = (got.plddt.detach(), out["plddt"][k:k + 1].detach(), 1e-10)
        for name in ("complex_plddt", "complex_iplddt", "complex_pde", "complex_ipde", "ptm", "iptm", "ligand_iptm",
                     "protein_iptm"):
            pairs[f"{k} {name}"] = (getattr(got, name).detach(), out[name][k:k + 1].detach(), 1e-10)
        for a, row in out["pair_chains_iptm"].items():
            for b, value in row.items():
                pairs[f"{k} chain pair {a},{b}"] = (got.pair_chains_iptm[a][b].detach(), value[k:k + 1].detach(), 1e-10)
    pairs.update(parameter_pairs(grid, ref, mine))
    compare(grid, pairs)
