"""The pipeline stages, one module each: select -> fetch-real -> generate -> assemble -> transform-test -> validate."""
