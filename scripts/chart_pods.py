"""Step 7 of chart-check, the runtime check (--run-pods): the rendered pods run.

chart_check.py's static checks (steps 5 and 6) only read the rendered
manifests; this module starts what they describe: each windrow container
as a local process against private brokers, its probes polled, then
SIGTERM (see the comment below and run_pods). It is separate because it
is another kind of check, with concerns of its own (processes, scratch
volumes, users, probes, signals), that runs only with --run-pods and
only after steps 5 and 6 passed, and because both together outgrew the
house style's ~600 lines a file. chart_check.py calls run_pods; what both
use is in chart_common.py.
"""
import hashlib
import http.client
import os
import posixpath
import re
import signal
import socket
import subprocess
import sys
import time

from chart_common import (KUBERNETES_DEFAULT_GRACE_SECS, NATS_FILES, PROBE_PATHS, Check, dig, env_name,
                          parse_args, parse_help, pod_spec_of, say)


# ---------------------------------------------------------------------------
# 7. Runtime check (--run-pods): the static checks in chart_check.py read the manifests;
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
