"""ADM-compatible sample metrics in PyTorch: the 2015 TF Inception-v3 (inception.py) and the evaluator CLI
(evaluator.py: Inception Score, FID, sFID, precision, recall on ADM's .npz batches)."""
