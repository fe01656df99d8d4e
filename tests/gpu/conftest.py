# SPDX-License-Identifier: Apache-2.0
from tests.integrations.vllm.conftest import tiny_model_dir  # noqa: F401  (the same local tiny Llama)
