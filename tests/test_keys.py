"""Named keys without processes: the rule schema and keys files (errors never show a key), the key ring,
the limit arithmetic on a controlled clock, the usage store's group commit, the worker's priority queue,
and what the stack hands the API server (environment, not argv) and shows (masked)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from llmstack.cli.usage import parse_since
from llmstack.common.errors import Overloaded, RateLimited
from llmstack.services.api.keys.journal import segments
from llmstack.services.api.keys.limits import KeyLimits, format_duration
from llmstack.services.api.keys.ring import KeyRing
from llmstack.services.api.keys.rules import KeyRule, KeysFileError, flat_rules, parse_keys_file, rules_from_env
from llmstack.services.api.keys.usage import StateDirInUse, Usage, UsageStore, read_usage
from llmstack.services.worker.admission import Admission
from llmstack.stack.config import ConfigError, parse_config
from llmstack.stack.plan import build_specs, key_warnings, masked_config, selected_roles, stack_secrets
from llmstack.stack.rundir import RunDir

SECRET = "sk-very-secret-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- rules and keys files -----------------------------------------------------------------------------------
def test_keys_files_in_toml_and_json(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"sk-bob-2").hexdigest()
    toml = tmp_path / "keys.toml"
    toml.write_text(f'[[keys]]\nname = "alice"\nkey = "{SECRET}"\nmodels = ["gemma-*"]\nrpm = 5\n')
    js = tmp_path / "keys.json"
    js.write_text(json.dumps({"keys": [{"name": "bob", "key_sha256": digest, "tpm": 100, "priority": 2}]}))
    (alice,) = parse_keys_file(toml)
    (bob,) = parse_keys_file(js)
    assert (alice.models, alice.rpm, alice.limited()) == (["gemma-*"], 5, True)
    assert bob.digest() == hashlib.sha256(b"sk-bob-2").digest() and bob.models == ["*"]
    assert SECRET not in repr(alice) and SECRET not in str(alice.model_dump())
    ring = KeyRing.build([alice, bob, *flat_rules(["sk-plain"])], {})
    assert ring.identify(SECRET).name == "alice"  # type: ignore[union-attr]
    assert ring.identify("sk-bob-2").name == "bob"  # type: ignore[union-attr]
    assert ring.identify("sk-plain").name == "key-1"  # type: ignore[union-attr]
    assert ring.identify("sk-bob-3") is None and ring.identify("") is None
    key = ring.identify(SECRET)
    assert key is not None and key.allows("gemma-3") and not key.allows("llama")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            f'[[keys]]\nname = "a"\nkey = "{SECRET}"\nrpm = -1\n',
            "keys[0].rpm: Input should be greater than or equal to 1",
        ),
        (f'[[keys]]\nname = "a"\nkey = "{SECRET}"\nmax_concurrent = 0\n', "keys[0].max_concurrent"),
        (
            f'[[keys]]\nname = "a"\nkey = "{SECRET}"\nkey_sha256 = "{"0" * 64}"\n',
            "exactly one of 'key' or 'key_sha256'",
        ),
        (f'[[keys]]\nname = "a b"\nkey = "{SECRET}"\n', "keys[0].name"),
        (f'[[keys]]\nname = "a"\nkey = "{SECRET} x"\n', "without spaces"),
        (f'[[keys]]\nname = "a"\nkey = "{SECRET}"\n[[keys]]\nname = "a"\nkey = "sk-2"\n', "two keys are named 'a'"),
        (f'[[keys]]\nname = "a"\nkey = "{SECRET}"\n[[keys]]\nname = "b"\nkey = "{SECRET}"\n', "same secret"),
        (f'[[keys]]\nname = "a"\nkey = "{SECRET}"\nmodel = ["x"]\n', "keys[0].model: Extra inputs"),
        (f'[[keys]]\nname = "a"\nkey = "{SECRET}"\n[[keys\n', "not valid TOML"),
    ],
)
def test_bad_keys_files_say_what_is_wrong_without_the_key(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeysFileError) as exc:
        parse_keys_file(path)
    assert problem in str(exc.value) and str(path) in str(exc.value)
    assert SECRET not in str(exc.value)


def test_rules_travel_in_the_environment_with_their_keys() -> None:
    rules = [KeyRule(name="a", key=SECRET, models=["tiny"], tpm=50)]  # type: ignore[arg-type]
    back = rules_from_env(json.dumps([r.env_entry() for r in rules]))
    assert back[0].key is not None and back[0].key.get_secret_value() == SECRET and back[0].tpm == 50
    with pytest.raises(KeysFileError, match="LLMSTACK_API_KEY_RULES"):
        rules_from_env('[{"name": "a"}]')


# -- limits -----------------------------------------------------------------------------------------------------
def test_rpm_bucket_bursts_then_refills_and_says_when() -> None:
    clock = Clock()
    limits = KeyLimits(KeyRule(name="a", key="sk-a", rpm=60), clock)  # type: ignore[arg-type]
    for _ in range(60):
        limits.admit()
        limits.release()
    with pytest.raises(RateLimited) as exc:
        limits.admit()
    assert exc.value.type == "requests" and exc.value.retry_after == pytest.approx(1.0)
    assert exc.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert exc.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "Limit 60, Used 60, Requested 1" in str(exc.value)
    clock.now += 1.0  # exactly Retry-After later, the request goes through
    limits.admit()
    assert limits.stats.limited["rpm"] == 1


def test_tpm_counts_prompts_up_front_and_completions_as_debt() -> None:
    clock = Clock()
    limits = KeyLimits(KeyRule(name="t", key="sk-t", tpm=600), clock)  # type: ignore[arg-type]
    limits.admit()
    limits.prompt(100)
    limits.spend(550)  # completion tokens stream past the limit: the bucket goes into debt
    limits.release()
    assert limits.tokens is not None and limits.tokens.level == pytest.approx(-50)
    with pytest.raises(RateLimited) as debt:  # in debt: refused before any worker is asked
        limits.admit()
    assert debt.value.type == "tokens" and debt.value.retry_after == pytest.approx(15.0)  # 50 + a prompt of 100
    clock.now += 15.0
    limits.admit()
    with pytest.raises(RateLimited) as short:  # the prompt is larger than what is left
        limits.prompt(120)
    assert short.value.retry_after == pytest.approx(2.0)
    clock.now += 2.0
    limits.prompt(120)
    with pytest.raises(RateLimited) as huge:
        limits.prompt(601)
    assert huge.value.retry_after is None and "Request too large" in str(huge.value)


def test_concurrency_and_changed_limits_keep_their_state() -> None:
    clock = Clock()
    limits = KeyLimits(KeyRule(name="c", key="sk-c", max_concurrent=2, rpm=10), clock)  # type: ignore[arg-type]
    limits.admit()
    limits.admit()
    with pytest.raises(RateLimited, match="Too many concurrent requests"):
        limits.admit()
    limits.release()
    limits.admit()
    limits.apply(KeyRule(name="c", key="sk-c", max_concurrent=5, rpm=20))  # type: ignore[arg-type]
    assert limits.requests is not None and limits.requests.level == pytest.approx(17)  # 3 used of 20
    assert limits.running == 2


def test_durations_as_openai_writes_them() -> None:
    assert [format_duration(s) for s in (0.0123, 0.5, 1, 1.25, 59.9999, 60, 360, 61.5)] == [
        "13ms", "500ms", "1s", "1.25s", "1m0s", "1m0s", "6m0s", "1m1.5s",
    ]  # fmt: skip


# -- usage store ---------------------------------------------------------------------------------------------
def test_usage_store_journals_at_once_commits_in_groups_and_recovers(tmp_path: Path) -> None:
    store = UsageStore(tmp_path, commit_interval=0.05, segment_bytes=2000)  # small segments: rotation too
    for i in range(200):
        store.record(Usage("a", "m", 1, i % 2, 10, 5))
    store.record(Usage("b", "m", 1, 1))
    expected = {
        "key": "a",
        "model": "m",
        "requests": 200,
        "errors": 100,
        "prompt_tokens": 2000,
        "completion_tokens": 1000,
    }
    rows = read_usage(store.path)  # exact at once: the database plus the journal lines it does not hold yet
    assert {k: rows[0][k] for k in expected} == expected and rows[1]["key"] == "b"
    with pytest.raises(StateDirInUse):
        UsageStore(tmp_path)
    time.sleep(0.3)
    assert 1 <= store.commits < 20 and len(segments(tmp_path)) <= 2  # grouped; applied segments deleted
    assert read_usage(store.path) == rows
    # a server killed before its writer caught up: the journal's lines are recovered at the next start
    store._stop.set()  # noqa: SLF001 - the writer stops as if killed; nothing more reaches the database
    store._thread.join()  # noqa: SLF001
    store.record(Usage("c", "m", 1, 0, 7, 3))
    os.close(store._lock)  # noqa: SLF001 - what the kernel does when the process dies
    assert read_usage(store.path, key="c")[0]["prompt_tokens"] == 7  # the reader sees journal lines too
    again = UsageStore(tmp_path)
    assert [r["key"] for r in read_usage(again.path)] == ["a", "b", "c"]
    assert read_usage(again.path, key="c")[0]["completion_tokens"] == 3
    again.record(Usage("c", "m", 1, 0, 1, 1))
    again.close()
    assert read_usage(again.path, key="c")[0]["requests"] == 2 and segments(tmp_path) == []
    assert read_usage(again.path, since="2999-01-01") == []
    assert parse_since("7d", dt.date(2026, 3, 10)) == "2026-03-04" and parse_since("today", dt.date(2026, 3, 10))
    with pytest.raises(ValueError):
        parse_since("last week")


# -- the worker's queue ---------------------------------------------------------------------------------------
def test_admission_serves_higher_priority_first_and_survives_cancelled_waiters() -> None:
    async def scenario() -> list[str]:
        admission = Admission(1, 10)
        order: list[str] = []
        release = asyncio.Event()

        async def one(name: str, priority: int) -> None:
            async with admission.slot(priority):
                order.append(name)
                if name == "first":
                    await release.wait()

        first = asyncio.create_task(one("first", 0))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(one(n, p)) for n, p in (("low", -1), ("mid", 0), ("gone", 9), ("high", 5))]
        await asyncio.sleep(0.01)
        tasks[2].cancel()  # a waiter that gives up does not hold the queue
        await asyncio.sleep(0.01)
        assert admission.waiting == 3 and admission.full is False
        release.set()
        await asyncio.gather(first, *tasks, return_exceptions=True)
        assert admission.running == 0 and admission.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["first", "high", "mid", "low"]
    with pytest.raises(Overloaded):

        async def full() -> None:
            admission = Admission(1, 0)
            async with admission.slot(), admission.slot():
                pass

        asyncio.run(full())


# -- the stack ------------------------------------------------------------------------------------------------
def test_stack_keys_go_to_the_environment_masked_everywhere_else(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "stack": {"run_dir": str(tmp_path / "run")},
            "models": [{"model": "org/tiny", "names": ["tiny"]}],
            "api": {
                "keys": [
                    {"name": "alice", "key": SECRET, "models": ["tiny"], "rpm": 5},
                    {"name": "bob", "key_sha256": "ab" * 32, "models": ["gpt-*"]},
                ],
                "keys_file": "keys.toml",
            },
        }
    )
    roles = selected_roles(cfg, None)
    specs = build_specs(cfg, roles, None)
    api = next(s for s in specs if s.role == "api")
    assert "--state-dir" in api.argv and str(tmp_path / "run") in api.argv and "--keys-file" in api.argv
    assert "LLMSTACK_API_KEY_RULES" in api.secret_env
    assert not any(SECRET in arg for s in specs for arg in s.argv)
    secrets = stack_secrets(cfg, RunDir(tmp_path / "run"), roles, generate=False)
    assert rules_from_env(secrets["LLMSTACK_API_KEY_RULES"])[0].name == "alice"
    assert secrets["LLMSTACK_API_KEY"] == SECRET  # the web UI presents the first named key given in full
    shown = json.dumps(masked_config(cfg))
    assert SECRET not in shown and "ab" * 32 not in shown and '"alice"' in shown
    assert key_warnings(cfg) == [
        "[[api.keys]] 'bob': model pattern 'gpt-*' matches none of the served models (tiny); "
        "its requests for it will get 404"
    ]
    with pytest.raises(ConfigError) as bad:
        parse_config({"api": {"keys": [{"name": "a", "key": SECRET, "tpm": -3}]}})
    assert "api.keys[0].tpm: Input should be greater than or equal to 1" in str(bad.value)
    assert SECRET not in str(bad.value)
