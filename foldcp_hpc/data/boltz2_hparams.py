"""Constructor hyper-parameters of ``boltz.model.models.boltz2.Boltz2`` for the released Boltz-2 checkpoint.

``boltz2_hparams()`` returns the keyword arguments that rebuild the architecture of the released
structure + confidence checkpoint ``boltz2_conf.ckpt`` (Lightning ``state_dict``: 5,102 keys, no prefix),
in the form a Lightning checkpoint's ``hyper_parameters`` holds them, with the overrides that
``boltz predict`` passes to ``Boltz2.load_from_checkpoint`` already applied. ``Boltz2(**boltz2_hparams())``
gives, with boltz 2.2.1:

* 5,102 state-dict keys, 5,036 distinct tensors: each of the 33 ``DiffusionTransformerLayer``s (24 in the
  score model's token transformer, 3 each in the input embedder's atom encoder and the score model's atom
  encoder and decoder) registers its gate both as ``output_projection_linear.{weight,bias}`` and as
  ``output_projection.0.{weight,bias}`` (66 aliased keys); the gates of the 33 ``ConditionedTransitionBlock``s
  exist only as ``...transition.output_projection.0.{weight,bias}`` (66 keys under that one name). The two
  buffers are ``confidence_module.boundaries`` and ``structure_module.zero``;
* 506,724,992 parameters (521,047,871 state-dict elements when the aliases are counted twice and the
  buffers are included).

Where each value comes from
---------------------------
* Sizes, embedder/score-model/template arguments and the model flags ``fix_sym_check``,
  ``cyclic_pos_enc``, ``bond_type_feature``, ``predict_bfactor``, ``exclude_ions_from_lddt``,
  ``checkpoint_diffusion_conditioning``, ``conditioning_cutoff_min/max`` (``data.binder_pocket_cutoff_*``):
  ``scripts/train/configs/structurev2.yaml`` of jwohlwend/boltz.
* ``use_templates=True``: not in the public config (``use_templates: false``), but the checkpoint has
  ``template_module.*`` keys (81 of the 5,102). ``use_templates_v2=True``: the project's
  notes; ``TemplateModule`` and ``TemplateV2Module`` have identical keys and shapes, so the count cannot
  tell them apart. v2 is the one whose input (``visibility_ids``) boltz 2.2.1's inference featurizer
  (``featurizerv2.py``) produces; v1 masks templates by ``asym_id`` instead.
* ``confidence_prediction=True``, ``alpha_pae=1`` and ``confidence_model_args`` (8-block v2 Pairformer,
  ``add_s_to_z_prod``, ``add_s_input_to_s``, ``add_z_input_to_z``, ``use_separate_heads=True``, 50/64/64 bins):
  ``scripts/train/configs/confidencev2.yaml`` of NVIDIA-BioNeMo/boltz-cp (a public fork; jwohlwend/boltz
  publishes no Boltz-2 confidence config). ``use_separate_heads=True`` is what takes the key count from
  5,100 to 5,102 (separate intra-/inter-chain PAE and PDE heads).
* ``pairformer_args`` = ``asdict(PairformerArgsV2())``, ``msa_args`` = ``asdict(MSAModuleArgs(use_paired_feature=True))``,
  ``diffusion_process_args`` = ``asdict(Boltz2DiffusionParams())``, ``ema=False``, ``predict_args`` (CLI
  defaults: 3 recycling steps, 200 sampling steps, 1 sample, at most 5 in parallel): ``boltz/main.py``
  of boltz 2.2.1, i.e. what ``boltz predict`` overrides at load time. These dicts are written out literally
  here so that this module does not import boltz.
* ``steering_args``: the fields of ``BoltzSteeringParams`` with every guidance flag off
  (``fk_steering``, ``physical_guidance_update`` and ``contact_guidance_update`` all False; note that
  ``boltz predict`` without ``--use_potentials`` leaves ``contact_guidance_update`` True).
* ``use_kernels=False``: the cuEquivariance kernels are off (CPU / reference use).
* ``training_args``, ``validation_args``, ``diffusion_loss_args``: the two public configs' values (structurev2
  with the confidencev2 overrides). They do not change the architecture and are not read at inference.
* Everything else: ``Boltz2.__init__`` defaults of boltz 2.2.1, spelled out. ``validators`` is omitted
  (``save_hyperparameters(ignore=["validators"])`` never stores it).

Training-only switches (dropout rates, ``activation_checkpointing``, ``checkpoint_diffusion_conditioning``)
keep the released configs' values where boltz predict does not override them; boltz applies all of them only
when ``module.training`` is set, so they are inert in ``eval()``.

Nothing here imports boltz (omegaconf is imported inside ``boltz2_hparams``); every call returns a fresh,
independent dict (``ConfidenceModule`` writes into its ``pairformer_args``).
"""

