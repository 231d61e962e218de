from __future__ import annotations

import numpy as np
import pytest

from engines.modelcard import InputSpec
from engines.preprocess import FrameError, Preprocessor, preprocess


def spec(**kw: object) -> InputSpec:
    base: dict[str, object] = {"name": "x", "width": 8, "height": 4}
    base.update(kw)
    return InputSpec(**base)  # type: ignore[arg-type]


def test_stretch_rgb_nchw_normalises_per_channel() -> None:
    frame = np.zeros((8, 16, 3), np.uint8)
    frame[..., 0] = 255  # blue in BGR
    frame[..., 2] = 51  # red
    s = spec(scale=1 / 255, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    t, tr = preprocess(frame, s)
    assert t.shape == (1, 3, 4, 8) and t.dtype == np.float32 and t.flags.c_contiguous
    # channel 0 is red after BGR->RGB: 51/255 = 0.2 -> (0.2-0.5)/0.5 = -0.6
    np.testing.assert_allclose(t[0, 0], -0.6, atol=1e-6)
    np.testing.assert_allclose(t[0, 1], -1.0, atol=1e-6)
    np.testing.assert_allclose(t[0, 2], 1.0, atol=1e-6)
    assert (tr.scale_x, tr.scale_y) == (0.5, 0.5)


def test_nhwc_bgr_keeps_channel_order() -> None:
    frame = np.zeros((4, 8, 3), np.uint8)
    frame[..., 0] = 10
    t, _ = preprocess(frame, spec(layout="NHWC", color="BGR", scale=1.0))
    assert t.shape == (1, 4, 8, 3)
    assert t[0, 0, 0].tolist() == [10.0, 0.0, 0.0]


def test_letterbox_pads_and_maps_boxes_back() -> None:
    frame = np.full((100, 200, 3), 255, np.uint8)  # 2:1 frame into a square input
    s = spec(width=64, height=64, resize="letterbox", dtype="uint8", pad_value=114)
    t, tr = preprocess(frame, s)
    img = t[0].transpose(1, 2, 0)
    assert img.shape == (64, 64, 3)
    assert (img[0, 0] == 114).all() and (img[32, 32] == 255).all()  # pad on top, image in middle
    assert tr.pad_y == 16 and tr.pad_x == 0
    # the whole image region in model pixels maps back to the whole frame
    back = tr.to_frame(np.array([[0, 16, 64, 48]], np.float32))
    np.testing.assert_allclose(back, [[0, 0, 200, 100]], atol=1e-4)


def test_gray_and_bgra_frames_are_accepted() -> None:
    p = Preprocessor(spec(color="RGB"))
    assert p(np.zeros((4, 8), np.uint8))[0].shape == (1, 3, 4, 8)
    assert p(np.zeros((4, 8, 4), np.uint8))[0].shape == (1, 3, 4, 8)
    g = Preprocessor(spec(color="GRAY", mean=(0.0,), std=(1.0,)))
    assert g(np.zeros((4, 8, 3), np.uint8))[0].shape == (1, 1, 4, 8)


def test_float16_input() -> None:
    t, _ = preprocess(np.zeros((4, 8, 3), np.uint8), spec(dtype="float16"))
    assert t.dtype == np.float16


@pytest.mark.parametrize("bad", [np.zeros((4, 8, 3), np.float32), np.zeros((4, 8, 2), np.uint8), "frame"])
def test_bad_frames_are_a_clear_error(bad: object) -> None:
    with pytest.raises(FrameError):
        preprocess(bad, spec())  # type: ignore[arg-type]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mean, std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                       ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_fast_paths_equal_the_formula(layout: str, mean: tuple, std: tuple) -> None:
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    s = spec(width=40, height=30, layout=layout, mean=mean, std=std, scale=1 / 255)
    t, _ = preprocess(frame, s)
    rgb = frame[:, :, ::-1].astype(np.float64)
    want = (rgb / 255 - np.array(mean)) / np.array(std)
    if layout == "NCHW":
        want = want.transpose(2, 0, 1)
    assert t.flags.c_contiguous and t.dtype == np.float32
    np.testing.assert_allclose(t[0], want, rtol=1e-5, atol=1e-5)
