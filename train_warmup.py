"""Phase 1 of ERW: align SiT blocks 0..k-1 (k = --warmup-depth) with a frozen teacher on clean latents.

    accelerate launch train_warmup.py --config configs/table1_2_sit_xl2_erw.yaml

Only the patch/time/class embedders, the first k blocks and the projector are built and trained; the model sees
clean latents at t = 0 with their class labels, and the loss is the alignment loss alone (NT-Xent by default).
Its checkpoints/last.pt is what train.py --warmup-ckpt reads.
"""
from erw.preemption import catch_early_preemption

if __name__ == "__main__":  # before the heavy imports: a SIGTERM while starting must not kill the run unannounced
    catch_early_preemption()

from erw.cli import run_main
from erw.config import WARMUP
from erw.experiment import prepare_run
from erw.losses import Objective


def main(argv=None):
    run = prepare_run(WARMUP, argv, __doc__)
    objective = Objective(velocity=False, align=run.config["align_loss"], ntxent_temp=run.config["ntxent_temp"],
                          class_dropout_prob=run.config["cfg_prob"])
    return run.trainer.fit(run.model, run.model_args, objective, run.dataset, run.teachers)


if __name__ == "__main__":
    run_main(main)
