"""What people use to talk to a stack, all as plain OpenAI-API clients: the shared client (`client`), the
web UI (`webui`), the terminal chat (`chat`) and the SSH tunnel to a remote stack (`tunnel`)."""
