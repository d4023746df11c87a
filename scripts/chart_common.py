"""Helpers that chart_check.py (steps 5 and 6) and chart_pods.py (step 7) share.

They live apart from both so that chart_check.py can import chart_pods.py
without chart_pods.py importing chart_check.py back: chart-check runs
chart_check.py as __main__, and a circular import would load it a second
time.
"""
import re
import sys

KUBERNETES_DEFAULT_GRACE_SECS = 30
# windrow's probes: liveness must not follow readiness (/readyz is 503 during
# a broker outage, and a liveness probe on it would restart every pod then).
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
# The leaves of nats.* keys naming files (FILE_KEYS in chart_check.py lists the keys).
NATS_FILES = ("credentials_file", "tls_ca_file", "tls_cert_file", "tls_key_file")


def say(status, text):
    print(f"chart-check: {status:<4} {text}", file=sys.stderr)


class Check:
    """One named check: collects problems, then reports ok or FAIL."""

    def __init__(self, name):
        self.name = name
        self.problems = []

    def add(self, where, message):
        self.problems.append(f"{where}: {message}")

    def report(self, detail=""):
        if self.problems:
            say("FAIL", self.name)
            for p in self.problems:
                print(f"       - {p}", file=sys.stderr)
            return False
        say("ok", f"{self.name}{detail}")
        return True


def parse_help(text):
    """Flags of a `windrow ... --help` output: name -> {value, short, choices}."""
    flags, current, in_choices = {}, None, False
    for line in text.splitlines():
        m = re.match(r"^\s+(?:-([A-Za-z]), )?--([a-z0-9][a-z0-9-]*)(?: <[^>]*>(?:\.\.\.)?)?\s*$", line)
        if m:
            current = m.group(2)
            flags[current] = {"value": "<" in line, "short": m.group(1), "choices": None}
            in_choices = False
            continue
        if current is None:
            continue
        inline = re.search(r"\[possible values: ([^\]]+)\]", line)
        if inline:
            flags[current]["choices"] = [v.strip() for v in inline.group(1).split(",")]
        elif re.match(r"^\s+Possible values:\s*$", line):
            flags[current]["choices"] = []
            in_choices = True
        elif in_choices:
            v = re.match(r"^\s+- ([A-Za-z0-9_-]+)(?::|\s*$)", line)
            if v:
                flags[current]["choices"].append(v.group(1))
            elif line.strip() == "" or re.match(r"^\s+\[", line):
                in_choices = False
    return flags


def parse_args(where, argv, helps, check):
    """Validates argv against the help of its subcommand; returns (subcommand, {flag: value})."""
    i, path = 0, []
    while i < len(argv) and not argv[i].startswith("-"):
        path.append(argv[i])
        i += 1
    sub = " ".join(path)
    if sub not in helps:
        check.add(where, f"args start with {sub!r}: not one of the windrow subcommands checked here "
                         f"({', '.join(sorted(helps))})")
        return sub, {}
    flags = helps[sub]
    shorts = {f["short"]: n for n, f in flags.items() if f["short"]}
    given = {}
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
        elif re.match(r"^-[A-Za-z]$", arg):
            name, eq, value = shorts.get(arg[1], "-" + arg[1]), "", ""
        else:
            check.add(where, f"unexpected argument {arg!r} (`windrow {sub}` takes no positional arguments)")
            i += 1
            continue
        spec = flags.get(name)
        if spec is None:
            check.add(where, f"unknown flag {arg!r}: `windrow {sub} --help` has no --{name}")
        elif spec["value"]:
            if not eq:
                if i + 1 >= len(argv):
                    check.add(where, f"--{name} needs a value")
                    break
                i += 1
                value = argv[i]
            if spec["choices"] and value not in spec["choices"]:
                check.add(where, f"--{name} {value!r}: expected one of {', '.join(spec['choices'])}")
            given[name] = value
        elif eq:
            check.add(where, f"--{name} takes no value, got {arg!r}")
        else:
            given[name] = True
        i += 1
    return sub, given


def pod_spec_of(obj):
    spec = obj.get("spec") or {}
    if obj["kind"] == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    template = spec.get("template") or {}
    return (template.get("metadata") or {}).get("labels") or {}, template.get("spec") or {}


def dig(table, dotted):
    for part in dotted.split("."):
        table = table.get(part) if isinstance(table, dict) else None
    return table


def env_name(dotted):
    return "WINDROW_" + dotted.upper().replace(".", "__")
