"""The data path: BSON reading, the record schema and writer, repacking, DALI pipelines, the loader."""
