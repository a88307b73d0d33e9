"""Share the cores among co-located MPI ranks: BLAS threads per rank, set before numpy loads.

Under ``mpirun`` every rank learns how many ranks share its machine
(``OMPI_COMM_WORLD_LOCAL_SIZE``, or ``MPI_LOCALNRANKS`` with MPICH).  Each
rank's BLAS would otherwise start one thread per core, and six ranks on two
cores would run twelve threads.  Variables the user set are left alone.
"""
import os

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def share_cores_among_local_ranks() -> None:
    local = os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or os.environ.get("MPI_LOCALNRANKS")
    if not local or not local.isdigit() or int(local) < 2:
        return
    per_rank = max(1, (os.cpu_count() or 1) // int(local))
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(per_rank))
