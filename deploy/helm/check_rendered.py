"""Structural checks of what `helm template` renders from the PCF chart.

Usage: python3 check_rendered.py VARIANT RENDERED.yaml

VARIANT is the name of a values file under pcf/ci/ without `-values.yaml` (`default`,
`created-secret`, ...); what that variant must render is in EXPECT below. Every variant
must render, for each of the roles api, relay and projector, a Deployment running
`pcf serve --role <role>` with both probes on the HTTP port, resources, the hardened
security context, a PodDisruptionBudget that selects its pods, and its configuration from
the ConfigMap and the Secret; no secret variable may sit in a ConfigMap; projectors may not
outnumber the topic's partitions. Run by scripts/check-chart.sh; exits 1 naming each
failed check.
"""

import sys

import yaml

ROLES = ("api", "relay", "projector")
SECRET_VARS = {
    "PCF_DATABASE_URL",
    "PCF_READ_DATABASE_URL",
    "PCF_REDIS_URL",
    "PCF_JWT_SECRET",
    "PCF_JWT_PUBLIC_KEY",
    "PCF_KEK",
}

# What each variant renders beyond the common checks.
EXPECT = {
    "default": dict(secret="external:pcf", hpa=True, request_rate=False, kek_file=False,
                    migrate=True, otlp=False, service_monitor=False, annotations=True,
                    partitions=12, api_replicas=None, projector_replicas=2),
    "created-secret": dict(secret="created", hpa=True, request_rate=True, kek_file=False,
                           migrate=True, otlp=True, service_monitor=True, annotations=True,
                           partitions=12, api_replicas=None, projector_replicas=2),
    "kek-file": dict(secret="created", hpa=True, request_rate=False, kek_file=True,
                     migrate=True, otlp=False, service_monitor=False, annotations=True,
                     partitions=12, api_replicas=None, projector_replicas=2),
    "existing-secret": dict(secret="external:pcf-production", hpa=False, request_rate=False,
                            kek_file=True, migrate=False, otlp=False, service_monitor=False,
                            annotations=False, partitions=6, api_replicas=3,
                            projector_replicas=6),
}

failures = []


def check(ok, message):
    if not ok:
        failures.append(message)
    return ok