from __future__ import annotations

from typing import Any

#: Measured with boltz 2.2.1: ``len(Boltz2(**boltz2_hparams()).state_dict())``.
BOLTZ2_CONF_STATE_DICT_KEYS = 5102
#: Measured with boltz 2.2.1: ``sum(p.numel() for p in Boltz2(**boltz2_hparams()).parameters())``.
BOLTZ2_CONF_NUM_PARAMETERS = 506_724_992


def boltz2_hparams() -> dict[str, Any]:
    """Full-size ``Boltz2`` keyword arguments reproducing ``boltz2_conf.ckpt`` (inference overrides applied).

    ``training_args`` and ``validation_args`` are OmegaConf ``DictConfig``s, as in boltz's Hydra-built
    checkpoints: ``Boltz2`` reads them by attribute (``self.training_args.max_lr``, also in
    ``on_load_checkpoint``), which a plain dict does not allow. Every other value is a plain dict / scalar.
    """
    from omegaconf import OmegaConf  # a boltz dependency; imported here to keep module import light

    hp = _plain_hparams()
    hp["training_args"] = OmegaConf.create(hp["training_args"])
    hp["validation_args"] = OmegaConf.create(hp["validation_args"])
    return hp


def _plain_hparams() -> dict[str, Any]:
    return {
        # Sizes (structurev2.yaml).
        "atom_s": 128,
        "atom_z": 16,
        "token_s": 384,
        "token_z": 128,
        "num_bins": 64,
        "atom_feature_dim": 388,
        "atoms_per_window_queries": 32,
        "atoms_per_window_keys": 128,
        "min_dist": 2.0,
        "max_dist": 22.0,
        # Input embedder (structurev2.yaml).
        "embedder_args": {
            "atom_encoder_depth": 3,
            "atom_encoder_heads": 4,
            "add_mol_type_feat": True,
            "add_method_conditioning": True,
            "add_modified_flag": True,
            "add_cyclic_flag": True,
        },
        # asdict(MSAModuleArgs(use_paired_feature=True)) from boltz/main.py (sizes as in structurev2.yaml).
        "msa_args": {
            "msa_s": 64,
            "msa_blocks": 4,
            "msa_dropout": 0.0,
            "z_dropout": 0.0,
            "use_paired_feature": True,
            "pairwise_head_width": 32,
            "pairwise_num_heads": 4,
            "activation_checkpointing": False,
            "offload_to_cpu": False,
            "subsample_msa": False,
            "num_subsampled_msa": 1024,
        },
        # asdict(PairformerArgsV2()) from boltz/main.py: 64 blocks, 16 heads, v2 attention.
        "pairformer_args": {
            "num_blocks": 64,
            "num_heads": 16,
            "dropout": 0.0,
            "activation_checkpointing": False,
            "offload_to_cpu": False,
            "v2": True,
        },
        # Templates (structurev2.yaml template_args; v2 module).
        "use_templates": True,
        "use_templates_v2": True,
        "template_args": {
            "template_dim": 64,
            "template_blocks": 2,
            "activation_checkpointing": True,
        },
        # Diffusion score model (structurev2.yaml).
        "score_model_args": {
            "sigma_data": 16,
            "dim_fourier": 256,
            "atom_encoder_depth": 3,
            "atom_encoder_heads": 4,
            "token_transformer_depth": 24,
            "token_transformer_heads": 16,
            "atom_decoder_depth": 3,
            "atom_decoder_heads": 4,
            "conditioning_transition_layers": 2,
            "transformer_post_ln": False,
            "activation_checkpointing": True,
        },
        # asdict(Boltz2DiffusionParams()) from boltz/main.py.
        "diffusion_process_args": {
            "gamma_0": 0.8,
            "gamma_min": 1.0,
            "noise_scale": 1.003,
            "rho": 7,
            "step_scale": 1.5,
            "sigma_min": 0.0001,
            "sigma_max": 160.0,
            "sigma_data": 16.0,
            "P_mean": -1.2,
            "P_std": 1.5,
            "coordinate_augmentation": True,
            "alignment_reverse_diff": True,
            "synchronize_sigmas": True,
        },
        # Confidence head (confidencev2.yaml of NVIDIA-BioNeMo/boltz-cp).
        "confidence_prediction": True,
        "token_level_confidence": True,
        "alpha_pae": 1.0,
        "confidence_model_args": {
            "num_dist_bins": 64,
            "max_dist": 22,
            "add_s_to_z_prod": True,
            "add_s_input_to_s": True,
            "add_z_input_to_z": True,
            "pairformer_args": {
                "num_blocks": 8,
                "num_heads": 16,
                "dropout": 0.25,
                "activation_checkpointing": True,
                "v2": True,  # ConfidenceModule forces v2 anyway
            },
            "confidence_args": {
                "num_plddt_bins": 50,
                "num_pde_bins": 64,
                "num_pae_bins": 64,
                "use_separate_heads": True,
                "relative_confidence": None,
            },
        },
        # Model flags (structurev2.yaml).
        "fix_sym_check": True,
        "cyclic_pos_enc": True,
        "bond_type_feature": True,
        "predict_bfactor": True,
        "exclude_ions_from_lddt": True,
        "checkpoint_diffusion_conditioning": True,
        "conditioning_cutoff_min": 4.0,
        "conditioning_cutoff_max": 20.0,
        # No affinity head in the structure + confidence checkpoint.
        "affinity_prediction": False,
        "affinity_model_args": None,
        "affinity_model_args1": None,
        "affinity_model_args2": None,
        "affinity_ensemble": False,
        "affinity_mw_correction": True,
        # Load-time overrides of boltz predict.
        "ema": False,
        "ema_decay": 0.999,
        "use_kernels": False,
        "predict_args": {
            "recycling_steps": 3,
            "sampling_steps": 200,
            "diffusion_samples": 1,
            "max_parallel_samples": 5,
            "write_confidence_summary": True,
            "write_full_pae": False,
            "write_full_pde": False,
        },
        "steering_args": {
            "fk_steering": False,
            "num_particles": 3,
            "fk_lambda": 4.0,
            "fk_resampling_interval": 3,
            "physical_guidance_update": False,
            "contact_guidance_update": False,
            "num_gd_steps": 20,
        },
        # Training / validation settings (architecture-neutral; structurev2 + confidencev2 configs).
        "training_args": {
            "recycling_steps": 3,
            "sampling_steps": 200,
            "diffusion_multiplicity": 16,
            "diffusion_samples": 1,
            "affinity_loss_weight": 3e-3,
            "confidence_loss_weight": 3e-3,
            "diffusion_loss_weight": 4.0,
            "distogram_loss_weight": 3e-2,
            "bfactor_loss_weight": 1e-3,
            "adam_beta_1": 0.9,
            "adam_beta_2": 0.95,
            "adam_eps": 1e-8,
            "lr_scheduler": "af3",
            "base_lr": 0.0,
            "max_lr": 0.0018,
            "lr_warmup_no_steps": 1000,
            "lr_start_decay_after_n_steps": 50000,
            "lr_decay_every_n_steps": 50000,
            "lr_decay_factor": 0.95,
            "weight_decay": 0.003,
            "weight_decay_exclude": True,
            "symmetry_correction": True,
            "run_confidence_sequentially": False,
        },
        "validation_args": {
            "recycling_steps": 3,
            "sampling_steps": 200,
            "diffusion_samples": 5,
            "symmetry_correction": True,
            "run_confidence_sequentially": True,
        },
        "diffusion_loss_args": {
            "add_smooth_lddt_loss": True,
            "nucleotide_loss_weight": 5.0,
            "ligand_loss_weight": 10.0,
            "filter_by_plddt": 0.0,
        },
        "num_val_datasets": 1,
        # confidencev2.yaml: the confidence fine-tuning froze the trunk. Boltz2 then sets requires_grad=False on
        # every parameter outside confidence_module; set True to train the whole model.
        "structure_prediction_training": False,
        "validate_structure": True,
        # Remaining Boltz2.__init__ defaults (boltz 2.2.1).
        "run_trunk_and_structure": True,
        "skip_run_structure": False,
        "compile_pairformer": False,
        "compile_structure": False,
        "compile_confidence": False,
        "compile_affinity": False,
        "compile_msa": False,
        "compile_templates": False,
        "aggregate_distogram": True,
        "use_no_atom_char": False,
        "no_random_recycling_training": False,
        "use_atom_backbone_feat": False,
        "use_residue_feats_atoms": False,
        "log_loss_every_steps": 50,
    }


