"""Where data lives and how it is written, and the unit of work every stage runs through.

- `store`: one root on any fsspec filesystem (local, file://, s3://, gs://, memory://; read-only hf://, https://):
  atomic commits, exclusive creates, listings (also what codetrain writes its run folders with).
- `layout`: the DATA folder layout of DESIGN.md (records/, real/, gen/, d3/, stats/, leases/, history/).
- `lease`: leases with heartbeats and fencing (who works on a unit, until when).
- `runner`: the one unit runner (skip done, lease, compute, commit, stats, release) and its typed results.
- `schema`, `shards`, `pairing`, `card`: the shard format, Parquet I/O, joining by id, the dataset card.
"""
