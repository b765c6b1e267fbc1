"""Phase 2 of ERW, and the REPA and SiT baselines: the velocity loss plus a decaying alignment term on noisy latents.

    accelerate launch train.py --config configs/table1_2_sit_xl2_erw.yaml \\
        --warmup-ckpt exps/sit-xl2-erw-warmup/checkpoints/last.pt

    L(s) = E_t || v(x_t, t, y) - (d alpha_t x_0 + d sigma_t eps) ||^2  +  lambda(s) L_align(h_d(x_t), teacher(x)),
    lambda(s) = proj_coeff * 2^(-s / proj_half_life)                                  (paper eq. 14)

with s the Phase-2 step (--proj-decay none keeps lambda = proj_coeff) and h_d the projector after block
--encoder-depth d. With --warmup-ckpt the embedders, the k warmed blocks and the projector come from Phase 1 (placed
at --warmup-layers START..START+k-1); the rest starts fresh. Without a warm start and with --align-loss cosine
--proj-decay none this is REPA; with --proj-coeff 0 it is plain SiT (no teacher is loaded). With --fid-every N it
logs FID, sFID and IS of the EMA weights every N steps (evaluations/training_fid.py).
"""
from operations.preemption import catch_early_preemption

if __name__ == "__main__":  # before the heavy imports: a SIGTERM while starting must not kill the run unannounced
    catch_early_preemption()

import torch  # noqa: E402

from erw.loop import SampleGrids, fit, sit_args, training_set, training_teachers, warm_start  # noqa: E402
from erw.losses import Objective  # noqa: E402
from erw.transport import get_path  # noqa: E402
from evaluations.training_fid import FidHook  # noqa: E402
from models.sit import create_sit  # noqa: E402
from operations.cli import run_main  # noqa: E402
from operations.config import TRAIN, resolve_config  # noqa: E402
from operations.run import open_run  # noqa: E402


def main(argv=None):
    config = resolve_config(TRAIN, argv, __doc__)
    notes = []  # logged once the run's log exists: a refused input writes nothing
    dataset = training_set(config)
    teachers = training_teachers(config, dataset, notes)
    model_args = sit_args(config, teachers)
    torch.manual_seed(config["seed"])  # the same model on every process and every run
    model = create_sit(**model_args)
    if config["warmup_ckpt"] and not config["resume"]:  # a resume loads every weight from its checkpoint
        notes.append(warm_start(model, config["warmup_ckpt"], config["warmup_weights"], config["warmup_layers"],
                                config["warmup_depth"], config["add_rope_after_warmup"]))
    elif not config["warmup_ckpt"]:
        notes.append("No warm start: every block starts from its fresh initialization (a baseline run)")
    objective = Objective(velocity=True, align=config["align_loss"] if teachers else None,
                          ntxent_temp=config["ntxent_temp"], path=get_path(config["path_type"]),
                          weighting=config["weighting"], proj_coeff=config["proj_coeff"],
                          proj_half_life=config["proj_half_life"], proj_decay=config["proj_decay"],
                          cfg_prob=config["cfg_prob"])
    latent_shape = (model_args["in_channels"], model_args["input_size"], model_args["input_size"])
    hooks = [SampleGrids(config, latent_shape)] + ([FidHook(config)] if config["fid_every"] else [])
    run = open_run(config)
    for note in notes:
        run.log(note)
    return fit(run, model, model_args, objective, dataset, teachers, hooks)


if __name__ == "__main__":
    run_main(main)
