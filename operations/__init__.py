"""What runs the science without being it: the command line and its one-line errors, the OPTIONS table, the run
folder and its lock, preemption and exit statuses, atomic files, and the formats with an identity (checkpoints, the
teacher-token cache)."""
