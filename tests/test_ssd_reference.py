"""The SSD decoder against the original TensorFlow model's own detections.

tests/fixtures/ssd_reference.json was recorded once by scripts/make_person_model.py:
vtest.avi frames preprocessed exactly as engines.preprocess does, fed to the ORIGINAL
TensorFlow frozen graph, whose own post-processor (box decoder, sigmoid, NMS, clip)
gave the boxes. Here the same frames go through our whole path: preprocess ->
ONNX Runtime on the converted model -> our numpy SSD decoder and NMS.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import ROOT
from engines.runner import open_model

FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "ssd_reference.json").read_text())


def frame_at(video: Path, index: int) -> np.ndarray:
    cap = cv2.VideoCapture(str(video))
    try:
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = cap.read()
    finally:
        cap.release()
    assert ok, f"cannot read frame {index}"
    return frame


@pytest.mark.parametrize("ref", FIXTURE["frames"], ids=lambda r: f"frame{r['frame']}")
def test_decoder_matches_the_original_model(ref: dict, demo_model: Path, vtest: Path) -> None:
    runner = open_model(demo_model)
    try:
        frame = frame_at(vtest, ref["frame"])
        tensor, transform = runner.preprocess(frame)
        # same preprocessing as the recording (a different OpenCV resize would show here first)
        assert hashlib.sha256(tensor.astype(np.float32).tobytes()).hexdigest() == ref["input_sha256"]
        result = runner.postprocess(runner.infer(tensor), transform)
    finally:
        runner.close()
    w, h = ref["width"], ref["height"]
    want = [d for d in ref["detections"] if d["score"] >= FIXTURE["score_min"]]
    assert len(want) > 0
    assert len(result) == len(want)
    assert result.boxes is not None
    for i, d in enumerate(want):  # both are sorted by score
        ymin, xmin, ymax, xmax = d["box"]
        np.testing.assert_allclose(result.boxes[i], [xmin * w, ymin * h, xmax * w, ymax * h], atol=0.05)
        assert result.scores[i] == pytest.approx(d["score"], abs=1e-4)
        assert int(result.class_ids[i]) == d["class"] - 1  # TF numbers classes from 1 (0 = background)
