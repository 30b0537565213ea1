"""recipe=cifar|imagenet: one recipe file per (method, regime) for the method's values,
augmentation and optimiser; the ImageNet regime brings the paper's backbone too (ResNet-50;
a ViT-S/16 for DINO and MoCo v3) and, for DINO and SwAV, the paper's local crops.

Each method's ImageNet recipe is held against the values its paper publishes (cited per
entry; a method added to the registry fails here until its entry is written). Values not in
a paper are marked as the official code's. The CIFAR recipes are held by
tests/orchestration/test_cli.py.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from sslstream.models.methods import METHODS
from sslstream.orchestration.cli import compose_config
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.schema.recipes import pick_recipe

# Paper values, method by method: (method keys, optimiser keys, augmentation).
# lr is the lr at batch 256 (optim.base_batch), scaled linearly with the global batch.
IMAGENET = {
    # BYOL, Grill et al. 2020 (arXiv 2006.07733v3), Sec. 3.2 "Architecture": projector and
    # predictor MLPs 4096 hidden, 256 out; "Optimization": LARS, lr 0.2 x bs/256, wd 1.5e-6,
    # biases/BN excluded, 10 warmup epochs, tau_base 0.996 (1000 epochs), batch 4096.
    "byol": ({"proj_hidden_dim": 4096, "proj_output_dim": 256, "pred_hidden_dim": 4096,
              "tau_base": 0.996, "tau_final": 1.0},
             {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6, "warmup_epochs": 10,
              "eta": 0.001, "clip_lr": False},
             "byol"),
    # SimCLR, Chen et al. 2020 (arXiv 2002.05709), Sec. 2.3 "Default setting": LARS, lr 4.8 =
    # 0.3 x bs/256, wd 1e-6, 10 warmup epochs, 128-d projection output; hidden = the
    # ResNet-50 width 2048 (Sec. 2.2 / B.4); tau 0.1 (Table 5: best with l2 norm).
    "simclr": ({"proj_hidden_dim": 2048, "proj_output_dim": 128, "temperature": 0.1},
               {"name": "lars", "lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10,
                "eta": 0.001, "clip_lr": False},
               "simclr"),
    # MoCo v2, Chen et al. 2020b (arXiv 2003.04297), Sec. 3 / Table 1: MLP head 2048 hidden,
    # tau 0.2, 200 epochs at batch 256, cosine; MoCo v1 (He et al. 2020, Sec. 3.3 / 4):
    # K = 65536, m = 0.999, 128-d output, SGD lr 0.03, momentum 0.9, wd 1e-4.
    "mocov2": ({"proj_hidden_dim": 2048, "proj_output_dim": 128, "temperature": 0.2,
                "queue_size": 65536, "tau_base": 0.999, "tau_final": 0.999, "symmetric": False},
               {"name": "sgd", "lr": 0.03, "weight_decay": 1e-4, "momentum": 0.9,
                "warmup_epochs": 0},
               "mocov2"),
    # SimSiam, Chen & He 2021 (arXiv 2011.10566), Sec. 4 "Baseline settings": SGD lr 0.05 x
    # bs/256, momentum 0.9, wd 1e-4, batch 512, cosine; projector 3 layers 2048 out, predictor
    # 2048-512-2048 (its hidden 512); Sec. 4.1 / Table 1: the predictor's lr is not decayed.
    "simsiam": ({"proj_hidden_dim": 2048, "proj_output_dim": 2048, "proj_layers": 3,
                 "pred_hidden_dim": 512, "fix_pred_lr": True},
                {"name": "sgd", "lr": 0.05, "weight_decay": 1e-4, "momentum": 0.9,
                 "warmup_epochs": 0},
                "simsiam"),
    # VICReg, Bardes et al. 2022 (arXiv 2105.04906), Sec. 4.1 / Appendix C.1: expander
    # 8192-8192-8192, lambda = mu = 25, nu = 1, LARS base lr 0.2 x bs/256, wd 1e-6, batch
    # 2048, 10 warmup epochs.
    "vicreg": ({"proj_hidden_dim": 8192, "proj_output_dim": 8192, "proj_layers": 3,
                "sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0},
               {"name": "lars", "lr": 0.2, "weight_decay": 1e-6, "warmup_epochs": 10,
                "eta": 0.001, "clip_lr": False},
               "vicreg"),
    # Barlow Twins, Zbontar et al. 2021 (arXiv 2103.03230), Sec. 3 "Implementation details":
    # projector 3 layers of 8192, LARS lr 0.2 (weights) / 0.0048 (biases, BN), wd 1.5e-6,
    # batch 2048 on 32 GPUs, 10 warmup epochs; lambda 5e-3 (the official code's default
    # 0.0051). wd and the bias lr are RESCALED by the official code's 32 ranks for our exact
    # gather (x32 and /32; tests/test_barlow_twins_scaling.py shows why).
    "barlow_twins": ({"proj_hidden_dim": 8192, "proj_output_dim": 8192, "proj_layers": 3,
                      "lambd": 0.0051, "scale_loss": 1.0, "bias_lr_mult": (0.0048 / 0.2) / 32},
                     {"name": "lars", "lr": 0.2, "weight_decay": 1.5e-6 * 32, "warmup_epochs": 10,
                      "eta": 0.001, "clip_lr": False},
                     "barlow_twins"),
    # Margin contrastive (Hadsell et al. 2006): no SSL paper recipe; SimCLR's values.
    "contrastive": ({"proj_hidden_dim": 2048, "proj_output_dim": 128},
                    {"name": "lars", "lr": 0.3, "weight_decay": 1e-6, "warmup_epochs": 10},
                    "contrastive"),
    # DINO, Caron et al. 2021 (arXiv 2104.14294), Sec. 4 / Appendix, ViT-S/16 as
    # facebookresearch/dino main_dino.py's defaults run it: head 2048 hidden, 256 bottleneck,
    # K = 65536, no BN, normalised last layer frozen for epoch 0; student T 0.1, teacher 0.04
    # (no warm-up), center momentum 0.9, teacher momentum 0.996 -> 1 (cosine); AdamW lr
    # 5e-4 x bs/256, 10 warmup epochs, wd 0.04 -> 0.4 (cosine), clip 3.0; 2 x 224 + 8 x 96 crops.
    "dino": ({"proj_hidden_dim": 2048, "proj_output_dim": 256, "out_dim": 65536,
              "num_layers": 3, "use_bn_in_head": False, "norm_last_layer": True,
              "freeze_last_layer_epochs": 1, "student_temp": 0.1, "teacher_temp": 0.04,
              "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
              "center_momentum": 0.9, "tau_base": 0.996, "tau_final": 1.0},
             {"name": "adamw", "lr": 5e-4, "weight_decay": 0.04, "weight_decay_end": 0.4,
              "warmup_epochs": 10, "exclude_bias_and_norm_wd": True},
             "dino"),
    # MoCo v3, Chen, Xie & He 2021 (arXiv 2104.02057), Sec. 4 / Appendix A, ViT-S as
    # facebookresearch/moco-v3 CONFIG.md runs it (--optimizer=adamw --lr=1.5e-4
    # --weight-decay=.1 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2; main_moco.py
    # defaults --moco-m 0.99, --moco-dim 256, --moco-mlp-dim 4096); moco/builder.py MoCo_ViT:
    # 3-layer projector, predictor with the output BN; AdamW decays every parameter.
    "mocov3": ({"proj_hidden_dim": 4096, "proj_output_dim": 256, "pred_hidden_dim": 4096,
                "proj_num_layers": 3, "pred_last_bn": True, "temperature": 0.2,
                "tau_base": 0.99, "tau_final": 1.0},
               {"name": "adamw", "lr": 1.5e-4, "weight_decay": 0.1, "warmup_epochs": 40,
                "exclude_bias_and_norm_wd": False},
               "mocov3"),
    # SwAV, Caron et al. 2020 (arXiv 2006.09882), Sec. 4 / Appendix A, the batch-256 run
    # (facebookresearch/swav scripts/swav_200ep_bs256_pretrain.sh): 128-d features, 3000
    # prototypes, T 0.1, epsilon 0.05, 3 Sinkhorn iterations, queue 3840 from epoch 15,
    # prototypes frozen for 5005 iterations (one epoch at 256); LARS lr 0.6, wd 1e-6, LARC
    # trust 1e-3 without clipping, no warmup; 2 x 224 (scale 0.14-1) + 6 x 96 (0.05-0.14).
    "swav": ({"proj_hidden_dim": 2048, "proj_output_dim": 128, "n_prototypes": 3000,
              "temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3,
              "queue_size": 3840, "queue_start_epoch": 15, "freeze_prototypes_epochs": 1},
             {"name": "lars", "lr": 0.6, "weight_decay": 1e-6, "warmup_epochs": 0,
              "eta": 0.001, "clip_lr": False},
             "swav"),
}

# What an ImageNet recipe brings besides its method and optimiser where the paper departs
# from ResNet-50, two views and no clipping: (backbone keys, local crops, grad_clip).
BACKBONE_CROPS_CLIP = {
    # DINO ViT-S/16 (main_dino.py: --arch vit_small --patch_size 16 --drop_path_rate 0.1,
    # --local_crops_number 8 --local_crops_scale 0.05 0.4, --global_crops_scale 0.4 1.,
    # --clip_grad 3.0)
    "dino": ({"name": "vit_small", "patch_size": 16, "drop_path_rate": 0.1, "pool": "token",
              "freeze_patch_embed": False},
             {"count": 8, "size": 96, "crop_scale": [0.05, 0.4]}, 3.0),
    # MoCo v3 ViT-S/16 with the frozen random patch projection (--stop-grad-conv1, Sec. 4.2);
    # moco-v3 vits.py builds its ViTs without stochastic depth; two 224 px crops
    "mocov3": ({"name": "vit_small", "patch_size": 16, "drop_path_rate": 0.0, "pool": "token",
                "freeze_patch_embed": True}, {"count": 0}, None),
    # SwAV ResNet-50, --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05
    # --max_scale_crops 1. 0.14
    "swav": ({"name": "resnet50"}, {"count": 6, "size": 96, "crop_scale": [0.05, 0.14]}, None),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_imagenet_recipe_holds_the_papers_values(method: str) -> None:
    assert method in IMAGENET, f"write {method}'s paper values into IMAGENET"
    cfg = compose_config([f"method={method}", "recipe=imagenet"])
    want_method, want_optim, want_augment = IMAGENET[method]
    for section, want in (("method", want_method), ("optim", want_optim)):
        for key, value in want.items():
            got = cfg[section][key]
            assert got == value if isinstance(value, str | bool) else \
                got == pytest.approx(value, rel=1e-9), (method, section, key)
    assert cfg.optim.base_batch == 256 and cfg.optim.scaling == "linear"
    assert cfg.recipe == "imagenet"
    # ResNet-50 at 224 px with ImageNet statistics, the paper's augmentation, two views and
    # no clipping, unless the paper says otherwise
    backbone, local, grad_clip = BACKBONE_CROPS_CLIP.get(
        method, ({"name": "resnet50"}, {"count": 0}, None))
    for key, value in backbone.items():
        assert cfg.backbone[key] == value, (method, key)
    for key, value in local.items():
        got = cfg.augment.local[key]
        assert (list(got) if key == "crop_scale" else got) == value, (method, key)
    assert cfg.augment.name == want_augment
    assert cfg.augment.view1.size == cfg.augment.view2.size == 224
    assert list(cfg.augment.view1.mean) == pytest.approx([0.485, 0.456, 0.406], abs=1e-3)
    assert cfg.trainer.grad_clip == grad_clip


def test_imagenet_augmentations_follow_the_papers() -> None:
    """Barlow Twins takes BYOL's views (paper Sec. 3), SimSiam MoCo v2's (paper Sec. 4)."""
    def views(method: str) -> dict:
        cfg = compose_config([f"method={method}", "recipe=imagenet"])
        return {k: OmegaConf.to_container(cfg.augment[k]) for k in ("view1", "view2")}

    assert views("barlow_twins") == views("byol")
    assert views("simsiam") == views("mocov2")
    assert views("contrastive") == views("simclr")
    assert views("byol")["view1"]["blur_p"] == 1.0 and views("byol")["view2"]["solarize_p"] == 0.2


def test_the_recipe_file_comes_from_method_recipe_and_data() -> None:
    assert pick_recipe(None, None, None) == "byol_cifar"  # the embedded default
    assert pick_recipe(None, None, "cifar10") == "byol_cifar"
    assert pick_recipe("simclr", None, "shards") == "simclr_imagenet"  # shards: imagenet
    assert pick_recipe(None, "cifar", "shards") == "byol_cifar"  # recipe= wins over the data
    assert pick_recipe(None, "vicreg_imagenet", "cifar10") == "vicreg_imagenet"  # a file by name
    assert pick_recipe("vicreg", "vicreg_cifar", None) == "vicreg_cifar"
    with pytest.raises(ConfigError, match="recipe=simclr_cifar is simclr's recipe but method=byol"):
        pick_recipe("byol", "simclr_cifar", None)
    with pytest.raises(ConfigError, match="did you mean imagenet"):
        pick_recipe(None, "imagent", None)
    # a user's own shards: ResNet-50 and 224 px ImageNet views, not 32 px CIFAR crops
    cfg = compose_config(["data=shards", "data.train=/tmp/x", "method=simclr"])
    assert (cfg.recipe, cfg.backbone.name, cfg.augment.name, cfg.augment.view1.size) == (
        "imagenet", "resnet50", "simclr", 224)
    assert (cfg.method.temperature, cfg.optim.lr) == (0.1, 0.3)
    # the embedded default and CIFAR-10 keep the CIFAR recipe
    cfg = compose_config([])
    assert (cfg.recipe, cfg.backbone.name, cfg.augment.name, cfg.method.tau_base) == (
        "cifar", "resnet_mini", "cifar_byol", 0.99)
    cfg = compose_config(["data=cifar10", "method=mocov2"])
    assert (cfg.recipe, cfg.backbone.name, cfg.augment.view1.size, cfg.optim.lr) == (
        "cifar", "resnet18", 32, 0.3)


def test_command_line_keys_win_over_the_recipe() -> None:
    cfg = compose_config(["data=shards", "data.train=/tmp/x", "backbone=resnet_mini",
                          "augment.view1.size=32", "augment.view2.size=32",
                          "method.tau_base=0.99", "optim.lr=0.5"])
    assert (cfg.recipe, cfg.backbone.name, cfg.augment.view2.size, cfg.optim.lr) == (
        "imagenet", "resnet_mini", 32, 0.5)
    assert cfg.method.tau_base == 0.99  # chosen on the command line
    assert cfg.optim.weight_decay == 1.5e-6  # the rest of the imagenet optimiser stays
    # recipe=cifar on a user's shards: the small backbone and 32 px views
    cfg = compose_config(["data=shards", "data.train=/tmp/x", "recipe=cifar"])
    assert (cfg.backbone.name, cfg.augment.view1.size, cfg.optim.lr) == ("resnet_mini", 32, 1.0)
    # another optimiser than the recipe's: its own defaults, no recipe values leak
    cfg = compose_config(["recipe=imagenet", "method=simsiam", "optim=adamw"])
    plain = compose_config(["optim=adamw"])
    assert OmegaConf.to_container(cfg.optim) == OmegaConf.to_container(plain.optim)
    assert cfg.optim.name == "adamw" and cfg.optim.lr == 1e-3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_grad_clip_is_off_unless_asked(method: str) -> None:
    """No CIFAR recipe clips gradients (solo-learn, lightly); the imagenet recipes (DINO's
    clips at 3.0, as main_dino.py) are checked in test_imagenet_recipe_holds_the_papers_values."""
    assert compose_config([f"method={method}"]).trainer.grad_clip is None
    if method == "byol":
        assert compose_config(["trainer.grad_clip=3.0"]).trainer.grad_clip == 3.0
