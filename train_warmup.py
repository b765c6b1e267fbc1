"""Phase 1 of ERW: align SiT blocks 0..k-1 (k = --warmup-depth) with a frozen teacher on clean latents.

    accelerate launch train_warmup.py --config configs/table1_2_sit_xl2_erw.yaml

Only the patch/time/class embedders, the first k blocks and the projector are built and trained; the model sees
clean latents at t = 0 with their class labels, and the loss is the alignment loss alone (NT-Xent by default).
Its checkpoints/last.pt is what train.py --warmup-ckpt reads.
"""
from erw.config import WARMUP, resolve_config
from erw.experiment import build_dataset, build_model_args, build_teachers
from erw.losses import Objective
from erw.trainer import Trainer
from models.sit import create_sit


def main(argv=None):
    config = resolve_config(WARMUP, argv, description=__doc__)
    trainer = Trainer(config)
    teachers = build_teachers(config, trainer.device, trainer.log)
    dataset = build_dataset(config)
    model_args = build_model_args(config, teachers)
    model = create_sit(**model_args)
    objective = Objective(velocity=False, align=config["align_loss"], ntxent_temp=config["ntxent_temp"])
    return trainer.fit(model, model_args, objective, dataset, teachers)


if __name__ == "__main__":
    main()
