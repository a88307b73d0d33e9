"""mpicdc: coded distributed DNN inference over MPI.

Importing the package starts no MPI and prints nothing; MPI is imported only by
the runtime modules that use it.
"""
from mpicdc._threads import share_cores_among_local_ranks

share_cores_among_local_ranks()  # before numpy loads its BLAS

from mpicdc.core.kernels import default_input, forward
from mpicdc.core.models import Layer, Model, UnknownModelError, get_model, model_names
from mpicdc.core.random_weights import init_weights

__version__ = "0.1.0"
__all__ = ["Layer", "Model", "UnknownModelError", "get_model", "model_names",
           "default_input", "forward", "init_weights", "__version__"]
