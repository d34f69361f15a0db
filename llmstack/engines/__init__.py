"""Engines: one small async interface (`base.Engine`), one module per backend."""
