"""Models for the LLM tests: the real SmolLM2-135M-Instruct when installed, a tiny random Llama (helpers)."""

import pytest

from fedlora.modelstore import SMOLLM2_INSTALL, ModelError, smollm2_gguf


def smollm2_installed() -> bool:
    try:
        smollm2_gguf()
    except ModelError:
        return False
    return True


requires_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason=f"optional SmolLM2 package not installed ({SMOLLM2_INSTALL})"
)
