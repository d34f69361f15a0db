"""What every layer shares and nothing else: the error tree (`errors`), the worker protocol (`wire`), HTTP
plumbing (`http`), addresses, ports and health (`net`), Prometheus metrics (`metrics`) and console output
(`console`).  Imports nothing of llmstack outside this package."""
