"""Test-only: `import tensorrt` gives the stand-in TensorRT (see README.md beside this file)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cuda_standins
import trt_standins

sys.modules[__name__] = trt_standins.make_tensorrt(os.environ.get("JETAGENT_STANDIN_TRT", "10.3.0.30"),
                                                   gpu=cuda_standins.process_gpu())
