# SPDX-License-Identifier: Apache-2.0
"""Engine glue, installed as `kvzip_plugin.integrations`: the only code that touches vLLM or
SGLang internals. `vllm/` and `sglang/` are built in their own issues."""
