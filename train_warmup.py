"""Phase 1 of ERW: align SiT blocks 0..k-1 (k = --warmup-depth) with a frozen teacher on clean latents.

    accelerate launch train_warmup.py --config configs/table1_2_sit_xl2_erw.yaml

Only the patch, time and class embedders, the first k blocks and the projector are built and trained. The model sees
clean latents x_0 at t = 0 with their class labels, and the loss is the alignment term alone,

    L = L_align(h_k(x_0), y),    NT-Xent between the projector's tokens h_k and the teacher's patch tokens y,

(paper eq. 13; --align-loss cosine for REPA's). Its checkpoints/last.pt is what train.py --warmup-ckpt reads.
"""
from operations.preemption import catch_early_preemption

if __name__ == "__main__":  # before the heavy imports: a SIGTERM while starting must not kill the run unannounced
    catch_early_preemption()

import torch  # noqa: E402

from erw.loop import fit, sit_args, training_set, training_teachers  # noqa: E402
from erw.losses import Objective  # noqa: E402
from models.sit import create_sit  # noqa: E402
from operations.cli import run_main  # noqa: E402
from operations.config import WARMUP, resolve_config  # noqa: E402
from operations.run import open_run  # noqa: E402


def main(argv=None):
    config = resolve_config(WARMUP, argv, __doc__)
    notes = []  # logged once the run's log exists: a refused input writes nothing
    dataset = training_set(config)
    teachers = training_teachers(config, dataset, notes)
    model_args = sit_args(config, teachers)
    torch.manual_seed(config["seed"])  # the same model on every process and every run
    model = create_sit(**model_args)
    objective = Objective(velocity=False, align=config["align_loss"], ntxent_temp=config["ntxent_temp"],
                          cfg_prob=config["cfg_prob"])
    run = open_run(config)
    for note in notes:
        run.log(note)
    return fit(run, model, model_args, objective, dataset, teachers)


if __name__ == "__main__":
    run_main(main)
