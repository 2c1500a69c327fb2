"""Site policy: documented defaults, strict validation, demo-only automatic approval, commands."""

from __future__ import annotations

import argparse
import tomllib

import pytest

from site_kernel.errors import PolicyError, PolicyMissing
from site_kernel.governance_cli import add_governance_commands
from site_kernel.policy import Limits, default_policy_text, load_policy, write_default_policy


def write(site, text):
    site.mkdir(parents=True, exist_ok=True)
    (site / "policy.toml").write_text(text)


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_governance_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_missing_policy_means_nothing_runs(tmp_path):
    with pytest.raises(PolicyMissing, match=r"nothing runs until the data owner writes one.*flip-site"):
        load_policy(tmp_path)


def test_default_policy_is_manual_and_secure(tmp_path):
    write_default_policy(tmp_path, demo=False)
    policy = load_policy(tmp_path)
    assert policy.approval == "manual" and not policy.demo and policy.label == "manual approval"
    assert not policy.accept_weaker_isolation
    assert policy.limits == Limits() and policy.min_cohort >= 1


def test_demo_policy_is_automatic_and_labelled(tmp_path):
    write_default_policy(tmp_path, demo=True)
    policy = load_policy(tmp_path)
    assert policy.demo and policy.approval == "automatic"
    assert policy.label == "automatic approval (demo only)"


def test_every_key_of_the_default_file_is_documented():
    text = default_policy_text()
    table = tomllib.loads(text)
    keys = [k for k, v in table.items() if not isinstance(v, dict)]
    keys += [k for sub in table.values() if isinstance(sub, dict) for k in sub]
    lines = text.splitlines()
    for key in keys:
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} ="))
        assert lines[at - 1].startswith("#"), f"{key} has no comment above it"


def test_keys_left_out_take_the_documented_default(tmp_path):
    write(tmp_path, "min_cohort = 25\n[limits]\nmemory_mb = 2048\n")
    policy = load_policy(tmp_path)
    assert policy.min_cohort == 25 and policy.limits.memory_mb == 2048
    assert policy.limits.cpu_seconds == Limits().cpu_seconds and policy.approval == "manual"


def test_automatic_approval_needs_demo(tmp_path):
    write(tmp_path, 'approval = "automatic"\n')
    with pytest.raises(PolicyError, match="only with demo = true") as info:
        load_policy(tmp_path)
    assert info.value.key == "approval"


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ('min_cohort = "ten"\n', "min_cohort", "an integer >= 1"),
        ("min_cohort = 0\n", "min_cohort", "an integer >= 1"),
        ("demo = 1\n", "demo", "true or false"),
        ('approval = "sometimes"\n', "approval", '"manual" or "automatic"'),
        ('allowed_strategies = "fedavg"\n', "allowed_strategies", "a list of non-empty strings"),
        ("[metrics]\nmax_count = true\n", "metrics.max_count", "an integer >= 0"),
        ("[limits]\nmemory_mb = 1.5\n", "limits.memory_mb", "an integer >= 1"),
        (
            '[sandbox]\naccept_weaker_isolation = "yes"\n',
            "sandbox.accept_weaker_isolation",
            "true or false",
        ),
        ('researcher_output = "print"\n', "researcher_output", 'must be "keep"'),
        ('researcher_output = "release"\n', "researcher_output", "never sent to the researcher"),
        ("researcher_output_max_chars = 2000\n", "researcher_output_max_chars", "unknown key"),
        ("min_cohrt = 5\n", "min_cohrt", "unknown key"),
        ("[limits]\ngpu = 1\n", "limits.gpu", "unknown key"),
        ("limits = 3\n", "limits", "must be a table"),
    ],
)
def test_bad_values_name_the_key_and_what_was_expected(tmp_path, text, key, expected):
    write(tmp_path, text)
    with pytest.raises(PolicyError, match=expected) as info:
        load_policy(tmp_path)
    assert info.value.key == key and f"`{key}`" in str(info.value)


def test_dp_is_off_by_default_and_a_dp_section_is_validated(tmp_path):
    write_default_policy(tmp_path, demo=False)
    assert load_policy(tmp_path).dp is None
    write(tmp_path, "[dp]\nclip = 1.0\n")  # the name planned before [dp] existed: refused, never ignored
    with pytest.raises(PolicyError, match=r"unknown key `dp\.clip`") as info:
        load_policy(tmp_path)
    assert info.value.key == "dp.clip"


def test_invalid_toml_is_a_policy_error(tmp_path):
    write(tmp_path, "min_cohort = = 3\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(tmp_path)


@pytest.mark.parametrize(("name", "allowed"), [("fedavg", True), ("FedProx", True), ("fedsecret", False)])
def test_strategy_allowlist(tmp_path, name, allowed):
    write(tmp_path, 'allowed_strategies = ["fedavg", "fedprox"]\n')
    assert load_policy(tmp_path).allows_strategy(name) is allowed


def test_init_never_overwrites_without_force(tmp_path):
    write(tmp_path, "min_cohort = 50\n")
    with pytest.raises(PolicyError, match="already exists"):
        write_default_policy(tmp_path, demo=False)
    assert load_policy(tmp_path).min_cohort == 50


def test_policy_commands(tmp_path, capsys):
    assert cli("policy", "show", "--site", str(tmp_path)) == 2
    assert "nothing runs" in capsys.readouterr().err
    assert cli("policy", "init", "--demo", "--site", str(tmp_path)) == 0
    assert cli("policy", "init", "--site", str(tmp_path)) == 2
    assert cli("policy", "show", "--site", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "automatic approval (demo only)" in out and "limits.memory_mb = 8192" in out
    assert "sandbox.accept_weaker_isolation = false" in out


@pytest.mark.parametrize(
    "text, train, evaluate, other",
    [
        ("", 3600, 900, 3600),
        ("[limits]\ntrain_seconds = 60\n", 60, 900, 3600),
        ("[limits]\nwall_seconds = 25\n", 25, 25, 25),  # the ceiling bounds every phase
    ],
)
def test_each_plan_phase_has_its_own_bounded_time_limit(tmp_path, text, train, evaluate, other):
    write(tmp_path, text)
    limits = load_policy(tmp_path).limits
    phases = ("train", "evaluate", "model")
    assert tuple(limits.phase_seconds(op) for op in phases) == (train, evaluate, other)


def test_how_many_studies_run_at_once_is_the_policys_and_at_least_one(tmp_path):
    write(tmp_path, "")
    assert load_policy(tmp_path).concurrent_jobs == 2
    write(tmp_path, "[jobs]\nconcurrent = 0\n")
    with pytest.raises(PolicyError, match=r"jobs\.concurrent"):
        load_policy(tmp_path)
