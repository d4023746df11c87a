{{/* Names, labels and the rendering of windrow.toml. */}}

{{- define "windrow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Release-scoped base name. Pod names (and therefore MQTT client ids and worker
node ids) derive from it, so keep it stable across upgrades.
*/}}
{{- define "windrow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Workload, Service and ConfigMap names: the base name cut to 45 characters,
then the role suffix, so that a long base name cannot make two objects share a
name (cutting after the suffix would drop it). 45 + "-bridge" = 52 characters
leave room for the StatefulSet's controller-revision-hash label (name + "-" +
10 characters must fit in 63).
*/}}
{{- define "windrow.shortname" -}}
{{- include "windrow.fullname" . | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- define "windrow.bridge.fullname" -}}
{{- printf "%s-bridge" (include "windrow.shortname" .) -}}
{{- end -}}
{{- define "windrow.worker.fullname" -}}
{{- printf "%s-worker" (include "windrow.shortname" .) -}}
{{- end -}}
{{- define "windrow.config.fullname" -}}
{{- printf "%s-config" (include "windrow.shortname" .) -}}
{{- end -}}

{{- define "windrow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "windrow.labels" -}}
helm.sh/chart: {{ include "windrow.chart" . }}
{{ include "windrow.selectorLabels" . }}
app.kubernetes.io/version: {{ include "windrow.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "windrow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "windrow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one role: include "windrow.roleSelectorLabels" (list $ "bridge") */}}
{{- define "windrow.roleSelectorLabels" -}}
{{ include "windrow.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "windrow.roleLabels" -}}
{{ include "windrow.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "windrow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "windrow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "windrow.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag -}}
{{- end -}}

{{- define "windrow.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "windrow.imageTag" .) -}}
{{- end -}}

{{/*
The port of a role's http_listen ("0.0.0.0:9464", "[::]:9464"): container
ports, probes and Services all use it, so they cannot disagree with the config.
Usage: include "windrow.httpPort" (list $ "bridge")
*/}}
{{- define "windrow.httpPort" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $defaults := dict "bridge" "0.0.0.0:9464" "worker" "0.0.0.0:9465" -}}
{{- $section := get $root.Values.config $role | default dict -}}
{{- $listen := get $section "http_listen" | default (get $defaults $role) | toString -}}
{{- $port := regexFind "[0-9]+$" $listen -}}
{{- if not $port -}}
{{- fail (printf "config.%s.http_listen: expected HOST:PORT, got %q" $role $listen) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds of a role: the value given, which must exceed the
role's shutdown_timeout_secs, or shutdown_timeout_secs plus a margin for the
last flush and exit. Usage: include "windrow.gracePeriod" (list $ "worker" 30 15)
(role, windrow's default shutdown_timeout_secs, margin).
*/}}
{{- define "windrow.gracePeriod" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $section := get $root.Values.config $role | default dict -}}
{{- $shutdown := get $section "shutdown_timeout_secs" | default (index . 2) | int -}}
{{- $given := (get $root.Values $role).terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $given -}}
{{- add $shutdown (index . 3) -}}
{{- else if le (int $given) $shutdown -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must exceed config.%s.shutdown_timeout_secs (%d): Kubernetes would kill the pod in the middle of its drain" $role (int $given) $role $shutdown) -}}
{{- else -}}
{{- int $given -}}
{{- end -}}
{{- end -}}

{{/* True ("true") when [jetstream] declares anything and the roles should apply it. */}}
{{- define "windrow.ensureStreams" -}}
{{- $js := .Values.config.jetstream | default dict -}}
{{- if and .Values.ensureStreams (or $js.streams $js.consumers) -}}true{{- end -}}
{{- end -}}

{{/*
The configuration as windrow reads it: .Values.config with the keys the chart
owns filled in (worker.store.dir is the data volume).
*/}}
{{- define "windrow.effectiveConfig" -}}
{{- $config := deepCopy .Values.config -}}
{{- $worker := get $config "worker" | default dict -}}
{{- $store := get $worker "store" | default dict -}}
{{- $_ := set $store "dir" (printf "%s/data" (trimSuffix "/" .Values.worker.persistence.mountPath)) -}}
{{- $_ := set $worker "store" $store -}}
{{- $_ := set $config "worker" $worker -}}
{{- toJson $config -}}
{{- end -}}

{{/*
checksum/config of a role's pods: a hash of the parts of windrow.toml the role
reads ([nats], its own section, and [jetstream] when it applies it with
--ensure-streams), so that a change to the other role's section does not
restart it (a bridge restart drops the QoS 0 messages Mosquitto deals to its
shared-subscription sessions meanwhile).
Usage: include "windrow.configChecksum" (list $ "bridge")
*/}}
{{- define "windrow.configChecksum" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $config := include "windrow.effectiveConfig" $root | fromJson -}}
{{- $read := dict "nats" (get $config "nats") $role (get $config $role) -}}
{{- if include "windrow.ensureStreams" $root -}}
{{- $_ := set $read "jetstream" (get $config "jetstream") -}}
{{- end -}}
{{- toJson $read | sha256sum -}}
{{- end -}}

{{/*
windrow.toml from the effective configuration. Scalars and lists of scalars
are written with toRawJson, whose output is valid TOML for them (Helm holds YAML
numbers as float64: toToml would write 1883 as 1883.0, which windrow rejects
for an integer key). Lists of tables become [[section.key]] blocks. A null
value leaves its key out, so windrow's default applies.
*/}}
{{- define "windrow.toml" -}}
# windrow.toml, rendered by the windrow Helm chart from .Values.config.
# `windrow config default` prints every key with its default.
{{- $config := include "windrow.effectiveConfig" . | fromJson -}}
{{- range $section := list "nats" "bridge" "worker" -}}
{{- $table := get $config $section -}}
{{- if $table -}}
{{- include "windrow.tomlTable" (dict "path" $section "table" $table) -}}
{{- end -}}
{{- end -}}
{{- /* Streams before the consumers that read them; empty lists are the default. */ -}}
{{- $jetstream := get $config "jetstream" | default dict -}}
{{- range $key := list "streams" "consumers" -}}
{{- with get $jetstream $key -}}
{{- include "windrow.tomlTable" (dict "path" "jetstream" "table" (dict $key .)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "windrow.tomlTable" -}}
{{- $path := .path -}}
{{- $table := .table -}}
{{- $scalars := list -}}
{{- $tables := list -}}
{{- $arrays := list -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $value := get $table $key -}}
{{- if kindIs "invalid" $value -}}
{{- else if kindIs "map" $value -}}
{{- $tables = append $tables $key -}}
{{- else if and (kindIs "slice" $value) $value (kindIs "map" (first $value)) -}}
{{- $arrays = append $arrays $key -}}
{{- else -}}
{{- $scalars = append $scalars $key -}}
{{- end -}}
{{- end -}}
{{- if $scalars }}

[{{ $path }}]
{{- range $key := $scalars }}
{{ $key }} = {{ get $table $key | toRawJson }}
{{- end -}}
{{- end -}}
{{- range $key := $tables -}}
{{- include "windrow.tomlTable" (dict "path" (printf "%s.%s" $path $key) "table" (get $table $key)) -}}
{{- end -}}
{{- range $key := $arrays -}}
{{- range $i, $item := get $table $key -}}
{{- if not (kindIs "map" $item) -}}
{{- fail (printf "config.%s.%s[%d]: expected a table like the other entries" $path $key $i) -}}
{{- end }}

[[{{ $path }}.{{ $key }}]]
{{- range $k := keys $item | sortAlpha -}}
{{- $v := get $item $k -}}
{{- if kindIs "map" $v -}}
{{- fail (printf "config.%s.%s[%d].%s: nested tables are not supported here" $path $key $i $k) -}}
{{- else if not (kindIs "invalid" $v) }}
{{ $k }} = {{ $v | toRawJson }}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Pod-level settings shared by both roles. Usage: include "windrow.podSpecCommon" (list $ .Values.bridge) */}}
{{- define "windrow.podSpecCommon" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
serviceAccountName: {{ include "windrow.serviceAccountName" $root }}
automountServiceAccountToken: {{ $root.Values.serviceAccount.automountToken }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $role.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $role.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $role.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $role.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Container args of a role. Usage: include "windrow.args" (list $ "bridge" .Values.bridge)
*/}}
{{- define "windrow.args" -}}
{{- $root := index . 0 -}}
{{- $role := index . 2 -}}
- {{ index . 1 }}
- --config
- /etc/windrow/windrow.toml
- --log-format
- {{ $root.Values.logFormat }}
{{- if include "windrow.ensureStreams" $root }}
- --ensure-streams
{{- end }}
{{- range $role.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Environment of a role: POD_NAME (client id / node id), then extraEnv. */}}
{{- define "windrow.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Probes of a role. Usage: include "windrow.probes" (list $ .Values.bridge) */}}
{{- define "windrow.probes" -}}
{{- $role := index . 1 -}}
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- toYaml $role.startupProbe | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  {{- toYaml $role.livenessProbe | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  {{- toYaml $role.readinessProbe | nindent 2 }}
{{- end -}}
