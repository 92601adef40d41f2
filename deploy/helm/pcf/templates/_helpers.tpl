{{/* Names, labels and the parts every PCF workload shares. */}}

{{- define "pcf.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pcf.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "pcf.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "pcf.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pcf
{{- end }}

{{/* Selector labels of one workload: (dict "root" $ "component" "api"). */}}
{{- define "pcf.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pcf.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "pcf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pcf.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret whose keys are the PCF_* secret variables. */}}
{{- define "pcf.secretName" -}}
{{- default (include "pcf.fullname" .) .Values.secret.name }}
{{- end }}

{{- define "pcf.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Refuses values that would give processes that cannot work. */}}
{{- define "pcf.validate" -}}
{{- $partitions := int .Values.kafka.partitions }}
{{- if lt $partitions 1 }}
{{- fail "kafka.partitions must be at least 1" }}
{{- end }}
{{- if gt (int .Values.projector.replicas) $partitions }}
{{- fail (printf "projector.replicas (%d) exceeds kafka.partitions (%d): a consumer group gives each partition to one member, so the extra projectors would sit idle" (int .Values.projector.replicas) $partitions) }}
{{- end }}
{{- if lt (int .Values.relay.replicas) 1 }}
{{- fail "relay.replicas must be at least 1 (2 for a stand-by)" }}
{{- end }}
{{- if not (has .Values.environment (list "production" "development")) }}
{{- fail (printf "environment must be production or development, not %q" .Values.environment) }}
{{- end }}
{{- if hasKey .Values.config.file "kafka_partitions" }}
{{- fail "set kafka.partitions, not config.file.kafka_partitions" }}
{{- end }}
{{- if and .Values.config.otlpEndpoint (not (hasPrefix "http://" .Values.config.otlpEndpoint)) }}
{{- fail "config.otlpEndpoint must be an OTLP/HTTP address like http://otel-collector:4318" }}
{{- end }}
{{- if .Values.secret.create }}
{{- $s := .Values.secret }}
{{- if not $s.databaseUrl }}
{{- fail "secret.create needs secret.databaseUrl (PCF_DATABASE_URL)" }}
{{- end }}
{{- if and $s.jwtSecret $s.jwtPublicKey }}
{{- fail "set secret.jwtSecret or secret.jwtPublicKey, not both" }}
{{- end }}
{{- if and $s.kek .Values.kekFile.enabled }}
{{- fail "set secret.kek or kekFile, not both (PCF refuses PCF_KEK together with PCF_KEK_FILE)" }}
{{- end }}
{{- if and .Values.kekFile.enabled (not .Values.kekFile.secretName) (not .Values.kekFile.content) }}
{{- fail "kekFile with secret.create needs kekFile.content (or kekFile.secretName)" }}
{{- end }}
{{- if eq .Values.environment "production" }}
{{- if not (or $s.jwtSecret $s.jwtPublicKey) }}
{{- fail "production needs secret.jwtSecret or secret.jwtPublicKey" }}
{{- end }}
{{- if not (or $s.kek .Values.kekFile.enabled) }}
{{- fail "production needs a key-encryption key: secret.kek or kekFile" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The data of the chart-made Secret (secret.create): only the keys that are set. */}}
{{- define "pcf.secretData" -}}
{{- $s := .Values.secret }}
{{- $data := dict "PCF_DATABASE_URL" $s.databaseUrl "PCF_READ_DATABASE_URL" $s.readDatabaseUrl "PCF_REDIS_URL" $s.redisUrl "PCF_JWT_SECRET" $s.jwtSecret "PCF_JWT_PUBLIC_KEY" $s.jwtPublicKey "PCF_KEK" $s.kek "PCF_KEK_ID" $s.kekId }}
{{- range $k, $v := $data }}
{{- if $v }}
{{ $k }}: {{ $v | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* pcf.toml: kafka_partitions and the extra keys of config.file. */}}
{{- define "pcf.configFile" -}}
{{- $file := dict "kafka_partitions" (int .Values.kafka.partitions) }}
{{- range $k, $v := .Values.config.file }}
{{- /* Helm reads every number as a float; PCF's integer keys refuse 600.0. */}}
{{- if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) }}
{{- $_ := set $file $k (int64 $v) }}
{{- else }}
{{- $_ := set $file $k $v }}
{{- end }}
{{- end }}
{{- toToml $file }}
{{- end }}

{{/* Annotations that restart the pods when their configuration changes. */}}
{{- define "pcf.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- if .Values.secret.create }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}
{{- end }}

{{- define "pcf.metricsAnnotations" -}}
{{- if .Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/*
Whether the chart makes a Secret of its own for the KEK file (secret.create and no
kekFile.secretName). It is apart from the Secret whose every key becomes a variable.
*/}}
{{- define "pcf.kekFileMade" -}}
{{- if and .Values.kekFile.enabled .Values.secret.create (not .Values.kekFile.secretName) }}true{{ end }}
{{- end }}

{{/* The Secret the KEK file is mounted from, for the workloads. */}}
{{- define "pcf.kekFileSecretName" -}}
{{- if .Values.kekFile.secretName }}
{{- .Values.kekFile.secretName }}
{{- else if .Values.secret.create }}
{{- printf "%s-kek" (include "pcf.fullname" .) }}
{{- else }}
{{- include "pcf.secretName" . }}
{{- end }}
{{- end }}

{{/* The environment, volumes and mounts every PCF container shares. */}}
{{- define "pcf.envFrom" -}}
- configMapRef:
    name: {{ include "pcf.fullname" . }}
- secretRef:
    name: {{ include "pcf.secretName" . }}
{{- end }}

{{/* The KEK file's variable and config.extraEnv: every PCF container, the migration's too. */}}
{{- define "pcf.commonEnv" -}}
{{- if .Values.kekFile.enabled }}
- name: PCF_KEK_FILE
  value: {{ printf "%s/%s" .Values.kekFile.mountPath .Values.kekFile.key | quote }}
{{- end }}
{{- range $name, $value := .Values.config.extraEnv }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{- define "pcf.env" -}}
{{- include "pcf.commonEnv" . }}
{{- if .Values.apiKeysFile.enabled }}
- name: PCF_API_KEYS_FILE
  value: {{ printf "%s/%s" .Values.apiKeysFile.mountPath .Values.apiKeysFile.key | quote }}
{{- end }}
{{- end }}

{{- define "pcf.volumeMounts" -}}
- name: data
  mountPath: /var/lib/pcf
- name: tmp
  mountPath: /tmp
- name: config
  mountPath: /etc/pcf/config
  readOnly: true
{{- if .Values.kekFile.enabled }}
- name: kek
  mountPath: {{ .Values.kekFile.mountPath }}
  readOnly: true
{{- end }}
{{- if .Values.apiKeysFile.enabled }}
- name: api-keys
  mountPath: {{ .Values.apiKeysFile.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* (dict "root" $ "kekSecretName" NAME): the volumes, the KEK file from the Secret NAME. */}}
{{- define "pcf.volumes" -}}
{{- $v := .root.Values }}
- name: data
  emptyDir: {}
- name: tmp
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
- name: config
  configMap:
    name: {{ include "pcf.fullname" .root }}
    items:
      - key: pcf.toml
        path: pcf.toml
{{- if $v.kekFile.enabled }}
- name: kek
  secret:
    secretName: {{ .kekSecretName }}
    defaultMode: 0440
    items:
      - key: {{ $v.kekFile.key }}
        path: {{ $v.kekFile.key }}
{{- end }}
{{- if $v.apiKeysFile.enabled }}
- name: api-keys
  secret:
    secretName: {{ default (include "pcf.secretName" .root) $v.apiKeysFile.secretName }}
    defaultMode: 0440
    items:
      - key: {{ $v.apiKeysFile.key }}
        path: {{ $v.apiKeysFile.key }}
{{- end }}
{{- end }}

{{/*
One role's Deployment: (dict "root" $ "component" "relay" "values" .Values.relay "replicas" true).
*/}}
{{- define "pcf.deployment" -}}
{{- $root := .root }}
{{- $v := .values }}
{{- $sel := dict "root" $root "component" .component }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "pcf.fullname" $root }}-{{ .component }}
  labels:
    {{- include "pcf.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if .replicas }}
  replicas: {{ $v.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "pcf.selectorLabels" $sel | nindent 6 }}
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  template:
    metadata:
      labels:
        {{- include "pcf.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      annotations:
        {{- include "pcf.checksums" $root | trim | nindent 8 }}
        {{- with (include "pcf.metricsAnnotations" $root | trim) }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "pcf.serviceAccountName" $root }}
      automountServiceAccountToken: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      containers:
        - name: pcf
          image: {{ include "pcf.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: ["serve", "--role", {{ .component | quote }}]
          ports:
            - name: http
              containerPort: {{ $root.Values.port }}
              protocol: TCP
          envFrom:
            {{- include "pcf.envFrom" $root | trim | nindent 12 }}
          {{- with (include "pcf.env" $root | trim) }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          startupProbe:
            httpGet:
              path: /health/live
              port: http
            {{- toYaml $root.Values.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet:
              path: /health/live
              port: http
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /health/ready
              port: http
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          {{- if gt (int $v.preStopSleepSeconds) 0 }}
          lifecycle:
            preStop:
              exec:
                command: ["sleep", {{ $v.preStopSleepSeconds | quote }}]
          {{- end }}
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "pcf.volumeMounts" $root | trim | nindent 12 }}
      volumes:
        {{- include "pcf.volumes" (dict "root" $root "kekSecretName" (include "pcf.kekFileSecretName" $root)) | trim | nindent 8 }}
      {{- if $root.Values.topologySpread.enabled }}
      topologySpreadConstraints:
        - maxSkew: {{ $root.Values.topologySpread.maxSkew }}
          topologyKey: {{ $root.Values.topologySpread.topologyKey }}
          whenUnsatisfiable: ScheduleAnyway
          labelSelector:
            matchLabels:
              {{- include "pcf.selectorLabels" $sel | nindent 14 }}
      {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* One role's PodDisruptionBudget: (dict "root" $ "component" "api" "pdb" .Values.api.pdb). */}}
{{- define "pcf.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "pcf.fullname" .root }}-{{ .component }}
  labels:
    {{- include "pcf.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- if hasKey .pdb "minAvailable" }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .pdb.maxUnavailable }}
  {{- end }}
  {{- with .root.Values.unhealthyPodEvictionPolicy }}
  unhealthyPodEvictionPolicy: {{ . }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "pcf.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end }}
