"""Request inputs: image preprocessing as the options say (no MPI)."""
import numpy as np
import pytest


def test_image_input_preprocessing_is_explicit(tmp_path):
    """An image's pixel scale and normalisation are what --pixels/--mean/--std say, for PNG and JPEG."""
    import matplotlib.image as mpimg

    from mpicdc.core.models import get_model
    from mpicdc.run import ImagePrep, load_input

    model = get_model("tiny")  # 3 x 16 x 16
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    for name in ("x.png", "x.jpg"):
        mpimg.imsave(tmp_path / name, rgb)
        unit = load_input(model, str(tmp_path / name), 0)
        assert unit.shape == (3, 16, 16)
        assert np.allclose(unit.mean(axis=(1, 2)), [1.0, 128 / 255, 0.0], atol=0.02), name
        byte = load_input(model, str(tmp_path / name), 0, ImagePrep("byte"))
        assert np.allclose(byte, unit * 255, atol=1e-3)
        norm = load_input(model, str(tmp_path / name), 0, ImagePrep("unit", (0.5, 0.5, 0.5), (0.25,)))
        assert np.allclose(norm, (unit - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="1 or 3 values"):
        load_input(model, str(tmp_path / "x.png"), 0, ImagePrep("unit", (0.1, 0.2)))


def test_std_must_be_positive(capsys):
    from mpicdc.run import main

    assert main(["tiny", "--input", "x.png", "--std", "0"]) == 2
    assert "--std values must be > 0" in capsys.readouterr().err
