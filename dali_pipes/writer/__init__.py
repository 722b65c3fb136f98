"""The writing direction of the data path: BSON reading, JPEG checks, the shard encoder, the repacker."""
