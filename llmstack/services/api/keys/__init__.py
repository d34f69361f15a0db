"""Named API keys: who may call the API server, for which models, how fast, and what they used.

rules.py    the schema of one key (stack.toml `[[api.keys]]`, a keys file), validated at the boundary
ring.py     the live set of keys: a presented key is hashed once and looked up (constant time)
limits.py   per-key token buckets (requests and tokens per minute), the concurrency count, the
            `x-ratelimit-*` headers and the 429 error
source.py   where the keys come from: settings plus a keys file reloaded on change and on SIGHUP
grant.py    one request's admission and metering (the `Meter` the worker hop reports to)
usage.py    the SQLite usage store (one writer thread, group commit) and its reader
access.py   the service on `app.state.keys`: `require_key` / `admit` for every endpoint, metrics
"""
