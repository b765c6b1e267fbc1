"""Code shared by the ERW entry points (train_warmup.py, train.py, sample_ddp.py, evaluations/)."""
