"""The weights path: HDF5 shard layout (:mod:`.shards`), the ``prepare`` CLI and the importers.

``from mpicdc import store`` gives the shard API: prepare a folder, open its manifest, load a
rank's shard, verify the files.
"""
from mpicdc.store.shards import (
                                 FORMAT_VERSION,
                                 MANIFEST_NAME,
                                 Manifest,
                                 ShardError,
                                 check_world,
                                 default_dir,
                                 ensure_prepared,
                                 load_rank,
                                 open_manifest,
                                 prepare,
                                 prepare_command,
                                 prepare_zoo,
                                 reference_weights,
                                 shard_name,
                                 verify,
)

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Manifest", "ShardError", "check_world", "default_dir", "ensure_prepared",
           "load_rank", "open_manifest", "prepare", "prepare_command", "prepare_zoo", "reference_weights",
           "shard_name", "verify"]
