"""Test-only: `import pycuda` / `pycuda.driver` give the stand-ins (see ../README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import cuda_standins

cuda_standins.install_pycuda(sys.modules, cuda_standins.process_gpu())
