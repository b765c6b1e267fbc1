"""Dataset preparation: `python preprocessing/dataset_tools.py {convert,encode,make-demo} --help`."""
