"""The MPI runtime: session start-up and shutdown, master and worker loops, wire format, launcher.

The only subpackage that imports MPI, and only when a job starts (:func:`mpienv.import_mpi`).
"""
