"""The weights path: HDF5 shard layout (:mod:`.shards`), the ``prepare`` CLI and the importers.

``from mpicdc import store`` gives the shard API: prepare a folder, open its manifest, load a
rank's shard, verify the files.
"""
from mpicdc.store.shards import (
                                 FORMAT_VERSION,
                                 Manifest,
                                 ShardError,
                                 check_world,
                                 default_dir,
                                 load_rank,
                                 open_manifest,
                                 prepare,
                                 prepare_command,
                                 prepare_zoo,
                                 shard_name,
                                 verify,
)

__all__ = ["FORMAT_VERSION", "Manifest", "ShardError", "check_world", "default_dir", "load_rank",
           "open_manifest", "prepare", "prepare_command", "prepare_zoo", "shard_name", "verify"]
