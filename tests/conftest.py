import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    # Triton 3.8 reads TRITON_INTERPRET when functions are decorated, i.e. when triton is imported,
    # and visionlin imports it (through timm) on import. Importing it here with the interpreter on
    # lets the Triton kernel tests run on CPU in this process whatever the collection order.
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
