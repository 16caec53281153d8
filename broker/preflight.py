"""Before shipping: ``sts-broker check`` and ``render``, and what they print.

``check`` validates config and policy files (every problem as
``file:line: key: problem``, exit 2) and prints each policy's worst-case
share of STS's 2,048 characters, per grant; ``render`` prints the exact
Policy STS would receive for one caller, and its budget per grant.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from broker.audit import check_sink
from broker.checks import allow_warnings, provider_lifetime_warnings, unchecked_group_policies
from broker.config import Settings, load_settings
from broker.credentials.sealing import load_encryption_keys
from broker.errors import ConfigError, RequestInvalid, TemplateValueRejected
from broker.models import Principal, system_clock
from broker.names import format_sts_time
from broker.policies import (
    MAX_POLICY_CHARS,
    Policy,
    PolicySet,
    load_policies,
    load_policy_files,
    scope_for,
    worst_case_budget,
)
from broker.ram import Budget, with_deadline
from broker.templates import VALUE_RULE
from broker.yamldoc import load_yaml

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "check_command",
    "check_secrets",
    "render_command",
]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
"""``sts-broker``'s exit codes: success, runtime failure, invalid configuration or usage."""


def check_secrets(settings: Settings) -> None:
    """Files and variables read only at start (the shared cache's keys, the audit sink): exit 2."""
    check_sink(settings.audit)
    if settings.cache.backend == "redis" and settings.cache.redis is not None:
        config_dir = settings.source.parent if settings.source is not None else None
        load_encryption_keys(settings.cache.redis, config_dir=config_dir)


@dataclass
class _CheckReport:
    """What ``check`` found: problems (exit 2), warnings (exit 0) and files that passed."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    def print(self) -> None:
        for line in self.problems + list(dict.fromkeys(self.warnings)):
            print(line, file=sys.stderr)
        for line in dict.fromkeys(self.passed):  # a file given twice (--config and listed) once
            print(line)


def check_command(args: argparse.Namespace) -> int:
    """``sts-broker check``: problems (exit 2), warnings, and each policy's budget."""
    if not args.policy_files and args.config is None:
        print("nothing to check: give --config and/or policy files", file=sys.stderr)
        return EXIT_CONFIG
    report = _CheckReport()
    settings = _check_config(args.config, report) if args.config is not None else None
    if args.policy_files:
        try:  # as one set: a name given in two files is refused, naming both
            policies = load_policy_files(args.policy_files)
        except ConfigError as err:
            report.problems.extend(err.problems)
        else:
            report.passed += [f"{p.source}: ok ({_worst_case_note(p)})" for p in policies]
            report.warnings += provider_lifetime_warnings(policies, settings)
            if settings is None:
                report.warnings += _unchecked_groups_note(policies)
    report.print()
    return EXIT_CONFIG if report.problems else EXIT_OK


def _check_config(config: Path, report: _CheckReport) -> Settings | None:
    """Validate ``config`` and its policies_dir; warn about what will not work well."""
    try:
        settings = load_settings(config)
        policies = load_policies(settings.policies_dir)
        check_secrets(settings)
    except ConfigError as err:
        report.problems.extend(err.problems)
        return None
    report.passed.append(f"{config}: ok ({len(policies)} policies in {settings.policies_dir})")
    report.passed += [f"{p.source}: ok ({_worst_case_note(p)})" for p in policies]
    report.problems += _lifetime_problems(policies, settings.cache.refresh_margin_seconds)
    report.warnings += provider_lifetime_warnings(policies, settings)
    report.warnings += allow_warnings(policies, settings)
    return settings


def _unchecked_groups_note(policies: PolicySet) -> list[str]:
    names = unchecked_group_policies(policies)
    if not names:
        return []
    return [
        f"note: {', '.join(names)}: credential-provider lifetimes not checked for group:NAME "
        f"callers (give --config: it says which API keys are in a group)"
    ]


def _worst_case_note(policy: Policy) -> str:
    """``policy 'x'; at most 612 of 2048 characters: grant 1 228, grant 2 351, envelope 33``."""
    budget = worst_case_budget(policy)
    shares = ", ".join(f"grant {n} {chars}" for n, chars in enumerate(budget.grants, 1))
    return (
        f"policy {policy.name!r}; at most {budget.total} of {MAX_POLICY_CHARS} characters: "
        f"{shares}, envelope {budget.envelope}"
    )


def _lifetime_problems(policies: PolicySet, margin: int) -> list[str]:
    """Effective lifetimes within the refresh margin: no such token could ever be served."""
    problems = []
    for policy in policies:
        lifetime = policy.effective_lifetime_seconds
        if lifetime is None or lifetime > margin:
            continue
        line = load_yaml(Path(policy.source)).line_of(("effective_lifetime_seconds",))
        problems.append(
            f"{policy.source}:{line}: effective_lifetime_seconds: {lifetime} must be more than "
            f"cache.refresh_margin_seconds ({margin}): a token is never handed out within it"
        )
    return problems


def render_command(args: argparse.Namespace) -> int:
    """``sts-broker render``: the Policy STS would receive for one caller, and its budget."""
    policies_dir = load_settings(args.config).policies_dir if args.config else args.policies_dir
    policy = load_policies(policies_dir).get(args.policy)
    if policy is None:
        print(f"no policy named {args.policy!r} in {policies_dir}", file=sys.stderr)
        return EXIT_CONFIG
    principal = Principal(subject=args.subject, groups=tuple(args.groups), source_ip=args.source_ip)
    try:
        scope = scope_for(policy, principal)
    except TemplateValueRejected as err:  # say why, never the value
        variable, reason = err.context["variable"], err.context["reason"]
        hint = " (give a --group the policy's callers list)" if variable == "${group}" else ""
        allowed = f"a value that could widen the scope is refused; allowed: {VALUE_RULE}"
        print(f"error: {variable} cannot be rendered: {reason}{hint}\n  {allowed}", file=sys.stderr)
        return EXIT_FAILURE
    except RequestInvalid:
        print("error: this policy binds tokens to the caller: give --source-ip", file=sys.stderr)
        return EXIT_FAILURE
    document, lifetime = scope.document, policy.effective_lifetime_seconds
    if lifetime is not None:  # as sent: the deadline is the fetch's time plus the lifetime
        deadline = datetime.fromtimestamp(system_clock() + lifetime, UTC)
        document = with_deadline(document, format_sts_time(deadline))
    print(json.dumps(json.loads(document), indent=2))
    print()
    for line in _budget_lines(scope.budget, [f"{g.bucket}/{g.prefix}" for g in scope.grants]):
        print(line)
    print(f"at most {worst_case_budget(policy).total} of {MAX_POLICY_CHARS} for any caller")
    return EXIT_OK


def _budget_lines(budget: Budget, names: list[str]) -> list[str]:
    lines = [
        f"grant {n} ({name}): {chars}"
        for n, (name, chars) in enumerate(zip(names, budget.grants, strict=True), 1)
    ]
    lines.append(f"envelope: {budget.envelope}")
    lines.append(f"{budget.total} of {MAX_POLICY_CHARS} characters (minified, as sent to STS)")
    return lines
