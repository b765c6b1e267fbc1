"""Dataset preparation: `python -m preprocessing.dataset_tools {convert,encode,make-demo} --help`."""
