#!/usr/bin/env python3
"""Checks rendered manifests: Kubernetes schemas, then windrow's own rules."""
import argparse
import hashlib
import http.client
import os
import posixpath
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

try:
    import kubernetes_validate as kv
except ImportError:
    sys.exit("chart-check: kubernetes-validate is missing from the tool venv; delete it to reinstall")

# Kinds with no bundled schema that the chart may render (CRDs).
ALLOWED_CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
ROLES = {"bridge", "worker"}
DEFAULT_LISTEN = {"bridge": "0.0.0.0:9464", "worker": "0.0.0.0:9465"}
DEFAULT_SHUTDOWN_SECS = {"bridge": 20, "worker": 30}
KUBERNETES_DEFAULT_GRACE_SECS = 30
CONFIG_KEY = "windrow.toml"
# windrow's probes: liveness must not follow readiness (/readyz is 503 during
# a broker outage, and a liveness probe on it would restart every pod then).
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
# Keys naming files that `windrow config check` requires to exist, each with
# the role reading it (None: every role).
NATS_FILES = ("credentials_file", "tls_ca_file", "tls_cert_file", "tls_key_file")
FILE_KEYS = ([(f"nats.{k}", None) for k in NATS_FILES]
             + [(f"{r}.nats.{k}", r) for r in sorted(ROLES) for k in NATS_FILES]
             + [(f"bridge.mqtt.{k}", "bridge") for k in NATS_FILES[1:]])


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


def port_of(listen):
    m = re.search(r":([0-9]{1,5})$", str(listen))
    return int(m.group(1)) if m else None


def literal_env(container):
    return {e["name"]: e["value"] for e in container.get("env") or []
            if isinstance(e, dict) and "value" in e and "name" in e}


def windrow_env(container):
    """The container's WINDROW_* variables; those from a Secret or field get a placeholder."""
    env = {}
    for e in container.get("env") or []:
        if isinstance(e, dict) and str(e.get("name", "")).startswith("WINDROW_"):
            env[e["name"]] = e["value"] if "value" in e else "chart-check-placeholder"
    return env


def labels_match(selector, labels):
    return bool(selector) and all((labels or {}).get(k) == v for k, v in selector.items())


def pod_spec_of(obj):
    spec = obj.get("spec") or {}
    if obj["kind"] == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    template = spec.get("template") or {}
    return (template.get("metadata") or {}).get("labels") or {}, template.get("spec") or {}


