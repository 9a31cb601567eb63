"""Data: the E2E NLG CSVs, prompt/target encoding with a target-only loss mask, partitioning, batching."""

from hsplitlora.data.e2e import (
    Batch,
    Batcher,
    Encoded,
    Example,
    collate,
    default_data_dir,
    encode,
    partition_iid,
    read_e2e,
)

__all__ = [
    "Batch",
    "Batcher",
    "Encoded",
    "Example",
    "collate",
    "default_data_dir",
    "encode",
    "partition_iid",
    "read_e2e",
]
