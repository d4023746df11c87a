#!/usr/bin/env python3
"""Checks rendered manifests: Kubernetes schemas, then windrow's own rules."""
import argparse
import os
import posixpath
import re
import subprocess
import sys
import tempfile

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

try:
    import kubernetes_validate as kv
except ImportError:
    sys.exit("chart-check: kubernetes-validate is missing from the tool venv; delete it to reinstall")

from chart_common import (KUBERNETES_DEFAULT_GRACE_SECS, NATS_FILES, PROBE_PATHS, Check, dig, env_name,
                          parse_args, parse_help, pod_spec_of, say)
from chart_pods import run_pods

# Kinds with no bundled schema that the chart may render (CRDs).
ALLOWED_CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}
ROLES = {"bridge", "worker"}
DEFAULT_LISTEN = {"bridge": "0.0.0.0:9464", "worker": "0.0.0.0:9465"}
DEFAULT_SHUTDOWN_SECS = {"bridge": 20, "worker": 30}
CONFIG_KEY = "windrow.toml"
# Keys naming files that `windrow config check` requires to exist, each with
# the role reading it (None: every role).
FILE_KEYS = ([(f"nats.{k}", None) for k in NATS_FILES]
             + [(f"{r}.nats.{k}", r) for r in sorted(ROLES) for k in NATS_FILES]
             + [(f"bridge.mqtt.{k}", "bridge") for k in NATS_FILES[1:]])


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


def deep_merge(base, over):
    """Helm's merge of values files: maps merge key by key, anything else replaces."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{k: deep_merge(base.get(k), v) for k, v in over.items()}}


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
