"""The model worker: its option schema (`options`, turned into an engine configuration by `engine_config`),
the process (`launch`), the HTTP app (`app`) over the worker's state and work (`service`: text thread,
prompts, the generation stream written by `events`), its admission limit (`admission`), its link to the
controller (`link`) and its tool-call reading (`toolcalls`)."""
