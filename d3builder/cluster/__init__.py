"""Running a recipe's stages on many machines with existing engines: workers that pull units, and the engines
that start them (local processes, SLURM job arrays through submitit, Ray tasks)."""
