"""Where data lives and how it is written: schema, shard I/O, the folder layout, units of work, the card."""
