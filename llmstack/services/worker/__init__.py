"""The model worker: one engine behind a small HTTP API (`app`), its admission limit, its tool-call
reading (`toolcalls`), registered with a controller."""
