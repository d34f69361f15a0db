"""The transformers engine: our own continuous batching over a Hugging Face model (`engine`), how it is
loaded (`loading`), its batch KV cache (`kvbatch`), sampler (`sampling`) and grammars (`grammar`)."""
