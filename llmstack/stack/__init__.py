"""A stack's lifecycle from one stack.toml: the config (`config`), its models (`models`: local, hub cache,
download), the plan of services (`plan`), the supervisor that runs it (`supervisor`, `children`), the run
directory other shells read (`rundir`), and what `up`/`down`/`status`/`logs` do (`control`, `status`, `logs`)."""
