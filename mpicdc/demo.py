"""The README's main job. Until the MPI runtime lands: the serial reference forward of VGG16."""
import sys
import time

import numpy as np

from .kernels import default_input, forward, init_weights
from .models import get_model


def main(argv=None):
    model = get_model("vgg16")
    weights = init_weights(model, seed=0)
    x = default_input(model)
    start = time.perf_counter()
    probs = forward(model, weights, x)
    elapsed = time.perf_counter() - start
    top = np.argsort(probs)[::-1][:5]
    print(f"vgg16 serial reference forward: {elapsed * 1e3:.0f} ms")
    print("top-5 classes: " + ", ".join(f"{c} ({probs[c]:.4f})" for c in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