def reduced_boltz2_hparams(
    pairformer_blocks: int = 2,
    msa_blocks: int = 1,
    token_transformer_depth: int = 2,
    confidence_blocks: int = 1,
    template_blocks: int = 1,
    atom_depth: int = 1,
) -> dict[str, Any]:
    """The Boltz-2 architecture (same widths, heads and flags) with fewer blocks/layers, for tests.

    ``atom_depth`` sets the input embedder's atom encoder and the score model's atom encoder and decoder.
    With the defaults the model has 43,680,384 parameters (about 175 MB in float32) and 518 state-dict keys.
    """
    hp = boltz2_hparams()
    hp["pairformer_args"]["num_blocks"] = pairformer_blocks
    hp["msa_args"]["msa_blocks"] = msa_blocks
    hp["template_args"]["template_blocks"] = template_blocks
    hp["confidence_model_args"]["pairformer_args"]["num_blocks"] = confidence_blocks
    hp["embedder_args"]["atom_encoder_depth"] = atom_depth
    hp["score_model_args"]["atom_encoder_depth"] = atom_depth
    hp["score_model_args"]["atom_decoder_depth"] = atom_depth
    hp["score_model_args"]["token_transformer_depth"] = token_transformer_depth
    return hp


def affinity_module_args(pairformer_blocks: int = 8) -> dict[str, Any]:
    """One ``AffinityModule``'s constructor arguments (besides token_s / token_z) for random weights.

    Boltz publishes no affinity configuration and the affinity checkpoint (``boltz2_aff.ckpt``) cannot be read
    here, so these are the module's own defaults (64 distance bins up to 22 A) with an assumed 8-block pair-only
    Pairformer of the trunk's head sizes and heads MLP width 384. A real affinity checkpoint brings its own.
    """
    return {
        "pairformer_args": {"num_blocks": pairformer_blocks, "dropout": 0.25, "pairwise_head_width": 32,
                            "pairwise_num_heads": 4, "post_layer_norm": False, "activation_checkpointing": False},
        "transformer_args": {"token_s": 384, "num_blocks": 1, "num_heads": 16, "activation_checkpointing": False},
        "num_dist_bins": 64,
        "max_dist": 22,
    }