def component(doc):
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def parse_toml_ints(text):
    """The `key = integer` lines of the rendered pcf.toml (all this chart writes)."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


def check_files(where, spec, container, secrets):
    """Every PCF_*_FILE variable names a file in a mounted volume, which holds that key."""
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for env in container.get("env", []):
        name, path = env.get("name", ""), env.get("value", "")
        if not (name.startswith("PCF_") and name.endswith("_FILE")):
            continue
        directory, _, file = path.rpartition("/")
        volume = volumes.get(mounts.get(directory, ""), {})
        if not check("secret" in volume, f"{where}: {name}={path} is not in a mounted Secret"):
            continue
        items = {i["path"]: i["key"] for i in volume["secret"].get("items", [])}
        check(file in items, f"{where}: {name}: the Secret volume has no {file}")
        made = secrets.get(volume["secret"]["secretName"])
        if made is not None:
            check(items.get(file) in made.get("data", {}),
                  f"{where}: {name}: Secret {volume['secret']['secretName']} has no {items.get(file)}")
    for ref in container.get("envFrom", []):
        made = secrets.get(ref.get("secretRef", {}).get("name"))
        if made is not None:
            odd = [k for k in made.get("data", {}) if not k.startswith("PCF_")]
            check(not odd, f"{where}: Secret {made['metadata']['name']} given as variables holds {odd}")


def check_container(role, spec, container, configmap, secret_names):
    where = f"{role}: container {container.get('name')}"
    check(container.get("args") == ["serve", "--role", role],
          f"{where}: args are {container.get('args')}, not serve --role {role}")
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    check("http" in ports, f"{where}: no port named http")
    listen = configmap["data"].get("PCF_LISTEN", "")
    check(listen == f"0.0.0.0:{ports.get('http')}",
          f"{where}: PCF_LISTEN {listen!r} does not match the http port {ports.get('http')}")
    for probe, path in (("livenessProbe", "/health/live"), ("readinessProbe", "/health/ready"),
                        ("startupProbe", "/health/live")):
        get = container.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") == "http",
              f"{where}: {probe} is not GET {path} on the http port")
    ready = container.get("readinessProbe", {})
    check(ready.get("timeoutSeconds", 1) > 3,
          f"{where}: the readiness timeout must exceed the 3 s of a dependency check")
    resources = container.get("resources", {})
    requests = resources.get("requests", {})
    check("cpu" in requests and "memory" in requests, f"{where}: no CPU and memory requests")
    check("memory" in resources.get("limits", {}), f"{where}: no memory limit")
    sc = container.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True, f"{where}: root file system not read-only")
    check(sc.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation allowed")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities not dropped")
    refs = container.get("envFrom", [])
    check({"configMapRef": {"name": configmap["metadata"]["name"]}} in refs,
          f"{where}: does not take the ConfigMap")
    secret_refs = [r["secretRef"]["name"] for r in refs if "secretRef" in r]
    check(len(secret_refs) == 1 and secret_refs[0] in secret_names,
          f"{where}: secretRef {secret_refs} is not the expected Secret {sorted(secret_names)}")
    mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
    check("/var/lib/pcf" in mounts and "/tmp" in mounts,
          f"{where}: the data directory and /tmp are not writable volumes")
    if role == "api":
        pre = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        check(pre is not None and pre[0] == "sleep", f"{where}: no preStop sleep")
        if pre:
            check(int(pre[1]) < spec.get("terminationGracePeriodSeconds", 30),
                  f"{where}: the preStop sleep takes the whole grace period")


def hooked_names(by_kind):
    return {s["metadata"]["name"] for s in by_kind.get("Secret", [])
            if "helm.sh/hook" in s["metadata"].get("annotations", {})}


def main():
    variant, path = sys.argv[1], sys.argv[2]
    expect = EXPECT[variant]
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    configmaps = by_kind.get("ConfigMap", [])
    if not check(len(configmaps) == 1, f"{len(configmaps)} ConfigMaps, not 1"):
        return
    configmap = configmaps[0]
    data = configmap["data"]
    for cm in configmaps:
        leaked = SECRET_VARS & set(cm.get("data", {}))
        check(not leaked, f"ConfigMap {cm['metadata']['name']} holds secrets {sorted(leaked)}")
    check(data.get("PCF_ENV") == "production", "PCF_ENV is not production")
    check(("PCF_OTLP_ENDPOINT" in data) == expect["otlp"], "PCF_OTLP_ENDPOINT presence")
    toml = parse_toml_ints(data.get("pcf.toml", ""))
    check(toml.get("kafka_partitions") == str(expect["partitions"]),
          f"pcf.toml kafka_partitions is {toml.get('kafka_partitions')}")
    for key, value in toml.items():
        check("." not in value or value.startswith('"'),
              f"pcf.toml {key} = {value}: a float where PCF reads an integer")

    all_secrets = {s["metadata"]["name"]: s for s in by_kind.get("Secret", [])}
    secrets = [s for s in all_secrets.values()
               if "helm.sh/hook" not in s["metadata"].get("annotations", {})]
    if expect["secret"] == "created":
        env_secrets = [s for s in secrets if "PCF_DATABASE_URL" in s.get("data", {})]
        check(len(env_secrets) == 1, f"{len(env_secrets)} Secrets with PCF_DATABASE_URL, not 1")
        secret_names = {s["metadata"]["name"] for s in env_secrets}
        for s in secrets:
            check(all(v for v in s.get("data", {}).values()),
                  f"Secret {s['metadata']['name']} has empty keys")
    else:
        name = expect["secret"].split(":", 1)[1]
        check(not secrets, "the chart made a Secret although secret.create is false")
        secret_names = {name}

    deployments = {component(d): d for d in by_kind.get("Deployment", [])}
    check(set(deployments) == set(ROLES), f"Deployments for {sorted(deployments)}, not {ROLES}")
    pdbs = by_kind.get("PodDisruptionBudget", [])
    for role in ROLES:
        dep = deployments.get(role)
        if dep is None:
            continue
        spec = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        check(matches(dep["spec"]["selector"], labels), f"{role}: selector misses its pods")
        psc = spec.get("securityContext", {})
        check(psc.get("runAsNonRoot") is True, f"{role}: pods may run as root")
        check("terminationGracePeriodSeconds" in spec, f"{role}: no terminationGracePeriodSeconds")
        check(spec.get("automountServiceAccountToken") is False, f"{role}: mounts an API token")
        containers = spec.get("containers", [])
        check(len(containers) == 1, f"{role}: {len(containers)} containers")
        for c in containers:
            check_container(role, spec, c, configmap, secret_names)
            check_files(role, spec, c, all_secrets)
            kek_env = any(e.get("name") == "PCF_KEK_FILE" for e in c.get("env", []))
            check(kek_env == expect["kek_file"], f"{role}: PCF_KEK_FILE presence")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        check(("kek" in volumes) == expect["kek_file"], f"{role}: KEK volume presence")
        annotations = dep["spec"]["template"]["metadata"].get("annotations", {})
        check(("prometheus.io/scrape" in annotations) == expect["annotations"],
              f"{role}: scrape annotations presence")
        check("checksum/config" in annotations, f"{role}: no config checksum annotation")
        covering = [p for p in pdbs if matches(p["spec"]["selector"], labels)]
        check(len(covering) == 1, f"{role}: {len(covering)} PodDisruptionBudgets select its pods")
        for p in covering:
            check(("minAvailable" in p["spec"]) != ("maxUnavailable" in p["spec"]),
                  f"{role}: its PodDisruptionBudget sets neither or both limits")

    relay = deployments.get("relay")
    if relay:
        check(relay["spec"].get("replicas") == 2, "the relay does not run 2 replicas")
    projector = deployments.get("projector")
    if projector:
        replicas = projector["spec"].get("replicas")
        check(replicas == expect["projector_replicas"], f"projector replicas {replicas}")
        check(replicas is not None and replicas <= int(toml.get("kafka_partitions", 0)),
              f"projector replicas {replicas} exceed kafka_partitions {toml.get('kafka_partitions')}")

    api = deployments.get("api")
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    check(len(hpas) == (1 if expect["hpa"] else 0), f"{len(hpas)} HorizontalPodAutoscalers")
    if api:
        check(api["spec"].get("replicas") == expect["api_replicas"],
              f"api replicas {api['spec'].get('replicas')} (an autoscaled Deployment sets none)")
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        check(api is not None and target["kind"] == "Deployment"
              and target["name"] == api["metadata"]["name"], "the HPA does not scale the API")
        kinds = [m["type"] for m in hpa["spec"]["metrics"]]
        check("Resource" in kinds, "the HPA does not scale on CPU")
        check(("Pods" in kinds) == expect["request_rate"], "the HPA's request-rate metric presence")
    services = {component(s): s for s in by_kind.get("Service", [])}
    if check("api" in services, "no Service for the API") and api:
        check(matches({"matchLabels": services["api"]["spec"]["selector"]},
                      api["spec"]["template"]["metadata"]["labels"]),
              "the API Service does not select the API pods")

    jobs = by_kind.get("Job", [])
    check(len(jobs) == (1 if expect["migrate"] else 0), f"{len(jobs)} migration Jobs")
    for job in jobs:
        hook = job["metadata"].get("annotations", {}).get("helm.sh/hook", "")
        check(set(hook.split(",")) == {"pre-install", "pre-upgrade"},
              f"the migration Job's hook is {hook!r}")
        c = job["spec"]["template"]["spec"]["containers"][0]
        check(c.get("args") == ["migrate"], "the migration Job does not run pcf migrate")
        check_files("migrate", job["spec"]["template"]["spec"], c, all_secrets)
        kek_env = any(e.get("name") == "PCF_KEK_FILE" for e in c.get("env", []))
        check(kek_env == expect["kek_file"], "migrate: PCF_KEK_FILE presence")
        if expect["secret"] == "created":
            for v in job["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in v:
                    check(v["secret"]["secretName"] in hooked_names(by_kind),
                          f"migrate: volume {v['name']} needs Secret {v['secret']['secretName']},"
                          " which a pre-install hook runs before")
        refs = [r["secretRef"]["name"] for r in c.get("envFrom", []) if "secretRef" in r]
        hooked = {s["metadata"]["name"] for s in by_kind.get("Secret", [])
                  if "helm.sh/hook" in s["metadata"].get("annotations", {})}
        check(len(refs) == 1 and refs[0] in (hooked if expect["secret"] == "created"
                                              else secret_names),
              f"the migration Job takes Secret {refs}, which exists before the release's own")
        check(not any("configMapRef" in r for r in c.get("envFrom", [])),
              "the migration Job needs the ConfigMap, which a pre-install hook runs before")

    monitors = by_kind.get("ServiceMonitor", [])
    check(len(monitors) == (1 if expect["service_monitor"] else 0), f"{len(monitors)} ServiceMonitors")

    if failures:
        for f in failures:
            print(f"check_rendered {variant}: {f}", file=sys.stderr)
        sys.exit(1)
    print(f"check_rendered {variant}: {len(docs)} objects ok")


if __name__ == "__main__":
    main()