def deep_merge(base, over):
    """Helm's merge of values files: maps merge key by key, anything else replaces."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{k: deep_merge(base.get(k), v) for k, v in over.items()}}


def dig(table, dotted):
    for part in dotted.split("."):
        table = table.get(part) if isinstance(table, dict) else None
    return table


def env_name(dotted):
    return "WINDROW_" + dotted.upper().replace(".", "__")


def best_mount(mounts, path):
    """The volumeMount holding absolute `path` (the deepest one), or None."""
    under = [m for m in mounts if posixpath.commonpath([m["mountPath"], path]) == m["mountPath"]]
    return max(under, key=lambda m: len(m["mountPath"]), default=None)


def nats_size(text):
    """A nats-server size: 4G = 4*1000^3, 4GB/4GiB = 4*1024^3 (nats-server's units)."""
    m = re.fullmatch(r"([0-9]+)\s*([kmgt]?)(i?b?)", text.strip().strip("\"'").lower())
    if not m:
        raise ValueError(f"not a size: {text!r}")
    power = " kmgt".index(m.group(2) or " ")
    return int(m.group(1)) * (1024 if m.group(3) else 1000) ** power


def jetstream_limits(path):
    """{storage: bytes} from the jetstream block of nats.conf in the ConfigMaps of `path`."""
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            conf = ((doc or {}).get("data") or {}).get("nats.conf") if (doc or {}).get("kind") == "ConfigMap" else None
            if conf:
                found = {storage: nats_size(m.group(1)) for storage, key in (("file", "max_file_store"), ("memory", "max_memory_store"))
                         for m in [re.search(rf"^\s*{key}\s*[:=]?\s*([^\s#]+)", conf, re.M)] if m}
                return found
    return {}


# ---------------------------------------------------------------------------
# 7. Runtime check (--run-pods): the static checks above read the manifests;
# this starts what they describe. Each windrow container of a rendered
# Deployment or StatefulSet runs as a local process, one replica each, as the
# kubelet would run it: its args and environment, its volumes as scratch
# directories, its user when we are root, and its probes polled on its HTTP
# port; then SIGTERM, and it must exit 0 within terminationGracePeriodSeconds.
# What cannot be reproduced without a cluster is replaced, and each
# replacement is visible in the output:
#   - the brokers: WINDROW_NATS__URL, WINDROW_BRIDGE__MQTT__HOST/__PORT point
#     at private ones (the environment overrides the file; a flag that names
#     a broker is rewritten instead, since flags override the environment);
#   - the HTTP port: http_listen becomes 127.0.0.1:<free port> the same way,
#     and each probe's port must be the container port of http_listen;
#   - mount paths: an absolute path under a volumeMount, in args, env or
#     windrow.toml, is rewritten to that volume's scratch directory;
#   - values from Secrets: a placeholder (the private brokers have no
#     authentication). Pods that need TLS or NATS credentials files are
#     skipped, with the reason, since the plain private brokers cannot serve
#     them.
# Not reproduced: initial delays (probes start at once), initContainers and
# lifecycle hooks (a pod with initContainers is skipped, hooks are noted),
# resource limits, and the read-only root filesystem beyond the working
# directory (a non-root pod user cannot write elsewhere anyway).
# ---------------------------------------------------------------------------

RUN_KINDS = ("Deployment", "StatefulSet")
PLACEHOLDER = "chart-check-placeholder"
POLL_SECS = 0.2
LOG_TAIL_LINES = 40
# The kubelet's httpGet probe: any status in [200, 400) is a success.
PROBE_OK = range(200, 400)


def free_port():
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def truthy(value):
    """A setting from TOML (bool) or the environment (string) that is on."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "off")
    return bool(value)


def shown_value(value):
    """A setting as windrow.toml spells it (true, not Python's True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def expand_refs(text, env):
    """Kubernetes' $(VAR) expansion in args and env values; $$ is a literal $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), str(text))


def pod_name_of(workload):
    """The name the first pod of `workload` gets: <sts>-0, or <deploy>-<hash>-<suffix>."""
    name = workload["metadata"]["name"]
    if workload["kind"] == "StatefulSet":
        return f"{name}-0"
    alphabet = "bcdfghjklmnpqrstvwxz2456789"  # the ReplicaSet controller's
    digest = hashlib.sha256(repr(pod_spec_of(workload)).encode()).digest()
    tail = "".join(alphabet[b % len(alphabet)] for b in digest[:15])
    return f"{name}-{tail[:10]}-{tail[10:]}"


class Pod:
    """One windrow container, prepared to run as a local process."""

    def __init__(self, workload, spec, container, role, listen_port, where):
        self.workload, self.spec, self.container = workload, spec, container
        self.role, self.listen_port, self.where = role, listen_port, where
        self.name = pod_name_of(workload)
        self.label = f"{container.get('name')} ({self.name})"
        self.notes = []          # what was replaced, shown with the result
        self.proc = None
        self.log_path = None
        self.started = None
        self.state = "startup"   # startup -> readiness -> ready, or failed
        self.failure = None
        self.ready_secs = None
        self.drain_secs = None

    def fail(self, step, message):
        self.state = "failed"
        self.failure = f"{step}: {message}"

    def log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"


def prepare_volumes(pod, root, config_maps, ids):
    """Scratch directories for the container's volumeMounts, filled as the kubelet would.

    Returns [(mountPath, host path)], deepest first. ConfigMap volumes of a
    rendered ConfigMap get its files (items and subPath honoured); volumes from
    Secrets or ConfigMaps that are not rendered stay empty (noted); emptyDirs,
    volumeClaimTemplates and other claims are fresh directories. When we run
    the pod as its own user (ids), writable volumes belong to the fsGroup, as
    Kubernetes makes them, and the rest stays root's.
    """
    volumes = {v.get("name"): v for v in pod.spec.get("volumes") or []}
    claims = {t.get("metadata", {}).get("name")
              for t in (pod.workload.get("spec") or {}).get("volumeClaimTemplates") or []}
    fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
    made, mounts = {}, []
    for m in pod.container.get("volumeMounts") or []:
        vname = m.get("name")
        if vname not in made:
            vol = volumes.get(vname) or {}
            vdir = os.path.join(root, "volumes", vname)
            os.makedirs(vdir)
            os.chmod(vdir, 0o755)
            if "configMap" in vol:
                cm_name = vol["configMap"].get("name")
                data = config_maps.get(cm_name)
                if data is None:
                    pod.notes.append(f"volume {vname}: ConfigMap {cm_name} is not rendered by the chart, mounted empty")
                    data = {}
                items = vol["configMap"].get("items")
                files = {i["path"]: data.get(i["key"], "") for i in items} if items else data
                for rel, text in files.items():
                    target = os.path.join(vdir, rel)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "w") as f:
                        f.write(text)
                    os.chmod(target, 0o644)
            elif "secret" in vol:
                pod.notes.append(f"volume {vname}: Secret {vol['secret'].get('secretName')} mounted empty")
            elif "emptyDir" in vol or vname in claims or "persistentVolumeClaim" in vol:
                if ids is not None:
                    os.chown(vdir, 0, fs_group if fs_group is not None else ids[1])
                    os.chmod(vdir, 0o2775 if fs_group is not None else 0o777 if "emptyDir" in vol else 0o755)
            else:
                pod.notes.append(f"volume {vname}: {', '.join(sorted(vol)) or 'undefined'} mounted as an empty directory")
            made[vname] = vdir
        host = os.path.join(made[vname], m["subPath"]) if m.get("subPath") else made[vname]
        mounts.append((m["mountPath"], host))
    return sorted(mounts, key=lambda x: -len(x[0]))


def on_host(path, mounts):
    """`path` inside the container -> its scratch path, if a volume holds it, else None."""
    if not isinstance(path, str) or not posixpath.isabs(path):
        return None
    for mount_path, host in mounts:
        if posixpath.commonpath([mount_path, path]) == mount_path:
            rest = posixpath.relpath(path, mount_path)
            return host if rest == "." else os.path.join(host, rest)
    return None


def path_leaves(table, prefix=""):
    """(dotted key, value) of every string in nested TOML tables (arrays of tables left out)."""
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from path_leaves(v, key + ".")
        elif isinstance(v, str):
            yield key, v


def container_env(pod, config_maps):
    """The container's environment as the kubelet builds it (in order, with $(VAR) expansion).

    fieldRef metadata.name is the pod's name (windrow's MQTT client id and
    node id default to $POD_NAME); values from Secrets are a placeholder
    (noted: the private brokers ask for no password); anything else the
    kubelet would resolve (resourceFieldRef, ...) is a placeholder too, noted.
    """
    env = {}
    for src in pod.container.get("envFrom") or []:
        if "configMapRef" in src:
            env.update({(src.get("prefix") or "") + k: v
                        for k, v in (config_maps.get(src["configMapRef"].get("name")) or {}).items()})
        else:
            pod.notes.append(f"envFrom {src}: not available, left out")
    for e in pod.container.get("env") or []:
        name = e.get("name")
        if "value" in e:
            env[name] = expand_refs(e["value"], env)
            continue
        ref = e.get("valueFrom") or {}
        if "fieldRef" in ref:
            field = ref["fieldRef"].get("fieldPath")
            env[name] = {"metadata.name": pod.name, "metadata.namespace": "windrow",
                         "status.podIP": "127.0.0.1", "spec.nodeName": "chart-check-node",
                         "spec.serviceAccountName": pod.spec.get("serviceAccountName", "default")
                         }.get(field, PLACEHOLDER)
        elif "secretKeyRef" in ref:
            s = ref["secretKeyRef"]
            env[name] = PLACEHOLDER
            pod.notes.append(f"{name} from Secret {s.get('name')}/{s.get('key')}: a placeholder")
        elif "configMapKeyRef" in ref:
            c = ref["configMapKeyRef"]
            env[name] = (config_maps.get(c.get("name")) or {}).get(c.get("key"), PLACEHOLDER)
        else:
            env[name] = PLACEHOLDER
            pod.notes.append(f"{name} from {', '.join(ref)}: a placeholder")
    return env


def connection_blockers(config, env, given, role):
    """What makes the container need TLS or credentials files the plain private brokers cannot serve."""
    found = []

    def setting(dotted, flag):
        return given.get(flag) if flag in given else env.get(env_name(dotted), dig(config, dotted))

    for leaf in NATS_FILES + ("tls_required",):
        flag = "nats-" + leaf.replace("_", "-")
        for dotted in (f"nats.{leaf}", f"{role}.nats.{leaf}"):
            value = setting(dotted, flag)
            if truthy(value):
                found.append(f"{dotted} = {shown_value(value)}")
                break
    url = setting(f"{role}.nats.url", "nats-url") or setting("nats.url", "nats-url") or ""
    if "tls://" in str(url):
        found.append(f"nats.url = {url}")
    if role == "bridge":
        for leaf in ("tls",) + NATS_FILES[1:]:
            value = setting(f"bridge.mqtt.{leaf}", "mqtt-" + leaf.replace("_", "-"))
            if truthy(value):
                found.append(f"bridge.mqtt.{leaf} = {shown_value(value)}")
    return found


def rewrite_flag(argv, flag, value):
    """Replaces the value of --flag in argv (both `--flag v` and `--flag=v`); True if present."""
    hit = False
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            argv[i + 1] = value
            hit = True
        elif arg.startswith(f"--{flag}="):
            argv[i] = f"--{flag}={value}"
            hit = True
    return hit


def start_pod(pod, a, config, config_maps, helps, root):
    """Builds the pod's process (argv, environment, volumes, user) and starts it.

    Returns a reason to skip it, or None once it runs.
    """
    sec = {**(pod.spec.get("securityContext") or {}), **(pod.container.get("securityContext") or {})}
    ids = None
    if os.geteuid() == 0 and sec.get("runAsUser") is not None:
        ids = (sec["runAsUser"], sec.get("runAsGroup", sec["runAsUser"]))
    mounts = prepare_volumes(pod, root, config_maps, ids)

    env = container_env(pod, config_maps)
    command = pod.container.get("command") or ["windrow"]  # the image's ENTRYPOINT
    argv = [expand_refs(x, env) for x in list(command[1:]) + list(pod.container.get("args") or [])]
    _, given = parse_args(pod.where, argv, helps, Check("args"))
    blockers = connection_blockers(config, env, given, pod.role)
    if blockers:
        return ("needs TLS or NATS credentials files, which the plain private brokers cannot serve: "
                + ", ".join(blockers))

    # Paths into volumes -> their scratch directories: args, env, then the
    # file's keys (through the environment, which overrides the file).
    moved = 0
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        host = on_host(value, mounts)
        if host:
            argv[i] = f"{flag}={host}" if eq else host
            moved += 1
    for k, v in env.items():
        host = on_host(v, mounts)
        if host:
            env[k] = host
            moved += 1
    for key, value in path_leaves(config):
        host = on_host(value, mounts)
        if host and env_name(key) not in env:
            env[env_name(key)] = host
            moved += 1
    pod.notes.append(f"{moved} path(s) into volumes rewritten to scratch directories")

    # Brokers and the HTTP port: flags win over the environment, so a flag is
    # rewritten, else the environment overrides windrow.toml.
    port = free_port()
    listen = f"127.0.0.1:{port}"
    overrides = {"nats-url": ("nats.url", a.nats_url), "http-listen": (f"{pod.role}.http_listen", listen)}
    if pod.role == "bridge":
        overrides["mqtt-host"] = ("bridge.mqtt.host", a.mqtt_host)
        overrides["mqtt-port"] = ("bridge.mqtt.port", str(a.mqtt_port))
    for flag, (key, value) in overrides.items():
        if not rewrite_flag(argv, flag, value):
            env[env_name(key)] = value
            if key == "nats.url" and (dig(config, f"{pod.role}.nats.url") or env_name(f"{pod.role}.nats.url") in env):
                env[env_name(f"{pod.role}.nats.url")] = value
    pod.http_port = port

    # The rest of what the kubelet gives a container: HOSTNAME is the pod
    # name; the image sets no ENV of its own but PATH. /tmp as a volume is
    # TMPDIR here, since the process shares the host's /tmp.
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": pod.name}
    tmp = on_host("/tmp", mounts)
    if tmp:
        base["TMPDIR"] = tmp
    full_env = {**base, **env}

    # The working directory: workingDir or the image's WORKDIR, on a volume
    # or else on the (read-only unless stated otherwise) root filesystem.
    workdir = pod.container.get("workingDir") or a.image_workdir
    cwd = on_host(workdir, mounts)
    if cwd is None:
        cwd = os.path.join(root, "rootfs", workdir.lstrip("/"))
        os.makedirs(cwd, exist_ok=True)
        if ids is not None and not sec.get("readOnlyRootFilesystem"):
            os.chown(cwd, ids[0], ids[1])
    os.makedirs(cwd, exist_ok=True)

    if pod.container.get("lifecycle"):
        pod.notes.append("lifecycle hooks are not run")
    fs_group = (pod.spec.get("securityContext") or {}).get("fsGroup")
    extra = {}
    if ids is None:
        pod.notes.append(f"runs as uid {os.geteuid()}" + (
            f" (runAsUser {sec['runAsUser']} needs root to switch to)" if sec.get("runAsUser") is not None else ""))
    else:
        extra = {"user": ids[0], "group": ids[1], "extra_groups": [fs_group] if fs_group is not None else []}
        pod.notes.append(f"runs as {ids[0]}:{ids[1]}" + (f", fsGroup {fs_group}" if fs_group is not None else ""))

    pod.log_path = os.path.join(root, "pod.log")
    with open(pod.log_path, "wb") as log:
        pod.proc = subprocess.Popen([a.windrow] + argv, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **extra)
    pod.started = time.monotonic()
    return None


def probe_port(pod, probe):
    """The local port the kubelet would probe: the probe's port must be http_listen's container port."""
    target = (probe.get("httpGet") or {}).get("port")
    if isinstance(target, str) and not target.isdigit():
        named = {p.get("name"): p.get("containerPort") for p in pod.container.get("ports") or []}
        target = named.get(target)
    if target is None or int(target) != pod.listen_port:
        return None
    return pod.http_port


def http_probe(pod, kind):
    """One httpGet probe as the kubelet runs it: (success, what it got)."""
    probe = pod.container.get(kind) or {}
    get = probe.get("httpGet")
    if not get:
        return False, f"{kind} is not an httpGet probe"
    if str(get.get("scheme", "HTTP")).upper() != "HTTP":
        return False, f"{kind} uses scheme {get.get('scheme')}, windrow serves plain HTTP"
    port = probe_port(pod, probe)
    if port is None:
        return False, f"{kind} port {get.get('port')!r} is not http_listen's port {pod.listen_port}"
    path = get.get("path", "/")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=probe.get("timeoutSeconds", 1))
    try:
        conn.request("GET", path, headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []})
        r = conn.getresponse()
        body = r.read(300).decode(errors="replace").strip().replace("\n", " ")
        return r.status in PROBE_OK, f"GET {path} -> {r.status} {body}".rstrip()
    except OSError as e:
        return False, f"GET {path} on :{port} -> {e}"
    finally:
        conn.close()


def ready_budget(pod, cap):
    """Seconds the kubelet allows before it restarts a container that never starts, capped."""
    probe = pod.container.get("startupProbe") or pod.container.get("livenessProbe") or {}
    budget = probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
    return min(budget, cap)


def wait_ready(pods, cap):
    """Polls each pod's startup, then readiness probe until it passes, the pod exits, or its budget ends."""
    last = {}
    while True:
        pending = [p for p in pods if p.state in ("startup", "readiness")]
        if not pending:
            return
        for pod in pending:
            code = pod.proc.poll()
            if code is not None:
                pod.fail(f"{pod.state} probe", f"the process exited with code {code} before it was ready "
                                               f"(last probe: {last.get(id(pod), 'none')})")
                continue
            kind = "startupProbe" if pod.state == "startup" and pod.container.get("startupProbe") else "readinessProbe"
            passed, got = http_probe(pod, kind)
            last[id(pod)] = f"{kind} {got}"
            if passed:
                if kind == "startupProbe":
                    pod.state = "readiness"
                else:
                    pod.state = "ready"
                    pod.ready_secs = time.monotonic() - pod.started
            elif time.monotonic() - pod.started > ready_budget(pod, cap):
                pod.fail(f"{'startup' if kind == 'startupProbe' else 'readiness'} probe",
                         f"not ready within {ready_budget(pod, cap):g} s (last: {got})")
        time.sleep(POLL_SECS)


def drain(pods):
    """SIGTERM to every running pod; each must exit 0 within its terminationGracePeriodSeconds."""
    for pod in pods:
        if pod.proc.poll() is None:
            pod.proc.send_signal(signal.SIGTERM)
            pod.term_at = time.monotonic()
    for pod in pods:
        if pod.state != "ready":
            continue
        grace = pod.spec.get("terminationGracePeriodSeconds", KUBERNETES_DEFAULT_GRACE_SECS)
        try:
            code = pod.proc.wait(timeout=max(0.0, grace - (time.monotonic() - pod.term_at)))
        except subprocess.TimeoutExpired:
            pod.fail("drain", f"still running {grace} s after SIGTERM (terminationGracePeriodSeconds): "
                              "Kubernetes would SIGKILL it in the middle of its drain")
            continue
        pod.drain_secs = time.monotonic() - pod.term_at
        if code != 0:
            pod.fail("drain", f"exited with code {code} after SIGTERM, expected 0")


def run_pods(a, objs, containers, role_of, config):
    """Starts each windrow container of the rendered Deployments and StatefulSets (see above)."""
    check = Check("rendered pods start, become ready and drain against private brokers")
    config_maps = {o["metadata"]["name"]: {k: str(v) for k, v in (o.get("data") or {}).items()}
                   for o in objs if o["kind"] == "ConfigMap"}
    helps = {}
    for sub in ("bridge", "worker", "streams apply"):
        with open(os.path.join(a.help_dir, f"help-{sub.replace(' ', '-')}.txt")) as f:
            helps[sub] = parse_help(f.read())
    pods, skipped = [], []
    for w, _, spec, c in containers:
        where = f"{w['kind']}/{w['metadata']['name']} container {c.get('name')}"
        if id(c) not in role_of:
            continue
        if w["kind"] not in RUN_KINDS:
            skipped.append(f"{where}: a {w['kind']}, only {' and '.join(RUN_KINDS)} are run")
            continue
        if spec.get("initContainers"):
            skipped.append(f"{where}: the pod has initContainers, which this check does not run")
            continue
        role, port, _, _ = role_of[id(c)]
        pods.append(Pod(w, spec, c, role, port, where))

    running = []
    # A SIGTERM to chart-check must not leave the pods running: exit through
    # the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("chart-check: terminated"))
    try:
        for i, pod in enumerate(pods):
            root = os.path.join(a.scratch, f"{i:02d}-{pod.name}")
            os.makedirs(root)
            try:
                reason = start_pod(pod, a, config, config_maps, helps, root)
            except OSError as e:
                check.add(pod.label, f"start: cannot run {a.windrow}: {e}")
                continue
            if reason:
                skipped.append(f"{pod.label}: {reason}")
            else:
                running.append(pod)
        for s in skipped:
            say("skip", s)
        wait_ready(running, a.ready_cap_secs)
        for pod in running:
            if pod.state == "ready":
                passed, got = http_probe(pod, "livenessProbe")
                if not passed:
                    pod.fail("liveness probe", got)
        # A pod that failed has its verdict: stop it outright; drain the rest.
        for pod in running:
            if pod.state != "ready" and pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait()
        drain(running)
    finally:
        for pod in running:
            if pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait()

    summary = []
    for pod in running:
        probes = ", ".join(f"{k.replace('Probe', '')} {(pod.container.get(k) or {}).get('httpGet', {}).get('path')}"
                           for k in PROBE_PATHS if pod.container.get(k))
        if pod.state == "failed":
            check.add(pod.label, f"{pod.failure}\n         notes: {'; '.join(pod.notes)}\n"
                                 f"         ----- last {LOG_TAIL_LINES} lines of its log -----\n         "
                                 + pod.log_tail().replace("\n", "\n         "))
            summary.append(f"{pod.container.get('name')} FAILED")
        else:
            say("ok", f"pod {pod.label}: ready after {pod.ready_secs:.1f} s ({probes} on :{pod.http_port}), "
                      f"drained in {pod.drain_secs:.1f} s with exit 0; {'; '.join(pod.notes)}")
            summary.append(f"{pod.container.get('name')} ready, drained")
    detail = f": ran {len(running)} pod(s)" + (": " + "; ".join(summary) if summary else "")
    if skipped:
        detail += f"; skipped {len(skipped)}"
    if not running and not check.problems:
        say("skip", f"{check.name}{detail}: no pod could run here")
        return True
    if check.problems:  # the summary goes with the failure too
        check.name += detail
        return check.report()
    return check.report(detail)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("manifests")
    p.add_argument("--kube-version", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--windrow")
    p.add_argument("--help-dir")
    p.add_argument("--label", required=True)
    p.add_argument("--schemas-only", action="store_true")
    p.add_argument("--values", action="append", default=[],
                   help="values files of the scenario, chart defaults first (for bridge.enabled/worker.enabled)")
    p.add_argument("--brokers", help="manifests whose nats.conf bounds the declared streams' max_bytes")
    run = p.add_argument_group("runtime check (--run-pods): start each rendered windrow pod as a local "
                               "process against private brokers; see run_pods()")
    run.add_argument("--run-pods", action="store_true")
    run.add_argument("--nats-url", help="URL of a private nats-server (JetStream on)")
    run.add_argument("--mqtt-host", help="host of a private MQTT broker")
    run.add_argument("--mqtt-port", type=int)
    run.add_argument("--scratch", help="directory for the pods' volumes and logs")
    run.add_argument("--image-workdir", default="/",
                     help="the image's WORKDIR, the containers' working directory unless workingDir is set")
    run.add_argument("--ready-cap-secs", type=float, default=60.0,
                     help="upper bound of the wait for readiness (else the startup probe's budget)")
    a = p.parse_args()
    if a.run_pods and not (a.nats_url and a.mqtt_host and a.mqtt_port and a.scratch and a.windrow):
        p.error("--run-pods needs --nats-url, --mqtt-host, --mqtt-port, --scratch and --windrow")
    with tempfile.TemporaryDirectory(prefix="chart-check-") as tmp:
        return check(a, tmp)


def check(a, tmp):
    with open(a.manifests) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]

    ok = True

    # 5. Kubernetes schemas (strict: unknown fields fail), unknown kinds, duplicates.
    schema = Check(f"Kubernetes schemas (strict, {a.kube_version})"
                   + (f" of {a.label}" if a.schemas_only else ""))
    seen, counted, skipped = set(), 0, 0
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
            schema.add(f"document {i}", "not an object with apiVersion and kind")
            continue
        name = (doc.get("metadata") or {}).get("name")
        where = f"{doc['apiVersion']} {doc['kind']}/{name}"
        if not name:
            schema.add(where, "metadata.name is missing")
        key = (doc["apiVersion"].rsplit("/", 1)[0], doc["kind"],
               (doc.get("metadata") or {}).get("namespace") or a.namespace, name)
        if key in seen:
            schema.add(where, "rendered twice: two objects of this kind share the name, and one replaces the other")
        seen.add(key)
        counted += 1
        try:
            kv.validate(doc, a.kube_version, True)
        except kv.ValidationError as e:
            path = ".".join(str(x) for x in e.path) or "(root)"
            schema.add(where, f"{path}: {e.message}")
        except kv.SchemaNotFoundError:
            if (doc["apiVersion"], doc["kind"]) in ALLOWED_CRDS:
                skipped += 1
            else:
                schema.add(where, f"no Kubernetes {a.kube_version} schema for this kind/apiVersion "
                                  "(mistyped or removed API, or a CRD the check does not allow)")
        except kv.utils.VersionNotSupportedError:
            schema.add("kubernetes-validate", f"has no schemas for Kubernetes {a.kube_version}")
            break
    ok &= schema.report(f": {counted} object(s), no two of one kind and name" + (f", {skipped} ServiceMonitor(s) without schema" if skipped else ""))
    if a.schemas_only:
        return 0 if ok else 1

    helps = {}
    for sub in ("bridge", "worker", "streams apply"):
        with open(os.path.join(a.help_dir, f"help-{sub.replace(' ', '-')}.txt")) as f:
            helps[sub] = parse_help(f.read())

    objs = [d for d in docs if isinstance(d, dict) and d.get("kind")]

    def named(kind):
        return [o for o in objs if o["kind"] == kind]

    # 6a. The ConfigMap's windrow.toml passes `windrow config check`.
    config_check = Check("windrow config check of the rendered windrow.toml")
    maps = [o for o in named("ConfigMap") if CONFIG_KEY in ((o.get("data") or {}))]
    workloads = [o for o in objs if o["kind"] in WORKLOAD_KINDS]
    containers = []  # (workload, pod labels, pod spec, container)
    for w in workloads:
        labels, spec = pod_spec_of(w)
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            containers.append((w, labels, spec, c))
    config, config_map, config_file = {}, None, None
    stubbed = set()
    if len(maps) != 1:
        config_check.add("ConfigMaps", f"expected exactly one with a {CONFIG_KEY} key, found {len(maps)}")
    else:
        config_map = maps[0]
        text = config_map["data"][CONFIG_KEY]
        config_file = os.path.join(tmp, CONFIG_KEY)
        with open(config_file, "w") as f:
            f.write(text)
        try:
            config = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            config_check.add(f"ConfigMap/{config_map['metadata']['name']}", f"{CONFIG_KEY} is not TOML: {e}")
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("WINDROW_")}
        # As each container sees it: the file plus the container's WINDROW_* environment.
        env_sets = {tuple(sorted(windrow_env(c).items())) for _, _, _, c in containers} or {()}
        for extra in sorted(env_sets):
            env = dict(extra)
            # Files the config names (credentials, TLS) are not in this checkout:
            # an empty file stands in for each absolute path (6b checks that a
            # volume of the container holds it).
            for key, _ in FILE_KEYS:
                path = env.get(env_name(key)) or dig(config, key)
                if isinstance(path, str) and posixpath.isabs(path):
                    stub = os.path.join(tmp, "files", path.lstrip("/"))
                    os.makedirs(os.path.dirname(stub), exist_ok=True)
                    open(stub, "a").close()
                    env[env_name(key)] = stub
                    stubbed.add(path)
            r = subprocess.run([a.windrow, "config", "check", "--config", config_file],
                               env={**base_env, **env}, capture_output=True, text=True)
            if r.returncode != 0:
                with_env = f" with {' '.join(k + '=' + v for k, v in extra)}" if extra else ""
                out = (r.stderr + r.stdout).strip().replace("\n", "\n         ")
                config_check.add(f"ConfigMap/{config_map['metadata']['name']}",
                                 f"`windrow config check`{with_env} exited {r.returncode}:\n         {out}")
    ok &= config_check.report(f" ({len(stubbed)} credentials/TLS path(s) stood in for by empty files)" if stubbed else "")

    # 6a'. Only with --brokers (k8s/brokers.yaml and the scenario it is used
    # with): nats-server refuses a stream whose max_bytes exceeds its
    # JetStream store limit, and --ensure-streams would then fail in every pod.
    if a.brokers:
        shown = "/".join(os.path.abspath(a.brokers).split(os.sep)[-2:])
        fit = Check(f"declared streams fit the JetStream store limits of {shown}")
        try:
            limits = jetstream_limits(a.brokers)
        except ValueError as e:
            limits = {}
            fit.add(shown, f"nats.conf: {e}")
        reserved = {}
        for st in dig(config, "jetstream.streams") or []:
            storage, size = st.get("storage", "file"), st.get("max_bytes", -1)
            if size is None or size < 0:
                continue
            reserved[storage] = reserved.get(storage, 0) + size * st.get("replicas", 1)
            if storage not in limits:
                fit.add(f"stream {st.get('name')}", f"{storage} storage: {shown} sets no max_{storage}_store")
        for storage, total in sorted(reserved.items()):
            if storage in limits and total > limits[storage]:
                fit.add(f"jetstream.streams ({storage})", f"max_bytes × replicas add up to {total}, above the "
                        f"server's max_{storage}_store of {limits[storage]} bytes: nats-server refuses the stream")
        ok &= fit.report(": " + ", ".join(f"{s} {reserved.get(s, 0)} of {n} bytes" for s, n in sorted(limits.items())))

    # 6b. Container args parse; --config is the mounted ConfigMap; store.dir is on a volume.
    args_check = Check("containers run windrow, args parse against `windrow <subcommand> --help`; "
                       "--config, store.dir and credentials/TLS files are mounted")
    role_of = {}  # id(container) -> (role, effective settings)
    for w, labels, spec, c in containers:
        where = f"{w['kind']}/{w['metadata']['name']} container {c.get('name')}"
        command = c.get("command") or []
        if command and posixpath.basename(command[0]) != "windrow":
            args_check.add(where, f"runs {command[0]!r}, not windrow: chart-check cannot check it "
                                  "(the chart renders windrow containers only)")
            continue
        argv = [str(x) for x in list(command[1:]) + list(c.get("args") or [])]
        sub, given = parse_args(where, argv, helps, args_check)
        env = literal_env(c)
        mounts = c.get("volumeMounts") or []
        volumes = {v.get("name"): v for v in spec.get("volumes") or []}
        claim_names = {t.get("metadata", {}).get("name")
                       for t in (w.get("spec") or {}).get("volumeClaimTemplates") or []}
        config_path = given.get("config") or env.get("WINDROW_CONFIG")
        if not config_path:
            args_check.add(where, "runs without --config: windrow.toml from the ConfigMap is not read")
        elif config_map is not None:
            found = False
            for m in mounts:
                vol = volumes.get(m.get("name")) or {}
                cm = vol.get("configMap") or {}
                if cm.get("name") != config_map["metadata"]["name"]:
                    continue
                items = {i["key"]: i["path"] for i in cm.get("items") or []}
                if m.get("subPath"):
                    found |= m["mountPath"] == config_path and m["subPath"] == CONFIG_KEY and not items
                else:
                    rel = items.get(CONFIG_KEY, CONFIG_KEY if not items else None)
                    found |= rel is not None and posixpath.join(m["mountPath"], rel) == config_path
            if not found:
                args_check.add(where, f"--config {config_path} is not {CONFIG_KEY} of the mounted "
                                      f"ConfigMap {config_map['metadata']['name']}")
        role = sub if sub in ROLES else None
        flag_prefix = {"nats": "nats-", "bridge.mqtt": "mqtt-"}
        for key, reader in FILE_KEYS:
            if reader not in (None, role):
                continue
            prefix, _, leaf = key.rpartition(".")
            flag = flag_prefix[prefix] + leaf.replace("_", "-") if prefix in flag_prefix else None
            path = (given.get(flag) if flag else None) or env.get(env_name(key)) or dig(config, key)
            if not path:
                continue
            best = best_mount(mounts, path) if posixpath.isabs(path) else None
            if best is None:
                args_check.add(where, f"{key} {path} is on no volume of the container (mount it with extraVolumes/extraVolumeMounts)")
            elif "configMap" in (volumes.get(best["name"]) or {}) and \
                    volumes[best["name"]]["configMap"].get("name") == (config_map or {}).get("metadata", {}).get("name"):
                args_check.add(where, f"{key} {path} is in the volume of the windrow.toml ConfigMap, which holds nothing else")
        if role is None:
            continue
        section = config.get(role) or {}
        listen = given.get("http-listen") or env.get(f"WINDROW_{role.upper()}__HTTP_LISTEN") \
            or section.get("http_listen") or DEFAULT_LISTEN[role]
        shutdown = given.get("shutdown-timeout-secs") \
            or env.get(f"WINDROW_{role.upper()}__SHUTDOWN_TIMEOUT_SECS") \
            or section.get("shutdown_timeout_secs") or DEFAULT_SHUTDOWN_SECS[role]
        role_of[id(c)] = (role, port_of(listen), listen, int(shutdown))
        if role == "worker":
            store_dir = given.get("data-dir") or env.get("WINDROW_WORKER__STORE__DIR") \
                or (section.get("store") or {}).get("dir") or "data"
            if not posixpath.isabs(store_dir):
                args_check.add(where, f"worker.store.dir {store_dir!r} is relative: it must be a mounted volume")
            else:
                best = best_mount(mounts, store_dir)
                if best is None:
                    args_check.add(where, f"worker.store.dir {store_dir} is on no volume (the root filesystem is read-only and the store would be lost)")
                else:
                    vol = volumes.get(best["name"])
                    if best.get("readOnly") or (vol and ("configMap" in vol or "secret" in vol)):
                        args_check.add(where, f"worker.store.dir {store_dir} is on the read-only volume {best['name']}")
                    elif vol and "nfs" in vol:
                        args_check.add(where, f"worker.store.dir {store_dir} is on NFS volume {best['name']}: LMDB needs a local filesystem")
                    elif vol is None and best["name"] not in claim_names:
                        args_check.add(where, f"volume {best['name']} of worker.store.dir is neither a pod volume nor a volumeClaimTemplate")
    counts = {r: sum(1 for role, *_ in role_of.values() if role == r) for r in sorted(ROLES)}
    ok &= args_check.report(f": {len(containers)} container(s) "
                            f"({', '.join(f'{n} {r}' for r, n in counts.items())})")

    # 6b'. Not vacuous: each enabled role renders a windrow container, and a
    # disabled one none.
    if a.values:
        values = {}
        for path in a.values:
            with open(path) as f:
                values = deep_merge(values, yaml.safe_load(f) or {})
        roles = Check("every enabled role (bridge.enabled, worker.enabled) renders a windrow container, a disabled one none")
        enabled = {r: (values.get(r) or {}).get("enabled", True) is not False for r in counts}
        for r, n in counts.items():
            if enabled[r] and n == 0:
                roles.add(r, f"{r}.enabled is true, but no rendered container runs `windrow {r}`")
            elif not enabled[r] and n:
                roles.add(r, f"{r}.enabled is false, but {n} rendered container(s) run `windrow {r}`")
        ok &= roles.report(": " + ", ".join(f"{r} {'enabled' if enabled[r] else 'disabled'}" for r in counts))

    # 6c. Ports follow http_listen; grace periods exceed shutdown_timeout_secs.
    ports = Check("ports follow http_listen; probes on /healthz (startup, liveness) and /readyz (readiness); "
                  "terminationGracePeriodSeconds exceeds shutdown_timeout_secs")
    services = named("Service")
    for w, labels, spec, c in containers:
        if id(c) not in role_of:
            continue
        role, port, listen, shutdown = role_of[id(c)]
        where = f"{w['kind']}/{w['metadata']['name']} container {c.get('name')}"
        if port is None:
            ports.add(where, f"{role}.http_listen {listen!r} has no port")
            continue
        named_ports = {cp.get("name"): cp.get("containerPort") for cp in c.get("ports") or [] if cp.get("name")}
        cports = [cp.get("containerPort") for cp in c.get("ports") or []]
        if port not in cports:
            ports.add(where, f"declares no containerPort {port} ({role}.http_listen {listen})")
        for cp in cports:
            if cp != port:
                ports.add(where, f"containerPort {cp}: windrow {role} listens on {port} only ({role}.http_listen {listen})")

        def resolves(target, what):
            if isinstance(target, int):
                if target != port:
                    ports.add(where, f"{what} uses port {target}, but {role}.http_listen is {listen}")
            elif target not in named_ports:
                ports.add(where, f"{what} uses port name {target!r}, which the container does not declare")
            elif named_ports[target] != port:
                ports.add(where, f"{what} uses port {target!r} = {named_ports[target]}, but {role}.http_listen is {listen}")

        for probe, want in PROBE_PATHS.items():
            pr = c.get(probe) or {}
            for handler in ("httpGet", "tcpSocket"):
                if handler in pr:
                    resolves(pr[handler].get("port"), f"{probe}.{handler}")
            got = (pr.get("httpGet") or {}).get("path")
            if got != want:
                why = " (/readyz is 503 while a broker is down: the kubelet would restart every pod in an outage)" \
                    if probe != "readinessProbe" and got == "/readyz" else ""
                ports.add(where, f"{probe} is {'httpGet ' + got if got else 'missing or not an httpGet'}, "
                                 f"expected httpGet {want}{why}")
        for s in services:
            if labels_match((s.get("spec") or {}).get("selector"), labels):
                for sp in (s.get("spec") or {}).get("ports") or []:
                    resolves(sp.get("targetPort", sp.get("port")),
                             f"Service/{s['metadata']['name']} port {sp.get('name') or sp.get('port')}")
        grace = spec.get("terminationGracePeriodSeconds", KUBERNETES_DEFAULT_GRACE_SECS)
        if grace <= shutdown:
            ports.add(where, f"terminationGracePeriodSeconds {grace} does not exceed {role}.shutdown_timeout_secs "
                             f"{shutdown}: Kubernetes kills the pod in the middle of its drain")
    for sm in named("ServiceMonitor"):
        where = f"ServiceMonitor/{sm['metadata']['name']}"
        selector = ((sm.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        matched = [s for s in services if labels_match(selector, s["metadata"].get("labels"))]
        if not matched:
            ports.add(where, f"selector {selector} matches no rendered Service")
        for ep in (sm.get("spec") or {}).get("endpoints") or []:
            for s in matched:
                names = {sp.get("name") for sp in (s.get("spec") or {}).get("ports") or []}
                if ep.get("port") not in names:
                    ports.add(where, f"endpoint port {ep.get('port')!r} is not a port of Service/{s['metadata']['name']}")
    for s in services:
        selector = (s.get("spec") or {}).get("selector")
        if selector and not any(labels_match(selector, pod_spec_of(w)[0]) for w in workloads):
            ports.add(f"Service/{s['metadata']['name']}", f"selector {selector} matches no rendered pod template")
    ok &= ports.report()

    # 6d. Workload wiring: StatefulSet services, HPA targets, PDB selectors.
    wiring = Check("StatefulSet serviceName, HPA target and PodDisruptionBudget selectors")
    by_kind_name = {(w["kind"], w["metadata"]["name"]): w for w in workloads}
    for w in named("StatefulSet"):
        svc = (w.get("spec") or {}).get("serviceName")
        target = [s for s in services if s["metadata"]["name"] == svc]
        if svc and not target:
            wiring.add(f"StatefulSet/{w['metadata']['name']}", f"serviceName {svc!r} is not a rendered Service")
        elif svc and (target[0].get("spec") or {}).get("clusterIP") != "None":
            wiring.add(f"StatefulSet/{w['metadata']['name']}", f"serviceName {svc!r} is not headless")
    for h in named("HorizontalPodAutoscaler"):
        ref = (h.get("spec") or {}).get("scaleTargetRef") or {}
        target = by_kind_name.get((ref.get("kind"), ref.get("name")))
        where = f"HorizontalPodAutoscaler/{h['metadata']['name']}"
        if target is None:
            wiring.add(where, f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not a rendered workload")
            continue
        if any(id(c) in role_of and role_of[id(c)][0] == "worker" for w, _, _, c in containers if w is target):
            wiring.add(where, "targets the workers: each holds its own store and must not be autoscaled")
        if "replicas" in (target.get("spec") or {}):
            wiring.add(where, f"{ref['kind']}/{ref['name']} also sets spec.replicas: every upgrade would reset the HPA's count")
    for pdb in named("PodDisruptionBudget"):
        selector = (((pdb.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
        if not any(labels_match(selector, pod_spec_of(w)[0]) for w in workloads):
            wiring.add(f"PodDisruptionBudget/{pdb['metadata']['name']}", f"selector {selector} matches no rendered pod template")
    ok &= wiring.report()

    # 7. Only with --run-pods: the pods start, become ready and drain.
    if a.run_pods:
        if ok:
            ok &= run_pods(a, objs, containers, role_of, config)
        else:
            say("skip", "rendered pods not started: the checks above failed")

    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