def with_affinity(hp: dict[str, Any], pairformer_blocks: int = 8, mw_correction: bool = False) -> dict[str, Any]:
    """``hp`` turned into the architecture of Boltz-2's affinity model (for random weights): the whole structure +
    confidence model plus the two-model affinity ensemble, as ``boltz predict`` loads ``boltz2_aff.ckpt``
    (``affinity_mw_correction`` is its ``--affinity_mw_correction`` flag, off by default)."""
    hp = dict(hp)
    hp.update({"affinity_prediction": True, "affinity_ensemble": True, "affinity_mw_correction": mw_correction,
               "affinity_model_args1": affinity_module_args(pairformer_blocks),
               "affinity_model_args2": affinity_module_args(pairformer_blocks)})
    return hp


def embedder_args(hp: dict[str, Any]) -> dict[str, Any]:
    """The InputEmbedder's constructor arguments as ``Boltz2.__init__`` assembles them (``full_embedder_args``)."""
    keys = ("atom_s", "atom_z", "token_s", "token_z", "atoms_per_window_queries", "atoms_per_window_keys",
            "atom_feature_dim")
    flags = ("use_no_atom_char", "use_atom_backbone_feat", "use_residue_feats_atoms")
    return {**{k: hp[k] for k in keys}, **{k: hp.get(k, False) for k in flags}, **hp["embedder_args"]}


def diffusion_conditioning_args(hp: dict[str, Any]) -> dict[str, Any]:
    """DiffusionConditioning's constructor arguments as ``Boltz2.__init__`` passes them."""
    score = hp["score_model_args"]
    return {
        "token_s": hp["token_s"], "token_z": hp["token_z"], "atom_s": hp["atom_s"], "atom_z": hp["atom_z"],
        "atoms_per_window_queries": hp["atoms_per_window_queries"],
        "atoms_per_window_keys": hp["atoms_per_window_keys"],
        **{k: score[k] for k in ("atom_encoder_depth", "atom_encoder_heads", "token_transformer_depth",
                                 "token_transformer_heads", "atom_decoder_depth", "atom_decoder_heads",
                                 "conditioning_transition_layers")},
        "atom_feature_dim": hp["atom_feature_dim"],
        **{k: hp.get(k, False) for k in ("use_no_atom_char", "use_atom_backbone_feat", "use_residue_feats_atoms")},
    }
