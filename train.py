"""Phase 2 of ERW, and the REPA / SiT baselines: velocity loss + lambda(s) * alignment on noisy latents.

    accelerate launch train.py --config configs/table1_2_sit_xl2_erw.yaml \
        --warmup-ckpt exps/sit-xl2-erw-warmup/checkpoints/last.pt

With --warmup-ckpt the embedders, the k warmed blocks and the projector come from Phase 1 (placed at
--warmup-layers START..START+k-1); the rest starts fresh. lambda(s) = proj_coeff * 2^(-s / proj_half_life) with s
counted from the start of this phase (--proj-decay none keeps it constant). Without a warm start and with
--align-loss cosine --proj-decay none this is REPA; with --proj-coeff 0 it is plain SiT (no teacher is loaded).
With --fid-every N it logs FID, sFID and IS of the EMA weights every N steps and at the end
(evaluations/training_fid.py).
"""
from erw.preemption import catch_early_preemption

if __name__ == "__main__":  # before the heavy imports: a SIGTERM while starting must not kill the run unannounced
    catch_early_preemption()

from erw.cli import run_main
from erw.config import TRAIN
from erw.experiment import prepare_run
from erw.losses import Objective
from erw.sample_grid import SampleGridHook
from erw.transport import get_path
from evaluations.training_fid import build_fid_hook


def main(argv=None):
    run = prepare_run(TRAIN, argv, __doc__)
    config, model_args = run.config, run.model_args
    objective = Objective(velocity=True, align=config["align_loss"] if run.teachers else None,
                          ntxent_temp=config["ntxent_temp"], path=get_path(config["path_type"]),
                          weighting=config["weighting"], proj_coeff=config["proj_coeff"],
                          proj_half_life=config["proj_half_life"], proj_decay=config["proj_decay"],
                          class_dropout_prob=config["cfg_prob"])
    latent_shape = (model_args["in_channels"], model_args["input_size"], model_args["input_size"])
    grids = SampleGridHook(config["vae"], config["sample_grid_size"], config["num_classes"], latent_shape,
                           config["sample_num_steps"], config["sample_grid_every"], config["max_train_steps"])
    fid = build_fid_hook(config, run.trainer)  # None unless --fid-every
    return run.trainer.fit(run.model, model_args, objective, run.dataset, run.teachers,
                           hooks=[grids] + ([fid] if fid else []))


if __name__ == "__main__":
    run_main(main)
