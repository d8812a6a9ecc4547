"""Running a recipe's stages on many machines with existing engines: workers that pull units, the engines
that start them (local processes, SLURM job arrays through submitit, Ray tasks), and a recipe as phases of
workers (`pipeline`: select once, then fetch-real, generation and assemble side by side, ...)."""
